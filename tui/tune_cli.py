"""`infertop tune`: parse the operator's targets and limits, then run the tuner in the TUI or headless."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tui.launch_args import add_launch_arguments, stop_on_ctrl_c, vllm_command
from tuner.tuning import events as ev
from tuner.tuning.slo import PRESETS, SloError, parse_slo
from tuner.tuning.space import SpaceError, parse_pins
from tuner.tuning.store import StoreError
from tuner.tuning.tune import TuneConfig, TuneError, Tuner

DEFAULT_SLO = "mlperf-llama3.1-8b-server"


def tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop tune",
        description="Find the vLLM configuration with the most output tokens/s that meets your latency targets.",
        epilog="SLO presets: " + ", ".join(PRESETS) + "\n\nexamples:\n"
        "  infertop tune /models/llama-3.1-8b --slo mlperf-llama3.1-8b-interactive --export best.yaml\n"
        "  infertop tune /models/m --slo ttft=0.5,tps=30 --pin max-model-len=4096 --values max-num-seqs=64,128,256\n"
        "  infertop tune /models/m --resume          # carry on after Ctrl-C or a crash\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="local model directory (config.json sizes the search)")
    parser.add_argument(
        "--slo", default=DEFAULT_SLO, help=f"preset or ttft=S,tps=N,err=F (default {DEFAULT_SLO})"
    )
    parser.add_argument("--pin", action="append", default=[], metavar="NAME=VALUE", help="fix a dimension")
    parser.add_argument(
        "--values",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="the values to try for a dimension",
    )
    parser.add_argument(
        "--objective",
        choices=("throughput", "users"),
        default="throughput",
        help="most output tok/s (default), or most concurrent users, within the SLO",
    )
    parser.add_argument("--input-len", type=int, default=512, metavar="N", help="prompt tokens (default 512)")
    parser.add_argument(
        "--output-len", type=int, default=256, metavar="N", help="output tokens (default 256)"
    )
    parser.add_argument("--requests-per-stream", type=int, default=4, metavar="N", help="per measured load")
    parser.add_argument("--max-concurrency", type=int, default=512, metavar="N")
    parser.add_argument(
        "--phase-seconds", type=float, default=10.0, metavar="S", help="least time per measured load"
    )
    parser.add_argument(
        "--budget", type=int, metavar="N", help="most vLLM launches (default: a third of the grid)"
    )
    parser.add_argument("--store", type=Path, default=Path("infertop-tune.sqlite"), help="trial database")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --store")
    parser.add_argument("--out", type=Path, default=Path("infertop-tune"), help="report and logs directory")
    parser.add_argument("--export", type=Path, metavar="FILE", help="also write the winner's YAML here")
    add_launch_arguments(parser)
    parser.add_argument(
        "--price-per-gpu-hour", type=float, metavar="USD", help="for cost per 1M output tokens"
    )
    parser.add_argument(
        "--no-prove", action="store_true", help="skip relaunching vLLM from the exported YAML"
    )
    parser.add_argument("--no-production-check", action="store_true", help="skip the steady 75 %% load check")
    parser.add_argument("--cpu", action="store_true", help="tune the CPU build of vLLM (no NVML)")
    parser.add_argument("--headless", action="store_true", help="progress lines instead of the TUI")
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON on stdout (implies --headless)"
    )
    parser.epilog = (parser.epilog or "") + "\nArguments after -- are passed to every vLLM launch.\n"
    return parser


def split_vllm_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """infertop's own arguments, and those after ``--`` for vLLM."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _values(specs: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep or not raw:
            raise SpaceError(f"--values {spec!r}: expected NAME=V1,V2")
        parsed = [parse_pins([f"{name}={v.strip()}"]) for v in raw.split(",") if v.strip()]
        key = next(iter(parsed[0]))
        out[key] = tuple(p[key] for p in parsed)
    return out


