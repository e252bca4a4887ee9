"""One phase of load from several worker processes, merged into one result.

One asyncio process reads about 100,000 streamed chunks/s flat out (BENCHMARKS.md §2), about what an 8B model
on eight H100s streams. Like GuideLLM, AIPerf and inference-perf, a phase can therefore run from several
processes: :func:`run_phase_workers` cuts the load into shares (:func:`split_load`), runs each share's
:func:`~tuner.loadgen.runner.run_phase` in a process of its own and merges what they measured
(:func:`~tuner.loadgen.merge.merge_phase_results`).

How the load is cut:

* open loop: each share arrives at rate / N: independent Poisson streams at λ/N add up to one at λ. Each share
  has a seed of its own, so no two send the same prompts or draw the same arrival times;
* closed loop: users, requests and warm-up requests are split as evenly as possible. There are never more
  shares than users (or than an open loop's in-flight cap, or than requests);
* several base URLs (the replicas of a node): first one share per URL, as a random router would give it (rate
  / R, users / R), then each URL's share over the workers that serve it; with fewer workers than URLs a worker
  drives several URLs from its one event loop.

A trace replay is cut the same way: each share replays the trace from a row of its own at rate / N, which
keeps the trace's mix of lengths and its sharing but not the exact pattern of its bursts.

The processes start with "spawn" (the tuner runs phases from threads, and forking a threaded process can copy
a held lock), warm up, and wait at a gate until all are ready: their measured windows then open together at
one epoch time, so that the merged figures cover one window. A worker that dies or fails aborts the phase with
one line saying which and how, and the others are stopped; ``cancel`` stops them all within a fraction of a
second; no worker outlives the call (what is still alive on the way out is killed, by process id).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from tuner.loadgen.control import LoadgenError, Target, clip, discover_model
from tuner.loadgen.merge import merge_phase_results
from tuner.loadgen.runner import CancelToken, FailFast, PhaseProgress, PhaseResult, run_phase
from tuner.loadgen.spec import ArrivalShare, LoadMode, LoadSpec, Timeouts
from tuner.loadgen.stats import compute_stats
from tuner.loadgen.transport import Transport

_GO_DELAY_S = 0.05  # from the go message to the windows' opening: time for it to reach every worker
_STOP_GRACE_S = 5.0  # a worker asked to stop has this long to send what it measured, then it is killed
_EXIT_GRACE_S = 2.0  # a worker that sent its result has this long to exit by itself
_POLL_S = 0.02  # the parent's supervision period (and a worker's, waiting at the gate)

Share = tuple[str, LoadSpec]
"""One share of a phase's load: the base URL it goes to and the load to send there."""


# --- cutting the load ------------------------------------------------------------------------------------------


def split_load(base_urls: Sequence[str], spec: LoadSpec, workers: int) -> list[tuple[Share, ...]]:
    """The load of ``spec`` cut into the shares each of ``workers`` processes runs (see the module docstring).

    One entry per worker that gets load (fewer than ``workers`` when there are fewer users, requests or cap
    slots than workers), each a tuple of shares (several when a worker drives several URLs). A single share
    keeps ``spec`` as it is; otherwise every share gets a seed of its own for its prompts, derived from
    ``spec.seed``, and an open loop's shares are dealt the arrivals of ``spec``'s one schedule
    (:class:`~tuner.loadgen.spec.ArrivalShare`).

    Raises:
        ValueError: no URL, or ``workers`` < 1.
    """
    if not base_urls:
        raise ValueError("split_load needs at least one base URL")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    most = _most_shares(spec)
    urls = list(base_urls[: min(len(base_urls), most)])
    # Shares per URL: the workers spread over the URLs, or one share per URL when workers are fewer.
    layout = _even(min(workers, most), len(urls)) if workers >= len(urls) else [1] * len(urls)
    if sum(layout) == 1:
        return [((urls[0], spec),)]
    share_urls = [url for url, count in zip(urls, layout, strict=True) for _ in range(count)]
    fractions = [1.0 / len(urls) / count for count in layout for _ in range(count)]
    specs = _share_specs(spec, layout, fractions)
    shares = [(url, s) for url, s in zip(share_urls, specs, strict=True) if s is not None]
    if workers >= len(urls):
        return [(share,) for share in shares]
    return [tuple(shares[i::workers]) for i in range(workers) if shares[i::workers]]


