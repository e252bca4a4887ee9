"""Load for a whole node: one load split across its replicas the way a router would, and their phases merged.

The node proof measures the exported layout as it will serve: every replica started, the node's load arriving
at once and spread over them. Under an open loop, requests arriving at random at ``rate`` and routed at random
to ``n`` replicas reach each one at random at ``rate / n`` (splitting a Poisson process gives Poisson processes),
so each replica's client sends its own Poisson stream of that rate. A closed loop's users are dealt out as evenly
as whole users go. The replicas' phases, run side by side, are merged into the node's phase: one time axis, every
request, the telemetry of every replica's GPUs.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from tuner.loadgen.merge import merge_phase_results
from tuner.loadgen.steady import steady_stats, steady_window
from tuner.measure import (
    OTHER_LOAD_MAX_CORES,
    STEAL_MAX_PCT,
    Bound,
    Disturbance,
    Evidence,
    MeasuredPhase,
    TokenCheck,
)
from tuner.tuning.points import Load

__all__ = ["merge_measured", "split_load"]


def split_load(load: Load, replicas: int) -> list[Load | None]:
    """Each replica's share of ``load`` (None: a replica a closed loop of fewer users than replicas leaves idle)."""
    if replicas <= 1:
        return [load]
    if load.open_loop:
        return [Load.rate(load.value / replicas) for _ in range(replicas)]
    users = load.users_count
    base, extra = divmod(users, replicas)
    return [
        Load.users(base + (1 if i < extra else 0)) if base or i < extra else None for i in range(replicas)
    ]


def merge_measured(phases: Sequence[MeasuredPhase], *, confidence: float, seed: int) -> MeasuredPhase:
    """The node's phase from its replicas' phases that ran at the same time."""
    if len(phases) == 1:
        return phases[0]
    merged = merge_phase_results([p.load for p in phases])
    window = steady_window(merged.requests)
    steady = steady_stats([window], confidence=confidence, seed=seed)
    return MeasuredPhase(
        load=merged,
        evidence=_merge_evidence([p.evidence for p in phases]),
        bound=_merge_bound([p.bound for p in phases]),
        tokens=_merge_tokens([p.tokens for p in phases]),
        window=window,
        steady=steady,
        disturbance=_merge_disturbance(phases),
    )


def _sum(values: Sequence[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _max(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _merge_evidence(items: Sequence[Evidence]) -> Evidence:
    """Sums where the node adds up (power, energy, tokens, requests in flight), means of percentages, maxima of
    peaks; the GPU figures cover every replica's GPUs."""
    indices = sorted({i for e in items for i in (e.gpu_indices or ())})
    vram = [e.vram_used_bytes_max for e in items if e.vram_used_bytes_max is not None]
    return Evidence(
        gpu_samples=sum(e.gpu_samples for e in items),
        dram_bw_util_pct_mean=_mean([e.dram_bw_util_pct_mean for e in items]),
        dram_bw_source=" and ".join(dict.fromkeys(e.dram_bw_source for e in items if e.dram_bw_source))
        or None,
        dram_bw_est_pct_mean=_mean([e.dram_bw_est_pct_mean for e in items]),
        sm_active_pct_mean=_mean([e.sm_active_pct_mean for e in items]),
        tensor_active_pct_mean=_mean([e.tensor_active_pct_mean for e in items]),
        gpu_util_pct_mean=_mean([e.gpu_util_pct_mean for e in items]),
        mem_busy_pct_mean=_mean([e.mem_busy_pct_mean for e in items]),
        power_w_mean=_sum([e.power_w_mean for e in items]),
        energy_j=_sum([e.energy_j for e in items]),
        vram_used_bytes_max=max(vram) if vram else None,
        host_cpu_pct_mean=_mean([e.host_cpu_pct_mean for e in items]),
        client_cpu_pct=_max([e.client_cpu_pct for e in items]),  # one client process measured them all
        server_cpu_pct=_sum([e.server_cpu_pct for e in items]),
        engine_samples=sum(e.engine_samples for e in items),
        requests_running_mean=_sum([e.requests_running_mean for e in items]),
        requests_waiting_max=_sum([e.requests_waiting_max for e in items]),
        requests_waiting_mean=_sum([e.requests_waiting_mean for e in items]),
        kv_cache_usage_pct_max=_max([e.kv_cache_usage_pct_max for e in items]),
        preemptions=_sum([e.preemptions for e in items]),
        server_generation_tokens=_sum([e.server_generation_tokens for e in items]),
        server_prompt_tokens=_sum([e.server_prompt_tokens for e in items]),
        prefix_cache_hits=_sum([e.prefix_cache_hits for e in items]),
        prefix_cache_queries=_sum([e.prefix_cache_queries for e in items]),
        gpu_indices=tuple(indices) if indices and all(e.gpu_indices for e in items) else None,
        gpu_attribution=f"the {len(items)} replicas' GPUs" if indices else "",
        throttled_pct=_max([e.throttled_pct for e in items]),
        throttle_reasons=tuple(sorted({r for e in items for r in e.throttle_reasons})),
    )


def _merge_bound(bounds: Sequence[Bound]) -> Bound:
    """The bound most replicas share, with the first such replica's numbers."""
    kind, count = collections.Counter(b.kind for b in bounds).most_common(1)[0]
    first = next(b for b in bounds if b.kind == kind)
    return Bound(kind, f"{count} of {len(bounds)} replicas: {first.reason}")


def _merge_tokens(checks: Sequence[TokenCheck]) -> TokenCheck:
    server = (
        _sum([c.server_output_tokens for c in checks])
        if all(c.server_output_tokens is not None for c in checks)
        else None
    )
    notes = [c.note for c in checks if c.mismatch and c.note]
    return TokenCheck(
        client_output_tokens=sum(c.client_output_tokens for c in checks),
        server_output_tokens=server,
        mismatch=any(c.mismatch for c in checks),
        note="; ".join(notes[:2]),
    )


def _merge_disturbance(phases: Sequence[MeasuredPhase]) -> Disturbance | None:
    """The node's disturbance: each replica's phase counted its sibling replicas' servers as other work on the
    host; they are the node under test, so their CPU is taken back out before judging."""
    servers = [(p.evidence.server_cpu_pct or 0.0) / 100.0 for p in phases]
    judged: list[Disturbance] = []
    for i, p in enumerate(phases):
        d = p.disturbance
        if d is None:
            continue
        siblings = sum(servers) - servers[i]
        other = None if d.other_load_cores is None else round(max(0.0, d.other_load_cores - siblings), 3)
        why = []
        if other is not None and other > OTHER_LOAD_MAX_CORES:
            why.append(f"other processes used {other:.2f} cores")
        if d.steal_pct is not None and d.steal_pct > STEAL_MAX_PCT:
            why.append(f"CPU steal {d.steal_pct:.0f} %")
        why += [part for part in d.why.split("; ") if part.startswith("the client started")]
        judged.append(Disturbance(other, d.steal_pct, bool(why), "; ".join(why)))
    if not judged:
        return None
    return next((d for d in judged if d.disturbed), judged[0])
