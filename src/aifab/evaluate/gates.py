"""The promotion decision, pure: given the gates, the candidate's measured values and the champion's, a verdict
per bound of every check. No I/O: aifab.pipeline.promote measures, this decides, the registry records.

Values are keyed by (task, metric), as evaluation results are; the load test's are under the task `loadtest`
(`LOADTEST_TASK`). A relative bound (`max_regression`, `max_regression_pct`) with no champion passes with a note
(the first model to take an alias has nothing to regress from); absolute bounds apply regardless. A value the
candidate lacks fails its gate; so does a relative bound whose champion lacks the value (a promotion that
cannot be compared is not waved through).
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Self

from aifab.evaluate.metrics import higher_is_better
from aifab.spec import GateCheck, GatesSpec

LOADTEST_TASK = "loadtest"  # the task name load-test results are stored under, beside evaluation results
LOADTEST_METRICS = ("j_per_token", "usd_per_mtok", "ttft_p95_s", "tpot_p95_s")  # all lower-is-better

Key = tuple[str, str]  # (task, metric)
Kind = Literal["metric", "efficiency", "latency"]


@dataclass(frozen=True)
class GateVerdict:
    """One bound of one check, decided. `threshold` is the value the measurement was held to (for a relative
    bound, the champion's value moved by the allowed regression); None when there was nothing to compute it from
    (no champion, or a champion without the value). `reason` is one line naming gate, value and threshold."""

    gate: str  # TASK/METRIC, or the load-test metric (j_per_token...)
    kind: Kind
    bound: str  # min | max | max_regression | max_regression_pct
    measured: float | None  # the candidate's value; None: not measured
    threshold: float | None
    champion: float | None  # the champion's value, for relative bounds
    passed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Self:
        return cls(**{k: value[k] for k in cls.__dataclass_fields__})


def key_of(check: GateCheck) -> Key:
    """The (task, metric) a check reads."""
    if check.metric is not None:
        task, _, metric = check.metric.rpartition("/")
        return task, metric
    return LOADTEST_TASK, check.gate


def needed(gates: GatesSpec) -> set[Key]:
    """Every (task, metric) the checks read."""
    return {key_of(c) for c in gates.checks}


def higher_better(key: Key) -> bool:
    """Whether a larger value of `key` is better: the metric's own direction; load-test figures are costs."""
    task, metric = key
    return False if task == LOADTEST_TASK else higher_is_better(metric)


def decide(
    gates: GatesSpec,
    candidate: Mapping[Key, float],
    champion: Mapping[Key, float] | None,
    *,
    champion_name: str = "champion",
) -> list[GateVerdict]:
    """A verdict for every bound of every check, in the order of `gates.checks`. `champion` None: there is no
    champion (relative bounds pass with a note). `champion_name` (e.g. "demo:3") is named in reasons when the
    champion lacks a value."""
    out = []
    for check in gates.checks:
        key = key_of(check)
        value = candidate.get(key)
        for bound, limit in check.bounds():
            out.append(_verdict(check, key, bound, limit, value, champion, champion_name))
    return out


def _verdict(
    check: GateCheck,
    key: Key,
    bound: str,
    limit: float,
    value: float | None,
    champion: Mapping[Key, float] | None,
    champion_name: str,
) -> GateVerdict:
    gate, kind = check.gate, check.kind

    def verdict(threshold: float | None, champ: float | None, passed: bool, reason: str) -> GateVerdict:
        return GateVerdict(gate, kind, bound, value, threshold, champ, passed, f"gate {gate}: {reason}")

    relative = bound in ("max_regression", "max_regression_pct")
    champ = champion.get(key) if champion is not None and relative else None
    if value is None:
        return verdict(None, champ, False, f"not measured (bound {bound} {_num(limit)})")
    if bound in ("min", "max"):
        ok = value >= limit if bound == "min" else value <= limit
        op = {("min", True): ">=", ("min", False): "<", ("max", True): "<=", ("max", False): ">"}[bound, ok]
        shown, limit_shown = _nums(value, limit)
        return verdict(limit, None, ok, f"{shown} {op} {limit_shown} ({bound})")
    pct = "%" if bound == "max_regression_pct" else ""
    if champion is None:
        text = f"{_num(value)}; no champion to compare with, so {bound} {_num(limit)}{pct} passes"
        return verdict(None, None, True, text)
    if champ is None:
        return verdict(None, None, False, f"{_num(value)}; {champion_name} has no value to compare with")
    # the allowed regression moves the threshold the worse way from the champion (a negative one, the better way)
    worse = -1.0 if higher_better(key) else 1.0
    threshold = champ + worse * (abs(champ) * limit / 100 if pct else limit)
    ok = value >= threshold if worse < 0 else value <= threshold
    op = (">=" if ok else "<") if worse < 0 else ("<=" if ok else ">")
    sign = "+" if worse * limit >= 0 else "-"
    shown, limit_shown = _nums(value, threshold)
    text = f"{shown} {op} {limit_shown} (champion {_num(champ)} {sign} {_num(abs(limit))}{pct})"
    return verdict(threshold, champ, ok, text)


def _num(x: float, digits: int = 4) -> str:
    """A value as reasons show it: 4 significant digits unless more are asked for."""
    return f"{x:.{digits}g}"


def _nums(value: float, threshold: float) -> tuple[str, str]:
    """Value and threshold with enough digits that unequal numbers never print alike."""
    digits = 4
    while _num(value, digits) == _num(threshold, digits) and value != threshold and digits < 17:
        digits += 2
    return _num(value, digits), _num(threshold, digits)


def first_failure(verdicts: list[GateVerdict]) -> GateVerdict | None:
    return next((v for v in verdicts if not v.passed), None)
