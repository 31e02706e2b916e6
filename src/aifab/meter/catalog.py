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


# ---- peak FLOP/s, the denominator of MFU -------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in FLOP/s, by a substring of the CUDA device name.
# - H100 SXM5 and H200: 989 TFLOP/s bf16 dense (NVIDIA H100 datasheet, "BF16 Tensor Core 1,979 TFLOPS*",
#   * = with sparsity; NVIDIA H200 datasheet, same compute). H100 PCIe: 756 TFLOP/s (1,513 with sparsity).
# - A100: 312 TFLOP/s bf16 dense (NVIDIA A100 datasheet).
# fp32 without tensor cores: H100 SXM 67 TFLOP/s, H100 PCIe 51, A100 19.5 (the same datasheets).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}

# x86 cores with two FMA units per core (Intel Skylake-SP Gold/Platinum and later: "two FMA units ... 32 DP or
# 64 SP FLOPs per cycle" with AVX-512, Intel 64 and IA-32 Architectures Optimization Reference Manual, Skylake
# server microarchitecture). Peak per core = GHz * FMA units * fp32 lanes * 2 (an FMA is two FLOPs).
FMA_UNITS_PER_CORE = 2


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a CUDA device for "bf16" or "fp32" math; None for a card the catalog lacks."""
    for key, peaks in GPU_PEAK_FLOPS.items():  # "H100 PCIe" is listed before "H100" so it matches first
        if key in device_name:
            return peaks[dtype]
    return None


def cpu_peak_flops(cores: int, ghz: float, fp32_lanes: int, fma_units: int = FMA_UNITS_PER_CORE) -> float:
    """Peak fp32 FLOP/s of `cores` x86 cores: cores * GHz * FMA units * SIMD lanes * 2 (an estimate)."""
    return cores * ghz * 1e9 * fma_units * fp32_lanes * 2


def cpu_probe(cpuinfo: str = "/proc/cpuinfo") -> tuple[float, int]:
    """(GHz, fp32 SIMD lanes) of this CPU from /proc/cpuinfo: the base clock in the model name ("@ 2.20GHz")
    or else the current clock, and 16 lanes with AVX-512, 8 with AVX2, 4 otherwise. Falls back to (2.0, 8)."""
    import re

    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return 2.0, 8
    m = re.search(r"@ *([0-9.]+) *GHz", text)
    mhz = re.search(r"cpu MHz\s*:\s*([0-9.]+)", text)
    ghz = float(m.group(1)) if m else float(mhz.group(1)) / 1000 if mhz else 2.0
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    names = set(flags.group(1).split()) if flags else set()
    lanes = 16 if "avx512f" in names else 8 if "avx2" in names else 4
    return ghz, lanes
