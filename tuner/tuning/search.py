"""The search strategy: which concurrency to try next on a running server, and which config to launch next.

A launch is the expensive step (110-160 s for an 8B model on an H100), so:

* **Per config** (no relaunch) the concurrency that meets the SLO is found by doubling until the SLO fails or
  throughput stops growing, then bisecting between the last pass and the first failure.
* **Across configs** the search starts from vLLM's defaults and moves one dimension at a time (coordinate
  descent), choosing the move the evidence argues for: a full KV cache or preemptions ask for more KV capacity
  (FP8 KV cache, more memory), requests waiting with room in the cache ask for a larger batch, a GPU bound by
  memory bandwidth asks for FP8 weights, a TTFT failure asks for a larger prefill budget and a per-user speed
  failure for a smaller one. Moves the evidence argues against are pruned, not launched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# --- concurrency search on one running server ------------------------------------------------------------


@dataclass(frozen=True)
class PointResult:
    """One measured concurrency."""

    concurrency: int
    passed: bool
    output_tokens_per_s: float
    summary: dict[str, Any] = field(default_factory=dict)  # the phase as stored (stats, evidence, bound)


@dataclass(frozen=True)
class ConcurrencyPlan:
    start: int = 1
    max_concurrency: int = 1024
    saturation_gain: float = 0.03  # a doubling that adds less than 3 % throughput is flat
    patience: int = 2  # flat doublings in a row that mean saturation
    bisect_resolution: float = 0.15  # stop bisecting when the gap is below 15 % of the concurrency
    max_points: int = 12


def find_max_concurrency(measure: Callable[[int], PointResult], plan: ConcurrencyPlan) -> list[PointResult]:
    """Measure concurrencies until the largest one meeting the SLO is bracketed; return every point.

    Doubling stops at the first failure, at saturation or at ``max_concurrency``. Saturation = ``patience``
    doublings in a row that each fail to beat the best throughput so far by ``saturation_gain``: more users
    then only add latency. One flat step is not enough, since a short phase on a busy machine is noisy.
    Bisection then narrows the gap between the highest passing concurrency and the first failing one.
    """
    points: list[PointResult] = []
    c = max(1, plan.start)
    highest_pass: PointResult | None = None
    best_tok_s = 0.0
    flat_steps = 0
    first_fail: PointResult | None = None
    while len(points) < plan.max_points:
        point = measure(c)
        points.append(point)
        if not point.passed:
            first_fail = point
            break
        highest_pass = point
        if point.output_tokens_per_s >= best_tok_s * (1 + plan.saturation_gain):
            flat_steps = 0
        else:
            flat_steps += 1
        best_tok_s = max(best_tok_s, point.output_tokens_per_s)
        if flat_steps >= plan.patience or c >= plan.max_concurrency:
            return points
        c = min(c * 2, plan.max_concurrency)
    if highest_pass is None or first_fail is None:
        return points
    lo, hi = highest_pass.concurrency, first_fail.concurrency
    while len(points) < plan.max_points and hi - lo > max(1, math.ceil(plan.bisect_resolution * lo)):
        mid = (lo + hi) // 2
        point = measure(mid)
        points.append(point)
        if point.passed:
            lo = mid
        else:
            hi = mid
    return points


def best_point(points: Iterable[PointResult], objective: str = "throughput") -> PointResult | None:
    """The passing point with the most throughput (ties: fewer users, i.e. lower latency), or with
    ``objective="users"`` the most concurrent users (ties: more throughput)."""
    passing = [p for p in points if p.passed]
    if not passing:
        return None
    if objective == "users":
        return max(passing, key=lambda p: (p.concurrency, p.output_tokens_per_s))
    return max(passing, key=lambda p: (p.output_tokens_per_s, -p.concurrency))


def score(point: PointResult | None, objective: str = "throughput") -> tuple[float, float]:
    """How good a trial's best point is, for comparing configs (higher is better; no point is worst)."""
    if point is None:
        return (-1.0, -1.0)
    if objective == "users":
        return (float(point.concurrency), point.output_tokens_per_s)
    return (point.output_tokens_per_s, -float(point.concurrency))


# --- which config next ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signals:
    """What a finished trial's best (or last) phase says about the config. None: not observed."""

    kv_cache_full: bool = False  # KV cache > 90 % or preemptions
    waiting: bool = False  # requests waited in the server's queue
    batch_capped: bool = False  # running requests reached max-num-seqs
    memory_bound: bool = False  # GPU DRAM bandwidth the limit
    compute_bound: bool = False
    front_end_bound: bool = False
    ttft_failed: bool = False  # the first failing phase broke the TTFT limit
    tpot_failed: bool = False  # ... the per-user speed floor
    kv_cache_max_pct: float | None = None
    best_concurrency: int | None = None  # the most users that met the SLO


