"""The promotion decision, as a table: each kind of check, absolute and relative bounds, better up and down, no
champion, a champion or candidate without the value, and reasons that name gate, value and threshold."""

from typing import Any

import pytest

from aifab.evaluate.gates import LOADTEST_TASK, GateVerdict, decide, first_failure, higher_better, key_of, needed
from aifab.spec import GateCheck, GatesSpec

BPB = ("heldout-bpb", "bits_per_byte")  # lower is better
ACC = ("heldout-next-line", "acc")  # higher is better
JPT = (LOADTEST_TASK, "j_per_token")
TTFT = (LOADTEST_TASK, "ttft_p95_s")


def gates(*checks: dict[str, Any]) -> GatesSpec:
    return GatesSpec.model_validate({"checks": list(checks)})


def one(check: dict[str, Any], cand: dict[Any, float], champ: dict[Any, float] | None) -> GateVerdict:
    [v] = decide(gates(check), cand, champ, champion_name="m:1")
    return v


@pytest.mark.parametrize(
    ("check", "cand", "champ", "passed", "threshold", "reason"),
    [
        # absolute bounds, whatever the direction
        ({"metric": "heldout-next-line/acc", "min": 0.3}, {ACC: 0.41}, None, True, 0.3, "0.41 >= 0.3 (min)"),
        ({"metric": "heldout-next-line/acc", "min": 0.3}, {ACC: 0.21}, None, False, 0.3, "0.21 < 0.3 (min)"),
        ({"metric": "heldout-bpb/bits_per_byte", "max": 2.5}, {BPB: 2.6}, None, False, 2.5, "2.6 > 2.5 (max)"),
        ({"efficiency": "j_per_token", "max": 0.5}, {JPT: 0.5}, None, True, 0.5, "0.5 <= 0.5 (max)"),
        ({"latency": "ttft_p95_s", "max": 0.5}, {TTFT: 0.61}, {TTFT: 0.1}, False, 0.5, "0.61 > 0.5 (max)"),
        # absolute regression, lower is better: the champion plus the allowance
        (
            {"metric": "heldout-bpb/bits_per_byte", "max_regression": 0.02}, {BPB: 2.41}, {BPB: 2.33}, False, 2.35,
            "2.41 > 2.35 (champion 2.33 + 0.02)",
        ),
        (
            {"metric": "heldout-bpb/bits_per_byte", "max_regression": 0.02}, {BPB: 2.34}, {BPB: 2.33}, True, 2.35,
            "2.34 <= 2.35 (champion 2.33 + 0.02)",
        ),
        # higher is better: the champion minus the allowance
        (
            {"metric": "heldout-next-line/acc", "max_regression": 0.05}, {ACC: 0.30}, {ACC: 0.40}, False, 0.35,
            "0.3 < 0.35 (champion 0.4 - 0.05)",
        ),
        (
            {"metric": "heldout-next-line/acc", "max_regression": 0.05}, {ACC: 0.50}, {ACC: 0.40}, True, 0.35,
            "0.5 >= 0.35 (champion 0.4 - 0.05)",
        ),
        # relative (percent of the champion's value)
        (
            {"metric": "heldout-next-line/acc", "max_regression_pct": 5}, {ACC: 0.37}, {ACC: 0.40}, False, 0.38,
            "0.37 < 0.38 (champion 0.4 - 5%)",
        ),
        (
            {"efficiency": "j_per_token", "max_regression_pct": 10}, {JPT: 1.05}, {JPT: 1.0}, True, 1.1,
            "1.05 <= 1.1 (champion 1 + 10%)",
        ),
        (
            {"efficiency": "j_per_token", "max_regression_pct": 10}, {JPT: 1.2}, {JPT: 1.0}, False, 1.1,
            "1.2 > 1.1 (champion 1 + 10%)",
        ),
        # a negative allowance demands an improvement
        (
            {"metric": "heldout-bpb/bits_per_byte", "max_regression": -0.1}, {BPB: 2.3}, {BPB: 2.33}, False, 2.23,
            "2.3 > 2.23 (champion 2.33 - 0.1)",
        ),
        (
            {"metric": "heldout-next-line/acc", "max_regression_pct": -10}, {ACC: 0.5}, {ACC: 0.4}, True, 0.44,
            "0.5 >= 0.44 (champion 0.4 + 10%)",
        ),
    ],
)  # fmt: skip
def test_each_bound_decides_and_names_gate_value_and_threshold(
    check: dict[str, Any],
    cand: dict[Any, float],
    champ: dict[Any, float] | None,
    passed: bool,
    threshold: float,
    reason: str,
) -> None:
    v = one(check, cand, champ)
    assert v.passed is passed
    assert v.threshold == pytest.approx(threshold)
    gate = check.get("metric") or check.get("efficiency") or check.get("latency")
    assert v.gate == gate and v.reason == f"gate {gate}: {reason}"
    assert v.measured == next(iter(cand.values()))


