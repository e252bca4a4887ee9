"""Running load: one phase (:func:`run_phase`: warm-up, then the measured window) or a ladder of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tuner.loadgen.control import Target, discover_model
from tuner.loadgen.rawhttp import RawPool
from tuner.loadgen.spec import (
    Conversation,
    LoadMode,
    LoadSpec,
    RequestSpec,
    Timeouts,
    make_conversations,
    make_requests,
    stand_in_answer,
)
from tuner.loadgen.stats import PhaseStats, RequestResult, compute_stats, percentile
from tuner.loadgen.stream import Stream
from tuner.loadgen.trace import trace_prompts
from tuner.loadgen.transport import Client, HttpxClient, Transport


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
    failed_early: str | None = None  # the phase stopped once its TTFT limit was certain to fail (FailFast)
    # Sessions: answers the server did not return as token ids (older vLLM), replaced in the history by
    # stand-in ids of their length (see spec.stand_in_answer): the prefix cache could not reuse them.
    stand_in_answers: int = 0
    # Open loop: how late the client started each scheduled arrival (seconds after its planned time, in arrival
    # order; its own event loop was busy). Empty for a closed loop. Late arrivals lower the rate offered.
    arrivals_late_s: tuple[float, ...] = ()
    # CPU seconds the load generator spent in worker processes (tuner.loadgen.workers); 0 when it ran in the
    # caller's process, whose own CPU time then holds it.
    worker_cpu_s: float = 0.0
    # Draws of the measured requests' lengths that outgrew the workload's context (Workload.fit_within) and were
    # drawn again: the server would have refused them.
    draws_over_context: int = 0

    @property
    def client_late_p99_s(self) -> float | None:
        """p99 of how late the client started its arrivals; None for a closed loop."""
        return percentile(sorted(self.arrivals_late_s), 99) if self.arrivals_late_s else None

    @property
    def offered_rate_per_s(self) -> float | None:
        """Requests issued per second, from the first to the last issued (any outcome): the load the client
        offered, to hold against ``spec.request_rate_per_s``. None with fewer than two requests."""
        if len(self.requests) < 2:
            return None
        starts = [r.start_s for r in self.requests]
        span_s = max(starts) - min(starts)
        return (len(starts) - 1) / span_s if span_s > 0 else None

    @property
    def offered_share(self) -> float | None:
        """Open loop: the rate offered over the rate asked (1.0 = on schedule; a Poisson phase of n requests
        strays by about 1/sqrt(n) by chance). None for a closed loop or too few requests."""
        offered, asked = self.offered_rate_per_s, self.spec.request_rate_per_s
        if offered is None or not asked or self.spec.mode is not LoadMode.RATE:
            return None
        return offered / asked


@dataclass(frozen=True, slots=True)
class FailFast:
    """Stop a phase as soon as its TTFT p95 cannot meet ``ttft_limit_s`` whatever the rest do: more than
    ``share`` of the planned requests (plus one) already got their first token later than the limit, or have
    waited longer than it without one. An overloaded server's queue otherwise holds a phase for minutes; the
    requests still in flight are cancelled."""

    ttft_limit_s: float
    share: float = 0.05


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


_CONNECT_FAILURES_TO_ABORT = 3  # in a row: the server is gone, stop issuing instead of failing every request
# In a row, and at least as many as the phase keeps in flight (a whole round of them): requests still open at
# their deadlines with none finishing between. A server that holds streams open (SSE comments, endless tokens)
# would otherwise hold the phase for every request's deadline in turn.
_DEADLINES_TO_ABORT = 3
_POLL_S = 0.1  # watchdog period: idle timeouts, deadlines and the cancel token are checked this often


class _Phase:
    """The machinery of one :func:`run_phase` call."""

    def __init__(
        self,
        client: Client,
        model: str,
        spec: LoadSpec,
        timeouts: Timeouts,
        on_progress: Callable[[PhaseProgress], None] | None,
        cancel: CancelToken | None,
        fail_fast: FailFast | None = None,
        measure_gate: Callable[[], Awaitable[None]] | None = None,
        ttft_max_s: float | None = None,
        tpot_max_s: float | None = None,
    ) -> None:
        self.client = client
        self.measure_gate = measure_gate
        self.spec = spec
        self.timeouts = timeouts
        self.ttft_max_s = ttft_max_s  # the SLO: each request's deadline derives from it (Timeouts.deadline_s)
        self.tpot_max_s = tpot_max_s
        self.on_progress = on_progress
        self.cancel = cancel
        self.stopping = asyncio.Event()
        # No request is to be issued any more: ``stopping`` (cancelled, aborted, failed early), or a phase of
        # conversations has issued its ``num_requests``. Requests in flight still finish, and fail-fast still
        # watches them: only ``stopping`` cancels.
        self.no_more = asyncio.Event()
        self.cancelled = False
        self.aborted: str | None = None
        self.fail_fast = fail_fast
        self.failed_early: str | None = None
        self.late_first_tokens = (
            0  # finished requests of the measured stage whose TTFT broke fail_fast's limit
        )
        self.in_flight: set[Stream] = set()
        self.connect_failures_in_row = 0
        self.deadlines_in_row = 0
        self.draws_over_context = 0
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        body.update(spec.extra_body)
        # Everything but the prompt and max_tokens is fixed: serialise it once and splice per request.
        self.body_tail = json.dumps(body, separators=(",", ":"))[1:].encode()
        # A conversation's turns ask for the answer's token ids, to send them back as the history.
        self.body_tail_ids = json.dumps({**body, "return_token_ids": True}, separators=(",", ":"))[
            1:
        ].encode()
        self.issued = 0  # measured requests issued by conversations (their turns number them)
        self.stand_in_answers = 0
        self.arrivals_late_s: list[float] = []
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

    async def _one(
        self, request: RequestSpec, *, want_ids: bool = False
    ) -> tuple[RequestResult, list[int] | None]:
        """Send one request and record its result; with ``want_ids``, also the answer's token ids (or None)."""
        body = b'{"prompt":%s,"max_tokens":%d,%s' % (
            json.dumps(request.prompt_token_ids, separators=(",", ":")).encode(),
            request.max_tokens,
            self.body_tail_ids if want_ids else self.body_tail,
        )
        deadline_s = self.timeouts.deadline_s(
            request.max_tokens, ttft_max_s=self.ttft_max_s, tpot_max_s=self.tpot_max_s
        )
        stream = Stream(
            time.perf_counter(), want_ids=want_ids, max_tokens=request.max_tokens, deadline_s=deadline_s
        )
        if self.stage == "measure":
            self.draws_over_context += request.redrawn
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
        self._count_deadline(result)
        if result.ok:
            self.tokens += result.output_tokens or 0
            limit = self.fail_fast.ttft_limit_s if self.fail_fast else None
            if limit is not None and self.stage == "measure" and (result.ttft_s or 0.0) > limit:
                self.late_first_tokens += 1
        elif result.error_kind != "cancelled":
            self.failed_count += 1
        self._progress()
        return result, stream.token_ids

    def _count_deadline(self, result: RequestResult) -> None:
        """Stop issuing once a whole round of requests in a row was still open at its deadline."""
        if result.error_kind == "cancelled":
            return
        if result.error_kind != "deadline":
            self.deadlines_in_row = 0
            return
        self.deadlines_in_row += 1
        if self.deadlines_in_row >= max(_DEADLINES_TO_ABORT, self.spec.concurrency or 0) and not self.aborted:
            in_row = self.deadlines_in_row
            self.aborted = f"{in_row} requests in a row were still open at their deadlines: {result.error}"
            self.stopping.set()

    def _check_fail_fast(self, now_s: float) -> None:
        """Stop the measured stage once its TTFT p95 is certain to break the limit (see :class:`FailFast`)."""
        ff = self.fail_fast
        if ff is None or self.stage != "measure" or self.failed_early or self.stopping.is_set():
            return
        planned = self.stage_total or max(1, self.done_count + len(self.in_flight))
        waiting = sum(
            1 for st in self.in_flight if not st.chunk_times and now_s - st.start_s > ff.ttft_limit_s
        )
        late = self.late_first_tokens + waiting
        if late > ff.share * planned + 1:
            self.failed_early = (
                f"stopped early: {late} of {planned} requests waited over {ff.ttft_limit_s:.2f} s for their first "
                f"token, so the TTFT p95 breaks the limit whatever the rest do"
            )
            self.stopping.set()

    async def _watchdog(self) -> None:
        idle_s = self.timeouts.read_idle_s
        while True:
            await asyncio.sleep(_POLL_S)
            if self.stopping.is_set():
                self.no_more.set()
            if self.cancel is not None and self.cancel.is_set() and not self.cancelled:
                self.cancelled = True
                self.stopping.set()
            now_s = time.perf_counter()
            self._check_fail_fast(now_s)
            for stream in list(self.in_flight):
                if self.cancelled:
                    stream.fail("cancelled", "the phase was cancelled")
                elif self.failed_early:
                    stream.fail("cancelled", self.failed_early)
                elif now_s - stream.last_rx_s > idle_s:
                    stream.fail("timeout", f"no data from the server for {idle_s:g} s")
                elif stream.deadline_s is not None and now_s - stream.start_s > stream.deadline_s:
                    # Wall time, whatever bytes keep arriving: SSE comments and tokens reset only the idle limit.
                    how = "the stream still open" if stream.last_rx_s > stream.start_s else "no answer yet"
                    stream.fail("deadline", f"deadline of {_seconds(stream.deadline_s)} s passed with {how}")

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

    async def _conversation(
        self, conversation: Conversation, deadline_s: float, gate: asyncio.Semaphore | None = None
    ) -> None:
        """One conversation's turns in order, each prompt the conversation so far; it ends at the deadline, at
        the phase's request count, at a failed turn, or before a turn would outgrow its context."""
        history: tuple[int, ...] = ()
        limit = self.spec.num_requests
        for turn in conversation.turns:
            if turn.think_s > 0 and history:
                await self._pause(min(turn.think_s, deadline_s - time.perf_counter()))
            prompt = history + turn.message_ids
            if len(prompt) + turn.max_tokens > conversation.context:
                return  # the user would start a new conversation
            if gate is not None:
                await gate.acquire()
            try:
                if self.no_more.is_set() or self.stopping.is_set() or time.perf_counter() >= deadline_s:
                    return
                request = RequestSpec(self.issued, prompt, turn.max_tokens, turn.redrawn)
                self.issued += 1
                if limit is not None and self.issued >= limit:
                    self.no_more.set()  # the phase's requests are all issued: no conversation goes on
                result, answer = await self._one(request, want_ids=True)
            finally:
                if gate is not None:
                    gate.release()
            if not result.ok:
                return
            if not answer or len(answer) != result.output_tokens:
                self.stand_in_answers += 1
                answer = list(stand_in_answer(result.output_tokens or 0, self.spec.vocab_size, request.index))
            history = prompt + tuple(answer)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` (a user thinking), or less once no request is to be issued."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.no_more.wait(), seconds)

    async def _closed_loop_conversations(self, concurrency: int, deadline_s: float) -> None:
        conversations = make_conversations(self.spec)

        async def user() -> None:
            while not self.no_more.is_set() and time.perf_counter() < deadline_s:
                await self._conversation(next(conversations), deadline_s)

        await asyncio.gather(*(user() for _ in range(concurrency)))

    async def _open_loop(
        self, requests: Iterator[RequestSpec], rate_per_s: float, cap: int | None, deadline_s: float
    ) -> None:
        share = self.spec.arrival_share
        rng = random.Random(f"{share.seed if share else self.spec.seed}:arrivals")
        gate = asyncio.Semaphore(cap) if cap else None

        def gaps(per_arrival: float = 1.0) -> Iterator[float]:
            """Gaps between this phase's arrivals (at the rate over ``per_arrival``); a share's are the whole
            phase's, dealt (spec.ArrivalShare)."""
            if share is None:
                return (rng.expovariate(rate_per_s / per_arrival) for _ in itertools.count())
            return share.deal(rng.expovariate(share.rate_per_s / per_arrival) for _ in itertools.count())

        async def gated(request: RequestSpec) -> None:
            if gate is None:
                await self._one(request)
                return
            async with gate:
                if not self.stopping.is_set():
                    await self._one(request)

        workload = self.spec.workload
        arrivals: Iterator[tuple[float, Callable[[], Awaitable[None]]]]
        stop = self.stopping
        if workload is not None and workload.trace is not None:
            # The trace's own gaps, its time axis scaled so that its mean rate is the rate asked for.
            scale = workload.trace.rate_per_s / rate_per_s
            vocab = self.spec.vocab_size
            replay = trace_prompts(workload.trace, self.spec.seed, vocab // 10, vocab - vocab // 10)
            limit = self.spec.num_requests
            arrivals = (
                (gap * scale, functools.partial(gated, RequestSpec(index, ids, max_tokens)))
                for index, (ids, max_tokens, gap) in enumerate(
                    replay if limit is None else itertools.islice(replay, limit)
                )
            )
        elif workload is not None and workload.sessions is not None:
            # Conversations start at the rate over the mean turns each, so that requests arrive at about the rate.
            session_gaps = gaps(max(1.0, workload.sessions.turns.mean))
            arrivals = (
                (gap_s, functools.partial(self._conversation, conversation, deadline_s, gate))
                for gap_s, conversation in zip(session_gaps, make_conversations(self.spec), strict=False)
            )
            stop = self.no_more  # a conversation phase's last request issued: no new conversation either
        else:
            arrivals = (
                (gap_s, functools.partial(gated, request))
                for gap_s, request in zip(gaps(), requests, strict=False)
            )
        await self._schedule(arrivals, deadline_s, stop)

    async def _schedule(
        self,
        arrivals: Iterator[tuple[float, Callable[[], Awaitable[None]]]],
        deadline_s: float,
        stop: asyncio.Event,
    ) -> None:
        """Start each arrival after its gap (seconds after the one before), until the deadline or ``stop``; then
        wait for all of them to finish."""
        tasks: set[asyncio.Task[None]] = set()
        next_s = time.perf_counter()
        for gap_s, start in arrivals:
            next_s += gap_s  # absolute schedule: no drift from loop delays
            if next_s >= deadline_s:
                break
            delay_s = next_s - time.perf_counter()
            if delay_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
            if stop.is_set():
                break
            self.arrivals_late_s.append(max(0.0, time.perf_counter() - next_s))
            task = asyncio.ensure_future(start())
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
            if self.measure_gate is not None:
                await self.measure_gate()
                if self.cancel is not None and self.cancel.is_set() and not self.cancelled:
                    self.cancelled = True  # cancelled at the gate: issue nothing (the watchdog would be late)
                    self.stopping.set()

            self._reset_stage("measure", spec.num_requests)
            started_at_s = time.time()
            self._progress(force=True)
            requests = make_requests(spec)
            if spec.num_requests is not None:
                requests = _take(requests, spec.num_requests)
            deadline_s = self.stage_start_s + spec.duration_s if spec.duration_s else math.inf
            sessions = spec.workload is not None and spec.workload.sessions is not None
            if not self.stopping.is_set():
                if spec.mode is LoadMode.CONCURRENCY and sessions:
                    await self._closed_loop_conversations(spec.concurrency or 1, deadline_s)
                elif spec.mode is LoadMode.CONCURRENCY:
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


def _seconds(value_s: float) -> str:
    return f"{value_s:.0f}" if value_s >= 10 else f"{value_s:.2g}"


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
    fail_fast: FailFast | None = None,
    measure_gate: Callable[[], Awaitable[None]] | None = None,
) -> PhaseResult:
    """Run one phase of load against ``base_url`` (e.g. ``http://127.0.0.1:8000``) and measure it.

    ``fail_fast`` ends the phase as soon as its TTFT p95 is certain to break a limit (``failed_early`` says so).
    ``measure_gate`` is awaited between the warm-up and the measured window: phases run side by side (worker
    processes, :mod:`tuner.loadgen.workers`) wait there for each other, so that their windows open together.

    ``model`` defaults to the first one at ``/v1/models``. ``ttft_max_s``/``tpot_max_s`` are the SLOs for
    goodput, and set each request's deadline (:meth:`~tuner.loadgen.spec.Timeouts.deadline_s`, unless
    ``timeouts.total_s`` gives one for all): a request still open at its deadline fails (``"deadline"``), and a
    whole round of them in a row stops the phase (``aborted``). ``on_progress`` is called on this event loop
    (keep it cheap). Setting ``cancel`` stops the phase within ~0.1 s and returns what was measured. Raises
    :class:`LoadgenError` only when the phase cannot start; failures of individual requests are in the result.
    """
    target = Target.parse(base_url)
    timeouts = timeouts or Timeouts()
    if model is None:
        model = await discover_model(target.base_url, api_key=api_key, timeout_s=timeouts.connect_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client: Client = (
        RawPool(target, timeouts, headers) if transport == "raw" else HttpxClient(target, timeouts, headers)
    )
    phase = _Phase(
        client, model, spec, timeouts, on_progress, cancel, fail_fast, measure_gate, ttft_max_s, tpot_max_s
    )
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
        failed_early=phase.failed_early,
        stand_in_answers=phase.stand_in_answers,
        arrivals_late_s=tuple(phase.arrivals_late_s),
        draws_over_context=phase.draws_over_context,
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
