"""The known-GPU table and the derived peak bandwidth."""

from __future__ import annotations

import pytest

from tuner.telemetry import gpus


@pytest.mark.parametrize(
    ("nvml_name", "model", "peak_gbps"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350),
        ("NVIDIA H100 PCIe", "H100 PCIe", 2000),
        ("NVIDIA H100 NVL", "H100 NVL", 3900),
        ("NVIDIA H200", "H200 SXM", 4800),
        ("NVIDIA H200 NVL", "H200 NVL", 4800),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 2039),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1935),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB SXM", 1555),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe", 1555),
        ("NVIDIA L4", "L4", 300),
        ("NVIDIA L40S", "L40S", 864),
        ("NVIDIA L40", "L40", 864),
        ("NVIDIA A10", "A10", 600),
        ("NVIDIA A10G", "A10G", 600),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090", 1008),
        ("NVIDIA B200", "B200", 8000),
        ("Tesla T4", "T4", 320),
    ],
)
def test_real_nvml_names_find_their_model(nvml_name: str, model: str, peak_gbps: float) -> None:
    known = gpus.lookup(nvml_name)
    assert known is not None
    assert known.model == model
    assert gpus.peak_dram_bw(nvml_name, None, None) == (peak_gbps, "datasheet")


def test_nested_names_do_not_shadow_each_other() -> None:
    # "A10" is a substring of "A100" and "L4" of "L40S": plain substring matching would get these wrong.
    a10 = gpus.lookup("NVIDIA A10")
    a100 = gpus.lookup("NVIDIA A100-SXM4-80GB")
    l4 = gpus.lookup("NVIDIA L4")
    l40s = gpus.lookup("NVIDIA L40S")
    assert a10 is not None and a100 is not None and l4 is not None and l40s is not None
    assert a10.model == "A10" and a100.model == "A100 80GB SXM"
    assert l4.memory_gb == 24 and l40s.memory_gb == 48


def test_lookup_ignores_case_and_rejects_unknown_names() -> None:
    h100 = gpus.lookup("nvidia h100 80gb hbm3")
    assert h100 is not None and h100.tdp_w == 700
    assert gpus.lookup("NVIDIA Mystery Accelerator") is None
    assert gpus.lookup("") is None


def test_unknown_gpu_gets_bandwidth_derived_from_bus_width_and_memory_clock() -> None:
    gbps, source = gpus.peak_dram_bw("NVIDIA Mystery Accelerator", 4096, 3000)
    assert source == "derived"
    assert gbps == pytest.approx(4096 * 3000e6 * 2 / 8 / 1e9)  # 3072 GB/s


def test_unknown_gpu_without_bus_facts_has_no_peak() -> None:
    assert gpus.peak_dram_bw("NVIDIA Mystery Accelerator", None, 3000) == (None, None)
    assert gpus.peak_dram_bw("NVIDIA Mystery Accelerator", 4096, 0) == (None, None)


@pytest.mark.parametrize(
    ("nvml_name", "bus_width_bits", "mem_clock_max_mhz"),
    [
        ("NVIDIA H100 80GB HBM3", 5120, 2619),  # HBM3
        ("NVIDIA A100-SXM4-80GB", 5120, 1593),  # HBM2e
        ("NVIDIA L4", 192, 6251),  # GDDR6
        ("NVIDIA GeForce RTX 4090", 384, 10501),  # GDDR6X
    ],
)
def test_derivation_agrees_with_datasheets_for_nvml_reported_clocks(
    nvml_name: str, bus_width_bits: int, mem_clock_max_mhz: int
) -> None:
    # The double-data-rate assumption holds for HBM and GDDR alike with the clocks NVML reports.
    datasheet, _ = gpus.peak_dram_bw(nvml_name, None, None)
    derived = gpus.derived_dram_bw_gbps(bus_width_bits, mem_clock_max_mhz)
    assert datasheet is not None and derived is not None
    assert derived == pytest.approx(datasheet, rel=0.01)


@pytest.mark.parametrize(
    ("cc", "fp8"),
    [((7, 5), False), ((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)],
)
def test_fp8_needs_compute_capability_8_9(cc: tuple[int, int], fp8: bool) -> None:
    assert gpus.fp8_supported(cc) is fp8


def test_table_fp8_flags_match_the_architectures() -> None:
    # Ampere and Turing have no FP8 tensor cores; Ada, Hopper and Blackwell do.
    without_fp8 = {g.model for g in gpus.KNOWN_GPUS if not g.fp8}
    assert without_fp8 == {
        "A100 80GB PCIe",
        "A100 80GB SXM",
        "A100 40GB PCIe",
        "A100 40GB SXM",
        "A10G",
        "A10",
        "A30",
        "A40",
        "GeForce RTX 3090",
        "T4",
    }
