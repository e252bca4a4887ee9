"""``infertop predict``: which GPU, which configuration and what cost per token, before renting anything.

For each GPU type, every candidate of the tuner's search space is predicted by NVIDIA's aiconfigurator (the
``predict`` extra), and the best under the SLO is shown with its capacity and, given a price per GPU-hour, its
cost per million output tokens. Predictions are a performance model's, not measurements: ``infertop tune`` on
the machine measures them.
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

from tuner.predict import aic
from tuner.predict.base import PredictError, Prediction, Workload
from tuner.predict.roofline import decode_ceiling_tokens_per_s
from tuner.telemetry import gpus
from tuner.tuning.modelshape import ModelShape, SpaceError
from tuner.tuning.slo import SloError, parse_slo
from tuner.tuning.space import Candidate, default_space

DEFAULT_SLO = "mlperf-llama3.1-8b-server"
DEFAULT_GPUS = "h100,h200,a100,l40s,b200"


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop predict",
        description="Predict the best vLLM configuration, its capacity under an SLO and its cost per token on "
        "each GPU type, from NVIDIA's aiconfigurator (pip install 'infertop[predict]'). A model's estimate, "
        "not a measurement: infertop tune measures.",
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
        help="GPUs in the machine: tensor parallelism up to N (default 1)",
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


@dataclass
class GpuResult:
    """The best predicted configuration on one GPU type (or why there is none)."""

    gpu: str
    system: str | None
    gpus: int
    best: Candidate | None = None
    prediction: Prediction | None = None
    predicted: int = 0  # candidates the model could predict
    fitting: int = 0  # ... of which fit in memory
    skipped: tuple[str, ...] = ()  # why others could not be predicted (distinct reasons)
    error: str = ""  # no prediction at all
    ceiling_tokens_per_s: float | None = None  # the decode roofline at batch 1, for GPUs without data
    price_per_gpu_hour: float | None = None
    calibration: Calibration | None = None  # a local tune's measured/predicted, applied to the figures

    @property
    def scale(self) -> float:
        return self.calibration.ratio if self.calibration is not None else 1.0


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


def run_predict_cli(argv: Sequence[str]) -> int:
    args = predict_parser().parse_args(argv)
    try:
        slo = parse_slo(args.slo)
        workload = Workload(args.input_len, args.output_len)
        shape = ModelShape.from_dir(args.model)
        prices = _prices(args.price)
        systems = _systems(args.gpu)
        if args.gpus < 1:
            raise PredictError(f"--gpus must be >= 1, got {args.gpus}")
        calibration = Calibration.from_report(args.calibrate) if args.calibrate else None
    except (SloError, SpaceError, PredictError) as exc:
        print(f"infertop predict: {exc}", file=sys.stderr)
        return 2
    if not aic.available():
        print(f"infertop predict: no performance model installed: {aic.INSTALL_HINT}", file=sys.stderr)
        return 2
    results = [
        _predict_gpu(Path(args.model), shape, alias, system, args.gpus, workload, slo, prices.get(alias))
        for alias, system in systems
    ]
    for result in results:
        if calibration is not None and result.system == calibration.system:
            result.calibration = calibration
    if args.json:
        print(json.dumps(_to_json(args, results, slo), indent=2))
    else:
        print(_table(args, results, slo))
    return 0 if any(r.best is not None for r in results) else 1


def _predict_gpu(
    model_dir: Path,
    shape: ModelShape,
    alias: str,
    system: str | None,
    count: int,
    workload: Workload,
    slo: Any,
    price: float | None,
) -> GpuResult:
    result = GpuResult(alias, system, count, price_per_gpu_hour=price)
    if system is None:
        hardware = aic.hardware_for(alias, None, count)
        result.error = f"aiconfigurator {aic.package_version()} has no measured data for {alias.upper()}"
        result.ceiling_tokens_per_s = decode_ceiling_tokens_per_s(Candidate(), shape, hardware, workload, 1)
        return result
    try:
        model = aic.AiconfiguratorModel(model_dir, shape, system)
    except PredictError as exc:
        result.error = str(exc)
        return result
    hardware = aic.hardware_for(system, model, count)
    try:
        space = default_space(shape, hardware)
    except SpaceError as exc:
        result.error = str(exc)
        return result
    reasons: list[str] = []
    best_value = 0.0
    for candidate in space.candidates():
        try:
            prediction = model.predict(candidate, hardware, workload)
        except PredictError as exc:
            if str(exc) not in reasons:
                reasons.append(str(exc))
            continue
        result.predicted += 1
        if not prediction.fits:
            continue
        result.fitting += 1
        value = prediction.capacity(slo, "rate")
        # Strictly better only: of equal predictions the first (fewest flags set, as the space orders them) stays.
        if value > best_value * 1.0001:
            best_value, result.best, result.prediction = value, candidate, prediction
    result.skipped = tuple(reasons)
    if result.best is None and not result.error:
        result.error = (
            "no configuration fits in memory" if result.fitting == 0 else "no configuration meets the SLO"
        )
    return result


def _prices(spec: str) -> dict[str, float]:
    prices: dict[str, float] = {}
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or price <= 0:
            raise PredictError(f"--price takes GPU=USD per GPU-hour, e.g. h100=2.5; got {item!r}")
        prices[name.strip().lower()] = price
    return prices


def _systems(spec: str) -> list[tuple[str, str | None]]:
    """(the name as typed, aiconfigurator's system or None for a GPU we know without its data)."""
    found: list[tuple[str, str | None]] = []
    for name in (p.strip().lower() for p in spec.split(",") if p.strip()):
        if name in aic.ALIASES:
            found.append((name, aic.ALIASES[name]))
        elif gpus.lookup(name) is not None:
            found.append((name, None))
        else:
            raise PredictError(
                f"unknown GPU {name!r}: try {', '.join(sorted(set(aic.ALIASES) - set(aic.SYSTEMS.values())))}"
            )
    if not found:
        raise PredictError("--gpu names no GPU")
    return found


def _cost_per_million(result: GpuResult, tokens_per_s: float | None) -> float | None:
    """USD per million output tokens of the GPUs the server uses (its tensor-parallel ranks) at capacity."""
    if result.price_per_gpu_hour is None or not tokens_per_s or result.best is None:
        return None
    used = result.best.tensor_parallel_size or 1
    return result.price_per_gpu_hour * used / (tokens_per_s * 3600.0) * 1e6


def _label(candidate: Candidate) -> str:
    return candidate.label() if candidate.config_dict() else "vLLM defaults"


def _table(args: argparse.Namespace, results: list[GpuResult], slo: Any) -> str:
    workload = f"{args.input_len} in / {args.output_len} out"
    width = max([len("best configuration")] + [len(_label(r.best)) for r in results if r.best is not None])
    lines = [
        f"Predicted (a performance model, not a measurement) for {args.model}, {workload}, SLO {slo.describe()}:",
        "",
        f"{'GPU':<10} {'best configuration':<{width}} {'req/s':>7} {'out tok/s':>10} {'TTFT':>8} {'tok/s/user':>10} "
        f"{'$/1M out':>9}",
    ]
    notes: list[str] = []
    for r in results:
        gpu = f"{r.gpus}x {r.gpu}" if r.gpus > 1 else r.gpu
        if r.best is None or r.prediction is None:
            detail = r.error
            if r.ceiling_tokens_per_s is not None:
                detail += (
                    f"; decode ceiling at 1 request {r.ceiling_tokens_per_s:,.0f} tok/s (bandwidth roofline)"
                )
            lines.append(f"{gpu:<10} {detail}")
            continue
        point = r.prediction.at_capacity(slo)
        assert point is not None
        tok_s = point.output_tokens_per_s * r.scale
        cost = _cost_per_million(r, tok_s)
        gpu = f"{r.best.tensor_parallel_size or 1}x {r.gpu}"
        lines.append(
            f"{gpu:<10} {_label(r.best):<{width}} {point.requests_per_s(r.prediction.workload) * r.scale:>7.2f} "
            f"{tok_s:>10,.0f} {point.ttft_s * 1000:>6.0f}ms {point.tokens_per_s_per_user:>10.1f} "
            f"{'' if cost is None else f'{cost:.3f}':>9}" + (" *" if r.calibration else "")
        )
        if r.calibration is not None:
            c = r.calibration
            notes.append(
                f"  * {r.gpu}: req/s, tok/s and cost x{c.ratio:.2f}, the ratio measured/predicted over {c.trials} "
                f"trials of the tune in {c.source}"
            )
        notes.append(
            f"  {r.gpu}: {r.fitting} of {r.predicted} candidates fit; at capacity {point.concurrency} requests in "
            f"flight; {r.prediction.source}"
        )
        notes += [f"  {r.gpu}: not predicted: {reason}" for reason in r.skipped[:2]]
    lines += ["", *notes]
    lines.append(
        "aiconfigurator's own error against a real H100 was 4-18 % (REFERENCE.md): rank with it, then measure "
        "the winner with infertop tune."
    )
    return "\n".join(lines)


def _to_json(args: argparse.Namespace, results: list[GpuResult], slo: Any) -> dict[str, Any]:
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "gpu": r.gpu,
            "system": r.system,
            "gpus": r.gpus,
            "error": r.error or None,
            "candidates_predicted": r.predicted,
            "candidates_fitting": r.fitting,
            "not_predicted": list(r.skipped),
            "price_per_gpu_hour": r.price_per_gpu_hour,
            "decode_ceiling_tokens_per_s_at_1": r.ceiling_tokens_per_s,
            "best": None,
        }
        if r.best is not None and r.prediction is not None:
            point = r.prediction.at_capacity(slo)
            assert point is not None
            row["best"] = {
                "config": r.best.config_dict(),
                "label": r.best.label(),
                "requests_per_s": point.requests_per_s(r.prediction.workload) * r.scale,
                "concurrency": point.concurrency,
                "output_tokens_per_s": point.output_tokens_per_s * r.scale,
                "ttft_s": point.ttft_s,
                "tpot_s": point.tpot_s,
                "cost_per_million_output_tokens": _cost_per_million(r, point.output_tokens_per_s * r.scale),
                "prediction": r.prediction.to_dict(slo),
            }
            row["calibration"] = (
                None
                if r.calibration is None
                else {
                    "ratio": r.calibration.ratio,
                    "trials": r.calibration.trials,
                    "report": r.calibration.source,
                }
            )
        rows.append(row)
    return {
        "kind": "prediction (a performance model, not a measurement)",
        "model": str(args.model),
        "workload": {"input_len": args.input_len, "output_len": args.output_len},
        "slo": slo.describe(),
        "gpus": rows,
    }
