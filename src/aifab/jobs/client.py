"""The job queue as the CLI and pipelines see it: through a running controller's HTTP API when there is one, else
straight through the store.

`open_queue(store)` picks: the controller at `AIFAB_CONTROL_URL` (token in `AIFAB_CONTROL_TOKEN`), else the one
`$AIFAB_HOME/controller.json` announces if it answers, else the store itself (a job submitted that way waits
until a controller runs). Both kinds answer with the same JSON-shaped dicts (`JobInfo.to_dict()` plus
`events` for one job), so a caller never needs to know which it has. Errors are AifabErrors with the server's
message: NotFound for an unknown job, JobConflict for a job that cannot change state.
"""

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aifab.errors import AifabError, NotFound
from aifab.jobs import records
from aifab.jobs.records import TERMINAL, JobConflict, JobDetailJson, JobJson, JobSpec, JobStatus
from aifab.store import Store


class ControlClient:
    """A few calls to the controller's HTTP API; its errors become AifabErrors with the server's message."""

    def __init__(self, url: str, token: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise AifabError(f"cannot reach the controller at {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text.strip() or r.reason_phrase
            raise (NotFound if r.status_code == 404 else JobConflict if r.status_code == 409 else AifabError)(message)
        return r.json()

    def close(self) -> None:
        self.http.close()


def connect(store: Store) -> ControlClient | None:
    """The controller serving this store, or None when none is configured or announced and answering."""
    import httpx

    from aifab.jobs.service import read_controller_file

    token = os.environ.get("AIFAB_CONTROL_TOKEN") or None
    url = os.environ.get("AIFAB_CONTROL_URL")
    if url:
        return ControlClient(url, token)  # configured: its errors are the user's to see
    info = read_controller_file(store.home)
    if info is None:
        return None
    client = ControlClient(info.url, token)
    try:
        client.http.get("/healthz", timeout=2.0)
    except httpx.HTTPError:
        client.close()
        return None
    return client


class JobQueue(Protocol):
    """What `aifab submit/status/logs/cancel` need of the queue, wherever it lives."""

    where: str  # for messages: "controller URL" or "the store"

    def submit(self, spec: JobSpec) -> JobJson: ...
    def job(self, job_id: int) -> JobDetailJson: ...
    def jobs(self, statuses: tuple[str, ...] | None, limit: int) -> list[JobJson]: ...
    def logs(self, job_id: int, follow: bool) -> Iterator[bytes]: ...
    def cancel(self, job_id: int) -> JobJson: ...
    def close(self) -> None: ...


class RemoteQueue:
    """The queue of a running controller, over HTTP."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client
        self.where = f"controller {client.url}"

    def submit(self, spec: JobSpec) -> JobJson:
        job: JobJson = self.client.call("POST", "/v1/jobs", json=spec.model_dump())
        return job

    def job(self, job_id: int) -> JobDetailJson:
        job: JobDetailJson = self.client.call("GET", f"/v1/jobs/{job_id}")
        return job

    def jobs(self, statuses: tuple[str, ...] | None, limit: int) -> list[JobJson]:
        params = {"limit": str(limit), **({"status": ",".join(statuses)} if statuses else {})}
        listed: list[JobJson] = self.client.call("GET", "/v1/jobs", params=params)["jobs"]
        return listed

    def logs(self, job_id: int, follow: bool) -> Iterator[bytes]:
        import httpx

        params = {"follow": "true"} if follow else {}
        try:
            with self.client.http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    if r.status_code == 404:
                        raise NotFound(f"unknown job {job_id} (see `aifab status`)")
                    raise AifabError(r.text)
                yield from r.iter_bytes()
        except httpx.HTTPError as e:
            raise AifabError(f"cannot reach the controller at {self.client.url}: {e}") from None

    def cancel(self, job_id: int) -> JobJson:
        job: JobJson = self.client.call("POST", f"/v1/jobs/{job_id}/cancel")
        return job

    def close(self) -> None:
        self.client.close()


class StoreQueue:
    """The queue in the store itself, when no controller runs: jobs wait there until one does."""

    where = "the store; no controller is running: start one with `aifab controller`"
    POLL_S = 0.2

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, spec: JobSpec) -> JobJson:
        from aifab.jobs.executors import detect_nodes
        from aifab.schedule.state import unplaceable

        why = unplaceable(records.request_of(spec), detect_nodes())
        if why is not None:
            raise AifabError(f"job {spec.label()!r} can never run on this machine: {why}")
        return records.get(self.store, records.submit(self.store, spec)).to_dict()

    def job(self, job_id: int) -> JobDetailJson:
        return records.describe(self.store, job_id)

    def jobs(self, statuses: tuple[str, ...] | None, limit: int) -> list[JobJson]:
        return [j.to_dict() for j in records.list_jobs(self.store, statuses, limit=limit)]

    def logs(self, job_id: int, follow: bool) -> Iterator[bytes]:
        path = records.log_path(self.store, job_id)
        offset = 0
        while True:
            ended = records.get(self.store, job_id).terminal
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                if data:
                    yield data
            if not follow or ended:
                return
            time.sleep(self.POLL_S)

    def cancel(self, job_id: int) -> JobJson:
        return records.cancel(self.store, job_id).to_dict()

    def close(self) -> None:
        pass


def open_queue(store: Store) -> JobQueue:
    """The running controller's queue if there is one, else the store's."""
    client = connect(store)
    return StoreQueue(store) if client is None else RemoteQueue(client)


@dataclass(frozen=True)
class JobEnd:
    """How a job ended, as a pipeline reads it (a `JobInfo` offers the same fields)."""

    id: int
    status: JobStatus  # one of records.TERMINAL
    result: dict[str, Any] | None  # what the job reported (`attempt.write_result`)
    error: str | None


class RemoteControl:
    """A pipeline's control plane when an `aifab controller` serves this store (it holds the store's lock, so no
    embedded one may run): stages go to its HTTP API and share its pool with every other job. Its pool, policy,
    quotas and weights are the controller's own, not factory.yaml's `orchestration:`."""

    POLL_S = 0.5

    def __init__(self, client: ControlClient) -> None:
        from aifab.schedule.state import Node

        self.client = client
        health = client.call("GET", "/healthz")
        self.nodes = [
            Node(n["name"], tuple(range(int(n["gpus"]))), float(n["cpus"]), float(n["memory_gb"]))
            for n in health.get("nodes", [])
        ]

    def submit(self, spec: JobSpec) -> int:
        return int(self.client.call("POST", "/v1/jobs", json=spec.model_dump())["id"])

    def wait_any(self, job_ids: list[int]) -> JobEnd:
        """The first of `job_ids` found ended."""
        while True:
            for job_id in job_ids:
                job = self.client.call("GET", f"/v1/jobs/{job_id}")
                if job["status"] in TERMINAL:
                    return JobEnd(job["id"], JobStatus(job["status"]), job.get("result"), job.get("error"))
            time.sleep(self.POLL_S)

    def __enter__(self) -> "RemoteControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()


def remote_control(store: Store) -> RemoteControl | None:
    """The running controller of this store as a pipeline's control plane, if there is one."""
    client = connect(store)
    return None if client is None else RemoteControl(client)
