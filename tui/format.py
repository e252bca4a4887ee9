"""How numbers look on screen: always with a unit, and "n/a" for what the device does not report."""

from __future__ import annotations

import math
from collections.abc import Sequence

NA = "n/a"
_BLOCKS = " ▁▂▃▄▅▆▇█"


def pct(value: float | None, digits: int = 0) -> str:
    return NA if value is None else f"{value:.{digits}f}%"


def gib(n_bytes: float | None, digits: int = 1) -> str:
    return NA if n_bytes is None else f"{n_bytes / 2**30:.{digits}f} GiB"


def mib(n_bytes: float | None) -> str:
    return NA if n_bytes is None else f"{n_bytes / 2**20:,.0f} MiB"


def vram_short(n_bytes: float | None) -> str:
    """Process memory: MiB below 10 GiB, GiB above, the way nvidia-smi users read it."""
    if n_bytes is None:
        return NA
    if n_bytes >= 10 * 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**20:,.0f} MiB"


def watts(value: float | None) -> str:
    return NA if value is None else f"{value:.0f} W"


def gbps(value: float | None) -> str:
    """Bandwidth in GB/s (1e9 bytes/s)."""
    if value is None:
        return NA
    return f"{value:,.0f} GB/s" if value >= 10 else f"{value:.1f} GB/s"


def rate_bytes(value: float | None) -> str:
    """A byte rate with a unit that fits."""
    if value is None:
        return NA
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B/s"


def joules(value: float | None) -> str:
    if value is None:
        return NA
    if value >= 3.6e6:
        return f"{value / 3.6e6:.2f} kWh"
    if value >= 1e3:
        return f"{value / 1e3:.1f} kJ"
    return f"{value:.0f} J"


def celsius(value: float | None) -> str:
    return NA if value is None else f"{value:.0f}°C"


def mhz(value: float | None) -> str:
    return NA if value is None else f"{value:,.0f} MHz"


def seconds(value: float | None) -> str:
    if value is None:
        return NA
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def number(value: float | None, digits: int = 0) -> str:
    return NA if value is None else f"{value:,.{digits}f}"


def tokens_per_s(value: float | None) -> str:
    return NA if value is None else f"{value:,.0f} tok/s"


def downsample(values: Sequence[float | None], per_cell: int) -> list[float | None]:
    """Mean of each group of ``per_cell`` readings (newest group last, possibly partial); None if all missing."""
    if per_cell <= 1:
        return list(values)
    out: list[float | None] = []
    n = len(values)
    start = n % per_cell
    if start:
        out.append(_mean(values[:start]))
    for i in range(start, n, per_cell):
        out.append(_mean(values[i : i + per_cell]))
    return out


def _mean(chunk: Sequence[float | None]) -> float | None:
    known = [v for v in chunk if v is not None]
    return sum(known) / len(known) if known else None


def sparkline(
    values: Sequence[float | None], width: int, lo: float = 0.0, hi: float | None = None, per_cell: int = 1
) -> str:
    """The last ``width`` cells as block characters, each the mean of ``per_cell`` readings, on the scale
    ``lo``..``hi``: a cell is as tall as its value's share of the scale, in eighths (half of ``hi`` is ▄, half a
    cell), and anything at or below ``lo`` is the lowest block, so a zero never passes for a gap. Missing values
    are blanks. Give ``hi`` wherever the series has a ceiling (100 %, a peak, a limit: see :func:`pct_sparkline`)
    so that one GPU's 0 % looks like 0 % beside another's 50 %. Only a series without one (tokens/s) may leave it
    None: its top is then the window's own maximum, a shape rather than an amount."""
    if width <= 0:
        return ""
    tail = downsample(values[-width * per_cell :], per_cell)[-width:]
    if hi is None:
        known = [v for v in tail if v is not None and not math.isnan(v)]
        hi = max(known) if known else lo
    span = hi - lo
    out = []
    for v in tail:
        if v is None or math.isnan(v):
            out.append(" ")
            continue
        frac = min(1.0, max(0.0, (v - lo) / span)) if span > 0 else 0.0
        out.append(_BLOCKS[max(1, round(frac * (len(_BLOCKS) - 1)))])
    return " " * (width - len(out)) + "".join(out)


PCT_SCALE = (0.0, 100.0)
"""Every percentage is drawn on 0-100: never on its own window's range."""


def pct_sparkline(values: Sequence[float | None], width: int, per_cell: int = 1) -> str:
    """A sparkline of a percentage, on the fixed 0-100 scale."""
    lo, hi = PCT_SCALE
    return sparkline(values, width, lo=lo, hi=hi, per_cell=per_cell)


def bar(fraction: float | None, width: int) -> str:
    """A horizontal gauge such as ``█████▌    `` for 0-1."""
    if width <= 0:
        return ""
    if fraction is None:
        return "·" * width
    frac = min(1.0, max(0.0, fraction))
    eighths = round(frac * width * 8)
    full, rem = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[rem] if rem and full < width else ""
    return ("█" * full + partial).ljust(width)
