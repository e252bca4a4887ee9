"""Small hand-drawn SVG charts for reports: scatter and line series with optional error bars (an interval per
point, open-topped where the interval has no upper bound), a linear or log2 x axis, dashed limit lines, a
Pareto-style polyline and a legend.

infertop depends on no plotting library (the engine needs only httpx, psutil and nvidia-ml-py), and a report
needs a few charts of a few dozen points, so this draws them directly. The SVG has a transparent background
and must read on a light page and a dark one (GitHub themes, an HTML report in dark mode): text and axes use
:data:`INK`, a grey with at least 4.5:1 contrast against both white and black, and the series colours have a
relative luminance between 0.1 and 0.3, which keeps at least 3:1 against both (WCAG's figure for graphics).
Nothing uses ids or a stylesheet, so several charts can be inlined into one HTML page without clashing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

__all__ = [
    "INK",
    "LIMIT_COLOR",
    "PALETTE",
    "SHAPES",
    "Chart",
    "HLine",
    "Marker",
    "Series",
    "log2_ticks",
    "nice_ticks",
    "render",
    "style_for",
]

INK = "#767676"
"""Text, axes and grid: 4.5:1 contrast on white and on black."""
LIMIT_COLOR = "#dc2626"
"""SLO limit lines (red, dashed); kept out of :data:`PALETTE`."""
PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#db2777", "#9c755f", "#65a30d")
"""Series colours, each with >= 3:1 contrast on white and on black."""
SHAPES = ("circle", "square", "diamond", "triangle")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, 'DejaVu Sans', sans-serif"

_CHAR_W = 0.58  # average glyph width / font size of a sans-serif face: enough to size boxes without metrics


def style_for(index: int) -> tuple[str, str]:
    """Colour and marker shape of the ``index``-th series: colours cycle first, then shapes, so the first
    ``len(PALETTE) * len(SHAPES)`` series all look different."""
    return PALETTE[index % len(PALETTE)], SHAPES[(index // len(PALETTE)) % len(SHAPES)]


@dataclass(frozen=True)
class Marker:
    """One point. ``filled`` False draws it hollow; ``highlight`` rings it and writes that text beside it;
    ``tooltip`` becomes an SVG ``<title>`` (shown on hover in a browser); ``y_err`` draws its interval as a
    vertical bar, dashed up to the top of the plot when the interval has no upper bound (None)."""

    x: float
    y: float
    filled: bool = True
    highlight: str | None = None
    tooltip: str | None = None
    y_err: tuple[float, float | None] | None = None


@dataclass(frozen=True)
class Series:
    """Points of one kind. ``line`` joins them in x order; ``markers`` False draws the line only."""

    name: str
    points: tuple[Marker, ...]
    color: str = INK
    shape: str = "circle"
    line: bool = True
    markers: bool = True
    dashed: bool = False
    width_px: float = 2.0


@dataclass(frozen=True)
class HLine:
    """A horizontal limit line across the plot, labelled at its right end."""

    y: float
    label: str
    color: str = LIMIT_COLOR


@dataclass(frozen=True)
class Chart:
    """Everything one chart shows. ``marker_key`` adds legend entries explaining filled vs hollow markers."""

    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    hlines: tuple[HLine, ...] = ()
    x_log2: bool = False
    subtitle: str = ""
    marker_key: tuple[str, str] | None = None  # (filled means, hollow means)


# --- ticks ---------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi] with about ``target`` ticks.

    The first and last tick bracket the range, so they make good axis limits.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(hi) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def log2_ticks(lo: float, hi: float, max_ticks: int = 11) -> list[float]:
    """Powers of two covering [lo, hi] (both > 0): every power, or every second one when there are many."""
    if lo <= 0 or hi <= 0:
        raise ValueError(f"a log axis needs positive values, got [{lo}, {hi}]")
    first, last = math.floor(math.log2(min(lo, hi))), math.ceil(math.log2(max(lo, hi)))
    if first == last:
        first, last = first - 1, last + 1
    stride = 1
    while (last - first) // stride + 1 > max_ticks:
        stride += 1
    first -= (first % stride) if first >= 0 else 0
    exponents = list(range(first, last + 1, stride))
    if exponents[-1] < last:
        exponents.append(exponents[-1] + stride)
    return [2.0**e for e in exponents]


def _tick_text(value: float, step: float) -> str:
    if step >= 1 or value == 0:
        return f"{value:,.0f}"
    decimals = min(6, math.ceil(-math.log10(step) - 1e-9))
    return f"{value:,.{decimals}f}"


# --- drawing -------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, text: str, *, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return (
        f'<text x="{_num(x)}" y="{_num(y)}" font-size="{size}" text-anchor="{anchor}" fill="{INK}"{extra}>'
        f"{escape(text)}</text>"
    )


def _marker(shape: str, x: float, y: float, color: str, filled: bool, r: float = 4.5) -> str:
    paint = (
        f'fill="{color}" stroke="{color}"' if filled else f'fill="none" stroke="{color}" stroke-width="1.8"'
    )
    if shape == "square":
        s = r * 0.9
        return f'<rect x="{_num(x - s)}" y="{_num(y - s)}" width="{_num(2 * s)}" height="{_num(2 * s)}" {paint}/>'
    if shape == "diamond":
        d = r * 1.25
        pts = (
            f"{_num(x)},{_num(y - d)} {_num(x + d)},{_num(y)} {_num(x)},{_num(y + d)} {_num(x - d)},{_num(y)}"
        )
        return f'<polygon points="{pts}" {paint}/>'
    if shape == "triangle":
        t = r * 1.25
        pts = f"{_num(x)},{_num(y - t)} {_num(x + t)},{_num(y + t * 0.8)} {_num(x - t)},{_num(y + t * 0.8)}"
        return f'<polygon points="{pts}" {paint}/>'
    return f'<circle cx="{_num(x)}" cy="{_num(y)}" r="{_num(r)}" {paint}/>'


def _truncate(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _finite(points: Sequence[Marker], log_x: bool) -> list[Marker]:
    return [
        p for p in points if math.isfinite(p.x) and math.isfinite(p.y) and (p.x > 0 or not log_x) and p.y >= 0
    ]


_Point = tuple[float, float]
_Segment = tuple[_Point, _Point]


@dataclass(frozen=True)
class _Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def contains(self, x: float, y: float, pad: float = 0.0) -> bool:
        return self.x0 - pad <= x <= self.x1 + pad and self.y0 - pad <= y <= self.y1 + pad

    def overlaps(self, other: _Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def crosses(self, a: _Point, b: _Point) -> bool:
        """Whether segment a-b passes through the box."""
        if self.contains(*a) or self.contains(*b):
            return True
        corners = ((self.x0, self.y0), (self.x1, self.y0), (self.x1, self.y1), (self.x0, self.y1))
        return any(_intersects((a, b), (corners[i], corners[(i + 1) % 4])) for i in range(4))


def _intersects(p: _Segment, q: _Segment) -> bool:
    """Whether two segments cross (touching at an end counts)."""

    def side(a: _Point, b: _Point, c: _Point) -> float:
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    d1, d2 = side(q[0], q[1], p[0]), side(q[0], q[1], p[1])
    d3, d4 = side(p[0], p[1], q[0]), side(p[0], p[1], q[1])
    return d1 * d2 <= 0 and d3 * d4 <= 0 and not (d1 == d2 == 0)


def _place_label(
    x: float,
    y: float,
    text: str,
    size: int,
    area: _Box,
    marks: Sequence[_Point],
    segments: Sequence[_Segment],
    placed: Sequence[_Box],
) -> tuple[_Box, str]:
    """A spot for a highlight's label near its ring: of a ring of candidate spots, the one that covers the
    fewest other labels, markers and lines, stays inside the plot, and is nearest. Returns the text's box and
    its anchor ("start" or "end"); a far spot gets a leader line from the caller."""
    w, h = len(text) * size * _CHAR_W, size * 1.25
    candidates: list[tuple[_Box, str]] = []
    for dx in (13.0, 40.0, 90.0):
        for dy in (-13.0 - h, -h / 2, 13.0, -40.0 - h, 40.0, -70.0 - h, 70.0):
            candidates.append((_Box(x + dx, y + dy, x + dx + w, y + dy + h), "start"))
            candidates.append((_Box(x - dx - w, y + dy, x - dx, y + dy + h), "end"))

    def cost(box: _Box) -> float:
        leader = (x, y), (min(max(x, box.x0), box.x1), min(max(y, box.y0), box.y1))
        outside = not (area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1))
        hits = sum(box.contains(mx, my, pad=6) for mx, my in marks)
        # The label's own point sits at the box's edge for the nearest spots: do not count it.
        hits -= box.contains(x, y, pad=6)
        return (
            100.0 * outside
            + 10.0 * sum(box.overlaps(other) for other in placed)
            + 3.0 * hits
            + 2.0 * sum(box.crosses(a, b) for a, b in segments)
            + 0.5 * sum(_intersects(leader, (a, b)) for a, b in segments if (x, y) not in (a, b))
            + math.dist((x, y), ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)) / 100
        )

    return min(candidates, key=lambda c: cost(c[0]))


def render(chart: Chart, *, plot_w: int = 560, plot_h: int = 340) -> str:
    """The chart as a standalone SVG document (UTF-8 text, no XML declaration needed).

    Points with a non-finite coordinate, a negative y, or x <= 0 on a log axis are left out. A chart with no
    points at all draws its axes and says "no measured points".
    """
    series = [(s, _finite(s.points, chart.x_log2)) for s in chart.series]
    xs = [p.x for _, pts in series for p in pts]
    ys = [p.y for _, pts in series for p in pts] + [h.y for h in chart.hlines if math.isfinite(h.y)]
    ys += [
        v for _, pts in series for p in pts if p.y_err for v in p.y_err if v is not None and math.isfinite(v)
    ]

    # Legend first: its width sets the canvas width.
    legend: list[tuple[str, str, str, bool, bool, bool]] = []  # label, colour, shape, marker, filled, line
    for s, pts in series:
        if pts and s.name:
            legend.append((s.name, s.color, s.shape, s.markers, True, s.line or not s.markers))
    if chart.marker_key is not None:
        legend.append((chart.marker_key[0], INK, "circle", True, True, False))
        legend.append((chart.marker_key[1], INK, "circle", True, False, False))
    label_chars = 50
    legend_w = 0 if not legend else int(36 + 11 * _CHAR_W * min(label_chars, max(len(e[0]) for e in legend)))
    left, right, top, bottom = 74, 24 + legend_w, 58 if chart.subtitle else 40, 52
    width = left + plot_w + right
    height = max(top + plot_h + bottom, top + 18 * len(legend) + 20)

    if chart.x_log2:
        x_ticks = log2_ticks(min(xs), max(xs)) if xs else [1.0, 2.0, 4.0, 8.0]
    else:
        x_ticks = nice_ticks(0.0, max(xs) * 1.05 if xs and max(xs) > 0 else 1.0)
    y_ticks = nice_ticks(0.0, max(ys) * 1.08 if ys and max(ys) > 0 else 1.0)
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        if chart.x_log2:
            return left + plot_w * (math.log2(x) - math.log2(x_lo)) / (math.log2(x_hi) - math.log2(x_lo))
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def sy(y: float) -> float:
        return top + plot_h - plot_h * (y - y_lo) / (y_hi - y_lo)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family={quoteattr(FONT)} role="img">',
        f"<title>{escape(chart.title)}</title>",
        _text(left, 22, chart.title, size=15, extra=' font-weight="600"'),
    ]
    if chart.subtitle:
        out.append(_text(left, 40, chart.subtitle, size=11))

    # Grid, ticks and axes.
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    for t in y_ticks:
        y = sy(t)
        out.append(
            f'<line x1="{left}" y1="{_num(y)}" x2="{left + plot_w}" y2="{_num(y)}" stroke="{INK}" '
            'stroke-opacity="0.22" stroke-width="1"/>'
        )
        out.append(_text(left - 8, y + 4, _tick_text(t, y_step), anchor="end"))
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    for t in x_ticks:
        x = sx(t)
        out.append(
            f'<line x1="{_num(x)}" y1="{top}" x2="{_num(x)}" y2="{top + plot_h}" stroke="{INK}" '
            'stroke-opacity="0.22" stroke-width="1"/>'
        )
        out.append(
            _text(x, top + plot_h + 18, _tick_text(t, 1.0 if chart.x_log2 else x_step), anchor="middle")
        )
    out.append(
        f'<path d="M{left},{top} V{top + plot_h} H{left + plot_w}" fill="none" stroke="{INK}" stroke-width="1.2"/>'
    )
    out.append(_text(left + plot_w / 2, top + plot_h + 40, chart.x_label, size=12, anchor="middle"))
    cy = top + plot_h / 2
    out.append(
        _text(
            18, cy, chart.y_label, size=12, anchor="middle", extra=f' transform="rotate(-90 18 {_num(cy)})"'
        )
    )

    # Where labels may not go: markers and line segments, in canvas coordinates.
    marks = [(sx(p.x), sy(p.y)) for _, pts in series for p in pts]
    segments: list[_Segment] = []
    for s, pts in series:
        if s.line or not s.markers:
            ordered = sorted(pts, key=lambda p: (p.x, p.y))
            segments.extend(((sx(a.x), sy(a.y)), (sx(b.x), sy(b.y))) for a, b in itertools.pairwise(ordered))
    area = _Box(left, top, left + plot_w, top + plot_h)
    bars: list[tuple[str, float, float, float, bool]] = []  # colour, x, y of the low end, y of the top, open
    for s, pts in series:
        for p in pts:
            if s.markers and p.y_err is not None and math.isfinite(p.y_err[0]):
                lo, hi = p.y_err
                open_top = hi is None or not math.isfinite(hi)
                y_top = top if open_top or hi is None else sy(min(hi, y_hi))
                bars.append((s.color, sx(p.x), sy(max(lo, y_lo)), y_top, open_top))
    segments.extend(((x, y0), (x, y1)) for _, x, y0, y1, _ in bars)

    # Limit lines under the data; each label at whichever end of its line, above or below, is clearest.
    placed: list[_Box] = []
    for h in chart.hlines:
        if not math.isfinite(h.y):
            continue
        y, w = sy(h.y), len(h.label) * 11 * _CHAR_W
        spots = [
            _Box(x0, y0, x0 + w, y0 + 14)
            for y0 in (y - 17, y + 3)
            for x0 in (left + plot_w - 4 - w, left + 6)
        ]

        def clutter(box: _Box) -> float:
            outside = not (area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1))
            return (
                100.0 * outside
                + 3.0 * sum(box.contains(mx, my, pad=5) for mx, my in marks)
                + 2.0 * sum(box.crosses(a, b) for a, b in segments)
                + 10.0 * sum(box.overlaps(other) for other in placed)
            )

        box = min(spots, key=clutter)  # the first spot (right end, above) wins ties
        placed.append(box)
        out.append(
            f'<line x1="{left}" y1="{_num(y)}" x2="{left + plot_w}" y2="{_num(y)}" stroke="{h.color}" '
            'stroke-width="1.6" stroke-dasharray="7 5"/>'
        )
        # Anchored at the plot's edge: the box width is an estimate, the edge is exact.
        at_right = box.x1 > left + plot_w / 2
        out.append(
            f'<text x="{_num(box.x1 if at_right else box.x0)}" y="{_num(box.y1 - 3)}" font-size="11" '
            f'text-anchor="{"end" if at_right else "start"}" fill="{h.color}">{escape(h.label)}</text>'
        )

    for s, pts in series:
        ordered = sorted(pts, key=lambda p: (p.x, p.y))
        if (s.line or not s.markers) and len(ordered) >= 2:
            coords = " ".join(f"{_num(sx(p.x))},{_num(sy(p.y))}" for p in ordered)
            dash = ' stroke-dasharray="5 4"' if s.dashed else ""
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="{_num(s.width_px)}" '
                f'stroke-linejoin="round" stroke-opacity="0.85"{dash}/>'
            )
    for color, x, y0, y1, open_top in bars:
        dash = ' stroke-dasharray="3 3"' if open_top else ""
        out.append(
            f'<line x1="{_num(x)}" y1="{_num(y0)}" x2="{_num(x)}" y2="{_num(y1)}" stroke="{color}" '
            f'stroke-width="1.4" stroke-opacity="0.75"{dash}/>'
        )
        for y_end in (y0,) if open_top else (y0, y1):
            out.append(
                f'<line x1="{_num(x - 4)}" y1="{_num(y_end)}" x2="{_num(x + 4)}" y2="{_num(y_end)}" '
                f'stroke="{color}" stroke-width="1.4" stroke-opacity="0.75"/>'
            )
    for s, pts in series:
        if not s.markers:
            continue
        for p in pts:
            x, y = sx(p.x), sy(p.y)
            shape = _marker(s.shape, x, y, s.color, p.filled)
            if p.tooltip:
                out.append(f"<g><title>{escape(p.tooltip)}</title>{shape}</g>")
            else:
                out.append(shape)
    # Highlights last, so no marker hides them; each label goes where it covers the fewest markers and lines.
    for s, pts in series:
        for p in pts:
            if p.highlight:
                x, y = sx(p.x), sy(p.y)
                out.append(
                    f'<circle cx="{_num(x)}" cy="{_num(y)}" r="10" fill="none" stroke="{s.color}" '
                    'stroke-width="2.2"/>'
                )
                box, anchor = _place_label(x, y, p.highlight, 12, area, marks, segments, placed)
                placed.append(box)
                # A label moved away from its ring gets a thin leader from the ring to the text's near edge.
                near_x = min(max(x, box.x0), box.x1)
                near_y = min(max(y, box.y0), box.y1)
                if math.dist((x, y), (near_x, near_y)) > 24:
                    angle = math.atan2(near_y - y, near_x - x)
                    out.append(
                        f'<line x1="{_num(x + 11 * math.cos(angle))}" y1="{_num(y + 11 * math.sin(angle))}" '
                        f'x2="{_num(near_x)}" y2="{_num(near_y)}" stroke="{s.color}" stroke-width="1"/>'
                    )
                tx = box.x0 if anchor == "start" else box.x1
                # In the series' colour, which ties the label to its ring where labels sit close together.
                out.append(
                    f'<text x="{_num(tx)}" y="{_num(box.y1 - 3)}" font-size="12" text-anchor="{anchor}" '
                    f'font-weight="600" fill="{s.color}">{escape(p.highlight)}</text>'
                )

    if not xs:
        out.append(_text(left + plot_w / 2, top + plot_h / 2, "no measured points", size=13, anchor="middle"))

    lx = left + plot_w + 24
    for i, (label, color, shape, marker, filled, line) in enumerate(legend):
        ly = top + 8 + 18 * i
        if line:
            out.append(
                f'<line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
            )
        if marker:
            out.append(_marker(shape, lx + 11, ly, color, filled))
        out.append(_text(lx + 30, ly + 4, _truncate(label, label_chars)))
    out.append("</svg>")
    return "\n".join(out) + "\n"
