"""What infertop reads from DCGM, in types every part of :mod:`tuner.telemetry.dcgm` shares: the profiling
fields (fields 1002-1012, ``DCGM_FI_PROF_*``), one GPU's values, one reading, where to read (``--dcgm``), and
the checks every value passes on its way in.

Everything read is foreign data: ratios kept only within 0-1 (a hair of overshoot clipped), byte rates finite
and >= 0 (:func:`checked_value`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tuner.redact import redact_url
from tuner.telemetry.foreign import BadValue, checked_number


@dataclass(frozen=True)
class DcgmField:
    """One DCGM profiling field, as infertop reads it."""

    attr: str  # the DcgmGpuValues attribute it fills
    field_id: int  # dcgm_fields.h
    names: tuple[str, ...]  # its metric names on a dcgm-exporter page
    ratio: bool  # a 0-1 ratio (double); else bytes per second (int64)
    words: str  # for people


# Field ids from DCGM's dcgmlib/dcgm_fields.h. DCGM 4.6 renamed the fields (DCGM_FI_PROF_DRAM_ACTIVE became
# DCGM_FI_PROF_DRAM_UTIL_RATIO, the old names stay as aliases: testing/python3/dcgm_fields.py), so a counters
# CSV may use either; ids are the same in every release, which is why the bindings are asked by number.
# PCIe and NVLink bytes are rates in bytes per second (dcgm-exporter's etc/default-counters.csv help text; the
# cumulative counters are other fields, DCGM_FI_PROF_PCIE_TX_BYTES_TOTAL = 1091 and on).
FIELDS: tuple[DcgmField, ...] = (
    DcgmField("sm_active", 1002, ("DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_SM_UTIL_RATIO"), True, "SM active"),
    DcgmField(
        "sm_occupancy",
        1003,
        ("DCGM_FI_PROF_SM_OCCUPANCY", "DCGM_FI_PROF_SM_OCCUPANCY_RATIO"),
        True,
        "SM occupancy",
    ),
    DcgmField(
        "tensor_active",
        1004,
        ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_TENSOR_UTIL_RATIO"),
        True,
        "tensor active",
    ),
    DcgmField(
        "dram_active", 1005, ("DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_DRAM_UTIL_RATIO"), True, "DRAM active"
    ),
    DcgmField("pcie_tx_bytes_per_s", 1009, ("DCGM_FI_PROF_PCIE_TX_BYTES",), False, "PCIe TX"),
    DcgmField("pcie_rx_bytes_per_s", 1010, ("DCGM_FI_PROF_PCIE_RX_BYTES",), False, "PCIe RX"),
    DcgmField("nvlink_tx_bytes_per_s", 1011, ("DCGM_FI_PROF_NVLINK_TX_BYTES",), False, "NVLink TX"),
    DcgmField("nvlink_rx_bytes_per_s", 1012, ("DCGM_FI_PROF_NVLINK_RX_BYTES",), False, "NVLink RX"),
)
FIELD_IDS: tuple[int, ...] = tuple(f.field_id for f in FIELDS)
DRAM_ACTIVE = next(f for f in FIELDS if f.attr == "dram_active")

HOSTENGINE_PORT = 5555  # dcgmlib/dcgm_structs.h DCGM_HE_PORT_NUMBER; nv-hostengine -p
MAX_ENTRIES = 1024  # GPUs and GPU instances kept from one page (8 GPUs x 7 instances is 56)
_RATIO_OVERSHOOT = 0.02  # counters read a hair over 1 (1.0004); anything past this is not a ratio


@dataclass(frozen=True)
class DcgmGpuValues:
    """DCGM's latest profiling values of one GPU (or one MIG GPU instance); None where DCGM gave none."""

    uuid: str | None
    index: int | None  # dcgm-exporter's gpu label or DCGM's gpuId: NVML's index in practice, not promised
    dram_active: float | None  # 0-1
    sm_active: float | None  # 0-1
    sm_occupancy: float | None  # 0-1
    tensor_active: float | None  # 0-1
    pcie_tx_bytes_per_s: float | None
    pcie_rx_bytes_per_s: float | None
    nvlink_tx_bytes_per_s: float | None
    nvlink_rx_bytes_per_s: float | None
    sampled_at_s: float | None  # wall time DCGM took them where known (hostengine timestamps), else None
    gpu_instance_id: int | None = None  # MIG: the GPU instance these are for (GPU_I_ID); None: the whole GPU
    mig_profile: str | None = None  # MIG: e.g. "3g.40gb"

    def has_values(self) -> bool:
        return any(getattr(self, f.attr) is not None for f in FIELDS)


