"""Hardware figures the estimates fall back on. Each figure cites its source.

The full catalog (H100, H200, B200, GB200, server CPUs, prices) arrives with the metering issue; the
foundation needs only a per-core power figure for CPUs that expose no energy counter.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class CpuSpec:
    name: str
    tdp_w: float
    cores: int
    source: str

    @property
    def watts_per_core(self) -> float:
        return self.tdp_w / self.cores


# Intel Xeon Platinum 8480+ (Sapphire Rapids): 350 W TDP, 56 cores (Intel ARK, product 231746).
# Its 6.25 W per busy core stands in for any server core without a RAPL counter.
GENERIC_SERVER_CPU = CpuSpec(name="Intel Xeon Platinum 8480+", tdp_w=350.0, cores=56, source="Intel ARK product 231746")
