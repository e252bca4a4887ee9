"""The tuning report: every trial as JSON, and a readable summary (Markdown and one self-contained HTML page)
with SVG plots.

:func:`write_report` takes the dict the tuner builds at the end of a run (``format: infertop-tune-report``,
version 1; see ``tuner/tune.py``) and writes ``report.json`` (that dict, as is), ``report.md``,
``report.html`` and three plots into a directory. The Markdown and the HTML come from one list of blocks, so
they say the same thing. The dict may be incomplete (an interrupted run, a trial with no points, fields that
are None); every missing figure reads "n/a", never zero.

The figures follow REFERENCE.md "Metrics": cost per 1M output tokens is Artificial Analysis' price per
GPU-hour x GPUs x 1e6 / (output tokens/s x 3600); energy per output token is the GPU energy of the measured
window (power integrated over time, all GPUs) over the output tokens of that window.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from tuner import svgplot
from tuner.loadgen import PhaseStats
from tuner.slo import Slo, SloError, check

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "Headline",
    "ReportError",
    "ReportFiles",
    "cost_per_million_output_tokens_usd",
    "headline",
    "joules_per_output_token",
    "pareto_front",
    "read_report",
    "write_report",
]

REPORT_FORMAT = "infertop-tune-report"
REPORT_VERSION = 1


class ReportError(Exception):
    """The report cannot be written or read (no permission, not a report file). One line for people."""


class ReportFiles(TypedDict):
    """What :func:`write_report` wrote."""

    json: Path
    markdown: Path
    html: Path
    plots: list[Path]


# --- the figures ---------------------------------------------------------------------------------------


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (higher is better for both), in ascending x.

    A point equal to or below-and-left of another is dominated; of duplicates one is kept.
    """
    front: list[tuple[float, float]] = []
    best_y = -math.inf
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front[::-1]


def cost_per_million_output_tokens_usd(
    price_per_gpu_hour: float | None, gpus: int, output_tokens_per_s: float | None
) -> float | None:
    """Artificial Analysis: price x GPUs x 1e6 / (tok/s x 3600). None without a price, a GPU, or throughput."""
    if price_per_gpu_hour is None or gpus < 1 or not output_tokens_per_s or output_tokens_per_s <= 0:
        return None
    return price_per_gpu_hour * gpus * 1e6 / (output_tokens_per_s * 3600)


def joules_per_output_token(energy_j: float | None, output_tokens: float | None) -> float | None:
    """GPU energy of a window over the output tokens generated in it. None when either is unknown or zero."""
    if energy_j is None or not output_tokens or output_tokens <= 0:
        return None
    return energy_j / output_tokens


# --- reading the dict defensively ----------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class _Point:
    concurrency: int
    passed: bool
    slo_reasons: tuple[str, ...]
    stats: Mapping[str, Any]
    evidence: Mapping[str, Any]
    bound: Mapping[str, Any]
    tokens: Mapping[str, Any]

    def stat(self, name: str) -> float | None:
        return _number(self.stats.get(name))

    @property
    def tok_s(self) -> float | None:
        return self.stat("output_tokens_per_s")

    @property
    def joules_per_token(self) -> float | None:
        return joules_per_output_token(
            _number(self.evidence.get("energy_j")), self.stat("output_tokens_total")
        )

    @classmethod
    def parse(cls, data: Any) -> _Point | None:
        data = _mapping(data)
        concurrency = _number(data.get("concurrency"))
        if concurrency is None or concurrency < 1:
            return None
        reasons = data.get("slo_reasons") or ()
        return cls(
            concurrency=int(concurrency),
            passed=data.get("passed") is True,
            slo_reasons=tuple(str(r) for r in reasons) if isinstance(reasons, (list, tuple)) else (),
            stats=_mapping(data.get("stats")),
            evidence=_mapping(data.get("evidence")),
            bound=_mapping(data.get("bound")),
            tokens=_mapping(data.get("tokens")),
        )


@dataclass(frozen=True)
class _Trial:
    index: int
    key: str
    label: str
    config: Mapping[str, Any]
    status: str
    reason: str | None
    log_tail: str | None
    is_defaults: bool
    startup_s: float | None
    best_concurrency: int | None
    best_tok_s: float | None
    points: tuple[_Point, ...]

    @property
    def best_point(self) -> _Point | None:
        """The measured point behind ``best``: passing, at the best concurrency, the most tok/s."""
        if self.best_concurrency is None:
            return None
        matches = [p for p in self.points if p.passed and p.concurrency == self.best_concurrency]
        return max(matches, key=lambda p: p.tok_s or 0.0, default=None)

    @property
    def max_users(self) -> int | None:
        """The most concurrent users any passing point served."""
        return max((p.concurrency for p in self.points if p.passed), default=None)

    @classmethod
    def parse(cls, index: int, data: Any) -> _Trial:
        data = _mapping(data)
        best = _mapping(data.get("best"))
        best_n, best_tok_s = _number(best.get("concurrency")), _number(best.get("output_tokens_per_s"))
        points = tuple(p for p in map(_Point.parse, data.get("points") or ()) if p is not None)
        key = _text(data.get("key")) or f"trial-{index + 1}"
        return cls(
            index=index,
            key=key,
            label=_text(data.get("label")) or key,
            config=_mapping(data.get("config")),
            status=_text(data.get("status")) or "unknown",
            reason=_text(data.get("reason")),
            log_tail=_text(data.get("log_tail")),
            is_defaults=data.get("is_defaults") is True,
            startup_s=_number(data.get("startup_s")),
            best_concurrency=int(best_n) if best_n is not None and best_tok_s is not None else None,
            best_tok_s=best_tok_s if best_n is not None else None,
            points=points,
        )