def build_config(args: argparse.Namespace, vllm_args: Sequence[str] = ()) -> TuneConfig:
    command = vllm_command(args)
    return TuneConfig(
        model=args.model,
        slo=parse_slo(args.slo),
        command=command,
        fixed_args=tuple(vllm_args),
        pins=parse_pins(args.pin),
        values=_values(args.values),
        input_len=args.input_len,
        output_len=args.output_len,
        requests_per_stream=args.requests_per_stream,
        min_phase_s=args.phase_seconds,
        max_concurrency=args.max_concurrency,
        launch_budget=args.budget,
        store_path=args.store,
        out_dir=args.out,
        startup_timeout_s=args.startup_timeout,
        prove=not args.no_prove,
        production_check=not args.no_production_check,
        price_per_gpu_hour=args.price_per_gpu_hour,
        gpus=not args.cpu,
        objective=args.objective,
    )


class HeadlessProgress:
    """Tuning events as lines on stderr: one per trial, phase and decision."""

    def __call__(self, event: ev.TuneEvent) -> None:
        line = self.describe(event)
        if line:
            sys.stderr.write(f"infertop tune: {line}\n")
            sys.stderr.flush()

    @staticmethod
    def describe(event: ev.TuneEvent) -> str | None:
        if isinstance(event, ev.TuneStarted):
            resumed = (
                f", {event.resumed_trials} trials from {event.store_path}" if event.resumed_trials else ""
            )
            return (
                f"{event.model} on {event.hardware}; SLO {event.slo}; {event.candidates_total} feasible configs, "
                f"budget {event.launch_budget} launches{resumed}"
            )
        if isinstance(event, ev.TrialStarted):
            return f"launch {event.index}: {event.label} ({event.why})"
        if isinstance(event, ev.ServerReady):
            return f"  ready in {event.startup_s:.0f} s at {event.url}"
        if isinstance(event, ev.PhaseMeasured):
            verdict = "meets SLO" if event.passed else "fails: " + "; ".join(event.reasons)
            ttft = "n/a" if event.ttft_p95_s is None else f"{event.ttft_p95_s * 1000:,.0f} ms"
            return (
                f"  c={event.concurrency:<4} {event.output_tokens_per_s:>9,.0f} tok/s  TTFT p95 {ttft:>9}  "
                f"bound: {event.bound} — {verdict}"
            )
        if isinstance(event, ev.TrialFinished):
            return f"  {event.status}: {event.reason}"
        if isinstance(event, ev.BestChanged):
            return f"  best so far: {event.label}, {event.output_tokens_per_s:,.0f} tok/s at c={event.concurrency}"
        if isinstance(event, ev.TuneFinished):
            end = f"stopped: {event.stopped}" if event.stopped else "done"
            return f"{end} after {event.launches} launches, {event.wall_s / 60:.1f} min; winner: {event.winner_label}"
        return None


def run_tune_cli(argv: Sequence[str]) -> int:
    own, vllm_args = split_vllm_args(argv)
    args = tune_parser().parse_args(own)
    try:
        tuner = Tuner(build_config(args, vllm_args), resume=args.resume)
    except (TuneError, SloError, SpaceError, StoreError, ValueError) as exc:
        sys.stderr.write(f"infertop tune: {exc}\n")
        return 2
    headless = args.headless or args.json or not sys.stdout.isatty()
    if not headless:
        from tui.tune_app import make_tune_app

        app = make_tune_app(tuner)
        app.run()
        result = getattr(app, "result", None)
    else:
        cancel = threading.Event()

        stop_on_ctrl_c(
            cancel, "infertop tune: stopping after this phase; the server is stopped, trials are kept"
        )
        try:
            result = tuner.run(HeadlessProgress(), cancel)
        except (TuneError, StoreError) as exc:
            sys.stderr.write(f"infertop tune: {exc}\n")
            return 2
    if result is None:
        return 130
    if args.export and "yaml" in result.outputs:
        args.export.write_text(Path(result.outputs["yaml"]).read_text())
        result.outputs["export"] = str(args.export)
    if args.json:
        print(json.dumps(result.report, indent=1, default=str))
    for name, path in result.outputs.items():
        sys.stderr.write(f"infertop tune: {name}: {path}\n")
    if result.stopped == "interrupted":
        return 130
    return 0 if result.winner is not None else 1
