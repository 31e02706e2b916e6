"""Stand-in measuring functions for promote() (aifab.pipeline.promote.Instruments): scores set by the test,
calls counted, results stored as the real ones are."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from aifab.pipeline.promote import EvalPlan, Instruments
from aifab.registry.models import resolve
from aifab.spec import EvaluationsGate
from aifab.store import Store
from aifab.store.schema import EvalResult


@dataclass
class LoadTest:
    j_per_token: float
    usd_per_mtok: float = 1.0
    ttft_p95_s: float = 0.1
    tpot_p95_s: float = 0.01
    energy_j: float = 5.0
    requests: int = 4


class Bench:
    """Stand-in instruments: each model's 'true' scores by version, evaluation and load-test calls counted."""

    def __init__(self, scores: dict[int, dict[str, float]], digest: str = "d1") -> None:
        self.scores, self.digest = scores, digest
        self.evaluated: list[tuple[str, tuple[str, ...]]] = []
        self.load_tested: list[tuple[str, dict[str, Any]]] = []

    def plan(self, store: Store, ref: str, evals: EvaluationsGate, tasks: set[str]) -> EvalPlan:
        return EvalPlan(suites={"t": "suite"}, files={}, digests={"t": self.digest})

    def evaluate(self, store: Store, ref: str, *, suites: list[str], task_files: list[Path], **kw: Any) -> None:
        self.evaluated.append((ref, tuple(suites)))
        mv = resolve(store, ref)
        with store.db.session() as s:
            s.add(
                EvalResult(
                    model_version_id=mv.id, task="t", metric="acc", value=self.scores[mv.version]["acc"],
                    stderr=None, examples=10, task_digest=self.digest,
                )
            )  # fmt: skip

    def results(self, store: Store, model_version_id: int) -> dict[tuple[str, str], Any]:
        with store.db.session() as s:
            rows = s.scalars(select(EvalResult).where(EvalResult.model_version_id == model_version_id))
            return {(r.task, r.metric): r for r in sorted(rows, key=lambda r: r.id)}  # newest wins

    def load_test(self, store: Store, ref: str, **settings: Any) -> LoadTest:
        self.load_tested.append((ref, settings))
        return LoadTest(j_per_token=self.scores[resolve(store, ref).version]["jpt"])

    def tools(self) -> Instruments:
        return Instruments(self.plan, self.evaluate, self.results, self.load_test)
