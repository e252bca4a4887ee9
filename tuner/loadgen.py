"""Streaming load generator for an OpenAI-compatible ``/v1/completions`` endpoint (vLLM).

A *phase* sends token-id prompts of exact lengths (seeded), asks for a fixed number of output tokens
(``ignore_eos``), streams every answer, and times each request: TTFT, inter-chunk latencies, E2E; output
tokens come from the server's ``usage`` chunk, never from counting chunks. Load is a closed loop of N
streams (``concurrency``) or Poisson arrivals (``rate``, optionally capped); warm-up requests run first and
are not counted. :func:`run_phase` returns a :class:`PhaseResult`: the per-request :class:`RequestResult`
list and the :class:`PhaseStats` computed from it by :func:`compute_stats`. :func:`run_ladder` runs one phase
per concurrency. Metric definitions are vLLM ``bench serve``'s (see REFERENCE.md "Metrics").

Failures a server can cause end up in the request they hit, as ``error_kind`` + a one-line ``error``: the
server dying mid-phase ("connection closed after 17 chunks"), a non-JSON data line, a missing usage chunk, an
HTTP error, silence for ``Timeouts.read_idle_s``. The other requests go on; a phase whose server stops
accepting connections stops early (``PhaseResult.aborted``) with what it measured so far. A caller can stop a
phase at any time through ``cancel`` (anything with ``is_set()``, e.g. a ``threading.Event`` set from another
thread); in-flight requests are then recorded as ``cancelled`` and left out of the statistics.

Transport (why the hot path is not httpx). An H100 serving a small model streams tens of thousands of chunks
per second (REFERENCE.md); the client must read them without its own delays leaking into TTFT. Measured by
``benchmarks/client_capacity.py`` on the 2-core dev machine: client pinned to one core, the fake emitter
(tests/fakes/sse_server.py, vLLM-shaped ~200-byte chunks) to the other, 256 streams. "Paced" = the emitter
decodes in steps like vLLM (one chunk per stream per step, first chunk 50 ms after the request arrives):

    client                                    flat out    paced: reached / target   TTFT p50 vs server's
    httpx aiter_lines + json.loads per chunk   15,600/s
    httpx aiter_raw + the cheap parser below   17,100/s    2,300 / 12,800            +4.3 s
    the same httpx, 4 processes on the core    35,500/s
    raw asyncio Protocol + cheap parser       328,000/s   47,400 / 51,200           +0.6 ms (p99 +4.9 ms)
      (the default)                                       91,900 / 102,400          +0.5 ms (p99 +1.7 ms)
                                                          108,000 / 128,000         +2.2 ms (p99 +6.3 ms)
    raw, 2 processes on the same core         183,000/s

httpx is limited by httpcore's pool bookkeeping, which scans every connection for every queued request at
each request start and end (O(connections x requests), encode/httpcore#1035): with 256 streams it burns the
core and the TTFT it reports is seconds late. The raw client is an ``asyncio.Protocol`` speaking just enough
HTTP/1.1 (keep-alive, chunked transfer decoding, Content-Length and close-delimited bodies) with SSE line
splitting on top; its pool opens a connection whenever none is idle, so it never caps concurrency. Parsing is
cheap: a chunk costs a timestamp and a few substring checks; only the first text chunk, the usage chunk and
anything unusual (errors, garbage) go through ``json.loads``. One timestamp is taken per socket read: chunks
that arrive together share it (their true arrival). "Flat out" piles chunks up between reads (13 per read for
the raw client), so it is an upper bound; the paced runs read ~1 chunk per read, as against a real server.
The paced top is the emitter's limit (its core saturates), not the client's (82 % busy). More processes on
the same core gain nothing; on a many-core GPU host they could multiply the rate, not needed so far. httpx
stays for control calls (``/v1/models``) and as ``transport="httpx"`` for comparison, without its default
100-connection limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import json
import math
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

__all__ = [
    "CancelToken",
    "ErrorCount",
    "LoadMode",
    "LoadSpec",
    "LoadgenError",
    "PhaseProgress",
    "PhaseResult",
    "PhaseStats",
    "RequestResult",
    "RequestSpec",
    "Timeouts",
    "Transport",
    "compute_stats",
    "discover_model",
    "make_requests",
    "percentile",
    "run_ladder",
    "run_phase",
]


Transport = Literal["raw", "httpx"]
"""The HTTP client on the hot path: this module's raw asyncio client (fast) or httpx (for comparison)."""


class LoadgenError(Exception):
    """A phase could not start (server unreachable, no model, bad URL). The message is one line for people."""


