"""Energy samplers. Each reads a cumulative joule figure; the difference over a window is its energy.

- `NvmlSampler`: the NVML total-energy counter of each visible GPU (`nvmlDeviceGetTotalEnergyConsumption`,
  millijoules since the driver loaded; Volta and later), summed. Measured.
- `RaplSampler`: Linux powercap (intel-rapl) package and DRAM counters. Measured.
- `CpuTimeEstimate`: busy CPU seconds of this process x watts per core from the catalog (utilisation x TDP).
  An estimate, and labelled so (`estimated = True`) everywhere it appears.
`auto_sampler()` picks the first that works on this machine and says which through `.name` and `.device`.

A counter that goes backwards (a driver reload resets NVML's; RAPL's wraps at max_energy_range_uj, which is
handled) adds nothing for that reading and is counted in `.resets`, so no window books a negative energy.
"""

import os
import time
from pathlib import Path
from typing import Any, Protocol

from aifab.meter.catalog import GENERIC_SERVER_CPU, CpuSpec

POWERCAP = Path("/sys/class/powercap")


class Sampler(Protocol):
    name: str
    device: str
    estimated: bool

    def energy_j(self) -> float:
        """Cumulative joules since an arbitrary origin; only differences are meaningful."""
        ...

    def busy_s(self) -> float:
        """Cumulative device-seconds of work since an arbitrary origin."""
        ...


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuTimeEstimate:
    name = "cpu-time-estimate"
    estimated = True

    def __init__(self, cpu: CpuSpec = GENERIC_SERVER_CPU) -> None:
        self.cpu = cpu
        self.device = f"cpu ({os.cpu_count()} cores, estimated at {cpu.watts_per_core:.2f} W/core)"

    def energy_j(self) -> float:
        return _cpu_seconds() * self.cpu.watts_per_core

    def busy_s(self) -> float:
        return _cpu_seconds()


class RaplSampler:
    """Sum of the top-level intel-rapl zones (packages; DRAM zones when the platform reports them)."""

    name = "rapl"
    estimated = False

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self.zones:
            raise OSError(f"no intel-rapl zones under {root}")
        self._max = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self._last = [self._read(z) for z in self.zones]
        self._total_uj = 0
        self.device = f"cpu ({len(self.zones)} RAPL zones)"

    @staticmethod
    def _read(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def energy_j(self) -> float:
        for i, zone in enumerate(self.zones):
            now = self._read(zone)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += self._max[i]
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6

    def busy_s(self) -> float:
        return _cpu_seconds()


class NvmlSampler:
    """Sum of the NVML total-energy counters of the GPUs this process may use ($CUDA_VISIBLE_DEVICES, as
    indexes, else all); busy time is the wall time a GPU reports non-zero utilisation, sampled at each read."""

    name = "nvml"
    estimated = False
    # the driver updates the energy counter every few ms, not per call (about every 10 ms on one report:
    # github.com/gpuopenanalytics/pynvml/pull/18), so a serving meter reads it at most this often
    min_read_interval_s = 0.02

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError as e:
                raise OSError("nvidia-ml-py is not installed") from e
            nvml = pynvml
        self.nvml = nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            indexes = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else range(count)
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indexes if i < count]
            if not self.handles:
                raise OSError("NVML sees no GPU")
            self._last = [int(nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]
            names = {str(nvml.nvmlDeviceGetName(h)) for h in self.handles}
        except nvml.NVMLError as e:  # no driver, or a GPU without the energy counter (before Volta)
            raise OSError(f"NVML energy counter unavailable: {e}") from e
        self._total_mj = 0
        self._busy_s, self._last_t = 0.0, time.perf_counter()
        self.resets = 0
        self.device = f"{len(self.handles)} x {', '.join(sorted(names))}"[:64]

    def energy_j(self) -> float:
        for i, h in enumerate(self.handles):
            now = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h))
            delta = now - self._last[i]
            if delta < 0:  # the counter restarted (driver reload): this reading adds nothing
                self.resets += 1
                delta = 0
            self._total_mj += delta
            self._last[i] = now
        return self._total_mj / 1e3

    def busy_s(self) -> float:
        now = time.perf_counter()
        busy = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
        self._busy_s += (now - self._last_t) * sum(1 for u in busy if u > 0)
        self._last_t = now
        return self._busy_s


def auto_sampler() -> Sampler:
    """NVML where a GPU exposes its energy counter, else RAPL where it is readable, else the CPU-time estimate."""
    for kind in (NvmlSampler, RaplSampler):
        try:
            return kind()
        except (OSError, ValueError):
            continue
    return CpuTimeEstimate()


def monotonic_s() -> float:
    return time.perf_counter()
