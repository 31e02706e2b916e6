"""`aifab controller`, `aifab submit`, `aifab status`, `aifab logs`, `aifab cancel`: the job queue.

The verbs talk to a running controller when one is configured (`AIFAB_CONTROL_URL`, token in
`AIFAB_CONTROL_TOKEN`) or announced in `$AIFAB_HOME/controller.json`; otherwise they read and write the store
directly (a job submitted that way waits until a controller runs).
"""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.tables import Column, Kind, Listing
from aifab.console import err
from aifab.errors import AifabError
from aifab.jobs.client import open_queue
from aifab.jobs.records import JobDetailJson, JobJson, JobSpec


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
    from aifab.jobs.control import ControlPlane, ControlSettings
    from aifab.jobs.executors import Executor
    from aifab.jobs.service import run_controller

    if executor not in ("local", "ray"):
        raise AifabError(f"unknown executor {executor!r}: choose local or ray")
    key = token or os.environ.get("AIFAB_CONTROL_TOKEN") or None
    store = open_store()
    settings = ControlSettings()  # nodes None: this machine
    if config is not None:
        from aifab.pipeline.runner import control_settings
        from aifab.spec import load_spec

        settings = control_settings(load_spec(config))
    if policy is not None:
        settings = replace(settings, policy=policy)
    policy = settings.policy
    runner: Executor | None = None
    if executor == "ray":
        from aifab.jobs.ray_executor import RayExecutor, ray_nodes

        runner = RayExecutor(store.home)  # connects to $RAY_ADDRESS, else starts a local Ray
        # the cluster's own pool, not the config's, read again as nodes come and go
        settings = replace(settings, nodes=ray_nodes(), refresh_nodes=ray_nodes)
    with ControlPlane(store, settings, runner) as cp:
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
    queue = open_queue(open_store())
    try:
        job = queue.submit(spec)
    finally:
        queue.close()
    if as_json:
        print(json.dumps(job))
    else:
        out.print(f"job [bold]{job['id']}[/bold] ({job['name']}) queued in {queue.where}")


@app.command("status")
def status(
    job_id: int | None = typer.Argument(None, metavar="[JOB]", help="One job's details and events."),
    state: str | None = typer.Option(None, "--state", help="Only jobs in these states (comma-separated)."),
    limit: int = typer.Option(50, "--limit", min=1, help="The newest this many jobs."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The job queue, or one job with its event trail."""
    queue = open_queue(open_store())
    try:
        if job_id is not None:
            _show_job(queue.job(job_id), as_json)
            return
        listed = queue.jobs(tuple(state.split(",")) if state else None, limit)
    finally:
        queue.close()
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


def _status_text(job: JobJson) -> str:
    text = str(job["status"])
    if job["status"] == "failed" and job.get("error"):
        text += f" ({job['error']})"
    elif job.get("cancel_requested") and job["status"] == "running":
        text += " (cancelling)"
    return text


def _show_job(job: JobDetailJson, as_json: bool) -> None:
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
    queue = open_queue(open_store())
    try:
        for chunk in queue.logs(job_id, follow):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    finally:
        queue.close()


@app.command("cancel")
def cancel(job_id: int = typer.Argument(..., metavar="JOB")) -> None:
    """Cancel a job: a pending one at once, a running one by SIGTERM (then SIGKILL after a grace period)."""
    queue = open_queue(open_store())
    try:
        job = queue.cancel(job_id)
    finally:
        queue.close()
    out.print(f"job {job_id}: {_status_text(job)}")
