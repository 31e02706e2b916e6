"""`aifab models`, `aifab runs`: what the store holds (`aifab datasets` is in cli/data.py)."""

import json

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.tables import Column, Kind, Listing, count, dash, duration, energy, when
from aifab.errors import NotFound
from aifab.meter.report import Footprint

models_app = typer.Typer(help="Registered model versions.", no_args_is_help=False)
runs_app = typer.Typer(help="Training and evaluation runs.", no_args_is_help=False)
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, name: str | None = typer.Option(None, "--name", help="Only this model.")) -> None:
    """List model versions (optionally of one name) with their aliases and metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from aifab.meter.report import model_footprints
    from aifab.registry.models import aliases_of, list_versions

    store = open_store()
    versions = list_versions(store, name)
    footprints = model_footprints(store.db, [mv.id for mv in versions])  # see `aifab ledger --by model`
    table = Listing(
        Column("model", Kind.ID), Column("params", Kind.NUMBER), Column("val\nloss", Kind.NUMBER), Column("aliases"),
        Column("run", Kind.ID), Column("energy\nmake / serve", Kind.NUMBER), Column("created"),
    )  # fmt: skip
    for mv in versions:
        table.add_row(
            f"{mv.name}:{mv.version}",
            count(mv.params_count),
            dash(mv.metrics.get("val_loss")),
            ", ".join(aliases_of(store, mv.id)),
            mv.run_id or "-",
            _footprint(footprints[mv.id]),
            when(mv.created_at),
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
    from aifab.store.runs import list_runs

    table = Listing(
        Column("run", Kind.ID), Column("kind", Kind.ID), Column("status", Kind.ID), Column("steps", Kind.NUMBER),
        Column("val\nloss", Kind.NUMBER), Column("tokens/s", Kind.NUMBER), Column("elapsed", Kind.NUMBER),
        Column("created"),
    )  # fmt: skip
    for r in list_runs(open_store().db):
        sm = r.summary or {}
        steps, tokens_per_s = sm.get("steps"), sm.get("tokens_per_s")
        table.add_row(
            r.id,
            r.kind,
            r.status,
            "-" if steps is None else count(steps),
            dash(sm.get("val_loss_final")),
            "-" if tokens_per_s is None else count(tokens_per_s),
            "-" if r.elapsed_s is None else duration(r.elapsed_s),
            when(r.created_at),
        )
    out.print(table)


@runs_app.command("show")
def show(run_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """One run with its parameters, summary, lineage and per-step metrics history."""
    from aifab.store.runs import run_detail

    detail = run_detail(open_store().db, run_id)
    if detail is None:
        raise NotFound(f"unknown run {run_id!r} (see `aifab runs`)")
    body = detail.to_json()
    if as_json:
        print(json.dumps(body, default=str))
        return
    out.print_json(json.dumps({k: v for k, v in body.items() if k != "metrics"}, default=str))
    for key, points in detail.history.items():
        last = points[-1]
        out.print(f"{key}: {len(points)} points, last {last.value:.4f} at step {last.step}")


def _footprint(fp: Footprint) -> str:
    """`making / serving` energy of a model version, "(est.)" when any of it is an estimate; "-" when unmetered."""
    if not fp.entries:
        return "-"
    text = f"{energy(fp.making.energy_j)} / {energy(fp.serving.energy_j)}"
    return f"{text} (est.)" if fp.estimated else text
