"""Tables of the metadata store. Changing one means adding an Alembic migration in migrations/versions/.

Units live in column names. Times are UTC. JSON columns hold free-form parameters and summaries;
anything a query filters or sums on gets its own column.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend. SQLite stores no zone, so values read back are
    marked UTC here; PostgreSQL keeps the zone itself."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: store UTC datetimes only")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class DatasetVersion(Base):
    """One tokenized version of a named dataset: the manifest artifact points at its shards and tokenizer.

    A row is inserted only once every artifact it names is stored, in one transaction, so a run that dies
    midway leaves no visible version."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    manifest_digest: Mapped[str] = mapped_column(String(64))
    tokenizer_digest: Mapped[str] = mapped_column(String(64))
    files: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    documents: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)
    train_tokens: Mapped[int] = mapped_column(BigInteger)
    val_tokens: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # added in 0002: increments, curation report, the curated documents and the per-file index
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_versions.id"))
    executor: Mapped[str | None] = mapped_column(String(16))  # where curation ran: local or ray (renamed in 0006)
    curated_digest: Mapped[str | None] = mapped_column(String(64))  # Parquet: text + provenance columns
    index_digest: Mapped[str | None] = mapped_column(String(64))  # JSON: source file -> sha256, part, counts
    stages: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # per-stage docs in/out, bytes removed, reasons


class RunStatus(StrEnum):
    """A run's `status`. Members are the strings stored in the column, so rows read back compare equal."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    PREEMPTED = "preempted"  # stopped at a checkpoint to give its devices back; resumable


class Run(Base):
    """One job: status, parameters, timings, and the checkpoint it produced."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # train | evaluate | ...
    status: Mapped[str] = mapped_column(String(16), index=True)  # a RunStatus
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_version_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_versions.id"))
    checkpoint_digest: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    elapsed_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class RunMetric(Base):
    """The per-step metrics history of a run: one row per (step, metric)."""

    __tablename__ = "run_metrics"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    elapsed_s: Mapped[float] = mapped_column(Float)


class ModelVersion(Base):
    """A registered model: safetensors weights, the model config, the tokenizer that goes with it, and its
    generation settings."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"))
    weights_digest: Mapped[str] = mapped_column(String(64))
    tokenizer_digest: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    params_count: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # added in 0003: how to generate with it (see aifab.nn.hf.read_generation): bos/eos ids and strings, whether
    # the tokenizer adds BOS itself, the chat template. {} when unknown (trained from scratch, or older rows).
    generation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=dict)


class ModelAlias(Base):
    """A movable pointer such as `demo@prod` to one version of a model."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))


class AliasReason(StrEnum):
    """Why an alias moved (`AliasEvent.reason`); the members are the stored strings."""

    SET = "set"  # `aifab models alias`, by hand
    REGISTER = "register"  # pointed at a new version as it was registered
    PROMOTE = "promote"  # every gate passed
    FORCED = "forced"  # `aifab promote --force`: moved whatever the gates said
    ROLLBACK = "rollback"  # `aifab models rollback`: back to the previous holder


class AliasEvent(Base):
    """One move of an alias, appended and never changed: the alias's history, which rollback reads.
    `from_version_id` is None when the alias is new."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    to_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    reason: Mapped[str] = mapped_column(String(16))  # an AliasReason
    promotion_id: Mapped[int | None] = mapped_column(ForeignKey("promotions.id"))  # the decision behind it


class Promotion(Base):
    """A decision on moving `name@alias` to a candidate version: each gate's measured value, threshold and
    verdict in `gates` (a list of objects, see aifab.evaluate.gates), whether all passed, and whether the move
    was forced past a failure. Written whether or not the alias moved."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    candidate_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    champion_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    passed: Mapped[bool] = mapped_column(Boolean)  # every gate passed
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    moved: Mapped[bool] = mapped_column(Boolean)  # the alias now points at the candidate
    gates: Mapped[list[Any]] = mapped_column(JSON, default=list)


class EvalResult(Base):
    """One metric of one evaluation task on one model version, from one evaluation run (`runs` row of kind
    evaluate). `task_digest` is the sha256 of the task's definition (file bytes, or the built-in suite's
    definition with its dataset version), so a changed task is a different result, never a stale one."""

    __tablename__ = "eval_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"))
    suite: Mapped[str | None] = mapped_column(String(64))  # the built-in suite it came from, if any
    task: Mapped[str] = mapped_column(String(128))
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[float] = mapped_column(Float)
    stderr: Mapped[float | None] = mapped_column(Float)  # standard error of the mean over examples
    examples: Mapped[int] = mapped_column(BigInteger)
    task_digest: Mapped[str] = mapped_column(String(64))
    energy_j: Mapped[float] = mapped_column(Float, default=0.0)  # the task's share of the run's energy
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # few-shot, limit, skipped examples...


