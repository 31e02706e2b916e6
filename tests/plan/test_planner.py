"""The planner's arithmetic against hand calculations and widely quoted figures."""

import math

import pytest

from aifab.meter.catalog import FACILITY_CAPEX_USD_PER_W, FACILITY_PUE, GpuSpec, gpu_spec
from aifab.plan.planner import plan_factory

TOY = GpuSpec(
    name="Toy",
    tdp_w=500.0,
    bf16_dense_flops=1e15,
    memory_bandwidth_bytes_per_s=1e12,
    memory_bytes=1e11,
    price_usd=10_000.0,
    server_power_w_per_gpu=1_000.0,
    system_capex_usd_per_gpu=20_000.0,
    j_per_token=0.5,
    source="a test",
)


def test_plan_matches_a_hand_calculation() -> None:
    """0.1 GW at PUE 1.25: 80 MW of IT power / 1 kW per GPU = 80,000 GPUs; hardware 80,000 * $20k = $1.6 B,
    facility 1e8 W * $2/W = $0.2 B. A year at 80% load: 1e8 W * 0.8 * 8,760 h = 700.8 GWh = 0.7008 TWh =
    64,943 homes at 10,791 kWh. IT energy 700.8e6 kWh / 1.25 * 3.6e6 J = 2.018e15 J / 0.5 J = 4.036e15 tokens.
    Cost a year: 700.8e6 kWh * $0.10 = $70.08 M + $1.6 B / 4 + $0.2 B / 20 = $480.08 M, over 4.036e9 Mtok."""
    p = plan_factory(0.1, TOY, 1.25, 0.5, 0.10, utilization=0.8, amortization_years=4,
                     facility_capex_usd_per_w=2.0, facility_amortization_years=20)  # fmt: skip
    assert p.gpus == 80_000
    assert p.hardware_capex_usd == pytest.approx(1.6e9) and p.capex_usd == pytest.approx(1.8e9)
    assert p.energy_twh_per_year == pytest.approx(0.7008)
    assert p.us_homes_equivalent == pytest.approx(700.8e6 / 10_791)
    assert p.tokens_per_year == pytest.approx(700.8e6 / 1.25 * 3.6e6 / 0.5)
    assert p.usd_per_mtok == pytest.approx((70.08e6 + 400e6 + 10e6) / (p.tokens_per_year / 1e6))


def test_gpus_round_down() -> None:
    assert plan_factory(1e-6 * 2.5, TOY, 1.0, 0.5, 0.1).gpus == 2  # 2,500 W holds two 1 kW servers, not 2.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"power_gw": 0.0}, "power_gw"),
        ({"power_gw": -1.0}, "power_gw"),
        ({"pue": 0.9}, "pue"),
        ({"j_per_token": 0.0}, "j_per_token"),
        ({"electricity_usd_per_kwh": -0.1}, "electricity"),
        ({"utilization": 1.5}, "utilization"),
        ({"power_gw": math.nan}, "power_gw"),
    ],
)
def test_plan_rejects_bad_inputs(kwargs: dict[str, float], match: str) -> None:
    args = {"power_gw": 1.0, "pue": 1.2, "j_per_token": 0.5, "electricity_usd_per_kwh": 0.1, **kwargs}
    utilization = args.pop("utilization", 1.0)
    with pytest.raises(ValueError, match=match):
        plan_factory(gpu=TOY, utilization=utilization, **args)  # type: ignore[arg-type]


def test_one_gw_of_h100_costs_about_50_billion() -> None:
    """The widely quoted ~$50 B per GW (NVIDIA, Aug 2025: $50-60 B, ~$35 B of it NVIDIA's) includes the facility.
    1 GW / PUE 1.2 = 833 MW of IT / 1,275 W per GPU (DGX H100) = 653,594 GPUs * $50k all-in = $32.7 B of
    hardware, plus 1e9 W * $14.8/W of building, power and cooling (Bernstein) = $14.8 B: $47.5 B."""
    p = plan_factory(1.0, gpu_spec("H100"), FACILITY_PUE, gpu_spec("H100").j_per_token, 0.127)
    assert p.gpus == 653_594
    assert p.facility_capex_usd == pytest.approx(1e9 * FACILITY_CAPEX_USD_PER_W)
    assert 40e9 <= p.capex_usd <= 60e9
    assert 25e9 <= p.hardware_capex_usd <= 40e9


def test_ten_gw_is_about_ten_million_us_homes() -> None:
    """10 GW * 8,760 h = 87.6 TWh = 87.6e9 kWh; / 10,791 kWh per home a year (EIA, 2022) = 8.12 million homes."""
    p = plan_factory(10.0, gpu_spec("H100"), FACILITY_PUE, 0.5, 0.127)
    assert p.energy_twh_per_year == pytest.approx(87.6)
    assert p.us_homes_equivalent == pytest.approx(87.6e9 / 10_791)
    assert 7e6 <= p.us_homes_equivalent <= 12e6
