"""Job records in the metadata store: the spec a user submits, and every state change of a job.

A job row is written when it is submitted, before anything runs. Each state change is one committed
transaction that updates the row (only if it is still in the state the caller expects) and appends a
`job_events` row, so a control plane or executor killed at any moment loses no job and no history.

States: pending -> running -> succeeded | failed | cancelled. A preempted, retried or lost attempt goes back
to pending. Files of a job live in `$AIFAB_HOME/jobs/<id>/`: `job.log` (all attempts, a header line each)
plus the files of `aifab.jobs.attempt`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import CursorResult, func, select, update

from aifab.errors import AifabError, NotFound
from aifab.schedule.state import Placement, Resources, Share
from aifab.store import Store
from aifab.store.names import NAME_RE
from aifab.store.schema import Job, JobEvent, utcnow


class JobStatus(StrEnum):
    """A job's state (`jobs.status`); the values are what the store and the HTTP API hold."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
ACTIVE = (JobStatus.PENDING, JobStatus.RUNNING)


class EventKind(StrEnum):
    """What a `job_events` row records. A job's end is recorded under its final status's name."""

    SUBMITTED = "submitted"
    PLACED = "placed"  # the policy gave it a placement; the row says running
    STARTED = "started"  # the executor started the attempt and returned its handle
    REATTACHED = "reattached"  # a restarted control plane found the attempt still running
    PREEMPTING = "preempting"  # SIGTERM sent for a higher-priority job
    PREEMPTED = "preempted"  # the attempt stopped for it; the job is pending again
    RETRYING = "retrying"  # the attempt failed with retries left; pending again after a backoff
    LOST = "lost"  # the attempt vanished without an exit code; pending again
    CANCEL_REQUESTED = "cancel-requested"
    TERMINATING = "terminating"  # SIGTERM sent for a cancel
    KILLING = "killing"  # the grace period ran out: SIGKILL
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


LOG_FILE = "job.log"


class JobConflict(AifabError):
    """The job is not in a state that allows the request (e.g. cancelling a finished job)."""


class ShareRecord(TypedDict):
    """One node's part of a placement, as stored in `jobs.placement`."""

    node: str
    gpu_ids: list[int]
    cpus: float
    memory_gb: float


class PlacementRecord(TypedDict):
    """Where an attempt runs, as stored in `jobs.placement` and shown by the API: `node` and `gpu_ids` sum the
    shares up (the first node; every GPU id in share order) for a reader that does not care about gangs."""

    node: str | None
    gpu_ids: list[int]
    shares: list[ShareRecord]


def placement_record(placement: Placement) -> PlacementRecord:
    shares: list[ShareRecord] = [
        {"node": s.node, "gpu_ids": list(s.gpu_ids), "cpus": s.cpus, "memory_gb": s.memory_gb} for s in placement
    ]
    return {
        "node": shares[0]["node"] if shares else None,
        "gpu_ids": [g for s in placement for g in s.gpu_ids],
        "shares": shares,
    }


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


class JobJson(TypedDict):
    """A job as the HTTP API and `aifab status --json` show it: JobInfo's fields, datetimes as ISO 8601."""

    id: int
    name: str
    project: str
    priority: int
    kind: str
    status: str
    command: list[str]
    env: dict[str, str]
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
    placement: PlacementRecord | None
    handle: str | None
    log_path: str | None
    exit_code: int | None
    error: str | None
    result: dict[str, Any] | None
    cancel_requested: bool
    submitted_at: str
    started_at: str | None
    finished_at: str | None
    not_before: str | None


class EventJson(TypedDict):
    at: str  # ISO 8601
    event: str
    detail: dict[str, Any]


class JobDetailJson(JobJson):
    """One job with its event trail, oldest first (`GET /v1/jobs/ID`, `aifab status JOB --json`)."""

    events: list[EventJson]


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job row (see store.schema.Job for what each field means)."""

    id: int
    name: str
    project: str
    priority: int
    kind: str
    status: JobStatus
    command: list[str]
    env: dict[str, str]  # JobSpec.env
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
    placement: PlacementRecord | None
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
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        return cls(**{**values, "status": JobStatus(row.status)})

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def shares(self) -> Placement:
        """The placement of the current (or last) attempt; empty when it has none."""
        stored = (self.placement.get("shares") if self.placement else None) or []
        return tuple(
            Share(str(s["node"]), tuple(int(g) for g in s["gpu_ids"]), float(s["cpus"]), float(s["memory_gb"]))
            for s in stored
        )

    def to_dict(self) -> JobJson:
        """JSON-ready: datetimes as ISO 8601 strings."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return cast(JobJson, out)


