"""`aifab controller`, `aifab submit`, `aifab status`, `aifab logs`, `aifab cancel`: the job queue.

The verbs talk to a running controller when one is configured (`AIFAB_CONTROL_URL`, token in
`AIFAB_CONTROL_TOKEN`) or announced in `$AIFAB_HOME/controller.json`; otherwise they read and write the store
directly (a job submitted that way waits until a controller runs).
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.tables import Column, Kind, Listing
from aifab.console import err
from aifab.errors import AifabError, NotFound
from aifab.orchestrate import jobs
from aifab.orchestrate.jobs import JobConflict, JobSpec
from aifab.store import Store


class _Client:
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


def _client(store: Store) -> _Client | None:
    """The controller to talk to, or None to use the store directly."""
    import httpx

    from aifab.orchestrate.service import read_controller_file

    token = os.environ.get("AIFAB_CONTROL_TOKEN") or None
    url = os.environ.get("AIFAB_CONTROL_URL")
    if url:
        return _Client(url, token)  # configured: its errors are the user's to see
    info = read_controller_file(store.home)
    if info is None:
        return None
    client = _Client(str(info["url"]), token)
    try:
        client.http.get("/healthz", timeout=2.0)
    except httpx.HTTPError:
        client.close()
        return None
    return client


@app.command("controller")
def controller(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback unless told otherwise."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="0 picks a free port."),
    token: str | None = typer.Option(
        None, "--token", help="Require this bearer token (or set AIFAB_CONTROL_TOKEN).", show_default=False
    ),
    policy: str | None = typer.Option(
        None,
        "--policy",
        help="Scheduling policy: default, priority-fair or fifo [default: the config's, else default].",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="factory.yaml whose `orchestration:` section sets the policy, quotas, fair-share weights and pool.",
    ),
    executor: str = typer.Option(
        "local",
        "--executor",
        help="Where attempts run: local (processes on this machine) or ray (the Ray cluster at RAY_ADDRESS, "
        "else a local Ray; the store must be shared storage at the same path on every node).",
    ),
) -> None:
    """Run the control plane: the job queue's HTTP API plus the loop that starts, watches and preempts jobs."""
    from aifab.orchestrate.control import ControlPlane
    from aifab.orchestrate.executors import Executor
    from aifab.orchestrate.service import run_controller

    if executor not in ("local", "ray"):
        raise AifabError(f"unknown executor {executor!r}: choose local or ray")
    key = token or os.environ.get("AIFAB_CONTROL_TOKEN") or None
    store = open_store()
    settings: dict[str, Any] = {"nodes": None, "policy": "default"}  # nodes None: this machine
    if config is not None:
        from aifab.orchestrate.pipeline import control_settings
        from aifab.spec import load_spec

        settings = control_settings(load_spec(config))
    if policy is not None:
        settings["policy"] = policy
    policy = settings["policy"]
    runner: Executor | None = None
    if executor == "ray":
        from aifab.orchestrate.ray_executor import RayExecutor, ray_nodes

        runner = RayExecutor(store.home)  # connects to $RAY_ADDRESS, else starts a local Ray
        settings["nodes"] = ray_nodes()  # the cluster's own pool, not the config's, read again as nodes come and go
        settings["refresh_nodes"] = ray_nodes
    with ControlPlane(store, executor=runner, **settings) as cp:
        gpus = sum(len(n.gpu_ids) for n in cp.nodes)
        cpus = sum(n.cpus for n in cp.nodes)
        n = len(cp.nodes)
        where = f"ray executor, {n} node{'' if n == 1 else 's'}" if executor == "ray" else "local executor"

        def ready(url: str) -> None:
            auth = ", token required" if key else ""
            err.print(
                f"control plane on {url} ({policy} policy, {where}, {gpus} GPUs, {cpus:g} CPUs{auth}); Ctrl-C to stop"
            )

        run_controller(cp, host, port, key, on_ready=ready)


@app.command("submit", context_settings={"allow_interspersed_args": False})
def submit(
    command: list[str] = typer.Argument(..., help="The command to run (put it after --)."),
    name: str | None = typer.Option(None, "--name", help="Job name (default: the program's name)."),
    gpus: int = typer.Option(0, "--gpus", min=0),
    cpus: float = typer.Option(1.0, "--cpus", min=0.0),
    memory_gb: float = typer.Option(1.0, "--memory-gb", min=0.0),
    priority: int = typer.Option(0, "--priority", help="Higher runs first and may preempt lower."),
    project: str = typer.Option("default", "--project", help="Quotas and fair share are per project."),
    kind: str = typer.Option("command", "--kind", help="data, train, evaluate, serve or command."),
    retries: int = typer.Option(0, "--retries", min=0, help="Retry a failed attempt this many times."),
    backoff_s: float = typer.Option(1.0, "--backoff-s", min=0.0, help="First retry delay; doubles each retry."),
    preemptible: bool | None = typer.Option(
        None, "--preemptible/--not-preemptible", help="May be stopped for higher priority (default: train jobs)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON."),
) -> None:
    """Queue COMMAND as a job: `aifab submit --gpus 1 -- aifab train ...`."""
    body: dict[str, Any] = {
        "command": command, "name": name, "gpus": gpus, "cpus": cpus, "memory_gb": memory_gb, "priority": priority,
        "project": project, "kind": kind, "max_retries": retries, "backoff_s": backoff_s,
        "preemptible": kind == "train" if preemptible is None else preemptible,
    }  # fmt: skip
    spec = JobSpec.parse(body)
    store = open_store()
    client = _client(store)
    if client is not None:
        try:
            job = client.call("POST", "/v1/jobs", json=spec.model_dump())
        finally:
            client.close()
        where = f"controller {client.url}"
    else:
        from aifab.orchestrate.control import detect_nodes, request_of
        from aifab.orchestrate.policy import unplaceable

        why = unplaceable(request_of(spec), detect_nodes())
        if why is not None:
            raise AifabError(f"job {spec.label()!r} can never run on this machine: {why}")
        job = jobs.get(store, jobs.submit(store, spec)).to_dict()
        where = "the store; no controller is running: start one with `aifab controller`"
    if as_json:
        print(json.dumps(job))
    else:
        out.print(f"job [bold]{job['id']}[/bold] ({job['name']}) queued in {where}")