@dataclass(frozen=True)
class _Run:
    raw: Mapping[str, Any]
    trials: tuple[_Trial, ...]
    winner: _Trial | None
    defaults: _Trial | None
    gpus: int
    slo: Slo | None

    @classmethod
    def parse(cls, report: Mapping[str, Any]) -> _Run:
        trials = tuple(_Trial.parse(i, t) for i, t in enumerate(report.get("trials") or ()))
        by_key = {t.key: t for t in trials}
        winner = by_key.get(str(report.get("winner")))
        defaults = by_key.get(str(report.get("defaults"))) or next((t for t in trials if t.is_defaults), None)
        gpus = _number(report.get("gpus"))
        return cls(report, trials, winner, defaults, int(gpus) if gpus else 0, _slo(report.get("slo")))

    def per_gpu(self, tok_s: float | None) -> float | None:
        return None if tok_s is None else tok_s / max(self.gpus, 1)


def _slo(data: Any) -> Slo | None:
    names = {f.name for f in dataclasses.fields(Slo)}
    try:
        return Slo(**{k: v for k, v in _mapping(data).items() if k in names})
    except (TypeError, SloError):
        return None


def _phase_stats(stats: Mapping[str, Any]) -> PhaseStats | None:
    names = {f.name for f in dataclasses.fields(PhaseStats)} - {"errors"}
    try:
        return PhaseStats(**{k: v for k, v in stats.items() if k in names})
    except TypeError:
        return None


def _margin(slo: Slo | None, point: _Point) -> float:
    """How far inside the SLO a point was (negative: how far outside); -inf when it cannot be judged."""
    stats = _phase_stats(point.stats)
    margin = check(slo, stats).margin if slo is not None and stats is not None else None
    return -math.inf if margin is None else margin


def _closest(slo: Slo | None, trials: Iterable[_Trial]) -> tuple[_Trial, _Point] | None:
    """The point that came nearest to meeting the SLO (ties: more tok/s)."""
    scored = [(_margin(slo, p), p.tok_s or 0.0, t, p) for t in trials for p in t.points]
    if not scored:
        return None
    _, _, trial, point = max(scored, key=lambda s: (s[0], s[1]))
    return trial, point


# --- the headline --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """The run in a few numbers: the winner against vLLM's defaults under the same SLO. None = not known."""

    winner_label: str | None
    winner_output_tokens_per_s: float | None
    winner_concurrency: int | None  # where the best tok/s was measured
    winner_max_users: int | None  # the most concurrent users a passing point served
    defaults_output_tokens_per_s: float | None
    defaults_concurrency: int | None
    defaults_max_users: int | None
    throughput_ratio: float | None  # winner / defaults, output tok/s
    users_ratio: float | None
    cost_per_million_output_tokens_usd: float | None
    joules_per_output_token: float | None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _headline(run: _Run) -> Headline:
    w, d = run.winner, run.defaults
    w_tok_s = w.best_tok_s if w else None
    d_tok_s = d.best_tok_s if d else None
    w_users = w.max_users if w else None
    d_users = d.max_users if d else None
    best = w.best_point if w else None
    return Headline(
        winner_label=w.label if w else None,
        winner_output_tokens_per_s=w_tok_s,
        winner_concurrency=w.best_concurrency if w else None,
        winner_max_users=w_users,
        defaults_output_tokens_per_s=d_tok_s,
        defaults_concurrency=d.best_concurrency if d else None,
        defaults_max_users=d_users,
        throughput_ratio=_ratio(w_tok_s, d_tok_s),
        users_ratio=_ratio(float(w_users) if w_users else None, float(d_users) if d_users else None),
        cost_per_million_output_tokens_usd=cost_per_million_output_tokens_usd(
            _number(run.raw.get("price_per_gpu_hour")), run.gpus, w_tok_s
        ),
        joules_per_output_token=best.joules_per_token if best else None,
    )


def headline(report: Mapping[str, Any]) -> Headline:
    """The headline figures of a report dict (what the summary opens with; also for a terminal summary)."""
    return _headline(_Run.parse(report))


# --- formatting: every number with its unit, "n/a" when unknown -----------------------------------------

NA = "n/a"


def _tok_s(value: float | None, unit: str = " tok/s") -> str:
    if value is None:
        return NA
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:,.1f}{unit}"


def _ms(seconds: float | None) -> str:
    return NA if seconds is None else f"{seconds * 1000:,.0f} ms"


def _ms_value(seconds: float | None) -> float | None:
    """Seconds as milliseconds, for a cell whose header says "(ms)"."""
    return None if seconds is None else seconds * 1000


