"""The control-plane HTTP service: jobs in, states, logs and metrics out. Thin on purpose: the job records
(records.py) and the control loop (control.py) do the work; the loop runs in this same process.

Endpoints: POST /v1/jobs, GET /v1/jobs, GET /v1/jobs/{id} (with its events), GET /v1/jobs/{id}/logs
(`?follow=true` streams until the job ends), POST /v1/jobs/{id}/cancel, GET /healthz, GET /metrics.
Errors are `{"error": {"message", "type", "param", "code"}}` (the shape aifab serve uses): 400 for a bad
field (named in `param`), 401 without the token once one is set, 404 for an unknown job, 409 for a conflict.
`run_controller` binds 127.0.0.1 unless told otherwise and writes `$AIFAB_HOME/controller.json` so the CLI
finds it.
"""

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aifab.errors import AifabError, NotFound
from aifab.jobs import records
from aifab.jobs.attempt import write_json_atomic
from aifab.jobs.control import ControlPlane
from aifab.jobs.records import JobConflict, JobDetailJson, JobJson, JobSpec, JobStatus
from aifab.web import error, require_bearer

CONTROLLER_FILE = "controller.json"
LOG_CHUNK_BYTES = 64 * 1024


class _JobMetrics(Collector):
    """Read from the store when scraped, so the numbers are never stale and survive restarts."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterable[Metric]:
        store = self.cp.store
        by_status = GaugeMetricFamily("aifab_jobs", "Jobs by state.", labels=["status"])
        counts = records.counts_by_status(store)
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status, 0))
        yield by_status
        active = records.list_jobs(store, records.ACTIVE)
        yield GaugeMetricFamily(
            "aifab_queue_depth", "Pending jobs.", value=sum(1 for j in active if j.status == JobStatus.PENDING)
        )
        yield GaugeMetricFamily(
            "aifab_gpus_allocated",
            "GPUs held by running jobs.",
            value=sum(j.gpus for j in active if j.status == JobStatus.RUNNING),
        )
        yield GaugeMetricFamily("aifab_gpus", "GPUs in the pool.", value=sum(len(n.gpu_ids) for n in self.cp.nodes))
        totals = records.totals(store)
        yield CounterMetricFamily("aifab_job_preemptions", "Attempts stopped for others.", value=totals.preemptions)
        yield CounterMetricFamily("aifab_job_retries", "Failed attempts retried.", value=totals.retries)


def create_app(cp: ControlPlane, *, token: str | None = None) -> FastAPI:
    """The API over control plane `cp`. With `token`, every request needs `Authorization: Bearer <token>`."""
    store = cp.store
    app = FastAPI(title="aifab control plane", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    registry.register(_JobMetrics(cp))

    require_bearer(app, token, "missing or wrong token (Authorization: Bearer ...)")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if p != "body"]
        param = ".".join(loc) or None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown field"
        elif first["type"] == "json_invalid":
            msg, param = "the body is not valid JSON", None
        return error(400, f"{param}: {msg}" if param else msg, param=param)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error(404, str(exc), kind="not_found_error")

    @app.exception_handler(JobConflict)
    async def conflict(_: Request, exc: JobConflict) -> JSONResponse:
        return error(409, str(exc), kind="conflict_error")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "pid": os.getpid(),
            "policy": cp.settings.policy,
            "nodes": [
                {"name": n.name, "gpus": len(n.gpu_ids), "cpus": n.cpus, "memory_gb": n.memory_gb} for n in cp.nodes
            ],
        }

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/jobs", status_code=201, response_model=None)
    def submit(spec: JobSpec) -> JobJson | JSONResponse:
        try:
            job_id = cp.submit(spec)
        except AifabError as e:
            return error(400, str(e), kind="unplaceable_error")
        return records.get(store, job_id).to_dict()

    @app.get("/v1/jobs")
    def list_jobs(status: str | None = None, project: str | None = None, limit: int = 100) -> dict[str, Any]:
        statuses = tuple(status.split(",")) if status else None
        return {"jobs": [j.to_dict() for j in records.list_jobs(store, statuses, project, max(1, min(limit, 10_000)))]}

    @app.get("/v1/jobs/{job_id}", response_model=None)  # typed for mypy; the body is built here, not validated
    def show(job_id: int) -> JobDetailJson:
        return records.describe(store, job_id)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=None)
    def cancel(job_id: int) -> JobJson:
        return records.cancel(store, job_id).to_dict()

    @app.get("/v1/jobs/{job_id}/logs", response_model=None)
    def logs(job_id: int, follow: bool = False, offset: int = 0) -> Response:
        path = records.log_path(store, job_id)  # unknown job -> 404
        if not follow:
            return PlainTextResponse(_read_from(path, max(0, offset)).decode(errors="replace"))
        return StreamingResponse(_follow(cp, job_id, path, max(0, offset)), media_type="text/plain")

    return app


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


def _follow(cp: ControlPlane, job_id: int, path: Path, offset: int, poll_s: float = 0.2) -> Iterator[bytes]:
    """The log from `offset` on, as it grows, until the job has ended and everything is sent."""
    while True:
        ended = records.get(cp.store, job_id).terminal  # read before the file: no line written before the end is missed
        while chunk := _read_chunk(path, offset):
            offset += len(chunk)
            yield chunk
        if ended:
            return
        time.sleep(poll_s)


def _read_chunk(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(LOG_CHUNK_BYTES)
    except FileNotFoundError:
        return b""


@dataclass(frozen=True)
class ControllerInfo:
    """What a running controller writes about itself in `$AIFAB_HOME/controller.json`, for the CLI to find it."""

    url: str  # where its API answers
    pid: int
    token_required: bool  # whether requests need `Authorization: Bearer <token>`


def read_controller_file(home: Path) -> ControllerInfo | None:
    """What a running controller wrote about itself, if its process lives (else None, as for a missing file)."""
    from aifab.jobs.attempt import read_json

    info = read_json(home / CONTROLLER_FILE)
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ControllerInfo(str(info["url"]), info["pid"], bool(info.get("token_required")))


def run_controller(
    cp: ControlPlane,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve the API and run the control loop until SIGTERM/SIGINT (or `stop`). Running jobs keep running."""
    from aifab.web import BackgroundServer, bind

    sock = bind(host, port)  # an occupied port fails here, before anything starts
    stop = stop or threading.Event()
    loop = threading.Thread(target=cp.run, args=(stop,), name="control-loop", daemon=True)
    info_path = cp.store.home / CONTROLLER_FILE
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with BackgroundServer(create_app(cp, token=token), sock=sock) as srv:
        url = f"http://{srv.host}:{srv.port}" if ":" not in str(srv.host) else f"http://[{srv.host}]:{srv.port}"
        write_json_atomic(info_path, asdict(ControllerInfo(url, os.getpid(), token_required=token is not None)))
        loop.start()
        if on_ready is not None:
            on_ready(url)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            stop.set()
            loop.join(timeout=30)
            info = read_controller_file(cp.store.home)
            if info is not None and info.pid == os.getpid():
                info_path.unlink(missing_ok=True)
