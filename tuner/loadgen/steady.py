"""The steady part of a phase, and how sure its figures are.

A phase ramps up (a closed loop starts every stream at once; under open-loop arrivals the server's batch and
queue fill) and drains (after the last request is issued, ever fewer are in flight). Neither is the load being
measured, so the figures that judge an SLO come from the **steady window** between them: it opens one median
request time after the phase starts (at most a third of the issuing span) and closes when the last request is
issued. Requests *started* inside it count for latency; tokens *delivered* inside it count for throughput.

Every figure carries an interval at ``confidence`` (two-sided, 90 % by default):

* latency percentiles (TTFT, TPOT p95): the distribution-free interval between two order statistics of the
  window's requests (the count of requests below the true p95 is binomial). A percentile bootstrap was tried
  first and rejected: for a tail percentile over tens of requests it is biased low (50 requests of a known
  p95 of 0.499 s gave a "90 %" bootstrap interval of 0.455-0.490 s, missing it). The exact interval is honest
  instead: with fewer than 59 requests nothing bounds a p95 from above at 95 %, so its top is unbounded
  (None) and a limit cannot be cleared; :func:`min_requests_for` says how many a percentile needs;
* output tokens/s: a bootstrap over sub-windows of about a second (at least 4, at most 12), the mean of their
  rates, so that bursts and stalls widen it;

and the phase says whether its queue grew (open loop: TTFT of the window's last third against its first) and
whether the server kept up with the arrivals: the requests in flight at the window's close against its
opening (every arrival in the window that did not finish in it). A server that serves fewer requests than
arrive builds a backlog without bound, however long its TTFT takes to show it: vLLM admits hundreds of
sequences into one batch, so a short phase can pass its latency limits while the backlog grows.
Phases at the same load are pooled (:func:`steady_stats` takes several), which is how a point whose interval
straddles a limit is measured further. Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.loadgen.stats import RequestResult, percentile

DEFAULT_CONFIDENCE = 0.90
BOOTSTRAP_RESAMPLES = 400
SUBWINDOW_S = 1.0
MIN_SUBWINDOWS, MAX_SUBWINDOWS = 4, 12
MIN_WINDOW_SHARE = (
    0.25  # a steady window shorter than this share of the phase is no window: use the whole phase
)


@dataclass(frozen=True, slots=True)
class PhaseWindow:
    """One phase's requests and its steady window (seconds from the start of its measured window)."""

    requests: Sequence[RequestResult]
    start_s: float
    end_s: float
    whole_phase: bool = False  # no steady state could be told apart: the window is the whole phase


@dataclass(frozen=True, slots=True)
class SteadyStats:
    """Figures over the steady window(s), each with its interval. None: not measured (no request)."""

    phases: int
    window_s: float
    requests_ok: int  # requests started in the window(s) that succeeded
    requests_failed: int
    output_tokens_per_s: float
    output_tokens_per_s_ci: tuple[float, float] | None
    # Requests completed per second: the window's delivered tokens over the tokens a request asks for. Counting
    # starts inside the window instead is biased: a closed loop of equal requests starts them in bursts (one per
    # round), and a window edge that cuts a burst counted a quarter too many on the CPU build.
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p95_ci_s: tuple[float, float | None] | None  # top None: too few requests to bound it from above
    tpot_p50_s: float | None
    tpot_p95_s: float | None
    tpot_p95_ci_s: tuple[float, float | None] | None
    user_tok_per_s_p50: float | None  # 1 / TPOT of the median request
    ttft_growth_s: float | None  # median TTFT of the window's last third minus its first third
    whole_phase: bool  # some phase had no steady part: its figures include ramp and drain
    arrivals_per_s: float = 0.0  # requests issued per second over the whole issuing span (the load offered)
    arrived: int = 0  # requests started in the window(s)
    finished: int = 0  # requests (any outcome) that ended in the window(s)
    in_flight_open: int = 0  # requests in flight when the window(s) opened
    # How many more requests were in flight at the window's close than a steady server would hold there: the
    # growth (arrived - finished) less what the ramp still owed when the window opened (see _backlog).
    backlog_growth: float = 0.0
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def requests(self) -> int:
        return self.requests_ok + self.requests_failed


