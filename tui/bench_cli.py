"""`infertop bench`: argument parsing, a progress line on stderr, and a table (or JSON) on stdout."""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tui.launch_args import (
    add_launch_arguments,
    positive_seconds,
    print_to_stdout,
    stop_on_signals,
    vllm_command,
)
from tuner.bench import BenchPlan, run_bench
from tuner.loadgen import LoadSpec, PhaseProgress
from tuner.loadgen.workload import PRESETS as WORKLOADS
from tuner.loadgen.workload import Workload, WorkloadError, parse_workload
from tuner.measure import MeasuredPhase
from tuner.outputs import OutputError, check_new
from tuner.serving.launcher import ServerSpec


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop bench",
        description="Load-test a vLLM server with streaming requests: TTFT, TPOT, tokens/s, what bound each phase.",
        epilog="examples:\n"
        "  infertop bench --endpoint http://127.0.0.1:8000 --concurrency 1,16,64\n"
        "  infertop bench --launch /models/llama --vllm-python /opt/vllm/bin/python -- --max-num-seqs 128\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", metavar="URL", help="a running OpenAI-compatible vLLM server")
    target.add_argument("--launch", metavar="MODEL", help="launch vLLM on MODEL, bench it, stop it")
    add_launch_arguments(parser)
    parser.add_argument("--model", help="served model name (default: the first at /v1/models)")
    parser.add_argument("--input-len", type=int, metavar="N", help="prompt tokens (default 128)")
    parser.add_argument("--output-len", type=int, metavar="N", help="output tokens (default 128)")
    parser.add_argument(
        "--workload",
        metavar="PRESET|FILE|SPEC",
        help=f"traffic to send instead of fixed lengths: a preset ({', '.join(WORKLOADS)}), "
        "a dataset of prompts (chat-sample, sharegpt-sample, or a JSONL/ShareGPT file), a trace to replay "
        "(JSONL with timestamps), a JSON file, or in=lognormal:500:0.6,out=normal:250:60,prefix=512x4 "
        "(sessions: add turns=uniform:2:8,think=S,context=N)",
    )
    parser.add_argument("--len-range", type=float, default=0.0, metavar="R", help="lengths vary uniformly ±R")
    parser.add_argument(
        "--concurrency",
        default="1,8,32",
        metavar="LIST",
        help="closed-loop phases, e.g. 1,16,64 (default 1,8,32)",
    )
    parser.add_argument(
        "--rate",
        metavar="LIST",
        help="request rates per second instead, e.g. 2,8 (Poisson, or a trace's own gaps)",
    )
    parser.add_argument("--num-requests", type=int, metavar="N", help="per phase (default 8 per stream)")
    parser.add_argument(
        "--duration", type=positive_seconds, metavar="S", help="per phase, instead of a request count"
    )
    parser.add_argument("--warmup", type=int, metavar="N", help="warm-up requests per phase (not counted)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="prompt token ids are drawn below N (default: from the model's config.json and tokenizer.json, "
        "else asked of the server, else 1000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-max", type=positive_seconds, metavar="S", help="SLO for goodput: TTFT limit")
    parser.add_argument("--tpot-max", type=positive_seconds, metavar="S", help="SLO for goodput: TPOT limit")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="results file, written 0600 (default infertop-bench-<time>.json); an existing one is kept",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--no-gpu", action="store_true", help="do not read GPU telemetry")
    parser.add_argument("vllm_args", nargs="*", help="after --: extra arguments for vLLM (with --launch)")
    return parser


def _numbers(text: str, kind: type) -> tuple[Any, ...]:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"infertop bench: not a list of numbers: {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise SystemExit(f"infertop bench: expected positive numbers, got {text!r}")
    return values


def _launch_spec(args: argparse.Namespace) -> ServerSpec | None:
    if not args.launch:
        if args.vllm_args:
            raise SystemExit("infertop bench: extra vLLM arguments need --launch")
        return None
    command = vllm_command(args)
    try:
        return ServerSpec(
            model=args.launch,
            args=tuple(args.vllm_args),
            command=command,
            startup_timeout_s=args.startup_timeout,
        )
    except ValueError as exc:
        raise SystemExit(f"infertop bench: {exc}") from None


class ProgressLine:
    """One line on stderr, rewritten in place on a terminal; a line per phase otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, index: int, count: int, spec: LoadSpec, p: PhaseProgress) -> None:
        now = time.monotonic()
        if now - self._last < 0.2 or not self.tty:
            return
        self._last = now
        total = p.requests_total or 0
        width = 24
        filled = int(width * p.requests_done / total) if total else 0
        bar = "█" * filled + "·" * (width - filled)
        what = f"c={spec.concurrency}" if spec.concurrency else f"{spec.request_rate_per_s:g} req/s"
        rate = p.output_tokens / p.elapsed_s if p.elapsed_s > 0 else 0.0
        line = (
            f"phase {index + 1}/{count} {what:>8} {p.stage:<7} {bar} {p.requests_done}/{total or '?'} req"
            f"  {rate:,.0f} tok/s  {p.requests_failed} failed"
        )
        sys.stderr.write("\r" + line[:150].ljust(110))
        sys.stderr.flush()

    def done(self, index: int, phase: MeasuredPhase) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
        s = phase.load.stats
        redrawn = phase.load.draws_over_context
        fitted = f" ({redrawn} draws longer than the context drawn again)" if redrawn else ""
        sys.stderr.write(
            f"phase {index + 1}: {s.requests_ok} ok, {s.requests_failed} failed{fitted}, "
            f"{s.output_tokens_per_s:,.0f} tok/s — bound: {phase.bound.kind.value}\n"
        )


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:,.0f}"


def _interval(ci: tuple[float, float | None] | None, scale: float, digits: int) -> str:
    if ci is None:
        return ""
    lo, hi = ci
    top = "?" if hi is None else f"{hi * scale:,.{digits}f}"
    return f" ({lo * scale:,.{digits}f}-{top})"


def table(phases: Sequence[MeasuredPhase]) -> str:
    """One row per phase. Throughput and the p95s are the steady window's (ramp-up and drain left out), each
    with its 90 % interval; "?" where too few requests bound a p95 from above (it takes 59)."""
    head = (
        "| load | ok | failed | out tok/s, steady (90 % interval) | tok/s/user p50 | TTFT p50 ms "
        "| TTFT p95 ms (90 % interval) | TPOT p50 ms | E2E p95 s | server tokens | bound |"
    )
    rows = [head, "|" + "---|" * 11]
    for p in phases:
        s, spec, st = p.load.stats, p.load.spec, p.steady
        load = (
            f"c={spec.concurrency}"
            if spec.concurrency and spec.mode.value == "concurrency"
            else f"{spec.request_rate_per_s:g}/s"
        )
        per_user = "n/a" if s.user_tok_per_s_p50 is None else f"{s.user_tok_per_s_p50:,.1f}"
        e2e = "n/a" if s.e2e_p95_s is None else f"{s.e2e_p95_s:.2f}"
        check = (
            "n/a" if p.tokens.server_output_tokens is None else ("MISMATCH" if p.tokens.mismatch else "match")
        )
        tok_s = f"{s.output_tokens_per_s:,.0f}"
        ttft95 = _ms(s.ttft_p95_s)
        if st is not None and st.requests_ok:
            tok_s = f"{st.output_tokens_per_s:,.0f}{_interval(st.output_tokens_per_s_ci, 1, 0)}"
            ttft95 = f"{_ms(st.ttft_p95_s)}{_interval(st.ttft_p95_ci_s, 1000, 0)}"
        rows.append(
            f"| {load} | {s.requests_ok} | {s.requests_failed} | {tok_s} | {per_user} | {_ms(s.ttft_p50_s)} "
            f"| {ttft95} | {_ms(s.tpot_p50_s)} | {e2e} | {check} | {p.bound.kind.value}: {p.bound.reason} |"
        )
    return "\n".join(rows)


PREFIX_HIT_WARN = 0.05  # this bench never repeats a prompt: more hits than this come from elsewhere


def _status(message: str) -> None:
    sys.stderr.write(f"infertop bench: {message}\n")


def run_bench_cli(argv: Sequence[str]) -> int:
    args = bench_parser().parse_args(argv)
    concurrencies = _numbers(args.concurrency, int)
    rates = _numbers(args.rate, float) if args.rate else ()
    launch = _launch_spec(args)
    if args.vocab_size is not None and args.vocab_size < 10:
        raise SystemExit(f"infertop bench: --vocab-size must be at least 10, got {args.vocab_size}")
    workload = None
    if args.workload:
        if args.input_len is not None or args.output_len is not None or args.len_range:
            raise SystemExit(
                "infertop bench: give --workload or --input-len/--output-len/--len-range, not both"
            )
        try:
            workload = parse_workload(args.workload)
        except WorkloadError as exc:
            raise SystemExit(f"infertop bench: {exc}") from None
    plan = BenchPlan(
        input_len=128 if args.input_len is None else args.input_len,
        output_len=128 if args.output_len is None else args.output_len,
        len_range_ratio=args.len_range,
        workload=workload,
        concurrencies=concurrencies,
        request_rates=rates,
        num_requests=args.num_requests,
        duration_s=args.duration,
        warmup_requests=args.warmup,
        seed=args.seed,
        vocab_size=args.vocab_size,
        model=args.model,
        ttft_max_s=args.ttft_max,
        tpot_max_s=args.tpot_max,
    )
    if workload is not None:
        _status(f"workload {workload.describe()}")
    out = args.out or Path(time.strftime("infertop-bench-%Y%m%d-%H%M%S.json"))
    try:
        check_new(out, force=args.force)  # before anything is launched or measured: a refusal costs nothing
    except OutputError as exc:
        _status(str(exc))
        return 2
    progress = ProgressLine()
    cancel = threading.Event()

    stop_on_signals(cancel, "infertop bench: stopping; what was measured so far is written")
    report = run_bench(
        args.endpoint,
        plan,
        out,
        launch=launch,
        with_gpus=not args.no_gpu,
        on_progress=progress,
        on_phase_done=progress.done,
        on_status=_status,
        cancel=cancel,
        force=args.force,
    )
    if args.json:
        print_to_stdout(json.dumps(report.to_dict(), indent=1))
    elif report.phases:
        print_to_stdout(_findings(report.phases, workload))
    sys.stderr.write(f"infertop bench: results in {out}\n")
    if report.error:
        sys.stderr.write(f"infertop bench: {report.error}\n")
        return 130 if report.interrupted else 1
    return 130 if report.interrupted else 0


def _findings(phases: Sequence[MeasuredPhase], workload: Workload | None) -> str:
    """The table, then a line for each phase whose figures need a word: a token mismatch, a disturbed host,
    stand-in answers, the prefix cache."""
    lines = [table(phases)]
    shared = workload is not None and (workload.prefix is not None or workload.sessions is not None)
    for p in phases:
        spec = p.load.spec
        if p.tokens.mismatch:
            lines.append(f"! c={spec.concurrency}: {p.tokens.note}")
        if p.disturbance is not None and p.disturbance.disturbed:
            what = f"c={spec.concurrency}" if spec.concurrency else f"{spec.request_rate_per_s:g} req/s"
            lines.append(f"! {what}: disturbed: {p.disturbance.why}")
        hits, queries = p.evidence.prefix_cache_hits, p.evidence.prefix_cache_queries
        if p.load.stand_in_answers:
            lines.append(
                f"! c={spec.concurrency}: this vLLM did not return {p.load.stand_in_answers} answers as "
                "token ids (return_token_ids): their history was stand-in ids of the same length, which its "
                "prefix cache cannot reuse"
            )
        if hits is not None and queries and shared:  # the workload's shared prefixes: expected, and a finding
            lines.append(
                f"  c={spec.concurrency}: {hits / queries:.0%} of the prompt tokens came from vLLM's prefix cache"
            )
        elif hits and queries and hits / queries > PREFIX_HIT_WARN:
            lines.append(
                f"! c={spec.concurrency}: {hits / queries:.0%} of the prompt tokens came from vLLM's "
                "prefix cache (another client repeating prompts?): the figures are optimistic"
            )
    return "\n".join(lines)
