"""The decode-traffic estimate against the real H100's GPM figures (REFERENCE.md), through the real code path.

    .venv/bin/python benchmarks/bw_estimate.py [--json FILE]

REFERENCE.md measured, on an H100 80GB SXM with vLLM 0.26.0 (Llama-3.1-8B shape, dummy weights, 512 in / 256
out): FP8 weights + FP8 KV at concurrency 64 and 128 gave 7,710 and 10,295 output tok/s (148 and 104 tok/s per
user, p50), and GPM's DRAM_BW_UTIL read 47-51 % during such decode; bf16 at batch 1 gave 152 tok/s per user.
The server's step rate (vllm:iteration_tokens_total's count rate, what infertop reads) was not recorded, so
each point is worked out with two stand-ins for it:

- "tok/s / users": every user decoding in every step (running = concurrency). A lower bound on the step rate:
  users waiting for their first token make no tokens, so the engine steps faster than this.
- "tok/s per user": the per-user decode speed (1 / TPOT, p50) is the step rate a decoding request sees, one
  token per step; running = tok/s / that rate. The closer of the two to what the engine's counter gives.

The KV cache in use is running x (input + output / 2 + half a 16-token block): the mean context, rounded up to
whole blocks as vLLM allocates them. The figures go through the real ``facts_for`` (the test's config.json of
the 8B shape), an ``EngineSample`` as the scraper fills it, and ``apply_estimates`` onto a ``GpuSample``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.telemetry.bwestimate import ModelFacts, apply_estimates, facts_for
from tuner.telemetry.model import EngineSample, GpuInfo, GpuProcess, GpuSample

CONFIG_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "llama-3.1-8b-shape"
H100_PEAK_GBPS = 3350.0
GPM_DRAM_PCT = (47.0, 51.0)  # REFERENCE.md: during FP8 decode at 64-128 users
INPUT_LEN, OUTPUT_LEN, BLOCK_TOKENS = 512, 256, 16
KV_BLOCKS = 50_000  # any size: usage is set from it, so it cancels out


@dataclass(frozen=True)
class Point:
    config: str  # "fp8" (fp8 weights + fp8 KV) or "bf16"
    users: int
    out_tok_s: float
    tok_s_per_user: float
    gpm_pct: tuple[float, float] | None


POINTS = (
    Point("fp8", 64, 7710, 148, GPM_DRAM_PCT),
    Point("fp8", 128, 10295, 104, GPM_DRAM_PCT),
    Point("bf16", 1, 152, 152, None),  # batch 1: one user decodes in every step
    Point("bf16", 64, 5358, 99, None),
    Point("bf16", 128, 7225, 71, None),
)


def facts(config: str) -> ModelFacts:
    fp8 = config == "fp8"
    found = facts_for(
        str(CONFIG_DIR),
        dtype=None,
        quantization="fp8" if fp8 else None,
        kv_cache_dtype="fp8" if fp8 else None,
    )
    if isinstance(found, str):
        raise SystemExit(found)
    return found


def engine_at(steps_per_s: float, running: float) -> EngineSample:
    """What the scraper would read from the server at this point."""
    tokens_in_use = running * (INPUT_LEN + OUTPUT_LEN / 2 + BLOCK_TOKENS / 2)
    return EngineSample(
        url="http://127.0.0.1:8000",
        time_s=0.0,
        engine="vllm",
        server_pids=(1000,),
        requests_running=running,
        kv_cache_usage_pct=100.0 * tokens_in_use / (KV_BLOCKS * BLOCK_TOKENS),
        steps_per_s=steps_per_s,
        kv_cache_blocks=KV_BLOCKS,
        kv_block_size_tokens=BLOCK_TOKENS,
    )


def estimate_pct(model: ModelFacts, engine: EngineSample) -> GpuSample:
    """The estimate as the monitor would set it on an H100 whose GPM gave nothing."""
    gpu = GpuSample(index=0, time_s=0.0, processes=(GpuProcess(1000, 0, None, "compute"),))
    info = GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-0", None, H100_PEAK_GBPS, "datasheet", True)
    (out,) = apply_estimates((gpu,), (info,), (engine,), {engine.url: model}, {1000: frozenset({0})})
    return out


def rows() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for point in POINTS:
        model = facts(point.config)
        stand_ins = {"tok/s / users": point.out_tok_s / point.users, "tok/s per user": point.tok_s_per_user}
        for how, steps in stand_ins.items():
            if point.users == 1 and how == "tok/s / users":
                continue  # the same at batch 1
            running = point.out_tok_s / steps
            gpu = estimate_pct(model, engine_at(steps, running))
            weights = model.weight_bytes_per_step
            kv = running * (INPUT_LEN + OUTPUT_LEN / 2 + BLOCK_TOKENS / 2) * model.kv_bytes_per_token
            row: dict[str, object] = {
                **asdict(point),
                "step_rate_from": how,
                "steps_per_s": steps,
                "running": running,
                "weights_gb_per_step": weights / 1e9,
                "kv_gb_per_step": kv / 1e9,
                "est_gbps": gpu.dram_bw_est_gbps,
                "est_pct": gpu.dram_bw_est_pct,
                "basis": gpu.dram_bw_est_basis,
                "ceiling_tok_s": point.users * H100_PEAK_GBPS * 1e9 / (weights + kv),
            }
            if point.gpm_pct and gpu.dram_bw_est_pct is not None:
                row["ratio"] = [gpu.dram_bw_est_pct / g for g in reversed(point.gpm_pct)]
            out.append(row)
    return out


def markdown(table: list[dict[str, object]]) -> str:
    lines = [
        "| config | users | out tok/s | step rate from | steps/s | running | weights + KV per step (GB) "
        "| est. GB/s | est. % of peak | GPM DRAM % | est. / GPM |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in table:
        gpm = r["gpm_pct"]
        ratio = r.get("ratio")
        lines.append(
            f"| {r['config']} | {r['users']} | {r['out_tok_s']:,.0f} | {r['step_rate_from']} "
            f"| {r['steps_per_s']:.1f} | {r['running']:.1f} "
            f"| {r['weights_gb_per_step']:.2f} + {r['kv_gb_per_step']:.2f} "
            f"| {r['est_gbps']:,.0f} | {r['est_pct']:.1f} "
            f"| {f'{gpm[0]:.0f}-{gpm[1]:.0f}' if gpm else 'not read'} "  # type: ignore[index]
            f"| {f'{ratio[0]:.2f}-{ratio[1]:.2f}' if ratio else '-'} |"  # type: ignore[index]
        )
    batch1 = next(r for r in table if r["users"] == 1)
    lines.append("")
    lines.append(
        f"Batch 1, bf16: {batch1['out_tok_s']:.0f} tok/s is {batch1['est_pct']:.0f} % of the estimate's "
        f"bandwidth ceiling of {batch1['ceiling_tok_s']:.0f} tok/s (peak / bytes per step)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    table = rows()
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
