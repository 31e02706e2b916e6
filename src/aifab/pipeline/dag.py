"""Pipelines: the stages of a factory.yaml as a DAG, run as jobs on the control plane, skipped when unchanged.

`build_pipeline(spec)` turns the spec into a validated `Pipeline` or raises `SpecError` naming the stage (a
missing `needs`, a cycle, a stage with no upstream stage of the kind it reads). With no `stages:` section the
pipeline is the line: data -> train -> evaluate -> register. `check_fits(pipeline, control)` refuses a stage
whose resources no node of the pool can ever hold. Both run before anything is written.

`run_pipeline(store, pipeline, control)` walks the DAG in topological order. A stage's key is the sha256 of its
`uses`, its resolved parameters, a fingerprint of the files it reads and the outputs of every stage upstream
of it (canonical JSON). A stage whose key matches a `done` StageRun whose outputs are still in the store is
skipped and those outputs are reused; any other stage is submitted as one job (all ready stages at once, so
independent branches run side by side) and recorded as a StageRun. A stage that fails after its retries
stops its descendants; the other branches finish. `--force STAGE` reruns that stage and everything downstream
of it. `plan(...)` is the dry run: what would be skipped, without submitting anything.
"""

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select

from aifab.errors import AifabError, SpecError
from aifab.spec import FactorySpec, ResourcesSpec, StageSpec
from aifab.store import Store
from aifab.store.schema import DatasetVersion, ModelVersion, Run, StageRun, utcnow

if TYPE_CHECKING:
    from aifab.jobs.control import ControlSettings

# The kinds of upstream stage each built-in stage reads, and how many it needs (min, max).
READS: dict[str, dict[str, tuple[int, int]]] = {
    "data": {},
    "train": {"data": (1, 1)},
    "evaluate": {"train": (1, 1)},
    "register": {"train": (1, 1), "evaluate": (0, 1)},
    "command": {},
}
JOB_KINDS = {"data": "data", "train": "train", "evaluate": "evaluate"}  # the rest run as plain commands


@dataclass(frozen=True)
class Stage:
    """One resolved stage: everything its key and its job are made of."""

    name: str
    uses: str
    needs: tuple[str, ...]
    params: dict[str, Any]  # resolved and JSON-ready: exactly what the job runs with, and what the key covers
    deps: tuple[str, ...]  # files and directories whose fingerprint is part of the key
    extensions: tuple[str, ...] | None  # for a directory in deps: only these suffixes (None: every file)
    resources: ResourcesSpec
    retries: int
    backoff_s: float
    priority: int
    project: str
    cache: bool


@dataclass(frozen=True)
class Pipeline:
    name: str
    base: Path  # the factory.yaml's directory: a command stage runs there
    stages: dict[str, Stage]  # in a topological order
    meter: dict[str, Any]  # electricity prices for the ledger: not part of any key

    def upstream(self, name: str) -> list[str]:
        """Every stage `name` depends on, directly or not, in topological order."""
        seen: set[str] = set()
        todo = list(self.stages[name].needs)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.stages[n].needs)
        return [n for n in self.stages if n in seen]

    def downstream(self, names: Iterable[str]) -> set[str]:
        """`names` and every stage that depends on one of them."""
        out = set(names)
        for n, st in self.stages.items():  # topological order: a stage's needs come before it
            if out.intersection(st.needs):
                out.add(n)
        return out


class Control(Protocol):
    """What the runner needs of a control plane (aifab.jobs.control.ControlPlane)."""

    def submit(self, spec: Any) -> int: ...
    def wait_any(self, job_ids: list[int]) -> Any: ...  # the first of them to end: an object with .id, .status...


# ---- building and validating ---------------------------------------------------------------------------------

LINE = {
    "data": StageSpec(uses="data"),
    "train": StageSpec(uses="train", needs=["data"]),
    "evaluate": StageSpec(uses="evaluate", needs=["train"]),
    "register": StageSpec(uses="register", needs=["evaluate"]),
}


def build_pipeline(spec: FactorySpec, base: str | Path = ".") -> Pipeline:
    """Resolve and validate the DAG of `spec` (`base`: the factory.yaml's directory). Raises SpecError naming
    the stage at fault; nothing is written."""
    specs = spec.stages if spec.stages is not None else LINE
    for name, st in specs.items():
        for need in st.needs:
            if need not in specs:
                raise SpecError(f"stage {name!r} needs {need!r}, which is not a stage (stages: {', '.join(specs)})")
            if need == name:
                raise SpecError(f"stage {name!r} needs itself")
    order = _topological(specs)
    stages: dict[str, Stage] = {}
    for name in order:
        st = specs[name]
        stages[name] = _resolve(spec, name, st, stages, Path(base).absolute())
    pipeline = Pipeline(spec.name, Path(base).absolute(), stages, spec.meter.model_dump())
    for name, stage in stages.items():
        _check_reads(pipeline, name, stage)
    return pipeline


