"""How many streamed chunks per second the load generator reads from 1, 2 and 4 worker processes.

The fake vLLM emitter (tests/fakes/sse_server.py) runs in its own process pinned to one core; the workers
(tuner.loadgen.workers.run_phase_workers) are pinned to the cores given by ``--client-cpus`` (default: every
other core). 256 closed-loop streams of vLLM-shaped chunks (one token each, 256 per request), flat out: the
emitter sends as fast as the clients read. Each configuration runs ``--repeat`` times; the table gives the
median and the range. Chunks that pile up while a client is busy arrive together ("chunks/read" > 1), so these
are upper bounds of what a paced server could be read at.

Run: ``.venv/bin/python benchmarks/loadgen_workers.py`` (about 2 minutes; ``--quick`` for a shorter run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.fakes.sse_server import EmitterConfig, EmitterProcess
from tuner.loadgen import LoadSpec, PhaseResult
from tuner.loadgen.workers import run_phase_workers

STREAMS = 256
EMITTER_CPU = 0


def _busy_pct(before: Sequence[Any], after: Sequence[Any], cores: Sequence[int]) -> float:
    """Mean busy share of ``cores`` between two ``psutil.cpu_times(percpu=True)`` readings (softirq included)."""
    shares = []
    for core in cores:
        a, b = before[core], after[core]
        deltas = {f: getattr(b, f) - getattr(a, f) for f in b._fields}
        idle = deltas.get("idle", 0.0) + deltas.get("iowait", 0.0)
        shares.append(100.0 * (1.0 - idle / max(1e-9, sum(deltas.values()))))
    return statistics.fmean(shares)


def one_run(workers: int, client_cpus: Sequence[int], duration_s: float) -> tuple[float, float, float, int]:
    """(chunks/s, chunks per read, client cores busy %, errors) of one phase against a fresh emitter."""
    spec = LoadSpec(
        concurrency=STREAMS, num_requests=None, duration_s=duration_s, input_len=16, output_len=256, seed=1
    )
    with EmitterProcess(EmitterConfig(), cpu=EMITTER_CPU) as emitter:
        before = psutil.cpu_times(percpu=True)
        result: PhaseResult = asyncio.run(
            run_phase_workers(emitter.base_url, spec, workers, cpus=client_cpus)
        )
        after = psutil.cpu_times(percpu=True)
    chunks = sum(r.chunks for r in result.requests)
    reads = sum(1 + sum(1 for gap in r.itl_s if gap > 0) for r in result.requests if r.chunks)
    busy = _busy_pct(before, after, client_cpus)
    return chunks / result.stats.wall_s, chunks / max(1, reads), busy, result.stats.requests_failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 s phases, 2 repeats")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--client-cpus", type=int, nargs="+", help="cores for the workers (default: all but 0)"
    )
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("needs two cores: one for the emitter, the others for the client")
    client_cpus = args.client_cpus or [c for c in cores if c != EMITTER_CPU]
    duration_s, repeat = (2.0, 2) if args.quick else (5.0, args.repeat)
    # The parent (supervising the workers; with workers=1, the client itself) shares the client's cores.
    os.sched_setaffinity(0, set(client_cpus))
    print(
        f"## Flat out, {STREAMS} streams, emitter on core {EMITTER_CPU}, client on cores "
        f"{','.join(map(str, client_cpus))}; {repeat} runs of {duration_s:g} s each\n"
    )
    print("| workers | chunks/s, median | range | chunks/read | client cores busy | errors |")
    print("|---:|---:|---:|---:|---:|---:|", flush=True)
    for workers in args.workers:
        runs = [one_run(workers, client_cpus, duration_s) for _ in range(repeat)]
        rates = [r[0] for r in runs]
        print(
            f"| {workers} | {statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
            f"{statistics.median(r[1] for r in runs):.1f} | {statistics.median(r[2] for r in runs):.0f} % | "
            f"{sum(r[3] for r in runs)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
