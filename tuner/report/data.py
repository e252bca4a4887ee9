"""What a tuning report says, read from the tuner's report dict: trials and their measured points, the winner
and vLLM's defaults, the headline figures, and the figures behind them (Pareto frontier, cost per 1M output
tokens, GPU energy per output token).

The dict may be incomplete (an interrupted run, a trial with no points, fields that are None): every reader
here turns what is missing or malformed into None, never zero. The figures follow REFERENCE.md "Metrics": cost
per 1M output tokens is Artificial Analysis' price per GPU-hour x GPUs x 1e6 / (output tokens/s x 3600); energy
per output token is the GPU energy of the measured window (power integrated over time, all GPUs) over the
output tokens of that window.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tuner.loadgen import PhaseStats
from tuner.tuning.slo import Slo, SloError, check

__all__ = [
    "Headline",
    "Point",
    "Run",
    "Trial",
    "as_mapping",
    "as_number",
    "as_text",
    "closest_point",
    "cost_per_million_output_tokens_usd",
    "headline",
    "joules_per_output_token",
    "pareto_front",
    "run_headline",
]


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


def as_number(value: Any) -> float | None:
    """A finite int or float as a float; None for anything else (bools, text, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def as_mapping(value: Any) -> Mapping[str, Any]:
    """A mapping as is; an empty one for anything else."""
    return value if isinstance(value, Mapping) else {}


def as_text(value: Any) -> str | None:
    """Non-empty text as is; None for anything else."""
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Point:
    """One measured concurrency of a trial, as the report dict holds it."""

    concurrency: int
    passed: bool
    slo_reasons: tuple[str, ...]
    stats: Mapping[str, Any]
    evidence: Mapping[str, Any]
    bound: Mapping[str, Any]
    tokens: Mapping[str, Any]

    def stat(self, name: str) -> float | None:
        """A figure of the phase's stats (``"ttft_p95_s"``, ...); None when missing."""
        return as_number(self.stats.get(name))

    @property
    def tok_s(self) -> float | None:
        """Output tokens/s of the whole server at this point."""
        return self.stat("output_tokens_per_s")

    @property
    def joules_per_token(self) -> float | None:
        """GPU energy per output token of this phase; None without power readings."""
        return joules_per_output_token(
            as_number(self.evidence.get("energy_j")), self.stat("output_tokens_total")
        )

    @classmethod
    def parse(cls, data: Any) -> Point | None:
        """A point from its dict; None when it has no valid concurrency."""
        data = as_mapping(data)
        concurrency = as_number(data.get("concurrency"))
        if concurrency is None or concurrency < 1:
            return None
        reasons = data.get("slo_reasons") or ()
        return cls(
            concurrency=int(concurrency),
            passed=data.get("passed") is True,
            slo_reasons=tuple(str(r) for r in reasons) if isinstance(reasons, (list, tuple)) else (),
            stats=as_mapping(data.get("stats")),
            evidence=as_mapping(data.get("evidence")),
            bound=as_mapping(data.get("bound")),
            tokens=as_mapping(data.get("tokens")),
        )


@dataclass(frozen=True)
class Trial:
    """One trial (one configuration) of the run, with its measured points."""

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
    points: tuple[Point, ...]

    @property
    def best_point(self) -> Point | None:
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
    def parse(cls, index: int, data: Any) -> Trial:
        """The trial at ``index`` of the report's list; missing fields get a placeholder or None."""
        data = as_mapping(data)
        best = as_mapping(data.get("best"))
        best_n, best_tok_s = as_number(best.get("concurrency")), as_number(best.get("output_tokens_per_s"))
        points = tuple(p for p in map(Point.parse, data.get("points") or ()) if p is not None)
        key = as_text(data.get("key")) or f"trial-{index + 1}"
        return cls(
            index=index,
            key=key,
            label=as_text(data.get("label")) or key,
            config=as_mapping(data.get("config")),
            status=as_text(data.get("status")) or "unknown",
            reason=as_text(data.get("reason")),
            log_tail=as_text(data.get("log_tail")),
            is_defaults=data.get("is_defaults") is True,
            startup_s=as_number(data.get("startup_s")),
            best_concurrency=int(best_n) if best_n is not None and best_tok_s is not None else None,
            best_tok_s=best_tok_s if best_n is not None else None,
            points=points,
        )


@dataclass(frozen=True)
class Run:
    """A whole report dict, read: its trials, the winner and vLLM's defaults among them, GPUs and SLO."""

    raw: Mapping[str, Any]
    trials: tuple[Trial, ...]
    winner: Trial | None
    defaults: Trial | None
    gpus: int
    slo: Slo | None

    @classmethod
    def parse(cls, report: Mapping[str, Any]) -> Run:
        """Read a report dict as the tuner wrote it (or as much of it as is there)."""
        trials = tuple(Trial.parse(i, t) for i, t in enumerate(report.get("trials") or ()))
        by_key = {t.key: t for t in trials}
        winner = by_key.get(str(report.get("winner")))
        defaults = by_key.get(str(report.get("defaults"))) or next((t for t in trials if t.is_defaults), None)
        gpus = as_number(report.get("gpus"))
        return cls(report, trials, winner, defaults, int(gpus) if gpus else 0, _slo(report.get("slo")))

    def per_gpu(self, tok_s: float | None) -> float | None:
        """Throughput per GPU (the whole figure on the CPU build)."""
        return None if tok_s is None else tok_s / max(self.gpus, 1)


def _slo(data: Any) -> Slo | None:
    names = {f.name for f in dataclasses.fields(Slo)}
    try:
        return Slo(**{k: v for k, v in as_mapping(data).items() if k in names})
    except (TypeError, SloError):
        return None


def _phase_stats(stats: Mapping[str, Any]) -> PhaseStats | None:
    names = {f.name for f in dataclasses.fields(PhaseStats)} - {"errors"}
    try:
        return PhaseStats(**{k: v for k, v in stats.items() if k in names})
    except TypeError:
        return None


def _margin(slo: Slo | None, point: Point) -> float:
    """How far inside the SLO a point was (negative: how far outside); -inf when it cannot be judged."""
    stats = _phase_stats(point.stats)
    margin = check(slo, stats).margin if slo is not None and stats is not None else None
    return -math.inf if margin is None else margin


def closest_point(slo: Slo | None, trials: Iterable[Trial]) -> tuple[Trial, Point] | None:
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


def run_headline(run: Run) -> Headline:
    """The headline figures of a read report."""
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
            as_number(run.raw.get("price_per_gpu_hour")), run.gpus, w_tok_s
        ),
        joules_per_output_token=best.joules_per_token if best else None,
    )


def headline(report: Mapping[str, Any]) -> Headline:
    """The headline figures of a report dict (what the summary opens with; also for a terminal summary)."""
    return run_headline(Run.parse(report))
