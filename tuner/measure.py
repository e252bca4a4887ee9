"""A measurement phase = load (loadgen) + GPU/host telemetry (sampler) + the server's own counters (/metrics).

Every phase ends with what bound it, decided from that evidence, and with a cross-check of the client's token
count against the server's counter. The warm-up runs as its own short phase first, so the server counters
bracket the measured requests exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from tuner.loadgen import CancelToken, FailFast, LoadSpec, PhaseProgress, PhaseResult, Timeouts
from tuner.loadgen.steady import DEFAULT_CONFIDENCE, PhaseWindow, SteadyStats, steady_stats, steady_window
from tuner.loadgen.workers import run_phase_workers
from tuner.telemetry.model import BENIGN_CLOCK_EVENTS, GpuInfo, GpuSample, Snapshot
from tuner.telemetry.sampler import Sampler
from tuner.telemetry.vllm_metrics import MetricsText, fetch_metrics

TOKEN_MISMATCH_TOLERANCE = (
    0.01  # the server counts exactly what it generated; 1 % leaves room for nothing else
)
# Other work on the host during a phase: CPU used by processes that are neither the server nor this client, in
# cores, and CPU steal (time the hypervisor gave to other machines), in % of all CPUs. Above either, the phase
# measured the neighbours too: it is flagged, and the tuner measures it again.
OTHER_LOAD_MAX_CORES = 0.3
STEAL_MAX_PCT = 5.0
CLIENT_LATE_MAX_S = 0.02
"""Open loop: a client that started 1 % of its arrivals later than this after their planned time (its own event
loop busy) offered a lower and burstier load than asked: the phase is disturbed."""


MEMORY_BOUND_PCT = 60.0
"""Measured DRAM bandwidth (GPM, DCGM) at or above this share of peak: the phase was memory-bandwidth bound."""
ESTIMATE_TO_MEASURED_MAX = 0.96
"""The decode-traffic estimate counts only the reads a decode step must make, so it reads below the counters: at
most 0.96 of GPM on REFERENCE's H100 runs (BENCHMARKS.md §13, 0.63-0.96)."""
ESTIMATE_MEMORY_BOUND_PCT = MEMORY_BOUND_PCT * ESTIMATE_TO_MEASURED_MAX
"""The memory-bound judgement on the estimate: from 57.6 % estimated, the counters would read at least 60 %. Below,
the phase may still be memory-bound; it is not called so on an estimate."""


class BoundKind(str, enum.Enum):
    """What limited a phase."""

    GPU_MEMORY_BANDWIDTH = "gpu_memory_bandwidth"
    GPU_COMPUTE = "gpu_compute"
    KV_CACHE_QUEUEING = "kv_cache_queueing"
    FRONT_END_OR_CLIENT = "front_end_or_client"
    CLIENT = "client"
    ENGINE = "engine"  # no GPU telemetry (the CPU build): the engine itself, not the queue or the client
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Bound:
    kind: BoundKind
    reason: str  # one sentence with the numbers that decided it


@dataclass(frozen=True)
class Evidence:
    """Telemetry averaged (or maximised) over the measured window. None: not available."""

    gpu_samples: int = 0
    dram_bw_util_pct_mean: float | None = None  # measured: GPM or DCGM (dram_bw_source says which)
    dram_bw_source: str | None = None  # "GPM", "DCGM", "GPM and DCGM"; None: nothing measured it
    # ESTIMATED from the model's decode reads, where nothing measured the bandwidth.
    dram_bw_est_pct_mean: float | None = None
    sm_active_pct_mean: float | None = None
    tensor_active_pct_mean: float | None = None
    gpu_util_pct_mean: float | None = None
    mem_busy_pct_mean: float | None = None
    power_w_mean: float | None = None  # summed over the server's GPUs (gpu_indices)
    energy_j: float | None = (
        None  # the server's GPUs over the window: energy-counter deltas, else power integrated
    )
    vram_used_bytes_max: int | None = None
    host_cpu_pct_mean: float | None = None
    client_cpu_pct: float | None = None  # this process, % of one core
    server_cpu_pct: float | None = None  # the vLLM server's process group, % of one core
    engine_samples: int = 0
    requests_running_mean: float | None = None
    requests_waiting_max: float | None = None
    requests_waiting_mean: float | None = None
    kv_cache_usage_pct_max: float | None = None
    preemptions: float | None = None  # counter delta over the window
    server_generation_tokens: float | None = None  # counter delta over the window
    server_prompt_tokens: float | None = None
    # Prompt tokens the server found in its prefix cache over the window, of those it looked up. Prompts are
    # drawn fresh for every phase, so this stays near zero; more means the load repeated itself (optimistic).
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    gpu_indices: tuple[int, ...] | None = None  # the GPUs the GPU figures cover (None: every GPU)
    gpu_attribution: str = ""  # how they were chosen, for people
    throttled_pct: float | None = None  # % of the server's GPU readings slowed by a throttle reason
    throttle_reasons: tuple[str, ...] = ()  # which (power cap, thermal, HW slowdown ...)


