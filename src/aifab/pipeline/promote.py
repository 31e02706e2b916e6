"""Gated promotion: move `name@alias` to a candidate only when it passes every gate.

`promote(store, ref, alias, gates)` resolves the candidate and the champion (the holder of `gates.champion`, by
default of `alias` itself), measures what the checks read and either model lacks, decides (aifab.evaluate.gates),
and records the decision: a `Promotion` row with every verdict, whether or not the alias moves, and the move's
`AliasEvent` linked to it (registry.aliases.record_promotion: one transaction).

What is measured, and when:
- evaluation metrics: a model lacks one when it has no result for that (task, metric) with the task's current
  digest. Then the tasks' suites (`gates.evaluations.suites`, or the built-in suites that hold the checked tasks)
  and task files run on it, once, through `evaluate_model`.
- efficiency and latency: a short load test (`gates.load_test`) through the real engine and meter, stored as
  evaluation results of the task `loadtest` (j_per_token, usd_per_mtok, ttft_p95_s, tpot_p95_s) so they are
  shown and compared like the rest and not measured again. Their digest covers the load test's settings and
  this machine's name: a figure measured elsewhere is not this machine's.

The measuring functions are `Instruments`; tests may pass their own, the defaults are the real ones.
"""

import hashlib
import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select

from aifab.errors import SpecError
from aifab.evaluate.gates import LOADTEST_METRICS, LOADTEST_TASK, GateVerdict, Key, decide, first_failure, needed
from aifab.pipeline.contracts import StageError
from aifab.registry.aliases import holder, record_promotion
from aifab.registry.models import resolve
from aifab.spec import EvaluationsGate, GatesSpec, LoadTestGate
from aifab.store import Store
from aifab.store.names import check_name
from aifab.store.schema import EvalResult, ModelVersion

if TYPE_CHECKING:
    from aifab.meter.ledger import Prices
    from aifab.serve.loadtest import LoadTestResult


class GateRefused(StageError):
    """The candidate failed a gate and was not promoted; the message names the gate, value and threshold."""

    def __init__(self, report: "PromotionReport") -> None:
        super().__init__(report.note)
        self.report = report


class Result(Protocol):
    """What promote reads of a stored evaluation result (evaluate.results.MetricResult has these)."""

    @property
    def value(self) -> float: ...
    @property
    def task_digest(self) -> str: ...


@dataclass(frozen=True)
class EvalPlan:
    """Where the checked tasks come from: each task's built-in suite or task file, and its current digest (a
    stored result with another digest is stale). A task in neither is read from whatever result is stored."""

    suites: dict[str, str] = field(default_factory=dict)  # task -> suite
    files: dict[str, str] = field(default_factory=dict)  # task -> task file
    digests: dict[str, str] = field(default_factory=dict)  # task -> current task digest


@dataclass(frozen=True)
class Instruments:
    """The functions promote measures with. `real()` gives aifab's own; tests swap in cheap ones."""

    plan: Callable[[Store, str, EvaluationsGate, set[str]], EvalPlan]  # (store, ref, evaluations, tasks)
    evaluate: Callable[..., Any]  # evaluate_model(store, ref, *, suites, task_files, limit, progress)
    results: Callable[[Store, int], Mapping[Key, Result]]  # latest_results(store, model_version_id)
    load_test: Callable[..., "LoadTestResult"]  # serve.loadtest.load_test(store, ref, *, requests, ...)

    @classmethod
    def real(cls) -> "Instruments":
        from aifab.evaluate.harness import evaluate_model
        from aifab.evaluate.results import latest_results
        from aifab.serve.loadtest import load_test

        return cls(plan_evaluations, evaluate_model, latest_results, load_test)


@dataclass(frozen=True)
class PromotionReport:
    """One promotion: who was compared with whom, every verdict, and what happened (`note`, one line)."""

    model: str  # the candidate, name:version
    alias: str
    champion: str | None  # the champion, name:version; None: no model held the champion alias
    champion_alias: str
    verdicts: list[GateVerdict]
    passed: bool  # every gate passed
    forced: bool  # moved past a failing gate
    moved: bool  # the alias now points at the candidate because of this promotion
    promotion_id: int | None  # the stored decision; None when there was nothing to decide
    note: str

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in ("model", "alias", "champion", "champion_alias", "passed", "forced")},
            **{k: getattr(self, k) for k in ("moved", "promotion_id", "note")},
            "verdicts": [v.to_json() for v in self.verdicts],
        }