def steady_window(requests: Sequence[RequestResult]) -> PhaseWindow:
    """The steady window of one phase's measured requests (see the module docstring)."""
    if not requests:
        return PhaseWindow(requests, 0.0, 0.0, whole_phase=True)
    first_s = min(r.start_s for r in requests)
    issue_end_s = max(r.start_s for r in requests)
    end_s = max(r.start_s + r.duration_s for r in requests)
    ramp_s = statistics.median(r.duration_s for r in requests)
    start_s = first_s + min(ramp_s, (issue_end_s - first_s) / 3)
    if issue_end_s - start_s < MIN_WINDOW_SHARE * (end_s - first_s) or issue_end_s <= start_s:
        return PhaseWindow(requests, first_s, end_s, whole_phase=True)
    return PhaseWindow(requests, start_s, issue_end_s)


def _token_arrivals(r: RequestResult) -> list[tuple[float, float]]:
    """(time, tokens) of each chunk of a successful request; tokens spread evenly over its chunks."""
    if not r.ok or r.ttft_s is None or not r.output_tokens:
        return []
    times = [r.start_s + r.ttft_s]
    for gap in r.itl_s:
        times.append(times[-1] + gap)
    per_chunk = r.output_tokens / len(times)
    return [(t, per_chunk) for t in times]


def _binomial_cdf(n: int, p: float) -> list[float]:
    """[P(X <= k) for k in 0..n] for X ~ Binomial(n, p); the terms in log space, so thousands do not underflow."""
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    total, cdf = 0.0, []
    for i in range(n + 1):
        total += math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        cdf.append(min(1.0, total))
    return cdf


def quantile_interval(
    sorted_values: Sequence[float], pct: float, confidence: float
) -> tuple[float, float | None] | None:
    """Distribution-free two-sided interval of the ``pct`` percentile from sorted samples: order statistics
    x(l) <= q <= x(u) each holding with probability (1 + confidence) / 2. The top is None when even the
    largest sample does not bound the percentile at that level (too few samples); the bottom falls back to
    the smallest sample. None without samples."""
    n = len(sorted_values)
    if n == 0:
        return None
    p, tail = pct / 100.0, (1 - confidence) / 2
    # K = samples at or below the true quantile ~ Binomial(n, p); x(k) <= q exactly when K >= k.
    cdf = _binomial_cdf(n, p)
    upper = next((u for u in range(1, n + 1) if cdf[u - 1] >= 1 - tail), None)
    lower = max((k for k in range(1, n + 1) if cdf[k - 1] <= tail), default=1)
    return (sorted_values[lower - 1], sorted_values[upper - 1] if upper is not None else None)


def _mean_ci(values: Sequence[float], confidence: float, rng: random.Random) -> tuple[float, float] | None:
    n = len(values)
    if n < 2:
        return None
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(BOOTSTRAP_RESAMPLES))
    tail = (1 - confidence) / 2 * 100
    lo, hi = percentile(means, tail), percentile(means, 100 - tail)
    assert lo is not None and hi is not None
    return (lo, hi)


def _subwindow_rates(window: PhaseWindow) -> tuple[float, list[float]]:
    """Tokens delivered in the window, and the tokens/s of each of its sub-windows."""
    span = window.end_s - window.start_s
    if span <= 0:
        return 0.0, []
    k = max(MIN_SUBWINDOWS, min(MAX_SUBWINDOWS, round(span / SUBWINDOW_S)))
    width = span / k
    counts = [0.0] * k
    for r in window.requests:
        for t, tokens in _token_arrivals(r):
            if window.start_s <= t < window.end_s:
                counts[min(k - 1, int((t - window.start_s) / width))] += tokens
    return sum(counts), [c / width for c in counts]


