"""The trial runner: launch one vLLM server, measure points on it, stop it.

The search's trials, the proof relaunch and the production check all go through :meth:`TrialRunner.serve`,
which yields a :class:`Session` on a healthy server and stops the server (its whole process group) however the
block ends. :meth:`Session.measure` holds one load and judges it:

1. a phase sized to last at least ``min_phase_s``, and at least three request times (one to fill the server's
   batch, two of steady window), at the pace this server has shown, with at least the requests a bounded p95
   needs (59 in the window);
2. a phase during which other work kept the host busy (:class:`tuner.measure.Disturbance`) is measured again, up
   to ``remeasures`` times;
3. while an interval straddles a limit (:func:`tuner.tuning.slo.judge` says ``uncertain``) the load is held again
   and the phases are pooled, up to ``max_requests``; what is still uncertain then counts as not passing.

Scouting points (short closed-loop phases that find the server's pace) are judged on point estimates alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner.loadgen import FailFast, LoadMode, LoadSpec, PhaseProgress
from tuner.loadgen.steady import DEFAULT_CONFIDENCE, min_requests_for, steady_stats
from tuner.loadgen.workload import Workload
from tuner.measure import MeasuredPhase, measure_phase
from tuner.serving.affinity import CpuPlan, cpu_list
from tuner.serving.launcher import ServerSpec, VllmServer
from tuner.telemetry.sampler import LaunchedServer, LiveSource, Sampler
from tuner.tuning import events as ev
from tuner.tuning.nodeload import merge_measured, split_load
from tuner.tuning.placement import Placement
from tuner.tuning.points import Load, Point, empty_steady
from tuner.tuning.slo import Slo, check, judge

STEADY_REQUEST_TIMES = 3.0
"""A judged phase issues requests for at least this many median request times (one of ramp, two of window)."""
MAX_PHASE_FACTOR = 6.0
"""... but never for more than this many times its configured length."""


class AllRequestsFailed(Exception):
    """Every request of a phase failed: the server refused the workload. ``str()`` is its first message."""


@dataclass(frozen=True)
class MeasurePlan:
    """How each point is measured."""

    input_len: int = 512
    output_len: int = 256
    vocab_size: int = 1000  # prompt token ids are drawn below this: the model's own vocabulary size
    workload: Workload | None = None  # lengths and shared prefixes drawn per request (replaces the two above)
    min_phase_s: float = 10.0  # a phase lasts at least this long at the pace last seen
    # A p95 can pass only once its interval is bounded: 59 requests in the steady window (min_requests_for);
    # a first phase sends a quarter more, for the ramp it leaves out.
    min_requests: int = round(1.25 * min_requests_for(95))
    max_requests: int = 240  # a point still uncertain after this many requests counts as not passing
    production_s: float = 30.0  # the production check holds its load at least this long ...
    production_min_requests: int = 3 * min_requests_for(95)  # ... over three times the requests a p95 needs
    remeasures: int = 2  # a phase disturbed by other work on the host is measured again this many times
    confidence: float = DEFAULT_CONFIDENCE
    scout_rounds: int = 4  # a scouting phase: this many requests per user (ramp and drain excluded)


@dataclass(frozen=True)
class ServerHooks:
    """Told when a server starts and stops (the trial store records running servers for ``--resume``)."""

    started: Callable[[str, int, int], None] = lambda key, pid, port: None
    stopped: Callable[[int], None] = lambda pid: None


class EngineUrls:
    """The servers whose /metrics the sampler scrapes: every running trial's (several run side by side)."""

    def __init__(self, sampler: Sampler | None) -> None:
        self._sampler = sampler
        self._urls: set[str] = set()
        self._launched: dict[str, LaunchedServer] = {}
        self._lock = threading.Lock()

    def add(self, url: str, launched: LaunchedServer | None = None) -> None:
        """Scrape ``url`` from now on; ``launched``: its process and command line (which GPUs it holds, and the
        model a bandwidth estimate reads)."""
        with self._lock:
            self._urls.add(url)
            if launched is not None:
                self._launched[url] = launched
            self._apply()

    def remove(self, url: str) -> None:
        with self._lock:
            self._urls.discard(url)
            self._launched.pop(url, None)
            self._apply()

    def _apply(self) -> None:
        source = self._sampler.source if self._sampler else None
        if isinstance(source, LiveSource):
            source.set_engine_urls(sorted(self._urls), dict(self._launched))


