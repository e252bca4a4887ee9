"""Readings from another machine, checked at the edge: what reaches the screen is well typed, finite and bounded.

An exporter's ``/snapshot.json`` is the :func:`tuner.telemetry.model.to_jsonable` form of a machine and a
:class:`Snapshot`. Read back from elsewhere it is data, not a promise: any field may hold the wrong type,
infinity or NaN (JSON's ``1e999`` and ``NaN`` parse), a negative or absurd amount, control characters, or a
string of a megabyte. Each field is checked on its own against its annotation and a range for its unit; a bad
one becomes None (shown n/a) with a one-line reason, so one broken figure costs that figure, not the host. Only
what a record cannot exist without (a GPU's index, a process's pid, an inference server's URL) leaves that
record out; only a snapshot without a valid time refuses the page.

The checks follow the dataclasses' own annotations, so a field added to the model is checked without a change
here; its range comes from its name's unit suffix (``_bytes``, ``_pct``, ``_w``...).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from tuner.telemetry.model import (
    EngineSample,
    GpuInfo,
    GpuSample,
    GpuState,
    HostSample,
    Snapshot,
    SystemInfo,
)

MAX_TEXT = 256
"""The longest text kept from a foreign field (a name, a label, an error line); longer is cut."""
MAX_ITEMS = 1024
"""The most items kept from a foreign list (processes on a GPU, reasons, pids)."""
MAX_GPUS = 256
MAX_ENGINES = 64

# Ranges by field name first, then by the unit its name ends in (longest first). Generous: they refuse what
# no machine reads (1e300 W, -5 bytes, a pid of 2**64), not what is merely unusual.
_NAMED_RANGES: dict[str, tuple[float, float]] = {
    "time_s": (0.0, 1e11),  # epoch seconds, past year 5000
    "index": (0, 65535),
    "gpu_index": (0, 65535),
    "pid": (0, 2**32),
    "server_pids": (0, 2**32),
    "cpu_pct": (0.0, 1e5),  # a process's CPU % counts every core it runs on
    "cpu_count": (0, 1e6),
    "pstate": (0, 32),
    "nvlink_links": (0, 1024),
    "pcie_gen_max": (0, 64),
    "pcie_width_max": (0, 1024),
    "compute_capability": (0, 1000),
    "local_cpus": (0, 1e6),
    "requests_running": (0.0, 1e9),
    "requests_waiting": (0.0, 1e9),
    "kv_cache_blocks": (0, 1e12),
    "kv_block_size_tokens": (0, 1e6),
}
PROFILING_SOURCES = frozenset({"gpm", "dcgm"})
"""What may have measured a GPU's profiling figures; anything else read from elsewhere is dropped."""
_UNIT_RANGES: tuple[tuple[str, tuple[float, float]], ...] = (
    ("_bytes_per_s", (0.0, 1e15)),
    ("_per_s", (0.0, 1e12)),
    ("_bytes", (0, 2**53)),  # exact in a float, and past any machine's memory
    ("_pct", (0.0, 200.0)),  # a share, with room for counters that overshoot 100
    ("_w", (0.0, 1e6)),
    ("_j", (0.0, 1e18)),
    ("_s", (0.0, 1e9)),  # durations and ages
    ("_c", (-100.0, 300.0)),
    ("_mhz", (0, 1e6)),
    ("_gbps", (0.0, 1e7)),
    ("_total", (0.0, 1e18)),
    ("_1m", (0.0, 1e6)),
    ("_5m", (0.0, 1e6)),
    ("_15m", (0.0, 1e6)),
)
_ANY_RANGE = (-1e15, 1e15)


def value_range(name: str) -> tuple[float, float]:
    """The values a number named ``name`` may take."""
    if name in _NAMED_RANGES:
        return _NAMED_RANGES[name]
    for suffix, bounds in _UNIT_RANGES:
        if name.endswith(suffix):
            return bounds
    return _ANY_RANGE


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """One line of printable characters, at most ``limit`` of them (then "…"): foreign text can neither move
    the terminal's cursor nor fill the screen."""
    kept = "".join(c if c.isprintable() else (" " if c.isspace() else "?") for c in text[:limit])
    return kept + "…" if len(text) > limit else kept


