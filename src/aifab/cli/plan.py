"""`aifab plan`: what a factory of a given facility power buys, burns and produces (see aifab.meter.plan)."""

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import func, select

from aifab.cli.common import app, open_store, out
from aifab.errors import AifabError
from aifab.meter.catalog import FACILITY_PUE, HARDWARE_AMORTIZATION_YEARS, gpu_spec
from aifab.meter.plan import plan as make_plan
from aifab.spec import MeterSpec, load_spec

# ledger stages that are the work of serving a model (the line's serving check writes "serve" rows charged to
# ("model", model version id); see pipeline/line.py)
SERVING_STAGES = ("serve",)


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


def measured_j_per_token(model: str) -> tuple[float, str]:
    """J per output token this factory measured serving MODEL: sum of energy_j / sum of tokens_out over its
    serving ledger rows. An AifabError when there are none (or they produced no tokens)."""
    from aifab.registry.models import resolve
    from aifab.store.schema import LedgerEntry

    store = open_store()
    mv = resolve(store, model)
    with store.db.session() as s:
        energy_j, tokens_out, rows, estimated = s.execute(
            select(
                func.sum(LedgerEntry.energy_j),
                func.sum(LedgerEntry.tokens_out),
                func.count(LedgerEntry.id),
                func.max(LedgerEntry.estimated),
            ).where(
                LedgerEntry.stage.in_(SERVING_STAGES),
                LedgerEntry.subject_kind == "model",
                LedgerEntry.subject_id == str(mv.id),
            )
        ).one()
    ref = f"{mv.name}:{mv.version}"
    if not rows or not tokens_out:
        raise AifabError(
            f"no serving rows with output tokens in the ledger for {ref}: serve it through the line first "
            f"(`aifab demo`), or leave out --from-model to use the catalog's J/token"
        )
    if not energy_j or energy_j <= 0:
        raise AifabError(f"the ledger's serving rows for {ref} record no energy; cannot derive a J/token")
    kind = "estimated" if estimated else "measured"
    return energy_j / tokens_out, f"{kind} by this factory serving {ref} ({rows} ledger rows, {tokens_out:,} tokens)"


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
    try:
        spec = gpu_spec(gpu)
    except ValueError as e:
        raise AifabError(str(e)) from None
    if from_model is not None:
        j_per_token, j_source = measured_j_per_token(from_model)
    else:
        j_per_token = spec.j_per_token
        j_source = "catalog estimate: server power per GPU / MLPerf Inference Llama 2 70B Offline tokens/s per GPU"
    try:
        p = make_plan(power, spec, pue_, j_per_token, price, utilization=util, amortization_years=years)
    except ValueError as e:
        raise AifabError(str(e)) from None

    body: dict[str, Any] = {
        "gpus": p.gpus,
        "capex_usd": p.capex_usd,
        "energy_twh_per_year": p.energy_twh_per_year,
        "us_homes_equivalent": p.us_homes_equivalent,
        "tokens_per_year": p.tokens_per_year,
        "usd_per_mtok": p.usd_per_mtok,
        "hardware_capex_usd": p.hardware_capex_usd,
        "facility_capex_usd": p.facility_capex_usd,
        "electricity_usd_per_year": p.electricity_usd_per_year,
        "amortized_capex_usd_per_year": p.amortized_capex_usd_per_year,
        "j_per_token": p.j_per_token,
        "j_per_token_source": j_source,
        "assumptions": {
            "gpu": spec.name,
            "power_gw": p.power_gw,
            "pue": p.pue,
            "utilization": p.utilization,
            "electricity_usd_per_kwh": p.electricity_usd_per_kwh,
            "amortization_years": years,
            "server_power_w_per_gpu": spec.server_power_w_per_gpu,
            "system_capex_usd_per_gpu": spec.system_capex_usd_per_gpu,
            "source": spec.source,
        },
    }
    if as_json:
        print(json.dumps(body))
        return
    table = Table("", "value", title=f"{p.power_gw:g} GW of {spec.name} at PUE {p.pue:g}")
    table.add_row("GPUs", f"{p.gpus:,}")
    table.add_row("capex", f"${p.capex_usd / 1e9:,.1f} B (hardware {p.hardware_capex_usd / 1e9:,.1f} B)")
    table.add_row("energy per year", f"{p.energy_twh_per_year:,.1f} TWh")
    table.add_row("US homes, a year's use", f"{p.us_homes_equivalent / 1e6:,.2f} million")
    table.add_row("tokens per year", f"{p.tokens_per_year:.3g}")
    table.add_row("$ per million tokens", f"${p.usd_per_mtok:,.3f}")
    table.add_row("J per token", f"{p.j_per_token:.3g} ({j_source})")
    out.print(table)
    out.print(
        f"assumes {p.utilization:.0%} of full power all year, ${p.electricity_usd_per_kwh:g}/kWh, hardware written "
        f"off over {years:g} years; prices and capex are industry estimates (see docs/meter.md)"
    )