@dataclass(frozen=True)
class TokenCheck:
    client_output_tokens: int
    server_output_tokens: float | None
    mismatch: bool
    note: str


@dataclass(frozen=True)
class Disturbance:
    """Whether other work on the host shared the machine with the phase."""

    other_load_cores: float | None  # CPU of processes that are neither the server nor this client, in cores
    steal_pct: float | None  # CPU steal over the phase, % of all CPUs (None where the OS does not count it)
    disturbed: bool
    why: str  # one line for people ("" when undisturbed)


@dataclass(frozen=True)
class MeasuredPhase:
    load: PhaseResult
    evidence: Evidence
    bound: Bound
    tokens: TokenCheck
    window: PhaseWindow | None = None  # the steady window (its requests pool with later phases at this load)
    steady: SteadyStats | None = None
    disturbance: Disturbance | None = None

    def to_dict(self) -> dict[str, Any]:
        stats = dataclasses.asdict(self.load.stats)
        spec = dataclasses.asdict(self.load.spec)
        spec["mode"] = self.load.spec.mode.value
        return {
            "model": self.load.model,
            "spec": spec,
            "stats": stats,
            "cancelled": self.load.cancelled,
            "aborted": self.load.aborted,
            "failed_early": self.load.failed_early,
            "draws_over_context": self.load.draws_over_context,
            "started_at_s": self.load.started_at_s,
            "ended_at_s": self.load.ended_at_s,
            "evidence": dataclasses.asdict(self.evidence),
            "bound": {"kind": self.bound.kind.value, "reason": self.bound.reason},
            "tokens": dataclasses.asdict(self.tokens),
            "steady": dataclasses.asdict(self.steady) if self.steady else None,
            "window_s": [self.window.start_s, self.window.end_s] if self.window else None,
            "disturbance": dataclasses.asdict(self.disturbance) if self.disturbance else None,
        }


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _max(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def summarise_snapshots(
    snaps: Sequence[Snapshot], gpu_indices: Collection[int] | None = None, engine_url: str | None = None
) -> dict[str, Any]:
    """GPU, host and engine telemetry over a window: means per GPU averaged, power and energy summed over GPUs.

    ``gpu_indices`` keeps only those GPUs (the server's: NVML reports every GPU of the machine, and a
    one-GPU server on an 8-GPU box would otherwise read at an eighth of its bandwidth, with seven idle GPUs'
    power in its joules per token). None: every GPU. ``engine_url`` keeps only that server's /metrics (trials
    side by side are all scraped by one sampler). None: every server.
    """
    keep = (lambda g: True) if gpu_indices is None else (lambda g: g.index in gpu_indices)
    ticks = [(s.time_s, [g for g in s.gpus if keep(g)]) for s in snaps]
    ticks = [(t, gpus) for t, gpus in ticks if gpus]
    gpu_rows = [g for _, gpus in ticks for g in gpus if g.error is None]
    # DCGM samples at its own interval (dcgm-exporter: 30 s): a figure that may predate the window is another
    # load's (the previous level, the previous trial), so only those surely taken inside it count.
    start_s = snaps[0].time_s if snaps else 0.0
    profiled = [g for g in gpu_rows if g.profiling_source != "dcgm" or _taken_since(g, start_s)]
    per_tick_power = [sum(g.power_w for g in gpus if g.power_w is not None) for _, gpus in ticks]
    mine = (lambda e: True) if engine_url is None else (lambda e: e.url.rstrip("/") == engine_url.rstrip("/"))
    engines = [e for s in snaps for e in s.engines if e.error is None and mine(e)]
    vram = [g.vram_used_bytes for g in gpu_rows if g.vram_used_bytes is not None]
    window_s = snaps[-1].time_s - snaps[0].time_s if len(snaps) >= 2 else 0.0
    with_reasons = [g for g in gpu_rows if g.clock_event_reasons is not None]
    throttled = [g for g in with_reasons if g.throttled]
    reasons = sorted(
        {r for g in throttled for r in g.clock_event_reasons or () if r not in BENIGN_CLOCK_EVENTS}
    )
    return {
        # Readings of the server's GPUs that were slowed (power cap, thermal, HW slowdown ...), and by what: trials
        # side by side share the node's power and cooling.
        "throttled_pct": 100.0 * len(throttled) / len(with_reasons) if with_reasons else None,
        "throttle_reasons": tuple(reasons),
        "gpu_samples": len(gpu_rows),
        "dram_bw_util_pct_mean": _mean([g.dram_bw_util_pct for g in profiled]),
        "dram_bw_source": _sources(profiled),
        "dram_bw_est_pct_mean": _mean([g.dram_bw_est_pct for g in gpu_rows if g.dram_bw_util_pct is None]),
        "sm_active_pct_mean": _mean([g.sm_active_pct for g in profiled]),
        "tensor_active_pct_mean": _mean([g.tensor_active_pct for g in profiled]),
        "gpu_util_pct_mean": _mean([g.gpu_util_pct for g in gpu_rows]),
        "mem_busy_pct_mean": _mean([g.mem_busy_pct for g in gpu_rows]),
        "power_w_mean": _mean(per_tick_power) if per_tick_power else None,
        "energy_j": _energy_j(ticks, window_s),
        "vram_used_bytes_max": max(vram) if vram else None,
        "host_cpu_pct_mean": _mean([s.host.cpu_pct for s in snaps if s.host is not None]),
        "engine_samples": len(engines),
        "requests_running_mean": _mean([e.requests_running for e in engines]),
        "requests_waiting_max": _max([e.requests_waiting for e in engines]),
        "requests_waiting_mean": _mean([e.requests_waiting for e in engines]),
        "kv_cache_usage_pct_max": _max([e.kv_cache_usage_pct for e in engines]),
    }


def _taken_since(g: GpuSample, start_s: float) -> bool:
    """Whether DCGM surely sampled ``g``'s figures at or after ``start_s`` (their age is an upper bound)."""
    return g.profiling_age_s is not None and g.time_s - g.profiling_age_s >= start_s


def _sources(rows: Sequence[GpuSample]) -> str | None:
    """What measured the DRAM figures of ``rows``: 'GPM', 'DCGM', or both joined (GPM before DCGM)."""
    found = {g.profiling_source for g in rows if g.dram_bw_util_pct is not None}
    names = [name for key, name in (("gpm", "GPM"), ("dcgm", "DCGM")) if key in found]
    if None in found:
        names = names or ["GPM"]  # readings recorded before the source was: only GPM measured then
    return " and ".join(names) or None


def _energy_j(ticks: Sequence[tuple[float, Sequence[GpuSample]]], window_s: float) -> float | None:
    """Energy of the window, GPU by GPU: from the driver's energy counter where it was read at least twice
    inside the window (its rate over the window's length), else power integrated over the ticks (power is a
    one-second average on recent GPUs: the counter is the better witness)."""
    if len(ticks) < 2 or window_s <= 0:
        return None
    total, known = 0.0, False
    for index in sorted({g.index for _, gpus in ticks for g in gpus}):
        readings: list[tuple[float, float]] = []  # (time first seen, counter J): a new value is a new read
        powers: list[tuple[float, float]] = []
        for t, gpus in ticks:
            g = next((g for g in gpus if g.index == index), None)
            if g is None:
                continue
            if g.energy_counter_j is not None and (not readings or g.energy_counter_j != readings[-1][1]):
                readings.append((t, g.energy_counter_j))
            if g.power_w is not None:
                powers.append((t, g.power_w))
        if len(readings) >= 2 and readings[-1][0] > readings[0][0] and readings[-1][1] >= readings[0][1]:
            rate_w = (readings[-1][1] - readings[0][1]) / (readings[-1][0] - readings[0][0])
            total, known = total + rate_w * window_s, True
        elif len(powers) >= 2:
            total += sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(powers))
            known = True
    return total if known else None


