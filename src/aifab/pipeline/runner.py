"""Running a pipeline: stages in topological order, each skipped when its key is cached, else started where a
launcher puts it (a job on a control plane, or this process for the demo).

`run_pipeline(store, pipeline, launcher)` walks the DAG. A stage whose key matches a `done` StageRun whose
outputs are still in the store is skipped and those outputs are reused (cache.py); any other stage is started
(all ready stages at once, so independent branches run side by side) and recorded as a StageRun. A stage that
fails after its retries stops its descendants; the other branches finish. `--force STAGE` reruns that stage
and everything downstream of it. `dry_run(...)` says what would be skipped, without starting anything.

Launchers: `OnControl(control)` submits each stage as a job (`aifab stage run --task JSON`) to a control plane
(an embedded `ControlPlane`, or a running controller through `jobs.client.RemoteControl`); `InProcess` runs each
stage's body here, one after the other, and lets a failing stage's error propagate as it is.
"""

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from aifab.errors import SpecError
from aifab.pipeline.cache import cached, canonical, stage_key
from aifab.pipeline.contracts import StageInput, Task
from aifab.pipeline.dag import Pipeline, Stage, check_fits, pool_nodes
from aifab.spec import FactorySpec
from aifab.store import Store
from aifab.store.schema import StageRun, StageRunStatus, utcnow

if TYPE_CHECKING:
    from aifab.jobs.control import ControlSettings
    from aifab.jobs.records import JobSpec
    from aifab.meter.ledger import Meter

JOB_KINDS = {"data": "data", "train": "train", "evaluate": "evaluate"}  # the rest run as plain commands


class StageStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SKIPPED = "skipped"  # its key was cached: the outputs are reused
    RAN = "ran"
    FAILED = "failed"
    BLOCKED = "blocked"  # an upstream stage did not finish
    WOULD_RUN = "would-run"  # dry run
    WOULD_SKIP = "would-skip"  # dry run


OK = (StageStatus.SKIPPED, StageStatus.RAN, StageStatus.WOULD_RUN, StageStatus.WOULD_SKIP)


@dataclass
class StageOutcome:
    name: str
    status: StageStatus
    key: str | None = None  # None: not known yet (an upstream stage would run first)
    job_id: int | None = None  # None: skipped, or run in this process
    stage_run_id: int | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PipelineReport:
    pipeline: str
    stages: list[StageOutcome]

    @property
    def ok(self) -> bool:
        return all(s.status in OK for s in self.stages)

    def outputs(self, name: str) -> dict[str, Any]:
        return next(s.outputs for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "ok": self.ok,
            "stages": [
                {
                    "stage": s.name,
                    "status": str(s.status),
                    "key": s.key,
                    "job_id": s.job_id,
                    "stage_run_id": s.stage_run_id,
                    "outputs": s.outputs,
                    "error": s.error,
                }
                for s in self.stages
            ],
        }


@dataclass(frozen=True)
class Ended:
    """A started stage that ended: how, and its outputs (the job's result) when it succeeded."""

    handle: int
    succeeded: bool
    outputs: dict[str, Any]
    error: str | None  # why it failed, for the report


class Launcher(Protocol):
    """Where the runner starts stages."""

    def start(self, store: Store, pipeline: Pipeline, stage: Stage, task: Task) -> tuple[int, int | None]:
        """Start `stage`; returns a handle for wait_any and the job id (None when there is no job)."""
        ...

    def wait_any(self, handles: list[int]) -> Ended:
        """The first of the started `handles` to end."""
        ...


class Control(Protocol):
    """What OnControl needs of a control plane (jobs.control.ControlPlane, jobs.client.RemoteControl)."""

    def submit(self, spec: "JobSpec") -> int: ...
    def wait_any(self, job_ids: list[int]) -> Any: ...  # the first to end: an object with .id, .status...


