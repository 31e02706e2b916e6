"""`aifab models`, `aifab datasets`, `aifab runs`: what the store holds."""

import json
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import select

from aifab.cli.common import app, open_store, out
from aifab.errors import NotFound
from aifab.store.lineage import upstream
from aifab.store.schema import Run, RunMetric

models_app = typer.Typer(help="Registered model versions.", no_args_is_help=False)
runs_app = typer.Typer(help="Training and evaluation runs.", no_args_is_help=False)
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, name: str | None = typer.Option(None, "--name", help="Only this model.")) -> None:
    """List model versions (optionally of one name) with their aliases and metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from aifab.meter.ledger import model_footprints
    from aifab.registry.models import aliases_of, list_versions

    store = open_store()
    versions = list_versions(store, name)
    footprints = model_footprints(store.db, [mv.id for mv in versions])  # see `aifab ledger --by model`
    table = Table("model", "params", "val loss", "aliases", "run", "energy J make / serve", "created")
    for mv in versions:
        val = mv.metrics.get("val_loss")
        fp = footprints[mv.id]
        table.add_row(
            f"{mv.name}:{mv.version}",
            f"{mv.params_count:,}",
            f"{val:.3f}" if val is not None else "-",
            ", ".join(aliases_of(store, mv.id)),
            mv.run_id or "-",
            _footprint(fp),
            f"{mv.created_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)


@models_app.command("alias")
def alias(ref: str = typer.Argument(..., help="name:VERSION"), alias: str = typer.Argument(...)) -> None:
    """Point name@ALIAS at a model version."""
    from aifab.registry.models import set_alias

    mv = set_alias(open_store(), ref, alias)
    out.print(f"{mv.name}@{alias} -> {mv.name}:{mv.version}")


@runs_app.callback(invoke_without_command=True)
def runs(ctx: typer.Context) -> None:
    """List runs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    store = open_store()
    table = Table("run", "kind", "status", "steps", "val loss", "tokens/s", "elapsed s", "created")
    with store.db.session() as s:
        for r in s.scalars(select(Run).order_by(Run.created_at.desc())):
            sm = r.summary or {}
            table.add_row(
                r.id,
                r.kind,
                r.status,
                str(sm.get("steps", "-")),
                _fmt(sm.get("val_loss_final")),
                _fmt(sm.get("tokens_per_s"), ",.0f"),
                _fmt(r.elapsed_s, ".1f"),
                f"{r.created_at:%Y-%m-%d %H:%M}",
            )
    out.print(table)


@runs_app.command("show")
def show(run_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """One run with its parameters, summary, lineage and per-step metrics history."""
    store = open_store()
    with store.db.session() as s:
        r = s.get(Run, run_id)
        if r is None:
            raise NotFound(f"unknown run {run_id!r} (see `aifab runs`)")
        history: dict[str, list[dict[str, float]]] = {}
        for m in s.scalars(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)):
            history.setdefault(m.key, []).append({"step": m.step, "value": m.value, "elapsed_s": m.elapsed_s})
        body: dict[str, Any] = {
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "params": r.params,
            "summary": r.summary,
            "dataset_version_id": r.dataset_version_id,
            "checkpoint_digest": r.checkpoint_digest,
            "created_at": r.created_at,
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "elapsed_s": r.elapsed_s,
            "error": r.error,
            "lineage": [{"kind": k, "id": i, "relation": rel} for k, i, rel in upstream(s, "run", r.id)],
            "metrics": history,
        }
    if as_json:
        print(json.dumps(body, default=str))
        return
    out.print_json(json.dumps({k: v for k, v in body.items() if k != "metrics"}, default=str))
    for key, points in history.items():
        last = points[-1]
        out.print(f"{key}: {len(points)} points, last {last['value']:.4f} at step {last['step']}")


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _footprint(fp: dict[str, Any]) -> str:
    """`making / serving` joules of a model version, "(est.)" when any of it is an estimate; "-" when unmetered."""
    if not fp["entries"]:
        return "-"
    text = f"{fp['making']['energy_j']:,.0f} / {fp['serving']['energy_j']:,.0f}"
    return f"{text} (est.)" if fp["estimated"] else text