def _most_shares(spec: LoadSpec) -> int:
    """How many shares the load can be cut into: no more than its users (or cap), or its requests."""
    limits = [1 << 20]
    if spec.mode is LoadMode.CONCURRENCY or spec.concurrency is not None:
        limits.append(spec.concurrency or 1)
    if spec.num_requests is not None:
        limits.append(spec.num_requests)
    return min(limits)


def _even(total: int, parts: int) -> list[int]:
    """``total`` cut into ``parts`` whole numbers as even as possible, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _nested(total: int, layout: Sequence[int]) -> list[int]:
    """``total`` cut evenly over the URLs, then each URL's part over its shares (``layout``: shares per URL)."""
    return [
        n for part, count in zip(_even(total, len(layout)), layout, strict=True) for n in _even(part, count)
    ]


def _share_specs(spec: LoadSpec, layout: Sequence[int], fractions: Sequence[float]) -> list[LoadSpec | None]:
    """Each share's load (None: nothing fell to it). ``fractions``: each share's part of the load."""
    count = len(fractions)
    users = _nested(spec.concurrency, layout) if spec.concurrency is not None else [None] * count
    warmups = _nested(spec.warmup_requests, layout)
    requests: list[int | None] = (
        list(_nested(spec.num_requests, layout)) if spec.num_requests is not None else [None] * count
    )
    dealt = spec.mode is LoadMode.RATE and (spec.workload is None or spec.workload.trace is None)
    out: list[LoadSpec | None] = []
    low = 0.0
    for i, fraction in enumerate(fractions):
        high = 1.0 if i == count - 1 else low + fraction
        changes: dict[str, Any] = {
            "seed": _share_seed(spec.seed, i),
            "concurrency": users[i],
            "warmup_requests": warmups[i],
            "num_requests": requests[i],
        }
        if spec.request_rate_per_s is not None:
            changes["request_rate_per_s"] = spec.request_rate_per_s * fraction
        if dealt and spec.request_rate_per_s is not None:
            share = ArrivalShare(spec.seed, spec.request_rate_per_s, low, high)
            changes["arrival_share"] = share
            sessions = spec.workload is not None and spec.workload.sessions is not None
            if spec.num_requests is not None and not sessions:
                changes["num_requests"] = share.count(spec.num_requests)  # exactly the arrivals dealt to it
        low = high
        if changes["num_requests"] == 0 or changes["concurrency"] == 0:
            out.append(None)
        else:
            out.append(dataclasses.replace(spec, **changes))
    return out


