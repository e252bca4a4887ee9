"""The load generator against servers that misbehave on purpose (tests/fakes/hostile_server.py): one SSE line
that never ends fails its request in bounded memory and time, over both transports; and a workload drawn
against a server of a smaller context sends nothing the server must refuse, and says how the draw changed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import tracemalloc

import pytest
from fakes.hostile_server import StartHostile

from tuner.loadgen import LoadSpec, Transport, run_phase
from tuner.loadgen.workload import PRESETS, for_server


@pytest.mark.parametrize("transport", ["raw", "httpx"])
async def test_a_line_that_never_ends_fails_its_request_in_bounded_memory_and_time(
    start_hostile: StartHostile, transport: Transport
) -> None:
    """60 MB of one SSE line, never a newline: the client gives up past 1 MiB, instead of buffering it all and
    re-joining the buffer on every read (quadratic: minutes of copying)."""
    server = start_hostile("long_line")
    spec = LoadSpec(concurrency=1, num_requests=1, input_len=8, output_len=4)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        phase = await asyncio.wait_for(run_phase(server.url, spec, model="m", transport=transport), 20)
        took_s = time.perf_counter() - started
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(e.kind, e.count) for e in phase.stats.errors] == [("line_too_long", 1)]
    assert phase.stats.errors[0].example == "an SSE line longer than 1 MiB (after 0 chunks)"
    assert took_s < 5.0
    assert peak_bytes < 16 * 2**20  # the line's 1 MiB, a read or two, and copies of them
    assert server.bytes_sent < 16_000_000  # the client stopped reading long before the 60 MB


async def test_requests_over_the_context_are_drawn_again_and_never_sent(start_hostile: StartHostile) -> None:
    """`bench --workload chat` against a 1,024-token context: chat's lognormal prompts reach 2,000 tokens and
    more. The server would refuse those; drawn within its context, none is sent, the phase fails nothing, and
    one line says how often a draw was drawn again and how the lengths changed."""
    server = start_hostile("context", context=1024)
    chat = PRESETS["chat"]
    spec = LoadSpec(concurrency=4, num_requests=24, vocab_size=1000, workload=chat, seed=0)
    unfitted = await run_phase(server.url, spec, model="hostile")
    assert server.refused > 0 and unfitted.stats.errors[0].kind == "http_error"  # the server does refuse them

    fitted, notes = for_server(chat, server.url, None, 1000)  # what bench does with the server's context
    assert fitted.fit_within == 1024 and fitted.longest_sequence == 1024
    assert len(notes) == 1 and notes[0].startswith(
        "requests longer than the server's 1024-token context are drawn again (about 2"
    )
    assert (
        "the server would refuse them): prompts mean 596 -> 43" in notes[0]
        and "; answers mean 249 -> " in notes[0]
    )
    server.prompts.clear()
    server.refused = 0
    phase = await run_phase(server.url, dataclasses.replace(spec, workload=fitted), model="hostile")
    assert server.refused == 0 and len(server.prompts) == 24
    assert all(prompt + max_tokens <= 1024 for prompt, max_tokens in server.prompts)
    assert phase.stats.requests_ok == 24 and phase.stats.requests_failed == 0
    assert phase.draws_over_context > 0  # of 24 requests, some first drew a longer one


async def test_a_server_closing_every_kept_alive_connection_unannounced_costs_no_request(
    start_hostile: StartHostile,
) -> None:
    """Each retry of a request whose kept-alive connection was closed goes out on a fresh connection: another
    idle one may be closed as well (the client learns of a close only when it reads)."""
    server = start_hostile("context", context=100_000, close_each=1)
    spec = LoadSpec(concurrency=8, num_requests=64, input_len=8, output_len=4)
    phase = await run_phase(server.url, spec, model="hostile")
    assert phase.stats.errors == () and phase.stats.requests_ok == 64
