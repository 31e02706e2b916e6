"""Samplers: the NVML counter through a fake NVML (and the real one on a GPU), resets, and the automatic choice."""

from types import SimpleNamespace
from typing import Any

import pytest

from aifab.meter.samplers import CpuTimeEstimate, NvmlSampler, auto_sampler


class FakeNvml:
    """The parts of pynvml the sampler uses: per-GPU energy counters (mJ) the test sets."""

    class NVMLError(Exception):
        pass

    def __init__(self, counters_mj: list[int], names: list[str] | None = None, fail: bool = False) -> None:
        self.counters_mj, self.fail = counters_mj, fail
        self.names = names or ["NVIDIA H100 80GB HBM3"] * len(counters_mj)
        self.util = [0] * len(counters_mj)

    def nvmlInit(self) -> None:
        if self.fail:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.counters_mj)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return self.counters_mj[h]

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.names[h]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self.util[h])


def test_nvml_sums_the_visible_gpus_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([1_000_000, 5_000_000])
    s = NvmlSampler(fake)
    assert (s.name, s.estimated, s.device) == ("nvml", False, "2 x NVIDIA H100 80GB HBM3")
    e0 = s.energy_j()
    fake.counters_mj[0] += 2_500  # 2.5 J on GPU 0
    fake.counters_mj[1] += 700_000  # 700 J on GPU 1
    assert s.energy_j() - e0 == pytest.approx(702.5)


def test_nvml_reads_only_the_gpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    fake = FakeNvml([0, 0, 0])
    s = NvmlSampler(fake)
    e0 = s.energy_j()
    fake.counters_mj[0] += 9_000_000  # another job's GPU
    fake.counters_mj[1] += 1_000
    assert s.energy_j() - e0 == pytest.approx(1.0) and s.device.startswith("1 x ")


def test_a_counter_reset_adds_nothing_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([50_000_000])
    s = NvmlSampler(fake)
    e0 = s.energy_j()
    fake.counters_mj[0] = 3_000  # the driver reloaded: the counter starts again near 0
    e1 = s.energy_j()
    assert e1 == e0 and s.resets == 1  # never a negative window
    fake.counters_mj[0] += 4_000
    assert s.energy_j() - e1 == pytest.approx(4.0)


def test_no_driver_is_an_oserror_so_auto_falls_through(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError, match="Driver Not Loaded"):
        NvmlSampler(FakeNvml([0], fail=True))
    monkeypatch.setattr("aifab.meter.samplers.NvmlSampler", lambda: (_ for _ in ()).throw(OSError("no GPU")))
    monkeypatch.setattr("aifab.meter.samplers.RaplSampler", lambda: (_ for _ in ()).throw(OSError("no RAPL")))
    chosen = auto_sampler()
    assert isinstance(chosen, CpuTimeEstimate) and chosen.estimated and "estimated" in chosen.device


def test_auto_prefers_the_gpu_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([0])
    monkeypatch.setattr("aifab.meter.samplers.NvmlSampler", lambda: NvmlSampler(fake))
    assert auto_sampler().name == "nvml"


@pytest.mark.gpu
def test_the_real_nvml_counter_rises_under_load() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s = NvmlSampler()
    e0 = s.energy_j()
    x = torch.randn(8192, 8192, device="cuda")
    for _ in range(50):
        x = x @ x
        x = x / x.norm()
    torch.cuda.synchronize()
    assert s.energy_j() > e0


def test_a_stage_window_with_a_counter_reset_is_marked(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from sqlalchemy import select

    from aifab.meter.ledger import Meter, Prices
    from aifab.store import Store
    from aifab.store.schema import LedgerEntry

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml([10_000_000])
    store = Store(tmp_path / "home")
    try:
        meter = Meter(store.db, Prices(0.1, 400.0, 1.0), NvmlSampler(fake))
        with meter.measure("train", "run", "r1"):
            fake.counters_mj[0] += 5_000
        with meter.measure("train", "run", "r2"):
            fake.counters_mj[0] = 2_000  # the driver reloaded mid-window
        with store.db.session() as s:
            rows = {r.subject_id: r for r in s.scalars(select(LedgerEntry))}
        assert (rows["r1"].energy_j, rows["r1"].estimated, rows["r1"].sampler) == (5.0, False, "nvml")
        assert rows["r2"].energy_j >= 0 and rows["r2"].estimated is True
        assert rows["r2"].sampler == "nvml (counter reset)"
    finally:
        store.close()
