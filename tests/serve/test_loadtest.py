"""The standard load test promotion gates read: figures that add up, one `evaluate` ledger row, bad arguments."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from aifab.errors import AifabError, NotFound
from aifab.meter.report import model_footprint, serving_energy
from aifab.registry.models import resolve
from aifab.serve.loaded import LoadedModel
from aifab.serve.loadtest import LoadTestResult, load_test, percentile, synthetic_prompts
from aifab.store import Store
from aifab.store.schema import LedgerEntry

SMALL = {"requests": 6, "concurrency": 3, "prompt_tokens": 8, "max_tokens": 4}  # fits the tiny model's 32 tokens


@pytest.fixture(scope="module")
def copied(trained: tuple[Store, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, str]]:
    """A copy of the trained store: the load test writes ledger rows, which the shared store must not get."""
    store, ref = trained
    home = tmp_path_factory.mktemp("loadtest") / "home"
    shutil.copytree(store.home, home)
    copy = Store(home)
    yield copy, ref
    copy.close()


@pytest.fixture(scope="module")
def serving_before(copied: tuple[Store, str]) -> tuple[int, float, int]:
    """The copy's serving rows, serving energy and last ledger id before the load test: other tests of this
    worker may have served or evaluated the shared model already, so the copy need not start empty."""
    store, ref = copied
    mv = resolve(store, ref)
    with store.db.session() as s:
        last_id = s.scalar(select(func.max(LedgerEntry.id))) or 0
    return serving_energy(store.db, mv.id).entries, model_footprint(store.db, mv.id).serving.energy_j, last_id


@pytest.fixture(scope="module")
def result(copied: tuple[Store, str], serving_before: tuple[int, float, int]) -> LoadTestResult:
    store, ref = copied
    return load_test(store, ref, **SMALL)


def test_the_figures_are_positive_and_add_up(result: LoadTestResult) -> None:
    r = result
    assert r.model == "tiny:1" and r.requests == 6 and r.concurrency == 3
    assert len(r.per_request) == 6
    assert r.tokens_out == 6 * 4 and all(m.tokens_out == 4 for m in r.per_request)  # EOS ignored: all max_tokens
    assert r.tokens_in == 6 * 8
    assert r.energy_j > 0 and r.cost_usd > 0 and r.elapsed_s > 0
    assert r.energy_j == pytest.approx(sum(m.energy_j for m in r.per_request), rel=1e-9)
    assert r.cost_usd == pytest.approx(sum(m.cost_usd for m in r.per_request), rel=1e-9)
    assert r.j_per_token == pytest.approx(r.energy_j / r.tokens_out)
    assert r.usd_per_mtok == pytest.approx(r.cost_usd / r.tokens_out * 1e6)
    assert all(m.ttft_s > 0 and m.tpot_s > 0 and m.energy_j > 0 for m in r.per_request)
    assert r.ttft_p95_s >= r.ttft_p50_s > 0 and r.tpot_p95_s >= r.tpot_p50_s > 0
    assert r.ttft_p95_s <= max(m.ttft_s for m in r.per_request)
    assert r.sampler and isinstance(r.estimated, bool)


def test_the_ledger_row_is_an_evaluate_charge_to_the_model(
    copied: tuple[Store, str], result: LoadTestResult, serving_before: tuple[int, float, int]
) -> None:
    store, ref = copied
    mv = resolve(store, ref)
    with store.db.session() as s:
        rows = s.scalars(
            select(LedgerEntry).where(LedgerEntry.stage == "evaluate", LedgerEntry.id > serving_before[2])
        ).all()
        [row] = rows
        assert (row.subject_kind, row.subject_id) == ("model", str(mv.id))
        assert (row.tokens_in, row.tokens_out) == (result.tokens_in, result.tokens_out)
        # all the test spent: the measured requests, the warm-up and the idle between steps
        assert row.energy_j >= result.energy_j + result.idle_j > 0
        assert row.cost_usd >= result.cost_usd and row.elapsed_s >= result.elapsed_s
        assert row.sampler == result.sampler and row.estimated == result.estimated
    # not serving: the serving J/token and footprint do not see it
    entries_before, serving_j_before, _ = serving_before
    assert serving_energy(store.db, mv.id).entries == entries_before
    assert model_footprint(store.db, mv.id).serving.energy_j == serving_j_before


class Counter:
    """An energy counter that moves 0.5 J at every read: what the device spent is its last read minus its first."""

    name, estimated, device = "counter", False, "test device"

    def __init__(self) -> None:
        self.reads: list[float] = []

    def energy_j(self) -> float:
        self.reads.append(100.0 + 0.5 * len(self.reads))
        return self.reads[-1]

    def busy_s(self) -> float:
        return 0.0


def test_the_ledger_row_is_everything_the_counter_moved(
    trained: tuple[Store, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests (measured and warm-up) and the idle between steps: the row's energy is the counter's whole
    difference, and the measured requests' share is part of it."""
    store, ref = trained
    shutil.copytree(store.home, tmp_path / "home")
    counter = Counter()
    monkeypatch.setattr("aifab.serve.metering.auto_sampler", lambda: counter)
    copy = Store(tmp_path / "home")
    try:
        r = load_test(copy, ref, **SMALL)
        with copy.db.session() as s:
            row = s.scalars(select(LedgerEntry).where(LedgerEntry.stage == "evaluate")).one()
            assert row.energy_j == pytest.approx(counter.reads[-1] - counter.reads[0])
            assert row.sampler == r.sampler == "counter" and row.estimated is r.estimated is False
            assert row.device == "test device"
    finally:
        copy.close()
    assert 0 < r.energy_j < row.energy_j and r.idle_j > 0
    assert all(m.energy_j > 0 for m in r.per_request)


