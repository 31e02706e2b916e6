"""Reading runs back: all of them newest first, and one with its lineage and per-step metrics history."""

from dataclasses import dataclass

from sqlalchemy import select

from aifab.store.db import Database
from aifab.store.lineage import upstream
from aifab.store.schema import Run, RunMetric


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float
    elapsed_s: float


@dataclass(frozen=True)
class RunDetail:
    """One run's row, its ancestors as (kind, id, relation) nearest first, and each metric's points by step."""

    run: Run
    lineage: list[tuple[str, str, str]]
    history: dict[str, list[MetricPoint]]

    def to_json(self) -> dict[str, object]:
        """The run as `aifab runs show --json` prints it (times as datetimes: dump with default=str)."""
        r = self.run
        return {
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "params": r.params,
            "summary": r.summary,
            "dataset_version_id": r.dataset_version_id,
            "checkpoint_digest": r.checkpoint_digest,
            "created_at": r.created_at,
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "elapsed_s": r.elapsed_s,
            "error": r.error,
            "lineage": [{"kind": k, "id": i, "relation": rel} for k, i, rel in self.lineage],
            "metrics": {
                key: [{"step": p.step, "value": p.value, "elapsed_s": p.elapsed_s} for p in points]
                for key, points in self.history.items()
            },
        }


def list_runs(db: Database) -> list[Run]:
    """Every run, newest first."""
    with db.session() as s:
        return list(s.scalars(select(Run).order_by(Run.created_at.desc())))


def run_detail(db: Database, run_id: str) -> RunDetail | None:
    """One run with its lineage and metrics history; None when there is no such run."""
    with db.session() as s:
        r = s.get(Run, run_id)
        if r is None:
            return None
        history: dict[str, list[MetricPoint]] = {}
        for m in s.scalars(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)):
            history.setdefault(m.key, []).append(MetricPoint(m.step, m.value, m.elapsed_s))
        return RunDetail(r, upstream(s, "run", r.id), history)