class OnControl:
    """Each stage is a job on `control`: `aifab stage run --task JSON` in a fresh process, with the stage's
    resources, priority, project and retries."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.nodes = getattr(control, "nodes", None)  # the pool stages must fit, when the control plane knows it

    def start(self, store: Store, pipeline: Pipeline, stage: Stage, task: Task) -> tuple[int, int | None]:
        job_id = self.control.submit(job_spec(store, pipeline, stage, task))
        return job_id, job_id

    def wait_any(self, handles: list[int]) -> Ended:
        info = self.control.wait_any(handles)
        ok = info.status == "succeeded"
        # a stage that failed with an AifabError left its one line in the job's result (stages.run_task)
        why = (info.result or {}).get("error") if isinstance(info.result, dict) else None
        why = why if isinstance(why, str) else info.error
        error = None if ok else f"job {info.id} {info.status}" + (f": {why}" if why else "")
        return Ended(info.id, ok, dict(info.result or {}) if ok else {}, error)


class InProcess:
    """Each stage's body runs here, when started, charged to `meter`; an error propagates as it is."""

    def __init__(self, meter: "Meter") -> None:
        self.meter = meter
        self.ended: dict[int, Ended] = {}

    def start(self, store: Store, pipeline: Pipeline, stage: Stage, task: Task) -> tuple[int, int | None]:
        from aifab.pipeline.stages import execute

        handle = len(self.ended) + 1
        self.ended[handle] = Ended(handle, True, execute(store, task, self.meter), None)
        return handle, None

    def wait_any(self, handles: list[int]) -> Ended:
        return self.ended[handles[0]]


def job_spec(store: Store, pipeline: Pipeline, stage: Stage, task: Task) -> "JobSpec":
    """The JobSpec that runs `task`: `aifab stage run` in a fresh process."""
    from aifab.jobs.records import JobSpec

    task_json = canonical(task.to_json())
    command = [sys.executable, "-m", "aifab", "--home", str(store.home), "stage", "run", "--task", task_json]
    return JobSpec(
        name=f"{pipeline.name}.{stage.name}"[:128],
        command=command,
        project=stage.project,
        priority=stage.priority,
        kind=JOB_KINDS.get(stage.uses, "command"),
        gpus=stage.resources.gpus,
        cpus=stage.resources.cpus,
        memory_gb=stage.resources.memory_gb,
        preemptible=stage.uses == "train",  # it checkpoints on SIGTERM and resumes
        max_retries=stage.retries,
        backoff_s=stage.backoff_s,
        env=dict(stage.params.get("env", {})) if stage.uses == "command" else {},
    )


def task_of(pipeline: Pipeline, stage: Stage, outputs: dict[str, dict[str, Any]]) -> Task:
    """What `stage` runs with, given the outputs of the stages upstream of it."""
    inputs = {u: StageInput(pipeline.stages[u].uses, outputs[u]) for u in pipeline.upstream(stage.name)}
    return Task(pipeline.name, stage.name, stage.uses, stage.params, inputs, pipeline.prices, str(pipeline.base))


def control_settings(spec: FactorySpec) -> "ControlSettings":
    """The control plane's settings from factory.yaml's `orchestration:` section: the pool (None: this
    machine), the policy, per-project quotas (a missing field is unlimited) and fair-share weights."""
    from aifab.jobs.control import ControlSettings
    from aifab.schedule.state import Resources

    orch = spec.orchestration
    quotas = {p: Resources(q.gpus or 0, q.cpus or 0.0, q.memory_gb or 0.0) for p, q in (orch.quotas or {}).items()}
    return ControlSettings(nodes=pool_nodes(spec), policy=orch.policy, quotas=quotas or None, weights=orch.weights)


def open_control(store: Store, spec: FactorySpec) -> Any:
    """The control plane a pipeline's jobs go to, as a context manager: the running controller of this store if
    there is one (it holds the store's lock, and its pool, policy and quotas apply), else an embedded one over
    this machine or `orchestration.pool`, with the spec's policy, quotas and fair-share weights."""
    from aifab.jobs.client import remote_control
    from aifab.jobs.control import ControlPlane

    return remote_control(store) or ControlPlane(store, control_settings(spec))


def _check_force(pipeline: Pipeline, force: Iterable[str]) -> set[str]:
    force = list(force)
    for name in force:
        if name not in pipeline.stages:
            raise SpecError(f"--force {name!r}: no such stage (stages: {', '.join(pipeline.stages)})")
    return pipeline.downstream(force)


