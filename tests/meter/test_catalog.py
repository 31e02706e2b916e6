import pytest

from aifab.meter.catalog import (
    FACILITY_CAPEX_USD_PER_W,
    GPUS,
    SERVER_CPUS,
    gpu_peak_flops,
    gpu_spec,
)


def test_gpu_spec_is_case_insensitive() -> None:
    assert gpu_spec("h100") is GPUS["H100"]
    assert gpu_spec(" GB200 ").name == "GB200"


def test_unknown_gpu_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="unknown GPU 'V100'") as e:
        gpu_spec("V100")
    for name in ("H100", "H200", "B200", "GB200"):
        assert name in str(e.value)


def test_catalog_figures_match_the_datasheets() -> None:
    h100 = gpu_spec("H100")
    assert h100.server_power_w_per_gpu == 1275.0  # DGX H100: 10.2 kW for 8 GPUs
    assert h100.bf16_dense_flops == gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_spec("H200").memory_bytes == 141e9 and gpu_spec("H200").memory_bandwidth_bytes_per_s == 4.8e12
    assert gpu_spec("B200").bf16_dense_flops == 2.25e15  # 36 PFLOP/s sparse per 8 GPUs, halved
    assert gpu_spec("GB200").server_power_w_per_gpu == pytest.approx(132_000 / 72)


def test_every_row_is_sourced_and_consistent() -> None:
    for g in GPUS.values():
        assert "NVIDIA" in g.source and "estimate" in g.source  # datasheets named; estimates flagged
        assert g.server_power_w_per_gpu > g.tdp_w  # the server adds CPUs, memory, fans and PSU losses
        assert g.system_capex_usd_per_gpu > g.price_usd  # all-in adds the server share, network and storage
        assert 0.05 < g.j_per_token < 1.0
    for c in SERVER_CPUS.values():
        assert c.source and c.tdp_w > 0 and c.cores > 0
    assert SERVER_CPUS["AMD EPYC 9654"].cores == 96


def test_facility_capex_is_bernsteins_split() -> None:
    """$35 B per GW at $5.9 M per NVL72 rack = 5,932 racks; $2.5 M of each is building, power and cooling."""
    assert round(FACILITY_CAPEX_USD_PER_W, 2) == 14.83
