"""promote() with stand-in measuring functions: what it measures and when (missing or stale results only, for the
champion too), what it decides, and what it stores (a Promotion row every time, the move and its event only
when every gate passes or the move is forced). The real evaluations and load test are in test_promote_e2e.py."""

from dataclasses import replace

import pytest
from sqlalchemy import select

from aifab.errors import AifabError, NotFound
from aifab.evaluate.gates import LOADTEST_TASK
from aifab.pipeline.promote import default_prices, loadtest_digest, promote
from aifab.registry.aliases import alias_history, promotion
from aifab.registry.models import register, resolve
from aifab.spec import GatesSpec, LoadTestGate
from aifab.store import Store
from aifab.store.schema import EvalResult
from gates_bench import Bench


def _register(store: Store, n: int = 1) -> None:
    for _ in range(n):
        weights = store.artifacts.put_bytes(b"weights")
        tok = store.artifacts.put_bytes(b"tokenizer")
        register(store, "m", weights_digest=weights, tokenizer_digest=tok, config={}, params_count=1, metrics={})


ACC_GATES = GatesSpec.model_validate({"checks": [{"metric": "t/acc", "max_regression": 0.05, "min": 0.2}]})


def test_the_first_promotion_has_no_champion_and_moves(store: Store) -> None:
    _register(store)
    bench = Bench({1: {"acc": 0.5}})
    report = promote(store, "m:1", "prod", ACC_GATES, instruments=bench.tools())
    assert report.moved and report.passed and not report.forced and report.champion is None
    assert [v.passed for v in report.verdicts] == [True, True]
    assert "no champion" in report.verdicts[1].reason
    assert bench.evaluated == [("m:1", ("suite",))]
    assert resolve(store, "m@prod").version == 1
    [ev] = alias_history(store, "m", "prod")
    assert (ev.reason, ev.promotion_id, ev.from_version_id) == ("promote", report.promotion_id, None)
    assert report.note == f"m@prod -> m:1: 2 gates passed (promotion {report.promotion_id})"


def test_a_worse_candidate_is_refused_and_the_decision_stored(store: Store) -> None:
    _register(store, 2)
    bench = Bench({1: {"acc": 0.5}, 2: {"acc": 0.3}})
    promote(store, "m:1", "prod", ACC_GATES, instruments=bench.tools())
    report = promote(store, "m:2", "prod", ACC_GATES, instruments=bench.tools())
    assert not report.moved and not report.passed and report.champion == "m:1"
    assert resolve(store, "m@prod").version == 1
    assert report.note.startswith("m:2 refused for m@prod: gate t/acc: 0.3 < 0.45 (champion 0.5 - 0.05)")
    stored = promotion(store, report.promotion_id or 0)
    assert (stored.passed, stored.moved, stored.forced) == (False, False, False)
    assert [g["passed"] for g in stored.gates] == [True, False] and stored.gates[1]["threshold"] == pytest.approx(0.45)
    # the champion's result was already stored: only the candidate was evaluated
    assert bench.evaluated == [("m:1", ("suite",)), ("m:2", ("suite",))]
    # deciding again measures nothing: both results are current
    again = promote(store, "m:2", "prod", ACC_GATES, instruments=bench.tools())
    assert not again.moved and len(bench.evaluated) == 2 and again.promotion_id != report.promotion_id


def test_force_moves_past_a_failure_and_says_so(store: Store) -> None:
    _register(store, 2)
    bench = Bench({1: {"acc": 0.5}, 2: {"acc": 0.1}})
    promote(store, "m:1", "prod", ACC_GATES, instruments=bench.tools())
    report = promote(store, "m:2", "prod", ACC_GATES, force=True, instruments=bench.tools())
    assert report.moved and report.forced and not report.passed
    assert report.note.startswith("m@prod -> m:2 forced past gate t/acc: 0.1 < 0.2 (min) (and 1 more failing)")
    assert promotion(store, report.promotion_id or 0).forced
    assert [e.reason for e in alias_history(store, "m", "prod")] == ["promote", "forced"]


def test_the_holder_of_the_alias_is_a_no_op(store: Store) -> None:
    _register(store)
    bench = Bench({1: {"acc": 0.5}})
    promote(store, "m:1", "prod", ACC_GATES, instruments=bench.tools())
    report = promote(store, "m@prod", "prod", ACC_GATES, instruments=bench.tools())
    assert report.promotion_id is None and not report.moved and report.verdicts == []
    assert report.note == "m:1 already holds m@prod: nothing to do"
    assert len(bench.evaluated) == 1 and len(alias_history(store, "m")) == 1


