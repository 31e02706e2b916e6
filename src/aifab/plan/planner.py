"""The planner's arithmetic: what a given facility power buys, burns and produces. Pure, no I/O.

With P the facility power in W, u the utilization, H = 8,760 hours a year:
- IT power = P / PUE; GPUs = floor(IT power / server_power_w_per_gpu). The per-GPU server figure is the whole
  server's maximum power over its GPUs, so CPUs, memory, NICs and fans are counted; the scale-out switches and
  storage are not (a few per cent), nor is any power reserve.
- capex = hardware + facility: GPUs * system_capex_usd_per_gpu (GPU, server share, network, storage) plus
  P * facility_capex_usd_per_w (building, power and cooling plant, which scales with facility power).
- facility energy = P * u * H (the facility draws u of its full power all year; u = 1 is the upper bound).
- US homes = facility energy / the average US home's annual use (EIA, 10,791 kWh in 2022).
- tokens = IT energy / J per token, IT energy = facility energy / PUE: the J/token is measured (or estimated)
  at the GPU server, so the facility overhead is not in it and is not charged to it a second time.
- $ per million tokens = (facility energy * electricity price + hardware / amortization_years
  + facility capex / facility_amortization_years) / (tokens / 1e6). Interest, staff, software and
  maintenance are left out, so this is a floor on cost, not a price.
"""

import math
from dataclasses import dataclass

from aifab.meter.catalog import (
    FACILITY_AMORTIZATION_YEARS,
    FACILITY_CAPEX_USD_PER_W,
    HARDWARE_AMORTIZATION_YEARS,
    US_HOME_KWH_PER_YEAR,
    GpuSpec,
)
from aifab.meter.ledger import J_PER_KWH

HOURS_PER_YEAR = 8_760.0


@dataclass(frozen=True)
class FactoryPlan:
    """A planned factory: the inputs it was planned from, then what they come to (see the module docstring)."""

    gpu: str
    power_gw: float
    pue: float
    utilization: float
    j_per_token: float
    electricity_usd_per_kwh: float
    gpus: int
    hardware_capex_usd: float
    facility_capex_usd: float
    capex_usd: float
    energy_twh_per_year: float
    it_energy_twh_per_year: float
    us_homes_equivalent: float
    tokens_per_year: float
    electricity_usd_per_year: float
    amortized_capex_usd_per_year: float
    usd_per_mtok: float


def plan_factory(
    power_gw: float,
    gpu: GpuSpec,
    pue: float,
    j_per_token: float,
    electricity_usd_per_kwh: float,
    *,
    utilization: float = 1.0,
    amortization_years: float = HARDWARE_AMORTIZATION_YEARS,
    facility_capex_usd_per_w: float = FACILITY_CAPEX_USD_PER_W,
    facility_amortization_years: float = FACILITY_AMORTIZATION_YEARS,
) -> FactoryPlan:
    """Plan a factory of `power_gw` GW of facility power filled with `gpu` servers (see the module docstring).

    A ValueError names the first argument out of range."""
    for name, value in (
        ("power_gw", power_gw),
        ("j_per_token", j_per_token),
        ("amortization_years", amortization_years),
        ("facility_amortization_years", facility_amortization_years),
    ):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number (got {value})")
    if not math.isfinite(pue) or pue < 1.0:
        raise ValueError(f"pue must be at least 1.0 (got {pue})")
    if not math.isfinite(electricity_usd_per_kwh) or electricity_usd_per_kwh < 0:
        raise ValueError(f"electricity_usd_per_kwh must be zero or more (got {electricity_usd_per_kwh})")
    if not math.isfinite(facility_capex_usd_per_w) or facility_capex_usd_per_w < 0:
        raise ValueError(f"facility_capex_usd_per_w must be zero or more (got {facility_capex_usd_per_w})")
    if not math.isfinite(utilization) or not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1] (got {utilization})")

    facility_w = power_gw * 1e9
    gpus = math.floor(facility_w / pue / gpu.server_power_w_per_gpu)
    hardware = gpus * gpu.system_capex_usd_per_gpu
    facility = facility_w * facility_capex_usd_per_w
    energy_kwh = facility_w * utilization * HOURS_PER_YEAR / 1e3
    it_energy_j = energy_kwh * J_PER_KWH / pue
    tokens = it_energy_j / j_per_token
    electricity = energy_kwh * electricity_usd_per_kwh
    amortized = hardware / amortization_years + facility / facility_amortization_years
    return FactoryPlan(
        gpu=gpu.name,
        power_gw=power_gw,
        pue=pue,
        utilization=utilization,
        j_per_token=j_per_token,
        electricity_usd_per_kwh=electricity_usd_per_kwh,
        gpus=gpus,
        hardware_capex_usd=hardware,
        facility_capex_usd=facility,
        capex_usd=hardware + facility,
        energy_twh_per_year=energy_kwh / 1e9,
        it_energy_twh_per_year=energy_kwh / pue / 1e9,
        us_homes_equivalent=energy_kwh / US_HOME_KWH_PER_YEAR,
        tokens_per_year=tokens,
        electricity_usd_per_year=electricity,
        amortized_capex_usd_per_year=amortized,
        usd_per_mtok=(electricity + amortized) / (tokens / 1e6),
    )
