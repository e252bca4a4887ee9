"""What a tuning report says, read from the tuner's report dict (version 2; see ``build_report`` in
``tuner/tuning/tune.py``): the trials and the points each capacity search measured, the ranking and its ties, the
verdict's relaunches, and the figures that sum them up (capacity against vLLM's defaults, cost per 1M output
tokens, GPU energy per output token).

The dict may be incomplete (an interrupted run, a failed trial, fields that are None, a damaged file): every
reader here turns what is missing or malformed into None, never zero. A version-1 dict (an older infertop
measured fixed numbers of concurrent users) is read into the same shapes as far as it can be, so its trials
still show. The figures follow REFERENCE.md "Metrics": cost per 1M output tokens is Artificial Analysis' price
per GPU-hour x GPUs x 1e6 / (output tokens/s x 3600); energy per output token is the GPU energy of the measured
phases (power integrated over time, all GPUs) over the output tokens of those phases.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tuner.tuning.slo import Slo, SloError

__all__ = [
    "Attempt",
    "Capacity",
    "Headline",
    "Interval",
    "Load",
    "Point",
    "Run",
    "Trial",
    "Verdict",
    "as_interval",
    "as_mapping",
    "as_number",
    "as_text",
    "clear_win",
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


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value if v) if isinstance(value, (list, tuple)) else ()


Interval = tuple[float, float | None]
"""A 90 % interval ``(lo, hi)``; ``hi`` None: too few requests to bound the figure from above."""


def as_interval(value: Any) -> Interval | None:
    """``[lo, hi]`` as an interval (``hi`` may be null: unbounded above); None when there is no usable one."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    lo, hi = as_number(value[0]), as_number(value[1])
    if lo is None or (value[1] is not None and hi is None):
        return None
    return (lo, hi)


@dataclass(frozen=True)
class Load:
    """How requests were offered: ``rate`` (Poisson arrivals, requests/s, open loop) or ``users`` (closed loop)."""

    kind: str
    value: float
    label: str

    @classmethod
    def parse(cls, data: Any) -> Load | None:
        data = as_mapping(data)
        kind, value = as_text(data.get("kind")), as_number(data.get("value"))
        if kind not in ("rate", "users") or value is None or value <= 0:
            return None
        fallback = (
            f"{value:.3g} req/s" if kind == "rate" else f"{value:.0f} user" + ("" if value == 1 else "s")
        )
        return cls(kind, value, as_text(data.get("label")) or fallback)