def _topological(specs: dict[str, StageSpec]) -> list[str]:
    """Stages in a topological order (ties keep the file's order); a cycle is a SpecError naming its stages."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: placed
    path: list[str] = []

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            raise SpecError(f"stages form a cycle: {' -> '.join(cycle)}; stage {name!r} cannot wait on itself")
        state[name] = 1
        path.append(name)
        for need in specs[name].needs:
            visit(need)
        path.pop()
        state[name] = 2
        order.append(name)

    for name in specs:
        visit(name)
    return order


def _resolve(spec: FactorySpec, name: str, st: StageSpec, done: dict[str, Stage], base: Path) -> Stage:
    over = st.overrides

    def section(key: str) -> dict[str, Any]:
        merged = _merge(getattr(spec, key).model_dump(mode="json"), over.get(key, {}))
        if key == "data":  # the job runs in another process, maybe another directory
            merged["sources"] = [s if os.path.isabs(s) else str(base / s) for s in merged["sources"]]
        resolved: dict[str, Any] = type(getattr(spec, key)).model_validate(merged).model_dump(mode="json")
        return resolved

    deps = list(st.deps)
    extensions: tuple[str, ...] | None = None
    if st.uses == "data":
        data = section("data")
        params = {"dataset": over.get("dataset", spec.name), "data": data, "tokenizer": section("tokenizer")}
        deps = data["sources"] or [_stdlib()]
        extensions = tuple(data["extensions"])
    elif st.uses == "train":
        params = {"training": section("training"), "model": section("model"), "budgets": spec.budgets.model_dump()}
    elif st.uses == "evaluate":
        trains = [done[u] for u in _upstream_of(done, st.needs) if done[u].uses == "train"]
        training = trains[0].params["training"] if trains else spec.training.model_dump()
        params = {
            "evaluation": section("evaluation"),
            "batch_size": training["batch_size"],
            "seed": training["seed"],
        }
    elif st.uses == "register":
        params = {"name": over.get("name", spec.name), "aliases": over.get("aliases", ["latest"])}
    else:
        params = {"run": list(st.run or []), "env": dict(st.env), "with": dict(over)}
    orch = spec.orchestration
    return Stage(
        name=name,
        uses=st.uses,
        needs=tuple(st.needs),
        params=json.loads(canonical(params)),
        deps=tuple(deps),
        extensions=extensions,
        resources=st.resources,
        retries=orch.retries if st.retries is None else st.retries,
        backoff_s=orch.backoff_s if st.backoff_s is None else st.backoff_s,
        priority=st.priority,
        project=st.project or orch.project,
        cache=st.cache,
    )


def _upstream_of(done: dict[str, Stage], needs: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    todo = list(needs)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(done[n].needs)
    return sorted(seen)


def _check_reads(pipeline: Pipeline, name: str, st: Stage) -> None:
    up = pipeline.upstream(name)
    for kind, (low, high) in READS[st.uses].items():
        found = [u for u in up if pipeline.stages[u].uses == kind]
        if not low <= len(found) <= high:
            want = "one" if low == high else f"at most {high}"
            got = f"found {len(found)}: {', '.join(found)}" if found else "found none"
            raise SpecError(
                f"stage {name!r} (uses {st.uses}) reads {want} `uses: {kind}` stage upstream of it, {got}; "
                "fix its `needs`"
            )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _stdlib() -> str:
    from aifab.data.sources import stdlib_source

    return stdlib_source()


def job_spec(store: Store, pipeline: Pipeline, stage: Stage, inputs: dict[str, Any] | None = None) -> Any:
    """The JobSpec that runs `stage` with `inputs` (upstream outputs): `aifab stage run` in a fresh process."""
    from aifab.jobs.records import JobSpec

    task = {
        "pipeline": pipeline.name,
        "stage": stage.name,
        "uses": stage.uses,
        "params": stage.params,
        "inputs": inputs or {},
        "meter": pipeline.meter,
        "base": str(pipeline.base),
    }
    command = [sys.executable, "-m", "aifab", "--home", str(store.home), "stage", "run", "--task", canonical(task)]
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


def pool_nodes(spec: FactorySpec, control: Any = None) -> list[Any] | None:
    """The pool stages must fit: `orchestration.pool` when set, else the control plane's nodes (None: unknown)."""
    from aifab.schedule.state import Node

    pool = spec.orchestration.pool
    if pool is not None:
        return [Node(n.name, tuple(range(n.gpus)), n.cpus, n.memory_gb) for n in pool]
    nodes = getattr(control, "nodes", None)
    return list(nodes) if nodes is not None else None


