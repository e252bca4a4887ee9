"""A stand-in for ``vllm serve`` on a GPU box CI does not have: for the scripted 8-GPU node's tests.

Run as the tuner's vLLM command (``python fake_vllm.py serve MODEL --port P [vLLM flags]``). It answers
``/health``, ``/v1/models``, streaming ``/v1/completions`` (token-id prompts, ``max_tokens``, usage) and
``/metrics`` (vLLM's counter and gauge names; its engine-step histogram and cache-config info in vLLM's own
labelled format) from a small engine: every ``step_s`` each running request gets one token; at most
``--max-num-seqs`` run, the rest wait (queueing shows in TTFT). A step lasts longer the more requests run, and
less with more tensor-parallel GPUs or FP8 weights, so candidates differ as on a GPU.

It writes what the tests check into the ledger file ``$FAKE_VLLM_LEDGER`` (JSON lines): its pid, its
``CUDA_VISIBLE_DEVICES`` and when it started and stopped. ``$FAKE_VLLM_FAIL_IF`` (a substring of its
arguments) makes it fail to start as vLLM does when CUDA runs out of memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

STEP_S = 0.004  # one decode step with one request running, TP 1, 16-bit weights
STEP_PER_SEQ_S = 0.0004  # each more request running adds this much to a step
# vllm/v1/metrics/loggers.py: vllm:iteration_tokens_total's buckets (histogram_buckets("iteration_tokens")).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
KV_BLOCK_TOKENS = 16  # vLLM's default block size on GPUs


def _ledger(**entry: Any) -> None:
    path = os.environ.get("FAKE_VLLM_LEDGER")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "t": time.time(), **entry}) + "\n")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("serve", nargs="?")
    p.add_argument("model", nargs="?")
    p.add_argument("--model", dest="model_flag")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--config")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--quantization")
    p.add_argument("--data-parallel-size", type=int)
    p.add_argument("--kv-cache-dtype")
    args, _ = p.parse_known_args(argv)
    if args.config:  # the exported YAML: its keys are the flags
        for line in Path(args.config).read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                name = key.strip().replace("-", "_")
                value = value.strip().strip('"')
                if (
                    name in ("max_num_seqs", "tensor_parallel_size", "data_parallel_size")
                    and getattr(args, name) is None
                ):
                    setattr(args, name, int(value))
                elif name == "quantization" and args.quantization is None:
                    args.quantization = value
                elif name == "kv_cache_dtype" and args.kv_cache_dtype is None:
                    args.kv_cache_dtype = value
                elif name == "model" and not args.model:
                    args.model = value
    args.model = args.model or args.model_flag or "fake"
    args.kv_cache_dtype = args.kv_cache_dtype or "auto"
    return args


class Engine:
    def __init__(self, max_seqs: int, step_s: float, ranks: int = 1) -> None:
        self.max_seqs = max_seqs
        self.step_s = step_s
        self.ranks = ranks  # data-parallel ranks step side by side: each carries its share of the requests
        self.running: list[dict[str, Any]] = []
        self.waiting: list[dict[str, Any]] = []
        self.generated = 0
        self.prompt_tokens = 0
        self.finished = 0
        # vllm:iteration_tokens_total: one observation per step that made tokens (per engine: ranks step together)
        self.steps = 0
        self.step_tokens = 0
        self.step_buckets = [0] * len(ITERATION_TOKENS_BUCKETS)

    async def run(self) -> None:
        while True:
            admitted_prompt = 0
            while self.waiting and len(self.running) < self.max_seqs:
                self.running.append(self.waiting.pop(0))
                admitted_prompt += self.running[-1].get("prompt", 0)
            n = len(self.running)
            per_rank = n / self.ranks
            await asyncio.sleep(
                self.step_s + STEP_PER_SEQ_S * per_rank * self.step_s / STEP_S if n else 0.002
            )
            if n:
                tokens = round((admitted_prompt + n) / self.ranks)
                self.steps += 1
                self.step_tokens += tokens
                for i, bound in enumerate(ITERATION_TOKENS_BUCKETS):
                    self.step_buckets[i] += tokens <= bound
            for request in list(self.running):
                request["left"] -= 1
                self.generated += 1
                request["queue"].put_nowait(request["left"])
                if request["left"] <= 0:
                    self.running.remove(request)
                    self.finished += 1


def _engine_metrics(engine: Engine, model: str, kv_cache_dtype: str) -> str:
    """vllm:iteration_tokens_total and vllm:cache_config_info as vLLM writes them: one series per engine (label
    ``engine``; data-parallel ranks step together, so each counts every step), labels in alphabetical order."""
    name = model.replace("\\", "\\\\").replace('"', '\\"')
    # Each sequence may reach 4096 tokens; vLLM writes the engines' blocks summed on every engine's series.
    blocks = engine.max_seqs * 4096 // KV_BLOCK_TOKENS
    lines = [
        "# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.",
        "# TYPE vllm:iteration_tokens_total histogram",
    ]
    for rank in range(engine.ranks):
        labels = f'engine="{rank}",model_name="{name}"'
        bounds = [f"{b:.1f}" for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
        for bound, count in zip(bounds, [*engine.step_buckets, engine.steps], strict=True):
            le = f'engine="{rank}",le="{bound}",model_name="{name}"'
            lines.append(f"vllm:iteration_tokens_total_bucket{{{le}}} {count:.1f}")
        lines.append(f"vllm:iteration_tokens_total_count{{{labels}}} {engine.steps:.1f}")
        lines.append(f"vllm:iteration_tokens_total_sum{{{labels}}} {engine.step_tokens:.1f}")
    lines += [
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
    ]
    for rank in range(engine.ranks):
        lines.append(
            f'vllm:cache_config_info{{block_size="{KV_BLOCK_TOKENS}",cache_dtype="{kv_cache_dtype}",'
            f'enable_prefix_caching="True",engine="{rank}",gpu_memory_utilization="0.9",'
            f'num_cpu_blocks="None",num_gpu_blocks="{blocks}",num_gpu_blocks_override="None"}} 1.0'
        )
    return "\n".join(lines) + "\n"


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    engine: Engine,
    model: str,
    kv_cache_dtype: str = "auto",
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = next((int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length:")), 0)
            body = await reader.readexactly(length) if length else b""
            if path == "/health":
                _send(writer, 200, b"")
            elif path == "/v1/models":
                _send(
                    writer,
                    200,
                    json.dumps({"object": "list", "data": [{"id": model, "max_model_len": 4096}]}).encode(),
                )
            elif path == "/metrics":
                page = (
                    f"vllm:num_requests_running {len(engine.running)}\n"
                    f"vllm:num_requests_waiting {len(engine.waiting)}\n"
                    f"vllm:kv_cache_usage_perc {min(1.0, len(engine.running) / engine.max_seqs):.3f}\n"
                    f"vllm:generation_tokens_total {engine.generated}\n"
                    f"vllm:prompt_tokens_total {engine.prompt_tokens}\n"
                    f"vllm:request_success_total {engine.finished}\n"
                    "vllm:num_preemptions_total 0\n"
                ) + _engine_metrics(engine, model, kv_cache_dtype)
                _send(writer, 200, page.encode(), "text/plain")
            elif path == "/v1/completions" and method == "POST":
                await _complete(writer, engine, model, json.loads(body or b"{}"))
            else:
                _send(writer, 404, b'{"error": "no route"}')
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def _send(writer: asyncio.StreamWriter, status: int, body: bytes, kind: str = "application/json") -> None:
    writer.write(
        f"HTTP/1.1 {status} OK\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    )


async def _complete(
    writer: asyncio.StreamWriter, engine: Engine, model: str, request: dict[str, Any]
) -> None:
    tokens = max(1, int(request.get("max_tokens") or 16))
    prompt = request.get("prompt") or []
    prompt_len = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
    engine.prompt_tokens += prompt_len
    queue: asyncio.Queue[int] = asyncio.Queue()
    engine.waiting.append({"left": tokens, "queue": queue, "prompt": prompt_len})
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

    def chunk(data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

    while True:
        left = await queue.get()
        finish = "length" if left <= 0 else None
        choice = {"index": 0, "text": " x", "logprobs": None, "finish_reason": finish, "stop_reason": None}
        chunk(
            json.dumps(
                {"id": "c", "object": "text_completion", "model": model, "choices": [choice], "usage": None}
            )
        )
        await writer.drain()
        if left <= 0:
            break
    usage = {"prompt_tokens": prompt_len, "completion_tokens": tokens, "total_tokens": prompt_len + tokens}
    chunk(json.dumps({"id": "c", "object": "text_completion", "model": model, "choices": [], "usage": usage}))
    chunk("[DONE]")
    writer.write(b"0\r\n\r\n")


async def _main(args: argparse.Namespace) -> None:
    tp = args.tensor_parallel_size or 1
    dp = args.data_parallel_size or 1
    speed = tp**0.5 * (1.6 if args.quantization == "fp8" else 1.0)
    # Data parallelism: dp engines behind one API server, as one engine dp times as wide; the API server's cost
    # per step (FAKE_VLLM_DP_SLOWDOWN, a factor on each step) is what can make it lose to independent servers.
    slowdown = float(os.environ.get("FAKE_VLLM_DP_SLOWDOWN", "1.0")) if dp > 1 else 1.0
    # FAKE_VLLM_STEP_S: a slower GPU than the H100 STEP_S stands for (an L4's decode step of an 8B model is ~70 ms).
    step_s = float(os.environ.get("FAKE_VLLM_STEP_S", STEP_S))
    engine = Engine((args.max_num_seqs or 16) * dp, step_s / speed * slowdown, dp)
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, engine, args.model, args.kv_cache_dtype), args.host, args.port
    )
    await asyncio.sleep(float(os.environ.get("FAKE_VLLM_STARTUP_S", "0.3")))
    print(f"INFO: Uvicorn running on http://{args.host}:{args.port}", flush=True)
    async with server:
        await asyncio.gather(server.serve_forever(), engine.run())


def main() -> None:
    argv = sys.argv[1:]
    fail_if = os.environ.get("FAKE_VLLM_FAIL_IF")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    _ledger(event="start", gpus=gpus, argv=argv)
    if fail_if and fail_if in " ".join(argv):
        time.sleep(0.3)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
        _ledger(event="stop", gpus=gpus)
        sys.exit(1)

    def stop(signum: int, frame: object) -> None:
        _ledger(event="stop", gpus=gpus)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    asyncio.run(_main(_parse(argv)))


if __name__ == "__main__":
    main()
