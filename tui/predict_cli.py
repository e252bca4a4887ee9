"""``infertop predict``: which GPU, which layout and what cost per token, before renting anything.

For each GPU type, a node of ``--gpus N`` such GPUs is laid out every way the tuner's search space allows (a
configuration with tensor parallelism TP fills it as N // TP replicas; idle GPUs count as lost) and the layouts
are ranked by what the whole node serves under the SLO (:mod:`tuner.predict.node`). The best is shown with the
node's requests/s and tokens/s, per GPU, per kW of board power and, given a price per GPU-hour, per million
output tokens. The figures are NVIDIA aiconfigurator's (the ``predict`` extra): SILICON from timings measured on
the GPU, or EMPIRICAL where it has none (the GPU's speed of light x the measured efficiency of a GPU of the same
architecture); else the memory-bandwidth roofline's ceiling. Every row says which. A performance model's figures,
not measurements: ``infertop tune`` on the machine measures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui.launch_args import print_to_stdout
from tuner.predict import aic
from tuner.predict.base import PredictError, Workload
from tuner.predict.node import NodeRanking, rank_layouts
from tuner.telemetry import gpus
from tuner.tuning.modelshape import ModelShape, SpaceError
from tuner.tuning.slo import Slo, SloError, parse_slo

DEFAULT_SLO = "mlperf-llama3.1-8b-server"
DEFAULT_GPUS = "h100,h200,l4,a100,l40s,b200"


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop predict",
        description="Predict the best layout of a node (replicas x tensor parallelism) and vLLM configuration, "
        "what the whole node serves under an SLO, per GPU, per kW and per million tokens on each GPU type, from "
        "NVIDIA's aiconfigurator (pip install 'infertop[predict]'), or the bandwidth roofline's ceiling where it "
        "cannot model a GPU. A model's estimate, not a measurement: infertop tune measures.",
        epilog="examples:\n"
        "  infertop predict /models/llama-8b --gpu h100,h200,l40s --price h100=2.5,h200=3.6,l40s=1.0\n"
        "  infertop predict /models/llama-70b --gpu h100 --gpus 8 --slo ttft=2,tps=20 --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="local model directory (its config.json)")
    parser.add_argument(
        "--gpu", default=DEFAULT_GPUS, help=f"GPU types, comma-separated (default {DEFAULT_GPUS})"
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="GPUs in the node: a configuration with tensor parallelism TP runs N // TP replicas (default 1)",
    )
    parser.add_argument("--slo", default=DEFAULT_SLO, help=f"preset or ttft=S,tps=N (default {DEFAULT_SLO})")
    parser.add_argument("--input-len", type=int, default=512, metavar="N", help="prompt tokens (default 512)")
    parser.add_argument(
        "--output-len", type=int, default=256, metavar="N", help="output tokens (default 256)"
    )
    parser.add_argument(
        "--price", default="", metavar="GPU=USD,...", help="price per GPU-hour, e.g. h100=2.5"
    )
    parser.add_argument(
        "--calibrate",
        type=Path,
        metavar="REPORT",
        help="an infertop tune report.json from this machine: its measured/predicted ratio corrects that GPU's rows",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


@dataclass(frozen=True)
class Calibration:
    """Measured over predicted capacity from a tune run on one GPU type (geometric mean over its trials)."""

    system: str
    ratio: float
    trials: int
    source: str

    @classmethod
    def from_report(cls, path: Path) -> Calibration:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PredictError(f"--calibrate {path}: cannot read it ({exc})") from None
        if not isinstance(report, dict) or report.get("format") != "infertop-tune-report":
            raise PredictError(f"--calibrate {path}: not an infertop tune report.json")
        gpu = str((report.get("hardware") or {}).get("gpu_name") or "")
        system = aic.system_for(gpu)
        if system is None:
            raise PredictError(
                f"--calibrate {path}: tuned on {gpu or 'no GPU'}, which the model does not cover"
            )
        ratios = []
        for trial in report.get("trials") or []:
            predicted = trial.get("predicted")
            measured = (trial.get("capacity") or {}).get("lo")
            if (
                isinstance(predicted, (int, float))
                and isinstance(measured, (int, float))
                and predicted > 0 < measured
            ):
                ratios.append(math.log(measured / predicted))
        if not ratios:
            raise PredictError(
                f"--calibrate {path}: no trial there has both a prediction and a measured capacity"
            )
        return cls(system, math.exp(statistics.fmean(ratios)), len(ratios), str(path))


@dataclass(frozen=True)
class GpuRow:
    """One GPU type as typed after ``--gpu``, its node's ranked layouts and its price and calibration."""

    name: str  # as typed: "h100", "l4"
    ranking: NodeRanking
    price_per_gpu_hour: float | None
    calibration: Calibration | None  # a local tune's measured/predicted, applied to the figures