def control_settings(spec: FactorySpec) -> "ControlSettings":
    """ControlPlane settings from factory.yaml's `orchestration:` section: the pool (None: this
    machine), the policy, per-project quotas (a missing field is unlimited) and fair-share weights."""
    from aifab.jobs.control import ControlSettings
    from aifab.schedule.state import Resources

    orch = spec.orchestration
    quotas = {p: Resources(q.gpus or 0, q.cpus or 0.0, q.memory_gb or 0.0) for p, q in (orch.quotas or {}).items()}
    return ControlSettings(nodes=pool_nodes(spec), policy=orch.policy, quotas=quotas or None, weights=orch.weights)


def check_fits(pipeline: Pipeline, nodes: Iterable[Any] | None) -> None:
    """Refuse, before anything runs, a stage whose request no node (or gang of nodes) of the pool could hold
    even when the pool is empty. `nodes`: policy.Node objects; None skips the check."""
    from aifab.schedule.state import Resources, unplaceable

    if nodes is None:
        return
    nodes = list(nodes)
    for stage in pipeline.stages.values():
        r = stage.resources
        reason = unplaceable(Resources(r.gpus, r.cpus, r.memory_gb), nodes)
        if reason:
            raise SpecError(f"stage {stage.name!r} can never run: it {reason}; lower its `resources:`")


# ---- keys and the cache --------------------------------------------------------------------------------------


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text, so equal keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def fingerprint(paths: Iterable[str], extensions: Iterable[str] | None = None) -> list[list[Any]]:
    """(path, size, mtime_ns) of every file under `paths`, sorted: a stat per file, no reads. Cheap on a large
    corpus; a touched file makes the stage rerun (and the data stage itself then reuses unchanged files by
    content), while an edit that keeps both size and mtime_ns is missed."""
    from aifab.data.sources import list_files

    files: list[Path] = []
    for p in paths:
        if extensions is not None or not os.path.isdir(p):
            files.extend(list_files([p], list(extensions or [])) if extensions is not None else [Path(p)])
        else:
            files.extend(Path(root) / f for root, _, names in os.walk(p) for f in names)
    out = []
    for f in sorted(set(files)):
        try:
            st = f.stat()
        except OSError as e:
            raise AifabError(f"cannot read {f}: {e.strerror}") from None
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def stage_key(pipeline: Pipeline, stage: Stage, outputs: dict[str, dict[str, Any]]) -> str:
    """sha256 of what the stage runs with: uses, params, its files' fingerprint and the outputs upstream."""
    upstream = {u: outputs[u] for u in pipeline.upstream(stage.name)}
    body = {
        "uses": stage.uses,
        "params": stage.params,
        "files": fingerprint(stage.deps, stage.extensions) if stage.deps else [],
        "upstream": upstream,
    }
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def cached(store: Store, pipeline: str, stage: Stage, key: str) -> StageRun | None:
    """The newest `done` StageRun of this stage with this key whose outputs are still in the store."""
    if not stage.cache:
        return None
    with store.db.session() as s:
        rows = list(
            s.scalars(
                select(StageRun)
                .where(StageRun.pipeline == pipeline, StageRun.stage == stage.name, StageRun.input_hash == key)
                .where(StageRun.status == "done")
                .order_by(StageRun.id.desc())
            )
        )
        for row in rows:
            if outputs_exist(store, stage.uses, row.outputs or {}):
                s.expunge(row)
                return row
    return None


def outputs_exist(store: Store, uses: str, outputs: dict[str, Any]) -> bool:
    """Whether what a done stage made is still there: its rows, and the artifacts the next stage reads."""
    with store.db.session() as s:
        if uses == "data":
            ds = s.get(DatasetVersion, outputs.get("dataset_version_id"))
            return ds is not None and store.artifacts.exists(ds.manifest_digest)
        if uses == "train":
            run = s.get(Run, outputs.get("run_id"))
            digest = str(outputs.get("checkpoint_digest") or "")
            return run is not None and run.status == "completed" and bool(digest) and store.artifacts.exists(digest)
        if uses == "register":
            return s.get(ModelVersion, outputs.get("model_version_id")) is not None
    return True  # evaluate and command stages leave nothing in the store but their outputs themselves


# ---- running -------------------------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    name: str
    status: str  # skipped | ran | failed | blocked | would-run | would-skip
    key: str | None = None  # None: not known yet (an upstream stage would run first)
    job_id: int | None = None
    stage_run_id: int | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PipelineReport:
    pipeline: str
    stages: list[StageOutcome]

    @property
    def ok(self) -> bool:
        return all(s.status in ("skipped", "ran", "would-run", "would-skip") for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "ok": self.ok,
            "stages": [
                {
                    "stage": s.name,
                    "status": s.status,
                    "key": s.key,
                    "job_id": s.job_id,
                    "stage_run_id": s.stage_run_id,
                    "outputs": s.outputs,
                    "error": s.error,
                }
                for s in self.stages
            ],
        }


