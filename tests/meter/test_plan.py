import json
import math
from pathlib import Path

import pytest

from aifab.meter.catalog import FACILITY_CAPEX_USD_PER_W, FACILITY_PUE, GpuSpec, gpu_spec
from aifab.meter.plan import plan
from aifab.spec import MeterSpec
from aifab.store import Store
from aifab.store.schema import LedgerEntry, ModelVersion
from helpers import aifab

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
KEYS = {"gpus", "capex_usd", "energy_twh_per_year", "us_homes_equivalent", "tokens_per_year", "usd_per_mtok"}


def test_plan_matches_a_hand_calculation() -> None:
    """0.1 GW at PUE 1.25: 80 MW of IT power / 1 kW per GPU = 80,000 GPUs; hardware 80,000 * $20k = $1.6 B,
    facility 1e8 W * $2/W = $0.2 B. A year at 80% load: 1e8 W * 0.8 * 8,760 h = 700.8 GWh = 0.7008 TWh =
    64,943 homes at 10,791 kWh. IT energy 700.8e6 kWh / 1.25 * 3.6e6 J = 2.018e15 J / 0.5 J = 4.036e15 tokens.
    Cost a year: 700.8e6 kWh * $0.10 = $70.08 M + $1.6 B / 4 + $0.2 B / 20 = $480.08 M, over 4.036e9 Mtok."""
    p = plan(0.1, TOY, 1.25, 0.5, 0.10, utilization=0.8, amortization_years=4,
             facility_capex_usd_per_w=2.0, facility_amortization_years=20)  # fmt: skip
    assert p.gpus == 80_000
    assert p.hardware_capex_usd == pytest.approx(1.6e9) and p.capex_usd == pytest.approx(1.8e9)
    assert p.energy_twh_per_year == pytest.approx(0.7008)
    assert p.us_homes_equivalent == pytest.approx(700.8e6 / 10_791)
    assert p.tokens_per_year == pytest.approx(700.8e6 / 1.25 * 3.6e6 / 0.5)
    assert p.usd_per_mtok == pytest.approx((70.08e6 + 400e6 + 10e6) / (p.tokens_per_year / 1e6))


def test_gpus_round_down() -> None:
    assert plan(1e-6 * 2.5, TOY, 1.0, 0.5, 0.1).gpus == 2  # 2,500 W holds two 1 kW servers, not 2.5


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
        plan(gpu=TOY, utilization=utilization, **args)  # type: ignore[arg-type]


def test_one_gw_of_h100_costs_about_50_billion() -> None:
    """The widely quoted ~$50 B per GW (NVIDIA, Aug 2025: $50-60 B, ~$35 B of it NVIDIA's) includes the facility.
    1 GW / PUE 1.2 = 833 MW of IT / 1,275 W per GPU (DGX H100) = 653,594 GPUs * $50k all-in = $32.7 B of
    hardware, plus 1e9 W * $14.8/W of building, power and cooling (Bernstein) = $14.8 B: $47.5 B."""
    p = plan(1.0, gpu_spec("H100"), FACILITY_PUE, gpu_spec("H100").j_per_token, 0.127)
    assert p.gpus == 653_594
    assert p.facility_capex_usd == pytest.approx(1e9 * FACILITY_CAPEX_USD_PER_W)
    assert 40e9 <= p.capex_usd <= 60e9
    assert 25e9 <= p.hardware_capex_usd <= 40e9


def test_ten_gw_is_about_ten_million_us_homes() -> None:
    """10 GW * 8,760 h = 87.6 TWh = 87.6e9 kWh; / 10,791 kWh per home a year (EIA, 2022) = 8.12 million homes."""
    p = plan(10.0, gpu_spec("H100"), FACILITY_PUE, 0.5, 0.127)
    assert p.energy_twh_per_year == pytest.approx(87.6)
    assert p.us_homes_equivalent == pytest.approx(87.6e9 / 10_791)
    assert 7e6 <= p.us_homes_equivalent <= 12e6


