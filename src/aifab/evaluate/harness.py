"""Evaluating a registered model version on built-in suites and task files, recorded with lineage and energy.

`evaluate_model` checks everything it can before loading the model: the suite names, every task file (schema,
dataset, templates on every row it will score), the dataset the heldout suite draws from. Then it loads the
model once, runs the tasks in order under one `runs` row of kind "evaluate" (model -> run `evaluated_by`,
dataset -> run `evaluated_on`), measures the energy with the meter (ledger stage "evaluate", charged to the
run), and writes one EvalResult per (task, metric) with the task's share of the energy. A failure marks the run
failed with its reason and stores no result.
"""

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from aifab.errors import AifabError
from aifab.evaluate.results import EvalReport, MetricResult, record
from aifab.evaluate.tasks import Example, Task, load_task, render_examples
from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.schema import DatasetVersion, LineageEdge, ModelVersion, Run, RunStatus

if TYPE_CHECKING:
    from aifab.evaluate.runners import Progress, TaskScores
    from aifab.meter.ledger import Meter

__all__ = ["EvalReport", "MetricResult", "evaluate_model", "plan_tasks", "training_dataset"]


def training_dataset(store: Store, mv: ModelVersion) -> DatasetVersion | None:
    """The dataset version a model was trained on (lineage `trained_on`), or None."""
    with store.db.session() as s:
        src = s.scalar(
            select(LineageEdge.src_id)
            .where(
                LineageEdge.dst_kind == "model",
                LineageEdge.dst_id == str(mv.id),
                LineageEdge.src_kind == "dataset",
                LineageEdge.relation == "trained_on",
            )
            .order_by(LineageEdge.id.desc())
        )
        return s.get(DatasetVersion, int(src)) if src is not None else None


def plan_tasks(
    store: Store,
    mv: ModelVersion,
    suites: Sequence[str],
    task_files: Sequence[Path],
    limit: int | None,
    dataset: str | None = None,
) -> list[tuple[Task, list[Example], int | None]]:
    """Every task to run with its rendered examples and the limit applied: suites first, then task files. No
    model is loaded; every error is an AifabError of one line."""
    from aifab.evaluate.suites import DEFAULT_LIMITS, DEFAULT_SUITES, build_suite, needs_dataset, suite_tasks

    if limit is not None and limit < 1:
        raise AifabError(f"--limit must be a positive number of examples, got {limit}")
    if not suites and not task_files:
        suites = DEFAULT_SUITES
    for name in suites:
        suite_tasks(name)  # unknown names fail before any work
    tasks = [load_task(path, store) for path in task_files]
    built: list[Task] = []
    for name in dict.fromkeys(suites):
        built += build_suite(name, store, _dataset(store, mv, dataset)) if needs_dataset(name) else build_suite(name)
    out = []
    for task in [*built, *tasks]:
        n = limit if limit is not None else DEFAULT_LIMITS.get(task.spec.name) if task.suite else None
        out.append((task, render_examples(task, n), n))
    return out


def _dataset(store: Store, mv: ModelVersion, dataset: str | None) -> DatasetVersion:
    from aifab.store.datasets import resolve_dataset

    ds = resolve_dataset(store.db, dataset) if dataset is not None else training_dataset(store, mv)
    if ds is None:
        raise AifabError(
            f"{mv.name}:{mv.version} has no training dataset in its lineage: name one with --dataset NAME[:VERSION] "
            "for the heldout suite"
        )
    return ds


