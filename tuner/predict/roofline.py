"""The memory-bandwidth ceiling of decoding, for any GPU, with or without a performance model.

Each decode step reads every weight once (per tensor-parallel rank, its share) and every running request's KV
cache, so at ``n`` requests in flight no server decodes faster than

    n x peak DRAM bandwidth / (weight bytes per rank + n x context tokens x KV bytes per token per rank)

output tokens/s, context being the prompt plus half the output on average. REFERENCE.md: batch-1 bf16 8B on an
H100 reached 152 tok/s against this ceiling's ~208. A ceiling, not a prediction: no TTFT, no compute limit.
"""

from __future__ import annotations

from tuner.predict.base import Workload
from tuner.telemetry import gpus
from tuner.tuning.modelshape import Hardware, ModelShape, kv_bytes_per_token, weight_bytes
from tuner.tuning.space import Candidate, resolve


def peak_dram_bw_gbps(hardware: Hardware) -> float | None:
    """The datasheet's peak DRAM bandwidth of the hardware's GPU (GB/s), None for an unknown GPU or the CPU."""
    known = gpus.lookup(hardware.gpu_name)
    return float(known.peak_dram_bw_gbps) if known is not None and not hardware.is_cpu else None


def decode_ceiling_tokens_per_s(
    candidate: Candidate, shape: ModelShape, hardware: Hardware, workload: Workload, concurrency: int
) -> float | None:
    """The most output tokens/s decoding ``concurrency`` requests can reach on this hardware (None: unknown
    bandwidth)."""
    peak = peak_dram_bw_gbps(hardware)
    if peak is None or concurrency < 1:
        return None
    c = resolve(candidate, hardware, shape)
    tp = c.tensor_parallel_size or 1
    context = workload.input_len + workload.output_len / 2
    per_rank = weight_bytes(shape, c.quantization) / tp + concurrency * context * kv_bytes_per_token(
        shape, c.kv_cache_dtype
    ) / max(1, min(tp, shape.num_kv_heads))
    step_s = per_rank / (peak * 1e9)
    return concurrency / step_s