def request_of(job: JobInfo | JobSpec) -> Resources:
    """What the job asks the pool for."""
    return Resources(gpus=job.gpus, cpus=job.cpus, memory_gb=job.memory_gb)


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
            status=JobStatus.PENDING,
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
        detail = {"priority": spec.priority, "project": spec.project}
        s.add(JobEvent(job_id=row.id, event=EventKind.SUBMITTED, detail=detail))
        return row.id


def get(store: Store, job_id: int) -> JobInfo:
    with store.db.session() as s:
        row = s.get(Job, job_id)
        if row is None:
            raise NotFound(f"unknown job {job_id} (see `aifab status`)")
        return JobInfo.of(row)


def list_jobs(
    store: Store, statuses: Sequence[str] | None = None, project: str | None = None, limit: int | None = None
) -> list[JobInfo]:
    """Jobs, oldest first; `statuses` (JobStatus values; another string matches nothing) and `project` filter,
    `limit` keeps the newest that many."""
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


def counts_by_status(store: Store) -> dict[JobStatus, int]:
    """Jobs per status; a status no job has is absent."""
    with store.db.session() as s:
        rows = s.execute(select(Job.status, func.count()).group_by(Job.status))
        return {JobStatus(status): n for status, n in rows}


@dataclass(frozen=True)
class JobTotals:
    """Over every job ever submitted."""

    preemptions: int  # attempts stopped for another job
    retries: int  # failed attempts retried


def totals(store: Store) -> JobTotals:
    """Attempts preempted and failed attempts retried, over every job (two aggregate queries)."""
    with store.db.session() as s:
        preemptions = s.scalar(select(func.coalesce(func.sum(Job.preemptions), 0)))
        retries = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.event == EventKind.RETRYING))
    return JobTotals(preemptions=int(preemptions or 0), retries=int(retries or 0))


@dataclass(frozen=True)
class EventInfo:
    """One row of a job's event trail."""

    at: datetime
    event: str  # an EventKind value (a plain string, so rows of an older version still read)
    detail: dict[str, Any]  # what the event is about: the attempt, an exit code, a reason...

    def to_dict(self) -> EventJson:
        """JSON-ready, as the API shows it: {"at" (ISO 8601), "event", "detail"}."""
        return {"at": self.at.isoformat(), "event": self.event, "detail": self.detail}


def events(store: Store, job_id: int, event: EventKind | None = None) -> list[EventInfo]:
    """The job's event trail, oldest first; `event` keeps one kind only. NotFound for an unknown job."""
    get(store, job_id)  # unknown job -> NotFound
    q = select(JobEvent).where(JobEvent.job_id == job_id)
    if event is not None:
        q = q.where(JobEvent.event == event)
    with store.db.session() as s:
        rows = s.scalars(q.order_by(JobEvent.id)).all()
        return [EventInfo(r.at, r.event, dict(r.detail)) for r in rows]


def describe(store: Store, job_id: int) -> JobDetailJson:
    """One job as the API shows it: `JobInfo.to_dict()` plus `events` (each `EventInfo.to_dict()`)."""
    return {**get(store, job_id).to_dict(), "events": [e.to_dict() for e in events(store, job_id)]}


def count_events(store: Store, job_id: int, event: EventKind, since_attempt: int | None = None) -> int:
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
    event: EventKind,
    detail: dict[str, Any] | None = None,
    *,
    expect: tuple[JobStatus, ...] | None = None,
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
    pending, running, cancelled = JobStatus.PENDING, JobStatus.RUNNING, JobStatus.CANCELLED
    info = get(store, job_id)
    if info.status == pending and transition(
        store, job_id, EventKind.CANCELLED, {"by": "user"}, expect=(pending,), status=cancelled, finished_at=utcnow()
    ):
        return get(store, job_id)
    if info.status in ACTIVE and transition(
        store, job_id, EventKind.CANCEL_REQUESTED, {}, expect=(running,), cancel_requested=True
    ):
        return get(store, job_id)
    info = get(store, job_id)
    if info.status == cancelled or info.cancel_requested:
        return info
    raise JobConflict(f"job {job_id} already {info.status}; nothing to cancel")
