"""Energy samplers. Each reads a cumulative joule figure; the difference over a window is its energy.

- `RaplSampler`: Linux powercap (intel-rapl) package and DRAM counters. Measured.
- `CpuTimeEstimate`: busy CPU seconds of this process x watts per core from the catalog. An estimate,
  and labelled so (`estimated = True`) everywhere it appears.
`auto_sampler()` picks the first that works on this machine and says which through `.name`.
(NVML for GPUs arrives with the metering issue.)
"""

import os
import time
from pathlib import Path
from typing import Protocol

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


def auto_sampler() -> Sampler:
    """RAPL where it is readable, else the CPU-time estimate."""
    try:
        return RaplSampler()
    except (OSError, ValueError):
        return CpuTimeEstimate()


def monotonic_s() -> float:
    return time.perf_counter()
