"""Phases that ran at the same time, as one: several worker processes loading one server, or one phase per
replica of a node behind one router.

Each :class:`~tuner.loadgen.runner.PhaseResult` times its requests from the opening of its own measured
window (``started_at_s``, epoch seconds). The merged phase puts them on one time axis, from the earliest
opening: a request's ``start_s`` moves by how much later its phase opened. Its statistics are computed afresh
over the union (percentiles of all the requests, not averages of percentiles; throughput over the union's
wall time, so that concurrent phases add up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from tuner.loadgen.runner import PhaseResult
from tuner.loadgen.spec import LoadSpec
from tuner.loadgen.stats import compute_stats


def merge_phase_results(results: Sequence[PhaseResult]) -> PhaseResult:
    """One phase from phases that ran **at the same time** (their windows overlap).

    Requests are re-based onto the earliest window's opening and re-indexed in the order they started;
    statistics are recomputed with :func:`~tuner.loadgen.stats.compute_stats` over the union's wall time
    (earliest opening to the last request's end) and the SLOs of the first phase. Arrival lateness is
    concatenated (each phase's in its arrival order), stand-in answers, worker CPU and draws over the context
    summed. ``cancelled`` when any was; ``aborted`` and ``failed_early``: the first reason given.
    ``base_url``: the URL, or the distinct URLs joined by ", " (replicas); ``model`` likewise. ``spec``: the
    first phase's, with the request counts, rates and users (or caps) summed, None where any phase had none.

    Raises:
        ValueError: no phases.
    """
    if not results:
        raise ValueError("merge_phase_results needs at least one phase")
    if len(results) == 1:
        return results[0]
    first = results[0]
    opened_s = min(r.started_at_s for r in results)
    rebased = [
        dataclasses.replace(q, start_s=q.start_s + (r.started_at_s - opened_s))
        for r in results
        for q in r.requests
    ]
    rebased.sort(key=lambda q: q.start_s)
    requests = tuple(dataclasses.replace(q, index=i) for i, q in enumerate(rebased))
    wall_s = max(r.started_at_s - opened_s + r.stats.wall_s for r in results)
    stats = compute_stats(
        requests, wall_s, ttft_max_s=first.stats.slo_ttft_max_s, tpot_max_s=first.stats.slo_tpot_max_s
    )
    return PhaseResult(
        base_url=_joined(r.base_url for r in results),
        model=_joined(r.model for r in results),
        spec=_summed_spec([r.spec for r in results]),
        stats=stats,
        requests=requests,
        started_at_s=opened_s,
        ended_at_s=max(r.ended_at_s for r in results),
        warmup_s=max(r.warmup_s for r in results),  # the warm-ups ran side by side too
        cancelled=any(r.cancelled for r in results),
        aborted=next((r.aborted for r in results if r.aborted), None),
        failed_early=next((r.failed_early for r in results if r.failed_early), None),
        stand_in_answers=sum(r.stand_in_answers for r in results),
        arrivals_late_s=tuple(late for r in results for late in r.arrivals_late_s),
        worker_cpu_s=sum(r.worker_cpu_s for r in results),
        draws_over_context=sum(r.draws_over_context for r in results),
    )


def _joined(names: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(names))


def _sum_or_none(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _summed_spec(specs: Sequence[LoadSpec]) -> LoadSpec:
    num = _sum_or_none([s.num_requests for s in specs])
    rate = _sum_or_none([s.request_rate_per_s for s in specs])
    users = _sum_or_none([s.concurrency for s in specs])
    return dataclasses.replace(
        specs[0],
        num_requests=None if num is None else int(num),
        request_rate_per_s=rate,
        concurrency=None if users is None else int(users),
        warmup_requests=sum(s.warmup_requests for s in specs),
    )