def steady_stats(
    windows: Sequence[PhaseWindow], *, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0
) -> SteadyStats:
    """Pool the steady windows of one or more phases at the same load into figures with intervals."""
    rng = random.Random(seed)
    inside = [r for w in windows for r in w.requests if w.start_s <= r.start_s <= w.end_s]
    ok = [r for r in inside if r.ok]
    window_s = sum(w.end_s - w.start_s for w in windows)
    tokens = 0.0
    rates: list[float] = []
    for w in windows:
        delivered, sub = _subwindow_rates(w)
        tokens += delivered
        rates.extend(sub)
    ttft = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    tpot = sorted(t for r in ok if (t := r.tpot_s) is not None)
    tpot_p50 = percentile(tpot, 50)
    return SteadyStats(
        phases=len(windows),
        window_s=window_s,
        requests_ok=len(ok),
        requests_failed=sum(1 for r in inside if not r.ok and r.error_kind != "cancelled"),
        output_tokens_per_s=tokens / window_s if window_s > 0 else 0.0,
        output_tokens_per_s_ci=_mean_ci(rates, confidence, rng),
        requests_per_s=_completion_rate(tokens / window_s if window_s > 0 else 0.0, ok),
        arrivals_per_s=_arrival_rate(windows),
        **_backlog(windows),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        ttft_p95_ci_s=quantile_interval(ttft, 95, confidence),
        tpot_p50_s=tpot_p50,
        tpot_p95_s=percentile(tpot, 95),
        tpot_p95_ci_s=quantile_interval(tpot, 95, confidence),
        user_tok_per_s_p50=1.0 / tpot_p50 if tpot_p50 else None,
        ttft_growth_s=_growth(windows),
        whole_phase=any(w.whole_phase for w in windows),
        confidence=confidence,
    )


def _completion_rate(tokens_per_s: float, ok: Sequence[RequestResult]) -> float:
    per_request = statistics.fmean(r.output_tokens or 0 for r in ok) if ok else 0.0
    return tokens_per_s / per_request if per_request > 0 else 0.0


def _arrival_rate(windows: Sequence[PhaseWindow]) -> float:
    """Requests issued per second, first to last issue of each phase, pooled."""
    issued = span = 0.0
    for w in windows:
        starts = [r.start_s for r in w.requests]
        if len(starts) > 1:
            issued += len(starts) - 1
            span += max(starts) - min(starts)
    return issued / span if span > 0 else 0.0


def _backlog(windows: Sequence[PhaseWindow]) -> dict[str, Any]:
    """Arrivals and completions in each window, and the backlog they leave beyond a steady server's.

    In flight at time t: N(t) = started by t - ended by t, so N(close) - N(open) = arrived - finished over the
    window. A steady server holds N flat at the arrival rate x the mean request time (Little's law), but a
    window that opens before the phase reaches it (a short phase) sees N climb to it: that shortfall at the
    opening is not a backlog, so it is taken off the growth (with the request time of the ramp's requests).
    """
    arrived = finished = growth = in_flight_open = 0.0
    for w in windows:
        if w.end_s <= w.start_s:
            continue
        a = sum(1 for r in w.requests if w.start_s < r.start_s <= w.end_s)
        f = sum(1 for r in w.requests if w.start_s < r.start_s + r.duration_s <= w.end_s)
        in_flight = sum(
            1 for r in w.requests if r.start_s <= w.start_s < r.start_s + r.duration_s
        )  # at the opening
        # The request time of the ramp's requests (started before the opening): a backlog inflates the
        # window's own, which would excuse the very growth being looked for.
        ramp = [r.duration_s for r in w.requests if r.start_s <= w.start_s] or [0.0]
        steady_in_flight = a / (w.end_s - w.start_s) * statistics.fmean(ramp)  # Little's law: the mean
        arrived += a
        finished += f
        in_flight_open += in_flight
        growth += (a - f) - max(0.0, steady_in_flight - in_flight)
    return {
        "arrived": int(arrived),
        "finished": int(finished),
        "in_flight_open": int(in_flight_open),
        "backlog_growth": growth,
    }


def _growth(windows: Sequence[PhaseWindow]) -> float | None:
    """How much the median TTFT rose from the first third of each window to its last (largest of the phases)."""
    growths = []
    for w in windows:
        timed = sorted((r.start_s, r.ttft_s) for r in w.requests if r.ok and r.ttft_s is not None)
        timed = [(s, t) for s, t in timed if w.start_s <= s <= w.end_s]
        third = len(timed) // 3
        if third < 3:
            continue
        first = statistics.median(t for _, t in timed[:third])
        last = statistics.median(t for _, t in timed[-third:])
        growths.append(last - first)
    return max(growths) if growths else None


def min_requests_for(percentile_judged: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest requests whose largest bounds the percentile from above at the interval's one-sided level:
    p^n <= (1 - confidence) / 2. For a p95 at 90 % two-sided (95 % each side): 59, the classic figure."""
    p = percentile_judged / 100.0
    return math.ceil(math.log((1 - confidence) / 2) / math.log(p))
