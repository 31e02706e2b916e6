"""A training run's row in the store, as the trainer writes it: created (or reopened by a resume) before the
first step, its metrics history written in batches, pointed at each checkpoint as it is saved, and marked
completed, preempted or failed at the end.

Only rank 0 of a parallel run writes; on the other ranks every method does nothing, so the loop calls them
unconditionally.
"""

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete

from aifab.store import Store
from aifab.store.lineage import link
from aifab.store.schema import Run, RunMetric, RunStatus, utcnow

if TYPE_CHECKING:
    from aifab.train.parallel import Group
    from aifab.train.prepare import TrainSetup


@dataclass(frozen=True)
class RunSummary:
    """A finished run's `Run.summary` (stored with `asdict`: the field names are the JSON keys others read)."""

    steps: int
    tokens: int
    train_loss_final: float
    val_loss_initial: float
    val_loss_final: float
    tokens_per_s: float  # over train_s: evaluation and checkpoints excluded
    train_s: float
    stopped_by: str  # "steps", "seconds", or the stop_check's reason (PREEMPTED among them)
    mfu: float | None  # flops_per_token * tokens_per_s / peak_flops; None without a catalogued peak
    flops_per_token: int
    peak_flops: float | None  # the whole group's dense peak
    device: str
    dtype: str
    compiled: bool
    window: int
    lora_digest: str | None  # a LoRA run's adapters alone


class RunRecord:
    """The row of run `run_id` and its pending metrics; `writes` is False on ranks other than 0."""

    def __init__(self, store: Store, run_id: str, writes: bool) -> None:
        self.store, self.run_id, self.writes = store, run_id, writes
        self._pending: list[RunMetric] = []

    @classmethod
    def start(cls, store: Store, setup: "TrainSetup", group: "Group") -> "RunRecord":
        """Rank 0 creates a fresh run's row (status running, linked to its dataset), or reopens a resumed run:
        drops the metrics logged after its checkpoint, records the new training spec, and marks it running
        again. A collective under several processes: every rank gets rank 0's run id."""
        import uuid

        from aifab.train import parallel

        run_id = setup.run_id
        if group.main and setup.resume_from is None:
            run_id = uuid.uuid4().hex[:12]
            with store.db.session() as s:
                s.add(
                    Run(
                        id=run_id,
                        kind="train",
                        status=RunStatus.RUNNING,
                        params=setup.params.to_json(),
                        summary={},
                        dataset_version_id=setup.dataset_version_id,
                        started_at=utcnow(),
                    )
                )
                s.flush()
                link(s, ("dataset", setup.dataset_version_id), ("run", run_id), "input")
        elif group.main and setup.resume_from is not None:
            with store.db.session() as s:
                after = RunMetric.step > setup.resume_from.step
                s.execute(delete(RunMetric).where(RunMetric.run_id == run_id, after))
                run = s.get(Run, run_id)
                assert run is not None
                run.status, run.error, run.ended_at = RunStatus.RUNNING, None, None
                run.params = {**run.params, "training": setup.training.model_dump()}
        return cls(store, parallel.from_main(group, run_id), group.main)

    def log(self, step: int, elapsed_s: float, **values: float) -> None:
        """Queue metric rows for `step`; `elapsed_s` is the run's budget clock."""
        if self.writes:
            self._pending.extend(
                RunMetric(run_id=self.run_id, step=step, key=k, value=float(v), elapsed_s=elapsed_s)
                for k, v in values.items()
            )

    def flush(self) -> None:
        """Write the queued metric rows in one commit."""
        if self._pending and self.writes:
            with self.store.db.session() as s:
                s.add_all(self._pending)
            self._pending.clear()

    def point_at(self, checkpoint_digest: str) -> None:
        """Name the newest checkpoint's weights on the row, so that a run that fails later still has them."""
        if self.writes:
            with self.store.db.session() as s:
                run = s.get(Run, self.run_id)
                assert run is not None
                run.checkpoint_digest = checkpoint_digest

    def mark_failed(self, error: BaseException) -> None:
        if self.writes:
            with self.store.db.session() as s:
                run = s.get(Run, self.run_id)
                assert run is not None
                run.status, run.ended_at = RunStatus.FAILED, utcnow()
                run.error = f"{type(error).__name__}: {error}"[:2000]

    def finish(self, summary: RunSummary, checkpoint_digest: str, elapsed_s: float) -> None:
        """Mark the run completed, or preempted (resumable) when that is why it stopped, with its summary."""
        if self.writes:
            with self.store.db.session() as s:
                run = s.get(Run, self.run_id)
                assert run is not None
                preempted = summary.stopped_by == RunStatus.PREEMPTED
                run.status = RunStatus.PREEMPTED if preempted else RunStatus.COMPLETED
                run.ended_at, run.elapsed_s = utcnow(), elapsed_s
                run.checkpoint_digest, run.summary = checkpoint_digest, asdict(summary)
