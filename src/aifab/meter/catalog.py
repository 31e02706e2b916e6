"""Hardware figures the estimates and the planner fall back on. Each figure cites its source.

Datasheet figures (power, FLOP/s, memory) are NVIDIA's, Intel's or AMD's own. Prices, all-in capex,
facility costs and the default J/token are industry estimates; their comments say so and name the report.
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

# Common server CPUs, TDP and cores from the vendors' product pages.
SERVER_CPUS: dict[str, CpuSpec] = {
    c.name: c
    for c in (
        GENERIC_SERVER_CPU,  # the CPU of the DGX H100 and DGX H200 (2 per system, DGX H100/H200 User Guide)
        # Xeon Platinum 8570 (Emerald Rapids): 350 W, 56 cores; the CPU of the DGX B200 (DGX B200 User Guide)
        CpuSpec(name="Intel Xeon Platinum 8570", tdp_w=350.0, cores=56, source="Intel ARK, Xeon Platinum 8570"),
        # Xeon 6980P (Granite Rapids): 500 W, 128 cores
        CpuSpec(name="Intel Xeon 6980P", tdp_w=500.0, cores=128, source="Intel ARK, Xeon 6980P"),
        # EPYC 9654 (Genoa): 360 W default TDP, 96 cores
        CpuSpec(name="AMD EPYC 9654", tdp_w=360.0, cores=96, source="AMD EPYC 9654 product page (amd.com)"),
        # EPYC 9965 (Turin dense): 500 W default TDP, 192 cores
        CpuSpec(name="AMD EPYC 9965", tdp_w=500.0, cores=192, source="AMD EPYC 9965 product page (amd.com)"),
        # Grace: 72 Arm Neoverse V2 cores; up to 500 W for the Grace CPU Superchip's two CPUs (144 cores)
        # including memory, so 250 W per CPU (NVIDIA Grace CPU Superchip datasheet)
        CpuSpec(name="NVIDIA Grace", tdp_w=250.0, cores=72, source="NVIDIA Grace CPU Superchip datasheet"),
    )
}


# ---- GPUs for planning a factory ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """One data-center GPU as deployed in its reference system, with units in the field names.

    `server_power_w_per_gpu` is the whole server's maximum power divided by its GPUs (CPUs, memory, NICs, fans
    and power-supply losses included); `system_capex_usd_per_gpu` is the all-in cluster hardware per GPU: the
    GPU, its share of the server, the scale-out network and storage (not the building, power and cooling).
    `j_per_token` is a default serving energy at the server level (server power / a cited throughput), used
    when this factory has measured nothing better; it is an estimate for one model and one benchmark.
    """

    name: str
    tdp_w: float
    bf16_dense_flops: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: float
    price_usd: float
    server_power_w_per_gpu: float
    system_capex_usd_per_gpu: float
    j_per_token: float
    source: str


# Default serving throughput: MLPerf Inference (datacenter, closed division) Llama 2 70B, Offline scenario,
# NVIDIA's submissions as NVIDIA reported them: 8x H100 SXM 21,806 tokens/s and 8x H200 31,712 tokens/s
# (v4.0, March 2024); 1x B200 11,264 tokens/s (v4.1, August 2024). J/token = server W per GPU / tokens/s per
# GPU at the server's maximum power, so an upper-end estimate for a 70B model; other models differ widely.
MLPERF_LLAMA2_70B_TOKENS_PER_S_PER_GPU = {"H100": 21_806 / 8, "H200": 31_712 / 8, "B200": 11_264.0}

_GPUS = (
    # H100 SXM5: up to 700 W, 989 TFLOP/s bf16 dense (1,979 with sparsity), 3.35 TB/s, 80 GB HBM3
    # (NVIDIA H100 Tensor Core GPU datasheet). DGX H100: ~10.2 kW max for 8 GPUs = 1,275 W per GPU
    # (NVIDIA DGX H100 User Guide, system specifications).
    # Price: $25,000-30,000 per H100 (Raymond James estimate, reported by Barron's, Aug 2023): estimate $27,500.
    # All-in capex (estimate): an 8-GPU HGX H100 server with its InfiniBand cards ~$310,000 (Thinkmate quote,
    # Aug 2024) = ~$39,000 per GPU, plus the InfiniBand switches, optics and cables (~$8,000-12,000 per GPU in
    # public cluster bills of materials, e.g. SemiAnalysis "AI Server Cost Analysis", May 2023) and storage
    # (~1-1.5% of spend, Bernstein, Oct 2025): ~$50,000 per GPU.
    GpuSpec(
        name="H100",
        tdp_w=700.0,
        bf16_dense_flops=989e12,
        memory_bandwidth_bytes_per_s=3.35e12,
        memory_bytes=80e9,
        price_usd=27_500.0,
        server_power_w_per_gpu=10_200.0 / 8,
        system_capex_usd_per_gpu=50_000.0,
        j_per_token=(10_200.0 / 8) / MLPERF_LLAMA2_70B_TOKENS_PER_S_PER_GPU["H100"],
        source="NVIDIA H100 datasheet; NVIDIA DGX H100 User Guide; Raymond James via Barron's (price, estimate); "
        "Thinkmate HGX H100 quote and SemiAnalysis AI Server Cost Analysis (capex, estimate); MLPerf Inference "
        "v4.0 Llama 2 70B Offline (J/token, estimate)",
    ),
    # H200 SXM: up to 700 W, same compute as H100 SXM (989 TFLOP/s bf16 dense), 4.8 TB/s, 141 GB HBM3e
    # (NVIDIA H200 Tensor Core GPU datasheet). DGX H200: ~10.2 kW max for 8 GPUs (NVIDIA DGX H200 datasheet).
    # Price and capex (estimates): ~$30,000-40,000 per H200 in 2024 press reports; capex = the H100 figure
    # plus the price difference, ~$57,500.
    GpuSpec(
        name="H200",
        tdp_w=700.0,
        bf16_dense_flops=989e12,
        memory_bandwidth_bytes_per_s=4.8e12,
        memory_bytes=141e9,
        price_usd=35_000.0,
        server_power_w_per_gpu=10_200.0 / 8,
        system_capex_usd_per_gpu=57_500.0,
        j_per_token=(10_200.0 / 8) / MLPERF_LLAMA2_70B_TOKENS_PER_S_PER_GPU["H200"],
        source="NVIDIA H200 datasheet; NVIDIA DGX H200 datasheet; 2024 press reports (price, capex: estimates); "
        "MLPerf Inference v4.0 Llama 2 70B Offline (J/token, estimate)",
    ),
    # B200 (HGX/DGX B200): 1,000 W; 36 PFLOP/s FP16/BF16 with sparsity per 8 GPUs = 2.25 PFLOP/s dense per GPU;
    # 64 TB/s and 1,440 GB HBM3e per 8 GPUs = 8 TB/s and 180 GB per GPU (NVIDIA HGX B200 and DGX B200
    # datasheets). DGX B200: ~14.3 kW max for 8 GPUs = 1,787.5 W per GPU (NVIDIA DGX B200 datasheet).
    # Price: "$30,000 to $40,000" (Jensen Huang to CNBC, March 2024): estimate $35,000. Capex (estimate): DGX
    # B200 list ~$515,000 in 2024 reseller listings = ~$64,000 per GPU, plus network and storage: ~$75,000.
    GpuSpec(
        name="B200",
        tdp_w=1_000.0,
        bf16_dense_flops=2.25e15,
        memory_bandwidth_bytes_per_s=8e12,
        memory_bytes=180e9,
        price_usd=35_000.0,
        server_power_w_per_gpu=14_300.0 / 8,
        system_capex_usd_per_gpu=75_000.0,
        j_per_token=(14_300.0 / 8) / MLPERF_LLAMA2_70B_TOKENS_PER_S_PER_GPU["B200"],
        source="NVIDIA HGX B200 and DGX B200 datasheets; Jensen Huang to CNBC, Mar 2024 (price, estimate); "
        "2024 reseller listings (capex, estimate); MLPerf Inference v4.1 Llama 2 70B Offline (J/token, estimate)",
    ),
    # GB200, per GPU of a GB200 NVL72 rack (72 GPUs, 36 Grace CPUs): 360 PFLOP/s FP16/BF16 with sparsity per rack
    # = 2.5 PFLOP/s dense per GPU; up to 13.4 TB HBM3e and 576 TB/s per rack = ~186 GB and 8 TB/s per GPU
    # (NVIDIA GB200 NVL72 product page); each GPU configurable up to 1,200 W (GB200 superchip up to 2,700 W for
    # two GPUs and one Grace). Rack power ~132 kW = 1,833 W per GPU (Vertiv/NVIDIA GB200 NVL72 reference
    # architecture, 2024). Price (estimate): ~$60,000-70,000 per GB200 superchip of two GPUs (HSBC, May 2024):
    # $35,000 per GPU. Capex (estimate): $3.4 million of compute hardware per NVL72 rack (Bernstein, Oct 2025)
    # = ~$47,200 per GPU. J/token (estimate): the B200's MLPerf throughput at this rack's power per GPU.
    GpuSpec(
        name="GB200",
        tdp_w=1_200.0,
        bf16_dense_flops=2.5e15,
        memory_bandwidth_bytes_per_s=576e12 / 72,
        memory_bytes=13.4e12 / 72,
        price_usd=35_000.0,
        server_power_w_per_gpu=132_000.0 / 72,
        system_capex_usd_per_gpu=3_400_000.0 / 72,
        j_per_token=(132_000.0 / 72) / MLPERF_LLAMA2_70B_TOKENS_PER_S_PER_GPU["B200"],
        source="NVIDIA GB200 NVL72 product page; Vertiv GB200 NVL72 reference architecture (rack power); HSBC "
        "(price, estimate); Bernstein, Oct 2025 (capex, estimate); MLPerf Inference v4.1 B200 (J/token, estimate)",
    ),
)
GPUS: dict[str, GpuSpec] = {g.name: g for g in _GPUS}


def gpu_spec(name: str) -> GpuSpec:
    """The catalog GPU of this name (case-insensitive); a ValueError listing the known names otherwise."""
    for key, spec in GPUS.items():
        if key.lower() == name.strip().lower():
            return spec
    raise ValueError(f"unknown GPU {name!r}: known GPUs are {', '.join(GPUS)}")


# ---- facilities -----------------------------------------------------------------------------------------------

# PUE of a new AI facility (estimate): hyperscale fleets report ~1.1 (Google 2024 Environmental Report: fleet
# PUE 1.10 in 2023); the industry average is ~1.56 (Uptime Institute Global Data Center Survey 2024). Liquid-
# cooled AI builds sit near the low end; 1.2 leaves room for climate and partial load.
FACILITY_PUE = 1.2

# Building, power and cooling capex per W of facility power (estimate): Bernstein (Oct 2025) puts a GB200 NVL72
# rack at $5.9 million all-in, $2.5 million of it physical infrastructure, and 1 GW at ~$35 billion, i.e.
# 35e9 / 5.9e6 = 5,932 racks per GW; 5,932 * $2.5 million = $14.8 billion per GW = $14.8 per W.
FACILITY_CAPEX_USD_PER_W = 35e9 / 5.9e6 * 2.5e6 / 1e9

# Hardware is written off over 5 years (estimate): Amazon shortened the useful life of part of its servers
# from 6 to 5 years in 2025 (Amazon Q4 2024 earnings), Meta uses 5.5 years (Meta 2024 10-K); GPUs are often
# thought to age faster, so 5 years is the generous end. Buildings and power plant: 20 years (estimate; US GAAP
# practice for data-center shells and electrical plant runs 15-40 years).
HARDWARE_AMORTIZATION_YEARS = 5.0
FACILITY_AMORTIZATION_YEARS = 20.0

# Average annual electricity use of a US home: 10,791 kWh in 2022 (U.S. EIA FAQ "How much electricity does an
# American home use?": 10,791 kWh per residential customer, about 899 kWh a month).
US_HOME_KWH_PER_YEAR = 10_791.0


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