def _check_force(pipeline: Pipeline, force: Iterable[str]) -> set[str]:
    force = list(force)
    for name in force:
        if name not in pipeline.stages:
            raise SpecError(f"--force {name!r}: no such stage (stages: {', '.join(pipeline.stages)})")
    return pipeline.downstream(force)


def plan(store: Store, pipeline: Pipeline, force: Iterable[str] = ()) -> PipelineReport:
    """The dry run: each stage's key (when its upstream is known) and whether it would be skipped."""
    forced = _check_force(pipeline, force)
    outputs: dict[str, dict[str, Any]] = {}
    report = []
    for name, stage in pipeline.stages.items():
        if any(u not in outputs for u in pipeline.upstream(name)):
            report.append(StageOutcome(name, "would-run"))  # an upstream stage runs first: its outputs decide
            continue
        key = stage_key(pipeline, stage, outputs)
        hit = None if name in forced else cached(store, pipeline.name, stage, key)
        if hit is None:
            report.append(StageOutcome(name, "would-run", key))
        else:
            outputs[name] = hit.outputs
            report.append(StageOutcome(name, "would-skip", key, hit.job_id, hit.id, hit.outputs))
    return PipelineReport(pipeline.name, report)


def run_pipeline(
    store: Store,
    pipeline: Pipeline,
    control: Control,
    force: Iterable[str] = (),
    nodes: Iterable[Any] | None = None,
) -> PipelineReport:
    """Run the DAG to the end; returns each stage's outcome (a failed stage does not raise: see report.ok).
    Bad `force` names and stages too large for `nodes` (default: the control plane's) are refused first."""
    forced = _check_force(pipeline, force)
    check_fits(pipeline, nodes if nodes is not None else getattr(control, "nodes", None))
    outcomes = {n: StageOutcome(n, "pending") for n in pipeline.stages}
    outputs: dict[str, dict[str, Any]] = {}
    running: list[str] = []  # stages with a job in flight
    while True:
        for name, stage in pipeline.stages.items():
            oc = outcomes[name]
            if oc.status != "pending":
                continue
            bad = [u for u in stage.needs if outcomes[u].status in ("failed", "blocked")]
            if bad:
                oc.status, oc.error = "blocked", f"not run: {bad[0]!r} did not finish"
                continue
            if any(outcomes[u].status not in ("skipped", "ran") for u in stage.needs):
                continue
            oc.key = stage_key(pipeline, stage, outputs)
            hit = None if name in forced else cached(store, pipeline.name, stage, oc.key)
            if hit is not None:
                oc.status, oc.job_id, oc.stage_run_id, oc.outputs = "skipped", hit.job_id, hit.id, hit.outputs
                outputs[name] = hit.outputs
                continue
            _submit(store, pipeline, stage, oc, outputs, control)
            running.append(name)
        if not running:
            break
        # whichever stage ends first frees its dependants, however long the others run
        info = control.wait_any([outcomes[n].job_id or 0 for n in running])
        name = next(n for n in running if outcomes[n].job_id == info.id)
        running.remove(name)
        _finish(store, outcomes[name], info, outputs)
    return PipelineReport(pipeline.name, list(outcomes.values()))


def _submit(
    store: Store,
    pipeline: Pipeline,
    stage: Stage,
    oc: StageOutcome,
    outputs: dict[str, dict[str, Any]],
    control: Control,
) -> None:
    inputs = {u: {"uses": pipeline.stages[u].uses, "outputs": outputs[u]} for u in pipeline.upstream(stage.name)}
    oc.job_id = control.submit(job_spec(store, pipeline, stage, inputs))
    with store.db.session() as s:
        row = StageRun(pipeline=pipeline.name, stage=stage.name, input_hash=oc.key, status="running", job_id=oc.job_id)
        s.add(row)
        s.flush()
        oc.stage_run_id = row.id
    oc.status = "running"


def _finish(store: Store, oc: StageOutcome, info: Any, outputs: dict[str, dict[str, Any]]) -> None:
    ok = info.status == "succeeded"
    oc.status = "ran" if ok else "failed"
    oc.outputs = dict(info.result or {}) if ok else {}
    if ok:
        outputs[oc.name] = oc.outputs
    else:
        oc.error = f"job {oc.job_id} {info.status}" + (f": {info.error}" if info.error else "")
    with store.db.session() as s:
        row = s.get(StageRun, oc.stage_run_id)
        assert row is not None
        row.status = "done" if ok else "failed"
        row.outputs = oc.outputs if ok else {"error": oc.error}
        row.finished_at = utcnow()