@dataclass(frozen=True, eq=False)  # compared by identity: one object per dict read
class Point:
    """One load held on one server and judged (``tuner.tuning.points.Point.to_dict``), read."""

    load: Load | None
    role: str  # scout | judged | proof | production; "measured" for a version-1 point (no intervals)
    decision: str  # pass | fail | uncertain
    passed: bool
    reasons: tuple[str, ...]
    uncertain: tuple[str, ...]
    steady: Mapping[str, Any]  # steady-window figures with their intervals (tuner.loadgen.steady.SteadyStats)
    phases: tuple[Mapping[str, Any], ...]  # every phase pooled into it, as tuner.measure stores them
    disturbed: str | None
    aborted: str | None

    def figure(self, name: str) -> float | None:
        """A steady-window figure (``"ttft_p95_s"``, ...); None when missing."""
        return as_number(self.steady.get(name))

    @property
    def tok_s(self) -> float | None:
        return self.figure("output_tokens_per_s")

    @property
    def tok_s_ci(self) -> Interval | None:
        return as_interval(self.steady.get("output_tokens_per_s_ci"))

    @property
    def ttft_p95_ci(self) -> Interval | None:
        return as_interval(self.steady.get("ttft_p95_ci_s"))

    @property
    def tpot_p95_ci(self) -> Interval | None:
        return as_interval(self.steady.get("tpot_p95_ci_s"))

    @property
    def requests(self) -> int | None:
        ok = as_number(self.steady.get("requests_ok"))
        return None if ok is None else int(ok)

    @property
    def evidence(self) -> Mapping[str, Any]:
        return as_mapping(self.phases[-1].get("evidence")) if self.phases else {}

    @property
    def bound(self) -> Mapping[str, Any]:
        return as_mapping(self.phases[-1].get("bound")) if self.phases else {}

    @property
    def joules_per_token(self) -> float | None:
        """GPU energy of the point's phases over the output tokens they generated; None without power readings."""
        if not self.phases:
            return None
        energy = [as_number(as_mapping(p.get("evidence")).get("energy_j")) for p in self.phases]
        tokens = [as_number(as_mapping(p.get("stats")).get("output_tokens_total")) for p in self.phases]
        if any(e is None for e in energy) or any(t is None for t in tokens):
            return None
        return joules_per_output_token(sum(e or 0.0 for e in energy), sum(t or 0.0 for t in tokens))

    @property
    def token_notes(self) -> tuple[str, ...]:
        """What the client-vs-server token cross-check found wrong in any phase."""
        checks = (as_mapping(p.get("tokens")) for p in self.phases)
        return tuple(str(c.get("note")) for c in checks if c.get("mismatch") is True and c.get("note"))

    def why(self) -> str:
        """One line: why it did not pass, what an interval straddled, or that it passed."""
        if self.aborted:
            return self.aborted
        if self.decision == "uncertain":
            return "at the limit: " + (
                "; ".join(self.uncertain or self.reasons) or "an interval straddles it"
            )
        if not self.passed:
            return "; ".join(self.reasons) or ("failed" if self.decision == "fail" else "n/a")
        if self.role in ("scout", "measured"):
            return "within the SLO on point estimates"
        return "every interval inside the SLO"

    @classmethod
    def parse(cls, data: Any) -> Point:
        data = as_mapping(data)
        decision = as_text(data.get("decision")) or ("pass" if data.get("passed") is True else "n/a")
        aborted = as_text(data.get("aborted"))
        return cls(
            load=Load.parse(data.get("load")),
            role=as_text(data.get("role")) or "judged",
            decision=decision,
            passed=data.get("passed") is True,
            reasons=_texts(data.get("reasons")),
            uncertain=_texts(data.get("uncertain")),
            # An aborted point measured nothing: its stored zeros are no figures.
            steady={} if aborted else as_mapping(data.get("steady")),
            phases=tuple(as_mapping(p) for p in data.get("phases") or () if isinstance(p, Mapping)),
            disturbed=as_text(data.get("disturbed")),
            aborted=aborted,
        )

    @classmethod
    def parse_v1(cls, data: Any) -> Point | None:
        """A version-1 point (one phase at a fixed concurrency, no intervals); None without a concurrency."""
        data = as_mapping(data)
        users = as_number(data.get("concurrency"))
        if users is None or users < 1:
            return None
        stats = as_mapping(data.get("stats"))
        names = ("output_tokens_per_s", "requests_ok", "ttft_p95_s", "tpot_p95_s", "user_tok_per_s_p50")
        passed = data.get("passed") is True
        return cls(
            load=Load("users", users, f"{users:.0f} user" + ("" if users == 1 else "s")),
            role="measured",
            decision="pass" if passed else "fail",
            passed=passed,
            reasons=_texts(data.get("slo_reasons")),
            uncertain=(),
            steady={k: stats.get(k) for k in names},
            phases=({k: data.get(k) for k in ("stats", "evidence", "bound", "tokens")},),
            disturbed=None,
            aborted=None,
        )


