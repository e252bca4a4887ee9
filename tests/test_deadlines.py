"""Every request has a deadline: derived from its length and the SLO, enforced as wall time whatever bytes keep
arriving (SSE comments, endless tokens), so that a phase ends on time against any server; and a server that
ignores ``max_tokens`` fails its requests instead of being read forever."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from fakes.hostile_server import StartHostile

from tuner.loadgen import LoadSpec, Timeouts, Transport, run_phase
from tuner.loadgen.spec import DEADLINE_MARGIN, FLOOR_TOKENS_PER_S, FLOOR_TTFT_S
from tuner.loadgen.stream import SPARE_CHUNKS, Stream

# --- the deadline: one formula ------------------------------------------------------------------------------


def test_the_deadline_is_the_slowest_the_slo_allows_times_a_margin() -> None:
    timeouts = Timeouts()
    assert timeouts.deadline_s(128, ttft_max_s=2.0, tpot_max_s=0.05) == pytest.approx(3 * (2 + 128 * 0.05))
    assert DEADLINE_MARGIN == 3.0
    # Without an SLO: the floors, conservative (a CPU build at high concurrency is slower than any SLO).
    assert timeouts.deadline_s(128) == pytest.approx(
        DEADLINE_MARGIN * (FLOOR_TTFT_S + 128 / FLOOR_TOKENS_PER_S)
    )
    assert timeouts.deadline_s(128, ttft_max_s=0.5) == pytest.approx(3 * (0.5 + 128 / FLOOR_TOKENS_PER_S))
    assert timeouts.deadline_s(1024) > timeouts.deadline_s(16)  # longer answers, longer deadlines
    assert Timeouts(total_s=7.0).deadline_s(128, ttft_max_s=2.0, tpot_max_s=0.05) == 7.0  # one for all


# --- a server that never ends its stream ------------------------------------------------------------------------


def _spec(**fields: object) -> LoadSpec:
    base = LoadSpec(concurrency=2, num_requests=6, input_len=16, output_len=10)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["raw", "httpx"])
async def test_keepalive_comments_forever_fail_each_request_at_its_deadline_and_the_phase_ends_on_time(
    start_hostile: StartHostile, transport: Transport
) -> None:
    """`: ping` every 50 ms, never a token: the idle limit never fires. Each request fails at its deadline,
    3 x (0.2 s + 10 x 0.02 s) = 1.2 s, and after a whole round of them (3 in a row, at least the 2 users) the
    phase stops issuing: about two deadlines, not the six requests' deadlines one after another."""
    server = start_hostile("ping")
    started = time.perf_counter()
    phase = await asyncio.wait_for(
        run_phase(server.url, _spec(), model="m", ttft_max_s=0.2, tpot_max_s=0.02, transport=transport), 15
    )
    took_s = time.perf_counter() - started
    assert 2.3 < took_s < 4.0
    assert phase.stats.requests_ok == 0 and phase.stats.requests_failed == 4
    assert [(e.kind, e.count) for e in phase.stats.errors] == [("deadline", 4)]
    assert (
        phase.stats.errors[0].example
        == "deadline of 1.2 s passed with the stream still open (after 0 chunks)"
    )
    assert all(1.2 <= r.duration_s < 1.5 for r in phase.requests)
    assert phase.aborted == (
        "3 requests in a row were still open at their deadlines: deadline of 1.2 s passed with the stream still "
        "open (after 0 chunks)"
    )
    assert len(server.prompts) == 4  # nothing issued after the round that passed its deadlines


async def test_an_explicit_deadline_holds_for_every_request(start_hostile: StartHostile) -> None:
    server = start_hostile("ping")
    phase = await asyncio.wait_for(
        run_phase(server.url, _spec(num_requests=2), model="m", timeouts=Timeouts(total_s=0.5)), 10
    )
    assert [(e.kind, e.count) for e in phase.stats.errors] == [("deadline", 2)]
    assert phase.stats.errors[0].example.startswith("deadline of 0.5 s passed")


@pytest.mark.parametrize("transport", ["raw", "httpx"])
async def test_endless_tokens_past_max_tokens_stop_the_read_and_fail_the_request(
    start_hostile: StartHostile, transport: Transport
) -> None:
    server = start_hostile("endless")
    started = time.perf_counter()
    phase = await asyncio.wait_for(
        run_phase(server.url, _spec(num_requests=4), model="m", transport=transport), 15
    )
    assert time.perf_counter() - started < 3.0  # long before any deadline (3 x (60 + 10) s without an SLO)
    assert [(e.kind, e.count) for e in phase.stats.errors] == [("too_many_tokens", 4)]
    assert phase.stats.errors[0].example.endswith(
        "text chunks for max_tokens 10: the server ignores max_tokens "
        f"(after {phase.requests[0].chunks} chunks)"
    )
    assert all(10 + SPARE_CHUNKS < r.chunks < 10_000 for r in phase.requests), [
        r.chunks for r in phase.requests
    ]


# --- one stream, fed directly -----------------------------------------------------------------------------------


def _sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


TEXT = b'{"choices":[{"index":0,"text":" a","finish_reason":null}]}'


def _usage(completion: object, prompt: object = 3) -> bytes:
    return b'{"choices":[],"usage":{"prompt_tokens":%s,"completion_tokens":%s}}' % (
        str(prompt).encode(),
        str(completion).encode(),
    )


async def test_a_usage_over_max_tokens_fails_the_request() -> None:
    stream = Stream(time.perf_counter(), max_tokens=2)
    assert stream.feed(_sse(TEXT, TEXT, _usage(5), b"[DONE]"), time.perf_counter())
    stream.finish(time.perf_counter())
    assert stream.error_kind == "too_many_tokens"
    assert stream.error == "5 tokens for max_tokens 2: the server ignores max_tokens (after 2 chunks)"
    fine = Stream(time.perf_counter(), max_tokens=2)
    fine.feed(_sse(TEXT, TEXT, _usage(2), b"[DONE]"), time.perf_counter())
    fine.finish(time.perf_counter())
    assert fine.error is None and fine.output_tokens == 2


@pytest.mark.parametrize("completion", ["true", "-1", "2.5", '"2"', "1e999", "null"])
async def test_a_usage_that_is_no_count_is_a_malformed_stream(completion: str) -> None:
    stream = Stream(time.perf_counter(), max_tokens=2)
    assert not stream.feed(_sse(TEXT, _usage(completion)), time.perf_counter())
    assert stream.error_kind == "malformed_stream" and "usage holds no token counts" in (stream.error or "")


async def test_answer_token_ids_that_are_not_ids_are_not_kept() -> None:
    stream = Stream(time.perf_counter(), want_ids=True, max_tokens=4)
    good = b'{"choices":[{"index":0,"text":"a","token_ids":[5, 6]}]}'
    bad = b'{"choices":[{"index":0,"text":"b","token_ids":["x", {}]}]}'
    assert stream.feed(_sse(good, bad, _usage(2), b"[DONE]"), time.perf_counter())
    assert stream.token_ids == [5, 6]
