"""`aifab ledger [--by stage|dataset|run|model|deployment] [--json]`: where the energy, money and carbon went."""

import json
from typing import Any

import typer
from rich.table import Table

from aifab.cli.common import app, open_store, out


@app.command()
def ledger(
    by: str = typer.Option("stage", "--by", help="Group by stage, dataset, run, model or deployment."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on the last line."),
) -> None:
    """The ledger summed by stage, dataset, run, model (with its making, through lineage) or deployment."""
    from aifab.meter.ledger import ledger_report

    report = ledger_report(open_store().db, by)
    if as_json:
        print(json.dumps(report))
        return
    model = by == "model"
    columns = [by, "energy J", "cost $", "CO2 g", "tokens in", "tokens out", "device s", "source"]
    if model:
        columns[2:2] = ["making J", "serving J"]
    table = Table(*columns)
    for row in report["rows"]:
        table.add_row(*_cells(row, model))
    table.add_section()
    table.add_row(*_cells({**report["total"], "key": "total"}, model))
    out.print(table)
    if model:
        out.print("making: data, train, evaluate via lineage (a base model's too); the total counts each row once")


def _cells(row: dict[str, Any], model: bool) -> list[str]:
    cells = [row["key"], f"{row['energy_j']:,.1f}"]
    if model:
        cells += [_j(row.get("making")), _j(row.get("serving"))]
    return [
        *cells,
        f"{row['cost_usd']:.4g}",
        f"{row['co2_g']:.4g}",
        f"{row['tokens_in']:,}",
        f"{row['tokens_out']:,}",
        f"{row['device_s']:,.1f}",
        "estimate" if row["estimated"] else "measured",
    ]


def _j(part: dict[str, Any] | None) -> str:
    return "-" if part is None else f"{part['energy_j']:,.1f}"