def test_without_a_champion_relative_bounds_pass_with_a_note_and_absolute_ones_apply() -> None:
    spec = gates(
        {"metric": "heldout-bpb/bits_per_byte", "max_regression": 0.02, "max": 2.0},
        {"efficiency": "j_per_token", "max_regression_pct": 5},
    )
    absolute, rel, eff = decide(spec, {BPB: 2.41, JPT: 9.0}, None)  # bounds in the order min, max, max_regression...
    assert rel.passed and rel.threshold is None and rel.champion is None
    assert "no champion to compare with" in rel.reason and rel.bound == "max_regression"
    assert not absolute.passed and absolute.reason == "gate heldout-bpb/bits_per_byte: 2.41 > 2 (max)"
    assert eff.passed and "max_regression_pct 5% passes" in eff.reason
    assert first_failure([absolute, rel, eff]) is absolute


def test_a_missing_measurement_fails_its_gate() -> None:
    v = one({"metric": "heldout-next-line/acc", "min": 0.3}, {}, None)
    assert not v.passed and v.measured is None
    assert v.reason == "gate heldout-next-line/acc: not measured (bound min 0.3)"


def test_a_champion_without_the_value_fails_a_relative_bound_but_not_an_absolute_one() -> None:
    spec = gates({"metric": "heldout-next-line/acc", "max_regression": 0.1, "min": 0.1})
    absolute, rel = decide(spec, {ACC: 0.5}, {BPB: 2.0}, champion_name="m:1")
    assert not rel.passed and rel.reason == "gate heldout-next-line/acc: 0.5; m:1 has no value to compare with"
    assert absolute.passed


def test_values_that_differ_beyond_four_digits_never_print_alike() -> None:
    v = one({"efficiency": "j_per_token", "max": 0.123456}, {JPT: 0.1234567}, None)
    assert not v.passed
    value, _, threshold = v.reason.split(": ")[1].partition(" > ")
    assert value != threshold.removesuffix(" (max)")


def test_directions_come_from_the_metric_and_load_test_figures_are_costs() -> None:
    assert higher_better(ACC) and higher_better(("python-code", "pass@1"))
    assert not higher_better(BPB) and not higher_better(("t", "perplexity"))
    assert not any(higher_better((LOADTEST_TASK, m)) for m in ("j_per_token", "usd_per_mtok", "tpot_p95_s"))


def test_keys_and_kinds() -> None:
    spec = gates({"metric": "a/b/acc", "min": 0}, {"latency": "tpot_p95_s", "max": 1})
    assert [key_of(c) for c in spec.checks] == [("a/b", "acc"), (LOADTEST_TASK, "tpot_p95_s")]
    assert [c.kind for c in spec.checks] == ["metric", "latency"]
    assert needed(spec) == {("a/b", "acc"), (LOADTEST_TASK, "tpot_p95_s")}


def test_a_check_with_several_bounds_gives_a_verdict_each_in_order() -> None:
    spec = gates({"metric": "heldout-next-line/acc", "min": 0.2, "max": 0.9, "max_regression": 0.0})
    verdicts = decide(spec, {ACC: 0.5}, {ACC: 0.5})
    assert [v.bound for v in verdicts] == ["min", "max", "max_regression"]
    assert all(v.passed for v in verdicts)


def test_a_verdict_round_trips_through_json() -> None:
    v = one({"metric": "heldout-next-line/acc", "max_regression": 0.05}, {ACC: 0.3}, {ACC: 0.4})
    assert GateVerdict.from_json(v.to_json()) == v


def test_no_checks_decide_nothing() -> None:
    assert decide(GatesSpec(), {ACC: 1.0}, None) == []


@pytest.mark.parametrize("bad", [{"metric": "x/acc"}, {"min": 1}])
def test_the_check_model_refuses_incomplete_checks(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"no bound|exactly one"):
        GateCheck.model_validate(bad)
