"""`aifab run [FACTORY_YAML]`: run the factory's pipeline as jobs, skipping the stages whose inputs did not
change; and the hidden `aifab stage run --task JSON` that each stage's job executes."""

import json
from pathlib import Path
from typing import Any

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.tables import Column, Kind, Listing
from aifab.errors import AifabError, SpecError
from aifab.spec import load_spec

stage_app = typer.Typer(help="Internal: what a pipeline stage's job runs.", hidden=True)
app.add_typer(stage_app, name="stage", hidden=True)


@app.command("run")
def run_command(
    path: Path = typer.Argument(Path("factory.yaml"), help="The factory.yaml whose stages to run."),
    force: list[str] | None = typer.Option(
        None, "--force", metavar="STAGE", help="Rerun this stage and everything downstream of it; repeatable."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (keys, what would be skipped); run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON on the last line."),
) -> None:
    """Run the pipeline of FACTORY_YAML: its `stages:` DAG, or data -> train -> evaluate -> register."""
    from aifab.orchestrate.pipeline import build_pipeline, plan, run_pipeline

    spec = load_spec(path)
    pipeline = build_pipeline(spec, path.parent)
    store = open_store()
    if dry_run:
        report = plan(store, pipeline, force or ())
    else:
        with remote_control(store) or control_plane(store, spec) as control:
            report = run_pipeline(store, pipeline, control, force or ())
    out.print(summary_table(report.to_dict(), dry_run))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    if not report.ok:
        failed = [s for s in report.stages if s.status == "failed"]
        raise AifabError(f"pipeline {pipeline.name!r} failed at stage {failed[0].name!r}: {failed[0].error}")


def control_plane(store: Any, spec: Any) -> Any:
    """An embedded control plane over this machine (or `orchestration.pool`), with the spec's policy, quotas
    and fair-share weights. It holds the store's controller lock until closed."""
    from aifab.orchestrate.control import ControlPlane
    from aifab.orchestrate.pipeline import control_settings

    return ControlPlane(store, **control_settings(spec))


class RemoteControl:
    """The pipeline's control plane when an `aifab controller` serves this store (it holds the store's lock, so
    no embedded one may run): stages go to its HTTP API and share its pool with every other job. Its pool,
    policy, quotas and weights are the controller's own, not factory.yaml's `orchestration:`."""

    POLL_S = 0.5

    def __init__(self, client: Any) -> None:
        from aifab.orchestrate.policy import Node

        self.client = client
        health = client.call("GET", "/healthz")
        self.nodes = [
            Node(n["name"], tuple(range(int(n["gpus"]))), float(n["cpus"]), float(n["memory_gb"]))
            for n in health.get("nodes", [])
        ]

    def submit(self, spec: Any) -> int:
        return int(self.client.call("POST", "/v1/jobs", json=spec.model_dump())["id"])

    def wait_any(self, job_ids: list[int]) -> Any:
        import time
        from types import SimpleNamespace

        while True:
            for job_id in job_ids:
                job = self.client.call("GET", f"/v1/jobs/{job_id}")
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return SimpleNamespace(**{k: job.get(k) for k in ("id", "status", "result", "error")})
            time.sleep(self.POLL_S)

    def __enter__(self) -> "RemoteControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()


def remote_control(store: Any) -> RemoteControl | None:
    """The running controller of this store (AIFAB_CONTROL_URL, or the one its controller.json names), if any."""
    from aifab.cli.jobs import _client

    client = _client(store)
    return None if client is None else RemoteControl(client)


def summary_table(report: dict[str, Any], dry_run: bool) -> Listing:
    title = f"pipeline {report['pipeline']}" + (" (dry run)" if dry_run else "")
    table = Listing(*(Column(h, Kind.ID) for h in ("stage", "status", "key")), Column("job", Kind.NUMBER),
                    Column("result"), title=title)  # fmt: skip
    for s in report["stages"]:
        key = (s["key"] or "?")[:12]
        job = str(s["job_id"]) if s["job_id"] is not None else "-"
        table.add_row(s["stage"], s["status"], key, job, s["error"] or _brief(s["outputs"]))
    return table


def _brief(outputs: dict[str, Any]) -> str:
    for k in ("model", "dataset", "run_id", "val_loss"):
        if k in outputs:
            return f"{k} {outputs[k]}"
    return ""


@stage_app.command("run")
def stage_run(
    task: str = typer.Option(..., "--task", help="The stage's task as JSON (see pipeline.job_spec)."),
) -> None:
    """Run one pipeline stage in this process and report its outputs to the job."""
    import sys

    from aifab.orchestrate.attempt import EXIT_PREEMPTED
    from aifab.orchestrate.stages import Preempted, run_task

    try:
        body = json.loads(task)
    except ValueError as e:
        raise SpecError(f"--task is not JSON: {e}") from None
    try:
        run_task(open_store(), body)
    except Preempted as e:
        print(f"stage {body.get('stage')!r} preempted; run {e} resumes when rescheduled", file=sys.stderr)
        raise typer.Exit(EXIT_PREEMPTED) from None
