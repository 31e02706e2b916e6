"""Evaluation results in the store: one `EvalResult` row per (task, metric) of an evaluation run, read back per
model version (`latest_results`), shown with the version (`model_card`) and side by side (`compare_models`).

Nothing here scores a model; harness.py does, then records its results here.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from aifab.evaluate.metrics import higher_is_better
from aifab.store import Store
from aifab.store.schema import EvalResult


@dataclass(frozen=True)
class MetricResult:
    """One metric of one task on one model version."""

    task: str
    metric: str
    value: float
    stderr: float | None  # standard error of the mean over examples; None for a single example
    examples: int
    suite: str | None  # the built-in suite the task belongs to; None for a task file
    task_digest: str  # sha256 of the task's definition, its data and the example limit
    energy_j: float  # the task's share of the evaluation run's energy

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    """What one `evaluate_model` call did: the run it recorded, every metric, and what it cost."""

    model: str  # name:version
    model_version_id: int
    run_id: str
    results: list[MetricResult]
    elapsed_s: float
    energy_j: float
    notes: list[str] = field(default_factory=list)  # examples cut or skipped to fit the context, items left out

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "results": [r.to_json() for r in self.results]}


def record(
    store: Store, model_version_id: int, run_id: str, results: list[MetricResult], details: dict[str, dict[str, Any]]
) -> None:
    """Write one EvalResult row per metric, in one transaction; `details` are per task (by name)."""
    with store.db.session() as s:
        for r in results:
            s.add(
                EvalResult(
                    model_version_id=model_version_id, run_id=run_id, suite=r.suite, task=r.task, metric=r.metric,
                    value=r.value, stderr=r.stderr, examples=r.examples, task_digest=r.task_digest,
                    energy_j=r.energy_j, details=details.get(r.task, {}),
                )
            )  # fmt: skip


def _result(row: EvalResult) -> MetricResult:
    return MetricResult(
        row.task, row.metric, row.value, row.stderr, row.examples, row.suite, row.task_digest, row.energy_j
    )


def latest_results(store: Store, model_version_id: int) -> dict[tuple[str, str], MetricResult]:
    """The newest result of each (task, metric) recorded for a model version ({} when it was never evaluated)."""
    with store.db.session() as s:
        rows = s.scalars(
            select(EvalResult).where(EvalResult.model_version_id == model_version_id).order_by(EvalResult.id)
        )
        return {(r.task, r.metric): _result(r) for r in rows}  # later ids overwrite earlier ones


@dataclass(frozen=True)
class Difference:
    """One shared (task, metric) of two model versions: b - a, and which is better (None when equal)."""

    task: str
    metric: str
    a: MetricResult
    b: MetricResult
    diff: float
    better: str | None  # "a" | "b" | None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "metric": self.metric, "a": self.a.value, "b": self.b.value, "diff": self.diff,
            "a_stderr": self.a.stderr, "b_stderr": self.b.stderr, "better": self.better,
            "higher_is_better": higher_is_better(self.metric), "same_task": self.a.task_digest == self.b.task_digest,
        }  # fmt: skip


def differences(a: dict[tuple[str, str], MetricResult], b: dict[tuple[str, str], MetricResult]) -> list[Difference]:
    """Every (task, metric) both have, sorted, with b - a and the better side."""
    out = []
    for key in sorted(a.keys() & b.keys()):
        ra, rb = a[key], b[key]
        diff = rb.value - ra.value
        better = None if diff == 0 else ("b" if (diff > 0) == higher_is_better(key[1]) else "a")
        out.append(Difference(key[0], key[1], ra, rb, diff, better))
    return out