def server_gpus(snaps: Sequence[Snapshot], pids: Collection[int]) -> set[int]:
    """Indices of the GPUs whose process lists hold one of ``pids`` (the server's processes) in the window."""
    wanted = set(pids)
    return {g.index for s in snaps for g in s.gpus for p in (g.processes or ()) if p.pid in wanted}


def visible_devices(pids: Collection[int], gpus: Sequence[GpuInfo]) -> set[int] | None:
    """The GPUs named by the server's ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), None when it is unset or
    unreadable. For servers in another PID namespace, whose pids NVML's process lists do not show."""
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        value = next(
            (e[len(b"CUDA_VISIBLE_DEVICES=") :] for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")),
            None,
        )
        if value is None:
            continue
        found: set[int] = set()
        for item in value.decode(errors="replace").split(","):
            item = item.strip()
            if item.isdigit():
                found.add(int(item))
            elif item.startswith("GPU-"):
                found.update(g.index for g in gpus if g.uuid.startswith(item))
        return found or None
    return None


def classify_bound(evidence: Evidence, concurrency: int | None) -> Bound:
    """Say what limited the phase, from the evidence alone. Thresholds are deliberately coarse."""
    e = evidence
    if (e.preemptions or 0) > 0:
        return Bound(BoundKind.KV_CACHE_QUEUEING, f"{e.preemptions:.0f} preemptions: the KV cache ran out")
    if (e.requests_waiting_mean or 0) >= 0.5 or (e.kv_cache_usage_pct_max or 0) >= 95:
        return Bound(
            BoundKind.KV_CACHE_QUEUEING,
            f"requests waited in the server queue (mean {e.requests_waiting_mean or 0:.1f}, "
            f"max {e.requests_waiting_max or 0:.0f}); KV cache peaked at {e.kv_cache_usage_pct_max or 0:.0f} %",
        )
    if e.client_cpu_pct is not None and e.client_cpu_pct >= 85:
        return Bound(
            BoundKind.CLIENT,
            f"the load generator used {e.client_cpu_pct:.0f} % of a core: its numbers understate the server",
        )
    dram, sm = e.dram_bw_util_pct_mean, e.sm_active_pct_mean
    if dram is not None and dram >= MEMORY_BOUND_PCT:
        return Bound(
            BoundKind.GPU_MEMORY_BANDWIDTH,
            f"DRAM bandwidth {dram:.0f} % of peak ({e.dram_bw_source or 'GPM'})",
        )
    est = e.dram_bw_est_pct_mean if dram is None else None
    if est is not None and est >= ESTIMATE_MEMORY_BOUND_PCT:
        return Bound(
            BoundKind.GPU_MEMORY_BANDWIDTH,
            f"DRAM bandwidth ~{est:.0f} % of peak, ESTIMATED from the model's decode reads (no counter measured "
            "it on this GPU)",
        )
    if sm is not None and (sm >= 70 or (e.tensor_active_pct_mean or 0) >= 50):
        return Bound(
            BoundKind.GPU_COMPUTE, f"SM active {sm:.0f} %, tensor {e.tensor_active_pct_mean or 0:.0f} %"
        )
    if dram is not None and sm is not None and dram < 30 and sm < 40:
        running = e.requests_running_mean
        server = f"; vLLM server {e.server_cpu_pct:.0f} % of a core" if e.server_cpu_pct is not None else ""
        starved = (
            f", only {running:.0f} of {concurrency} streams running in the engine"
            if running and concurrency and running < 0.8 * concurrency
            else ""
        )
        return Bound(
            BoundKind.FRONT_END_OR_CLIENT,
            f"GPU mostly idle (DRAM {dram:.0f} %, SM {sm:.0f} %){starved}{server}: the API front end or the client "
            "set the pace, not the GPU",
        )
    if e.gpu_samples == 0:
        if e.server_cpu_pct is not None:
            return Bound(
                BoundKind.ENGINE, f"no GPU telemetry; the vLLM server used {e.server_cpu_pct:.0f} % of a core"
            )
        return Bound(BoundKind.UNKNOWN, "no GPU telemetry and no server process to watch")
    return Bound(BoundKind.UNKNOWN, f"nothing saturated ({_seen(e)}): more concurrency would likely help")


def _seen(e: Evidence) -> str:
    """The GPU figures a phase had, each named for what it is: 'DRAM 41 % (DCGM), SM 35 %' or, without a
    counter, 'DRAM ~30 % est., GPU util 80 % (duty cycle)'."""
    parts = []
    if e.dram_bw_util_pct_mean is not None:
        parts.append(f"DRAM {e.dram_bw_util_pct_mean:.0f} % ({e.dram_bw_source or 'GPM'})")
    elif e.dram_bw_est_pct_mean is not None:
        parts.append(f"DRAM ~{e.dram_bw_est_pct_mean:.0f} % est.")
    if e.sm_active_pct_mean is not None:
        parts.append(f"SM {e.sm_active_pct_mean:.0f} %")
    if e.dram_bw_util_pct_mean is None and e.gpu_util_pct_mean is not None:
        parts.append(f"GPU util {e.gpu_util_pct_mean:.0f} % (duty cycle)")
    return ", ".join(parts) or "no DRAM or SM figures on this GPU"


def check_tokens(client_tokens: int, server_tokens: float | None) -> TokenCheck:
    if server_tokens is None:
        return TokenCheck(client_tokens, None, False, "server counter not available")
    diff = abs(server_tokens - client_tokens)
    mismatch = diff > max(1.0, TOKEN_MISMATCH_TOLERANCE * max(client_tokens, 1))
    note = f"client counted {client_tokens:,} output tokens, server {server_tokens:,.0f}" + (
        " — MISMATCH: another client is using this server, or the stream lost tokens"
        if mismatch
        else " (match)"
    )
    return TokenCheck(client_tokens, server_tokens, mismatch, note)


class _ProcessCpu:
    """CPU time of a set of processes over a window, as % of one core."""

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self._pids = pids
        self._start: dict[int, float] = {}
        self._t0 = 0.0

    def _times(self) -> dict[int, float]:
        out = {}
        for pid in self._pids():
            try:
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
            except psutil.Error:
                continue
        return out

    def start(self) -> None:
        self._start, self._t0 = self._times(), time.monotonic()

    def stop_pct(self) -> float | None:
        end, wall = self._times(), time.monotonic() - self._t0
        common = set(end) & set(self._start)
        if not common or wall <= 0:
            return None
        return 100.0 * sum(end[p] - self._start[p] for p in common) / wall


class _HostCpu:
    """Busy and steal CPU time of the whole host over a window, in core-seconds."""

    def __init__(self) -> None:
        self._start = self._sample()
        self._t0 = time.monotonic()

    @staticmethod
    def _sample() -> tuple[float, float | None]:
        t = psutil.cpu_times()
        steal = getattr(t, "steal", None)
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - (steal or 0.0) - getattr(t, "guest", 0.0)
        return busy - getattr(t, "guest_nice", 0.0), steal

    def start(self) -> None:
        self._start, self._t0 = self._sample(), time.monotonic()

    def stop(self) -> tuple[float, float, float | None]:
        """(wall s, busy core-seconds, steal core-seconds or None)."""
        end = self._sample()
        steal = None if end[1] is None or self._start[1] is None else end[1] - self._start[1]
        return time.monotonic() - self._t0, end[0] - self._start[0], steal


def disturbance(
    wall_s: float,
    busy_core_s: float,
    steal_core_s: float | None,
    client_pct: float | None,
    server_pct: float | None,
    cpus: int,
    *,
    client_late_p99_s: float | None = None,
) -> Disturbance:
    """Whether the host did other work during a phase, from the CPU it used beyond the client and server, and
    whether the client kept its own arrival schedule (open loop)."""
    why = []
    other: float | None = None
    steal_pct: float | None = None
    if wall_s > 0:
        ours = ((client_pct or 0.0) + (server_pct or 0.0)) / 100.0
        other = round(max(0.0, busy_core_s / wall_s - ours), 3)
        steal_pct = None if steal_core_s is None else 100.0 * steal_core_s / (wall_s * max(1, cpus))
        if other > OTHER_LOAD_MAX_CORES:
            why.append(f"other processes used {other:.2f} cores")
        if steal_pct is not None and steal_pct > STEAL_MAX_PCT:
            why.append(f"CPU steal {steal_pct:.0f} %")
    if client_late_p99_s is not None and client_late_p99_s > CLIENT_LATE_MAX_S:
        why.append(
            f"the client started 1 % of its arrivals over {client_late_p99_s * 1000:.0f} ms late (its own CPU "
            "was busy): the load offered was lower and burstier than asked"
        )
    return Disturbance(other, steal_pct, bool(why), "; ".join(why))


def group_pids(root_pid: int) -> list[int]:
    """A process and all its descendants (vLLM's API server, engine core and workers)."""
    try:
        root = psutil.Process(root_pid)
        return [root_pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return []


def _scrape(client: httpx.Client, url: str) -> MetricsText | None:
    try:
        return fetch_metrics(client, url)
    except httpx.HTTPError:
        return None


def _counter(page: MetricsText | None, name: str) -> float | None:
    return None if page is None else page.values.get(name)


def _delta(after: MetricsText | None, before: MetricsText | None, name: str) -> float | None:
    a, b = _counter(after, name), _counter(before, name)
    return None if a is None or b is None else a - b


async def measure_phase(
    base_url: str,
    spec: LoadSpec,
    *,
    sampler: Sampler | None = None,
    server_pid: int | None = None,
    model: str | None = None,
    ttft_max_s: float | None = None,
    tpot_max_s: float | None = None,
    on_progress: Callable[[PhaseProgress], None] | None = None,
    cancel: CancelToken | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    fail_fast: FailFast | None = None,
    workers: int = 1,
    client_cpus: Collection[int] | None = None,
    timeouts: Timeouts | None = None,
) -> MeasuredPhase:
    """Warm up, then run ``spec`` while recording telemetry; return the phase with its evidence and bound, its
    steady window's figures with their intervals (:mod:`tuner.loadgen.steady`) and whether other work on the
    host disturbed it.

    ``sampler`` is a started :class:`Sampler` (GPU, host and this server's /metrics); its snapshots inside the
    measured window are the evidence. ``server_pid`` lets the server's CPU use be measured. ``workers`` > 1
    runs the load from that many processes (pinned to ``client_cpus`` when given), merged into one phase
    (:func:`tuner.loadgen.workers.run_phase_workers`); 1 runs it in this process. Each request's deadline comes
    from ``ttft_max_s`` and ``tpot_max_s`` (:meth:`~tuner.loadgen.spec.Timeouts.deadline_s`), or from
    ``timeouts.total_s`` when given.
    """
    base_url = base_url.rstrip("/")
    if spec.warmup_requests > 0:
        # Its own prompts (another seed): warm-up prompts equal to the measured ones would be answered from the
        # prefix cache in the measured window.
        warm = dataclasses.replace(
            spec, num_requests=spec.warmup_requests, warmup_requests=0, duration_s=None, seed=spec.seed + 7919
        )
        warm_result = await run_phase_workers(
            base_url, warm, workers, cpus=client_cpus, model=model, on_progress=on_progress, cancel=cancel,
            ttft_max_s=ttft_max_s, tpot_max_s=tpot_max_s, timeouts=timeouts,  # the deadlines derive from them
        )  # fmt: skip
        model = warm_result.model
    spec = dataclasses.replace(spec, warmup_requests=0)

    window: list[Snapshot] = []
    lock = threading.Lock()

    def collect(snap: Snapshot) -> None:
        with lock:
            window.append(snap)

    client_cpu = _ProcessCpu(lambda: [psutil.Process().pid])
    server_cpu = _ProcessCpu(lambda: group_pids(server_pid) if server_pid else [])
    host_cpu = _HostCpu()
    with httpx.Client(timeout=5.0) as http:
        before = await asyncio.to_thread(_scrape, http, base_url)
        if sampler is not None:
            sampler.add_listener(collect)
        client_cpu.start()
        server_cpu.start()
        host_cpu.start()
        try:
            result = await run_phase_workers(
                base_url,
                spec,
                workers,
                cpus=client_cpus,
                model=model,
                ttft_max_s=ttft_max_s,
                tpot_max_s=tpot_max_s,
                on_progress=on_progress,
                cancel=cancel,
                fail_fast=fail_fast,
                timeouts=timeouts,
            )
        finally:
            if sampler is not None:
                sampler.remove_listener(collect)
        client_pct, server_pct = client_cpu.stop_pct(), server_cpu.stop_pct()
        host = host_cpu.stop()
        if result.worker_cpu_s and host[0] > 0:  # the load generator's worker processes are the client too
            client_pct = (client_pct or 0.0) + 100.0 * result.worker_cpu_s / host[0]
        after = await _settled_scrape(http, base_url)

    with lock:
        inside = [s for s in window if result.started_at_s <= s.time_s <= result.ended_at_s]
    gpu_indices, attribution = _attribute_gpus(inside, server_pid, sampler)
    summary = summarise_snapshots(inside, gpu_indices, base_url)
    evidence = Evidence(
        **summary,
        client_cpu_pct=client_pct,
        server_cpu_pct=server_pct,
        preemptions=_delta(after, before, "vllm:num_preemptions_total"),
        server_generation_tokens=_delta(after, before, "vllm:generation_tokens_total"),
        server_prompt_tokens=_delta(after, before, "vllm:prompt_tokens_total"),
        prefix_cache_hits=_delta(after, before, "vllm:prefix_cache_hits_total"),
        prefix_cache_queries=_delta(after, before, "vllm:prefix_cache_queries_total"),
        gpu_indices=tuple(sorted(gpu_indices)) if gpu_indices is not None else None,
        gpu_attribution=attribution,
    )
    bound = classify_bound(evidence, spec.concurrency)
    tokens = check_tokens(result.stats.output_tokens_total, evidence.server_generation_tokens)
    steady_part = steady_window(result.requests)
    steady = steady_stats([steady_part], confidence=confidence, seed=spec.seed)
    # The other load is known only when the server's own CPU is (else the server would count as "other").
    cpus = psutil.cpu_count() or 1
    late = result.client_late_p99_s
    disturbed = (
        disturbance(*host, client_pct, server_pct, cpus, client_late_p99_s=late)
        if server_pid is not None
        else disturbance(0.0, 0.0, None, None, None, cpus, client_late_p99_s=late)
    )
    return MeasuredPhase(result, evidence, bound, tokens, steady_part, steady, disturbed)


def _attribute_gpus(
    snaps: Sequence[Snapshot], server_pid: int | None, sampler: Sampler | None
) -> tuple[set[int] | None, str]:
    """Which GPUs a phase's GPU figures should cover: the server's, found by its processes in NVML's lists,
    else by its CUDA_VISIBLE_DEVICES, else every GPU (and the phase says so)."""
    if not any(s.gpus for s in snaps):
        return None, ""
    if server_pid is None:
        return None, "every GPU: the server's processes are not known"
    pids = group_pids(server_pid)
    found = server_gpus(snaps, pids)
    if found:
        return found, "the GPUs holding the server's processes"
    visible = visible_devices(pids, sampler.info.gpus if sampler is not None else ())
    if visible:
        return visible, "the server's CUDA_VISIBLE_DEVICES"
    return None, "every GPU: no GPU lists the server's processes (another PID namespace?)"


async def _settled_scrape(http: httpx.Client, url: str, attempts: int = 6) -> MetricsText | None:
    """The server updates its counters a moment after the last response: scrape until they stop moving."""
    last: MetricsText | None = None
    for _ in range(attempts):
        page = await asyncio.to_thread(_scrape, http, url)
        if page is None:
            return last
        if last is not None and _counter(page, "vllm:generation_tokens_total") == _counter(
            last, "vllm:generation_tokens_total"
        ):
            return page
        last = page
        await asyncio.sleep(0.25)
    return last