def test_a_stale_result_is_measured_again_for_the_champion_too(store: Store) -> None:
    _register(store, 2)
    promote(store, "m:1", "prod", ACC_GATES, instruments=Bench({1: {"acc": 0.5}}, digest="old").tools())
    bench = Bench({1: {"acc": 0.5}, 2: {"acc": 0.52}}, digest="new")  # the task changed since
    report = promote(store, "m:2", "prod", ACC_GATES, instruments=bench.tools())
    assert report.moved
    assert sorted(ref for ref, _ in bench.evaluated) == ["m:1", "m:2"]


def test_the_champion_may_be_another_alias(store: Store) -> None:
    _register(store, 3)
    bench = Bench({1: {"acc": 0.9}, 2: {"acc": 0.5}, 3: {"acc": 0.5}})
    promote(store, "m:1", "prod", ACC_GATES, instruments=bench.tools())
    staging = ACC_GATES.model_copy(update={"champion": "prod"})
    report = promote(store, "m:2", "staging", staging, instruments=bench.tools())
    assert report.champion == "m:1" and report.champion_alias == "prod" and not report.moved
    assert report.verdicts[1].champion == pytest.approx(0.9)


def test_a_metric_no_evaluation_produces_fails_as_not_measured(store: Store) -> None:
    _register(store)
    gates = GatesSpec.model_validate({"checks": [{"metric": "other/acc", "min": 0.1}]})
    bench = Bench({1: {"acc": 0.5}})
    report = promote(store, "m:1", "prod", gates, instruments=bench.tools())
    assert not report.moved and bench.evaluated == []  # no suite or task file holds `other`
    assert report.verdicts[0].reason == "gate other/acc: not measured (bound min 0.1)"


LOAD_GATES = GatesSpec.model_validate(
    {
        "load_test": {"requests": 4, "concurrency": 2},
        "checks": [{"efficiency": "j_per_token", "max_regression_pct": 10}],
    }
)


def test_load_test_figures_are_stored_as_results_and_not_measured_again(store: Store) -> None:
    _register(store, 2)
    bench = Bench({1: {"jpt": 1.0}, 2: {"jpt": 1.5}})
    promote(store, "m:1", "prod", LOAD_GATES, instruments=bench.tools())
    report = promote(store, "m:2", "prod", LOAD_GATES, instruments=bench.tools())
    assert not report.moved and report.verdicts[0].reason == "gate j_per_token: 1.5 > 1.1 (champion 1 + 10%)"
    assert [ref for ref, _ in bench.load_tested] == ["m:1", "m:2"]  # the champion's figures were reused
    assert bench.load_tested[0][1] == {**LOAD_GATES.load_test.model_dump(), "prices": default_prices()}
    with store.db.session() as s:
        rows = s.scalars(select(EvalResult).where(EvalResult.task == LOADTEST_TASK)).all()
    assert {r.metric for r in rows} == {"j_per_token", "usd_per_mtok", "ttft_p95_s", "tpot_p95_s"}
    assert len(rows) == 8 and {r.task_digest for r in rows} == {loadtest_digest(LOAD_GATES.load_test, default_prices())}
    assert sum(r.energy_j for r in rows) == pytest.approx(10.0)  # each test's energy counted once
    # other settings are another measurement
    heavier = LOAD_GATES.model_copy(update={"load_test": LoadTestGate(requests=8)})
    promote(store, "m:2", "prod", heavier, instruments=bench.tools())
    assert len(bench.load_tested) == 4
    # and other prices too: $/Mtok depends on them
    dearer = replace(default_prices(), electricity_usd_per_kwh=1.0)
    promote(store, "m:2", "prod", heavier, instruments=bench.tools(), prices=dearer)
    assert len(bench.load_tested) == 6 and bench.load_tested[-1][1]["prices"] == dearer


def test_no_load_test_without_an_efficiency_or_latency_check(store: Store) -> None:
    _register(store)
    bench = Bench({1: {"acc": 0.5}})
    promote(store, "m:1", "prod", ACC_GATES, instruments=bench.tools())
    assert bench.load_tested == []


def test_bad_references_fail_before_anything_is_measured(store: Store) -> None:
    _register(store)
    bench = Bench({1: {"acc": 0.5}})
    with pytest.raises(NotFound, match="unknown model 'm:9'"):
        promote(store, "m:9", "prod", ACC_GATES, instruments=bench.tools())
    with pytest.raises(AifabError, match="invalid alias"):
        promote(store, "m:1", "pr od", ACC_GATES, instruments=bench.tools())
    with pytest.raises(AifabError, match="the gates have no checks: nothing to decide"):
        promote(store, "m:1", "prod", GatesSpec(), instruments=bench.tools())
    assert bench.evaluated == [] and alias_history(store, "m") == []