def test_the_prompts_are_seeded_and_drawn_from_the_vocabulary(copied: tuple[Store, str]) -> None:
    store, ref = copied
    lm = LoadedModel.load(store, ref)
    a = synthetic_prompts(lm, 4, 50, seed=3)
    assert a == synthetic_prompts(lm, 4, 50, seed=3) != synthetic_prompts(lm, 4, 50, seed=4)
    assert len(a) == 4 and all(len(p) == 50 for p in a)
    drawn = {t for p in a for t in p}
    assert drawn <= set(range(lm.vocab_size)) and not drawn & (lm.stop_ids | set(lm.prefix_ids))
    assert len(drawn) > 50  # spread over the vocabulary, not a few tokens


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"requests": 0}, "requests must be at least 1"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"prompt_tokens": 0}, "prompt_tokens must be at least 1"),
        ({"max_tokens": 1}, "max_tokens must be at least 2"),
        ({"prompt_tokens": 30, "max_tokens": 4}, "exceed the 32-token context"),
        ({"prompt_tokens": 40}, "leave no room in the 32-token context"),
    ],
)
def test_bad_arguments_are_one_line_errors(copied: tuple[Store, str], change: dict[str, int], words: str) -> None:
    store, ref = copied
    with store.db.session() as s:
        before = len(s.scalars(select(LedgerEntry)).all())
    with pytest.raises(AifabError) as exc:
        load_test(store, ref, **{**SMALL, **change})
    assert words in str(exc.value) and "\n" not in str(exc.value)
    with store.db.session() as s:
        assert len(s.scalars(select(LedgerEntry)).all()) == before  # nothing charged


def test_an_unknown_model_is_not_found(copied: tuple[Store, str], tmp_path: Path) -> None:
    store, _ = copied
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        load_test(store, "nope", **SMALL)
    with pytest.raises(NotFound):
        load_test(store, "tiny:9", **SMALL)


def test_percentile_interpolates_like_numpy() -> None:
    import numpy as np

    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([2.0], 95) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)
