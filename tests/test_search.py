"""The search strategy: which config the evidence of the incumbent's capacity search asks for next."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tuner.tuning.capacity import summarise
from tuner.tuning.points import RATE, USERS, Load, Point, empty_steady
from tuner.tuning.search import Signals, propose_moves, signals_from


def _point(
    load: Load, decision: str, evidence: dict[str, Any] | None = None, reasons: tuple[str, ...] = ()
) -> Point:
    phase = {"evidence": evidence or {}, "bound": {"kind": "engine"}}
    steady = dataclasses.replace(empty_steady(), requests_per_s=1.0, output_tokens_per_s=100.0)
    return Point(load, "judged", decision, steady, reasons, phases=(phase,))


LADDERS = {
    "quantization": ("fp8",),
    "kv_cache_dtype": ("fp8",),
    "max_num_seqs": (64, 128, 256, 512),
    "max_num_batched_tokens": (2048, 8192, 16384),
    "gpu_memory_utilization": (0.90, 0.95),
}
DEFAULTS = {"max_num_seqs": 1024, "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.92}


def _first(moves: list) -> dict:  # type: ignore[type-arg]
    return moves[0].values


def test_memory_bound_asks_for_fp8_weights_first() -> None:
    moves = propose_moves(DEFAULTS, Signals(memory_bound=True, best_concurrency=128), LADDERS)
    assert _first(moves) == {"quantization": "fp8"}


def test_full_kv_cache_asks_for_capacity_before_anything_else_but_fp8_weights() -> None:
    moves = propose_moves({**DEFAULTS, "quantization": "fp8"}, Signals(kv_cache_full=True), LADDERS)
    assert _first(moves) == {"kv_cache_dtype": "fp8"}
    assert {"gpu_memory_utilization": 0.95} in [m.values for m in moves]


def test_waiting_with_a_capped_batch_asks_for_a_larger_batch() -> None:
    current = {"max_num_seqs": 128, "quantization": "fp8", "kv_cache_dtype": "fp8"}
    moves = propose_moves(current, Signals(batch_capped=True, waiting=True), LADDERS)
    assert _first(moves) == {"max_num_seqs": 256}


def test_ttft_and_tpot_failures_move_the_prefill_budget_in_opposite_directions() -> None:
    current = {"max_num_batched_tokens": 8192, "quantization": "fp8", "kv_cache_dtype": "fp8"}
    up = propose_moves(current, Signals(ttft_failed=True), LADDERS)
    down = propose_moves(current, Signals(tpot_failed=True), LADDERS)
    assert _first(up) == {"max_num_batched_tokens": 16384}
    assert _first(down) == {"max_num_batched_tokens": 2048}


def test_pruning_no_larger_batch_when_nothing_waited_and_the_batch_was_never_full() -> None:
    current = {"max_num_seqs": 256, "quantization": "fp8", "kv_cache_dtype": "fp8"}
    moves = propose_moves(current, Signals(best_concurrency=200), LADDERS)
    assert {"max_num_seqs": 512} not in [m.values for m in moves]
    assert {"max_num_seqs": 128} not in [m.values for m in moves]  # 200 users is not far below 256


@pytest.mark.parametrize(("kv", "preempt", "full"), [(95.0, 0, True), (40.0, 2, True), (40.0, 0, False)])
def test_signals_read_kv_cache_and_preemptions(kv: float, preempt: int, full: bool) -> None:
    point = _point(Load.users(8), "pass", {"kv_cache_usage_pct_max": kv, "preemptions": preempt})
    assert signals_from(summarise(USERS, [point]), max_num_seqs=256).kv_cache_full is full


def test_signals_read_which_slo_limit_failed_at_the_capacity_ceiling() -> None:
    ok = _point(Load.users(8), "pass")
    bad = _point(Load.users(16), "fail", reasons=("TTFT p95 0.82 s > 0.50 s",))
    s = signals_from(summarise(USERS, [ok, bad]), max_num_seqs=None)
    assert s.ttft_failed and not s.tpot_failed and s.best_concurrency == 8


def test_signals_of_an_open_loop_read_a_growing_queue_as_a_ttft_failure() -> None:
    ok = _point(Load.rate(2.0), "pass", {"requests_running_mean": 6.2})
    bad = _point(
        Load.rate(2.5), "fail", reasons=("queue building: median TTFT rose 0.40 s across the window",)
    )
    s = signals_from(summarise(RATE, [ok, bad]), max_num_seqs=None)
    assert s.ttft_failed and s.best_concurrency == 6  # users in flight at the best rate: the server's batch
    assert signals_from(None, max_num_seqs=None) == Signals()


def test_a_prefix_cache_that_served_nothing_is_turned_off_after_the_evidence_and_a_busy_one_is_kept() -> None:
    ladders = {**LADDERS, "enable_prefix_caching": (False,)}
    current = {**DEFAULTS, "quantization": "fp8", "kv_cache_dtype": "fp8", "enable_prefix_caching": True}
    idle = propose_moves(current, Signals(prefix_hit_share=0.002, ttft_failed=True), ladders)
    off = next(m for m in idle if m.values == {"enable_prefix_caching": False})
    assert "0.2%" in off.why and idle[0].values == {"max_num_batched_tokens": 16384}  # the evidence first
    busy = propose_moves(current, Signals(prefix_hit_share=0.6), ladders)
    unknown = propose_moves(current, Signals(), ladders)
    assert all("enable_prefix_caching" not in m.values for m in (*busy, *unknown))
    off_already = propose_moves(
        {**current, "enable_prefix_caching": False}, Signals(prefix_hit_share=0.0), ladders
    )
    assert all("enable_prefix_caching" not in m.values for m in off_already)
    assert all(
        "enable_prefix_caching" not in m.values
        for m in propose_moves(current, Signals(prefix_hit_share=0.0), LADDERS)
    )


def test_the_hit_share_is_read_from_the_servers_counters_at_the_best_load() -> None:
    evidence = {"prefix_cache_hits": 30.0, "prefix_cache_queries": 1200.0}
    capacity = summarise(RATE, [_point(Load(RATE, 4.0), "pass", evidence)])
    assert signals_from(capacity, 128).prefix_hit_share == pytest.approx(0.025)
    none = summarise(RATE, [_point(Load(RATE, 4.0), "pass", {"prefix_cache_queries": 0.0})])
    assert signals_from(none, 128).prefix_hit_share is None
