"""Latency targets (SLOs) a tuned configuration must meet, and the check of one measured phase against them.

An SLO bounds three things: time to first token (TTFT), per-user output speed (tokens/s per user = 1/TPOT,
so a floor of 33.3 tok/s is a TPOT ceiling of 30 ms) and the share of failed requests. Presets come from
MLPerf Inference (server and interactive scenarios) and Artificial Analysis' per-user speed tiers; see
REFERENCE.md "SLO presets".

MLPerf judges its limits at p99 over runs of at least 600 s. Tuning phases last tens of seconds, where a p99
rests on a handful of requests and swings from run to run, so infertop judges the same limits at p95 and says
so (:data:`JUDGED_AT`). A configuration that passes here is a strong candidate for an MLPerf-style run, not a
certified result.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from tuner.loadgen.steady import SteadyStats, min_requests_for

__all__ = ["JUDGED_AT", "PRESETS", "Slo", "SloError", "SloVerdict", "check", "judge", "parse_slo"]

JUDGED_AT = "p95"
"""The percentile at which TTFT and TPOT are judged (MLPerf uses p99 over >= 600 s; see the module docstring)."""


class SloError(ValueError):
    """An SLO preset name or spec that cannot be understood. The message is one line for people."""


@dataclass(frozen=True, slots=True)
class Slo:
    """Limits one phase must meet. ``None`` = no limit on that figure."""

    name: str
    ttft_p95_max_s: float | None
    tok_s_per_user_min: float | None  # judged as TPOT p95 <= 1 / this
    error_rate_max: float = 0.01  # failed / (ok + failed); cancelled requests do not count
    source: str = ""  # where the numbers come from, for reports

    def __post_init__(self) -> None:
        if self.ttft_p95_max_s is not None and not self.ttft_p95_max_s > 0:
            raise SloError(f"the TTFT limit must be > 0 s, got {self.ttft_p95_max_s}")
        if self.tok_s_per_user_min is not None and not self.tok_s_per_user_min > 0:
            raise SloError(f"the per-user speed floor must be > 0 tok/s, got {self.tok_s_per_user_min}")
        if not 0.0 <= self.error_rate_max < 1.0:
            raise SloError(f"the error-rate limit must be in [0, 1), got {self.error_rate_max}")

    @property
    def judged_at(self) -> str:
        """The percentile the latency limits are checked at ("p95")."""
        return JUDGED_AT

    @property
    def tpot_p95_max_s(self) -> float | None:
        """The per-user speed floor as a TPOT ceiling in seconds."""
        return None if self.tok_s_per_user_min is None else 1.0 / self.tok_s_per_user_min

    def describe(self) -> str:
        """One line: "TTFT p95 <= 0.50 s, >= 33.3 tok/s per user (TPOT p95 <= 30.0 ms), errors <= 1 %"."""
        parts = []
        if self.ttft_p95_max_s is not None:
            parts.append(f"TTFT {JUDGED_AT} <= {self.ttft_p95_max_s:.2f} s")
        if self.tok_s_per_user_min is not None and self.tpot_p95_max_s is not None:
            parts.append(
                f">= {self.tok_s_per_user_min:.1f} tok/s per user "
                f"(TPOT {JUDGED_AT} <= {self.tpot_p95_max_s * 1000:.1f} ms)"
            )
        parts.append(f"errors <= {self.error_rate_max * 100:g} %")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the trial store keeps it to check a resumed run against)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Slo:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


_MLPERF = "MLPerf Inference {model} {scenario} scenario: TTFT {ttft_ms} ms, TPOT {tpot_ms} ms (p99 there)"
# Artificial Analysis publishes per-user output-speed floors but, in our sources, no single TTFT value (its
# tiers are model-specific and "market-derived"). The 2 s TTFT ceiling of the aa-* presets is our choice,
# MLPerf's server-scenario TTFT limit; override it with e.g. "aa-100,ttft=1".
_AA = "Artificial Analysis per-user output-speed tier {tps} tok/s; TTFT ceiling 2 s is infertop's choice"


def _mlperf(model: str, scenario: str, ttft_ms: int, tpot_ms: int) -> Slo:
    return Slo(
        name=f"mlperf-{model}-{scenario}",
        ttft_p95_max_s=ttft_ms / 1000,
        tok_s_per_user_min=1000 / tpot_ms,
        source=_MLPERF.format(model=model, scenario=scenario, ttft_ms=ttft_ms, tpot_ms=tpot_ms),
    )


def _aa(tok_s: int) -> Slo:
    return Slo(name=f"aa-{tok_s}", ttft_p95_max_s=2.0, tok_s_per_user_min=tok_s, source=_AA.format(tps=tok_s))


PRESETS: dict[str, Slo] = {
    slo.name: slo
    for slo in (
        _mlperf("llama3.1-8b", "server", 2000, 100),
        _mlperf("llama3.1-8b", "interactive", 500, 30),
        _mlperf("llama2-70b", "server", 2000, 200),
        _mlperf("llama2-70b", "interactive", 450, 40),
        _aa(30),
        _aa(100),
        _aa(300),
    )
}
"""Named SLOs. MLPerf TPOT limits are kept exact: 30 ms is 33.33 tok/s per user, not 33."""


# --- parsing -------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s)?$", re.IGNORECASE)


def _seconds(key: str, text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise SloError(f"{key}={text}: expected seconds (0.5, 0.5s) or milliseconds (500ms)")
    value = float(match.group(1))
    return value / 1000 if (match.group(2) or "").lower() == "ms" else value


def _number(key: str, text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise SloError(f"{key}={text}: expected a number") from None
    if not math.isfinite(value):
        raise SloError(f"{key}={text}: expected a finite number")
    return value / 100 if text.strip().endswith("%") else value


def parse_slo(preset_or_spec: str) -> Slo:
    """An SLO from a preset name, a spec, or a preset followed by overrides.

    Spec keys: ``ttft`` (seconds, or ``500ms``), ``tps`` (tokens/s per user) or ``tpot`` (seconds or ms per
    output token, the same limit written the other way), ``err`` (a fraction, or ``1%``). Examples:
    ``"mlperf-llama3.1-8b-interactive"``, ``"ttft=0.5,tps=30,err=0.01"``, ``"aa-100,ttft=1"``.

    Raises:
        SloError: unknown preset or key, bad number, or a spec without any latency limit.
    """
    parts = [p.strip() for p in preset_or_spec.split(",") if p.strip()]
    if not parts:
        raise SloError(f"empty SLO; give a preset ({', '.join(PRESETS)}) or a spec like ttft=0.5,tps=30")
    base: Slo | None = None
    if "=" not in parts[0]:
        base = PRESETS.get(parts[0].lower())
        if base is None:
            raise SloError(f"unknown SLO preset {parts[0]!r}; presets: {', '.join(PRESETS)}")
        parts = parts[1:]
    fields: dict[str, Any] = {} if base is None else base.to_dict()
    overrides = []
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise SloError(f"{part!r}: expected key=value (keys: ttft, tps, tpot, err)")
        if key == "ttft":
            fields["ttft_p95_max_s"] = _seconds(key, value)
        elif key == "tps":
            fields["tok_s_per_user_min"] = _number(key, value)
        elif key == "tpot":
            tpot_s = _seconds(key, value)
            if tpot_s <= 0:
                raise SloError(f"{part}: TPOT must be > 0")
            fields["tok_s_per_user_min"] = 1.0 / tpot_s
        elif key == "err":
            fields["error_rate_max"] = _number(key, value)
        else:
            raise SloError(f"unknown SLO key {key!r} in {part!r}; keys: ttft, tps, tpot, err")
        overrides.append(f"{key}={value.strip()}")
    fields.setdefault("ttft_p95_max_s", None)
    fields.setdefault("tok_s_per_user_min", None)
    if fields["ttft_p95_max_s"] is None and fields["tok_s_per_user_min"] is None:
        raise SloError("an SLO needs a latency limit: ttft=SECONDS and/or tps=TOKENS_PER_S_PER_USER")
    if base is None:
        fields["name"] = "custom(" + ",".join(overrides) + ")"
        fields["source"] = "given by the operator"
    elif overrides:
        fields["name"] = f"{base.name}({','.join(overrides)})"
        fields["source"] = f"{base.source}; overridden: {', '.join(overrides)}"
    return Slo(**fields)


# --- checking ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SloVerdict:
    """Whether a phase met an SLO, and by how much.

    Margins are relative headroom per limit: (limit - measured) / limit for ceilings, (measured - floor) /
    floor for the speed floor; positive = inside the limit, negative = over it, None = not limited or not
    measured. ``reasons`` says in words which limit failed ("TTFT p95 0.82 s > 0.50 s").
    """

    passed: bool
    reasons: tuple[str, ...]
    ttft_margin: float | None = None
    tok_s_margin: float | None = None
    error_margin: float | None = None
    judged_at: str = JUDGED_AT
    decision: str = ""  # "pass", "fail" or "uncertain" (an interval straddles a limit); "" = from passed
    uncertain: tuple[str, ...] = ()  # which limits an interval straddles, in words

    def __post_init__(self) -> None:
        if not self.decision:
            object.__setattr__(self, "decision", "pass" if self.passed else "fail")

    @property
    def margin(self) -> float | None:
        """The tightest of the margins (how close the phase came to failing); None when nothing was limited."""
        margins = [m for m in (self.ttft_margin, self.tok_s_margin, self.error_margin) if m is not None]
        return min(margins) if margins else None


class _Judged(Protocol):
    """What a verdict reads: PhaseStats (a whole phase) and SteadyStats (its steady window) both have it."""

    @property
    def requests_ok(self) -> int: ...
    @property
    def requests_failed(self) -> int: ...
    @property
    def ttft_p95_s(self) -> float | None: ...
    @property
    def tpot_p95_s(self) -> float | None: ...


def check(slo: Slo, stats: _Judged) -> SloVerdict:
    """Judge one phase's point estimates against ``slo``. A figure the SLO limits but the phase lacks fails."""
    reasons: list[str] = []
    finished = stats.requests_ok + stats.requests_failed
    if finished == 0:
        return SloVerdict(passed=False, reasons=("no request finished in this phase",))

    error_rate = stats.requests_failed / finished
    if slo.error_rate_max > 0:
        error_margin = (slo.error_rate_max - error_rate) / slo.error_rate_max
    else:
        error_margin = 0.0 if error_rate == 0 else -math.inf
    if error_rate > slo.error_rate_max:
        reasons.append(
            f"error rate {error_rate * 100:.1f} % ({stats.requests_failed} of {finished} requests failed)"
            f" > {slo.error_rate_max * 100:g} %"
        )

    ttft_margin = None
    if slo.ttft_p95_max_s is not None:
        if stats.ttft_p95_s is None:
            reasons.append(f"no TTFT measured (no request succeeded), limit {slo.ttft_p95_max_s:.2f} s")
        else:
            ttft_margin = (slo.ttft_p95_max_s - stats.ttft_p95_s) / slo.ttft_p95_max_s
            if stats.ttft_p95_s > slo.ttft_p95_max_s:
                reasons.append(f"TTFT {JUDGED_AT} {stats.ttft_p95_s:.2f} s > {slo.ttft_p95_max_s:.2f} s")

    tok_s_margin = None
    if slo.tok_s_per_user_min is not None:
        if stats.tpot_p95_s is not None and stats.tpot_p95_s <= 0:
            pass  # every token arrived in one burst with the first: no wait between tokens, the floor holds
        elif stats.tpot_p95_s is None:
            reasons.append(
                f"no per-user speed measured (no request with 2+ output tokens), "
                f"floor {slo.tok_s_per_user_min:.1f} tok/s"
            )
        else:
            tok_s = 1.0 / stats.tpot_p95_s
            tok_s_margin = (tok_s - slo.tok_s_per_user_min) / slo.tok_s_per_user_min
            if tok_s < slo.tok_s_per_user_min:
                reasons.append(
                    f"per-user speed {tok_s:.1f} tok/s (TPOT {JUDGED_AT} {stats.tpot_p95_s * 1000:.1f} ms)"
                    f" < {slo.tok_s_per_user_min:.1f} tok/s"
                )

    return SloVerdict(
        passed=not reasons,
        reasons=tuple(reasons),
        ttft_margin=ttft_margin,
        tok_s_margin=tok_s_margin,
        error_margin=error_margin,
    )