@dataclass(frozen=True, eq=False)  # compared by identity: one object per dict read
class Capacity:
    """What a capacity search found on one server: ``best`` passed, ``ceiling`` is the lowest load above it
    that did not (None: the search ended for another reason, told by ``note``)."""

    objective: str | None
    note: str | None
    points: tuple[Point, ...]
    best: Point | None
    ceiling: Point | None

    @property
    def lo(self) -> float | None:
        return self.best.load.value if self.best and self.best.load else None

    @property
    def hi(self) -> float | None:
        return self.ceiling.load.value if self.ceiling and self.ceiling.load else None

    @classmethod
    def parse(cls, data: Any) -> Capacity | None:
        if not isinstance(data, Mapping):
            return None
        points = tuple(Point.parse(p) for p in data.get("points") or () if isinstance(p, Mapping))

        def at(name: str) -> Point | None:
            i = data.get(name)
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(points):
                return points[i]
            return None

        return cls(
            as_text(data.get("objective")), as_text(data.get("note")), points, at("best"), at("ceiling")
        )

    @classmethod
    def parse_v1(cls, data: Mapping[str, Any]) -> Capacity | None:
        """A version-1 trial's points as a capacity in users: the best concurrency, and the lowest failing
        concurrency above it."""
        points = tuple(p for p in map(Point.parse_v1, data.get("points") or ()) if p is not None)
        if not points:
            return None
        best_n = as_number(as_mapping(data.get("best")).get("concurrency"))
        best = next((p for p in points if p.passed and p.load and p.load.value == best_n), None)
        above = [p for p in points if not p.passed and p.load and (best_n is None or p.load.value > best_n)]
        ceiling = min(above, key=lambda p: p.load.value if p.load else 0.0, default=None) if best else None
        return cls("users", None, points, best, ceiling)


@dataclass(frozen=True, eq=False)  # compared by identity: one object per dict read
class Trial:
    """One configuration of the run: how it went and its capacity (None: never measured)."""

    index: int
    key: str
    label: str
    config: Mapping[str, Any]
    status: str
    reason: str | None
    log_tail: str | None
    is_defaults: bool
    startup_s: float | None
    distance: int | None  # dimensions set beyond vLLM's defaults
    capacity: Capacity | None
    predicted: float | None = None  # the performance model's capacity (the objective's unit)
    pct_of_ceiling: float | None = None  # best load's tok/s over the memory-bandwidth decode ceiling, %
    replicas: int = 1  # servers of this configuration the node holds: its capacity is one replica's
    layout: str | None = None  # "8 x TP 1"

    @property
    def points(self) -> tuple[Point, ...]:
        return self.capacity.points if self.capacity else ()

    @property
    def best_point(self) -> Point | None:
        return self.capacity.best if self.capacity else None

    @classmethod
    def parse(cls, index: int, data: Any) -> Trial:
        """The trial at ``index`` of the report's list; missing fields get a placeholder or None."""
        data = as_mapping(data)
        key = as_text(data.get("key")) or f"trial-{index + 1}"
        distance = as_number(data.get("distance_from_defaults"))
        capacity = (
            Capacity.parse(data.get("capacity")) if "capacity" in data or "points" not in data else None
        ) or Capacity.parse_v1(data)
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
            distance=None if distance is None else int(distance),
            capacity=capacity,
            predicted=as_number(data.get("predicted")),
            pct_of_ceiling=as_number(as_mapping(data.get("roofline")).get("pct_of_ceiling")),
            replicas=max(1, int(as_number(as_mapping(data.get("layout")).get("replicas")) or 1)),
            layout=as_text(as_mapping(data.get("layout")).get("label")),
        )


@dataclass(frozen=True, eq=False)  # compared by identity: one object per dict read
class Attempt:
    """One relaunch of vLLM from the exported file: start-up, the proof at the capacity, production checks."""

    key: str | None
    label: str
    yaml: str | None
    error: str | None
    startup_s: float | None
    proof: Point | None
    proof_ratio: float | None  # open loop: requests completed over arrivals in the proof's window
    proof_ok: bool
    checks: tuple[Point, ...]
    replicas: int = 1  # servers of the layout, loaded together as the node
    predicted_node_tokens_per_s: float | None = None  # the trial's tok/s times the replicas

    @property
    def held(self) -> Point | None:
        """The first production check that passed: the operating point this relaunch supports."""
        return next((c for c in self.checks if c.passed), None)

    @classmethod
    def parse(cls, data: Any) -> Attempt:
        data = as_mapping(data)
        proof = data.get("proof")
        return cls(
            key=as_text(data.get("key")),
            label=as_text(data.get("label")) or as_text(data.get("key")) or "n/a",
            yaml=as_text(data.get("yaml")),
            error=as_text(data.get("error")),
            startup_s=as_number(data.get("startup_s")),
            proof=Point.parse(proof) if isinstance(proof, Mapping) else None,
            proof_ratio=as_number(data.get("proof_ratio")),
            proof_ok=data.get("proof_ok") is True,
            checks=tuple(Point.parse(c) for c in data.get("checks") or () if isinstance(c, Mapping)),
            replicas=max(1, int(as_number(data.get("replicas")) or 1)),
            predicted_node_tokens_per_s=as_number(data.get("predicted_node_tokens_per_s")),
        )


