"""Known NVIDIA GPUs: datasheet peak DRAM bandwidth, memory, FP8 support and board power.

NVML reports a GPU's name but not its peak memory bandwidth, and GPM's DRAM_BW_UTIL is a percentage of that
peak. The table gives the vendor's figure for common inference GPUs; for anything else the peak is derived
from what NVML does report (memory bus width and maximum memory clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KnownGpu:
    """Datasheet figures for one GPU model."""

    pattern: str  # regular expression searched in the NVML name, case-insensitive
    model: str  # how people name it
    peak_dram_bw_gbps: float  # GB/s, 1e9 bytes/s
    memory_gb: float | None  # marketing GB as on the datasheet; None where variants differ
    fp8: bool  # hardware FP8 tensor cores (compute capability >= 8.9)
    tdp_w: float | None  # default board power; None where variants differ


# Order matters: the first match wins, so a specific variant ("H100 NVL") comes before its family ("H100").
# Patterns use word boundaries because NVML names nest: "A10" is inside "A100", "L4" inside "L40S".
# NVML names seen: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB",
# "NVIDIA A100 80GB PCIe", "NVIDIA L4", "NVIDIA GeForce RTX 4090", "Tesla T4".
KNOWN_GPUS: tuple[KnownGpu, ...] = (
    KnownGpu(r"\bB200\b", "B200", 8000, 180, True, 1000),
    KnownGpu(r"\bH200 NVL\b", "H200 NVL", 4800, 141, True, 600),
    KnownGpu(r"\bH200\b", "H200 SXM", 4800, 141, True, 700),
    KnownGpu(r"\bH100 NVL\b", "H100 NVL", 3900, 94, True, 400),
    KnownGpu(r"\bH100 PCIe\b", "H100 PCIe", 2000, 80, True, 350),
    KnownGpu(r"\bH100\b", "H100 SXM", 3350, 80, True, 700),
    KnownGpu(r"\bA100\b.*\b80GB PCIe\b", "A100 80GB PCIe", 1935, 80, False, 300),
    KnownGpu(r"\bA100\b.*\b80GB\b", "A100 80GB SXM", 2039, 80, False, 400),
    KnownGpu(r"\bA100-PCIE-40GB\b", "A100 40GB PCIe", 1555, 40, False, 250),
    KnownGpu(r"\bA100\b", "A100 40GB SXM", 1555, 40, False, 400),
    KnownGpu(r"\bL40S\b", "L40S", 864, 48, True, 350),
    KnownGpu(r"\bL40\b", "L40", 864, 48, True, 300),
    KnownGpu(r"\bL4\b", "L4", 300, 24, True, 72),
    KnownGpu(r"\bA10G\b", "A10G", 600, 24, False, None),
    KnownGpu(r"\bA10\b", "A10", 600, 24, False, 150),
    KnownGpu(r"\bA30\b", "A30", 933, 24, False, 165),
    KnownGpu(r"\bA40\b", "A40", 696, 48, False, 300),
    KnownGpu(r"\bRTX 6000 Ada\b", "RTX 6000 Ada", 960, 48, True, 300),
    KnownGpu(r"\bRTX 5090\b", "GeForce RTX 5090", 1792, 32, True, 575),
    KnownGpu(r"\bRTX 4090\b", "GeForce RTX 4090", 1008, 24, True, 450),
    KnownGpu(r"\bRTX 3090\b", "GeForce RTX 3090", 936, 24, False, 350),
    KnownGpu(r"\bT4\b", "T4", 320, 16, False, 70),
)

_COMPILED = tuple((re.compile(g.pattern, re.IGNORECASE), g) for g in KNOWN_GPUS)


def lookup(name: str) -> KnownGpu | None:
    """The table entry for an NVML device name, or None for a GPU the table does not know."""
    for pattern, gpu in _COMPILED:
        if pattern.search(name):
            return gpu
    return None


def derived_dram_bw_gbps(bus_width_bits: int | None, mem_clock_max_mhz: int | None) -> float | None:
    """Peak DRAM bandwidth from NVML's memory bus width and maximum memory clock, in GB/s.

    Assumes two transfers per reported memory clock per pin (double data rate). NVML reports memory clocks
    so that this holds for both HBM and GDDR: H100 SXM 5120 bit x 2619 MHz -> 3352 GB/s, A100 80GB
    5120 x 1593 -> 2039, L4 192 x 6251 -> 300, RTX 4090 384 x 10501 -> 1008, all matching the datasheets.
    """
    if not bus_width_bits or not mem_clock_max_mhz:
        return None
    bytes_per_s = bus_width_bits * mem_clock_max_mhz * 1e6 * 2 / 8
    return bytes_per_s / 1e9


def peak_dram_bw(
    name: str, bus_width_bits: int | None, mem_clock_max_mhz: int | None
) -> tuple[float | None, str | None]:
    """Peak DRAM bandwidth in GB/s and where it came from: ("datasheet" | "derived" | None)."""
    known = lookup(name)
    if known is not None:
        return float(known.peak_dram_bw_gbps), "datasheet"
    derived = derived_dram_bw_gbps(bus_width_bits, mem_clock_max_mhz)
    if derived is not None:
        return derived, "derived"
    return None, None


def fp8_supported(compute_capability: tuple[int, int]) -> bool:
    """Whether the GPU has FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer; not Ampere (8.0/8.6)."""
    return compute_capability >= (8, 9)