QUEUE_GROWTH_SHARE = 0.3
"""Open loop: a median TTFT that rises by this share of the TTFT limit across the window is a queue building
(the server falls behind the arrivals), a failure even while the p95 is still under the limit."""


KEEP_UP_SHARE = 0.9
"""Open loop: a server that finishes fewer than this share of the window's arrivals, by more than chance allows,
falls behind them (its backlog grows without bound): a failure whatever its latencies show so far."""
BACKLOG_SIGMAS = 3.0


def falling_behind(steady: SteadyStats) -> str | None:
    """Why an open-loop window shows a server falling behind its arrivals, or None.

    A steady server's requests in flight vary about their mean by about its square root (a Poisson count), so
    the growth from the window's opening to its close varies by about sqrt(open + close): only a backlog
    beyond ``BACKLOG_SIGMAS`` of that, and a material one (under ``KEEP_UP_SHARE`` of the arrivals finished),
    is a server falling behind.
    """
    a, f, growth = steady.arrived, steady.finished, steady.backlog_growth
    if a <= 0:
        return None
    close = steady.in_flight_open + a - f
    if (
        growth > BACKLOG_SIGMAS * math.sqrt(steady.in_flight_open + close + 1)
        and growth > (1 - KEEP_UP_SHARE) * a
    ):
        return (
            f"falling behind the arrivals: {a} requests arrived in the window, {f} finished "
            f"(the backlog grew by {growth:.0f})"
        )
    return None


