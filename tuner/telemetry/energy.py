"""Energy per output token and tokens per second per watt, per inference server, over a recent window.

The GPUs' energy counters (joules since the driver loaded, read every few seconds) give their mean power; the
server's generated-tokens counter gives its token rate; their ratio is joules per token. The GPUs counted are
those holding one of the server's processes (its process tree, from discovery); when those are not known, all
GPUs, and the result says so. Headless: pure functions over snapshots, so the monitor, a report or a test can
use them alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from tuner.telemetry.model import Snapshot

DEFAULT_WINDOW_S = 60.0
MIN_TOKENS = 32  # fewer tokens than this and idle power divided by them says nothing about the server


@dataclass(frozen=True)
class EnginePower:
    """One server's energy figures over the window. The figures are None when ``unavailable`` says why."""

    url: str
    joules_per_token: float | None
    tokens_per_s_per_watt: float | None
    power_w: float | None  # mean power of the GPUs counted, summed
    tokens_per_s: float | None  # mean generation rate over the window
    gpu_indices: tuple[int, ...]  # the GPUs whose energy is counted
    attributed: bool  # True: the GPUs holding the server's processes; False: all GPUs (its processes unknown)
    window_s: float | None  # how many seconds of token readings the figures cover
    unavailable: str | None = None  # why there is no figure (no energy counter, too few tokens, ...)


def counter_rate(points: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """(increase, seconds) of a counter over time-ordered (time_s, value) readings, leaving out intervals where
    it went backwards (a restart: what happened there is unknown). None without two readings apart in time."""
    increase = span_s = 0.0
    for (t0, v0), (t1, v1) in pairwise(points):
        if t1 <= t0 or v1 < v0:
            continue
        increase += v1 - v0
        span_s += t1 - t0
    return (increase, span_s) if span_s > 0 else None


def _energy_readings(snapshots: Sequence[Snapshot], since_s: float) -> dict[int, list[tuple[float, float]]]:
    """Per GPU, each new energy counter value with the time it was read. The counter is read every few seconds
    and repeated in between, so a reading is the tick where the value changed; the first value seen is left
    out, its read time being unknown."""
    last: dict[int, float] = {}
    readings: dict[int, list[tuple[float, float]]] = {}
    for snap in snapshots:
        for gpu in snap.gpus:
            value = gpu.energy_counter_j
            if value is None:
                continue
            changed = gpu.index in last and value != last[gpu.index]
            last[gpu.index] = value
            if changed and gpu.time_s >= since_s:
                readings.setdefault(gpu.index, []).append((gpu.time_s, value))
    return readings


def _server_gpus(snapshots: Sequence[Snapshot], pids: Iterable[int] | None) -> tuple[int, ...]:
    if pids is None:
        return ()
    wanted = set(pids)
    return tuple(
        sorted(
            {
                process.gpu_index
                for snap in snapshots
                for gpu in snap.gpus
                for process in gpu.processes or ()
                if process.pid in wanted
            }
        )
    )


def engine_power(
    snapshots: Sequence[Snapshot], url: str, *, window_s: float = DEFAULT_WINDOW_S
) -> EnginePower:
    """Energy per generated token of the server at ``url`` over the last ``window_s`` seconds of ``snapshots``
    (time-ordered; earlier ones are read only to know the energy counters' previous values)."""
    if not snapshots:
        return EnginePower(url, None, None, None, None, (), False, None, "no readings yet")
    since_s = snapshots[-1].time_s - window_s
    recent = [s for s in snapshots if s.time_s >= since_s]
    tokens: dict[float, float] = {}  # scrape time -> counter (each scrape repeats over several ticks)
    pids: Iterable[int] | None = None
    for snap in recent:
        for engine in snap.engines:
            if engine.url != url or engine.error is not None:
                continue
            if engine.generation_tokens_total is not None:
                tokens[engine.time_s] = engine.generation_tokens_total
            if engine.server_pids is not None:
                pids = engine.server_pids
    gpus = _server_gpus(recent, pids)
    attributed = bool(gpus)
    if not attributed:
        gpus = tuple(sorted({g.index for s in recent for g in s.gpus}))
    others = {e.url for snap in recent for e in snap.engines if e.url != url and e.error is None}

    def unavailable(why: str, power_w: float | None = None, rate: float | None = None) -> EnginePower:
        return EnginePower(url, None, None, power_w, rate, gpus, attributed, None, why)

    if not gpus:
        return unavailable("no GPU readings")
    if not attributed and others:
        # Every GPU charged to each of several servers would count the machine's energy once per server.
        return unavailable(f"its GPUs are unknown and {len(others) + 1} servers run here: no fair share")
    without = sorted(
        {g.index for snap in recent for g in snap.gpus if g.index in gpus and g.energy_counter_j is None}
        - {g.index for snap in recent for g in snap.gpus if g.energy_counter_j is not None}
    )
    if without:
        return unavailable(f"GPU {without[0]} has no energy counter (NVML gives none on this GPU or driver)")
    energy = _energy_readings(snapshots, since_s)
    power_w = 0.0
    for index in gpus:
        used = counter_rate(energy.get(index, ()))
        if used is None:
            return unavailable(f"waiting for two energy counter readings of GPU {index}")
        power_w += used[0] / used[1]
    counted = counter_rate(sorted(tokens.items()))
    if counted is None:
        return unavailable("waiting for two readings of the generated-tokens counter", power_w)
    n_tokens, span_s = counted
    rate = n_tokens / span_s
    if n_tokens < MIN_TOKENS:
        return unavailable(f"{n_tokens:.0f} tokens generated in {span_s:.0f} s: too few", power_w, rate)
    if power_w <= 0:
        return unavailable("the energy counters did not move", power_w, rate)
    return EnginePower(url, power_w / rate, rate / power_w, power_w, rate, gpus, attributed, span_s)


class SnapshotWindow:
    """The snapshots of the last ``window_s`` seconds (and a little before: the energy counters' previous
    values), for :func:`engine_power`. Memory stays bounded by time."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, *, margin_s: float = 10.0) -> None:
        self.window_s = window_s
        self.margin_s = margin_s
        self._snapshots: deque[Snapshot] = deque()

    def add(self, snap: Snapshot) -> None:
        if self._snapshots and snap.time_s < self._snapshots[-1].time_s:
            self._snapshots.clear()  # a replay looped or the clock stepped back
        self._snapshots.append(snap)
        keep_from = snap.time_s - self.window_s - self.margin_s
        while self._snapshots and self._snapshots[0].time_s < keep_from:
            self._snapshots.popleft()

    def power(self, url: str) -> EnginePower:
        return engine_power(self._snapshots, url, window_s=self.window_s)

    def __len__(self) -> int:
        return len(self._snapshots)