class Problems:
    """Why fields were left out: every one counted, the first few kept in words."""

    def __init__(self, keep: int = 8) -> None:
        self.count = 0
        self.first: list[str] = []
        self._keep = keep

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.first) < self._keep:
            self.first.append(f"{where}: {why}")


class BadValue(ValueError):
    """One value that cannot stand; its message says why in a few words."""


def checked_number(raw: object, name: str, kind: type = float) -> float:
    """``raw`` as a finite ``kind`` (int or float) within the range of ``name``. Raises :class:`BadValue`."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise BadValue("not a number")
    try:
        value = float(raw)
    except OverflowError:
        raise BadValue("out of range") from None
    if not math.isfinite(value):
        raise BadValue(f"not finite ({value})")
    lo, hi = value_range(name)
    if not lo <= value <= hi:
        raise BadValue(f"out of range ({value:.4g})")
    if kind is int:
        if not value.is_integer():
            raise BadValue("not a whole number")
        return raw if isinstance(raw, int) else int(value)
    return value


def checked_record(
    cls: type, raw: object, where: str, problems: Problems, fallbacks: Mapping[str, Any]
) -> Any:
    """``raw`` (a JSON object) as a ``cls`` dataclass, field by field; None (with the reason) when a field it
    cannot exist without is missing or bad and ``fallbacks`` has no stand-in for it.

    What stands in for a missing or bad field: None where the field allows it, else its default, else the
    fallback of its name."""
    if not isinstance(raw, dict):
        problems.add(where, "not an object: left out")
        return None
    values: dict[str, Any] = {}
    for name, kind, optional, has_default in _fields(cls):
        why = None if name in raw and raw[name] is not None else "missing"
        if why is None:
            try:
                values[name] = _value(kind, raw[name], name, f"{where}.{name}", problems, fallbacks)
                continue
            except BadValue as bad:
                why = str(bad)
        if optional:
            values[name] = None
        elif not has_default and name not in fallbacks:
            problems.add(where, f"{name} {why}: left out")
            return None
        elif not has_default:
            values[name] = fallbacks[name]
        if why != "missing" or not (optional or has_default):  # an absent None is how None travels
            problems.add(f"{where}.{name}", why)
    return cls(**values)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool, bool], ...]:
    """(name, type without None, None allowed, has a default) of each field a foreign page may fill."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is dict:  # free-form extras: never read from elsewhere
            continue
        args = typing.get_args(kind)
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            (kind,) = [a for a in args if a is not type(None)]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        out.append((f.name, kind, optional, has_default))
    return tuple(out)


def _value(
    kind: Any, raw: object, name: str, where: str, problems: Problems, fallbacks: Mapping[str, Any]
) -> Any:
    if kind is bool:
        if not isinstance(raw, bool):
            raise BadValue("not true/false")
        return raw
    if kind in (int, float):
        return checked_number(raw, name, kind)
    if kind is str:
        if not isinstance(raw, str):
            raise BadValue("not text")
        return printable(raw)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(raw)
        except ValueError:
            raise BadValue("not a known value") from None
    if dataclasses.is_dataclass(kind):
        record = checked_record(kind, raw, where, problems, fallbacks)  # type: ignore[arg-type]
        if record is None:
            raise BadValue("unreadable")
        return record
    if typing.get_origin(kind) is tuple:
        return _items(kind, raw, name, where, problems, fallbacks)
    raise BadValue(f"of a kind not read from elsewhere ({kind})")


