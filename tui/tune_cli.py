"""`infertop tune`: parse the operator's targets and limits, then run the tuner in the TUI or headless."""

from __future__ import annotations

import argparse
import json
import sys
import threading
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
from tuner.loadgen.workload import PRESETS as WORKLOADS
from tuner.loadgen.workload import WorkloadError, parse_workload
from tuner.outputs import OutputError, check_new, write_private
from tuner.report.write import ReportError
from tuner.tuning import events as ev
from tuner.tuning.slo import PRESETS, SloError, parse_slo
from tuner.tuning.space import SpaceError, parse_pins
from tuner.tuning.store import StoreError
from tuner.tuning.tune import TuneConfig, TuneError, Tuner

DEFAULT_SLO = "mlperf-llama3.1-8b-server"

EXIT_CODES = """exit codes:
  0  a configuration was proven: vLLM relaunched from the exported file held the SLO at the exported operating
     point (PROVEN, or PROVEN AFTER BACKING OFF to a lower load or to the runner-up); or --no-prove (UNVERIFIED)
  1  no configuration met the SLO, or the server refused every request (the last line says why)
  2  bad input: model directory, SLO, values, store; an --out or --export an earlier run wrote (see --force)
  3  NOT PROVEN: the winner (and the runner-up) did not hold the SLO on a relaunch from the exported file;
     best.yaml is written with NOT PROVEN in its header
  130 interrupted (Ctrl-C, SIGTERM or s): finished trials and the report are kept, --resume carries on
"""


def tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop tune",
        description="Find the vLLM configuration that holds the most load within your latency targets, and prove "
        "it on a server relaunched from the exported file.",
        epilog="SLO presets: " + ", ".join(PRESETS) + "\n\nexamples:\n"
        "  infertop tune /models/llama-3.1-8b --slo mlperf-llama3.1-8b-interactive --export best.yaml\n"
        "  infertop tune /models/m --slo ttft=0.5,tps=30 --pin max-model-len=4096 --values max-num-seqs=64,128,256\n"
        "  infertop tune /models/m --resume          # carry on after Ctrl-C or a crash\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="local model directory (config.json sizes the search)")
    parser.add_argument(
        "--slo",
        help=f"preset or ttft=S,tps=N,err=F (default: the workload's, else {DEFAULT_SLO})",
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
        choices=("rate", "throughput", "users"),
        default="rate",
        help="rate (default): the highest Poisson arrival rate within the SLO, as MLPerf's server scenario "
        "(throughput is the same); users: the most concurrent users (closed loop), as Artificial Analysis",
    )
    parser.add_argument("--input-len", type=int, metavar="N", help="prompt tokens (default 512)")
    parser.add_argument("--output-len", type=int, metavar="N", help="output tokens (default 256)")
    parser.add_argument(
        "--workload",
        metavar="PRESET|FILE|SPEC",
        help=f"the traffic to tune for instead of fixed lengths: a preset ({', '.join(WORKLOADS)}), "
        "a dataset of prompts (chat-sample, sharegpt-sample, or a JSONL/ShareGPT file), a trace to replay "
        "(JSONL with timestamps), a JSON file, or in=lognormal:500:0.6,out=normal:250:60,prefix=512x4 "
        "(sessions: add turns=uniform:2:8,think=S,context=N) (its SLO preset is the default --slo)",
    )
    parser.add_argument("--max-concurrency", type=int, default=512, metavar="N", help="most users tried")
    parser.add_argument(
        "--phase-seconds",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="least time per measured load (10)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=240,
        metavar="N",
        help="a load whose interval still straddles a limit after N requests counts as failing (240)",
    )
    parser.add_argument(
        "--production-seconds",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="least time for the production check",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="prompt token ids below N (default: the model's vocabulary)",
    )
    parser.add_argument(
        "--pin-cpus",
        default="auto",
        metavar="MODE",
        help="auto (default: on the CPU build or up to 8 cores, the client gets the last core and vLLM the "
        "others), off, or SERVER:CLIENT cpu lists such as 0-2:3",
    )
    parser.add_argument(
        "--budget", type=int, metavar="N", help="most vLLM launches (default: a third of the grid)"
    )
    parser.add_argument("--store", type=Path, default=Path("infertop-tune.sqlite"), help="trial database")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --store")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("infertop-tune"),
        help="report and logs directory (one holding an earlier run's files: --resume or --force)",
    )
    parser.add_argument(
        "--export",
        type=Path,
        metavar="FILE",
        help="also write the winner's YAML here (an existing file is kept)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out directory and --export file"
    )
    add_launch_arguments(parser)
    parser.add_argument(
        "--price-per-gpu-hour",
        "--price",
        type=positive_price,
        metavar="USD",
        help="price of one GPU-hour: cost per 1M output tokens of the whole node",
    )
    parser.add_argument(
        "--no-prove",
        action="store_true",
        help="skip relaunching vLLM from the exported YAML (the proof and the production check): UNVERIFIED",
    )
    parser.add_argument("--cpu", action="store_true", help="tune the CPU build of vLLM (no NVML)")
    parser.add_argument(
        "--gpus",
        default="all",
        metavar="LIST",
        help="the node's GPUs the tune may use: all (default), 0-3, 0,2,4,6. Layouts are ranked by what they "
        "serve on all of them (replicas x TP; GPUs a layout leaves idle count as lost)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="most trials at once (default: as many as the free GPUs hold; 1: one after another)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the search would do on this machine (the predicted ranking of layouts, the first "
        "batches, the budget, the expected wall time serial and parallel) and launch nothing",
    )
    parser.add_argument(
        "--simulate",
        metavar="MACHINE",
        help="tune as if on a simulated machine (h100x8, l4x2, ...: scripted NVML; for demos and tests, with "
        "a stand-in server given by --vllm-cmd); everything it prints says SIMULATED",
    )
    parser.add_argument(
        "--no-predict",
        action="store_true",
        help="do not rank candidates by the performance model (infertop[predict]); follow the evidence only",
    )
    parser.add_argument("--headless", action="store_true", help="progress lines instead of the TUI")
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON on stdout (implies --headless)"
    )
    parser.epilog = (
        (parser.epilog or "") + "\nArguments after -- are passed to every vLLM launch.\n\n" + EXIT_CODES
    )
    return parser


