"""`aifab plan`: what a factory of a given facility power buys, burns and produces (see aifab.plan)."""

import json
import math
from pathlib import Path

import typer

from aifab.cli.common import app, open_store, out
from aifab.cli.tables import Column, Kind, Listing
from aifab.errors import AifabError
from aifab.meter.catalog import FACILITY_PUE, HARDWARE_AMORTIZATION_YEARS
from aifab.plan.report import PlanReport, plan_report
from aifab.spec import MeterSpec, load_spec


def _number(option: str, text: str, *, minimum: float, inclusive: bool) -> float:
    """A number from the command line; an AifabError naming the option when it is not one or is out of range."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f"at least {minimum:g}" if inclusive else f"greater than {minimum:g}"
        raise AifabError(f"{option} must be a number {bound} (got {text!r})")
    return value


@app.command()
def plan(
    power_gw: str = typer.Option(..., "--power-gw", help="Facility power in GW (grid connection, PUE included)."),
    gpu: str = typer.Option(..., "--gpu", help="A catalog GPU: H100, H200, B200, GB200."),
    pue: str = typer.Option(str(FACILITY_PUE), "--pue", help="Facility power / IT power (default: new AI build)."),
    from_model: str | None = typer.Option(
        None, "--from-model", help="Use the J/token this factory measured serving this model (name[:VERSION])."
    ),
    usd_per_kwh: str | None = typer.Option(
        None, "--usd-per-kwh", help="Electricity price (default: meter.electricity_usd_per_kwh of --config)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="A factory.yaml whose meter prices to use."),
    utilization: str = typer.Option("1.0", "--utilization", help="Share of full power drawn over the year."),
    amortization_years: str = typer.Option(
        str(HARDWARE_AMORTIZATION_YEARS), "--amortization-years", help="Years the hardware is written off over."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on the last line."),
) -> None:
    """Plan an AI factory: GPUs, capex, energy, homes-equivalent, tokens per year and $ per million tokens."""
    power = _number("--power-gw", power_gw, minimum=0, inclusive=False)
    pue_ = _number("--pue", pue, minimum=1, inclusive=True)
    util = _number("--utilization", utilization, minimum=0, inclusive=False)
    if util > 1:
        raise AifabError(f"--utilization must be at most 1 (got {utilization!r})")
    years = _number("--amortization-years", amortization_years, minimum=0, inclusive=False)
    meter = load_spec(config).meter if config is not None else MeterSpec()
    price = (
        meter.electricity_usd_per_kwh
        if usd_per_kwh is None
        else _number("--usd-per-kwh", usd_per_kwh, minimum=0, inclusive=True)
    )
    report = plan_report(power, gpu, pue_, price, utilization=util, amortization_years=years, from_model=from_model,
                         store=open_store() if from_model is not None else None)  # fmt: skip
    if as_json:
        print(json.dumps(report.to_json()))
        return
    out.print(_listing(report))
    p = report.plan
    out.print(
        f"assumes {p.utilization:.0%} of full power all year, ${p.electricity_usd_per_kwh:g}/kWh, hardware written "
        f"off over {report.amortization_years:g} years; prices and capex are industry estimates (see docs/meter.md)"
    )


def _listing(report: PlanReport) -> Listing:
    p = report.plan
    table = Listing(Column("", Kind.ID), Column("value", Kind.NUMBER), Column("basis"),
                    title=f"{p.power_gw:g} GW of {report.gpu.name} at PUE {p.pue:g}")  # fmt: skip
    table.add_row("GPUs", f"{p.gpus:,}", f"{report.gpu.server_power_w_per_gpu:,.0f} W per GPU, server included")
    table.add_row("capex", f"${p.capex_usd / 1e9:,.1f} B", f"hardware ${p.hardware_capex_usd / 1e9:,.1f} B")
    table.add_row("energy per year", f"{p.energy_twh_per_year:,.1f} TWh", "")
    table.add_row("US homes, a year's use", f"{p.us_homes_equivalent / 1e6:,.2f} million", "")
    table.add_row("tokens per year", f"{p.tokens_per_year:.3g}", "")
    table.add_row("$ per million tokens", f"${p.usd_per_mtok:,.3f}", "electricity and capex write-off")
    table.add_row("J per token", f"{p.j_per_token:.3g}", report.j_source)
    return table
