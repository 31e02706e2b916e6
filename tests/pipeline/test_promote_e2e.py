"""Gates can fail, end to end, with the real evaluations (the built-in heldout suite) and the real load test on
tiny trained models: a deliberately worse candidate (far fewer training steps) is refused with the failing gate
named, a better one is promoted, a forced promotion and a rollback are recorded; and `aifab run` with `gates:`
stops at the gate with one line naming gate, value and threshold."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from aifab.data.ingest import ingest
from aifab.evaluate.gates import LOADTEST_TASK
from aifab.meter.ledger import Meter, Prices
from aifab.pipeline.dag import build_pipeline
from aifab.pipeline.promote import promote
from aifab.pipeline.runner import InProcess, run_pipeline
from aifab.registry.aliases import alias_history, promotion
from aifab.registry.models import register, resolve
from aifab.spec import DataSpec, TrainingSpec, load_spec, parse_spec
from aifab.store import Store
from aifab.store.schema import EvalResult
from aifab.train.trainer import train
from helpers import TINY_MODEL, TINY_TOKENIZER, aifab, write_corpus

pytestmark = pytest.mark.slow

GATES = """\
gates:
  evaluations: {suites: [heldout]}
  load_test: {requests: 6, concurrency: 3, prompt_tokens: 8, max_tokens: 4}
  checks:
    - {metric: heldout-bpb/bits_per_byte, max_regression: 0.05}
    - {efficiency: j_per_token, max: 1000}    # measured and stored; generous: CPU figures are estimates
    - {latency: ttft_p95_s, max: 120}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Path]]:
    """A store with g:1 (30 steps, the champion-to-be), g:2 (1 step: worse) and g:3 (90 steps: better), all
    registered without an alias, and a factory.yaml with gates."""
    base = tmp_path_factory.mktemp("promote")
    store = Store(base / "home")
    ds = ingest(store, "g", DataSpec(sources=[str(write_corpus(base / "corpus"))], val_fraction=0.2), TINY_TOKENIZER)
    for steps in (30, 1, 90):
        tr = train(store, ds.dataset_version_id, TINY_MODEL, TrainingSpec(steps=steps, seconds=None, eval_every=10))
        register(
            store, "g", weights_digest=tr.checkpoint_digest, tokenizer_digest=tr.tokenizer_digest,
            config=tr.model_config, params_count=tr.params, metrics={}, run_id=tr.run_id,
            dataset_version_id=ds.dataset_version_id,
        )  # fmt: skip
    config = base / "factory.yaml"
    config.write_text(GATES)
    yield store, config
    store.close()


def _results(store: Store) -> int:
    with store.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(EvalResult)) or 0)


def test_a_worse_candidate_is_refused_a_better_one_promoted_and_force_and_rollback_recorded(
    models: tuple[Store, Path],
) -> None:
    store, config = models
    gates = load_spec(config).gates
    assert gates is not None
    first = promote(store, "g:1", "prod", gates, progress=False)
    assert first.moved and first.champion is None and resolve(store, "g@prod").version == 1

    # the worse candidate, through the real command: refused, one line naming the gate, its value and threshold
    refused = aifab("promote", "g:2", "--alias", "prod", "--config", str(config), "--json", home=store.home)
    assert refused.returncode == 2, refused.stderr
    err = refused.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert re.fullmatch(
        r"error: g:2 refused for g@prod: gate heldout-bpb/bits_per_byte: (\S+) > (\S+) \(champion (\S+) \+ 0\.05\)"
        r" \(promotion \d+\)",
        err,
    ), err
    decision = json.loads(refused.stdout.splitlines()[-1])
    [bpb] = [v for v in decision["verdicts"] if v["gate"] == "heldout-bpb/bits_per_byte"]
    assert bpb["measured"] > bpb["threshold"] == pytest.approx(bpb["champion"] + 0.05)
    assert "FAIL" in refused.stdout and resolve(store, "g@prod").version == 1
    stored = promotion(store, decision["promotion_id"])
    assert (stored.passed, stored.moved, stored.forced) == (False, False, False) and len(stored.gates) == 3

    # the better candidate passes every gate; the champion's results are reused, not measured again
    before = _results(store)
    better = promote(store, "g:3", "prod", gates, progress=False)
    assert better.moved and better.passed and better.champion == "g:1", better.note
    # g:3's heldout suite (bits_per_byte and perplexity, acc and acc_norm) and its load test's 4 figures: no more
    assert _results(store) - before == 4 + 4
    with store.db.session() as s:
        tested = set(s.scalars(select(EvalResult.model_version_id).where(EvalResult.task == LOADTEST_TASK)))
    assert len(tested) == 3  # every model was load-tested once

    # forced past the gate, then rolled back
    forced = promote(store, "g:2", "prod", gates, force=True, progress=False)
    assert forced.moved and forced.forced and resolve(store, "g@prod").version == 2
    back = aifab("models", "rollback", "g", "--alias", "prod", home=store.home)
    assert back.returncode == 0 and back.stdout.strip() == "g@prod -> g:3 (rolled back)"
    ids = {v: resolve(store, f"g:{v}").id for v in (1, 2, 3)}
    assert [(e.from_version_id, e.to_version_id, e.reason, e.promotion_id) for e in alias_history(store, "g")] == [
        (None, ids[1], "promote", first.promotion_id),
        (ids[1], ids[3], "promote", better.promotion_id),
        (ids[3], ids[2], "forced", forced.promotion_id),
        (ids[2], ids[3], "rollback", None),
    ]
    assert promotion(store, forced.promotion_id or 0).forced


LINE = """\
name: line
data: {{sources: [corpus], val_fraction: 0.2}}
tokenizer: {{vocab_size: 300}}
model: {{n_layer: 2, n_head: 2, d_model: 32, context_len: 32}}
training: {{steps: {steps}, seconds: null, batch_size: 8, eval_every: 10, eval_batches: 2, warmup_steps: 1}}
evaluation: {{batches: 2, max_new_tokens: 4}}
orchestration: {{backoff_s: 0}}
gates:
  checks: [{{metric: heldout-bpb/bits_per_byte, max_regression: 0.05}}]
"""


def test_aifab_run_with_gates_stops_at_a_failing_gate_with_one_line(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    factory, home = tmp_path / "factory.yaml", tmp_path / "home"
    store = Store(home)
    try:
        # a first model takes `latest` (no champion yet); in this process, for speed
        factory.write_text(LINE.format(steps=40))
        meter = Meter(store.db, Prices(electricity_usd_per_kwh=0.1, grid_co2_g_per_kwh=400.0, pue=1.0))
        pipeline = build_pipeline(parse_spec(factory.read_text(), factory), tmp_path)
        first = run_pipeline(store, pipeline, InProcess(meter))
        assert first.ok and first.outputs("gate")["moved"] is True
        assert resolve(store, "line@latest").version == 1
        # a far shorter training run: `aifab run` registers it, its gate refuses it, the run says why
        factory.write_text(LINE.format(steps=1))
        proc = aifab("run", str(factory), home=home)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        err = proc.stderr.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert re.search(
            r"failed at stage 'gate': job \d+ failed: line:2 refused for line@latest: gate heldout-bpb/bits_per_byte: "
            r"\S+ > \S+ \(champion \S+ \+ 0\.05\)",
            err,
        ), err
        assert resolve(store, "line@latest").version == 1 and resolve(store, "line").version == 2
        assert [e.reason for e in alias_history(store, "line", "latest")] == ["promote"]
    finally:
        store.close()
