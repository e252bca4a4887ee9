"""The search strategy: concurrency bracketing on one server, and which config the evidence asks for next."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tuner.tuning.search import (
    ConcurrencyPlan,
    PointResult,
    Signals,
    best_point,
    find_max_concurrency,
    propose_moves,
    signals_from,
)


def server(
    capacity_tok_s: float, slo_max_users: int, per_user_tok_s: float = 100.0
) -> Callable[[int], PointResult]:
    """A model server: throughput grows with users until it saturates; the SLO holds up to slo_max_users."""

    def measure(c: int) -> PointResult:
        tok_s = min(capacity_tok_s, c * per_user_tok_s)
        return PointResult(c, c <= slo_max_users, tok_s)

    return measure


def test_doubling_then_bisection_finds_the_largest_passing_concurrency() -> None:
    seen: list[int] = []
    measure = server(capacity_tok_s=1e9, slo_max_users=45)

    def recording(c: int) -> PointResult:
        seen.append(c)
        return measure(c)

    points = find_max_concurrency(recording, ConcurrencyPlan(bisect_resolution=0.05))
    assert seen[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubles until 64 fails
    best = best_point(points)
    assert best is not None and 42 <= best.concurrency <= 45  # bisected to within 5 %
    assert len(points) <= 12


def test_doubling_stops_at_saturation_without_wasting_phases() -> None:
    # Saturates at 8 users (800 tok/s): 16 and 32 add nothing, so the search stops there.
    points = find_max_concurrency(server(800.0, slo_max_users=1000), ConcurrencyPlan())
    assert [p.concurrency for p in points] == [1, 2, 4, 8, 16, 32]
    assert best_point(points).concurrency == 8  # type: ignore[union-attr]  # same tok/s, fewer users


def test_one_noisy_flat_step_does_not_end_the_search() -> None:
    tok_s = {1: 100.0, 2: 200.0, 4: 199.0, 8: 800.0, 16: 1600.0, 32: 1610.0, 64: 1600.0}
    points = find_max_concurrency(
        lambda c: PointResult(c, True, tok_s[c]), ConcurrencyPlan(max_concurrency=64)
    )
    assert [p.concurrency for p in points] == [1, 2, 4, 8, 16, 32, 64]
    assert best_point(points).concurrency == 32  # type: ignore[union-attr]


def test_nothing_passes_means_no_best_point() -> None:
    points = find_max_concurrency(server(1e9, slo_max_users=0), ConcurrencyPlan())
    assert [p.concurrency for p in points] == [1]
    assert best_point(points) is None


def test_max_concurrency_caps_the_search() -> None:
    points = find_max_concurrency(server(1e9, slo_max_users=10_000), ConcurrencyPlan(max_concurrency=20))
    assert max(p.concurrency for p in points) == 20


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
    summary = {
        "evidence": {"kv_cache_usage_pct_max": kv, "preemptions": preempt},
        "bound": {"kind": "engine"},
    }
    points = [PointResult(8, True, 100.0, summary)]
    assert signals_from(points, max_num_seqs=256).kv_cache_full is full


def test_signals_read_which_slo_limit_failed() -> None:
    ok = PointResult(8, True, 100.0, {"evidence": {}, "bound": {}})
    bad = PointResult(
        16, False, 120.0, {"evidence": {}, "bound": {}, "slo_reasons": ["TTFT p95 0.82 s > 0.50 s"]}
    )
    s = signals_from([ok, bad], max_num_seqs=None)
    assert s.ttft_failed and not s.tpot_failed and s.best_concurrency == 8


def test_objective_users_prefers_more_users_over_more_throughput() -> None:
    from tuner.tuning.search import score

    points = [PointResult(8, True, 900.0), PointResult(16, True, 850.0), PointResult(32, False, 1000.0)]
    assert best_point(points).concurrency == 8  # type: ignore[union-attr]
    assert best_point(points, "users").concurrency == 16  # type: ignore[union-attr]
    assert score(PointResult(16, True, 850.0), "users") > score(PointResult(8, True, 900.0), "users")
    assert score(None) < score(PointResult(1, True, 1.0))