@dataclass(frozen=True, eq=False)  # compared by identity: one object per dict read
class Verdict:
    """Whether the exported file held on a relaunched server (``tuner.tuning.verdict.Verdict.to_dict``)."""

    status: str  # proven | backed_off | not_proven | unverified
    headline: str | None
    key: str | None
    label: str | None
    operating_point: Load | None
    figures: Mapping[str, Any]  # at the operating point: tok/s, TTFT and TPOT p95, each with its interval
    attempts: tuple[Attempt, ...]

    @property
    def chosen_attempt(self) -> Attempt | None:
        """The relaunch whose production check became the operating point."""
        return next((a for a in self.attempts if a.key == self.key and a.held is not None), None)

    @classmethod
    def parse(cls, data: Any) -> Verdict | None:
        if not isinstance(data, Mapping):
            return None
        return cls(
            status=as_text(data.get("status")) or "unknown",
            headline=as_text(data.get("headline")),
            key=as_text(data.get("key")),
            label=as_text(data.get("label")),
            operating_point=Load.parse(data.get("operating_point")),
            figures=as_mapping(data.get("operating_point_figures")),
            attempts=tuple(Attempt.parse(a) for a in data.get("attempts") or () if isinstance(a, Mapping)),
        )


@dataclass(frozen=True, eq=False)  # compared by identity: one object per dict read
class Run:
    """A whole report dict, read: trials in ranking order, the winner and vLLM's defaults among them, the
    verdict, GPUs and SLO. ``version`` 1 is an older infertop's report: no verdict, no intervals."""

    raw: Mapping[str, Any]
    version: int | None
    trials: tuple[Trial, ...]
    ranking: tuple[Trial, ...]
    winner: Trial | None
    defaults: Trial | None
    ties: tuple[str, ...]
    verdict: Verdict | None
    gpus: int
    slo: Slo | None

    @property
    def legacy(self) -> bool:
        return self.version == 1

    @property
    def objective(self) -> str | None:
        return as_text(self.raw.get("objective")) or ("users" if self.legacy else None)

    @property
    def price_per_gpu_hour(self) -> float | None:
        return as_number(self.raw.get("price_per_gpu_hour"))

    @property
    def resolution(self) -> float:
        return as_number(as_mapping(self.raw.get("workload")).get("resolution")) or 0.10

    def trial(self, key: str | None) -> Trial | None:
        return next((t for t in self.trials if t.key == key), None) if key else None

    def per_gpu(self, tok_s: float | None) -> float | None:
        """Throughput per GPU (the whole figure on the CPU build)."""
        return None if tok_s is None else tok_s / max(self.gpus, 1)

    @classmethod
    def parse(cls, report: Mapping[str, Any]) -> Run:
        """Read a report dict as the tuner wrote it (or as much of it as is there)."""
        raw_trials = report.get("trials")
        trials = tuple(
            Trial.parse(i, t) for i, t in enumerate(raw_trials if isinstance(raw_trials, list) else ())
        )
        by_key = {t.key: t for t in trials}
        ranked = [by_key[k] for k in report.get("ranking") or () if isinstance(k, str) and k in by_key]
        defaults = by_key.get(str(report.get("defaults"))) or next((t for t in trials if t.is_defaults), None)
        gpus = as_number(report.get("gpus"))
        version = as_number(report.get("version"))
        return cls(
            raw=report,
            version=None if version is None else int(version),
            trials=trials,
            ranking=tuple(dict.fromkeys(ranked)),
            winner=by_key.get(str(report.get("winner"))),
            defaults=defaults,
            ties=_texts(report.get("ties")),
            verdict=Verdict.parse(report.get("verdict")),
            gpus=int(gpus) if gpus else 0,
            slo=_slo(report.get("slo")),
        )