def _secs(seconds: float | None) -> str:
    return NA if seconds is None else f"{seconds:,.2f} s" if seconds < 10 else f"{seconds:,.0f} s"


def _usd(value: float | None) -> str:
    if value is None:
        return NA
    return f"${value:,.0f}" if value >= 100 else f"${value:.2f}" if value >= 1 else f"${value:.3f}"


def _joules(value: float | None) -> str:
    return NA if value is None else f"{value:.3g} J/token"


def _times(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}x"


def _users(value: int | None) -> str:
    return NA if value is None else f"{value:,} user" + ("" if value == 1 else "s")


def _bare(value: float | None, decimals: int = 0) -> str:
    """A table cell whose unit is in the column header."""
    return NA if value is None else f"{value:,.{decimals}f}"


def _when(epoch_s: float | None) -> str:
    if epoch_s is None:
        return NA
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return NA
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


_BOUNDS = {
    "gpu_memory_bandwidth": "GPU memory bandwidth",
    "gpu_compute": "GPU compute",
    "kv_cache_queueing": "KV cache / queueing",
    "front_end_or_client": "API front end or client",
    "client": "load generator (client)",
    "engine": "engine (no GPU telemetry)",
    "unknown": "nothing saturated",
}


def _bound(point: _Point | None) -> str:
    kind = _text(point.bound.get("kind")) if point else None
    return NA if kind is None else _BOUNDS.get(kind, kind.replace("_", " "))


def _serve_command(model: str, config: Mapping[str, Any]) -> str:
    args = ["vllm", "serve", shlex.quote(model)]
    for key, value in config.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            text = json.dumps(value) if isinstance(value, (Mapping, list)) else str(value)
            args.extend((f"--{key}", shlex.quote(text)))
    return " ".join(args)


# --- the document: one list of blocks, rendered twice ---------------------------------------------------


@dataclass(frozen=True)
class _Span:
    text: str
    style: str = "plain"  # plain | bold | code


Inline = str | _Span


def _b(text: str) -> _Span:
    return _Span(text, "bold")


def _c(text: str) -> _Span:
    return _Span(text, "code")


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Para:
    parts: tuple[Inline, ...]
    kind: str = "plain"  # plain | note | warning


@dataclass(frozen=True)
class _Bullets:
    items: tuple[tuple[Inline, ...], ...]


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Inline, ...], ...]
    numeric: tuple[bool, ...]  # right-align these columns


@dataclass(frozen=True)
class _Code:
    text: str


@dataclass(frozen=True)
class _Details:
    summary: str
    body: str


@dataclass(frozen=True)
class _Figure:
    file: str
    alt: str
    svg: str
    caption: str


_Block = _Heading | _Para | _Bullets | _Table | _Code | _Details | _Figure

# Backslash-escape what Markdown would read as markup; "<" only where it could open an HTML tag ("<= 2 s" stays).
_MD_ESCAPE = re.compile(r"([\\`*_\[\]|]|<(?=[A-Za-z/!?]))")


def _md_inline(part: Inline) -> str:
    span = part if isinstance(part, _Span) else _Span(part)
    text = " ".join(span.text.split("\n"))
    if span.style == "code":
        fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") else ""
        return f"{fence}{pad}{text}{pad}{fence}"
    escaped = _MD_ESCAPE.sub(r"\\\1", text)
    return f"**{escaped}**" if span.style == "bold" else escaped


def _md_fence(text: str) -> str:
    return "`" * max(3, max((len(run) + 1 for run in re.findall(r"`{3,}", text)), default=0))