def dry_run(store: Store, pipeline: Pipeline, force: Iterable[str] = ()) -> PipelineReport:
    """Each stage's key (when its upstream is known) and whether it would be skipped; starts nothing."""
    forced = _check_force(pipeline, force)
    outputs: dict[str, dict[str, Any]] = {}
    report = []
    for name, stage in pipeline.stages.items():
        if any(u not in outputs for u in pipeline.upstream(name)):
            report.append(StageOutcome(name, StageStatus.WOULD_RUN))  # an upstream stage runs first
            continue
        key = stage_key(pipeline, stage, outputs)
        hit = None if name in forced else cached(store, pipeline.name, stage, key)
        if hit is None:
            report.append(StageOutcome(name, StageStatus.WOULD_RUN, key))
        else:
            outputs[name] = hit.outputs
            report.append(StageOutcome(name, StageStatus.WOULD_SKIP, key, hit.job_id, hit.id, hit.outputs))
    return PipelineReport(pipeline.name, report)


def run_pipeline(
    store: Store,
    pipeline: Pipeline,
    launcher: Launcher,
    force: Iterable[str] = (),
    nodes: Iterable[Any] | None = None,
) -> PipelineReport:
    """Run the DAG to the end; returns each stage's outcome (a failed job does not raise: see report.ok).
    Bad `force` names and stages too large for `nodes` (default: the launcher's pool) are refused first."""
    forced = _check_force(pipeline, force)
    check_fits(pipeline, nodes if nodes is not None else getattr(launcher, "nodes", None))
    outcomes = {n: StageOutcome(n, StageStatus.PENDING) for n in pipeline.stages}
    outputs: dict[str, dict[str, Any]] = {}
    running: dict[int, str] = {}  # launcher handle -> stage
    while True:
        for name, stage in pipeline.stages.items():
            oc = outcomes[name]
            if oc.status != StageStatus.PENDING:
                continue
            bad = [u for u in stage.needs if outcomes[u].status in (StageStatus.FAILED, StageStatus.BLOCKED)]
            if bad:
                oc.status, oc.error = StageStatus.BLOCKED, f"not run: {bad[0]!r} did not finish"
                continue
            if any(outcomes[u].status not in (StageStatus.SKIPPED, StageStatus.RAN) for u in stage.needs):
                continue
            oc.key = stage_key(pipeline, stage, outputs)
            hit = None if name in forced else cached(store, pipeline.name, stage, oc.key)
            if hit is not None:
                oc.status, oc.job_id, oc.stage_run_id, oc.outputs = StageStatus.SKIPPED, hit.job_id, hit.id, hit.outputs
                outputs[name] = hit.outputs
                continue
            handle, oc.job_id = launcher.start(store, pipeline, stage, task_of(pipeline, stage, outputs))
            with store.db.session() as s:
                row = StageRun(
                    pipeline=pipeline.name,
                    stage=name,
                    input_hash=oc.key,
                    status=StageRunStatus.RUNNING,
                    job_id=oc.job_id,
                )
                s.add(row)
                s.flush()
                oc.stage_run_id = row.id
            oc.status = StageStatus.RUNNING
            running[handle] = name
        if not running:
            break
        # whichever stage ends first frees its dependants, however long the others run
        ended = launcher.wait_any(list(running))
        _finish(store, outcomes[running.pop(ended.handle)], ended, outputs)
    return PipelineReport(pipeline.name, list(outcomes.values()))


def _finish(store: Store, oc: StageOutcome, ended: Ended, outputs: dict[str, dict[str, Any]]) -> None:
    oc.status = StageStatus.RAN if ended.succeeded else StageStatus.FAILED
    oc.outputs, oc.error = ended.outputs, ended.error
    if ended.succeeded:
        outputs[oc.name] = oc.outputs
    with store.db.session() as s:
        row = s.get(StageRun, oc.stage_run_id)
        assert row is not None
        row.status = StageRunStatus.DONE if ended.succeeded else StageRunStatus.FAILED
        row.outputs = oc.outputs if ended.succeeded else {"error": oc.error}
        row.finished_at = utcnow()