def _slo(data: Any) -> Slo | None:
    names = {f.name for f in dataclasses.fields(Slo)}
    try:
        return Slo(**{k: v for k, v in as_mapping(data).items() if k in names})
    except (TypeError, SloError):
        return None


def clear_win(
    a: Capacity | None, b: Capacity | None, resolution: float, a_replicas: int = 1, b_replicas: int = 1
) -> bool:
    """``a``'s node held a load ``b``'s did not (or within ``resolution`` above the most ``b`` held, when ``b``
    never failed): a difference beyond the measurements' uncertainty, as ``tuner.tuning.capacity.beats`` rules.
    Each capacity is one replica's; its node holds ``*_replicas`` of them."""
    if a is None or a.lo is None:
        return False
    if b is None or b.lo is None:
        return True
    a_lo, b_lo = a.lo * a_replicas, b.lo * b_replicas
    upper = (b.hi if b.hi is not None else b.lo * (1 + resolution)) * b_replicas
    return a_lo >= upper and a_lo > b_lo


# --- the headline --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """The run in a few numbers. None = not known (never zero)."""

    text: str | None  # the result's first line (PROVEN, NOT PROVEN, ...)
    winner_label: str | None
    capacity_ratio: float | None  # winner's capacity / the defaults', same load kind
    clear_win: bool  # the winner held a load vLLM's defaults did not
    figures_at: Point | None  # where cost and energy are measured: the operating point, else the best load
    figures_at_operating_point: bool
    output_tokens_per_s: float | None
    cost_per_million_output_tokens_usd: float | None
    joules_per_output_token: float | None
    power_w: float | None = (
        None  # the node's GPUs at that load, measured (the trial's replica times replicas)
    )
    gpus: int = 0  # the node's GPUs: per-GPU figures count idle ones too

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        return self.output_tokens_per_s / self.gpus if self.output_tokens_per_s and self.gpus else None

    @property
    def tokens_per_s_per_kw(self) -> float | None:
        if not self.output_tokens_per_s or not self.power_w:
            return None
        return self.output_tokens_per_s / (self.power_w / 1000.0)


def run_headline(run: Run) -> Headline:
    """The headline figures of a read report."""
    w, d = run.winner, run.defaults
    wc, dc = (w.capacity if w else None), (d.capacity if d else None)
    wl = wc.best.load if wc and wc.best else None
    dl = dc.best.load if dc and dc.best else None
    wr, dr = (w.replicas if w else 1), (d.replicas if d else 1)
    # Nodes against nodes: one replica's capacity times the replicas each layout holds.
    ratio = wl.value * wr / (dl.value * dr) if wl and dl and wl.kind == dl.kind else None
    attempt = run.verdict.chosen_attempt if run.verdict else None
    at = attempt.held if attempt else None
    on_op = at is not None
    if at is None:
        at = w.best_point if w else None
    tok_s = at.tok_s if at else None
    power = as_number(at.evidence.get("power_w_mean")) if at else None
    if not on_op and tok_s is not None:
        # The search measured one replica; the node runs them all (the proof measures them together).
        tok_s *= wr
        power = power * wr if power is not None else None
    text = as_text(run.raw.get("headline")) or (run.verdict.headline if run.verdict else None)
    return Headline(
        text=text,
        winner_label=w.label if w else None,
        capacity_ratio=ratio,
        clear_win=clear_win(wc, dc, run.resolution, wr, dr) if w is not d else False,
        figures_at=at,
        figures_at_operating_point=on_op,
        output_tokens_per_s=tok_s,
        cost_per_million_output_tokens_usd=cost_per_million_output_tokens_usd(
            run.price_per_gpu_hour, run.gpus, tok_s
        ),
        joules_per_output_token=at.joules_per_token if at else None,
        power_w=power,
        gpus=run.gpus,
    )


def headline(report: Mapping[str, Any]) -> Headline:
    """The headline figures of a report dict (what the summary opens with; also for a terminal summary)."""
    return run_headline(Run.parse(report))
