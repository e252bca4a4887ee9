"""DCGM's profiling counters (DRAM active, SM active, ...) for GPUs whose NVML has no GPM: L4, A100, and Hopper
while DCGM holds the counters GPM would read.

NVML's GPM gives true DRAM bandwidth on Hopper and newer only. On Ampere and Ada datacenter GPUs the same
figures come from DCGM's profiling module, as fields 1002-1012 (``DCGM_FI_PROF_*``); and on a Hopper where DCGM
runs, DCGM holds the profiling counters and GPM fails, so DCGM's values are the ones to show. DRAM active (field
1005) is the ratio of cycles the memory interface moved data; times the GPU's peak it is GB/s.

Two ways to read them, both local and both read-only by default: **dcgm-exporter's page**
(:mod:`~tuner.telemetry.dcgm.exporter_page`) and **nv-hostengine through DCGM's own Python bindings**
(:mod:`~tuner.telemetry.dcgm.hostengine`). The package, one concept per module: :mod:`~tuner.telemetry.dcgm.model`
(what is read, where from, and the checks on every value), those two, :mod:`~tuner.telemetry.dcgm.processes`
(the DCGM processes on this machine and where they listen) and :mod:`~tuner.telemetry.dcgm.watcher` (the thread
that finds DCGM and reads it); this module puts the readings onto the GPU samples (:func:`apply_dcgm`).

**Fresh or stale.** A value's age is the time since DCGM sampled it (hostengine timestamps) or, from the
exporter, which gives none, since infertop read the page. It is stale, and not shown, past
max(3 x DCGM's sampling interval, 90 s); :func:`stale_after_s`.

**MIG.** On a GPU split by MIG, dcgm-exporter (in its default flex mode) writes one series per GPU instance,
with its parent's ``gpu`` and ``UUID``, and none for the whole GPU (internal/pkg/devicemonitoring). Those are
kept in the reading (``gpu_instance_id`` set) but never combined into a whole-GPU figure: what share of the
GPU's memory bandwidth each instance's figure stands for is not on the page. Such a GPU gets no DCGM figures on
its card, and the status says why. The hostengine is asked for whole GPUs only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from tuner.telemetry.dcgm.exporter_page import ExporterPage, ExporterSource, mig_note, parse_exporter_page
from tuner.telemetry.dcgm.hostengine import (
    BINDINGS_ENV,
    DCGM_FP64_BLANK,
    DCGM_INT64_BLANK,
    DcgmBindings,
    HostengineSource,
    load_bindings,
)
from tuner.telemetry.dcgm.model import (
    FIELD_IDS,
    FIELDS,
    MAX_ENTRIES,
    DcgmField,
    DcgmGpuValues,
    DcgmReading,
    DcgmSpec,
    parse_dcgm_spec,
)
from tuner.telemetry.dcgm.processes import (
    DcgmProcess,
    exporter_settings,
    find_dcgm_processes,
    hostengine_endpoint,
)
from tuner.telemetry.dcgm.watcher import DcgmWatcher
from tuner.telemetry.model import GpuInfo, GpuSample

__all__ = [
    "BINDINGS_ENV",
    "DCGM_FP64_BLANK",
    "DCGM_INT64_BLANK",
    "FIELDS",
    "FIELD_IDS",
    "MAX_ENTRIES",
    "STALE_AFTER_MIN_S",
    "DcgmBindings",
    "DcgmField",
    "DcgmGpuValues",
    "DcgmProcess",
    "DcgmReading",
    "DcgmSpec",
    "DcgmWatcher",
    "ExporterPage",
    "ExporterSource",
    "HostengineSource",
    "apply_dcgm",
    "dcgm_age_s",
    "exporter_settings",
    "find_dcgm_processes",
    "hostengine_endpoint",
    "load_bindings",
    "mig_note",
    "parse_dcgm_spec",
    "parse_exporter_page",
    "stale_after_s",
]

STALE_AFTER_MIN_S = 90.0


def stale_after_s(reading: DcgmReading) -> float:
    """How old DCGM's values may be and still be shown: three of DCGM's sampling intervals, at least 90 s
    (dcgm-exporter's default 30 s interval times three)."""
    if reading.interval_s is None:
        return STALE_AFTER_MIN_S
    return max(3.0 * reading.interval_s, STALE_AFTER_MIN_S)


def dcgm_age_s(reading: DcgmReading, values: DcgmGpuValues, now_s: float) -> float:
    """How old ``values`` may be at ``now_s``, at most: since DCGM sampled them where it says (hostengine
    timestamps); else (dcgm-exporter gives no times) since infertop read the page plus one of DCGM's sampling
    intervals, where it is known. An upper bound is what a reader needs: the tuner drops a reading that may
    come from before its phase began (tuner.measure)."""
    if values.sampled_at_s is not None:
        return max(0.0, now_s - values.sampled_at_s)
    return max(0.0, now_s - reading.time_s) + (reading.interval_s or 0.0)


def apply_dcgm(
    gpus: tuple[GpuSample, ...], infos: Sequence[GpuInfo], reading: DcgmReading | None, now_s: float
) -> tuple[GpuSample, ...]:
    """``gpus`` with DCGM's profiling figures where NVML's GPM gave none.

    Only samples without ``error`` and without a DRAM figure of their own are touched (GPM's figures win).
    DCGM's values are matched by UUID, by index only where DCGM names no UUID; whole GPUs only (a MIG GPU's
    per-instance figures are not combined); fresh only (:func:`stale_after_s`). PCIe and NVLink rates are
    filled only where NVML left them None."""
    if reading is None or not reading.gpus:
        return gpus
    # DRAM active is the figure DCGM stands in for: without it, a GPU's other DCGM fields (PCIe bytes alone) do
    # not make its card read as measured.
    whole = [v for v in reading.gpus if v.gpu_instance_id is None and v.dram_active is not None]
    by_uuid = {v.uuid: v for v in whole if v.uuid}
    by_index = {v.index: v for v in whole if not v.uuid and v.index is not None}
    uuid_of = {info.index: info.uuid for info in infos}
    peak_of = {info.index: info.peak_dram_bw_gbps for info in infos}
    limit_s = stale_after_s(reading)
    out = []
    for sample in gpus:
        values = None
        if sample.error is None and sample.dram_bw_util_pct is None and sample.profiling_source != "gpm":
            values = by_uuid.get(uuid_of.get(sample.index) or "") or by_index.get(sample.index)
        age_s = dcgm_age_s(reading, values, now_s) if values is not None else math.inf
        if values is None or age_s > limit_s:
            out.append(sample)
            continue
        out.append(_with_dcgm(sample, values, peak_of.get(sample.index), age_s))
    return tuple(out)


def _pct(ratio: float | None, otherwise: float | None) -> float | None:
    return otherwise if ratio is None else 100.0 * ratio


def _with_dcgm(sample: GpuSample, values: DcgmGpuValues, peak_gbps: float | None, age_s: float) -> GpuSample:
    dram = values.dram_active
    rates = {
        name: getattr(values, name)
        for name in (
            "pcie_tx_bytes_per_s",
            "pcie_rx_bytes_per_s",
            "nvlink_tx_bytes_per_s",
            "nvlink_rx_bytes_per_s",
        )
        if getattr(sample, name) is None and getattr(values, name) is not None
    }
    return dataclasses.replace(
        sample,
        dram_bw_util_pct=_pct(dram, None),
        dram_bw_gbps=dram * peak_gbps if dram is not None and peak_gbps else None,
        sm_active_pct=_pct(values.sm_active, sample.sm_active_pct),
        sm_occupancy_pct=_pct(values.sm_occupancy, sample.sm_occupancy_pct),
        tensor_active_pct=_pct(values.tensor_active, sample.tensor_active_pct),
        profiling_source="dcgm",
        profiling_age_s=age_s,
        **rates,
    )
