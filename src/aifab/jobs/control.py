"""The control plane: one loop that reaps finished attempts, retries and requeues, asks the policy what to start
or preempt, and applies its decisions through an executor. All its state is in the job rows, so a new control
plane picks up where a killed one stopped (`recover()`).

One control plane owns a store at a time (an flock on `$AIFAB_HOME/controller.lock`, released by the kernel
when the process dies). `tick()` is one round; `run(stop)` ticks until `stop` is set; `wait(job)` ticks until
that job ends (the embedded mode a pipeline uses).

Attempt outcomes: exit 0 -> succeeded (result.json copied into `jobs.result`); `EXIT_PREEMPTED`, or a SIGTERM
death while being preempted -> pending again, `preemptions += 1`; another exit -> retried after
`backoff_s * 2**retry` (via `not_before`) until `max_retries`, then failed; gone without an exit code (lost)
-> requeued, at most `MAX_LOST` times; a cancel request -> cancelled.
"""

import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from aifab.errors import AifabError
from aifab.jobs import records
from aifab.jobs.attempt import EXIT_PREEMPTED, RESULT_FILE, read_json
from aifab.jobs.executors import LOST, Executor, LocalExecutor, Poll, detect_nodes
from aifab.jobs.launch import EXIT_CANNOT_START
from aifab.jobs.records import EventKind, JobInfo, JobSpec, JobStatus, request_of
from aifab.schedule.policy import make_policy
from aifab.schedule.state import ClusterState, JobView, Node, Placement, Preempt, Resources, Running, Start, unplaceable
from aifab.store import Store
from aifab.store.schema import utcnow

MAX_LOST = 3  # attempts that vanish without an exit code (a dead launcher, a rebooted machine) requeue this often
PREEMPT_GRACE_S = 120.0  # SIGTERM -> SIGKILL for a preempted job: time to write its checkpoint
CANCEL_GRACE_S = 10.0  # SIGTERM -> SIGKILL for a cancelled job
LOCK_FILE = "controller.lock"


class JobTimeout(AifabError):
    """wait() gave up before the job ended."""


@dataclass
class _Stopping:
    """An attempt the control plane asked to stop, and when it gets SIGKILL if still running."""

    reason: Literal["preempt", "cancel"]
    kill_at: float  # time.monotonic()
    killed: bool = False


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True)
class ControlSettings:
    """How a control plane schedules, and how quickly it acts. `pipeline.runner.control_settings` builds one from
    factory.yaml's `orchestration:`; `aifab controller` from its flags."""

    nodes: Sequence[Node] | None = None  # the pool; None: this machine (executors.detect_nodes)
    policy: str = "default"  # a name for schedule.policy.make_policy
    quotas: dict[str, Resources] | None = None  # project -> the most it may hold at once (absent: no limit)
    weights: dict[str, float] | None = None  # project -> fair-share weight (absent: 1)
    poll_s: float = 0.2  # between rounds of `run` and `wait`
    preempt_grace_s: float = PREEMPT_GRACE_S
    cancel_grace_s: float = CANCEL_GRACE_S
    # Reads the pool again (e.g. the Ray cluster's alive nodes) every `refresh_every_s`; None: `nodes` is fixed.
    refresh_nodes: Callable[[], list[Node]] | None = None
    refresh_every_s: float = 10.0