def run_predict_cli(argv: Sequence[str]) -> int:
    args = predict_parser().parse_args(argv)
    try:
        slo = parse_slo(args.slo)
        workload = Workload(args.input_len, args.output_len)
        if args.gpus < 1:
            raise PredictError(f"--gpus must be >= 1, got {args.gpus}")
        shape = ModelShape.from_dir(args.model)
        prices = _prices(args.price)
        names = _gpu_names(args.gpu)
        calibration = Calibration.from_report(args.calibrate) if args.calibrate else None
        rows = [_row(args, shape, name, workload, slo, prices.get(name), calibration) for name in names]
    except (SloError, SpaceError, PredictError) as exc:
        print(f"infertop predict: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_to_stdout(json.dumps(_to_json(args, rows, slo), indent=2))
    else:
        print_to_stdout(_table(args, rows, slo))
    return 0 if any(r.ranking.best is not None for r in rows) else 1


def _row(
    args: argparse.Namespace,
    shape: ModelShape,
    name: str,
    workload: Workload,
    slo: Slo,
    price: float | None,
    calibration: Calibration | None,
) -> GpuRow:
    system = aic.system_for(name)
    own = calibration if calibration is not None and system == calibration.system else None
    ranking = rank_layouts(
        Path(args.model),
        shape,
        name,
        args.gpus,
        workload,
        slo,
        price_per_gpu_hour=price,
        capacity_scale=own.ratio if own is not None else 1.0,
    )
    return GpuRow(name, ranking, price, own)


def _prices(spec: str) -> dict[str, float]:
    prices: dict[str, float] = {}
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or price <= 0 or not math.isfinite(price):
            raise PredictError(f"--price takes GPU=USD per GPU-hour, e.g. h100=2.5; got {item!r}")
        prices[name.strip().lower()] = price
    return prices


def _gpu_names(spec: str) -> list[str]:
    """The GPU types as typed, each one aiconfigurator or the GPU table knows."""
    found: list[str] = []
    for name in (p.strip().lower() for p in spec.split(",") if p.strip()):
        if aic.model_for(name) is None and gpus.lookup(name) is None:
            raise PredictError(f"unknown GPU {name!r}: try {', '.join(sorted(aic.ALIASES))}")
        found.append(name)
    if not found:
        raise PredictError("--gpu names no GPU")
    return found


def why_no_best(ranking: NodeRanking) -> str:
    """Why a GPU type has no best layout, as the ranking found it (:func:`tuner.predict.node.rank_layouts`)."""
    return ranking.error or "no configuration meets the SLO"


def _kind_short(ranking: NodeRanking) -> str:
    """The table's last column: where the row's figures come from."""
    if ranking.is_ceiling:
        return "roofline CEILING"
    return "aic EMPIRICAL" if "EMPIRICAL" in ranking.kind else "aic SILICON"


def _money(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _table(args: argparse.Namespace, rows: list[GpuRow], slo: Slo) -> str:
    workload = f"{args.input_len} in / {args.output_len} out"
    node = f"a node of {args.gpus} GPUs" if args.gpus > 1 else "one GPU"
    bests = [r.ranking.best for r in rows if r.ranking.best is not None]
    labels = {row.name: f"{args.gpus}x {row.name}" if args.gpus > 1 else row.name for row in rows}
    gpu_width = max([10, *map(len, labels.values())])
    width = max([len("configuration")] + [len(b.label()) for b in bests])
    layout_width = max([len("best layout")] + [len(b.layout.label()) for b in bests])
    lines = [
        f"Predicted (a performance model, not a measurement) for {args.model}, {workload}, SLO {slo.describe()}, "
        f"{node} per GPU type:",
        "",
        f"{'GPU':<{gpu_width}} {'best layout':<{layout_width}} {'configuration':<{width}} {'node req/s':>10} "
        f"{'node tok/s':>10} {'tok/s/GPU':>9} {'tok/s/kW†':>9} {'$/1M out':>8}  figures",
    ]
    notes: list[str] = []
    for row in rows:
        r = row.ranking
        gpu = labels[row.name]
        best = r.best
        if best is None:
            lines.append(f"{gpu:<{gpu_width}} {why_no_best(r)}  ({_kind_short(r)})")
            notes += _notes(row)
            continue
        f = best.figures
        per_kw = "" if f.tokens_per_s_per_kw is None else f"{f.tokens_per_s_per_kw:,.0f}"
        lines.append(
            f"{gpu:<{gpu_width}} {best.layout.label():<{layout_width}} {best.label():<{width}} {f.capacity:>10.2f} "
            f"{f.output_tokens_per_s or 0:>10,.0f} {f.per_gpu or 0:>9,.0f} {per_kw:>9} "
            f"{_money(f.cost_per_million_tokens):>8}  {_kind_short(r)}" + (" *" if row.calibration else "")
        )
        notes += _notes(row)
    lines += ["", *notes]
    lines.append(
        "† tok/s/kW over the GPUs' board power (not measured); $/1M pays for every GPU of the node, idle ones "
        "included."
    )
    lines.append(
        "aiconfigurator's own error against a real H100 was 4-18 % (REFERENCE.md): rank with it, then measure "
        "the winner with infertop tune."
    )
    return "\n".join(lines)


def _notes(row: GpuRow) -> list[str]:
    """What stands under the table for one GPU type: where its figures come from and how it was ranked."""
    r = row.ranking
    says_kind = r.source.startswith(r.kind) or "EMPIRICAL" in r.source
    source = r.source if says_kind else f"{r.kind}: {r.source}"
    notes = [f"  {row.name}: {source}"]
    if r.note:
        notes.append(f"  {row.name}: {r.note}")
    best = r.best
    if best is not None:
        point = best.point
        server = (
            f"each replica {best.server_capacity:.2f} req/s at {point.concurrency} requests in flight, "
            f"{point.tokens_per_s_per_user:.1f} tok/s per user"
        )
        if not r.is_ceiling:
            server += f", TTFT {point.ttft_s * 1000:.0f} ms"
        notes.append(f"  {row.name}: {r.fitting} of {r.predicted} candidates fit; {server}")
        others = [
            f"{e.layout.label()} {e.figures.capacity:.1f} req/s"
            + (
                ""
                if e.figures.cost_per_million_tokens is None
                else f" ${e.figures.cost_per_million_tokens:.3f}"
            )
            for e in r.best_per_layout(5)[1:]
        ]
        if others:
            notes.append(f"  {row.name}: other layouts: {'; '.join(others)}")
    if row.calibration is not None:
        c = row.calibration
        notes.append(
            f"  * {row.name}: req/s, tok/s and cost x{c.ratio:.2f}, the ratio measured/predicted over {c.trials} "
            f"trials of the tune in {c.source}"
        )
    notes += [f"  {row.name}: not predicted: {reason}" for reason in r.skipped[:2]]
    return notes


def _to_json(args: argparse.Namespace, rows: list[GpuRow], slo: Slo) -> dict[str, Any]:
    return {
        "kind": "prediction (a performance model, not a measurement)",
        "model": str(args.model),
        "workload": {"input_len": args.input_len, "output_len": args.output_len},
        "slo": slo.describe(),
        "node_gpus": args.gpus,
        "gpus": [_row_json(row, slo) for row in rows],
    }


def _row_json(row: GpuRow, slo: Slo) -> dict[str, Any]:
    r = row.ranking
    best = r.best
    return {
        "gpu": row.name,
        "gpu_model": r.gpu,
        "system": r.system,
        "node_gpus": r.node_gpus,
        "figures": r.kind,
        "source": r.source,
        "note": r.note or None,
        "error": why_no_best(r) if best is None else None,
        "candidates_predicted": r.predicted,
        "candidates_fitting": r.fitting,
        "not_predicted": list(r.skipped),
        "price_per_gpu_hour": row.price_per_gpu_hour,
        "calibration": None
        if row.calibration is None
        else {
            "ratio": row.calibration.ratio,
            "trials": row.calibration.trials,
            "report": row.calibration.source,
        },
        "best": None if best is None else {**best.to_dict(), "prediction": best.prediction.to_dict(slo)},
        "layouts": [e.to_dict() for e in r.best_per_layout(5)],
    }
