"""Job records in the metadata store: the spec a user submits, and every state change of a job.

A job row is written when it is submitted, before anything runs. Each state change is one committed
transaction that updates the row (only if it is still in the state the caller expects) and appends a
`job_events` row, so a control plane or executor killed at any moment loses no job and no history.

States: pending -> running -> succeeded | failed | cancelled. A preempted, retried or lost attempt goes back
to pending. Files of a job live in `$AIFAB_HOME/jobs/<id>/`: `job.log` (all attempts, a header line each)
plus the files of `aifab.jobs.attempt`.
"""

from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import CursorResult, func, select, update

from aifab.errors import AifabError, NotFound
from aifab.store import Store
from aifab.store.names import NAME_RE
from aifab.store.schema import Job, JobEvent, utcnow

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("pending", "running")
LOG_FILE = "job.log"


class JobConflict(AifabError):
    """The job is not in a state that allows the request (e.g. cancelling a finished job)."""


class JobSpec(BaseModel):
    """What a user submits. Unknown fields are refused; every bound is checked before a row is written."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)  # argv, run without a shell
    name: str | None = Field(default=None, max_length=128)  # default: the program's name
    project: str = "default"  # quotas and fair share are per project
    priority: int = Field(default=0, ge=-1000, le=1000)  # higher runs first and may preempt lower
    kind: Literal["data", "train", "evaluate", "serve", "command"] = "command"
    gpus: int = Field(default=0, ge=0, le=4096)
    cpus: float = Field(default=1.0, ge=0.0, le=100_000.0, allow_inf_nan=False)
    memory_gb: float = Field(default=1.0, ge=0.0, le=1e6, allow_inf_nan=False)
    preemptible: bool = False  # may be stopped (SIGTERM) for a higher-priority job, then requeued
    max_retries: int = Field(default=0, ge=0, le=100)  # failed attempts retried this many times
    backoff_s: float = Field(default=1.0, ge=0.0, le=86_400.0, allow_inf_nan=False)  # doubles each retry
    env: dict[str, str] = Field(default_factory=dict)  # added to the job's environment

    @field_validator("command")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("the program (first element) is empty")
        return v

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"invalid project {v!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"invalid environment variable name {key!r}")
            if key.startswith("AIFAB_JOB_") or key == "CUDA_VISIBLE_DEVICES":
                raise ValueError(f"{key} is set by the executor")
        return v

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "JobSpec":
        """Validate `data`; a bad field is one AifabError line naming it."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "job"
            raise AifabError(f"job spec: {where}: {first['msg'].removeprefix('Value error, ')}") from None

    def label(self) -> str:
        return self.name or Path(self.command[0]).name


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job row (see store.schema.Job for what each field means)."""

    id: int
    name: str
    project: str
    priority: int
    kind: str
    status: str
    command: list[str]
    env: dict[str, Any]
    gpus: int
    cpus: float
    memory_gb: float
    preemptible: bool
    max_retries: int
    backoff_s: float
    attempts: int
    preemptions: int
    attained_gpu_s: float
    executor: str | None
    node: str | None
    placement: dict[str, Any] | None
    handle: str | None
    log_path: str | None
    exit_code: int | None
    error: str | None
    result: dict[str, Any] | None
    cancel_requested: bool
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None

    @classmethod
    def of(cls, row: Job) -> "JobInfo":
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out


def job_dir(home: Path, job_id: int) -> Path:
    return home / "jobs" / str(job_id)


def submit(store: Store, spec: JobSpec) -> int:
    """Write a pending job row and its `submitted` event; return the job id. Nothing runs yet."""
    with store.db.session() as s:
        row = Job(
            name=spec.label(),
            project=spec.project,
            priority=spec.priority,
            kind=spec.kind,
            status="pending",
            command=list(spec.command),
            env=dict(spec.env),
            gpus=spec.gpus,
            cpus=spec.cpus,
            memory_gb=spec.memory_gb,
            preemptible=spec.preemptible,
            max_retries=spec.max_retries,
            backoff_s=spec.backoff_s,
        )
        s.add(row)
        s.flush()
        row.log_path = str(job_dir(store.home, row.id) / LOG_FILE)
        s.add(JobEvent(job_id=row.id, event="submitted", detail={"priority": spec.priority, "project": spec.project}))
        return row.id


def get(store: Store, job_id: int) -> JobInfo:
    with store.db.session() as s:
        row = s.get(Job, job_id)
        if row is None:
            raise NotFound(f"unknown job {job_id} (see `aifab status`)")
        return JobInfo.of(row)


def list_jobs(
    store: Store, statuses: tuple[str, ...] | None = None, project: str | None = None, limit: int | None = None
) -> list[JobInfo]:
    """Jobs, oldest first; `statuses`/`project` filter, `limit` keeps the newest that many."""
    q = select(Job)
    if statuses is not None:
        q = q.where(Job.status.in_(statuses))
    if project is not None:
        q = q.where(Job.project == project)
    q = q.order_by(Job.id.desc())
    if limit is not None:
        q = q.limit(limit)
    with store.db.session() as s:
        return [JobInfo.of(r) for r in reversed(s.scalars(q).all())]


def counts_by_status(store: Store) -> dict[str, int]:
    with store.db.session() as s:
        return {status: n for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}


def totals(store: Store) -> dict[str, int]:
    """Over every job ever submitted: attempts preempted, and failed attempts retried (two aggregate queries)."""
    with store.db.session() as s:
        preemptions = s.scalar(select(func.coalesce(func.sum(Job.preemptions), 0)))
        retries = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.event == "retrying"))
    return {"preemptions": int(preemptions or 0), "retries": int(retries or 0)}


def events(store: Store, job_id: int, event: str | None = None) -> list[dict[str, Any]]:
    """The job's event trail, oldest first: {"at", "event", "detail"}; `event` keeps one kind only."""
    get(store, job_id)  # unknown job -> NotFound
    q = select(JobEvent).where(JobEvent.job_id == job_id)
    if event is not None:
        q = q.where(JobEvent.event == event)
    with store.db.session() as s:
        rows = s.scalars(q.order_by(JobEvent.id)).all()
        return [{"at": r.at.isoformat(), "event": r.event, "detail": dict(r.detail)} for r in rows]