@dataclass
class TrialRunner:
    """Launches candidate servers and measures them. ``emit`` takes tuning events; ``cancel`` stops phases."""

    model: str
    slo: Slo
    plan: MeasurePlan
    command: tuple[str, ...]
    fixed_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 900.0
    log_dir: Path = Path("infertop-tune") / "logs"
    sampler: Sampler | None = None
    cpu_plan: CpuPlan = field(default_factory=lambda: CpuPlan(None, None, ""))
    cpu_build: bool = False
    emit: Callable[[ev.TuneEvent], None] = lambda event: None
    cancelled: Callable[[], bool] = lambda: False
    hooks: ServerHooks = field(default_factory=ServerHooks)
    placement: Placement | None = None  # the GPUs and cores this trial's server (and client) may use
    engines: EngineUrls | None = None  # shared by the trials running side by side; None: this runner's own
    workers: int = 1  # load-generator processes per phase (one: in this process)
    _seeds: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        if self.engines is None:
            self.engines = EngineUrls(self.sampler)

    def spec(self, args: Sequence[str], log_name: str, placement: Placement | None = None) -> ServerSpec:
        placement = placement or self.placement
        env = dict(self.env)
        cpus = self.cpu_plan.server
        if placement is not None:
            env.update(placement.env())
            cpus = placement.server_cpus
        if self.cpu_build and cpus and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(cpus)  # vLLM's CPU build binds by itself
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return ServerSpec(
            model=self.model,
            args=(*self.fixed_args, *args),
            command=self.command,
            env=env,
            startup_timeout_s=self.startup_timeout_s,
            log_path=self.log_dir / f"{log_name[:60]}.log",
            cpus=cpus,
        )

    @contextlib.contextmanager
    def serve(self, key: str, args: Sequence[str], log_name: str) -> Iterator[Session]:
        """Start a server with ``args`` (raises :class:`tuner.serving.launcher.LaunchError`), yield a session on
        it, and stop it however the block ends."""
        with self._server(key, args, log_name, self.placement) as server:
            yield Session(self, server, key)

    @contextlib.contextmanager
    def serve_node(
        self, key: str, args: Sequence[str], log_name: str, placements: Sequence[Placement]
    ) -> Iterator[Session]:
        """One server per placement, started side by side, all from the same ``args``; yields one session whose
        loads are split across them as a router would (:class:`NodeSession`). One placement: :meth:`serve`."""
        if len(placements) <= 1:
            with self._server(key, args, log_name, placements[0] if placements else self.placement) as one:
                yield Session(self, one, key)
            return
        with contextlib.ExitStack() as stack:
            servers: list[VllmServer | BaseException | None] = [None] * len(placements)

            def start(i: int) -> None:
                try:
                    servers[i] = stack.enter_context(
                        self._server(key, args, f"{log_name}-r{i}", placements[i])
                    )
                except BaseException as exc:
                    servers[i] = exc

            threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(len(placements))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            failed = next((s for s in servers if isinstance(s, BaseException)), None)
            if failed is not None:
                raise failed
            yield NodeSession(self, [s for s in servers if isinstance(s, VllmServer)], key)

    @contextlib.contextmanager
    def _server(
        self, key: str, args: Sequence[str], log_name: str, placement: Placement | None
    ) -> Iterator[VllmServer]:
        server = VllmServer(
            self.spec(args, log_name, placement),
            on_spawned=lambda pid, port: self.hooks.started(key, pid, port),
            cancelled=self.cancelled,
        )
        try:
            server.start()
        except BaseException:
            if server.pid is not None:
                self.hooks.stopped(server.pid)
            raise
        self.emit(ev.ServerReady(key, server.url, server.startup_s or 0.0, server.pid))
        assert self.engines is not None
        gpus = placement.gpus if placement is not None else ()
        launched = (
            LaunchedServer(server.pid, tuple(server.argv), gpus=gpus)
            if server.pid is not None and server.argv
            else None
        )
        self.engines.add(server.url, launched)
        try:
            yield server
        finally:
            self.engines.remove(server.url)
            server.stop()
            if server.pid is not None:
                self.hooks.stopped(server.pid)

    def next_seed(self) -> int:
        return next(self._seeds)