class ControlPlane:
    """Schedules the jobs of `store` as `settings` say (None: the defaults, on this machine) with `executor`
    (None: LocalExecutor). Raises AifabError for an empty pool, an unknown policy, or a store another control
    plane already owns.

    With `settings.refresh_nodes`, the pool is read again every `refresh_every_s`: nodes that joined take work,
    and a node that died stops counting. Running jobs placed on a node that is gone hold nothing in the policy's
    view; their attempts end as lost and are requeued."""

    def __init__(self, store: Store, settings: ControlSettings | None = None, executor: Executor | None = None) -> None:
        self.store = store
        self.settings = settings = settings if settings is not None else ControlSettings()
        self._refreshed_at = time.monotonic()
        self.nodes = list(settings.nodes) if settings.nodes is not None else detect_nodes()
        if not self.nodes:
            raise AifabError("the control plane needs at least one node")
        self.executor: Executor = executor if executor is not None else LocalExecutor(store.home)
        try:
            self.policy = make_policy(settings.policy)
        except ValueError as e:
            raise AifabError(str(e)) from None
        self._stopping: dict[int, _Stopping] = {}
        self._tick_lock = threading.Lock()  # the loop thread and wait() callers tick one at a time
        self._lock_file = self._acquire(store.home / LOCK_FILE)
        try:
            self.recover()
        except BaseException:
            self.close()
            raise

    # -- ownership of the store ---------------------------------------------------------------------------------

    @staticmethod
    def _acquire(path: Path) -> IO[str]:
        f = open(path, "a+")  # noqa: SIM115 (held open for the control plane's life)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise AifabError(
                f"another control plane (pid {holder}) already runs the jobs of {path.parent}; "
                "talk to it (aifab submit/status) or stop it first"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        return f

    def close(self) -> None:
        """Release the store. Running attempts keep running; the next control plane reattaches them."""
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> "ControlPlane":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public verbs ---------------------------------------------------------------------------------------

    def check(self, spec: JobSpec) -> None:
        """Refuse, before anything runs, a request no node set of this pool can ever hold."""
        why = unplaceable(request_of(spec), self.nodes)
        if why is not None:
            raise AifabError(f"job {spec.label()!r} can never run on this pool: {why}")

    def submit(self, spec: JobSpec | dict[str, Any]) -> int:
        """Validate and queue a job; return its id. It starts on a later tick."""
        spec = spec if isinstance(spec, JobSpec) else JobSpec.parse(spec)
        self.check(spec)
        return records.submit(self.store, spec)

    def wait(self, job_id: int, timeout_s: float | None = None) -> JobInfo:
        """Tick until job `job_id` is succeeded, failed or cancelled; its final row. JobTimeout after `timeout_s`."""
        return self.wait_any([job_id], timeout_s)

    def wait_any(self, job_ids: list[int], timeout_s: float | None = None) -> JobInfo:
        """Tick until one of `job_ids` has ended; the final row of the first found (in the given order)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.tick()
            infos = [records.get(self.store, j) for j in job_ids]
            done = next((i for i in infos if i.terminal), None)
            if done is not None:
                return done
            if deadline is not None and time.monotonic() >= deadline:
                states = ", ".join(f"{i.id} {i.status}" for i in infos)
                raise JobTimeout(f"no job ended within {timeout_s:g} s ({states})")
            time.sleep(self.settings.poll_s)

    def run(self, stop: threading.Event) -> None:
        """Tick every `poll_s` until `stop` is set. A failing round is reported and the loop goes on."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception as e:  # e.g. a locked database: the next round retries, no state is lost
                print(f"control plane: round failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            stop.wait(self.settings.poll_s)

    def recover(self) -> None:
        """On start: every row that says running is reattached when its attempt is still alive; else its end is
        read (exit.json) or it is marked lost and requeued. No row is dropped."""
        for job in records.list_jobs(self.store, (JobStatus.RUNNING,)):
            if job.executor not in (None, self.executor.name):  # its handle means nothing to this executor
                raise AifabError(
                    f"job {job.id} runs on the {job.executor} executor, not {self.executor.name}: "
                    f"start the control plane with --executor {job.executor}"
                )
            if job.handle is not None and self.executor.reattach(job.handle):
                records.transition(
                    self.store, job.id, EventKind.REATTACHED, {"attempt": job.attempts, "handle": job.handle}
                )
                if records.count_events(self.store, job.id, EventKind.PREEMPTING, job.attempts):
                    self._stopping[job.id] = _Stopping("preempt", time.monotonic() + self.settings.preempt_grace_s)
            else:
                self._watch(job, time.time())

    def tick(self) -> None:
        """One round: reap and watch running attempts, then apply the policy's starts and preemptions."""
        with self._tick_lock:
            now_s = time.time()
            for job in records.list_jobs(self.store, (JobStatus.RUNNING,)):
                self._watch(job, now_s)
            active = records.list_jobs(self.store, records.ACTIVE)
            pending, running = [], []
            for job in active:
                if job.status == JobStatus.PENDING and job.cancel_requested:
                    self._finish(job, JobStatus.CANCELLED, {"by": "user"}, expect=JobStatus.PENDING)
                elif job.status == JobStatus.PENDING:
                    if job.not_before is None or job.not_before.timestamp() <= now_s:
                        pending.append(job)
                else:
                    running.append(job)
            if not pending and not running:
                return
            self._refresh()
            live = {n.name for n in self.nodes}
            running = [j for j in running if all(share.node in live for share in j.shares())]
            runs = [
                Running(
                    self._view(j),
                    j.shares(),
                    j.started_at.timestamp() if j.started_at else now_s,
                    stopping=j.id in self._stopping,
                )
                for j in running
            ]
            views = [self._view(j) for j in pending]
            try:
                state = ClusterState.build(self.nodes, views, runs, self.settings.quotas, self.settings.weights, now_s)
            except ValueError as e:  # e.g. restarted with fewer nodes than running jobs were placed on
                raise AifabError(f"the running jobs do not fit this control plane's nodes: {e}") from None
            by_id = {j.id: j for j in active}
            for decision in self.policy.decide(state):
                if isinstance(decision, Start) and decision.job_id in by_id:
                    self._start(by_id[decision.job_id], decision.placement)
                elif isinstance(decision, Preempt) and decision.job_id in by_id:
                    self._preempt(by_id[decision.job_id], decision.reason)

    # -- one round's parts --------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        if self.settings.refresh_nodes is None or time.monotonic() - self._refreshed_at < self.settings.refresh_every_s:
            return
        self._refreshed_at = time.monotonic()
        try:
            nodes = self.settings.refresh_nodes()
        except Exception as e:  # the cluster is unreachable for now: keep the last pool, say so, try again later
            print(f"control plane: cannot read the pool: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return
        if nodes:
            self.nodes = list(nodes)

    @staticmethod
    def _view(job: JobInfo) -> JobView:
        # finished attempts only: for a running job the policy adds the current attempt (policy.attained_now)
        return JobView(
            id=job.id,
            project=job.project,
            priority=job.priority,
            kind=job.kind,
            request=request_of(job),
            preemptible=job.preemptible,
            submitted_s=job.submitted_at.timestamp(),
            attained_gpu_s=job.attained_gpu_s,
        )

    def _start(self, job: JobInfo, placement: Placement) -> None:
        where = records.placement_record(placement)
        attempt = job.attempts + 1
        placed = records.transition(
            self.store,
            job.id,
            EventKind.PLACED,
            {"attempt": attempt, "node": where["node"], "gpu_ids": where["gpu_ids"]},
            expect=(JobStatus.PENDING,),
            status=JobStatus.RUNNING,
            attempts=attempt,
            executor=self.executor.name,
            node=where["node"],
            placement=where,
            handle=None,
            exit_code=None,
            error=None,
            not_before=None,
            started_at=utcnow(),
        )
        if not placed:  # cancelled meanwhile
            return
        info = records.get(self.store, job.id)
        try:
            handle = self.executor.start(info, placement)
        except (AifabError, OSError) as e:
            self._end_attempt(info, EXIT_CANNOT_START, time.time(), error=f"cannot start: {e}")
            return
        started = {"attempt": attempt, "handle": handle}
        records.transition(self.store, job.id, EventKind.STARTED, started, expect=(JobStatus.RUNNING,), handle=handle)

    def _preempt(self, job: JobInfo, reason: str) -> None:
        if job.status != JobStatus.RUNNING or job.handle is None or job.id in self._stopping or not job.preemptible:
            return
        records.transition(self.store, job.id, EventKind.PREEMPTING, {"attempt": job.attempts, "reason": reason})
        self._stopping[job.id] = _Stopping("preempt", time.monotonic() + self.settings.preempt_grace_s)
        self.executor.terminate(job.handle)

    def _watch(self, job: JobInfo, now_s: float) -> None:
        """Reap the attempt if it ended; else carry out a pending cancel and any overdue SIGKILL."""
        if job.handle is None:  # the control plane died between placing it and starting it
            self._end_attempt(job, LOST, now_s, error="never started: the control plane stopped while placing it")
            return
        res = self.executor.poll(job.handle)
        if res is not None:
            self._end_attempt(job, res, now_s)
            return
        stopping = self._stopping.get(job.id)
        if job.cancel_requested and (stopping is None or stopping.reason != "cancel"):
            deadline = time.monotonic() + self.settings.cancel_grace_s
            stopping = self._stopping[job.id] = _Stopping(
                "cancel", min(deadline, stopping.kill_at) if stopping else deadline
            )
            records.transition(self.store, job.id, EventKind.TERMINATING, {"attempt": job.attempts, "reason": "cancel"})
            self.executor.terminate(job.handle)
        if stopping is not None and not stopping.killed and time.monotonic() >= stopping.kill_at:
            stopping.killed = True
            records.transition(
                self.store, job.id, EventKind.KILLING, {"attempt": job.attempts, "reason": stopping.reason}
            )
            self.executor.kill(job.handle)

    def _end_attempt(self, job: JobInfo, res: Poll, now_s: float, error: str | None = None) -> None:
        stopping = self._stopping.pop(job.id, None)
        ran_s = max(0.0, now_s - job.started_at.timestamp()) if job.started_at else 0.0
        result = read_json(records.job_dir(self.store.home, job.id) / RESULT_FILE)
        common: dict[str, Any] = {
            "attained_gpu_s": job.attained_gpu_s + job.gpus * ran_s,
            "handle": None,
            "executor": None,
            "exit_code": None if res == LOST else res,
        }
        if isinstance(result, dict):
            common["result"] = result
        detail: dict[str, Any] = {"attempt": job.attempts, "exit_code": common["exit_code"], "ran_s": round(ran_s, 3)}
        if res == LOST:
            if job.handle is not None:
                self.executor.kill(job.handle)  # whatever the lost launcher left behind
            self._refreshed_at = float("-inf")  # a vanished attempt may mean a vanished node: read the pool
            lost = records.count_events(self.store, job.id, EventKind.LOST)
            if job.cancel_requested:
                self._finish(job, JobStatus.CANCELLED, {**detail, "by": "user"}, **common)
            elif lost < MAX_LOST:
                why = error or "the attempt vanished without an exit code"
                records.transition(
                    self.store, job.id, EventKind.LOST, {**detail, "error": why}, expect=(JobStatus.RUNNING,),
                    status=JobStatus.PENDING, error=why, **common,
                )  # fmt: skip
            else:
                why = f"lost {lost + 1} times (the attempt vanished without an exit code)"
                self._finish(job, JobStatus.FAILED, {**detail, "error": why}, error=why, **common)
            return
        assert isinstance(res, int)
        preempting = (stopping is not None and stopping.reason == "preempt") or (
            stopping is None and records.count_events(self.store, job.id, EventKind.PREEMPTING, job.attempts) > 0
        )
        if job.cancel_requested:
            self._finish(job, JobStatus.CANCELLED, {**detail, "by": "user"}, **common)
        elif res == 0:
            self._finish(job, JobStatus.SUCCEEDED, detail, **common)
        elif res == EXIT_PREEMPTED or (preempting and res in (-signal.SIGTERM, -signal.SIGKILL)):
            records.transition(
                self.store, job.id, EventKind.PREEMPTED, detail, expect=(JobStatus.RUNNING,),
                status=JobStatus.PENDING, preemptions=job.preemptions + 1, **common,
            )  # fmt: skip
        else:
            why = error or exit_text(res)
            retries = records.count_events(self.store, job.id, EventKind.RETRYING)
            if retries < job.max_retries:
                delay_s = job.backoff_s * 2**retries
                not_before = datetime.now(UTC) + timedelta(seconds=min(delay_s, 1e9))
                records.transition(
                    self.store, job.id, EventKind.RETRYING,
                    {**detail, "error": why, "retry": retries + 1, "delay_s": delay_s},
                    expect=(JobStatus.RUNNING,), status=JobStatus.PENDING, error=why, not_before=not_before, **common,
                )  # fmt: skip
            else:
                self._finish(job, JobStatus.FAILED, {**detail, "error": why}, error=why, **common)

    def _finish(
        self,
        job: JobInfo,
        status: JobStatus,
        detail: dict[str, Any],
        expect: JobStatus = JobStatus.RUNNING,
        **values: Any,
    ) -> None:
        """End the job as `status` (a terminal one), recorded as the event of the same name."""
        event = EventKind(status)
        records.transition(
            self.store, job.id, event, detail, expect=(expect,), status=status, finished_at=utcnow(), **values
        )
