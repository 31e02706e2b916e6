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
    dry: bool = typer.Option(False, "--dry-run", help="Print the plan (keys, what would be skipped); run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON on the last line."),
) -> None:
    """Run the pipeline of FACTORY_YAML: its `stages:` DAG, or data -> train -> evaluate -> register."""
    from aifab.pipeline.dag import build_pipeline
    from aifab.pipeline.runner import OnControl, StageStatus, dry_run, open_control, run_pipeline

    spec = load_spec(path)
    pipeline = build_pipeline(spec, path.parent)
    store = open_store()
    if dry:
        report = dry_run(store, pipeline, force or ())
    else:
        with open_control(store, spec) as control:
            report = run_pipeline(store, pipeline, OnControl(control), force or ())
    out.print(summary_table(report.to_dict(), dry))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    if not report.ok:
        failed = [s for s in report.stages if s.status == StageStatus.FAILED]
        raise AifabError(f"pipeline {pipeline.name!r} failed at stage {failed[0].name!r}: {failed[0].error}")


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
    task: str = typer.Option(..., "--task", help="The stage's task as JSON (see aifab.pipeline.contracts.Task)."),
) -> None:
    """Run one pipeline stage in this process and report its outputs to the job."""
    import sys

    from aifab.jobs.attempt import EXIT_PREEMPTED
    from aifab.pipeline.contracts import Task
    from aifab.pipeline.stages import Preempted, run_task

    try:
        body = Task.from_json(json.loads(task))
    except ValueError as e:
        raise SpecError(f"--task is not JSON: {e}") from None
    try:
        run_task(open_store(), body)
    except Preempted as e:
        print(f"stage {body.stage!r}: {e}; the run resumes when rescheduled", file=sys.stderr)
        raise typer.Exit(EXIT_PREEMPTED) from None