class Session:
    """One running server of a trial, the proof or the production check."""

    def __init__(self, runner: TrialRunner, server: VllmServer, key: str) -> None:
        self.runner = runner
        self.server = server
        self.key = key
        self._pace: tuple[Load, float] | None = None  # the last load measured here and its requests/s
        self._e2e_s: float | None = None  # the median request time last seen here

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def startup_s(self) -> float | None:
        return self.server.startup_s

    def expected_rate(self, load: Load) -> float | None:
        """Requests/s this load should bring: the rate itself, or users scaled from the last pace seen."""
        if load.open_loop:
            return load.value
        if self._pace is None or self._pace[1] <= 0:
            return None
        last, rate = self._pace
        users = last.users_count if not last.open_loop else max(1.0, rate)
        return rate * max(1.0, load.value / users)

    def requests_for(self, load: Load, role: str) -> int:
        plan = self.runner.plan
        pace = self.expected_rate(load)
        seconds = plan.production_s if role == "production" else plan.min_phase_s
        if self._e2e_s is not None and role != "scout":
            # A steady window needs the server's batch to have filled (about one request time of ramp) and
            # then to hold (two more): a phase shorter than that measures a server still filling up.
            seconds = max(seconds, min(STEADY_REQUEST_TIMES * self._e2e_s, MAX_PHASE_FACTOR * seconds))
        by_time = math.ceil(pace * seconds) if pace else 0
        if role == "scout":
            floor = plan.scout_rounds * load.users_count
            by_time = math.ceil(by_time / 2)  # scouting only needs the pace: half a phase
        elif role == "production":
            floor = plan.production_min_requests
        else:
            floor = plan.min_requests
        if not load.open_loop:
            floor = max(floor, plan.scout_rounds * load.users_count)  # closed loop: room for a steady window
        return max(floor, by_time, 1)

    def measure(self, load: Load, role: str) -> Point:
        """Hold ``load`` and judge it (see the module docstring). Raises :class:`AllRequestsFailed`."""
        runner, plan = self.runner, self.runner.plan
        n = self.requests_for(load, role)
        seed = runner.next_seed()
        kept: list[MeasuredPhase] = []
        sent = repeats = 0
        disturbed = ""
        while True:
            # Every phase its own prompts (a phase measured again must not find the last one's in the prefix cache).
            phase = asyncio.run(self._phase(load, role, n, runner.next_seed(), warmup=not kept))
            sent += n
            stats = phase.load.stats
            if phase.load.cancelled or runner.cancelled():
                return self._aborted(load, role, kept, "interrupted")
            if phase.load.aborted:
                return self._aborted(load, role, kept, f"the server stopped answering: {phase.load.aborted}")
            if stats.requests_ok == 0 and stats.requests_failed > 0:
                raise AllRequestsFailed(stats.errors[0].example if stats.errors else "no request succeeded")
            d = phase.disturbance
            if d is not None and d.disturbed and repeats < plan.remeasures:
                repeats += 1
                runner.emit(ev.PhaseRepeated(self.key, load.label(), f"measured again: {d.why}"))
                continue
            if d is not None and d.disturbed:
                disturbed = d.why
            kept.append(phase)
            steady = steady_stats([p.window for p in kept if p.window], confidence=plan.confidence, seed=seed)
            if phase.load.failed_early:  # certain to fail: no interval can save it, no more requests needed
                point_verdict = check(runner.slo, steady)
                reasons = (*point_verdict.reasons, phase.load.failed_early)
                verdict = replace(point_verdict, passed=False, decision="fail", reasons=reasons)
                break
            verdict = (
                check(runner.slo, steady)
                if role == "scout"
                else judge(runner.slo, steady, open_loop=load.open_loop)
            )
            if role == "scout" or verdict.decision != "uncertain" or sent >= plan.max_requests:
                break
            runner.emit(
                ev.PhaseRepeated(self.key, load.label(), "measuring further: " + "; ".join(verdict.uncertain))
            )
            n = max(1, min(sent, plan.max_requests - sent))
        if steady.requests_per_s > 0:
            self._pace = (load, steady.requests_per_s)
        e2e = kept[-1].load.stats.e2e_p50_s
        if e2e and verdict.decision == "pass":
            # The request time of a server that kept up: a failing load's includes its queue, and sizing the
            # next phase by it would hold an overloaded server for minutes.
            self._e2e_s = e2e
        point = Point(
            load=load,
            role=role,
            decision=verdict.decision,
            steady=steady,
            reasons=verdict.reasons,
            uncertain=verdict.uncertain,
            phases=tuple(_stored(p) for p in kept),
            disturbed=disturbed,
        )
        self._tell(point)
        return point

    def _aborted(self, load: Load, role: str, kept: list[MeasuredPhase], why: str) -> Point:
        point = Point(
            load, role, "fail", empty_steady(), (why,), phases=tuple(_stored(p) for p in kept), aborted=why
        )
        self._tell(point)
        return point

    def _tell(self, p: Point) -> None:
        s = p.steady
        finished = s.requests_ok + s.requests_failed
        self.runner.emit(
            ev.PhaseMeasured(
                key=self.key, load_kind=p.load.kind, load=p.load.value, load_label=p.load.label(), role=p.role,
                decision=p.decision, output_tokens_per_s=s.output_tokens_per_s, ttft_p95_s=s.ttft_p95_s,
                tpot_p95_s=s.tpot_p95_s, tok_s_per_user_p50=s.user_tok_per_s_p50,
                error_rate=s.requests_failed / finished if finished else 0.0,
                bound=str(p.bound.get("kind", "")), reasons=(*p.reasons, *p.uncertain), requests=s.requests_ok,
                phases=s.phases, ttft_p95_ci_s=s.ttft_p95_ci_s, output_tokens_per_s_ci=s.output_tokens_per_s_ci,
                requests_per_s=s.requests_per_s, disturbed=p.disturbed,
            )
        )  # fmt: skip

    async def _phase(self, load: Load, role: str, n: int, seed: int, *, warmup: bool) -> MeasuredPhase:
        return await self._phase_on(self.server, load, role, n, seed, warmup=warmup)

    async def _phase_on(
        self,
        server: VllmServer,
        load: Load,
        role: str,
        n: int,
        seed: int,
        *,
        warmup: bool,
        report: bool = True,
    ) -> MeasuredPhase:
        runner, plan = self.runner, self.runner.plan
        if load.open_loop:
            spec = LoadSpec(
                mode=LoadMode.RATE, concurrency=None, request_rate_per_s=load.value, num_requests=n,
                warmup_requests=4 if warmup else 0, input_len=plan.input_len, output_len=plan.output_len,
                vocab_size=plan.vocab_size, seed=seed, workload=plan.workload,
            )  # fmt: skip
        else:
            spec = LoadSpec(
                mode=LoadMode.CONCURRENCY, concurrency=load.users_count, num_requests=n,
                warmup_requests=min(load.users_count, 8) if warmup else 0, input_len=plan.input_len,
                output_len=plan.output_len, vocab_size=plan.vocab_size, seed=seed, workload=plan.workload,
            )  # fmt: skip
        label = load.label()

        def progress(p: PhaseProgress) -> None:
            rate = p.output_tokens / p.elapsed_s if p.elapsed_s > 0 else 0.0
            runner.emit(
                ev.PhaseProgressed(self.key, label, p.stage, p.requests_done, p.requests_total, rate, role)
            )

        slo = runner.slo

        class _Cancel:
            def is_set(self) -> bool:
                return runner.cancelled()

        extra: dict[str, Any] = {}
        if runner.workers > 1:
            extra = {
                "workers": runner.workers,
                "client_cpus": runner.placement.client_cpus if runner.placement else None,
            }
        return await measure_phase(
            server.url, spec, sampler=runner.sampler, server_pid=server.pid, ttft_max_s=slo.ttft_p95_max_s,
            tpot_max_s=slo.tpot_p95_max_s, on_progress=progress if report else None, cancel=_Cancel(),
            confidence=plan.confidence,
            fail_fast=FailFast(slo.ttft_p95_max_s) if slo.ttft_p95_max_s is not None else None, **extra,
        )  # fmt: skip


