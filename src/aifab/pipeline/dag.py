"""A factory.yaml's stages as a validated DAG, before anything runs.

`build_pipeline(spec)` turns the spec into a `Pipeline` or raises `SpecError` naming the stage (a missing
`needs`, a cycle, a stage with no upstream stage of the kind it reads). With no `stages:` section the pipeline
is the line: data -> train -> evaluate -> register, and when factory.yaml has `gates:`, -> gate: the model is
registered without an alias and the gate stage promotes it to `latest` only if it passes.
`check_fits(pipeline, nodes)` refuses a stage whose resources no node of the pool can ever hold. Both run before
anything is written; cache.py keys the stages and runner.py runs them.
"""

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifab.errors import SpecError
from aifab.pipeline.cache import canonical
from aifab.spec import FactorySpec, GatesSpec, ResourcesSpec, StageSpec

# The kinds of upstream stage each built-in stage reads, and how many it needs (min, max).
READS: dict[str, dict[str, tuple[int, int]]] = {
    "data": {},
    "train": {"data": (1, 1)},
    "evaluate": {"train": (1, 1)},
    "register": {"train": (1, 1), "evaluate": (0, 1)},
    "gate": {"register": (1, 1)},
    "command": {},
}
LINE_ALIAS = "latest"  # the alias the line points at its new model: at once, or through the gate stage


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
    prices: dict[str, float]  # the ledger's prices (factory.yaml's `meter:`): not part of any key

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


# ---- building and validating ---------------------------------------------------------------------------------

LINE = {
    "data": StageSpec(uses="data"),
    "train": StageSpec(uses="train", needs=["data"]),
    "evaluate": StageSpec(uses="evaluate", needs=["train"]),
    "register": StageSpec(uses="register", needs=["evaluate"]),
}


GATED_LINE = {
    **LINE,
    "register": StageSpec.model_validate({"uses": "register", "needs": ["evaluate"], "with": {"aliases": []}}),
    "gate": StageSpec.model_validate({"uses": "gate", "needs": ["register"], "with": {"alias": LINE_ALIAS}}),
}


def build_pipeline(spec: FactorySpec, base: str | Path = ".") -> Pipeline:
    """Resolve and validate the DAG of `spec` (`base`: the factory.yaml's directory). Raises SpecError naming
    the stage at fault; nothing is written."""
    specs = spec.stages if spec.stages is not None else GATED_LINE if spec.gates is not None else LINE
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
        current = (spec.gates or GatesSpec()) if key == "gates" else getattr(spec, key)
        merged = _merge(current.model_dump(mode="json"), over.get(key, {}))
        if key == "data":  # the job runs in another process, maybe another directory
            merged["sources"] = [s if os.path.isabs(s) else str(base / s) for s in merged["sources"]]
        resolved: dict[str, Any] = type(current).model_validate(merged).model_dump(mode="json")
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
        params = {"name": over.get("name", spec.name), "aliases": over.get("aliases", [LINE_ALIAS])}
    elif st.uses == "gate":
        gates = section("gates")
        if not gates["checks"]:
            raise SpecError(f"stage {name!r} (uses gate) has no checks: add `gates: {{checks: [...]}}` or `with:`")
        params = {"alias": over.get("alias", LINE_ALIAS), "gates": gates}
        deps += gates["evaluations"]["tasks"]  # an edited task file is a new decision
    else:
        params = {"run": list(st.run or []), "env": dict(st.env), "with": dict(over)}
    orch = spec.orchestration
    # a refused gate is a decision, not a fault: retrying it would only decide (and record) the same again
    retries = 0 if st.uses == "gate" else orch.retries
    return Stage(
        name=name,
        uses=st.uses,
        needs=tuple(st.needs),
        params=json.loads(canonical(params)),
        deps=tuple(deps),
        extensions=extensions,
        resources=st.resources,
        retries=retries if st.retries is None else st.retries,
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
    if st.uses == "gate":  # the gate would find its alias already moved and decide nothing
        for u in up:
            if pipeline.stages[u].uses == "register" and st.params["alias"] in pipeline.stages[u].params["aliases"]:
                raise SpecError(
                    f"stage {name!r} promotes to @{st.params['alias']}, which register stage {u!r} already sets: "
                    f"drop it from {u!r}'s `with: aliases`"
                )
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


def pool_nodes(spec: FactorySpec, control: Any = None) -> list[Any] | None:
    """The pool stages must fit: `orchestration.pool` when set, else the control plane's nodes (None: unknown)."""
    from aifab.schedule.state import Node

    pool = spec.orchestration.pool
    if pool is not None:
        return [Node(n.name, tuple(range(n.gpus)), n.cpus, n.memory_gb) for n in pool]
    nodes = getattr(control, "nodes", None)
    return list(nodes) if nodes is not None else None


def check_fits(pipeline: Pipeline, nodes: Iterable[Any] | None) -> None:
    """Refuse, before anything runs, a stage whose request no node (or gang of nodes) of the pool could hold
    even when the pool is empty. `nodes`: schedule.state.Node objects; None skips the check."""
    from aifab.schedule.state import Resources, unplaceable

    if nodes is None:
        return
    nodes = list(nodes)
    for stage in pipeline.stages.values():
        r = stage.resources
        reason = unplaceable(Resources(r.gpus, r.cpus, r.memory_gb), nodes)
        if reason:
            raise SpecError(f"stage {stage.name!r} can never run: it {reason}; lower its `resources:`")