def promote(
    store: Store,
    ref: str,
    alias: str,
    gates: GatesSpec,
    *,
    force: bool = False,
    instruments: Instruments | None = None,
    progress: bool = True,
    prices: "Prices | None" = None,
) -> PromotionReport:
    """Decide whether `ref` takes `name@alias`, measuring what is missing, and record the decision; move the alias
    when every gate passes, or with `force` (recorded as forced). A candidate that already holds the alias is a
    no-op (nothing measured or stored). Refusal is not an exception here: see `report.moved` (the CLI and the gate
    stage raise GateRefused). `prices` (default: factory.yaml's `meter:` defaults) price the load test's $/Mtok.
    Raises NotFound for an unknown model and AliasConflict if the alias moves meanwhile."""
    check_name(alias, "alias")
    if not gates.checks:
        raise SpecError("the gates have no checks: nothing to decide (`aifab models alias` moves an alias by hand)")
    candidate = resolve(store, ref)
    name, cand_ref = candidate.name, _ref(candidate)
    current = holder(store, name, alias)
    champion_alias = gates.champion or alias
    if current is not None and current.id == candidate.id:
        note = f"{cand_ref} already holds {name}@{alias}: nothing to do"
        return PromotionReport(cand_ref, alias, cand_ref, champion_alias, [], True, False, False, None, note)
    champion = current if champion_alias == alias else holder(store, name, champion_alias)
    tools = instruments or Instruments.real()
    prices = prices or default_prices()
    keys = needed(gates)
    cand_values = measure(store, candidate, gates, keys, tools, progress=progress, prices=prices)
    champ_values = None
    if champion is not None and champion.id == candidate.id:
        champ_values = cand_values
    elif champion is not None:
        champ_values = measure(store, champion, gates, keys, tools, progress=progress, prices=prices)
    champ_ref = _ref(champion) if champion is not None else None
    verdicts = decide(gates, cand_values, champ_values, champion_name=champ_ref or "champion")
    passed = all(v.passed for v in verdicts)
    decision = record_promotion(
        store,
        name=name,
        alias=alias,
        candidate_id=candidate.id,
        champion_id=champion.id if champion is not None else None,
        verdicts=[v.to_json() for v in verdicts],
        passed=passed,
        force=force,
        expected_holder_id=current.id if current is not None else None,
    )
    note = _note(name, alias, cand_ref, verdicts, decision.promotion_id, passed, decision.moved)
    return PromotionReport(
        cand_ref, alias, champ_ref, champion_alias, verdicts, passed, decision.moved and not passed,
        decision.moved, decision.promotion_id, note,
    )  # fmt: skip


def _note(name: str, alias: str, ref: str, verdicts: list[GateVerdict], pid: int, passed: bool, moved: bool) -> str:
    failed = [v for v in verdicts if not v.passed]
    first = first_failure(verdicts)
    more = f" (and {len(failed) - 1} more failing)" if len(failed) > 1 else ""
    if passed:
        n = len(verdicts)
        return f"{name}@{alias} -> {ref}: {n} gate{'s' if n > 1 else ''} passed (promotion {pid})"
    assert first is not None
    if moved:
        return f"{name}@{alias} -> {ref} forced past {first.reason}{more} (promotion {pid})"
    return f"{ref} refused for {name}@{alias}: {first.reason}{more} (promotion {pid})"


def _ref(mv: ModelVersion) -> str:
    return f"{mv.name}:{mv.version}"


# ---- measuring -----------------------------------------------------------------------------------------------


def measure(
    store: Store,
    mv: ModelVersion,
    gates: GatesSpec,
    keys: set[Key],
    tools: Instruments,
    *,
    progress: bool = True,
    prices: "Prices",
) -> dict[Key, float]:
    """The values of `keys` for `mv`, running the evaluations and the load test it lacks."""
    values: dict[Key, float] = {}
    metric_keys = {k for k in keys if k[0] != LOADTEST_TASK}
    if metric_keys:
        values.update(_metrics(store, mv, gates.evaluations, metric_keys, tools, progress))
    if any(k[0] == LOADTEST_TASK for k in keys):
        values.update(loadtest_values(store, mv, gates.load_test, tools, prices))
    return {k: v for k, v in values.items() if k in keys}


