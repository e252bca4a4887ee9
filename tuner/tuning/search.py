"""The search strategy across configurations: which config to launch next.

A launch is the expensive step (110-160 s for an 8B model on an H100), so the search starts from vLLM's
defaults and moves one dimension at a time (coordinate descent), choosing the move the evidence of the
incumbent's capacity search argues for (:mod:`tuner.tuning.capacity` measures each running server): a full KV
cache or preemptions ask for more KV capacity (FP8 KV cache, more memory), requests waiting with room in the
cache ask for a larger batch, a GPU bound by memory bandwidth asks for FP8 weights, a TTFT failure asks for a
larger prefill budget and a per-user speed failure for a smaller one. Moves the evidence argues against are
pruned, not launched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.tuning.capacity import Capacity
from tuner.tuning.points import USERS

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
    best_concurrency: int | None = None  # users at the best load (open loop: requests running on the server)
    prefix_hit_share: float | None = None  # prompt tokens vLLM's prefix cache served at the best load


def signals_from(capacity: Capacity | None, max_num_seqs: int | None) -> Signals:
    """Read the evidence of a trial's capacity search: its best point (or its last), and the first load that
    did not pass (which SLO limit broke there)."""
    if capacity is None or not capacity.points:
        return Signals()
    best = capacity.best or capacity.points[-1]
    failed = capacity.ceiling or next((p for p in capacity.points if not p.passed), None)
    ev = best.evidence
    bound = str(best.bound.get("kind", ""))
    kv = ev.get("kv_cache_usage_pct_max")
    running = ev.get("requests_running_mean")
    reasons = " ".join((*failed.reasons, *failed.uncertain)) if failed else ""
    users = None
    if capacity.best is not None:
        users = (
            capacity.best.load.users_count
            if capacity.best.load.kind == USERS
            else round(running or 0) or None
        )
    return Signals(
        kv_cache_full=(kv is not None and kv > 90) or (ev.get("preemptions") or 0) > 0,
        waiting=(ev.get("requests_waiting_mean") or 0) >= 0.5,
        batch_capped=bool(max_num_seqs and running and running >= 0.9 * max_num_seqs),
        memory_bound=bound == "gpu_memory_bandwidth",
        compute_bound=bound == "gpu_compute",
        front_end_bound=bound in ("front_end_or_client", "client"),
        ttft_failed="TTFT" in reasons or "queue building" in reasons or "falling behind" in reasons,
        tpot_failed="per-user" in reasons or "TPOT" in reasons,
        kv_cache_max_pct=kv,
        best_concurrency=users,
        prefix_hit_share=_share(ev.get("prefix_cache_hits"), ev.get("prefix_cache_queries")),
    )


def _share(hits: object, queries: object) -> float | None:
    if not isinstance(hits, (int, float)) or not isinstance(queries, (int, float)) or queries <= 0:
        return None
    return float(hits) / float(queries)


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


PREFIX_CACHE_IDLE_SHARE = 0.01
"""Below this share of prompt tokens served from vLLM's prefix cache, turning the cache off is worth a launch."""


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
    share = signals.prefix_hit_share
    if (
        False in ladders.get("enable_prefix_caching", ())
        and current.get("enable_prefix_caching") is not False
        and share is not None
        and share < PREFIX_CACHE_IDLE_SHARE
    ):
        moves.append(
            Move(
                {"enable_prefix_caching": False},
                0.25,
                f"the prefix cache served {share:.1%} of the prompt tokens: its bookkeeping buys nothing here",
            )
        )
    best: dict[str, Move] = {}
    for move in moves:  # one entry per target, at its highest priority
        key = repr(sorted(move.values.items()))
        if key not in best or move.priority > best[key].priority:
            best[key] = move
    return sorted(best.values(), key=lambda m: -m.priority)