class NodeSession(Session):
    """Every replica of a layout, loaded together: each load is split across them as a random router would
    (:func:`tuner.tuning.nodeload.split_load`) and their phases merged into the node's
    (:func:`tuner.tuning.nodeload.merge_measured`), so a point is the node's, judged against the SLO as one."""

    def __init__(self, runner: TrialRunner, servers: Sequence[VllmServer], key: str) -> None:
        super().__init__(runner, servers[0], key)
        self.servers = list(servers)

    @property
    def replicas(self) -> int:
        return len(self.servers)

    async def _phase(self, load: Load, role: str, n: int, seed: int, *, warmup: bool) -> MeasuredPhase:
        shares = split_load(load, len(self.servers))
        active = [
            (server, share) for server, share in zip(self.servers, shares, strict=True) if share is not None
        ]
        counts = [max(1, math.ceil(n * share.value / load.value)) for _, share in active]
        phases = await asyncio.gather(
            *(
                self._phase_on(server, share, role, count, seed * 1009 + i, warmup=warmup, report=i == 0)
                for i, ((server, share), count) in enumerate(zip(active, counts, strict=True))
            )
        )
        return merge_measured(phases, confidence=self.runner.plan.confidence, seed=seed)


def _stored(phase: MeasuredPhase) -> dict[str, object]:
    """A phase as the store and the report keep it (the per-request list stays out: it is large)."""
    d = phase.to_dict()
    d["stats"].pop("errors", None)
    d["errors"] = [{"kind": e.kind, "count": e.count, "example": e.example} for e in phase.load.stats.errors]
    return d
