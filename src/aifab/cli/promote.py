"""`aifab promote MODEL --alias A`: move an alias only through the gates of factory.yaml; `aifab models rollback`,
`aifab models history` and `aifab models promotion`: the record of every alias move and every decision."""

import json
from pathlib import Path

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.store_views import models_app
from aifab.cli.tables import Column, Kind, Listing, when
from aifab.errors import SpecError
from aifab.spec import load_spec


@app.command("promote")
def promote_command(
    model: str = typer.Argument(..., help="The candidate: name, name:VERSION or name@ALIAS."),
    alias: str = typer.Option(..., "--alias", help="The alias to move to it, e.g. prod."),
    force: bool = typer.Option(False, "--force", help="Move the alias even if a gate fails (recorded as forced)."),
    config: Path = typer.Option(Path("factory.yaml"), "--config", help="The factory.yaml whose `gates:` apply."),
    as_json: bool = typer.Option(False, "--json", help="Also print the decision as JSON on the last line."),
) -> None:
    """Run the evaluations and load test the gates need and have no current result for, decide every gate, store
    the decision, and move the alias only if every gate passes. Exits non-zero when refused."""
    from aifab.pipeline.promote import GateRefused, promote

    spec = load_spec(config)
    if spec.gates is None:
        raise SpecError(f"{config}: no `gates:` section: nothing to promote through (`aifab models alias` moves it)")
    from aifab.meter.ledger import Prices

    report = promote(open_store(), model, alias, spec.gates, force=force, prices=Prices(**spec.meter.model_dump()))
    refused = report.promotion_id is not None and not report.moved
    if report.verdicts:
        name = report.model.partition(":")[0]
        out.print(verdict_table([v.to_json() for v in report.verdicts], f"{report.model} for {name}@{alias}"))
    if not refused:
        out.print(report.note)
    if as_json:
        print(json.dumps(report.to_json()))
    if refused:
        raise GateRefused(report)  # its one line, the note, goes to stderr with the non-zero exit


def verdict_table(verdicts: list[dict[str, object]], title: str) -> Listing:
    """Each gate's bound, measured value, threshold, champion value and result."""
    table = Listing(
        Column("gate", Kind.ID), Column("bound", Kind.ID), Column("measured", Kind.NUMBER),
        Column("threshold", Kind.NUMBER), Column("champion", Kind.NUMBER), Column("result", Kind.ID), Column("why"),
        title=title,
    )  # fmt: skip
    for v in verdicts:
        table.add_row(
            str(v["gate"]), str(v["bound"]), _num(v["measured"]), _num(v["threshold"]), _num(v["champion"]),
            "pass" if v["passed"] else "FAIL", str(v["reason"]).split(": ", 1)[-1],
        )  # fmt: skip
    return table


def _num(x: object) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "-"


@models_app.command("rollback")
def rollback_command(
    name: str = typer.Argument(..., help="The model name."),
    alias: str = typer.Option(..., "--alias", help="The alias to move back to its previous holder."),
) -> None:
    """Move NAME@ALIAS back to the version it held before its last move (recorded as a rollback). A second
    rollback goes one move further back."""
    from aifab.registry.aliases import rollback

    mv = rollback(open_store(), name, alias)
    out.print(f"{name}@{alias} -> {mv.name}:{mv.version} (rolled back)")


@models_app.command("history")
def history_command(
    name: str = typer.Argument(..., help="The model name."),
    alias: str | None = typer.Option(None, "--alias", help="Only this alias."),
    as_json: bool = typer.Option(False, "--json", help="Print the moves as JSON instead."),
) -> None:
    """Every move of NAME's aliases, oldest first: when, from and to which version, why, and the promotion that
    decided it."""
    from aifab.registry.aliases import alias_history
    from aifab.registry.models import list_versions

    store = open_store()
    versions = {mv.id: f"{name}:{mv.version}" for mv in list_versions(store, name)}
    events = alias_history(store, name, alias)

    def ref(version_id: int | None, none: str) -> str:
        return none if version_id is None else versions.get(version_id, f"id {version_id}")

    rows = [
        {
            "at": ev.at.isoformat(),
            "alias": ev.alias,
            "from": ref(ev.from_version_id, "-"),
            "to": ref(ev.to_version_id, "(deleted)"),
            "reason": ev.reason,
            "promotion": ev.promotion_id,
        }
        for ev in events
    ]
    if as_json:
        print(json.dumps(rows))
        return
    table = Listing(
        Column("when", Kind.ID), Column("alias", Kind.ID), Column("from", Kind.ID), Column("to", Kind.ID),
        Column("reason", Kind.ID), Column("promotion", Kind.NUMBER), title=f"alias moves of {name}",
    )  # fmt: skip
    for ev, row in zip(events, rows, strict=True):
        promotion = "-" if ev.promotion_id is None else str(ev.promotion_id)
        table.add_row(when(ev.at), ev.alias, str(row["from"]), str(row["to"]), ev.reason, promotion)
    out.print(table if rows else f"no recorded alias moves of {name}" + (f"@{alias}" if alias else ""))


@models_app.command("promotion")
def promotion_command(
    promotion_id: int = typer.Argument(..., help="A promotion id (see `aifab models history`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON instead."),
) -> None:
    """One stored promotion decision: candidate, champion, every gate's verdict, and whether the alias moved."""
    from aifab.registry.aliases import promotion
    from aifab.registry.models import list_versions

    store = open_store()
    row = promotion(store, promotion_id)
    versions = {mv.id: f"{mv.name}:{mv.version}" for mv in list_versions(store, row.name)}
    body = {
        "id": row.id, "at": row.at.isoformat(), "alias": f"{row.name}@{row.alias}",
        "candidate": versions.get(row.candidate_id), "champion": versions.get(row.champion_id or -1),
        "passed": row.passed, "forced": row.forced, "moved": row.moved, "gates": row.gates,
    }  # fmt: skip
    if as_json:
        print(json.dumps(body))
        return
    outcome = "forced" if row.forced else "promoted" if row.moved else "refused"
    title = f"promotion {row.id}: {body['candidate']} for {body['alias']} ({outcome}, {when(row.at)})"
    out.print(verdict_table(row.gates, title))