def _share_seed(seed: int, share: int) -> int:
    """A seed for one share's prompts: far from ``seed + k`` (the next phase's seed must not repeat them)."""
    digest = hashlib.blake2b(f"{seed}:share:{share}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


# --- running the shares ----------------------------------------------------------------------------------------


class _Gate:
    """Holds each phase at the opening of its measured window until every phase has arrived, then awaits
    ``opening`` once (a worker: until the parent says go) and lets them all through together."""

    def __init__(self, count: int, opening: Callable[[], Awaitable[None]] | None = None) -> None:
        self.left = count
        self.opening = opening
        self.opened = asyncio.Event()

    async def __call__(self) -> None:
        self.left -= 1
        if self.left == 0:
            if self.opening is not None:
                await self.opening()
            self.opened.set()
        await self.opened.wait()


class _Progress:
    """Folds the progress of many shares into one :class:`PhaseProgress` for the caller (approximate: the
    stage is the earliest any share is in; counts are summed over the shares in it)."""

    def __init__(self, on_progress: Callable[[PhaseProgress], None], spec: LoadSpec) -> None:
        self.on_progress = on_progress
        self.spec = spec
        self.latest: dict[Hashable, PhaseProgress] = {}
        self.last_stage: str | None = None
        self.last_s = 0.0

    def update(self, share: Hashable, progress: PhaseProgress) -> None:
        self.latest[share] = progress
        self.emit()

    def emit(self, force: bool = False) -> None:
        if not self.latest:
            return
        now_s = time.monotonic()
        stage = "warmup" if any(p.stage == "warmup" for p in self.latest.values()) else "measure"
        if not force and stage == self.last_stage and now_s - self.last_s < 0.1:
            return
        self.last_stage, self.last_s = stage, now_s
        inside = [p for p in self.latest.values() if p.stage == stage]
        self.on_progress(
            PhaseProgress(
                stage="warmup" if stage == "warmup" else "measure",
                requests_done=sum(p.requests_done for p in inside),
                requests_total=self.spec.warmup_requests if stage == "warmup" else self.spec.num_requests,
                requests_failed=sum(p.requests_failed for p in inside),
                output_tokens=sum(p.output_tokens for p in inside),
                elapsed_s=max(p.elapsed_s for p in inside),
            )
        )


class _EitherSet:
    """A cancel token set when either of two is."""

    def __init__(self, first: CancelToken | None, second: asyncio.Event) -> None:
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.second.is_set() or (self.first is not None and self.first.is_set())


async def _run_shares(
    shares: Sequence[Share],
    phase_kwargs: dict[str, Any],
    gate: _Gate,
    cancel: CancelToken | None,
    on_progress: Callable[[int, PhaseProgress], None] | None,
) -> list[PhaseResult]:
    """Run the shares side by side on this event loop. A share whose phase stops early (aborted, failed early)
    stops the others, as one phase would; the first to raise cancels them and its exception propagates."""
    over = asyncio.Event()
    token = _EitherSet(cancel, over)

    def progress_of(i: int) -> Callable[[PhaseProgress], None] | None:
        if on_progress is None:
            return None
        return lambda p: on_progress(i, p)

    def ended(task: asyncio.Future[PhaseResult]) -> None:
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            if result.aborted or result.failed_early:
                over.set()

    tasks = [
        asyncio.ensure_future(
            run_phase(url, spec, measure_gate=gate, cancel=token, on_progress=progress_of(i), **phase_kwargs)
        )
        for i, (url, spec) in enumerate(shares)
    ]
    for task in tasks:
        task.add_done_callback(ended)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # a no-op on the finished ones
        await asyncio.gather(*tasks, return_exceptions=True)
    failure = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    if failure is not None:
        raise failure
    return [task.result() for task in tasks]


# --- a worker process ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    """What one worker process runs (picklable: it crosses to the spawned process)."""

    index: int
    shares: tuple[Share, ...]
    phase_kwargs: dict[str, Any]
    cpus: tuple[int, ...] | None
    progress: bool


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError, ValueError):  # the parent is gone (or closed its end): nobody to tell
        conn.send(message)


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _worker_main(conn: Connection, job: _Job) -> None:
    """A worker process: run the job's shares, send back ``("done", [PhaseResult, ...])``. Messages from the
    parent: ``("go", epoch_s)`` opens the measured windows at that time, ``("stop",)`` cancels."""
    cpu0_s = _cpu_s()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    stop, go = threading.Event(), threading.Event()
    go_at_s = [0.0]

    def listen() -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == "go":
                    go_at_s[0] = message[1]
                else:
                    stop.set()
                go.set()
        except (EOFError, OSError):  # the parent is gone: stop, nobody will read the result
            stop.set()
            go.set()

    async def opening() -> None:
        _send(conn, ("ready",))
        while not go.is_set():
            await asyncio.sleep(_POLL_S)
        delay_s = go_at_s[0] - time.time()
        if delay_s > 0 and not stop.is_set():
            await asyncio.sleep(delay_s)

    def progress(share: int, p: PhaseProgress) -> None:
        _send(conn, ("progress", share, p))

    try:
        if job.cpus:
            os.sched_setaffinity(0, job.cpus)
        threading.Thread(target=listen, name="loadgen-worker-listen", daemon=True).start()
        results = asyncio.run(
            _run_shares(
                job.shares, job.phase_kwargs, _Gate(len(job.shares), opening), stop,
                progress if job.progress else None,
            )
        )  # fmt: skip
        results[0] = dataclasses.replace(results[0], worker_cpu_s=_cpu_s() - cpu0_s)
        _send(conn, ("done", results))
    except LoadgenError as exc:
        _send(conn, ("cannot_start", str(exc)))
    except Exception as exc:  # anything else: one line for the parent, which aborts the phase
        _send(conn, ("failed", f"{type(exc).__name__}: {clip(str(exc), 200)}"))