def evaluate_model(
    store: Store,
    ref: str,
    *,
    suites: Sequence[str] = (),
    task_files: Sequence[Path] = (),
    limit: int | None = None,
    progress: bool = True,
    dataset: str | None = None,
    meter: "Meter | None" = None,
    device: str | None = None,
) -> EvalReport:
    """Run the suites and task files (default: the standard suites, `DEFAULT_SUITES`) on the model `ref` names,
    record the run and its results, and return them. `limit` caps the examples of every task (default: each
    built-in task's own limit, every row of a task file). `dataset` replaces the model's training dataset as the
    heldout suite's source. `meter` defaults to one with factory.yaml's default prices."""
    from aifab.evaluate.lm import EvalModel
    from aifab.registry.models import resolve

    t0 = time.perf_counter()
    mv = resolve(store, ref)
    plan = plan_tasks(store, mv, suites, task_files, limit, dataset)
    meter = meter or _default_meter(store)
    lm = EvalModel.load(store, mv, device)
    run_id = _start_run(store, mv, plan, limit)
    results: list[MetricResult] = []
    details: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    try:
        with meter.measure("evaluate", "run", run_id) as charge, _bars(progress) as bars:
            for task, examples, n in plan:
                e0 = meter.sampler.energy_j()
                scores = _run(lm, task, examples, bars)
                energy_j = meter.sampler.energy_j() - e0
                digest = result_digest(task, n)
                for metric, v in scores.values.items():
                    results.append(
                        MetricResult(
                            task.spec.name, metric, v.value, v.stderr, v.examples, task.suite, digest, energy_j
                        )
                    )
                details[task.spec.name] = _details(task, scores, n, len(examples))
                notes += _notes(task, scores, lm.context_len, len(examples))
    except BaseException as e:
        _finish(store, run_id, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        raise
    elapsed_s = time.perf_counter() - t0
    record(store, mv.id, run_id, results, details)
    _finish(store, run_id, elapsed_s, summary={"results": [r.to_json() for r in results], "notes": notes})
    return EvalReport(f"{mv.name}:{mv.version}", mv.id, run_id, results, elapsed_s, charge.energy_j, notes)


def _run(lm: Any, task: Task, examples: list[Example], bars: Any) -> "TaskScores":
    from aifab.evaluate.runners import run_task

    try:
        return run_task(lm, task, examples, progress=bars.task(task.spec.name))
    except ValueError as e:  # no example fits the context
        raise AifabError(str(e)) from None


def result_digest(task: Task, limit: int | None) -> str:
    """The `task_digest` of a task's results at an example limit: the task's digest with the limit, since the same
    task on fewer examples is a different measurement. promote reads it to tell a current result from a stale one."""
    import hashlib

    return task.digest if limit is None else hashlib.sha256(f"{task.digest}\nlimit={limit}".encode()).hexdigest()


def _details(task: Task, scores: "TaskScores", limit: int | None, rendered: int) -> dict[str, Any]:
    return {
        "examples": scores.examples, "rendered": rendered, "limit": limit, "truncated": scores.truncated,
        "skipped": scores.skipped, "windowed": scores.windowed, "fewshot": task.spec.fewshot,
        "source": task.source, "output_type": task.spec.output_type, **scores.details,
    }  # fmt: skip


def _notes(task: Task, scores: "TaskScores", context_len: int, rendered: int) -> list[str]:
    """What a user should know about how the examples were scored, one line each."""
    name = task.spec.name
    out = [f"{name}: {note}" for note in task.notes]
    if scores.truncated:
        out.append(
            f"{name}: {scores.truncated} of {rendered} examples do not fit the {context_len}-token context: "
            "cut on the left (the end of the context is kept)"
        )
    if scores.skipped:
        out.append(
            f"{name}: {scores.skipped} of {rendered} examples cannot fit the {context_len}-token context: skipped"
        )
    return out


def _default_meter(store: Store) -> "Meter":
    from aifab.meter.ledger import Meter, Prices
    from aifab.spec import MeterSpec

    return Meter(store.db, Prices(**MeterSpec().model_dump()))


def _start_run(
    store: Store, mv: ModelVersion, plan: list[tuple[Task, list[Example], int | None]], limit: int | None
) -> str:
    run_id = uuid.uuid4().hex[:12]
    datasets = sorted({t.dataset_version_id for t, _, _ in plan if t.dataset_version_id is not None})
    params = {
        "model": f"{mv.name}:{mv.version}",
        "tasks": [{"task": t.spec.name, "suite": t.suite, "source": t.source, "limit": n} for t, _, n in plan],
        "limit": limit,
    }
    with store.db.session() as s:
        s.add(
            Run(
                id=run_id, kind="evaluate", status=RunStatus.RUNNING, params=params,
                dataset_version_id=datasets[0] if datasets else None, started_at=datetime.now(UTC),
            )
        )  # fmt: skip
        s.flush()
        link(s, ("model", mv.id), ("run", run_id), "evaluated_by")
        for ds in datasets:
            link(s, ("dataset", ds), ("run", run_id), "evaluated_on")
    return run_id


def _finish(
    store: Store, run_id: str, elapsed_s: float, *, summary: dict[str, Any] | None = None, error: str | None = None
) -> None:
    with store.db.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            return
        run.status = RunStatus.FAILED if error is not None else RunStatus.COMPLETED
        run.ended_at, run.elapsed_s, run.error = datetime.now(UTC), elapsed_s, error
        run.summary = summary or {}


class _Bars:
    """One progress bar per task, in scored units (spans or prompts), with rate and ETA."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def task(self, name: str) -> "Progress":
        bar = self.bar

        class Tick:
            id = bar.add_task(name, total=None)

            def start(self, total: int) -> None:
                bar.update(self.id, total=total)

            def advance(self, n: int) -> None:
                bar.advance(self.id, n)

        return Tick()


@contextmanager
def _bars(show: bool) -> Iterator[_Bars]:
    from aifab.console import progress

    with progress(disable=not show) as bar:
        yield _Bars(bar)