def judge(slo: Slo, steady: SteadyStats, *, open_loop: bool = False) -> SloVerdict:
    """Judge a steady window with its intervals: ``pass`` when every interval clears its limit, ``fail`` when
    one lies wholly beyond it (or the point estimates fail on errors or a growing queue), ``uncertain``
    otherwise: measure more. A p95 needs ``min_requests_for(95)`` (59) requests before it can pass at all."""
    point = check(slo, steady)
    reasons = list(point.reasons)
    clear_fail = False
    uncertain: list[str] = []
    if steady.requests_ok + steady.requests_failed > 0:
        error_rate = steady.requests_failed / (steady.requests_ok + steady.requests_failed)
        clear_fail = error_rate > slo.error_rate_max
    limits = (
        ("TTFT", slo.ttft_p95_max_s, steady.ttft_p95_s, steady.ttft_p95_ci_s),
        ("TPOT", slo.tpot_p95_max_s, steady.tpot_p95_s, steady.tpot_p95_ci_s),
    )
    needed = min_requests_for(95, steady.confidence)
    for name, limit, estimate, ci in limits:
        if limit is None or estimate is None:
            if limit is not None and estimate is None and name == "TTFT":
                clear_fail = True  # nothing succeeded: nothing to wait for
            continue
        lo, hi = ci if ci is not None else (estimate, None)
        if lo > limit:
            clear_fail = True
        elif hi is None:
            uncertain.append(
                f"{steady.requests_ok} requests cannot bound the {name} {JUDGED_AT} from above (it takes {needed})"
            )
        elif hi > limit or estimate > limit:
            uncertain.append(f"{name} {JUDGED_AT} interval {_figure(name, lo)}-{_figure(name, hi)} straddles "
                             f"the limit {_figure(name, limit)}")  # fmt: skip
    growth = steady.ttft_growth_s
    limit = slo.ttft_p95_max_s
    if open_loop and limit is not None and growth is not None and growth > QUEUE_GROWTH_SHARE * limit:
        clear_fail = True
        reasons.append(f"queue building: median TTFT rose {growth:.2f} s across the window")
    behind = falling_behind(steady) if open_loop else None
    if behind is not None:
        clear_fail = True
        reasons.append(behind)
    if clear_fail:
        decision = "fail"
    elif uncertain:
        decision = "uncertain"
    else:
        decision = "pass" if not reasons else "uncertain"
    return replace(
        point,
        passed=decision == "pass",
        reasons=tuple(reasons),
        decision=decision,
        uncertain=tuple(uncertain),
    )


def _figure(name: str, seconds: float) -> str:
    return f"{seconds:.2f} s" if name == "TTFT" else f"{seconds * 1000:.1f} ms"