# --- the parent ------------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    """The parent's view of one worker process."""

    index: int
    process: BaseProcess
    conn: Connection
    ready: bool = False
    finished: bool = False
    results: list[PhaseResult] = field(default_factory=list)
    cannot_start: str | None = None
    failure: str | None = None  # one line: how it died or failed

    def tell(self, message: tuple[Any, ...]) -> None:
        _send(self.conn, message)

    def drain(self, progress: _Progress | None) -> None:
        """Take its messages; mark it finished when it sent its result or failure, or died without one."""
        exited = self.process.exitcode is not None  # before reading: all it wrote before exiting is there
        try:
            while not self.finished and self.conn.poll():
                self._take(self.conn.recv(), progress)
        except (EOFError, OSError):
            exited = True
        if not self.finished and exited:
            self.finished = True
            self.process.join(timeout=1.0)
            self.failure = (
                f"load worker {self.index} (pid {self.process.pid}) died: {_how(self.process.exitcode)}"
            )

    def _take(self, message: tuple[Any, ...], progress: _Progress | None) -> None:
        kind = message[0]
        if kind == "ready":
            self.ready = True
        elif kind == "progress":
            if progress is not None:
                progress.update((self.index, message[1]), message[2])
        elif kind == "done":
            self.results, self.finished = list(message[1]), True
        elif kind == "cannot_start":
            self.cannot_start, self.finished = message[1], True
        else:
            self.failure, self.finished = f"load worker {self.index} failed: {message[1]}", True


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode} before it sent its result"


@dataclass
class _Outcome:
    results: list[PhaseResult]
    cancelled: bool  # the caller cancelled
    aborted: str | None  # a worker died or failed
    cannot_start: str | None


async def _supervise(
    workers: Sequence[_Worker], progress: _Progress | None, cancel: CancelToken | None
) -> _Outcome:
    """Open the gate once every worker is ready, relay progress, stop them all on cancel or on the first worker
    to die, fail or end the phase early; return once each has finished (or the stop grace ran out)."""
    cancelled = go_sent = False
    aborted: str | None = None
    stop_at_s: float | None = None

    def stop_all() -> None:
        nonlocal stop_at_s
        if stop_at_s is None:
            stop_at_s = time.monotonic()
            for w in workers:
                if not w.finished:
                    w.tell(("stop",))

    while True:
        for w in workers:
            if not w.finished:
                w.drain(progress)
                if w.finished and (
                    w.failure or w.cannot_start or any(r.aborted or r.failed_early for r in w.results)
                ):
                    aborted = aborted or w.failure
                    stop_all()  # the phase is over: as one process would, stop issuing everywhere
        if all(w.finished for w in workers):
            break
        if cancel is not None and cancel.is_set() and not cancelled:
            cancelled = True
            stop_all()
        if not go_sent and stop_at_s is None and all(w.ready or w.finished for w in workers):
            go_sent = True
            go_at_s = time.time() + _GO_DELAY_S
            for w in workers:
                w.tell(("go", go_at_s))
        if stop_at_s is not None and time.monotonic() - stop_at_s > _STOP_GRACE_S:
            late = [w.index for w in workers if not w.finished]
            aborted = aborted or (
                None if cancelled else f"load workers {late} did not stop within {_STOP_GRACE_S:g} s: killed"
            )
            break
        await asyncio.sleep(_POLL_S)
    cannot_start = next((w.cannot_start for w in workers if w.cannot_start), None)
    return _Outcome([r for w in workers for r in w.results], cancelled, aborted, cannot_start)


async def _run_in_processes(
    jobs: Sequence[tuple[Share, ...]],
    phase_kwargs: dict[str, Any],
    cpus: Collection[int] | None,
    progress: _Progress | None,
    cancel: CancelToken | None,
) -> _Outcome:
    context = get_context("spawn")
    workers: list[_Worker] = []
    try:
        for index, shares in enumerate(jobs):
            parent_end, child_end = context.Pipe()
            job = _Job(
                index, shares, phase_kwargs, tuple(sorted(cpus)) if cpus else None, progress is not None
            )
            process = context.Process(
                target=_worker_main, args=(child_end, job), name=f"loadgen-worker-{index}", daemon=True
            )
            process.start()
            child_end.close()  # the child holds its own copy; ours would hide its death from recv()
            workers.append(_Worker(index, process, parent_end))
        outcome = await _supervise(workers, progress, cancel)
        deadline_s = time.monotonic() + _EXIT_GRACE_S
        while any(w.process.exitcode is None for w in workers) and time.monotonic() < deadline_s:
            await asyncio.sleep(_POLL_S)
        return outcome
    finally:
        for w in workers:  # whatever happened, no worker outlives the call
            if w.process.exitcode is None:
                w.process.kill()
        for w in workers:
            w.process.join(timeout=1.0)
            w.conn.close()


