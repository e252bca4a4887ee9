"""Load from several worker processes (tuner.loadgen.workers) and merging concurrent phases (tuner.loadgen.merge).

The integration tests run the fake SSE emitter (a separate process) paced like a server: every request gets its
first chunk 50 ms after it arrives, then one chunk per 10 ms step. The load stays low (tens of requests per
second) so that on a 2-core machine neither the emitter nor the clients are short of CPU: what one worker and
several workers measure must then be the server's figures, and agree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from fakes.sse_server import EmitterConfig, EmitterProcess

from tuner.loadgen import LoadMode, LoadSpec, PhaseProgress, RequestResult, compute_stats
from tuner.loadgen.merge import merge_phase_results
from tuner.loadgen.runner import PhaseResult
from tuner.loadgen.spec import ArrivalShare
from tuner.loadgen.steady import steady_stats, steady_window
from tuner.loadgen.workers import run_phase_workers, split_load

PACED = {"first_chunk_delay_s": 0.05, "chunk_interval_s": 0.01}


@pytest.fixture
def start_emitter() -> Iterator[Callable[..., EmitterProcess]]:
    started: list[EmitterProcess] = []

    def start(**knobs: object) -> EmitterProcess:
        emitter = EmitterProcess(EmitterConfig(**knobs)).start()  # type: ignore[arg-type]
        started.append(emitter)
        return emitter

    yield start
    for emitter in started:
        emitter.stop()


def load_workers() -> list[psutil.Process]:
    """This process's children that are load workers (multiprocessing's resource tracker, started once per
    process by "spawn" and gone with it, is not one; nor are the emitters, started by another module)."""
    workers = []
    for child in psutil.Process().children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmdline:
            workers.append(child)
    return workers


def open_loop(**fields: object) -> LoadSpec:
    base = LoadSpec(
        mode=LoadMode.RATE,
        request_rate_per_s=25.0,
        concurrency=None,
        num_requests=150,
        input_len=16,
        output_len=20,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


# --- cutting the load: pure --------------------------------------------------------------------------------------


def test_open_loop_shares_are_dealt_the_one_schedule_of_the_phase() -> None:
    spec = open_loop(num_requests=1000, warmup_requests=7)
    jobs = split_load(["http://a:1"], spec, 3)
    shares = [s for job in jobs for _, s in job]
    assert len(jobs) == 3 and all(len(job) == 1 for job in jobs)
    assert sum(s.num_requests or 0 for s in shares) == 1000  # exactly the phase's arrivals, dealt
    assert sorted(s.warmup_requests for s in shares) == [2, 2, 3]
    assert sum(s.request_rate_per_s or 0 for s in shares) == pytest.approx(25.0)
    assert len({s.seed for s in shares}) == 3 and spec.seed not in {s.seed for s in shares}
    for s in shares:  # a random router: each share gets about a third, not exactly
        assert s.num_requests is not None and 280 < s.num_requests < 390
    # Every arrival of the whole schedule goes to exactly one share: the dealt gaps add up to the same timeline.
    whole = [0.1 * k for k in range(1, 301)]
    dealt = []
    for s in shares:
        assert s.arrival_share is not None
        t = 0.0
        for gap in s.arrival_share.deal(iter([0.1] * 300)):
            t += gap
            dealt.append(round(t, 6))
    assert sorted(dealt) == [round(t, 6) for t in whole]


def test_closed_loop_users_and_requests_split_evenly_and_never_into_empty_shares() -> None:
    spec = LoadSpec(concurrency=5, num_requests=11, warmup_requests=2)
    shares = [s for job in split_load(["http://a:1"], spec, 3) for _, s in job]
    assert [s.concurrency for s in shares] == [2, 2, 1]
    assert [s.num_requests for s in shares] == [4, 4, 3]
    assert [s.warmup_requests for s in shares] == [1, 1, 0]
    assert all(s.arrival_share is None for s in shares)
    assert (
        len(split_load(["http://a:1"], dataclasses.replace(spec, concurrency=2), 4)) == 2
    )  # 2 users: 2 workers
    one = split_load(["http://a:1"], dataclasses.replace(spec, concurrency=1), 4)
    assert one == [
        (("http://a:1", dataclasses.replace(spec, concurrency=1)),)
    ]  # one share keeps the spec as is


def test_several_urls_get_a_random_routers_shares_and_workers_spread_over_them() -> None:
    urls = ["http://a:1", "http://b:2"]
    spec = open_loop(num_requests=400)
    jobs = split_load(urls, spec, 3)  # a: 2 workers with a quarter each, b: 1 worker with a half
    assert [[url for url, _ in job] for job in jobs] == [["http://a:1"], ["http://a:1"], ["http://b:2"]]
    rates = [s.request_rate_per_s for job in jobs for _, s in job]
    assert rates == pytest.approx([6.25, 6.25, 12.5])
    per_url = {url: sum(s.num_requests or 0 for job in jobs for u, s in job if u == url) for url in urls}
    assert sum(per_url.values()) == 400 and 160 < per_url["http://a:1"] < 240
    # Fewer workers than URLs: a worker drives several URLs.
    four = ["http://a:1", "http://b:2", "http://c:3", "http://d:4"]
    jobs = split_load(four, LoadSpec(concurrency=8, num_requests=80), 2)
    assert [[url for url, _ in job] for job in jobs] == [[four[0], four[2]], [four[1], four[3]]]
    assert all(s.concurrency == 2 and s.num_requests == 20 for job in jobs for _, s in job)


def test_an_arrival_share_belongs_to_an_open_loop() -> None:
    with pytest.raises(ValueError, match="arrival share"):
        LoadSpec(arrival_share=ArrivalShare(0, 1.0, 0.0, 0.5))
    with pytest.raises(ValueError, match="arrival share"):
        open_loop(arrival_share=ArrivalShare(0, 1.0, 0.5, 0.5))


# --- merging: pure -----------------------------------------------------------------------------------------------


def request(index: int, start_s: float, ttft_s: float, out: int = 10) -> RequestResult:
    e2e_s = ttft_s + 0.01 * (out - 1)
    return RequestResult(
        index, start_s, e2e_s, 8, out, ttft_s, e2e_s, (0.01,) * (out - 1), out, 8, out
    )  # fmt: skip


def phase(requests: list[RequestResult], started_at_s: float, **fields: object) -> PhaseResult:
    wall_s = max(r.start_s + r.duration_s for r in requests)
    result = PhaseResult(
        base_url="http://a:1", model="m", spec=LoadSpec(concurrency=2, num_requests=len(requests)),
        stats=compute_stats(requests, wall_s, ttft_max_s=0.2), requests=tuple(requests),
        started_at_s=started_at_s, ended_at_s=started_at_s + wall_s, warmup_s=0.5,
    )  # fmt: skip
    return dataclasses.replace(result, **fields)  # type: ignore[arg-type]


def test_merging_two_concurrent_halves_gives_the_statistics_of_their_union() -> None:
    # One phase's requests, dealt to two "workers" whose windows opened 0.25 s apart.
    union = [request(i, 0.1 * i, 0.05 + 0.013 * (i % 17)) for i in range(60)]
    late_s = 0.25
    a = [dataclasses.replace(r, index=k) for k, r in enumerate(union[0::2])]
    b = [dataclasses.replace(r, index=k, start_s=r.start_s - late_s) for k, r in enumerate(union[1::2])]
    pa = phase(a, 1000.0, arrivals_late_s=(0.001, 0.002))
    pb = phase(b, 1000.0 + late_s, arrivals_late_s=(0.003,), base_url="http://b:2", failed_early="too slow")
    merged = merge_phase_results([pa, pb])
    expected = compute_stats(union, max(r.start_s + r.duration_s for r in union), ttft_max_s=0.2)
    assert merged.stats.ttft_p50_s == pytest.approx(expected.ttft_p50_s)
    assert merged.stats.ttft_p95_s == pytest.approx(expected.ttft_p95_s)
    assert merged.stats.tpot_p95_s == pytest.approx(expected.tpot_p95_s)
    assert merged.stats.max_in_flight == expected.max_in_flight
    assert merged.stats.goodput_req_per_s == pytest.approx(expected.goodput_req_per_s)
    # Throughput adds up: both halves ran over (about) the same window.
    assert merged.stats.output_tokens_per_s == pytest.approx(expected.output_tokens_per_s)
    assert merged.stats.output_tokens_per_s == pytest.approx(
        pa.stats.output_tokens_per_s + pb.stats.output_tokens_per_s, rel=0.05
    )
    assert [r.index for r in merged.requests] == list(range(60))
    assert [r.start_s for r in merged.requests] == pytest.approx([r.start_s for r in union])
    assert merged.started_at_s == 1000.0 and merged.ended_at_s == pytest.approx(pb.ended_at_s)
    assert merged.arrivals_late_s == (0.001, 0.002, 0.003)
    assert merged.base_url == "http://a:1, http://b:2" and merged.model == "m"
    assert merged.spec.num_requests == 60 and merged.spec.concurrency == 4
    assert merged.failed_early == "too slow" and merged.aborted is None and not merged.cancelled
    assert merge_phase_results([pa]) is pa


# --- worker processes against the fake server -------------------------------------------------------------------


def test_one_worker_and_three_measure_the_same_server_alike(
    start_emitter: Callable[..., EmitterProcess],
) -> None:
    emitter = start_emitter(**PACED)
    spec = open_loop(warmup_requests=6, seed=3)
    progress: list[PhaseProgress] = []
    one = asyncio.run(run_phase_workers(emitter.base_url, spec, 1))
    three = asyncio.run(run_phase_workers(emitter.base_url, spec, 3, on_progress=progress.append))
    assert not load_workers()
    assert three.spec == spec and three.aborted is None and not three.cancelled
    assert one.stats.requests_ok == three.stats.requests_ok == 150
    assert three.stats.requests_failed == 0
    assert three.worker_cpu_s > 0 and one.worker_cpu_s == 0
    # The same seed gives the same arrival schedule, however many workers deal it: the rate offered is the
    # same (up to each client's lateness, ms), and both say how it compares with the rate asked.
    assert one.offered_rate_per_s is not None and three.offered_rate_per_s is not None
    assert three.offered_rate_per_s == pytest.approx(one.offered_rate_per_s, rel=0.03)
    assert one.offered_share == pytest.approx(three.offered_share, rel=0.03)
    assert 0.75 < (three.offered_share or 0) < 1.33  # 150 Poisson arrivals: about 1 +- 0.08 by chance
    assert three.client_late_p99_s is not None and three.client_late_p99_s < 0.05
    # Latency is the server's (50 ms to the first chunk, 10 ms steps): each figure of the three workers lies in
    # the other's 90 % interval, widened by 5 ms for what two cores shared by four processes add.
    a = steady_stats([steady_window(one.requests)])
    b = steady_stats([steady_window(three.requests)])
    assert a.ttft_p50_s is not None and b.ttft_p50_s is not None
    assert b.ttft_p50_s == pytest.approx(a.ttft_p50_s, abs=0.005)
    assert a.ttft_p95_ci_s is not None and b.ttft_p95_s is not None
    low, high = a.ttft_p95_ci_s
    assert low - 0.005 <= b.ttft_p95_s <= (high if high is not None else 1.0) + 0.005
    assert 0.045 < b.ttft_p50_s < 0.07
    # Throughput: the same requests over the same timeline.
    assert three.stats.output_tokens_per_s == pytest.approx(one.stats.output_tokens_per_s, rel=0.05)
    assert b.output_tokens_per_s_ci is not None
    assert b.output_tokens_per_s_ci[0] * 0.9 <= a.output_tokens_per_s <= b.output_tokens_per_s_ci[1] * 1.1
    # Progress: the workers' folded into one, ending with the whole phase.
    assert progress and progress[-1].stage == "measure"
    assert progress[-1].requests_done == 150 and progress[-1].output_tokens == 150 * 20


def test_a_worker_killed_mid_phase_aborts_the_phase_and_leaves_no_process(
    start_emitter: Callable[..., EmitterProcess],
) -> None:
    emitter = start_emitter(**PACED)
    spec = open_loop(num_requests=None, duration_s=30.0)
    killed: list[int] = []

    async def main() -> tuple[PhaseResult, float]:
        measuring = asyncio.Event()

        def on_progress(p: PhaseProgress) -> None:
            if p.stage == "measure" and p.requests_done >= 5:
                measuring.set()

        task = asyncio.ensure_future(run_phase_workers(emitter.base_url, spec, 2, on_progress=on_progress))
        await asyncio.wait_for(measuring.wait(), 20)
        victim = load_workers()[0]
        killed.append(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        result = await asyncio.wait_for(task, 15)
        return result, time.monotonic() - t0

    result, took_s = asyncio.run(main())
    assert result.aborted is not None and "died" in result.aborted and "SIGKILL" in result.aborted
    assert f"pid {killed[0]}" in result.aborted and "\n" not in result.aborted
    assert not result.cancelled
    assert took_s < 3.0  # the other worker was stopped, not left to run its 30 s
    assert result.stats.requests_ok > 0  # what the surviving worker measured is kept
    assert not load_workers()


def test_cancel_stops_every_worker_within_a_couple_of_seconds(
    start_emitter: Callable[..., EmitterProcess],
) -> None:
    emitter = start_emitter(**PACED)
    spec = LoadSpec(concurrency=6, num_requests=None, duration_s=30.0, input_len=16, output_len=50)
    cancel = threading.Event()

    async def main() -> tuple[PhaseResult, float]:
        measuring = asyncio.Event()

        def on_progress(p: PhaseProgress) -> None:
            if p.stage == "measure" and p.requests_done >= 3:
                measuring.set()

        task = asyncio.ensure_future(
            run_phase_workers(emitter.base_url, spec, 2, cancel=cancel, on_progress=on_progress)
        )
        await asyncio.wait_for(measuring.wait(), 20)
        cancel.set()
        t0 = time.monotonic()
        result = await asyncio.wait_for(task, 10)
        return result, time.monotonic() - t0

    result, took_s = asyncio.run(main())
    assert result.cancelled and result.aborted is None
    assert took_s < 2.0
    assert result.stats.requests_ok >= 3 and result.stats.requests_cancelled > 0
    assert not load_workers()


def test_several_urls_each_get_their_share(start_emitter: Callable[..., EmitterProcess]) -> None:
    replicas = [start_emitter(**PACED), start_emitter(**PACED)]
    urls = [e.base_url for e in replicas]
    spec = open_loop(num_requests=80, warmup_requests=4, request_rate_per_s=40.0)
    for workers in (1, 2):  # 1: both URLs from this process; 2: a worker process per URL
        before = [e.stats()["requests_total"] for e in replicas]
        result = asyncio.run(run_phase_workers(urls, spec, workers))
        sent = [e.stats()["requests_total"] - b for e, b in zip(replicas, before, strict=True)]
        shares = [share for job in split_load(urls, spec, workers) for share in job]
        expected = [
            sum((s.num_requests or 0) + s.warmup_requests for u, s in shares if u == url) for url in urls
        ]
        assert sent == expected and sum(sent) == 84
        assert all(n > 20 for n in sent)  # a random router's shares: about half each
        assert result.stats.requests_ok == 80 and result.base_url == ", ".join(urls)
        assert result.aborted is None
    assert not load_workers()


def test_one_worker_on_one_url_runs_in_this_process(
    start_emitter: Callable[..., EmitterProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    emitter = start_emitter(**PACED)

    def no_processes(method: str) -> None:
        raise AssertionError("workers=1 must not start a process")

    monkeypatch.setattr("tuner.loadgen.workers.get_context", no_processes)
    spec = open_loop(num_requests=20)
    result = asyncio.run(run_phase_workers(emitter.base_url, spec, 1))
    assert result.spec == spec and result.stats.requests_ok == 20
    assert statistics.median(r.ttft_s or 0 for r in result.requests) > 0.045