def count_events(store: Store, job_id: int, event: str, since_attempt: int | None = None) -> int:
    """How many `event` rows the job has (with `since_attempt`: those whose detail names that attempt)."""
    with store.db.session() as s:
        rows = s.scalars(select(JobEvent.detail).where(JobEvent.job_id == job_id, JobEvent.event == event)).all()
    if since_attempt is None:
        return len(rows)
    return sum(1 for d in rows if (d or {}).get("attempt") == since_attempt)


def log_path(store: Store, job_id: int) -> Path:
    info = get(store, job_id)
    return Path(info.log_path) if info.log_path else job_dir(store.home, job_id) / LOG_FILE


def transition(
    store: Store,
    job_id: int,
    event: str,
    detail: dict[str, Any] | None = None,
    *,
    expect: tuple[str, ...] | None = None,
    **values: Any,
) -> bool:
    """In one transaction: set `values` on the job if its status is in `expect` (any, when None), and record
    `event`. Returns False, changing nothing, when the job has moved on (another process got there first)."""
    with store.db.session() as s:
        if values:
            q = update(Job).where(Job.id == job_id)
            if expect is not None:
                q = q.where(Job.status.in_(expect))
            if not cast(CursorResult[Any], s.execute(q.values(**values))).rowcount:
                return False
        else:
            status = s.scalar(select(Job.status).where(Job.id == job_id))
            if status is None or (expect is not None and status not in expect):
                return False
        s.add(JobEvent(job_id=job_id, event=event, detail=dict(detail or {})))
        return True


def cancel(store: Store, job_id: int) -> JobInfo:
    """Cancel a job: a pending one at once, a running one by asking the control plane to stop it (SIGTERM, then
    SIGKILL after a grace period). Cancelling a cancelled job is a no-op; a finished one is a JobConflict."""
    info = get(store, job_id)
    if info.status == "pending" and transition(
        store, job_id, "cancelled", {"by": "user"}, expect=("pending",), status="cancelled", finished_at=utcnow()
    ):
        return get(store, job_id)
    if info.status in ("pending", "running") and transition(
        store, job_id, "cancel-requested", {}, expect=("running",), cancel_requested=True
    ):
        return get(store, job_id)
    info = get(store, job_id)
    if info.status == "cancelled" or info.cancel_requested:
        return info
    raise JobConflict(f"job {job_id} already {info.status}; nothing to cancel")
