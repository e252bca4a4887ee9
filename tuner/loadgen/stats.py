"""What came back: per-request timings (:class:`RequestResult`) and a phase's aggregates (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request's timings. Times are seconds; ``start_s`` counts from the start of the measured window.

    ``ttft_s``: start to the first chunk carrying a choice (the server's first token; vLLM sends no choice
    chunk before it). ``e2e_s``: start to the last such chunk. ``itl_s``: gaps between successive chunks
    (a chunk may carry several tokens). A failed request keeps what it received (chunks, maybe TTFT).
    """

    index: int
    start_s: float
    duration_s: float  # start to the end of the response (or to the failure)
    prompt_len: int  # tokens sent
    max_tokens: int
    ttft_s: float | None
    e2e_s: float | None
    itl_s: tuple[float, ...]
    output_tokens: int | None  # usage.completion_tokens
    prompt_tokens: int | None  # usage.prompt_tokens
    chunks: int
    error_kind: str | None = None  # connection_closed, connect_failed, timeout, deadline, http_error,
    # server_error, malformed_stream, line_too_long, too_many_tokens, missing_usage, cancelled
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None unless the request succeeded with 2+ tokens."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class ErrorCount:
    """How many requests failed one way, with one message as an example."""

    kind: str
    count: int
    example: str


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """Aggregates over the measured (non-warm-up) requests of a phase. None = no data for that figure.

    Percentiles interpolate linearly (numpy's default, as vLLM bench). Latency figures use successful
    requests only; ITL percentiles pool every gap of every successful request. "Per-user" tokens/s is 1/TPOT
    of each request, so its p5 is the slow tail. Goodput counts requests meeting every SLO given.
    """

    requests_ok: int
    requests_failed: int
    requests_cancelled: int
    requests_short: int  # ok, but fewer output tokens than asked (the server ignored ignore_eos?)
    output_tokens_total: int
    prompt_tokens_total: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    max_in_flight: int  # most requests this client had open at once
    ttft_mean_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    ttft_p95_s: float | None = None
    ttft_p99_s: float | None = None
    tpot_mean_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p90_s: float | None = None
    tpot_p95_s: float | None = None
    tpot_p99_s: float | None = None
    itl_mean_s: float | None = None
    itl_p50_s: float | None = None
    itl_p95_s: float | None = None
    itl_p99_s: float | None = None
    e2e_mean_s: float | None = None
    e2e_p50_s: float | None = None
    e2e_p95_s: float | None = None
    e2e_p99_s: float | None = None
    user_tok_per_s_p5: float | None = None
    user_tok_per_s_p50: float | None = None
    user_tok_per_s_p95: float | None = None
    slo_ttft_max_s: float | None = None
    slo_tpot_max_s: float | None = None
    goodput_req_per_s: float | None = None  # None when no SLO was given
    errors: tuple[ErrorCount, ...] = ()


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Linear-interpolated percentile of already sorted values (numpy's default method); None if empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = (n - 1) * pct / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _max_in_flight(results: Sequence[RequestResult]) -> int:
    events = sorted([(r.start_s, 1) for r in results] + [(r.start_s + r.duration_s, -1) for r in results])
    level = peak = 0
    for _, step in events:  # at equal times ends (-1) sort first: back-to-back requests do not overlap
        level += step
        peak = max(peak, level)
    return peak


def compute_stats(
    results: Sequence[RequestResult],
    wall_s: float,
    *,
    ttft_max_s: float | None = None,
    tpot_max_s: float | None = None,
) -> PhaseStats:
    """Phase aggregates from per-request results and the phase's wall time (warm-up excluded)."""
    ok = [r for r in results if r.ok]
    cancelled = sum(1 for r in results if r.error_kind == "cancelled")
    failed = len(results) - len(ok) - cancelled
    ttft = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    e2e = sorted(r.e2e_s for r in ok if r.e2e_s is not None)
    tpot = sorted(t for r in ok if (t := r.tpot_s) is not None)
    user = sorted(1.0 / t for t in tpot if t > 0)
    itl = sorted(gap for r in ok for gap in r.itl_s)
    out_total = sum(r.output_tokens or 0 for r in ok)
    prompt_total = sum(r.prompt_tokens or 0 for r in ok)

    def rate(count: int) -> float:
        return count / wall_s if wall_s > 0 else 0.0

    goodput = None
    if ttft_max_s is not None or tpot_max_s is not None:
        good = 0
        for r in ok:
            if ttft_max_s is not None and (r.ttft_s is None or r.ttft_s > ttft_max_s):
                continue
            tpot_s = r.tpot_s
            if tpot_max_s is not None and tpot_s is not None and tpot_s > tpot_max_s:
                continue
            good += 1
        goodput = rate(good)

    by_kind: dict[str, list[str]] = {}
    for r in results:
        if r.error_kind is not None and r.error_kind != "cancelled":
            by_kind.setdefault(r.error_kind, []).append(r.error or r.error_kind)
    errors = tuple(
        ErrorCount(kind, len(messages), messages[0])
        for kind, messages in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))
    )
    return PhaseStats(
        requests_ok=len(ok),
        requests_failed=failed,
        requests_cancelled=cancelled,
        requests_short=sum(1 for r in ok if r.output_tokens is not None and r.output_tokens < r.max_tokens),
        output_tokens_total=out_total,
        prompt_tokens_total=prompt_total,
        wall_s=wall_s,
        output_tokens_per_s=rate(out_total),
        requests_per_s=rate(len(ok)),
        max_in_flight=_max_in_flight(results),
        ttft_mean_s=_mean(ttft),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p95_s=percentile(ttft, 95),
        ttft_p99_s=percentile(ttft, 99),
        tpot_mean_s=_mean(tpot),
        tpot_p50_s=percentile(tpot, 50),
        tpot_p90_s=percentile(tpot, 90),
        tpot_p95_s=percentile(tpot, 95),
        tpot_p99_s=percentile(tpot, 99),
        itl_mean_s=_mean(itl),
        itl_p50_s=percentile(itl, 50),
        itl_p95_s=percentile(itl, 95),
        itl_p99_s=percentile(itl, 99),
        e2e_mean_s=_mean(e2e),
        e2e_p50_s=percentile(e2e, 50),
        e2e_p95_s=percentile(e2e, 95),
        e2e_p99_s=percentile(e2e, 99),
        user_tok_per_s_p5=percentile(user, 5),
        user_tok_per_s_p50=percentile(user, 50),
        user_tok_per_s_p95=percentile(user, 95),
        slo_ttft_max_s=ttft_max_s,
        slo_tpot_max_s=tpot_max_s,
        goodput_req_per_s=goodput,
        errors=errors,
    )
