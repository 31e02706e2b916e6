"""A plan with its sources: the catalog's or this factory's measured J/token, and `aifab plan`."""

import json
from pathlib import Path

import pytest

from aifab.errors import AifabError, NotFound
from aifab.meter.catalog import FACILITY_PUE, gpu_spec
from aifab.plan.report import CATALOG_J_SOURCE, measured_j_per_token, plan_report
from aifab.spec import MeterSpec
from aifab.store import Store
from aifab.store.schema import LedgerEntry, ModelVersion
from helpers import aifab

KEYS = {"gpus", "capex_usd", "energy_twh_per_year", "us_homes_equivalent", "tokens_per_year", "usd_per_mtok"}


def test_report_uses_the_catalog_by_default() -> None:
    r = plan_report(1.0, "h100", FACILITY_PUE, 0.127, utilization=1.0, amortization_years=5)
    assert r.gpu.name == "H100" and r.plan.gpus == 653_594
    assert r.plan.j_per_token == gpu_spec("H100").j_per_token and r.j_source == CATALOG_J_SOURCE
    body = r.to_json()
    assert set(body) >= KEYS | {"j_per_token_source", "assumptions"}
    assert body["assumptions"] == {
        "gpu": "H100", "power_gw": 1.0, "pue": FACILITY_PUE, "utilization": 1.0, "electricity_usd_per_kwh": 0.127,
        "amortization_years": 5, "server_power_w_per_gpu": 1275.0, "system_capex_usd_per_gpu": 50_000.0,
        "source": gpu_spec("H100").source,
    }  # fmt: skip


def test_report_errors_are_aifab_errors(tmp_path: Path) -> None:
    with pytest.raises(AifabError, match="unknown GPU 'V100'"):
        plan_report(1.0, "V100", 1.2, 0.1, utilization=1.0, amortization_years=5)
    with pytest.raises(AifabError, match="power_gw"):
        plan_report(0.0, "H100", 1.2, 0.1, utilization=1.0, amortization_years=5)
    with pytest.raises(ValueError, match="store"):
        plan_report(1.0, "H100", 1.2, 0.1, utilization=1.0, amortization_years=5, from_model="m")
    store = Store(tmp_path / "home")
    with pytest.raises(NotFound, match="unknown model 'nosuch'"):
        measured_j_per_token(store, "nosuch")
    store.close()


def test_measured_j_per_token_needs_energy(tmp_path: Path) -> None:
    """Rows with tokens but no energy give no J/token: a one-line error, not a division by zero or a free plan."""
    store = Store(tmp_path / "home")
    mid = _model(store)
    with store.db.session() as s:
        s.add(_ledger("serve", "model", str(mid), 0.0, 50))
    with pytest.raises(AifabError, match="record no energy"):
        measured_j_per_token(store, "m")
    store.close()


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