@app.command("status")
def status(
    job_id: int | None = typer.Argument(None, metavar="[JOB]", help="One job's details and events."),
    state: str | None = typer.Option(None, "--state", help="Only jobs in these states (comma-separated)."),
    limit: int = typer.Option(50, "--limit", min=1, help="The newest this many jobs."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The job queue, or one job with its event trail."""
    store = open_store()
    client = _client(store)
    try:
        if job_id is not None:
            if client is not None:
                job = client.call("GET", f"/v1/jobs/{job_id}")
            else:
                job = {**jobs.get(store, job_id).to_dict(), "events": jobs.events(store, job_id)}
            _show_job(job, as_json)
            return
        if client is not None:
            params: dict[str, Any] = {"limit": limit, **({"status": state} if state else {})}
            listed = client.call("GET", "/v1/jobs", params=params)["jobs"]
        else:
            statuses = tuple(state.split(",")) if state else None
            listed = [j.to_dict() for j in jobs.list_jobs(store, statuses, limit=limit)]
    finally:
        if client is not None:
            client.close()
    if as_json:
        print(json.dumps(listed))
        return
    table = Listing(
        Column("job", Kind.NUMBER),
        Column("name"),
        Column("status"),
        Column("kind", Kind.ID),
        Column("project"),
        Column("prio", Kind.NUMBER),
        Column("gpus", Kind.NUMBER),
        Column("node", Kind.ID),
        Column("submitted", Kind.ID),
        caption="times in UTC",
    )  # narrow terminals wrap names, statuses (with their errors) and projects, never ids, numbers or times
    for j in listed:
        table.add_row(
            str(j["id"]), j["name"], _status_text(j), j["kind"], j["project"], str(j["priority"]), str(j["gpus"]),
            j["node"] or "-", j["submitted_at"][5:16].replace("T", " "),
        )  # fmt: skip
    out.print(table)


def _status_text(job: dict[str, Any]) -> str:
    text = str(job["status"])
    if job["status"] == "failed" and job.get("error"):
        text += f" ({job['error']})"
    elif job.get("cancel_requested") and job["status"] == "running":
        text += " (cancelling)"
    return text


def _show_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job))
        return
    out.print(f"[bold]job {job['id']}[/bold] {job['name']}: {_status_text(job)}")
    out.print(f"  command   {' '.join(job['command'])}")
    out.print(f"  project   {job['project']}, priority {job['priority']}, kind {job['kind']}")
    out.print(f"  request   {job['gpus']} GPUs, {job['cpus']:g} CPUs, {job['memory_gb']:g} GB")
    out.print(
        f"  attempts  {job['attempts']} (preemptions {job['preemptions']}, retries up to {job['max_retries']}), "
        f"{job['attained_gpu_s']:.0f} GPU-s"
    )
    if job.get("exit_code") is not None:
        out.print(f"  exit code {job['exit_code']}")
    if job.get("result"):
        out.print(f"  result    {json.dumps(job['result'])}")
    out.print(f"  log       {job['log_path']}")
    for e in job.get("events", []):
        detail = ", ".join(f"{k}={v}" for k, v in e["detail"].items())
        out.print(f"  {e['at'][:19].replace('T', ' ')}  {e['event']:<16} {detail}")


@app.command("logs")
def logs(
    job_id: int = typer.Argument(..., metavar="JOB"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """A job's output, all attempts (each after a header line)."""
    store = open_store()
    client = _client(store)
    if client is not None:
        try:
            if not follow:
                sys.stdout.write(_text(client, job_id))
                return
            with client.http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise NotFound(f"unknown job {job_id}") if r.status_code == 404 else AifabError(r.text)
                for chunk in r.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        finally:
            client.close()
        return
    path = jobs.log_path(store, job_id)
    offset = 0
    while True:
        ended = jobs.get(store, job_id).terminal
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        if not follow or ended:
            return
        time.sleep(0.2)


def _text(client: _Client, job_id: int) -> str:
    import httpx

    try:
        r = client.http.get(f"/v1/jobs/{job_id}/logs")
    except httpx.HTTPError as e:
        raise AifabError(f"cannot reach the controller at {client.url}: {e}") from None
    if r.status_code == 404:
        raise NotFound(f"unknown job {job_id} (see `aifab status`)")
    if r.status_code >= 400:
        raise AifabError(r.text)
    return r.text


@app.command("cancel")
def cancel(job_id: int = typer.Argument(..., metavar="JOB")) -> None:
    """Cancel a job: a pending one at once, a running one by SIGTERM (then SIGKILL after a grace period)."""
    store = open_store()
    client = _client(store)
    if client is not None:
        try:
            job = client.call("POST", f"/v1/jobs/{job_id}/cancel")
        finally:
            client.close()
    else:
        job = jobs.cancel(store, job_id).to_dict()
    out.print(f"job {job_id}: {_status_text(job)}")