def _items(
    kind: Any, raw: object, name: str, where: str, problems: Problems, fallbacks: Mapping[str, Any]
) -> tuple[Any, ...]:
    """A list field: ``tuple[X, ...]`` item by item (bad items left out), ``tuple[X, Y]`` all or nothing."""
    if not isinstance(raw, list):
        raise BadValue("not a list")
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        if len(raw) > MAX_ITEMS:
            problems.add(where, f"{len(raw)} items, the first {MAX_ITEMS} kept")
        out = []
        for i, item in enumerate(raw[:MAX_ITEMS]):
            if dataclasses.is_dataclass(args[0]):  # a record says itself why it was left out
                record = checked_record(args[0], item, f"{where}[{i}]", problems, fallbacks)  # type: ignore[arg-type]
                out += [record] if record is not None else []
                continue
            try:
                out.append(_value(args[0], item, name, f"{where}[{i}]", problems, fallbacks))
            except BadValue as bad:
                problems.add(f"{where}[{i}]", f"{bad}: left out")
        return tuple(out)
    if len(raw) != len(args):
        raise BadValue(f"not {len(args)} items")
    return tuple(_value(a, item, name, where, problems, fallbacks) for a, item in zip(args, raw, strict=True))


def _records(
    cls: type, raw: object, where: str, problems: Problems, fallbacks: Mapping[str, Any], most: int
) -> list[Any]:
    """A list of records, bad ones left out, at most ``most``, one per ``index`` where records have one."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(where, "not a list")
        return []
    if len(raw) > most:
        problems.add(where, f"{len(raw)} of them, the first {most} kept")
    out, seen = [], set()
    for i, item in enumerate(raw[:most]):
        record = checked_record(cls, item, f"{where}[{i}]", problems, fallbacks)
        key = getattr(record, "index", getattr(record, "url", None))
        if record is not None and key in seen:
            problems.add(f"{where}[{i}]", "a second record of the same GPU or server: left out")
        elif record is not None:
            seen.add(key)
            out.append(record)
    return out


def checked_system_info(raw: object, problems: Problems) -> SystemInfo:
    """A machine's description from elsewhere. Raises ValueError in words when it is no JSON object at all."""
    if not isinstance(raw, dict):
        raise ValueError("its machine is not described")
    fallbacks = {"state": GpuState.ERROR, "name": "", "uuid": "", "gpm_supported": False}
    info = checked_record(SystemInfo, {**raw, "gpus": None}, "info", problems, fallbacks)
    gpus = _records(GpuInfo, raw.get("gpus"), "info.gpus", problems, fallbacks, MAX_GPUS)
    return dataclasses.replace(info, gpus=tuple(gpus))


def checked_snapshot(raw: object, problems: Problems) -> Snapshot:
    """A reading from elsewhere. Raises ValueError in words when it has no valid time (nothing to place it)."""
    if not isinstance(raw, dict):
        raise ValueError("its reading is not a JSON object")
    try:
        time_s = checked_number(raw.get("time_s"), "time_s")
    except BadValue as bad:
        raise ValueError(f"its reading has no valid time_s ({bad})") from None
    fallbacks = {"time_s": time_s, "hostname": "", "kind": "?"}
    host = None
    if raw.get("host") is not None:
        host = checked_record(HostSample, raw["host"], "host", problems, fallbacks)
    gpus = _records(GpuSample, raw.get("gpus"), "gpus", problems, fallbacks, MAX_GPUS)
    engines = _records(EngineSample, raw.get("engines"), "engines", problems, fallbacks, MAX_ENGINES)
    for i, gpu in enumerate(gpus):
        if gpu.profiling_source is not None and gpu.profiling_source not in PROFILING_SOURCES:
            problems.add(f"gpus[{i}].profiling_source", "no source infertop knows: its figures left out")
            gpus[i] = dataclasses.replace(gpu, **dict.fromkeys(_MEASURED_FIELDS))
    return Snapshot(
        time_s,
        host,
        tuple(gpus),
        tuple(engines),
        gpu_error=_text(raw, "gpu_error", problems),
        dcgm_status=_text(raw, "dcgm_status", problems),
    )


_MEASURED_FIELDS = (
    "dram_bw_util_pct",
    "dram_bw_gbps",
    "sm_active_pct",
    "sm_occupancy_pct",
    "tensor_active_pct",
    "profiling_source",
    "profiling_age_s",
)


def _text(raw: Mapping[str, Any], key: str, problems: Problems) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        problems.add(key, "not text")
        return None
    return printable(value) if value is not None else None
