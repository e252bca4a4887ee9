"""A model ESTIMATE of an inference server's DRAM traffic, for GPUs whose bandwidth no counter measures.

GPM (Hopper and newer) and DCGM's profiling module measure DRAM bandwidth; an L4 or A100 without DCGM has only
the memory duty cycle, which is not bandwidth. There, while a vLLM server decodes, the bytes each decode step
must read on each of its GPUs (:class:`~tuner.telemetry.modelfacts.ModelFacts`) are multiplied by the server's
own step rate (``vllm:iteration_tokens_total``'s count rate, per data-parallel engine):

    per step and GPU = weights / (TP x PP)  +  KV cache in use / (min(TP, KV heads) x PP) / PP

(with pipeline parallelism a step carries 1/PP of the running sequences). It counts the reads a decode step
must make, not activations, KV writes, prefill or the sampler, so it reads below a counter: BENCHMARKS.md has
its error against GPM on an H100. It is shown as an estimate and never mixed with measured values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from tuner.telemetry.foreign import BadValue, checked_number, printable
from tuner.telemetry.model import EngineSample, GpuInfo, GpuSample
from tuner.telemetry.modelfacts import ModelFacts, facts_for
from tuner.telemetry.vllmargs import facts_from_argv

__all__ = ["DecodeEstimate", "ModelFacts", "apply_estimates", "estimate", "facts_for", "facts_from_argv"]


@dataclass(frozen=True)
class DecodeEstimate:
    """The DRAM traffic one GPU of a server must carry while it decodes (an estimate)."""

    bytes_per_s_per_gpu: float
    weight_bytes_per_gpu: float  # per step
    kv_bytes_per_gpu: float  # per step
    steps_per_s: float  # per engine
    basis: str  # one line: "8.0 GB weights + 2.7 GB KV per step x 120 steps/s (est.)"


# --- the estimate --------------------------------------------------------------------------------------------


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def estimate(facts: ModelFacts, engine: EngineSample) -> DecodeEstimate | str:
    """The DRAM traffic of one GPU of the server ``engine`` reads, or why it cannot be worked out. An idle
    server (no steps) carries no decode traffic: a zero estimate, not an error."""
    if engine.error:
        return "the server's /metrics was not read"
    steps, how = engine.steps_per_s, ""
    if steps is None or facts.api_servers > 1:
        tokens, running = engine.generation_tokens_per_s, engine.requests_running
        if tokens is None or running is None:
            return "no step rate on the server's /metrics"
        # Tokens per running request: one per step, per engine already (both sums cover all engines).
        steps = tokens / running if running > 0 and tokens > 0 else 0.0
        how = " (steps/s from tok/s / running requests)"
    else:
        steps /= facts.data_parallel  # the page sums the engines' steps
    tp, pp = facts.tensor_parallel, facts.pipeline_parallel
    weights = facts.weight_bytes_per_step / (tp * pp)
    usage = engine.kv_cache_usage_pct
    kv = 0.0
    if steps > 0 and usage is None:
        return "no KV cache usage on the server's /metrics"
    if steps > 0 and usage:
        per_token = facts.kv_bytes_per_token_as(engine.kv_cache_dtype)
        if per_token is None:
            return f"KV cache dtype {engine.kv_cache_dtype} is not estimated"
        if engine.kv_cache_blocks is None or engine.kv_block_size_tokens is None:
            return "no KV cache size on the server's /metrics (vllm:cache_config_info)"
        tokens_in_use = min(usage, 100.0) / 100.0 * engine.kv_cache_blocks * engine.kv_block_size_tokens
        # Each rank holds its KV heads' share (all of one head when heads < TP) of its stage's layers, and
        # with pipeline parallelism a step carries 1/PP of the running sequences.
        # vLLM sums the KV blocks of its data-parallel engines (core_client.py), each engine on its own GPUs.
        kv = tokens_in_use * per_token / (min(tp, facts.kv_heads) * pp) / pp / facts.data_parallel
    per_engine = " per engine" if facts.data_parallel > 1 else ""
    if steps > 0:
        basis = f"{_size(weights)} weights + {_size(kv)} KV per step x {steps:.0f} steps/s{per_engine}{how} (est.)"
    else:
        basis = "no decode steps: idle (est.)"
    return DecodeEstimate((weights + kv) * steps, weights, kv, steps, basis)


def apply_estimates(
    gpus: tuple[GpuSample, ...],
    infos: Sequence[GpuInfo],
    engines: Sequence[EngineSample],
    facts: Mapping[str, ModelFacts | str],
    gpus_of_pid: Mapping[int, frozenset[int]],
) -> tuple[GpuSample, ...]:
    """``gpus`` with the decode-traffic estimate set where no counter measured the bandwidth.

    ``facts`` holds each server's :class:`ModelFacts` (or why there are none) by URL; a server's GPUs are those
    holding one of its ``server_pids`` (``gpus_of_pid``, from the GPUs' process lists). Two servers on one GPU
    add up; if one of them cannot be estimated the GPU gets no figure, only the reason (a part would read as
    the whole). GPUs with a measured value, a read error, or no known server are returned unchanged.
    """
    parts: dict[int, list[_Part]] = {}
    for engine in engines:
        found = facts.get(engine.url)
        if found is None or engine.error or not engine.server_pids:
            continue
        held = frozenset().union(*(gpus_of_pid.get(pid, frozenset()) for pid in engine.server_pids))
        if held:
            part = _part(found, engine, len(held))
            for index in held:
                parts.setdefault(index, []).append(part)
    peaks = {info.index: info.peak_dram_bw_gbps for info in infos}
    out = []
    for gpu in gpus:
        mine = parts.get(gpu.index)
        if not mine or gpu.error or gpu.dram_bw_util_pct is not None:
            out.append(gpu)
            continue
        out.append(_with_estimate(gpu, mine, peaks.get(gpu.index)))
    return tuple(out)


@dataclass(frozen=True)
class _Part:
    """One server's share of a GPU's estimate: bytes/s, or None with the reason in ``text``."""

    bytes_per_s: float | None
    name: str
    text: str


def _part(found: ModelFacts | str, engine: EngineSample, gpus_held: int) -> _Part:
    if isinstance(found, str):
        return _Part(None, engine.model_name or engine.url, found)
    result = estimate(found, engine)
    if isinstance(result, str):
        return _Part(None, found.model, result)
    text = result.basis
    expected = found.tensor_parallel * found.pipeline_parallel * found.data_parallel
    if gpus_held != expected:  # the flags were not all read, or the server shares its GPUs oddly
        text += f" [{gpus_held} GPUs seen, TP x PP x DP = {expected}]"
    return _Part(result.bytes_per_s_per_gpu, found.model, text)


def _with_estimate(gpu: GpuSample, parts: list[_Part], peak: float | None) -> GpuSample:
    several = len(parts) > 1
    if any(p.bytes_per_s is None for p in parts):
        reasons = "; ".join(
            f"{p.name}: {p.text}" if several else p.text for p in parts if p.bytes_per_s is None
        )
        return replace(gpu, dram_bw_est_basis=printable(f"no estimate: {reasons}", 512))
    gbps = sum(p.bytes_per_s or 0.0 for p in parts) / 1e9
    basis = " + ".join(f"{p.name}: {p.text}" for p in parts) if several else parts[0].text
    pct = 100.0 * gbps / peak if peak else None
    try:  # over 200 % of peak, the model is wrong, not the GPU
        gbps = checked_number(gbps, "dram_bw_est_gbps")
        pct = None if pct is None else checked_number(pct, "dram_bw_est_pct")
    except BadValue:
        return replace(gpu, dram_bw_est_basis=f"no estimate: not believable ({gbps:.4g} GB/s)")
    return replace(gpu, dram_bw_est_gbps=gbps, dram_bw_est_pct=pct, dram_bw_est_basis=printable(basis, 512))
