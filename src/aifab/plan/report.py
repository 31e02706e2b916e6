"""A factory plan with its sources: the GPU from the catalog, the J/token from the catalog or from what this
factory measured serving one of its models (the ledger), and the arithmetic of `planner.plan_factory`."""

from dataclasses import dataclass

from aifab.errors import AifabError
from aifab.meter.catalog import GpuSpec, gpu_spec
from aifab.plan.planner import FactoryPlan, plan_factory
from aifab.store import Store

CATALOG_J_SOURCE = "catalog estimate: server power per GPU / MLPerf Inference Llama 2 70B Offline tokens/s per GPU"


@dataclass(frozen=True)
class JPerToken:
    """Joules per output token at the GPU server, and where the figure comes from, in words."""

    j_per_token: float
    source: str


@dataclass(frozen=True)
class PlanReport:
    """What `aifab plan` shows: the plan, the GPU it was made of, where its J/token came from, and the hardware
    write-off it assumed."""

    plan: FactoryPlan
    gpu: GpuSpec
    j_source: str
    amortization_years: float

    def to_json(self) -> dict[str, object]:
        """The plan as `aifab plan --json` prints it: the headline figures, the capex split, the J/token and its
        source, and `assumptions` (every input, and the catalog figures the plan used)."""
        p, spec = self.plan, self.gpu
        return {
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
            "j_per_token_source": self.j_source,
            "assumptions": {
                "gpu": spec.name,
                "power_gw": p.power_gw,
                "pue": p.pue,
                "utilization": p.utilization,
                "electricity_usd_per_kwh": p.electricity_usd_per_kwh,
                "amortization_years": self.amortization_years,
                "server_power_w_per_gpu": spec.server_power_w_per_gpu,
                "system_capex_usd_per_gpu": spec.system_capex_usd_per_gpu,
                "source": spec.source,
            },
        }


def measured_j_per_token(store: Store, model: str) -> JPerToken:
    """The J per output token this factory measured serving MODEL (name, name:VERSION or name@ALIAS): the sum of
    energy_j over the sum of tokens_out of its `serve` ledger rows. NotFound for an unknown model; an AifabError
    when it has no such rows, they produced no tokens, or they recorded no energy."""
    from aifab.meter.report import serving_energy
    from aifab.registry.models import resolve

    mv = resolve(store, model)
    spent = serving_energy(store.db, mv.id)
    ref = f"{mv.name}:{mv.version}"
    if not spent.entries or not spent.tokens_out:
        raise AifabError(
            f"no serving rows with output tokens in the ledger for {ref}: serve it through the line first "
            f"(`aifab demo`), or leave out --from-model to use the catalog's J/token"
        )
    if spent.j_per_token is None:
        raise AifabError(f"the ledger's serving rows for {ref} record no energy; cannot derive a J/token")
    kind = "estimated" if spent.estimated else "measured"
    source = f"{kind} by this factory serving {ref} ({spent.entries} ledger rows, {spent.tokens_out:,} tokens)"
    return JPerToken(spent.j_per_token, source)


def plan_report(
    power_gw: float,
    gpu: str,
    pue: float,
    electricity_usd_per_kwh: float,
    *,
    utilization: float,
    amortization_years: float,
    from_model: str | None = None,
    store: Store | None = None,
) -> PlanReport:
    """Plan `power_gw` GW of `gpu` (a catalog name, any case) servers. The J/token is the catalog's, or with
    `from_model` the one `store`'s ledger recorded serving that model (`measured_j_per_token`).

    An AifabError names an unknown GPU, a number out of range, or a model without serving rows; a ValueError
    when `from_model` comes without a `store`."""
    try:
        spec = gpu_spec(gpu)
    except ValueError as e:
        raise AifabError(str(e)) from None
    if from_model is None:
        j = JPerToken(spec.j_per_token, CATALOG_J_SOURCE)
    elif store is None:
        raise ValueError("from_model needs the store whose ledger to read")
    else:
        j = measured_j_per_token(store, from_model)
    try:
        p = plan_factory(power_gw, spec, pue, j.j_per_token, electricity_usd_per_kwh, utilization=utilization,
                         amortization_years=amortization_years)  # fmt: skip
    except ValueError as e:
        raise AifabError(str(e)) from None
    return PlanReport(p, spec, j.source, amortization_years)
