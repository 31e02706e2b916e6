"""`aifab ledger [--by stage|dataset|run|model|deployment] [--json]`: where the energy, money and carbon went."""

import json

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.tables import Column, Kind, Listing, count, duration, energy, mass, money
from aifab.meter.report import LedgerReport, Spend, Sums


@app.command()
def ledger(
    by: str = typer.Option("stage", "--by", help="Group by stage, dataset, run, model or deployment."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on the last line."),
) -> None:
    """The ledger summed by stage, dataset, run, model (with its making, through lineage) or deployment."""
    from aifab.meter.report import ledger_report

    report = ledger_report(open_store().db, by)
    if as_json:
        print(json.dumps(report.to_json()))
        return
    out.print(_listing(report))
    if by == "model":
        out.print("making: data, train, evaluate via lineage (a base model's too); the total counts each row once")


def _listing(report: LedgerReport) -> Listing:
    model = report.by == "model"
    money_columns = ["energy", *(["making", "serving"] if model else []), "cost", "CO2"]
    table = Listing(
        Column(report.by, Kind.ID),
        *(Column(h, Kind.NUMBER) for h in [*money_columns, "tokens\nin", "tokens\nout", "device\ntime"]),
        Column("source", Kind.ID),
    )
    for row in report.rows:
        table.add_row(*_cells(row.key, row.sums, (row.making, row.serving) if model else None))
    table.add_section()
    table.add_row(*_cells("total", report.total, (None, None) if model else None))
    return table


def _cells(key: str, sums: Sums, split: tuple[Spend | None, Spend | None] | None) -> list[str]:
    """A row's cells; `split` is (making, serving) under --by model, "-" where a row has none (the total)."""
    parts = [] if split is None else ["-" if s is None else energy(s.energy_j) for s in split]
    return [
        key,
        energy(sums.energy_j),
        *parts,
        money(sums.cost_usd),
        mass(sums.co2_g),
        count(sums.tokens_in),
        count(sums.tokens_out),
        duration(sums.device_s),
        "estimate" if sums.estimated else "measured",
    ]