# --- what to send ------------------------------------------------------------------------------------


class LoadMode(str, enum.Enum):
    """How requests are issued."""

    CONCURRENCY = "concurrency"  # closed loop: keep N streams in flight, a new request as soon as one ends
    RATE = "rate"  # open loop: Poisson arrivals at request_rate_per_s, optionally capped at N in flight


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One phase of load. Give ``num_requests`` or ``duration_s`` (both: whichever ends first).

    Lengths are exact unless ``len_range_ratio`` > 0: then each request's input and output lengths are drawn
    uniformly from ``[L * (1 - r), L * (1 + r)]`` (vLLM bench's ``--random-range-ratio``). Prompt token ids
    are drawn from the middle 80 % of ``vocab_size``, away from the special tokens most vocabularies keep at
    either end. ``extra_body`` is merged into every request body (e.g. ``{"temperature": 0}``).
    """

    mode: LoadMode = LoadMode.CONCURRENCY
    concurrency: int | None = 1  # closed loop: streams in flight; rate mode: cap (None = no cap)
    request_rate_per_s: float | None = None  # rate mode only
    num_requests: int | None = 100
    duration_s: float | None = None  # stop issuing after this long; requests in flight still finish
    warmup_requests: int = 0
    input_len: int = 128
    output_len: int = 128
    len_range_ratio: float = 0.0
    vocab_size: int = 32000
    seed: int = 0
    extra_body: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        problems = []
        if self.mode is LoadMode.CONCURRENCY and (self.concurrency is None or self.concurrency < 1):
            problems.append("concurrency mode needs concurrency >= 1")
        if self.mode is LoadMode.RATE and not (self.request_rate_per_s and self.request_rate_per_s > 0):
            problems.append("rate mode needs request_rate_per_s > 0")
        if self.mode is LoadMode.RATE and self.concurrency is not None and self.concurrency < 1:
            problems.append("a concurrency cap must be >= 1 (or None for no cap)")
        if self.num_requests is None and self.duration_s is None:
            problems.append("give num_requests or duration_s")
        if self.num_requests is not None and self.num_requests < 1:
            problems.append("num_requests must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            problems.append("duration_s must be > 0")
        if self.warmup_requests < 0:
            problems.append("warmup_requests must be >= 0")
        if self.input_len < 1 or self.output_len < 1:
            problems.append("input_len and output_len must be >= 1")
        if not 0.0 <= self.len_range_ratio < 1.0:
            problems.append("len_range_ratio must be in [0, 1)")
        if self.vocab_size < 10:
            problems.append("vocab_size must be >= 10")
        if {"prompt", "max_tokens", "stream"} & set(self.extra_body):
            problems.append("extra_body must not set prompt, max_tokens or stream (the load generator does)")
        if problems:
            raise ValueError("LoadSpec: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request as sent: its prompt (token ids) and how many tokens it asks for."""

    index: int  # 0-based within its phase; warm-up requests have their own numbering
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request limits. A request that hits one fails with ``error_kind == "timeout"``."""

    connect_s: float = 10.0
    read_idle_s: float = 120.0  # no byte at all for this long (before the first token, too)
    total_s: float | None = None  # whole request; None = only the idle limit applies


def make_requests(spec: LoadSpec, *, warmup: bool = False) -> Iterator[RequestSpec]:
    """The requests of a phase (or of its warm-up), deterministic for a given ``spec.seed``.

    Infinite: the caller takes what it needs. Warm-up prompts come from a different stream than measured
    ones, so a warm-up never puts a measured prompt in the server's prefix cache.
    """
    rng = random.Random(f"{spec.seed}:{'warmup' if warmup else 'measure'}")
    low_id, high_id = spec.vocab_size // 10, spec.vocab_size - spec.vocab_size // 10
    index = 0
    while True:
        input_len, output_len = spec.input_len, spec.output_len
        if spec.len_range_ratio > 0:
            r = spec.len_range_ratio
            input_len = _draw_len(rng, input_len, r)
            output_len = _draw_len(rng, output_len, r)
        ids = tuple(rng.choices(range(low_id, high_id), k=input_len))
        yield RequestSpec(index=index, prompt_token_ids=ids, max_tokens=output_len)
        index += 1


def _draw_len(rng: random.Random, length: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio))))


# --- what came back ----------------------------------------------------------------------------------


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
    error_kind: str | None = None  # connection_closed, connect_failed, timeout, http_error, server_error,
    # malformed_stream, missing_usage, cancelled
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


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """A finished (or stopped) phase. ``started_at_s``/``ended_at_s`` are epoch seconds of the measured
    window, for lining the phase up with telemetry sampled alongside."""

    base_url: str
    model: str
    spec: LoadSpec
    stats: PhaseStats
    requests: tuple[RequestResult, ...]  # measured requests, by index
    started_at_s: float
    ended_at_s: float
    warmup_s: float
    cancelled: bool = False
    aborted: str | None = None  # why the phase stopped early on its own (the server went away)


@dataclass(frozen=True, slots=True)
class PhaseProgress:
    """Handed to ``on_progress`` at each stage start, then at most every 0.1 s, and once at the end."""

    stage: Literal["warmup", "measure"]
    requests_done: int
    requests_total: int | None  # None in duration mode
    requests_failed: int
    output_tokens: int
    elapsed_s: float


class CancelToken(Protocol):
    """Anything with ``is_set()``: ``threading.Event`` (set from any thread) or ``asyncio.Event``."""

    def is_set(self) -> bool: ...


# --- statistics (pure functions) ---------------------------------------------------------------------


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


# --- one stream: SSE parsing and bookkeeping ---------------------------------------------------------


class _Stream:
    """The state of one request in flight, fed with decoded response body bytes by a transport.

    Hot path: a chunk that looks like vLLM's (``data: {...``, a non-empty ``"choices":[{``, no usage object)
    costs a timestamp append and a few substring searches. Everything else takes the careful path.
    """

    __slots__ = (
        "abort",
        "chunk_times",
        "done",
        "done_seen",
        "end_s",
        "error",
        "error_kind",
        "last_rx_s",
        "output_tokens",
        "pending",
        "prompt_tokens",
        "start_s",
    )

    def __init__(self, start_s: float) -> None:
        self.start_s = start_s
        self.rearm()

    def rearm(self) -> None:
        """Forget everything received: the request is sent again (on a fresh connection)."""
        self.last_rx_s = self.start_s
        self.end_s: float | None = None
        self.chunk_times: list[float] = []
        self.pending = b""  # an incomplete SSE line
        self.done_seen = False
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.error_kind: str | None = None
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.abort: Callable[[], None] | None = None  # set by the transport: drop the connection now

    def feed(self, data: bytes, now_s: float) -> bool:
        """Take body bytes received at ``now_s``. False once the stream has failed (stop feeding)."""
        if self.pending:
            data = self.pending + data
        lines = data.split(b"\n")
        self.pending = lines.pop()
        times = self.chunk_times
        for line in lines:
            if not line:
                continue
            if (
                times
                and line.startswith(b'data: {"')
                and line.endswith(b"}")
                and b'"choices":[{' in line
                and b'"usage":{' not in line
            ):
                times.append(now_s)
            elif not self._careful_line(line, now_s):
                return False
        return True

    def _careful_line(self, line: bytes, now_s: float) -> bool:
        if line.endswith(b"\r"):
            line = line[:-1]
            if not line:
                return True
        if line.startswith(b":"):
            return True  # SSE comment (keep-alive ping)
        name, colon, value = line.partition(b":")
        if not colon or name != b"data":
            if colon and name in (b"event", b"id", b"retry"):
                return True
            return self.fail("malformed_stream", f"not an SSE line: {_clip(line)}")
        if value.startswith(b" "):
            value = value[1:]
        if value == b"[DONE]":
            self.done_seen = True
            return True
        try:
            obj = json.loads(value)
        except ValueError:
            return self.fail("malformed_stream", f"data line is not JSON: {_clip(value)}")
        if not isinstance(obj, dict):
            return self.fail("malformed_stream", f"data line is not a JSON object: {_clip(value)}")
        error = obj.get("error") or (obj if obj.get("object") == "error" else None)
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            return self.fail("server_error", f"server error in the stream: {_clip(str(message))}")
        choices, usage = obj.get("choices"), obj.get("usage")
        if choices:
            self.chunk_times.append(now_s)
        if isinstance(usage, dict):
            self.output_tokens = usage.get("completion_tokens")
            self.prompt_tokens = usage.get("prompt_tokens")
        elif choices is None:
            return self.fail("malformed_stream", f"data line has neither choices nor usage: {_clip(value)}")
        return True

    def finish(self, now_s: float) -> None:
        """The response body ended normally: check that the stream was complete."""
        if self.error_kind is not None:
            return
        if self.pending.strip() and not self.feed(b"\n", now_s):
            return  # a last line without its newline, and it was bad
        if not self.done_seen:
            self.fail("malformed_stream", "the stream ended without data: [DONE]")
        elif not isinstance(self.output_tokens, int):
            self.fail("missing_usage", "no usage chunk: the server ignored stream_options.include_usage")
        elif not self.chunk_times:
            self.fail("malformed_stream", "the stream carried no text chunk")
        else:
            self._settle(now_s)

    def fail(self, kind: str, message: str) -> bool:
        """Record the first failure, drop the connection, wake the waiter. Returns False for ``feed``."""
        if self.error_kind is None and not self.done.done():
            self.error_kind = kind
            chunks = len(self.chunk_times)
            if kind in ("connect_failed", "http_error"):
                self.error = message  # nothing was streamed: a chunk count would only be noise
            else:
                self.error = f"{message} (after {chunks} chunk{'' if chunks == 1 else 's'})"
            if self.abort is not None:
                self.abort()
            self._settle(time.perf_counter())
        return False

    def _settle(self, now_s: float) -> None:
        if not self.done.done():
            self.end_s = now_s
            self.done.set_result(None)

    def result(self, spec: RequestSpec, window_start_s: float) -> RequestResult:
        times = self.chunk_times
        start_s = self.start_s
        end_s = self.end_s if self.end_s is not None else time.perf_counter()
        return RequestResult(
            index=spec.index,
            start_s=start_s - window_start_s,
            duration_s=end_s - start_s,
            prompt_len=len(spec.prompt_token_ids),
            max_tokens=spec.max_tokens,
            ttft_s=times[0] - start_s if times else None,
            e2e_s=times[-1] - start_s if times else None,
            itl_s=tuple(b - a for a, b in itertools.pairwise(times)) if self.error_kind is None else (),
            output_tokens=self.output_tokens if self.error_kind is None else None,
            prompt_tokens=self.prompt_tokens if self.error_kind is None else None,
            chunks=len(times),
            error_kind=self.error_kind,
            error=self.error,
        )


def _clip(data: bytes | str, limit: int = 80) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- transports ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    """Where requests go, parsed once."""

    base_url: str  # normalised: scheme://host[:port][/prefix], no trailing /v1
    scheme: str
    host: str
    port: int
    path_prefix: str
    netloc: str  # host[:port] as written (brackets kept for IPv6): the Host header

    @classmethod
    def parse(cls, base_url: str) -> _Target:
        parts = urllib.parse.urlsplit(base_url.strip().rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoadgenError(f"not an http(s) URL: {base_url!r} (expected e.g. http://127.0.0.1:8000)")
        prefix = parts.path.rstrip("/")
        if prefix.endswith("/v1"):
            prefix = prefix[: -len("/v1")]
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise LoadgenError(f"bad port in {base_url!r}: {exc}") from None
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return cls(f"{parts.scheme}://{netloc}{prefix}", parts.scheme, parts.hostname, port, prefix, netloc)


class _Client(Protocol):
    async def stream(self, stream: _Stream, body: bytes) -> None:
        """Send one completion request and feed its response into ``stream`` until it settles."""
        ...

    async def aclose(self) -> None: ...


_HEAD, _BODY, _TRAILERS = 0, 1, 2


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one streaming response at a time."""

    def __init__(self, pool: _RawPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.stream: _Stream | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.buffer = b""
        self.status = 0
        self.chunked = False
        self.body_left = -1  # Content-Length remaining; -1 = chunked or until close
        self.chunk_left = 0
        self.crlf_pending = 0  # 2 while the CRLF after a chunk's data is still to be skipped
        self.keep_alive = True
        self.error_body: bytearray | None = None  # a non-200 answer is collected here, not parsed as SSE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        stream = self.stream
        if stream is None:
            return
        self.stream = None
        if self.state == _BODY and self.body_left < 0 and not self.chunked:
            self._body_ended(stream, time.perf_counter())  # a close-delimited body ends this way
            return
        how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
        stream.fail("connection_closed", f"connection {how} by the server")

    def send(self, stream: _Stream, request: bytes) -> None:
        assert self.transport is not None
        if self.closed or self.transport.is_closing():  # closed by the server a moment ago
            stream.fail("connection_closed", "connection closed by the server")
            return
        self._reset()
        self.stream = stream
        stream.abort = self.transport.abort
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now_s = time.perf_counter()
        stream = self.stream
        if stream is None:
            if self.transport is not None:
                self.transport.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        stream.last_rx_s = now_s
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if self.state == _HEAD:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 65536:
                    stream.fail("malformed_stream", "response headers longer than 64 KiB")
                else:
                    self.buffer = data
                return
            if not self._parse_head(stream, data[:end]):
                return
            data = data[end + 4 :]
            self.state = _BODY
        if self.chunked:
            self._chunked_body(stream, data, now_s)
        elif self.body_left >= 0:
            piece = data[: self.body_left]
            self.body_left -= len(piece)
            if self._deliver(stream, piece, now_s) and self.body_left == 0:
                self._body_ended(stream, now_s)
        else:
            self._deliver(stream, data, now_s)

    def _parse_head(self, stream: _Stream, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            return stream.fail("malformed_stream", f"not an HTTP status line: {_clip(lines[0])}")
        version = lines[0][:8]
        self.keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                self.chunked = True
            elif name == "content-length" and value.isdigit():
                self.body_left = int(value)
            elif name == "connection":
                self.keep_alive = "close" not in value and (version == "HTTP/1.1" or "keep-alive" in value)
        if self.chunked:
            self.body_left = -1
        elif self.body_left < 0:
            self.keep_alive = False  # the body runs until the server closes
        if self.status != 200:
            self.error_body = bytearray()
        if self.body_left == 0:
            self._body_ended(stream, time.perf_counter())
            return False
        return True

    def _chunked_body(self, stream: _Stream, data: bytes, now_s: float) -> None:
        pos, size = 0, len(data)
        pieces: list[bytes] = []
        while pos < size:
            if self.state == _TRAILERS:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:  # the empty line after the last chunk (and any trailers): response done
                    if not pieces or self._deliver(stream, b"".join(pieces), now_s):
                        self._body_ended(stream, now_s)
                    return
                pos = eol + 2
                continue
            if self.chunk_left:
                end = pos + self.chunk_left
                if end <= size:
                    pieces.append(data[pos:end])
                    self.chunk_left = 0
                    self.crlf_pending = 2
                    pos = end
                else:
                    pieces.append(data[pos:])
                    self.chunk_left -= size - pos
                    pos = size
                continue
            eol = data.find(b"\r\n", pos + self.crlf_pending)
            if eol < 0:
                break
            try:
                chunk_size = int(data[pos + self.crlf_pending : eol].split(b";", 1)[0], 16)
            except ValueError:
                stream.fail("malformed_stream", "bad chunked transfer encoding")
                return
            pos = eol + 2
            self.crlf_pending = 0
            if chunk_size == 0:
                self.state = _TRAILERS
            else:
                self.chunk_left = chunk_size
        self.buffer = data[pos:]
        if pieces:
            self._deliver(stream, pieces[0] if len(pieces) == 1 else b"".join(pieces), now_s)

    def _deliver(self, stream: _Stream, payload: bytes, now_s: float) -> bool:
        if self.error_body is not None:
            if len(self.error_body) < 8192:
                self.error_body += payload
            return True
        return stream.feed(payload, now_s)

    def _body_ended(self, stream: _Stream, now_s: float) -> None:
        if self.error_body is not None:
            stream.fail("http_error", f"HTTP {self.status}: {_error_message(bytes(self.error_body))}")
            return
        stream.finish(now_s)
        self.stream = None
        if stream.error_kind is None and self.keep_alive and not self.closed and not self.buffer:
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()


def _error_message(body: bytes) -> str:
    """The message of an OpenAI/vLLM error body, else the body's start."""
    try:
        obj = json.loads(body)
    except ValueError:
        return _clip(body) or "(empty body)"
    if isinstance(obj, dict):
        error = obj.get("error", obj)
        if isinstance(error, dict) and error.get("message"):
            return _clip(str(error["message"]), 200)
        if isinstance(obj.get("detail"), str):
            return _clip(obj["detail"], 200)
    return _clip(body)


class _RawPool:
    """Keep-alive connections to one server; opens a new one whenever none is idle (never caps)."""

    def __init__(self, target: _Target, timeouts: Timeouts, headers: Mapping[str, str]) -> None:
        self.target = target
        self.timeouts = timeouts
        self.idle: list[_RawConnection] = []
        self.all: set[_RawConnection] = set()
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if target.scheme == "https" else None
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request_head = (
            f"POST {target.path_prefix}/v1/completions HTTP/1.1\r\nHost: {target.netloc}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{extra}Content-Length: "
        ).encode("latin-1")

    def release(self, conn: _RawConnection) -> None:
        self.idle.append(conn)

    async def _acquire(self) -> tuple[_RawConnection, bool]:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn, True
            self.all.discard(conn)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: _RawConnection(self), self.target.host, self.target.port, ssl=self.ssl
            ),
            timeout=self.timeouts.connect_s,
        )
        self.all.add(conn)
        return conn, False

    async def stream(self, stream: _Stream, body: bytes) -> None:
        request = self.request_head + b"%d\r\n\r\n%s" % (len(body), body)
        for attempt in (1, 2):
            try:
                conn, reused = await self._acquire()
            except asyncio.TimeoutError:
                stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: timed out")
                return
            except OSError as exc:
                # asyncio replaces strerror with "Connect call failed (...)": the errno says more.
                reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
                stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: {reason.lower()}")
                return
            if stream.error_kind is not None:  # timed out or cancelled while connecting
                self.release(conn)
                return
            conn.send(stream, request)
            await stream.done
            # A kept-alive connection the server had just closed fails before a single byte: try once more
            # on a fresh one, as browsers and HTTP libraries do.
            retry = (
                attempt == 1
                and reused
                and stream.error_kind == "connection_closed"
                and stream.last_rx_s == stream.start_s
            )
            if not retry:
                return
            stream.rearm()

    async def aclose(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()
        self.all.clear()
        self.idle.clear()


class _HttpxClient:
    """The same requests through httpx (for comparison; the raw client is several times faster)."""

    def __init__(self, target: _Target, timeouts: Timeouts, headers: Mapping[str, str]) -> None:
        self.target = target
        # No pool limit: httpx's default (100 connections) would silently cap concurrency.
        self.client = httpx.AsyncClient(
            base_url=target.base_url,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream", **headers},
            timeout=httpx.Timeout(timeouts.read_idle_s, connect=timeouts.connect_s, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def stream(self, stream: _Stream, body: bytes) -> None:
        task = asyncio.current_task()
        if task is not None:

            def abort() -> None:
                # From the watchdog (another task): interrupt the read. From this task's own parsing, the
                # code below returns by itself, and a cancel would hit the next request instead.
                if asyncio.current_task() is not task:
                    task.cancel()

            stream.abort = abort
        try:
            async with self.client.stream("POST", "/v1/completions", content=body) as response:
                if response.status_code != 200:
                    text = await response.aread()
                    stream.fail("http_error", f"HTTP {response.status_code}: {_error_message(text)}")
                    return
                async for data in response.aiter_raw():
                    now_s = time.perf_counter()
                    stream.last_rx_s = now_s
                    if not stream.feed(data, now_s):
                        return
                stream.finish(time.perf_counter())
        except asyncio.CancelledError:
            if stream.error_kind is None:
                raise  # not our own abort: the phase itself is being cancelled
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()  # our own abort is handled; later timeouts in this task must work normally
        except httpx.ConnectError as exc:
            stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: {_clip(str(exc))}")
        except httpx.TimeoutException:
            stream.fail("timeout", "no data from the server within the read timeout")
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            stream.fail("connection_closed", f"connection closed by the server ({_clip(str(exc)) or 'EOF'})")
        except httpx.HTTPError as exc:
            stream.fail("connection_closed", f"{type(exc).__name__}: {_clip(str(exc))}")

    async def aclose(self) -> None:
        await self.client.aclose()


# --- control calls ---------------------------------------------------------------------------------------


async def discover_model(base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model a server lists at ``GET /v1/models``; :class:`LoadgenError` when there is none."""
    target = _Target.parse(base_url)
    url = f"{target.base_url}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            reply = await client.get(url, headers=headers)
    except httpx.ConnectError:
        raise LoadgenError(f"cannot reach {target.base_url}: is the server running?") from None
    except httpx.TimeoutException:
        raise LoadgenError(f"{url} did not answer within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise LoadgenError(f"{url}: {_clip(str(exc)) or type(exc).__name__}") from None
    if reply.status_code != 200:
        raise LoadgenError(f"{url} answered HTTP {reply.status_code}: {_error_message(reply.content)}")
    try:
        models = [m["id"] for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise LoadgenError(f"{url} did not answer with an OpenAI model list") from None
    if not models:
        raise LoadgenError(f"{target.base_url} serves no model")
    return str(models[0])


# --- running a phase ---------------------------------------------------------------------------------------


_CONNECT_FAILURES_TO_ABORT = 3  # in a row: the server is gone, stop issuing instead of failing every request
_POLL_S = 0.1  # watchdog period: idle/total timeouts and the cancel token are checked this often


class _Phase:
    """The machinery of one :func:`run_phase` call."""

    def __init__(
        self,
        client: _Client,
        model: str,
        spec: LoadSpec,
        timeouts: Timeouts,
        on_progress: Callable[[PhaseProgress], None] | None,
        cancel: CancelToken | None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.timeouts = timeouts
        self.on_progress = on_progress
        self.cancel = cancel
        self.stopping = asyncio.Event()
        self.cancelled = False
        self.aborted: str | None = None
        self.in_flight: set[_Stream] = set()
        self.connect_failures_in_row = 0
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        body.update(spec.extra_body)
        # Everything but the prompt and max_tokens is fixed: serialise it once and splice per request.
        self.body_tail = json.dumps(body, separators=(",", ":"))[1:].encode()
        self._reset_stage("warmup", None)

    def _reset_stage(self, stage: Literal["warmup", "measure"], total: int | None) -> None:
        self.stage = stage
        self.stage_total = total
        self.stage_start_s = time.perf_counter()
        self.results: list[RequestResult] = []
        self.done_count = 0
        self.failed_count = 0
        self.tokens = 0
        self.last_progress_s = 0.0

    def _progress(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now_s = time.perf_counter()
        if not force and now_s - self.last_progress_s < 0.1:
            return
        self.last_progress_s = now_s
        self.on_progress(
            PhaseProgress(
                self.stage,
                self.done_count,
                self.stage_total,
                self.failed_count,
                self.tokens,
                now_s - self.stage_start_s,
            )
        )

    async def _one(self, request: RequestSpec) -> None:
        body = b'{"prompt":%s,"max_tokens":%d,%s' % (
            json.dumps(request.prompt_token_ids, separators=(",", ":")).encode(),
            request.max_tokens,
            self.body_tail,
        )
        stream = _Stream(time.perf_counter())
        self.in_flight.add(stream)
        try:
            await self.client.stream(stream, body)
        finally:
            self.in_flight.discard(stream)
        if not stream.done.done():  # a transport returned without settling: never leave it open-ended
            stream.fail("malformed_stream", "the transport ended the request without a result")
        result = stream.result(request, self.stage_start_s)
        self.results.append(result)
        self.done_count += 1
        if result.error_kind == "connect_failed":
            self.connect_failures_in_row += 1
            if self.connect_failures_in_row >= _CONNECT_FAILURES_TO_ABORT and self.aborted is None:
                self.aborted = f"server unreachable: {result.error}"
                self.stopping.set()
        else:
            self.connect_failures_in_row = 0
        if result.ok:
            self.tokens += result.output_tokens or 0
        elif result.error_kind != "cancelled":
            self.failed_count += 1
        self._progress()

    async def _watchdog(self) -> None:
        idle_s, total_s = self.timeouts.read_idle_s, self.timeouts.total_s
        while True:
            await asyncio.sleep(_POLL_S)
            if self.cancel is not None and self.cancel.is_set() and not self.cancelled:
                self.cancelled = True
                self.stopping.set()
            now_s = time.perf_counter()
            for stream in list(self.in_flight):
                if self.cancelled:
                    stream.fail("cancelled", "the phase was cancelled")
                elif now_s - stream.last_rx_s > idle_s:
                    stream.fail("timeout", f"no data from the server for {idle_s:g} s")
                elif total_s is not None and now_s - stream.start_s > total_s:
                    stream.fail("timeout", f"request took longer than {total_s:g} s")

    async def _closed_loop(
        self, requests: Iterator[RequestSpec], concurrency: int, deadline_s: float
    ) -> None:
        async def worker() -> None:
            while not self.stopping.is_set() and time.perf_counter() < deadline_s:
                request = next(requests, None)
                if request is None:
                    return
                await self._one(request)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _open_loop(
        self, requests: Iterator[RequestSpec], rate_per_s: float, cap: int | None, deadline_s: float
    ) -> None:
        rng = random.Random(f"{self.spec.seed}:arrivals")
        gate = asyncio.Semaphore(cap) if cap else None
        tasks: set[asyncio.Task[None]] = set()

        async def gated(request: RequestSpec) -> None:
            if gate is None:
                await self._one(request)
                return
            async with gate:
                if not self.stopping.is_set():
                    await self._one(request)

        next_s = time.perf_counter()
        for request in requests:
            next_s += rng.expovariate(rate_per_s)  # absolute schedule: no drift from loop delays
            if next_s >= deadline_s:
                break
            delay_s = next_s - time.perf_counter()
            if delay_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay_s)
            if self.stopping.is_set():
                break
            task = asyncio.create_task(gated(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def run(self) -> tuple[list[RequestResult], float, float, float, float]:
        """Warm-up, then the measured window. Returns results, wall time, epoch start/end, warm-up time."""
        spec = self.spec
        watchdog = asyncio.create_task(self._watchdog())
        try:
            warmup_start_s = time.perf_counter()
            if spec.warmup_requests:
                self._reset_stage("warmup", spec.warmup_requests)
                self._progress(force=True)
                warm = _take(make_requests(spec, warmup=True), spec.warmup_requests)
                await self._closed_loop(warm, min(spec.warmup_requests, spec.concurrency or 64), math.inf)
            warmup_s = time.perf_counter() - warmup_start_s

            self._reset_stage("measure", spec.num_requests)
            started_at_s = time.time()
            self._progress(force=True)
            requests = make_requests(spec)
            if spec.num_requests is not None:
                requests = _take(requests, spec.num_requests)
            deadline_s = self.stage_start_s + spec.duration_s if spec.duration_s else math.inf
            if not self.stopping.is_set():
                if spec.mode is LoadMode.CONCURRENCY:
                    await self._closed_loop(requests, spec.concurrency or 1, deadline_s)
                else:
                    assert spec.request_rate_per_s is not None
                    await self._open_loop(requests, spec.request_rate_per_s, spec.concurrency, deadline_s)
            end_s = max(
                (self.stage_start_s + r.start_s + r.duration_s for r in self.results),
                default=self.stage_start_s,
            )
            self._progress(force=True)
            return self.results, end_s - self.stage_start_s, started_at_s, time.time(), warmup_s
        finally:
            watchdog.cancel()


def _take(requests: Iterator[RequestSpec], count: int) -> Iterator[RequestSpec]:
    for _ in range(count):
        yield next(requests)


async def run_phase(
    base_url: str,
    spec: LoadSpec,
    *,
    model: str | None = None,
    api_key: str | None = None,
    ttft_max_s: float | None = None,
    tpot_max_s: float | None = None,
    timeouts: Timeouts | None = None,
    on_progress: Callable[[PhaseProgress], None] | None = None,
    cancel: CancelToken | None = None,
    transport: Transport = "raw",
) -> PhaseResult:
    """Run one phase of load against ``base_url`` (e.g. ``http://127.0.0.1:8000``) and measure it.

    ``model`` defaults to the first one at ``/v1/models``. ``ttft_max_s``/``tpot_max_s`` are the SLOs for
    goodput. ``on_progress`` is called on this event loop (keep it cheap). Setting ``cancel`` stops the phase
    within ~0.1 s and returns what was measured. Raises :class:`LoadgenError` only when the phase cannot
    start; failures of individual requests are in the result.
    """
    target = _Target.parse(base_url)
    timeouts = timeouts or Timeouts()
    if model is None:
        model = await discover_model(target.base_url, api_key=api_key, timeout_s=timeouts.connect_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client: _Client = (
        _RawPool(target, timeouts, headers) if transport == "raw" else _HttpxClient(target, timeouts, headers)
    )
    phase = _Phase(client, model, spec, timeouts, on_progress, cancel)
    try:
        results, wall_s, started_at_s, ended_at_s, warmup_s = await phase.run()
    finally:
        await client.aclose()
    results.sort(key=lambda r: r.index)
    return PhaseResult(
        base_url=target.base_url,
        model=model,
        spec=spec,
        stats=compute_stats(results, wall_s, ttft_max_s=ttft_max_s, tpot_max_s=tpot_max_s),
        requests=tuple(results),
        started_at_s=started_at_s,
        ended_at_s=ended_at_s,
        warmup_s=warmup_s,
        cancelled=phase.cancelled,
        aborted=phase.aborted,
    )


async def run_ladder(
    base_url: str,
    spec: LoadSpec,
    concurrencies: Sequence[int],
    *,
    requests_per_stream: int | None = None,
    on_phase_done: Callable[[PhaseResult], Awaitable[None] | None] | None = None,
    cancel: CancelToken | None = None,
    **phase_kwargs: Any,
) -> list[PhaseResult]:
    """One closed-loop phase per concurrency, in the order given; stops after a cancelled or aborted phase.

    ``requests_per_stream`` sets each phase's ``num_requests`` to ``concurrency * requests_per_stream`` so
    that every step lasts about as long. Other keyword arguments go to :func:`run_phase`.
    """
    results: list[PhaseResult] = []
    model = phase_kwargs.pop("model", None)
    for concurrency in concurrencies:
        step = dataclasses.replace(spec, mode=LoadMode.CONCURRENCY, concurrency=concurrency)
        if requests_per_stream is not None:
            step = dataclasses.replace(step, num_requests=concurrency * requests_per_stream)
        result = await run_phase(base_url, step, model=model, cancel=cancel, **phase_kwargs)
        model = result.model  # discover once
        results.append(result)
        if on_phase_done is not None:
            maybe = on_phase_done(result)
            if maybe is not None:
                await maybe
        if result.cancelled or result.aborted:
            break
    return results
