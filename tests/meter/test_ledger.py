from pathlib import Path

import pytest
from sqlalchemy import select

from aifab.meter.ledger import J_PER_KWH, Meter, Prices, totals_for
from aifab.meter.samplers import CpuTimeEstimate, RaplSampler, auto_sampler
from aifab.store import Store
from aifab.store.schema import LedgerEntry

PRICES = Prices(electricity_usd_per_kwh=0.10, grid_co2_g_per_kwh=400.0, pue=1.5)


class FakeSampler:
    """Energy rises 100 J and busy time 2 s on every reading."""

    name, device, estimated = "fake", "fake-device", False

    def __init__(self) -> None:
        self.energy_reads = self.busy_reads = 0

    def energy_j(self) -> float:
        self.energy_reads += 1
        return 100.0 * self.energy_reads

    def busy_s(self) -> float:
        self.busy_reads += 1
        return 2.0 * self.busy_reads


def test_prices_turn_joules_into_dollars_and_grams() -> None:
    assert PRICES.cost_usd(J_PER_KWH) == pytest.approx(0.15)  # 1 kWh x PUE 1.5 x $0.10
    assert PRICES.co2_g(J_PER_KWH) == pytest.approx(600.0)


def test_measure_writes_one_ledger_row_with_units(store: Store) -> None:
    meter = Meter(store.db, PRICES, FakeSampler())
    with meter.measure("train", "run") as charge:
        charge.subject_id, charge.tokens_in = "r1", 1234
    with store.db.session() as s:
        (row,) = s.scalars(select(LedgerEntry)).all()
    assert (row.stage, row.subject_kind, row.subject_id, row.tokens_in) == ("train", "run", "r1", 1234)
    assert row.energy_j == pytest.approx(100.0) and row.device_s == pytest.approx(2.0)
    assert row.cost_usd == pytest.approx(PRICES.cost_usd(100.0)) and row.co2_g == pytest.approx(PRICES.co2_g(100.0))
    assert row.sampler == "fake" and row.estimated is False


def test_a_failing_block_is_still_charged(store: Store) -> None:
    meter = Meter(store.db, PRICES, FakeSampler())
    with pytest.raises(ValueError), meter.measure("data", "dataset"):
        raise ValueError("bad input")
    assert totals_for(store.db, [("dataset", "-")])["energy_j"] == pytest.approx(100.0)


def test_totals_sum_over_subjects(store: Store) -> None:
    meter = Meter(store.db, PRICES, FakeSampler())
    for kind, id_ in [("dataset", "1"), ("run", "a"), ("run", "b")]:
        with meter.measure("x", kind, id_):
            pass
    t = totals_for(store.db, [("dataset", "1"), ("run", "a")])
    assert t["energy_j"] == pytest.approx(200.0) and t["cost_usd"] == pytest.approx(PRICES.cost_usd(200.0))


def test_cpu_estimate_is_labelled_and_grows_with_work() -> None:
    s = CpuTimeEstimate()
    assert s.estimated is True and "estimated" in s.device
    before = s.energy_j()
    sum(i * i for i in range(300_000))
    assert s.energy_j() > before


def _zone(root: Path, name: str, energy_uj: int, max_uj: int) -> Path:
    z = root / name
    z.mkdir()
    (z / "energy_uj").write_text(str(energy_uj))
    (z / "max_energy_range_uj").write_text(str(max_uj))
    return z


def test_rapl_sums_zones_and_handles_wraparound(tmp_path: Path) -> None:
    a = _zone(tmp_path, "intel-rapl:0", 900_000, 1_000_000)
    _zone(tmp_path, "intel-rapl:1", 0, 1_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 5, 1_000_000)  # a subzone: counted inside its package, not again
    s = RaplSampler(tmp_path)
    assert s.estimated is False and len(s.zones) == 2
    (a / "energy_uj").write_text("100000")  # wrapped: 900k -> 1M -> 100k is 200k uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("300000")
    assert s.energy_j() == pytest.approx(0.5)


def test_no_rapl_means_the_estimate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aifab.meter.samplers as samplers

    monkeypatch.setattr(samplers, "POWERCAP", tmp_path / "none")
    monkeypatch.setattr(samplers.RaplSampler.__init__, "__defaults__", (tmp_path / "none",))
    assert isinstance(auto_sampler(), CpuTimeEstimate)