@dataclass(frozen=True)
class DcgmReading:
    """What one read of DCGM gave, for every GPU it knows."""

    time_s: float  # when infertop read it
    via: str  # "dcgm-exporter at http://127.0.0.1:9400/metrics" / "nv-hostengine at 127.0.0.1:5555"
    interval_s: float | None  # DCGM's own sampling interval for these fields, where known
    gpus: tuple[DcgmGpuValues, ...]
    status: str  # one line for people: "DCGM via dcgm-exporter at ..., sampled every 30 s" or why nothing
    error: str | None = None


@dataclass(frozen=True)
class DcgmSpec:
    """Where to read DCGM: ``kind`` "auto", "off", "exporter" (``url``) or "hostengine" (``address`` or
    ``unix_socket``)."""

    kind: str
    url: str | None = None
    address: str | None = None  # "HOST:PORT"
    unix_socket: str | None = None


_SPEC_FORMS = (
    "auto, off, an http(s):// URL of a dcgm-exporter page, hostengine, hostengine:HOST:PORT "
    "or hostengine:unix:PATH"
)


def parse_dcgm_spec(text: str) -> DcgmSpec:
    """``--dcgm``'s value as a :class:`DcgmSpec`. Raises ValueError in words for anything else.

    Forms: ``auto`` (the default: look for a hostengine, then a dcgm-exporter), ``off``, ``http://HOST:PORT``
    (``/metrics`` added when the URL has no path), ``hostengine`` (127.0.0.1:5555), ``hostengine:HOST:PORT``
    (``hostengine:[::1]:5555``) and ``hostengine:unix:PATH`` (nv-hostengine -d)."""
    raw = text.strip()
    shown = redact_url(raw)
    low = raw.lower()
    if low in ("", "auto"):
        return DcgmSpec("auto")
    if low == "off":
        return DcgmSpec("off")
    if low.startswith(("http://", "https://")):
        try:
            url = httpx.URL(raw)
        except (httpx.InvalidURL, ValueError):
            raise ValueError(f"--dcgm {shown!r}: not a URL it can read") from None
        if not url.host:
            raise ValueError(f"--dcgm {shown!r}: the URL names no host")
        if url.path in ("", "/"):
            url = url.copy_with(path="/metrics")
        return DcgmSpec("exporter", url=str(url))
    if low == "hostengine":
        return DcgmSpec("hostengine", address=f"127.0.0.1:{HOSTENGINE_PORT}")
    if low.startswith("hostengine:unix:"):
        path = raw[len("hostengine:unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"--dcgm {shown!r}: a Unix socket is named by its absolute path")
        return DcgmSpec("hostengine", unix_socket=path)
    if low.startswith("hostengine:"):
        host, port = host_port(raw[len("hostengine:") :])
        if host is None or port is None:
            raise ValueError(f"--dcgm {shown!r}: hostengine:HOST:PORT needs a host and a port (1-65535)")
        return DcgmSpec("hostengine", address=f"{host}:{port}")
    raise ValueError(f"--dcgm {shown!r}: not {_SPEC_FORMS}")


def host_port(text: str) -> tuple[str | None, int | None]:
    """("host" or "[v6]", port) of ``HOST:PORT`` / ``[V6]:PORT``; Nones where either is missing or bad."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        return None, None
    if host.startswith("[") != host.endswith("]") or ("[" not in host and ":" in host):
        return None, None
    return (host or None), int(port_text)


def checked_value(field: DcgmField, raw: object) -> float | None:
    """A DCGM value as infertop keeps it: a ratio within 0-1 (a hair of overshoot clipped) or a finite byte
    rate >= 0; None for anything else (NaN, infinities, blanks, a ratio of 7)."""
    try:
        value = float(raw) if isinstance(raw, str) else raw
        if field.ratio:
            number = checked_number(value, "ratio")
            if not -_RATIO_OVERSHOOT <= number <= 1.0 + _RATIO_OVERSHOOT:
                return None
            return min(1.0, max(0.0, number))
        return checked_number(value, field.attr)
    except (BadValue, ValueError, OverflowError):
        return None


def gpu_values(entry: Mapping[str, Any], sampled_at_s: float | None) -> DcgmGpuValues:
    """One GPU's (or GPU instance's) values from ``entry``: its ``uuid``, ``index``, ``gpu_instance_id``,
    ``mig_profile`` and the field attributes it has, each already through :func:`checked_value`."""
    return DcgmGpuValues(
        uuid=entry.get("uuid"),
        index=entry.get("index"),
        sampled_at_s=sampled_at_s,
        gpu_instance_id=entry.get("gpu_instance_id"),
        mig_profile=entry.get("mig_profile"),
        **{f.attr: entry.get(f.attr) for f in FIELDS},
    )


def every_words(interval_s: float) -> str:
    """A sampling interval for people: "30 s", "500 ms"."""
    return f"{interval_s:g} s" if interval_s >= 1 else f"{interval_s * 1000:g} ms"
