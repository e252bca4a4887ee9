"""The load generator against the fake SSE emitter (a separate process); its statistics as pure functions."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fakes.sse_server import EmitterConfig, EmitterProcess

from tuner.loadgen import (
    LoadgenError,
    LoadMode,
    LoadSpec,
    PhaseProgress,
    RequestResult,
    Timeouts,
    Transport,
    compute_stats,
    discover_model,
    make_requests,
    percentile,
    run_ladder,
    run_phase,
)
from tuner.loadgen.control import Target
from tuner.loadgen.rawhttp import RawPool, _RawConnection
from tuner.loadgen.stream import Stream

StartEmitter = Callable[..., EmitterProcess]


@pytest.fixture
def start_emitter() -> Iterator[StartEmitter]:
    """Start emitters with the given knobs; all are stopped after the test."""
    started: list[EmitterProcess] = []

    def start(**knobs: object) -> EmitterProcess:
        emitter = EmitterProcess(EmitterConfig(**knobs)).start()  # type: ignore[arg-type]
        started.append(emitter)
        return emitter

    yield start
    for emitter in started:
        emitter.stop()


def spec(**fields: object) -> LoadSpec:
    base = LoadSpec(concurrency=4, num_requests=8, input_len=32, output_len=10)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


# --- statistics: pure functions ----------------------------------------------------------------------------


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # numpy.percentile([1, 2, 3, 4], 90)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def result(
    index: int,
    *,
    start_s: float = 0.0,
    ttft_s: float = 0.1,
    e2e_s: float = 1.1,
    out: int = 11,
    error_kind: str | None = None,
) -> RequestResult:
    ok = error_kind is None
    return RequestResult(
        index=index,
        start_s=start_s,
        duration_s=e2e_s,
        prompt_len=8,
        max_tokens=11,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        itl_s=(0.5, 0.5) if ok else (),
        output_tokens=out if ok else None,
        prompt_tokens=8 if ok else None,
        chunks=3,
        error_kind=error_kind,
        error=None if ok else f"{error_kind} happened",
    )


def test_compute_stats_on_known_results() -> None:
    results = [
        result(0, start_s=0.0, ttft_s=0.1, e2e_s=1.1),  # TPOT (1.1 - 0.1) / 10 = 0.1 s -> 10 tok/s
        result(1, start_s=0.5, ttft_s=0.3, e2e_s=2.3),  # TPOT 0.2 s -> 5 tok/s
        result(2, start_s=1.0, ttft_s=0.2, e2e_s=0.7),  # TPOT 0.05 s -> 20 tok/s
        result(3, start_s=3.0, error_kind="connection_closed"),
        result(4, start_s=3.0, error_kind="connection_closed"),
        result(5, start_s=3.0, error_kind="malformed_stream"),
        result(6, start_s=3.0, error_kind="cancelled"),
    ]
    stats = compute_stats(results, wall_s=4.0, ttft_max_s=0.25, tpot_max_s=0.15)
    assert (stats.requests_ok, stats.requests_failed, stats.requests_cancelled) == (3, 3, 1)
    assert stats.output_tokens_total == 33
    assert stats.output_tokens_per_s == pytest.approx(33 / 4.0)
    assert stats.requests_per_s == pytest.approx(3 / 4.0)
    assert stats.ttft_p50_s == pytest.approx(0.2)
    assert stats.ttft_mean_s == pytest.approx(0.2)
    assert stats.tpot_p50_s == pytest.approx(0.1)
    assert stats.tpot_p90_s == pytest.approx(0.1 + 0.8 * 0.1)
    assert stats.e2e_p50_s == pytest.approx(1.1)
    assert stats.user_tok_per_s_p50 == pytest.approx(10.0)
    assert stats.user_tok_per_s_p5 == pytest.approx(5.0 + 0.1 * 5.0)
    assert stats.itl_p50_s == pytest.approx(0.5)
    # Requests 0 and 2 meet both SLOs; 1 misses both (TTFT 0.3 > 0.25, TPOT 0.2 > 0.15).
    assert stats.goodput_req_per_s == pytest.approx(2 / 4.0)
    assert [(e.kind, e.count) for e in stats.errors] == [("connection_closed", 2), ("malformed_stream", 1)]
    assert stats.errors[0].example == "connection_closed happened"
    # 0: [0, 1.1], 1: [0.5, 2.8], 2: [1.0, 1.7] overlap; the four at 3.0 overlap each other.
    assert stats.max_in_flight == 4
    assert compute_stats(results, wall_s=4.0).goodput_req_per_s is None


def test_stats_of_nothing_are_none_not_zero() -> None:
    stats = compute_stats([], wall_s=0.0)
    assert stats.requests_ok == 0
    assert stats.ttft_p50_s is None and stats.tpot_p99_s is None and stats.user_tok_per_s_p5 is None


def test_tpot_needs_two_tokens() -> None:
    assert result(0, out=1).tpot_s is None
    assert result(0, out=2, ttft_s=0.1, e2e_s=0.4).tpot_s == pytest.approx(0.3)
    assert result(0, error_kind="timeout").tpot_s is None


def test_requests_are_seeded_exact_and_in_the_safe_id_range() -> None:
    load = spec(input_len=50, output_len=7, vocab_size=1000, seed=3)
    first = list(itertools.islice(make_requests(load), 5))
    assert first == list(itertools.islice(make_requests(load), 5))
    assert first != list(itertools.islice(make_requests(dataclasses.replace(load, seed=4)), 5))
    assert first[0] != next(make_requests(load, warmup=True))
    for request in first:
        assert len(request.prompt_token_ids) == 50 and request.max_tokens == 7
        assert all(100 <= token < 900 for token in request.prompt_token_ids)
    varied = dataclasses.replace(load, len_range_ratio=0.5)
    lengths = [(len(r.prompt_token_ids), r.max_tokens) for r in itertools.islice(make_requests(varied), 200)]
    assert all(25 <= i <= 75 and 3 <= o <= 11 for i, o in lengths)
    assert len({i for i, _ in lengths}) > 10


def test_bad_load_specs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="rate mode needs request_rate_per_s"):
        LoadSpec(mode=LoadMode.RATE)
    with pytest.raises(ValueError, match="give num_requests or duration_s"):
        LoadSpec(num_requests=None)
    with pytest.raises(ValueError, match="concurrency mode needs concurrency >= 1"):
        LoadSpec(concurrency=0)


# --- the SSE / HTTP parser on its own ----------------------------------------------------------------------


def _sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


TEXT = b'{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" a"}]}'
USAGE = b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'


class _FakeTransport:
    def __init__(self) -> None:
        self.aborted = False
        self.closed = False

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed or self.aborted


async def _parse_http(response: bytes, piece_len: int) -> tuple[Stream, RawPool]:
    pool = RawPool(Target.parse("http://127.0.0.1:1"), Timeouts(), {})
    conn = _RawConnection(pool)
    conn.transport = _FakeTransport()  # type: ignore[assignment]
    stream = Stream(time.perf_counter())
    conn.send(stream, b"")
    for at in range(0, len(response), piece_len):
        conn.data_received(response[at : at + piece_len])
    return stream, pool


def _chunked(body: bytes, sizes: tuple[int, ...]) -> bytes:
    out, at = b"", 0
    for size in sizes:
        out += b"%x\r\n%s\r\n" % (size, body[at : at + size])
        at += size
    return out + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - at, body[at:])


@pytest.mark.parametrize("piece_len", [1, 7, 100_000])
async def test_http_chunked_parsing_survives_any_split(piece_len: int) -> None:
    body = _sse(TEXT, TEXT, USAGE, b"[DONE]")
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    # HTTP chunk boundaries that cut SSE lines (and "data: ") in the middle.
    stream, pool = await _parse_http(head + _chunked(body, (5, 40, 1, 90)), piece_len)
    assert stream.error is None
    assert stream.done.done()
    assert (len(stream.chunk_times), stream.output_tokens, stream.prompt_tokens) == (2, 2, 3)
    assert len(pool.idle) == 1  # kept alive for the next request


async def test_content_length_body_and_newer_vllm_chunk_shape() -> None:
    # vLLM 0.1x+ leaves "usage" out of text chunks; CRLF line ends are allowed by SSE.
    body = _sse(TEXT, TEXT, TEXT).replace(b"\n", b"\r\n") + _sse(USAGE, b"[DONE]")
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    stream, _ = await _parse_http(head + body, 64)
    assert stream.error is None and len(stream.chunk_times) == 3 and stream.output_tokens == 2


async def test_continuous_usage_chunks_still_count_as_text() -> None:
    text_with_usage = TEXT[:-1] + b',"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    stream = Stream(time.perf_counter())
    assert stream.feed(_sse(text_with_usage, text_with_usage, USAGE, b"[DONE]"), time.perf_counter())
    stream.finish(time.perf_counter())
    assert stream.error is None and len(stream.chunk_times) == 2 and stream.output_tokens == 2


async def test_a_line_over_the_cap_fails_the_request_at_the_cap() -> None:
    """Fed 64 KiB at a time, one line without a newline fails once it passes 1 MiB: the buffer never holds
    more, and no read re-joins more than that (no quadratic copying of a 60 MB line)."""
    from tuner.loadgen.stream import MAX_LINE_BYTES

    stream = Stream(time.perf_counter())
    piece = b"a" * 65536
    fed = 0
    assert stream.feed(b'data: {"choices": [{"text": "', time.perf_counter())
    while stream.feed(piece, time.perf_counter()):
        fed += len(piece)
        assert len(stream.pending) <= MAX_LINE_BYTES
        assert fed < 2 * MAX_LINE_BYTES, "the line was never cut"
    assert (
        stream.error_kind == "line_too_long"
        and stream.error == "an SSE line longer than 1 MiB (after 0 chunks)"
    )
    assert stream.pending == b""


async def test_a_chunked_encoding_line_without_end_fails_the_request() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    stream, pool = await _parse_http(head + b"1" * 100_000, 1000)
    assert stream.error_kind == "malformed_stream"
    assert stream.error == "a chunked-encoding line longer than 4096 bytes (after 0 chunks)"
    assert not pool.idle


async def test_error_object_in_the_stream_is_a_server_error() -> None:
    stream = Stream(time.perf_counter())
    error = b'{"error":{"message":"engine dead","type":"InternalServerError","code":500}}'
    assert not stream.feed(_sse(TEXT, error), time.perf_counter())
    assert stream.error_kind == "server_error"
    assert stream.error == "server error in the stream: engine dead (after 1 chunk)"


# --- against the emitter -----------------------------------------------------------------------------------


async def test_counts_and_timings_match_what_the_server_did(start_emitter: StartEmitter) -> None:
    # Two tokens per chunk: 21 tokens arrive in 11 chunks, and tokens must come from usage.
    emitter = start_emitter(first_chunk_delay_s=0.1, chunk_interval_s=0.02, tokens_per_chunk=2)
    phase = await run_phase(emitter.base_url, spec(concurrency=8, num_requests=16, output_len=21))
    stats = phase.stats
    assert phase.model == "fake-model"
    assert (stats.requests_ok, stats.requests_failed) == (16, 0)
    assert stats.output_tokens_total == 16 * 21 and stats.prompt_tokens_total == 16 * 32
    for r in phase.requests:
        assert (r.output_tokens, r.prompt_tokens, r.chunks, len(r.itl_s)) == (21, 32, 11, 10)
        assert r.ttft_s is not None and r.e2e_s is not None
        assert (
            0.1 <= r.ttft_s < 0.3
        )  # the injected first-chunk delay, plus little (a loaded CI box: generous)
        assert r.ttft_s < r.e2e_s
    # 10 gaps of one 20 ms step each, spread over 20 tokens: TPOT is half a step.
    assert stats.tpot_p50_s == pytest.approx(0.01, rel=0.35)
    assert stats.itl_p50_s == pytest.approx(0.02, rel=0.35)
    assert stats.user_tok_per_s_p50 == pytest.approx(100, rel=0.35)
    assert stats.output_tokens_per_s == pytest.approx(stats.output_tokens_total / stats.wall_s)
    assert [r.index for r in phase.requests] == list(range(16))


@pytest.mark.parametrize("transport", ["raw", "httpx"])
async def test_concurrency_above_100_is_really_in_flight(
    start_emitter: StartEmitter, transport: Transport
) -> None:
    emitter = start_emitter(first_chunk_delay_s=0.3, chunk_interval_s=0.01)
    load = spec(concurrency=150, num_requests=150, output_len=5)
    phase = await run_phase(emitter.base_url, load, transport=transport)
    assert phase.stats.requests_ok == 150
    assert emitter.stats()["max_streams_open"] == 150  # seen by the server, not just claimed by the client
    assert phase.stats.max_in_flight == 150


async def test_poisson_rate_averages_near_the_rate(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(chunk_interval_s=0.005)
    load = spec(
        mode=LoadMode.RATE, request_rate_per_s=300.0, concurrency=None, num_requests=300, output_len=4
    )
    phase = await run_phase(emitter.base_url, load)
    assert phase.stats.requests_ok == 300
    assert len(phase.arrivals_late_s) == 300
    # The schedule the client kept: each start less how late its event loop was for it. A busy machine delays
    # starts and bunches them up; the schedule itself stays Poisson.
    planned = sorted(r.start_s - late for r, late in zip(phase.requests, phase.arrivals_late_s, strict=True))
    gaps = [b - a for a, b in itertools.pairwise(planned)]
    assert 1 / statistics.mean(gaps) == pytest.approx(300.0, rel=0.25)
    # Exponential gaps have a coefficient of variation of 1; evenly spaced ones would have 0.
    assert 0.6 < statistics.stdev(gaps) / statistics.mean(gaps) < 1.4
    starts = sorted(r.start_s for r in phase.requests)
    assert 1 / statistics.mean(b - a for a, b in itertools.pairwise(starts)) == pytest.approx(300.0, rel=0.5)


async def test_a_busy_client_says_how_late_it_started_arrivals(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(chunk_interval_s=0.005)
    load = spec(mode=LoadMode.RATE, request_rate_per_s=100.0, concurrency=None, num_requests=60, output_len=2)
    stalled: list[int] = []

    def stall(p: PhaseProgress) -> None:
        if p.stage == "measure" and p.requests_done >= 5 and not stalled:
            stalled.append(p.requests_done)
            time.sleep(0.25)  # the client's event loop blocked for 250 ms mid-phase

    phase = await run_phase(emitter.base_url, load, on_progress=stall)
    assert stalled
    assert phase.stats.requests_ok == 60
    assert max(phase.arrivals_late_s) >= 0.2
    assert sum(late > 0.1 for late in phase.arrivals_late_s) >= 5  # ~25 arrivals were due in the stall
    closed = await run_phase(emitter.base_url, spec(num_requests=4))
    assert closed.arrivals_late_s == () and closed.client_late_p99_s is None


async def test_warmup_is_run_but_not_counted(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(first_chunk_delay_s=0.01)
    progress: list[PhaseProgress] = []
    phase = await run_phase(
        emitter.base_url, spec(warmup_requests=7, num_requests=20), on_progress=progress.append
    )
    assert emitter.stats()["requests_total"] == 27
    assert len(phase.requests) == 20 and phase.stats.requests_ok == 20
    assert phase.warmup_s > 0
    assert all(r.start_s >= 0 for r in phase.requests)
    assert progress[0].stage == "warmup" and progress[0].requests_total == 7
    measured = [p for p in progress if p.stage == "measure"]
    assert measured[0].requests_done == 0 and measured[-1].requests_done == 20
    assert measured[-1].output_tokens == 200


async def test_killed_server_gives_errors_and_partial_results(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(chunk_interval_s=0.01)
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, lambda: threading.Thread(target=emitter.kill).start())
    load = spec(concurrency=16, num_requests=10_000, output_len=20)
    phase = await asyncio.wait_for(run_phase(emitter.base_url, load, timeouts=Timeouts(read_idle_s=5)), 10)
    stats = phase.stats
    assert stats.requests_ok > 0  # what finished before the kill is kept
    assert stats.requests_failed >= 16  # every stream in flight at the kill
    assert phase.aborted is not None and phase.aborted.startswith("server unreachable")
    assert len(phase.requests) < 10_000
    kinds = {e.kind: e for e in stats.errors}
    assert kinds["connection_closed"].count >= 16
    assert "connection closed by the server (after" in kinds["connection_closed"].example
    cut = [r for r in phase.requests if r.error_kind == "connection_closed"]
    assert any(r.chunks > 0 and r.ttft_s is not None for r in cut)  # partial streams keep their timings


async def test_server_dying_after_n_chunks(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(die_after_chunks=25)
    phase = await run_phase(emitter.base_url, spec(concurrency=1, num_requests=3, output_len=50))
    first = phase.requests[0]
    assert first.error_kind == "connection_closed"
    assert (
        0 < first.chunks <= 25 and first.error is not None and f"after {first.chunks} chunks" in first.error
    )


async def test_garbage_line_fails_that_request_only(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(garbage_every=3, chunk_interval_s=0.002)
    phase = await run_phase(emitter.base_url, spec(num_requests=12))
    bad = [r for r in phase.requests if not r.ok]
    assert phase.stats.requests_ok == 8 and len(bad) == 4
    for r in bad:
        assert r.error_kind == "malformed_stream"
        assert r.error == "data line is not JSON: <<garbage: this is not JSON>> (after 1 chunk)"


async def test_missing_usage_is_an_error(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(omit_usage_every=2)
    phase = await run_phase(emitter.base_url, spec(num_requests=10))
    assert phase.stats.requests_ok == 5
    assert [(e.kind, e.count) for e in phase.stats.errors] == [("missing_usage", 5)]
    assert "stream_options.include_usage" in phase.stats.errors[0].example


async def test_silent_server_times_out(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(stall_every=2)
    started = time.perf_counter()
    phase = await run_phase(emitter.base_url, spec(num_requests=4), timeouts=Timeouts(read_idle_s=0.4))
    assert time.perf_counter() - started < 3
    assert phase.stats.requests_ok == 2
    assert [(e.kind, e.count) for e in phase.stats.errors] == [("timeout", 2)]
    assert phase.stats.errors[0].example == "no data from the server for 0.4 s (after 1 chunk)"


@pytest.mark.parametrize("transport", ["raw", "httpx"])
async def test_http_error_carries_the_servers_message(
    start_emitter: StartEmitter, transport: Transport
) -> None:
    emitter = start_emitter(reject_every=2)
    phase = await run_phase(emitter.base_url, spec(num_requests=6), transport=transport)
    assert phase.stats.requests_ok == 3
    assert phase.stats.errors[0].kind == "http_error"
    assert phase.stats.errors[0].example == "HTTP 400: rejected by the fake emitter"


async def test_cancel_stops_quickly_and_keeps_partial_results(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(chunk_interval_s=0.01)
    cancel = threading.Event()
    asyncio.get_running_loop().call_later(0.5, cancel.set)
    started = time.perf_counter()
    phase = await run_phase(emitter.base_url, spec(num_requests=100_000, output_len=20), cancel=cancel)
    assert time.perf_counter() - started < 1.5
    assert phase.cancelled and phase.aborted is None
    assert phase.stats.requests_ok > 0
    assert phase.stats.requests_cancelled == 4  # the ones in flight; they are not failures
    assert phase.stats.requests_failed == 0


async def test_unreachable_server(start_emitter: StartEmitter) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(LoadgenError, match=r"cannot reach http://127\.0\.0\.1:\d+: is the server running\?"):
        await run_phase(url, spec())
    phase = await asyncio.wait_for(run_phase(url, spec(num_requests=1000), model="m"), 5)
    assert phase.aborted == f"server unreachable: cannot connect to {url}: connection refused"
    assert phase.stats.requests_ok == 0 and len(phase.requests) < 1000
    with pytest.raises(LoadgenError, match="not an http"):
        await run_phase("localhost:8000", spec())


async def test_model_discovery_and_base_url_forms(start_emitter: StartEmitter) -> None:
    emitter = start_emitter()
    assert await discover_model(emitter.base_url) == "fake-model"
    phase = await run_phase(emitter.base_url + "/v1/", spec(num_requests=2))
    assert phase.stats.requests_ok == 2 and phase.base_url == emitter.base_url


async def test_ladder_runs_one_phase_per_concurrency(start_emitter: StartEmitter) -> None:
    emitter = start_emitter(first_chunk_delay_s=0.05, chunk_interval_s=0.005)
    done: list[int] = []
    phases = await run_ladder(
        emitter.base_url,
        spec(),
        [1, 6],
        requests_per_stream=2,
        on_phase_done=lambda p: done.append(p.stats.max_in_flight),
    )
    assert [p.spec.concurrency for p in phases] == [1, 6]
    assert [p.stats.requests_ok for p in phases] == [2, 12]
    assert done == [1, 6]


async def test_a_phase_whose_ttft_limit_is_certain_to_fail_stops_early(start_emitter: StartEmitter) -> None:
    """Every first token takes 0.4 s against a 0.1 s limit: once 5 % of the planned requests (plus one) are
    late, the p95 cannot be met, and the phase stops instead of serving all 400."""
    from tuner.loadgen import FailFast

    emitter = start_emitter(first_chunk_delay_s=0.4, chunk_interval_s=0.001)
    load = spec(concurrency=8, num_requests=400, output_len=8)
    started = time.perf_counter()
    phase = await run_phase(emitter.base_url, load, fail_fast=FailFast(ttft_limit_s=0.1))
    assert phase.failed_early and "whatever the rest do" in phase.failed_early
    assert time.perf_counter() - started < 5.0  # 400 requests at 8 in flight would take over 20 s
    assert phase.stats.requests_ok < 100
    fast = await run_phase(emitter.base_url, spec(concurrency=8, num_requests=16, output_len=8),
                           fail_fast=FailFast(ttft_limit_s=2.0))  # fmt: skip
    assert fast.failed_early is None and fast.stats.requests_ok == 16  # a limit that holds stops nothing