# ---- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_json_has_the_keys(tmp_path: Path) -> None:
    r = aifab("plan", "--power-gw", "1", "--gpu", "h100", "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(body) >= KEYS
    assert body["gpus"] == 653_594 and 40e9 <= body["capex_usd"] <= 60e9
    assert body["assumptions"]["electricity_usd_per_kwh"] == MeterSpec().electricity_usd_per_kwh
    assert body["assumptions"]["pue"] == FACILITY_PUE


def test_cli_prints_a_table(tmp_path: Path) -> None:
    r = aifab("plan", "--power-gw", "10", "--gpu", "GB200", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert "GPUs" in r.stdout and "US homes" in r.stdout and "$ per million tokens" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--power-gw", "0", "--gpu", "H100"], "--power-gw must be a number greater than 0"),
        (["--power-gw", "-2", "--gpu", "H100"], "--power-gw must be a number greater than 0"),
        (["--power-gw", "lots", "--gpu", "H100"], "--power-gw must be a number greater than 0 (got 'lots')"),
        (["--power-gw", "1", "--gpu", "H100", "--pue", "0.8"], "--pue must be a number at least 1"),
        (["--power-gw", "1", "--gpu", "H100", "--usd-per-kwh", "-1"], "--usd-per-kwh must be a number at least 0"),
        (["--power-gw", "1", "--gpu", "V100"], "unknown GPU 'V100': known GPUs are H100, H200, B200, GB200"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    r = aifab("plan", *args, home=tmp_path / "home")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


def _model(store: Store) -> int:
    with store.db.session() as s:
        mv = ModelVersion(name="m", version=1, weights_digest="a" * 64, tokenizer_digest="b" * 64, config={},
                          params_count=1, metrics={}, generation={})  # fmt: skip
        s.add(mv)
        s.flush()
        return mv.id


def _ledger(stage: str, kind: str, subject: str, energy_j: float, tokens_out: int) -> LedgerEntry:
    return LedgerEntry(stage=stage, subject_kind=kind, subject_id=subject, device="cpu", sampler="rapl",
                       estimated=False, elapsed_s=1.0, device_s=1.0, energy_j=energy_j, cost_usd=0.0, co2_g=0.0,
                       tokens_in=0, tokens_out=tokens_out)  # fmt: skip


def test_from_model_without_serving_rows_errors(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    mid = _model(store)
    with store.db.session() as s:
        s.add(_ledger("train", "model", str(mid), 500.0, 100))  # not serving: ignored
    store.close()
    r = aifab("plan", "--power-gw", "1", "--gpu", "H100", "--from-model", "m", home=tmp_path / "home")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: no serving rows") and "m:1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_from_model_uses_the_measured_j_per_token(tmp_path: Path) -> None:
    """Two serving rows: (30 J + 10 J) / (60 + 20 tokens) = 0.5 J/token; a training row and another model's
    serving row are left out. tokens/year = IT energy / 0.5 J = 1e9 W / 1.2 * 8,760 h * 3,600 s / 0.5."""
    store = Store(tmp_path / "home")
    mid = _model(store)
    with store.db.session() as s:
        s.add_all([
            _ledger("serve", "model", str(mid), 30.0, 60),
            _ledger("serve", "model", str(mid), 10.0, 20),
            _ledger("train", "run", "r1", 1e6, 0),
            _ledger("serve", "model", str(mid + 1), 1e6, 1),
        ])  # fmt: skip
    store.close()
    r = aifab("plan", "--power-gw", "1", "--gpu", "H100", "--from-model", "m", "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["j_per_token"] == pytest.approx(0.5)
    assert "m:1" in body["j_per_token_source"]
    assert body["tokens_per_year"] == pytest.approx(1e9 / 1.2 * 8760 * 3600 / 0.5)