async def run_phase_workers(
    base_url: str | Sequence[str],
    spec: LoadSpec,
    workers: int = 1,
    *,
    cpus: Collection[int] | None = None,
    model: str | None = None,
    api_key: str | None = None,
    ttft_max_s: float | None = None,
    tpot_max_s: float | None = None,
    timeouts: Timeouts | None = None,
    on_progress: Callable[[PhaseProgress], None] | None = None,
    cancel: CancelToken | None = None,
    transport: Transport = "raw",
    fail_fast: FailFast | None = None,
) -> PhaseResult:
    """Run one phase of ``spec`` from ``workers`` processes (pinned to ``cpus`` when given) against
    ``base_url``, or against several base URLs (the replicas of a node, each sent its share), and merge
    what they measured into one :class:`PhaseResult` whose ``spec`` is ``spec``.

    ``workers=1`` with one URL is :func:`~tuner.loadgen.runner.run_phase` itself, in this process; with several
    URLs one worker runs them side by side in this process. Otherwise each worker is a spawned process; other
    keywords are :func:`~tuner.loadgen.runner.run_phase`'s. ``on_progress`` (on this event loop) gets the
    workers' progress folded into one, approximately. ``cancel`` stops every worker within a fraction of a
    second. A worker that dies or fails sets ``aborted`` (one line) and stops the others; a worker whose
    phase stops early (aborted, failed early) stops the others too.

    Raises:
        LoadgenError: the phase cannot start (bad URL, no model, a worker could not start).
        ValueError: no URL, or ``workers`` < 1.
    """
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("run_phase_workers needs at least one base URL")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    if workers == 1 and len(urls) == 1:
        return await run_phase(
            urls[0], spec, model=model, api_key=api_key, ttft_max_s=ttft_max_s, tpot_max_s=tpot_max_s,
            timeouts=timeouts, on_progress=on_progress, cancel=cancel, transport=transport, fail_fast=fail_fast,
        )  # fmt: skip
    timeouts = timeouts or Timeouts()
    urls = [Target.parse(url).base_url for url in urls]
    if model is None:
        model = await discover_model(urls[0], api_key=api_key, timeout_s=timeouts.connect_s)
    phase_kwargs: dict[str, Any] = {
        "model": model, "api_key": api_key, "ttft_max_s": ttft_max_s, "tpot_max_s": tpot_max_s,
        "timeouts": timeouts, "transport": transport, "fail_fast": fail_fast,
    }  # fmt: skip
    jobs = split_load(urls, spec, workers)
    progress = _Progress(on_progress, spec) if on_progress is not None else None
    if workers == 1:
        shares = jobs[0]

        def relay(share: int, p: PhaseProgress) -> None:
            if progress is not None:
                progress.update(share, p)

        results = await _run_shares(shares, phase_kwargs, _Gate(len(shares)), cancel, relay)
        cancelled = cancel is not None and cancel.is_set() and any(r.cancelled for r in results)
        outcome = _Outcome(results, cancelled, None, None)
    else:
        outcome = await _run_in_processes(jobs, phase_kwargs, cpus, progress, cancel)
    if outcome.cannot_start is not None:
        raise LoadgenError(outcome.cannot_start)
    if progress is not None:
        progress.emit(force=True)
    if outcome.results:
        merged = merge_phase_results(outcome.results)
    else:
        now_s = time.time()
        stats = compute_stats([], 0.0, ttft_max_s=ttft_max_s, tpot_max_s=tpot_max_s)
        merged = PhaseResult(", ".join(urls), model, spec, stats, (), now_s, now_s, 0.0)
    return dataclasses.replace(
        merged,
        spec=spec,
        cancelled=outcome.cancelled,
        aborted=outcome.aborted or merged.aborted,
    )
