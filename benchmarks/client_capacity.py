"""How many streamed chunks per second the load generator reads on one core, and when TTFT starts to lie.

The fake vLLM emitter (tests/fakes/sse_server.py) runs in its own process pinned to core 0; the client runs
pinned to core 1. 256 streams of vLLM-shaped chunks (~200 bytes, one token each).

1. Flat out: the emitter sends as fast as the client reads. Compares httpx the naive way (``aiter_lines`` +
   ``json.loads`` per chunk), httpx with tuner.loadgen's cheap parser, tuner.loadgen's raw asyncio client,
   and the same split over worker processes (all on the client's one core). Chunks that pile up while the
   client is busy arrive together ("chunks/read" > 1), so these are upper bounds.
2. Paced: the emitter decodes in steps like vLLM (one chunk per stream every interval), the first chunk of
   each request 50 ms after it arrives. For rising rates: chunks/s reached in the steady middle of the
   phase, and the TTFT the client measured next to the TTFT the emitter itself saw (request parsed -> first
   chunk written): the gap is what the client (and the loopback) add.

Prints Markdown tables. Run: ``.venv/bin/python benchmarks/client_capacity.py`` (about 2 minutes;
``--quick`` for a shorter run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.fakes.sse_server import EmitterConfig, EmitterProcess
from tuner.loadgen import LoadSpec, PhaseResult, RequestResult, Transport, run_phase

STREAMS = 256
EMITTER_CPU, CLIENT_CPU = 0, 1
FIRST_CHUNK_DELAY_S = 0.05


@dataclass
class Measured:
    """What one client run achieved."""

    chunks: int
    reads: int  # distinct arrival timestamps: chunks that came in one socket read share one
    wall_s: float
    client_cpu_s: float
    errors: int


def _reads(results: Sequence[RequestResult]) -> int:
    return sum(1 + sum(1 for gap in r.itl_s if gap > 0) for r in results if r.chunks)


def _measured(result: PhaseResult, client_cpu_s: float) -> Measured:
    return Measured(
        chunks=sum(r.chunks for r in result.requests),
        reads=_reads(result.requests),
        wall_s=result.stats.wall_s,
        client_cpu_s=client_cpu_s,
        errors=result.stats.requests_failed,
    )


class CoreBusy:
    """Busy share of the emitter's and the client's cores between start() and stop(), from /proc/stat.

    Per-process CPU time misses the kernel's loopback TCP work (softirq), so whole cores are measured.
    """

    def __enter__(self) -> CoreBusy:
        self.before = psutil.cpu_times(percpu=True)
        return self

    def __exit__(self, *exc: object) -> None:
        after = psutil.cpu_times(percpu=True)
        self.pct = {}
        for core in (EMITTER_CPU, CLIENT_CPU):
            deltas = {f: getattr(after[core], f) - getattr(self.before[core], f) for f in after[core]._fields}
            idle = deltas.get("idle", 0.0) + deltas.get("iowait", 0.0)
            self.pct[core] = 100.0 * (1.0 - idle / max(1e-9, sum(deltas.values())))


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def loadgen_run(base_url: str, transport: Transport, streams: int, duration_s: float) -> Measured:
    spec = LoadSpec(
        concurrency=streams, num_requests=None, duration_s=duration_s, input_len=16, output_len=256, seed=1
    )
    cpu0 = _cpu_s()
    result = await run_phase(base_url, spec, transport=transport)
    return _measured(result, _cpu_s() - cpu0)


async def httpx_naive_run(base_url: str, streams: int, duration_s: float) -> Measured:
    """The usual way: httpx line iteration and json.loads on every chunk (like vLLM bench's client)."""
    body = {
        "model": "fake-model",
        "prompt": list(range(100, 116)),
        "max_tokens": 256,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chunks = reads = errors = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    cpu0 = _cpu_s()
    start_s = time.perf_counter()
    deadline_s = start_s + duration_s
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal chunks, reads, errors
            while time.perf_counter() < deadline_s:
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        last_s = None
                        async for line in response.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            data = json.loads(line[6:])
                            if data.get("choices"):
                                now_s = time.perf_counter()
                                chunks += 1
                                reads += now_s != last_s
                                last_s = now_s
                except httpx.HTTPError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(streams)))
    return Measured(chunks, reads, time.perf_counter() - start_s, _cpu_s() - cpu0, errors)


def _worker_main(base_url: str, transport: Transport, streams: int, duration_s: float, out: Any) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    m = asyncio.run(loadgen_run(base_url, transport, streams, duration_s))
    out.put((m.chunks, m.reads, m.wall_s, m.client_cpu_s, m.errors))