def signals_from(points: Sequence[PointResult], max_num_seqs: int | None) -> Signals:
    """Read the evidence of a trial's phases (the stored phase dicts from :mod:`tuner.measure`)."""
    if not points:
        return Signals()
    best = best_point(points) or points[0]
    failed = next((p for p in points if not p.passed), None)
    ev = best.summary.get("evidence", {}) if best.summary else {}
    bound = (best.summary.get("bound", {}) or {}).get("kind", "") if best.summary else ""
    kv = ev.get("kv_cache_usage_pct_max")
    running = ev.get("requests_running_mean")
    reasons = " ".join((failed.summary.get("slo_reasons") or []) if failed and failed.summary else [])
    return Signals(
        kv_cache_full=(kv is not None and kv > 90) or (ev.get("preemptions") or 0) > 0,
        waiting=(ev.get("requests_waiting_mean") or 0) >= 0.5,
        batch_capped=bool(max_num_seqs and running and running >= 0.9 * max_num_seqs),
        memory_bound=bound == "gpu_memory_bandwidth",
        compute_bound=bound == "gpu_compute",
        front_end_bound=bound in ("front_end_or_client", "client"),
        ttft_failed="TTFT" in reasons,
        tpot_failed="per-user" in reasons,
        kv_cache_max_pct=kv,
        best_concurrency=best.concurrency if best.passed else None,
    )


@dataclass(frozen=True)
class Move:
    """Change one dimension of the incumbent: ``values`` to apply, ``priority`` (higher first), ``why``."""

    values: dict[str, Any]
    priority: float
    why: str


Ladders = Mapping[str, Sequence[Any]]


def _step(ladder: Sequence[Any], current: Any, direction: int) -> Any | None:
    """The neighbour of ``current`` on its ladder (None past either end). A value not on the ladder starts
    from the nearest one in that direction."""
    values = list(ladder)
    if not values:
        return None
    if current in values:
        i = values.index(current) + direction
        return values[i] if 0 <= i < len(values) else None
    if current is None or not isinstance(current, (int, float)):
        return values[0] if direction > 0 else None
    above = [v for v in values if v is not None and v > current]
    below = [v for v in values if v is not None and v < current]
    if direction > 0:
        return min(above) if above else None
    return max(below) if below else None


def propose_moves(current: dict[str, Any], signals: Signals, ladders: Ladders) -> list[Move]:
    """The moves worth a launch from ``current`` (dashed-less field names as in space.Candidate), best first.

    A move the evidence argues against gets no entry at all: that is the pruning.
    """
    moves: list[Move] = []

    def add(name: str, direction: int, priority: float, why: str) -> None:
        nxt = _step(ladders.get(name, ()), current.get(name), direction)
        if nxt is not None and nxt != current.get(name):
            moves.append(Move({name: nxt}, priority, why))

    quant = ladders.get("quantization", ())
    if "fp8" in quant and current.get("quantization") != "fp8":
        p = 3.0 if signals.memory_bound else 2.0  # FP8 weights halve the bytes read per decoded token
        if signals.front_end_bound:
            p = 0.5
        moves.append(Move({"quantization": "fp8"}, p, "FP8 weights halve the bytes read per token"))
    kv = ladders.get("kv_cache_dtype", ())
    if "fp8" in kv and current.get("kv_cache_dtype") != "fp8":
        p = 2.5 if signals.kv_cache_full else (1.5 if signals.memory_bound else 0.8)
        moves.append(Move({"kv_cache_dtype": "fp8"}, p, "an FP8 KV cache doubles its capacity"))
    if signals.kv_cache_full:
        add("gpu_memory_utilization", +1, 2.0, "the KV cache filled up: give it more memory")
        add("max_num_seqs", -1, 1.0, "the KV cache filled up: fewer sequences at once avoids preemption")
    elif signals.batch_capped or signals.waiting:
        add("max_num_seqs", +1, 2.2, "requests queued while the batch was full: a larger batch")
    if signals.ttft_failed:
        add("max_num_batched_tokens", +1, 1.6, "TTFT broke the limit: a larger prefill budget per step")
    if signals.tpot_failed:
        add("max_num_batched_tokens", -1, 1.6, "per-user speed broke the floor: smaller prefill chunks")
    # Exploration, last: only the moves the evidence does not argue against.
    seqs = current.get("max_num_seqs")
    if signals.best_concurrency and isinstance(seqs, int) and signals.best_concurrency * 2 <= seqs:
        add(
            "max_num_seqs",
            -1,
            0.3,
            f"the SLO held {signals.best_concurrency} users, far below {seqs} sequences",
        )
    if not signals.tpot_failed:
        add("max_num_batched_tokens", +1, 0.2, "per-user speed had room: a larger prefill budget")
    best: dict[str, Move] = {}
    for move in moves:  # one entry per target, at its highest priority
        key = repr(sorted(move.values.items()))
        if key not in best or move.priority > best[key].priority:
            best[key] = move
    return sorted(best.values(), key=lambda m: -m.priority)