class LineageEdge(Base):
    """`src` was an input to `dst`: dataset -> run -> model, and whatever later stages add."""

    __tablename__ = "lineage_edges"
    __table_args__ = (UniqueConstraint("src_kind", "src_id", "dst_kind", "dst_id", "relation"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    src_kind: Mapped[str] = mapped_column(String(16))
    src_id: Mapped[str] = mapped_column(String(64))
    dst_kind: Mapped[str] = mapped_column(String(16))
    dst_id: Mapped[str] = mapped_column(String(64))
    relation: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    """Energy, cost and carbon charged to one subject (a dataset, run, model or request) for one stage."""

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    stage: Mapped[str] = mapped_column(String(16), index=True)  # data | train | evaluate | serve | ...
    subject_kind: Mapped[str] = mapped_column(String(16))
    subject_id: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    sampler: Mapped[str] = mapped_column(String(32))
    estimated: Mapped[bool] = mapped_column(Boolean)
    elapsed_s: Mapped[float] = mapped_column(Float)
    device_s: Mapped[float] = mapped_column(Float)
    energy_j: Mapped[float] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float)
    co2_g: Mapped[float] = mapped_column(Float)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    # added in 0004: the `aifab serve` process (or Ray Serve app) whose rows these are, e.g. dep-1a2b3c4d;
    # None for the other stages and for rows written before 0004
    deployment: Mapped[str | None] = mapped_column(String(32))


class Job(Base):
    """One unit of work the control plane schedules: a command with a resource request, a priority and a
    project. Its row is written when it is submitted, before anything runs, and each state change is one
    committed update, so killing the control plane or an executor loses no job (see jobs.records).

    status: pending -> running -> succeeded | failed | cancelled; a preempted or retried job goes back to
    pending with `attempts` counting its starts. `not_before` holds a retry's backoff."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    project: Mapped[str] = mapped_column(String(64), index=True)
    priority: Mapped[int] = mapped_column(default=0)
    kind: Mapped[str] = mapped_column(String(16))  # data | train | evaluate | serve | command
    status: Mapped[str] = mapped_column(String(16), index=True)
    command: Mapped[list[str]] = mapped_column(JSON)  # argv
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gpus: Mapped[int] = mapped_column(default=0)
    cpus: Mapped[float] = mapped_column(Float, default=1.0)
    memory_gb: Mapped[float] = mapped_column(Float, default=1.0)
    preemptible: Mapped[bool] = mapped_column(Boolean, default=False)
    max_retries: Mapped[int] = mapped_column(default=0)
    backoff_s: Mapped[float] = mapped_column(Float, default=1.0)
    attempts: Mapped[int] = mapped_column(default=0)  # starts so far
    preemptions: Mapped[int] = mapped_column(default=0)
    attained_gpu_s: Mapped[float] = mapped_column(Float, default=0.0)  # GPU-seconds run so far, all attempts
    executor: Mapped[str | None] = mapped_column(String(16))  # local | ray, while placed
    node: Mapped[str | None] = mapped_column(String(64))
    placement: Mapped[dict[str, Any] | None] = mapped_column()  # {"node": ..., "gpu_ids": [...]}
    handle: Mapped[str | None] = mapped_column(String(128))  # the executor's id for the attempt (pid, task)
    log_path: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column()  # what the command reported (stage outputs)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    not_before: Mapped[datetime | None] = mapped_column()


class JobEvent(Base):
    """The audit trail of a job: submitted, started, preempted, requeued, retried, finished, reattached..."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class StageRunStatus(StrEnum):
    """A StageRun's `status`; the members are the stored strings."""

    RUNNING = "running"
    DONE = "done"  # outputs recorded: a later run with the same key may reuse them
    FAILED = "failed"


class StageRun(Base):
    """A pipeline stage executed for one hash of its inputs and parameters. A `done` row lets the next
    `aifab run` skip the stage and reuse `outputs`."""

    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(128), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    input_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))  # a StageRunStatus
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