def workers_run(base_url: str, transport: Transport, workers: int, duration_s: float) -> Measured:
    """The streams split over ``workers`` processes, all pinned to the client's core."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(base_url, transport, STREAMS // workers, duration_s, queue))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=duration_s + 120) for _ in procs]
    for p in procs:
        p.join()
    return Measured(
        chunks=sum(p[0] for p in parts),
        reads=sum(p[1] for p in parts),
        wall_s=max(p[2] for p in parts),
        client_cpu_s=sum(p[3] for p in parts),
        errors=sum(p[4] for p in parts),
    )


def flat_out(duration_s: float) -> list[str]:
    rows = [
        "| client | chunks/s | chunks/read | client core busy | emitter core busy | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    cases: list[tuple[str, Callable[[str], Measured]]] = [
        (
            "httpx aiter_lines + json.loads per chunk",
            lambda url: asyncio.run(httpx_naive_run(url, STREAMS, duration_s)),
        ),
        (
            "httpx + loadgen cheap parser",
            lambda url: asyncio.run(loadgen_run(url, "httpx", STREAMS, duration_s)),
        ),
        ("httpx + cheap parser, 4 processes", lambda url: workers_run(url, "httpx", 4, duration_s)),
        (
            "raw asyncio + cheap parser (loadgen)",
            lambda url: asyncio.run(loadgen_run(url, "raw", STREAMS, duration_s)),
        ),
        ("raw asyncio, 2 processes", lambda url: workers_run(url, "raw", 2, duration_s)),
    ]
    for name, run in cases:
        with EmitterProcess(EmitterConfig(), cpu=EMITTER_CPU) as emitter, CoreBusy() as busy:
            m = run(emitter.base_url)
        rows.append(
            f"| {name} | {m.chunks / m.wall_s:,.0f} | {m.chunks / max(1, m.reads):.2f} | "
            f"{busy.pct[CLIENT_CPU]:.0f} % | {busy.pct[EMITTER_CPU]:.0f} % | {m.errors} |"
        )
        print(rows[-1], flush=True)
    return rows


def steady_chunks_per_s(results: Sequence[RequestResult], wall_s: float) -> float:
    """Chunks per second over the middle 60 % of the phase, away from the ramp-up and the ragged end."""
    lo_s, hi_s = 0.2 * wall_s, 0.8 * wall_s
    count = 0
    for r in results:
        if r.ttft_s is None:
            continue
        t_s = r.start_s + r.ttft_s
        count += lo_s <= t_s < hi_s
        for gap_s in r.itl_s:
            t_s += gap_s
            count += lo_s <= t_s < hi_s
    return count / (hi_s - lo_s)


async def paced_run(
    base_url: str, transport: Transport, interval_s: float, rounds: int
) -> tuple[PhaseResult, int]:
    # Each request lasts ~1 s; lengths vary +-50 % so that requests do not all end (and restart) together.
    spec = LoadSpec(
        concurrency=STREAMS,
        num_requests=STREAMS * rounds,
        warmup_requests=STREAMS,
        input_len=16,
        output_len=max(20, round(1.0 / interval_s)),
        len_range_ratio=0.5,
        seed=2,
    )
    result = await run_phase(base_url, spec, transport=transport)
    return result, _reads(result.requests)


def paced(levels: Sequence[tuple[Transport, Sequence[float]]], rounds: int) -> list[str]:
    rows = [
        "| client | target chunks/s | reached (steady) | chunks/read | client core busy | "
        "TTFT client p50 / p90 / p99 (ms) | TTFT server p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for transport, intervals_s in levels:
        for interval_s in intervals_s:
            config = EmitterConfig(first_chunk_delay_s=FIRST_CHUNK_DELAY_S, chunk_interval_s=interval_s)
            with EmitterProcess(config, cpu=EMITTER_CPU) as emitter:
                with CoreBusy() as busy:
                    result, reads = asyncio.run(paced_run(emitter.base_url, transport, interval_s, rounds))
                server = emitter.stats()
            s = result.stats
            chunks = sum(r.chunks for r in result.requests)
            client_ttft = " / ".join(
                f"{1000 * (v or 0):.1f}" for v in (s.ttft_p50_s, s.ttft_p90_s, s.ttft_p99_s)
            )
            server_ttft = " / ".join(f"{1000 * server[f'server_ttft_p{q}_s']:.1f}" for q in (50, 90, 99))
            rows.append(
                f"| {transport} | {STREAMS / interval_s:,.0f} | "
                f"{steady_chunks_per_s(result.requests, s.wall_s):,.0f} | {chunks / max(1, reads):.2f} | "
                f"{busy.pct[CLIENT_CPU]:.0f} % | {client_ttft} | {server_ttft} | "
                f"{1000 * (s.itl_p50_s or 0):.1f} / {1000 * (s.itl_p99_s or 0):.1f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer load levels")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores: one for the emitter, one for the client")
    os.sched_setaffinity(0, {CLIENT_CPU})
    print(f"## Flat out, {STREAMS} streams, one core each\n")
    flat_out(duration_s=2.0 if args.quick else 5.0)
    print(f"\n## Paced, {STREAMS} streams, first chunk {1000 * FIRST_CHUNK_DELAY_S:.0f} ms after arrival\n")
    if args.quick:
        paced([("raw", [0.01, 0.005, 0.0025])], rounds=2)
    else:
        paced([("raw", [0.02, 0.01, 0.005, 0.0033, 0.0025, 0.002]), ("httpx", [0.02, 0.01, 0.005])], rounds=4)


if __name__ == "__main__":
    main()