def _markdown(blocks: Sequence[_Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, _Heading):
            out.append("#" * block.level + " " + _md_inline(block.text))
        elif isinstance(block, _Para):
            text = "".join(map(_md_inline, block.parts))
            out.append(f"> {text}" if block.kind != "plain" else text)
        elif isinstance(block, _Bullets):
            out.append("\n".join("- " + "".join(map(_md_inline, item)) for item in block.items))
        elif isinstance(block, _Table):
            lines = ["| " + " | ".join(_md_inline(h) for h in block.header) + " |"]
            lines.append("|" + "|".join("---:" if n else "---" for n in block.numeric) + "|")
            lines.extend("| " + " | ".join(_md_inline(cell) for cell in row) + " |" for row in block.rows)
            out.append("\n".join(lines))
        elif isinstance(block, _Code):
            fence = _md_fence(block.text)
            out.append(f"{fence}\n{block.text.rstrip()}\n{fence}")
        elif isinstance(block, _Details):
            fence = _md_fence(block.body)
            out.append(
                f"<details><summary>{html.escape(block.summary)}</summary>\n\n"
                f"{fence}text\n{block.body.rstrip()}\n{fence}\n\n</details>"
            )
        else:
            out.append(f"![{_md_inline(block.alt)}]({block.file})\n\n*{_md_inline(block.caption)}*")
    return "\n\n".join(out) + "\n"


def _html_inline(part: Inline) -> str:
    span = part if isinstance(part, _Span) else _Span(part)
    text = html.escape(span.text)
    return {"bold": f"<strong>{text}</strong>", "code": f"<code>{text}</code>"}.get(span.style, text)


_CSS = """
:root { color-scheme: light dark; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #8884; } h3 { margin-top: 1.4em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: .6em 0; }
th, td { border: 1px solid #8885; padding: 3px 8px; vertical-align: top; }
th { background: #8881; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { background: #8882; padding: 0 .25em; border-radius: 3px; }
pre { background: #8881; padding: .7em; overflow-x: auto; font-size: 12px; }
.note, .warning { border-left: 4px solid #8888; padding: .2em .8em; }
.warning { border-left-color: #d97706; }
figure { margin: 1.2em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 13px; opacity: .8; }
details { margin: .4em 0; } summary { cursor: pointer; }
"""


def _html(blocks: Sequence[_Block], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>",
        "<body>",
    ]
    for block in blocks:
        if isinstance(block, _Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, _Para):
            css = f' class="{block.kind}"' if block.kind != "plain" else ""
            out.append(f"<p{css}>{''.join(map(_html_inline, block.parts))}</p>")
        elif isinstance(block, _Bullets):
            items = "".join(f"<li>{''.join(map(_html_inline, item))}</li>" for item in block.items)
            out.append(f"<ul>{items}</ul>")
        elif isinstance(block, _Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td{' class=num' if num else ''}>{_html_inline(cell)}</td>"
                    for cell, num in zip(row, block.numeric, strict=True)
                )
                + "</tr>"
                for row in block.rows
            )
            out.append(
                f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
            )
        elif isinstance(block, _Code):
            out.append(f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>")
        elif isinstance(block, _Details):
            out.append(
                f"<details><summary>{html.escape(block.summary)}</summary>"
                f"<pre>{html.escape(block.body.rstrip())}</pre></details>"
            )
        else:
            out.append(f"<figure>{block.svg}<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- plots ---------------------------------------------------------------------------------------------


def _plots(run: _Run) -> list[tuple[str, svgplot.Chart, str]]:
    """(file name, chart, caption) for each plot; none when no trial has a measured point."""
    measured = [t for t in run.trials if t.points]
    if not measured:
        return []
    styles = {t.key: svgplot.style_for(i) for i, t in enumerate(measured)}
    slo = run.slo
    judged = str(_mapping(run.raw.get("slo")).get("judged_at") or "p95")
    key = ("met the SLO", "missed the SLO")

    def name(trial: _Trial) -> str:
        # Numbered as in the trials table: labels of similar configs differ only at their end.
        return f"{trial.index + 1}. {trial.label}" + (" (best)" if trial is run.winner else "")

    def highlight(trial: _Trial, point: _Point) -> str | None:
        if trial is run.winner and point is trial.best_point:
            return f"best: {_users(point.concurrency)}"
        if trial is run.defaults and trial is not run.winner and point is trial.best_point:
            return f"vLLM defaults: {_users(point.concurrency)}"
        return None

    def tip(trial: _Trial, point: _Point) -> str:
        return (
            f"{trial.label}: {_users(point.concurrency)}, {_tok_s(point.tok_s)}, "
            f"{_tok_s(point.stat('user_tok_per_s_p50'))} per user (p50), TTFT p95 {_ms(point.stat('ttft_p95_s'))}"
            + ("" if point.passed else " (missed the SLO)")
        )

    def series(x: Any, y: Any, *, line: bool, marks: bool = True) -> list[svgplot.Series]:
        out = []
        for trial in measured:
            color, shape = styles[trial.key]
            points = []
            for p in trial.points:
                xv, yv = x(p), y(p)
                if xv is not None and yv is not None:
                    hl = highlight(trial, p) if marks else None
                    points.append(svgplot.Marker(xv, yv, p.passed, hl, tip(trial, p)))
            width_px = 3.0 if trial is run.winner else 2.0  # the winner's line stands out among many
            out.append(svgplot.Series(name(trial), tuple(points), color, shape, line=line, width_px=width_px))
        return out

    per_gpu = "output tok/s per GPU" if run.gpus >= 1 else "output tok/s (CPU server)"
    scatter = series(lambda p: run.per_gpu(p.tok_s), lambda p: p.stat("user_tok_per_s_p50"), line=False)
    front = pareto_front((m.x, m.y) for s in scatter for m in s.points)
    frontier = svgplot.Series(
        "Pareto frontier (all points)",
        tuple(svgplot.Marker(x, y) for x, y in front),
        svgplot.INK,
        markers=False,
        width_px=1.5,
    )
    floor = slo.tok_s_per_user_min if slo else None
    pareto = svgplot.Chart(
        title="Throughput per GPU vs speed per user",
        subtitle="one marker per measured concurrency; up and to the right is better",
        x_label=per_gpu,
        y_label="tok/s per user (p50)",
        series=(frontier, *scatter),
        hlines=(svgplot.HLine(floor, f"SLO floor {floor:.1f} tok/s per user (judged on TPOT {judged})"),)
        if floor
        else (),
        marker_key=key,
    )
    ttft_max = slo.ttft_p95_max_s if slo else None
    ttft = svgplot.Chart(
        title="Time to first token vs concurrency",
        subtitle="lower is better",
        x_label="concurrent users (log2 scale)",
        y_label="TTFT p95 (ms)",
        series=tuple(
            series(
                lambda p: float(p.concurrency),
                lambda p: _ms_value(p.stat("ttft_p95_s")),
                line=True,
                marks=False,
            )
        ),
        hlines=(svgplot.HLine(ttft_max * 1000, f"SLO TTFT {judged} limit {ttft_max * 1000:,.0f} ms"),)
        if ttft_max
        else (),
        x_log2=True,
        marker_key=key,
    )
    throughput = svgplot.Chart(
        title="Aggregate output throughput vs concurrency",
        subtitle="all users together; higher is better",
        x_label="concurrent users (log2 scale)",
        y_label="output tok/s (all GPUs)" if run.gpus >= 1 else "output tok/s",
        series=tuple(series(lambda p: float(p.concurrency), lambda p: p.tok_s, line=True)),
        x_log2=True,
        marker_key=key,
    )
    return [
        (
            "pareto.svg",
            pareto,
            "Each marker is one measured concurrency of one configuration; filled markers met the SLO. The grey "
            "line joins the points no other point beats on both axes. The dashed line is the SLO's per-user "
            f"floor; the SLO judges it on TPOT {judged}, so a marker above it (p50) can still miss.",
        ),
        (
            "ttft_vs_concurrency.svg",
            ttft,
            f"TTFT {judged} per configuration; the dashed line is the SLO limit.",
        ),
        (
            "throughput_vs_concurrency.svg",
            throughput,
            "Aggregate output tokens/s of all concurrent users; past saturation more users only add latency.",
        ),
    ]


# --- the summary ---------------------------------------------------------------------------------------


def _intro(run: _Run) -> list[_Block]:
    raw = run.raw
    hardware = _mapping(raw.get("hardware"))
    slo_raw = _mapping(raw.get("slo"))
    workload = _mapping(raw.get("workload"))
    model = _text(raw.get("model")) or NA
    label = _text(raw.get("hardware_label")) or _text(hardware.get("gpu_name")) or NA
    vram = _number(hardware.get("vram_per_gpu_bytes"))
    cc = hardware.get("compute_capability")
    hw_detail = []
    if vram:
        hw_detail.append(f"{vram / 2**30:.0f} GiB per GPU")
    if isinstance(cc, (list, tuple)) and len(cc) == 2:
        hw_detail.append(f"compute capability {cc[0]}.{cc[1]}")
    judged = str(slo_raw.get("judged_at") or "p95")
    slo_name = _text(slo_raw.get("name")) or "SLO"
    describe = _text(slo_raw.get("describe")) or (run.slo.describe() if run.slo else NA)
    source = _text(slo_raw.get("source"))
    in_len, out_len = _number(workload.get("input_len")), _number(workload.get("output_len"))
    started, finished = _number(raw.get("started_s")), _number(raw.get("finished_s"))
    grid = _number(raw.get("grid_size"))
    launches = _number(raw.get("launches"))
    counts: dict[str, int] = {}
    for trial in run.trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"
    blocks: list[_Block] = [
        _Heading(1, "infertop tuning report"),
        _Bullets(
            (
                ("Model: ", _c(model)),
                ("Hardware: ", label + (f" ({', '.join(hw_detail)})" if hw_detail else "")),
                (
                    "SLO: ",
                    _b(slo_name),
                    f": {describe}" + (f". Source: {source}" if source else ""),
                ),
                (
                    f"Judged at {judged} over each phase. Phases last tens of seconds, so infertop checks the "
                    f"limits at {judged}, where MLPerf uses p99 over at least 600 s: a pass here makes a strong "
                    "candidate for a full-length run, not a certified result.",
                ),
                (
                    "Workload: ",
                    f"{_bare(in_len)} input tokens and {_bare(out_len)} output tokens per request"
                    if in_len is not None and out_len is not None
                    else NA,
                    f"; requests per measured point: {workload.get('requests_per_point')}"
                    if workload.get("requests_per_point")
                    else "",
                ),
                (
                    f"Run: started {_when(started)}, took "
                    f"{_duration(finished - started if started and finished else None)}; "
                    f"{_bare(launches)} server launches; {len(run.trials)} trials ({tally})"
                    + (f" out of {grid:.0f} feasible configurations in the grid" if grid is not None else ""),
                ),
            )
        ),
    ]
    if raw.get("interrupted"):
        blocks.append(
            _Para(
                (
                    _b("This run was interrupted."),
                    " The results cover the trials that finished before it stopped; run the same tune again "
                    "with ",
                    _c("--resume"),
                    " to finish the rest.",
                ),
                "warning",
            )
        )
    return blocks


def _result(run: _Run, head: Headline) -> list[_Block]:
    blocks: list[_Block] = [_Heading(2, "Result")]
    model = _text(run.raw.get("model")) or "MODEL"
    price = _number(run.raw.get("price_per_gpu_hour"))
    w, d = run.winner, run.defaults
    if w is None:
        return blocks + _no_winner(run)
    users = (
        f"serves up to {_users(head.winner_max_users)} at once within the SLO"
        if head.winner_max_users != head.winner_concurrency
        else f"serves {_users(head.winner_max_users)} at once within the SLO"
    )
    blocks.append(
        _Para(
            (
                _b(f"Best configuration: {w.label}."),
                f" It {users}, with its best throughput {_tok_s(head.winner_output_tokens_per_s)} "
                f"at {_users(head.winner_concurrency)}"
                + (
                    f" ({_tok_s(run.per_gpu(head.winner_output_tokens_per_s))} per GPU)."
                    if run.gpus > 1
                    else "."
                ),
            )
        )
    )
    if d is None:
        blocks.append(
            _Para(("vLLM's defaults were not measured in this run, so there is no ratio against them.",))
        )
    elif d is w:
        blocks.append(
            _Para(("vLLM's defaults were the best configuration found: no tuned change beat them.",))
        )
    elif head.defaults_output_tokens_per_s is None:
        why = d.reason or "no concurrency tried met the SLO"
        blocks.append(
            _Para(
                (
                    "vLLM's defaults did not meet this SLO at any concurrency tried (",
                    why,
                    "): the tuned configuration is what makes the SLO reachable.",
                )
            )
        )
    else:
        blocks.append(
            _Para(
                (
                    _b(f"{_times(head.throughput_ratio)} the output throughput of vLLM's defaults"),
                    f" under the same SLO ({_tok_s(head.winner_output_tokens_per_s)} vs "
                    f"{_tok_s(head.defaults_output_tokens_per_s)}), and {_times(head.users_ratio)} the concurrent "
                    f"users ({_bare(head.winner_max_users)} vs {_bare(head.defaults_max_users)}).",
                )
            )
        )
    blocks.append(_Code(_serve_command(model, w.config)))

    best, d_best = w.best_point, d.best_point if d else None
    columns = ["", "best configuration"] + (["vLLM defaults"] if d is not None and d is not w else [])

    def row(name: str, value: Any) -> tuple[Inline, ...]:
        cells: list[Inline] = [name, value(w, best)]
        if len(columns) == 3:
            cells.append(value(d, d_best))
        return tuple(cells)

    def point_stat(name: str, fmt: Any) -> Any:
        return lambda t, p: fmt(p.stat(name) if p else None)

    blocks.append(
        _Table(
            tuple(columns),
            (
                row("most concurrent users within the SLO", lambda t, p: _users(t.max_users)),
                row("best output throughput", lambda t, p: _tok_s(t.best_tok_s)),
                row("... measured at", lambda t, p: _users(t.best_concurrency)),
                row("output throughput per GPU", lambda t, p: _tok_s(run.per_gpu(t.best_tok_s))),
                row("TTFT p95 there", point_stat("ttft_p95_s", _ms)),
                row("tok/s per user (p50) there", point_stat("user_tok_per_s_p50", _tok_s)),
                row(
                    "cost per 1M output tokens",
                    lambda t, p: _usd(cost_per_million_output_tokens_usd(price, run.gpus, t.best_tok_s)),
                ),
                row("GPU energy per output token", lambda t, p: _joules(p.joules_per_token if p else None)),
            ),
            (False, True, True)[: len(columns)],
        )
    )
    blocks.append(_Bullets((*_cost_and_energy(run, head, price), _proof(run), _production(run))))
    return blocks


def _cost_and_energy(run: _Run, head: Headline, price: float | None) -> list[tuple[Inline, ...]]:
    if run.gpus < 1:
        cost: tuple[Inline, ...] = ("Cost per 1M output tokens: n/a (the CPU build: no GPU-hours to price).",)
    elif price is None:
        cost = (
            "Cost per 1M output tokens: n/a: give ",
            _c("--price-per-gpu-hour USD"),
            " (your cloud's on-demand price for one GPU) to see it.",
        )
    else:
        cost = (
            "Cost per 1M output tokens: ",
            _b(_usd(head.cost_per_million_output_tokens_usd)),
            f" at ${price:,.2f} per GPU-hour x {run.gpus} GPU{'s' if run.gpus > 1 else ''} "
            "(price x GPUs x 1e6 / (output tok/s x 3600), as Artificial Analysis computes it).",
        )
    if head.joules_per_output_token is not None:
        energy: tuple[Inline, ...] = (
            "GPU energy per output token: ",
            _b(_joules(head.joules_per_output_token)),
            " (power integrated over the measured window, all GPUs, over the output tokens in it).",
        )
    else:
        energy = ("GPU energy per output token: n/a (no GPU power readings for that phase).",)
    return [cost, energy]


def _proof(run: _Run) -> tuple[Inline, ...]:
    proof = run.raw.get("proof")
    if not isinstance(proof, Mapping):
        return ("Proof run: n/a (the configuration was not relaunched from its YAML file).",)
    yaml = _text(proof.get("yaml")) or NA
    error = _text(proof.get("error"))
    if error:
        return ("Proof run from ", _c(yaml), f": failed: {error}")
    n = _number(proof.get("concurrency"))
    verdict = "met the SLO" if proof.get("passed") is True else "missed the SLO"
    return (
        "Proof run: relaunched from ",
        _c(yaml),
        f" (startup {_secs(_number(proof.get('startup_s')))}): {_tok_s(_number(proof.get('output_tokens_per_s')))} "
        f"at {_users(int(n) if n else None)} vs {_tok_s(_number(proof.get('trial_output_tokens_per_s')))} in the "
        "trial (",
        _b(_times(_number(proof.get("ratio")))),
        f"); {verdict}.",
    )


def _production(run: _Run) -> tuple[Inline, ...]:
    prod = run.raw.get("production")
    if not isinstance(prod, Mapping):
        return ("Production check: n/a (not run).",)
    fraction = _number(prod.get("fraction_of_max"))
    share = f"{fraction * 100:.0f} %" if fraction is not None else NA
    rate = _number(prod.get("request_rate_per_s"))
    error = _text(prod.get("error"))
    if error:
        return (f"Production check (steady load at {share} of the max): failed to run: {error}",)
    stats = _mapping(prod.get("stats"))
    reasons = [str(r) for r in prod.get("slo_reasons") or ()]
    verdict = _b("SLO met") if prod.get("passed") is True else _b("SLO missed")
    return (
        f"Production check: steady load at {share} of the max ({_bare(rate, 2)} requests/s): TTFT p95 "
        f"{_ms(_number(stats.get('ttft_p95_s')))}, E2E p95 {_secs(_number(stats.get('e2e_p95_s')))}, "
        f"{_tok_s(_number(stats.get('output_tokens_per_s')))}: ",
        verdict,
        f" ({'; '.join(reasons)})." if reasons else ".",
    )


def _no_winner(run: _Run) -> list[_Block]:
    describe = _text(_mapping(run.raw.get("slo")).get("describe")) or (run.slo.describe() if run.slo else "")
    blocks: list[_Block] = [
        _Para((_b("No configuration met the SLO"), f" ({describe})." if describe else "."), "warning")
    ]
    closest = _closest(run.slo, run.trials)
    if closest is None:
        blocks.append(
            _Para(
                (
                    "No trial produced a measurement: every trial failed, was rejected before launch or was "
                    "interrupted. The trial table below gives each one's reason.",
                )
            )
        )
        return blocks
    trial, point = closest
    why = "; ".join(point.slo_reasons) or "no reason recorded"
    blocks.append(
        _Para(
            (
                "Closest: ",
                _b(trial.label),
                f" at {_users(point.concurrency)}: {_tok_s(point.tok_s)}, TTFT p95 {_ms(point.stat('ttft_p95_s'))}, "
                f"{_tok_s(point.stat('user_tok_per_s_p50'))} per user (p50). It missed because: {why}. ",
                "Try a looser SLO, fewer input or output tokens, or a larger GPU.",
            )
        )
    )
    return blocks


def _trial_table(run: _Run) -> list[_Block]:
    if not run.trials:
        return [_Heading(2, "Trials"), _Para(("No trials were recorded.",))]
    rows = []
    for t in run.trials:
        closest = _closest(run.slo, [t])
        shown = t.best_point or (closest[1] if closest else None)
        mark = " ★" if t is run.winner else ""
        reason = t.reason or ("" if t.status == "feasible" else NA)
        users = NA if shown is None else _bare(shown.concurrency) + ("" if shown.passed else " (missed)")
        rows.append(
            (
                f"{t.index + 1}",
                _b(t.label + mark) if t is run.winner else t.label + _defaults_mark(t, run),
                t.status,
                users,
                _bare(shown.tok_s if shown else None),
                _bare(_ms_value(shown.stat("ttft_p95_s")) if shown else None),
                _bare(shown.stat("user_tok_per_s_p50") if shown else None, 1),
                _bare(t.startup_s),
                _bound(shown),
                reason,
            )
        )
    return [
        _Heading(2, "Trials"),
        _Para(
            (
                "★ marks the best configuration. Figures are at each trial's best point within the SLO; for a "
                'trial with none, at the point that came closest to it (marked "missed").',
            )
        ),
        _Table(
            (
                "#",
                "configuration",
                "status",
                "users",
                "output (tok/s)",
                "TTFT p95 (ms)",
                "per user p50 (tok/s)",
                "startup (s)",
                "bound by",
                "reason",
            ),
            tuple(rows),
            (True, False, False, True, True, True, True, True, False, False),
        ),
    ]


def _defaults_mark(trial: _Trial, run: _Run) -> str:
    return " (vLLM defaults)" if trial is run.defaults and "default" not in trial.label.lower() else ""


def _logs(run: _Run) -> list[_Block]:
    with_logs = [t for t in run.trials if t.log_tail]
    if not with_logs:
        return []
    blocks: list[_Block] = [_Heading(2, "Server logs of trials that did not run")]
    for t in with_logs:
        blocks.append(
            _Details(f"{t.label} ({t.status}): {t.reason or 'no reason recorded'}", t.log_tail or "")
        )
    return blocks


def _point_tables(run: _Run) -> list[_Block]:
    measured = [t for t in run.trials if t.points]
    if not measured:
        return []
    blocks: list[_Block] = [_Heading(2, "Measured points")]
    for t in measured:
        blocks.append(_Heading(3, f"{t.index + 1}. {t.label} ({t.status})"))
        rows = []
        for p in sorted(t.points, key=lambda p: p.concurrency):
            ok, failed = p.stat("requests_ok"), p.stat("requests_failed")
            power = _number(p.evidence.get("power_w_mean"))
            kv = _number(p.evidence.get("kv_cache_usage_pct_max"))
            rows.append(
                (
                    _bare(p.concurrency),
                    "met" if p.passed else _b("missed"),
                    _bare(p.tok_s),
                    _bare(p.stat("user_tok_per_s_p50"), 1),
                    _bare(_ms_value(p.stat("ttft_p50_s"))),
                    _bare(_ms_value(p.stat("ttft_p95_s"))),
                    _bare(_ms_value(p.stat("tpot_p95_s")), 1),
                    _bare(p.stat("e2e_p95_s"), 2),
                    f"{_bare(ok)} / {_bare(failed)}",
                    _bare(kv),
                    _bare(power),
                    _bare(p.joules_per_token, 3),
                    _bound(p),
                    "; ".join(p.slo_reasons),
                )
            )
        blocks.append(
            _Table(
                (
                    "users",
                    "SLO",
                    "output (tok/s)",
                    "per user p50 (tok/s)",
                    "TTFT p50 (ms)",
                    "TTFT p95 (ms)",
                    "TPOT p95 (ms)",
                    "E2E p95 (s)",
                    "requests ok / failed",
                    "KV cache max (%)",
                    "GPU power (W)",
                    "energy (J/token)",
                    "bound by",
                    "why it missed",
                ),
                tuple(rows),
                (True, False, *(True,) * 10, False, False),
            )
        )
        notes = [
            f"{p.concurrency} users: {p.tokens.get('note')}"
            for p in t.points
            if p.tokens.get("mismatch") is True
        ]
        if notes:
            blocks.append(_Para(("Token counts disagree: " + "; ".join(notes) + ".",), "warning"))
    return blocks


def _reading_notes(run: _Run) -> list[_Block]:
    judged = str(_mapping(run.raw.get("slo")).get("judged_at") or "p95")
    return [
        _Heading(2, "How these numbers were measured"),
        _Bullets(
            (
                (
                    "Each point is one phase of concurrent streaming requests at a fixed number of users; output "
                    "tokens come from the server's own usage counts, cross-checked against its /metrics counter.",
                ),
                (
                    f"TTFT is request start to the first text chunk. Tokens/s per user is 1 / TPOT, where TPOT = "
                    f"(E2E - TTFT) / (output tokens - 1); the SLO judges TTFT and TPOT at {judged}.",
                ),
                (
                    '"Bound by" is read from the phase\'s telemetry (GPU memory bandwidth via NVML GPM, SM activity, '
                    "the server's queue and KV cache, client and server CPU).",
                ),
            )
        ),
    ]


def _document(run: _Run, figures: Sequence[tuple[str, str, str, str]]) -> list[_Block]:
    head = _headline(run)
    blocks = _intro(run) + _result(run, head) + _trial_table(run)
    if figures:
        blocks.append(_Heading(2, "Plots"))
        blocks.extend(_Figure(file, alt, svg, caption) for file, alt, svg, caption in figures)
    else:
        blocks += [_Heading(2, "Plots"), _Para(("No plots: no trial has a measured point.",))]
    return blocks + _logs(run) + _point_tables(run) + _reading_notes(run)


# --- files ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON: tuples as lists, paths as text, NaN and infinities as null (JSON has none)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {path}: {error.strerror or error}") from None


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> ReportFiles:
    """Write ``report.json``, ``report.md``, ``report.html`` and the SVG plots into ``out_dir`` (created).

    Files are replaced atomically, so writing again (``infertop report``) is safe. Plots are written only
    when some trial has a measured point.

    Raises:
        ReportError: the directory or a file cannot be written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"cannot create {out}: {error.strerror or error}") from None
    data = _jsonable(report)
    run = _Run.parse(data)
    figures, plot_paths = [], []
    for file, chart, caption in _plots(run):
        svg = svgplot.render(chart)
        _write_atomic(out / file, svg)
        plot_paths.append(out / file)
        figures.append((file, chart.title, svg, caption))
    blocks = _document(run, figures)
    model = _text(data.get("model")) or "model"
    files = ReportFiles(
        json=out / "report.json", markdown=out / "report.md", html=out / "report.html", plots=plot_paths
    )
    _write_atomic(files["json"], json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(files["markdown"], _markdown(blocks))
    _write_atomic(files["html"], _html(blocks, f"infertop tuning report: {model}"))
    return files


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` this module wrote.

    Raises:
        ReportError: no such file, not JSON, or not an infertop tuning report of a known version.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ReportError(f"{path} is not an infertop tuning report")
    if data.get("version") != REPORT_VERSION:
        raise ReportError(
            f"{path} is a report of version {data.get('version')!r}; this infertop reads {REPORT_VERSION}"
        )
    return data