def _metrics(
    store: Store, mv: ModelVersion, evals: EvaluationsGate, keys: set[Key], tools: Instruments, progress: bool
) -> dict[Key, float]:
    plan = tools.plan(store, _ref(mv), evals, {task for task, _ in keys})

    def current(results: Mapping[Key, Result]) -> dict[Key, float]:
        fresh = {}
        for key in keys:
            r = results.get(key)
            if r is not None and plan.digests.get(key[0], r.task_digest) == r.task_digest:
                fresh[key] = r.value
        return fresh

    values = current(tools.results(store, mv.id))
    missing = {task for task, _ in keys - values.keys()}
    suites = sorted({plan.suites[t] for t in missing if t in plan.suites})
    files = sorted({plan.files[t] for t in missing if t in plan.files})
    if suites or files:
        paths = [Path(f) for f in files]
        tools.evaluate(store, _ref(mv), suites=suites, task_files=paths, limit=evals.limit, progress=progress)
        values = current(tools.results(store, mv.id))
    return values


def plan_evaluations(store: Store, ref: str, evals: EvaluationsGate, tasks: set[str]) -> EvalPlan:
    """The real EvalPlan for model `ref`: the built-in suites (those named, or else every suite holding one of
    `tasks`) and the task files, each task with the digest its results get at `evals.limit` (harness.plan_tasks
    builds and renders them without loading the model; the heldout suite draws from the model's own dataset)."""
    from aifab.evaluate.harness import plan_tasks, result_digest
    from aifab.evaluate.suites import SUITES

    names = list(evals.suites) or [s for s, held in SUITES.items() if set(held) & tasks]
    if not names and not evals.tasks:
        return EvalPlan()
    suites, files, digests = {}, {}, {}
    for task, _, limit in plan_tasks(store, resolve(store, ref), names, [Path(p) for p in evals.tasks], evals.limit):
        name = task.spec.name
        digests[name] = result_digest(task, limit)
        if task.suite is not None:
            suites[name] = task.suite
        else:
            files[name] = task.source
    return EvalPlan(suites, files, digests)


def default_prices() -> "Prices":
    """factory.yaml's default `meter:` prices."""
    from aifab.meter.ledger import Prices
    from aifab.spec import MeterSpec

    return Prices(**MeterSpec().model_dump())


def loadtest_digest(settings: LoadTestGate, prices: "Prices") -> str:
    """The `task_digest` of load-test results: its settings, the prices its $/Mtok used and this machine (the
    figures are this machine's)."""
    body = {"settings": settings.model_dump(), "prices": asdict(prices), "machine": platform.node()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def loadtest_values(
    store: Store, mv: ModelVersion, settings: LoadTestGate, tools: Instruments, prices: "Prices"
) -> dict[Key, float]:
    """The newest stored load-test figures of `mv` with these settings and prices on this machine, or a fresh
    load test's, stored as evaluation results."""
    digest = loadtest_digest(settings, prices)
    stored = _stored_loadtest(store, mv.id, digest)
    if set(LOADTEST_METRICS) <= stored.keys():
        return {(LOADTEST_TASK, m): stored[m] for m in LOADTEST_METRICS}
    res = tools.load_test(store, _ref(mv), **settings.model_dump(), prices=prices)
    figures = {m: float(getattr(res, m)) for m in LOADTEST_METRICS}
    details = {k: getattr(res, k) for k in _LOADTEST_DETAILS if hasattr(res, k)}
    with store.db.session() as s:
        for i, (metric, value) in enumerate(figures.items()):
            s.add(
                EvalResult(
                    model_version_id=mv.id, task=LOADTEST_TASK, metric=metric, value=value, stderr=None,
                    examples=settings.requests, task_digest=digest,
                    energy_j=float(res.energy_j) if i == 0 else 0.0,  # the test's energy once, so sums stay right
                    details=details,
                )
            )  # fmt: skip
    return {(LOADTEST_TASK, m): v for m, v in figures.items()}


_LOADTEST_DETAILS = (
    "requests", "concurrency", "tokens_in", "tokens_out", "elapsed_s", "energy_j", "cost_usd", "estimated", "sampler",
    "ttft_p50_s", "tpot_p50_s", "idle_j",
)  # fmt: skip


def _stored_loadtest(store: Store, model_version_id: int, digest: str) -> dict[str, float]:
    q = select(EvalResult).where(
        EvalResult.model_version_id == model_version_id,
        EvalResult.task == LOADTEST_TASK,
        EvalResult.task_digest == digest,
    )
    newest: dict[str, float] = {}
    with store.db.session() as s:
        for row in s.scalars(q.order_by(EvalResult.id)):
            newest[row.metric] = row.value  # later rows win
    return newest