def positive_price(text: str) -> float:
    """--price: a finite price above zero (NaN or infinity would turn every cost into nonsense)."""
    try:
        return positive_seconds(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a price in USD above 0, got {text!r}") from None


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before anything is launched or measured, outputs that would replace an earlier run's: an --out
    directory holding files (its logs would be truncated, its report replaced) and an existing --export file,
    unless --force. --resume carries on in its own run directory.

    Raises:
        OutputError: one line for the user.
    """
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is not a directory")
    if not args.resume and not args.force and out.is_dir() and any(out.iterdir()):
        raise OutputError(
            f"--out {out} holds an earlier run's files: --resume carries that run on, --force replaces them, "
            "or give another --out"
        )
    if args.export is not None:
        check_new(args.export, force=args.force)


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
    workload = None
    if args.workload:
        if args.input_len is not None or args.output_len is not None:
            raise TuneError("give --workload or --input-len/--output-len, not both")
        try:
            workload = parse_workload(args.workload)
        except WorkloadError as exc:
            raise TuneError(str(exc)) from None
    slo = args.slo or (workload.slo if workload is not None and workload.slo else DEFAULT_SLO)
    nvml = _simulated_nvml(args.simulate) if args.simulate else None
    return TuneConfig(
        model=args.model,
        slo=parse_slo(slo),
        workload=workload,
        command=command,
        fixed_args=tuple(vllm_args),
        pins=parse_pins(args.pin),
        values=_values(args.values),
        input_len=512 if args.input_len is None else args.input_len,
        output_len=256 if args.output_len is None else args.output_len,
        min_phase_s=args.phase_seconds,
        max_requests=args.max_requests,
        production_s=args.production_seconds,
        vocab_size=args.vocab_size,
        pin_cpus=args.pin_cpus,
        max_concurrency=args.max_concurrency,
        launch_budget=args.budget,
        store_path=args.store,
        out_dir=args.out,
        startup_timeout_s=args.startup_timeout,
        prove=not args.no_prove,
        price_per_gpu_hour=args.price_per_gpu_hour,
        gpus=not args.cpu,
        predict=not args.no_predict,
        objective=args.objective,
        gpu_ids=_gpu_ids(args.gpus),
        parallel=args.parallel,
        nvml=nvml,
        simulated=args.simulate,
    )


SIMULATED_GPUS = ("h100", "l4", "a100")


def _simulated_nvml(machine: str) -> Any:
    """The scripted NVML of ``h100x8``-style text (a simulation: the tune labels it so everywhere)."""
    from tuner.telemetry import scripted

    kind, _, count = machine.strip().lower().partition("x")
    presets = {"h100": scripted.h100_sxm, "l4": scripted.l4, "a100": scripted.a100_80gb}
    if kind not in presets or not count.isdigit() or not 1 <= int(count) <= 8:
        raise TuneError(f"--simulate {machine!r}: expected GPUxN with N 1-8, e.g. h100x8, l4x2, a100x4")
    return presets[kind](int(count))


def _gpu_ids(text: str) -> tuple[int, ...] | None:
    """``--gpus``: None for all; else the indices (checked against what NVML sees when the tune opens it)."""
    if text.strip() in ("", "all"):
        return None
    from tuner.tuning.layout import parse_gpu_list

    try:
        return parse_gpu_list(text, range(4096))
    except ValueError as exc:
        raise TuneError(str(exc)) from None


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
            goal = "highest arrival rate" if event.objective == "rate" else "most concurrent users"
            cpus = f"\ninfertop tune: {event.cpu_note}" if event.cpu_note else ""
            predicted = f"\ninfertop tune: {event.prediction}" if event.prediction else ""
            node = (
                f"\ninfertop tune: the node: GPUs {','.join(map(str, event.node_gpus))}, up to {event.parallel} "
                f"trial{'s' if event.parallel != 1 else ''} at once; layouts ranked by what the whole node serves"
                if event.node_gpus
                else ""
            )
            eta = f"\ninfertop tune: ETA {_minutes(event.eta_s)}" if event.eta_s else ""
            return (
                f"{event.model} on {event.hardware}; SLO {event.slo}; goal: the {goal} within it; "
                f"{event.candidates_total} feasible configs, budget {event.launch_budget} launches{resumed}{cpus}"
                f"{predicted}{node}{eta}"
            )
        if isinstance(event, ev.TrialStarted):
            plural = "s" if len(event.gpus) > 1 else ""
            where = f" on GPU{plural} {','.join(map(str, event.gpus))}" if event.gpus else ""
            layout = f", {event.layout}" if event.layout and event.gpus else ""
            return f"launch {event.index}: {event.label}{layout}{where} ({event.why})"
        if isinstance(event, ev.EtaUpdated):
            if event.remaining_s is None:
                return None
            return f"  ETA {_minutes(event.remaining_s)} ({event.basis})"
        if isinstance(event, ev.ServerReady):
            return f"  ready in {event.startup_s:.0f} s at {event.url}"
        if isinstance(event, ev.PhaseMeasured):
            verdict = {"pass": "meets SLO", "fail": "fails", "uncertain": "at the limit"}.get(
                event.decision, ""
            )
            if event.reasons and not event.passed:
                verdict += ": " + "; ".join(event.reasons)
            ttft = "n/a" if event.ttft_p95_s is None else f"{event.ttft_p95_s * 1000:,.0f} ms"
            if event.ttft_p95_ci_s is not None:
                lo, hi = event.ttft_p95_ci_s
                ttft += f" ({lo * 1000:,.0f}-{'?' if hi is None else f'{hi * 1000:,.0f}'})"
            more = f", {event.phases} phases" if event.phases > 1 else ""
            busy = f" [disturbed: {event.disturbed}]" if event.disturbed else ""
            return (
                f"  {event.role:<10} {event.load_label:>12} {event.output_tokens_per_s:>9,.0f} tok/s  TTFT p95 "
                f"{ttft:>15}  {event.requests} req{more} — {verdict}{busy}"
            )
        if isinstance(event, ev.PhaseRepeated):
            return f"  {event.load_label}: {event.why}"
        if isinstance(event, ev.TrialFinished):
            node = (
                f"; the node as {event.layout}: {event.node_capacity:.3g}"
                if event.node_capacity and event.layout and not event.layout.startswith("1 x")
                else ""
            )
            busy = f" [disturbed: {event.disturbed}]" if event.disturbed else ""
            who = f" ({event.label})" if event.gpus else ""
            return f"  {event.status}{who}: {event.reason}{node}{predicted_beside_measured(event)}{busy}"
        if isinstance(event, ev.BestChanged):
            note = f" ({event.note})" if event.note else ""
            return f"  best so far: {event.label}, {event.load_label}, {event.output_tokens_per_s:,.0f} tok/s{note}"
        if isinstance(event, ev.VerdictReached):
            return None  # TuneFinished ends with the headline
        if isinstance(event, ev.TuneFinished):
            end = f"stopped: {event.stopped}" if event.stopped else "done"
            return f"{end} after {event.launches} launches, {event.wall_s / 60:.1f} min"
        return None


def run_tune_cli(argv: Sequence[str]) -> int:
    own, vllm_args = split_vllm_args(argv)
    args = tune_parser().parse_args(own)
    try:
        if not args.dry_run:
            check_outputs(args)
        tuner = Tuner(build_config(args, vllm_args), resume=args.resume)
        if args.dry_run:
            print_to_stdout(tuner.dry_run().text())
            return 0
    except (TuneError, SloError, SpaceError, StoreError, OutputError, ValueError) as exc:
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

        stop_on_signals(
            cancel,
            "infertop tune: stopping after this phase; the server is stopped, trials and the report kept",
        )
        try:
            result = tuner.run(HeadlessProgress(), cancel)
        except (TuneError, StoreError, OutputError, ReportError) as exc:
            sys.stderr.write(f"infertop tune: {exc}\n")
            return 2
    if result is None:
        return 130
    export_failed = args.export is not None and not _export(args, result.outputs)
    if args.json:
        print_to_stdout(json.dumps(result.report, indent=1, default=str))
    for name, path in result.outputs.items():
        sys.stderr.write(f"infertop tune: {name}: {path}\n")
    if result.headline:  # the last line says what the run found, whatever came before
        sys.stderr.write(f"infertop tune: {result.headline}\n")
    return 2 if export_failed else result.exit_code


def _export(args: argparse.Namespace, outputs: dict[str, str]) -> bool:
    """Copy the exported YAML to --export (0600, kept if it appeared since the check unless --force); False,
    and one line, when it cannot be written. Nothing to copy (no configuration) is not a failure."""
    if "yaml" not in outputs:
        return True
    try:
        write_private(args.export, Path(outputs["yaml"]).read_text(encoding="utf-8"), force=args.force)
    except (OutputError, OSError) as exc:
        sys.stderr.write(f"infertop tune: --export: {exc}\n")
        return False
    outputs["export"] = str(args.export)
    return True


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def predicted_beside_measured(event: ev.TrialFinished) -> str:
    """``"; measured 0.83x the prediction (37.4)"``: where a trial stands against the performance model. A
    miss is a finding (a client or front-end limit, throttling, a driver setting), not noise."""
    if event.predicted is None or event.measured is None:
        return ""
    if event.predicted <= 0:
        return f"; predicted to hold nothing, measured {event.measured:.3g}"
    return f"; measured {event.measured / event.predicted:.2f}x the prediction ({event.predicted:.3g})"
