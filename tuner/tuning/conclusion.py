"""How a tuning run ends in words and files: the result's first line (the headline and the exit code), the
exported ``vllm serve --config`` text, and the report document (format infertop-tune-report, version 2)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from tuner.predict.base import Prediction, Workload
from tuner.predict.roofline import decode_ceiling_tokens_per_s
from tuner.serving.affinity import CpuPlan
from tuner.tuning.capacity import ties_with
from tuner.tuning.config import TuneConfig
from tuner.tuning.export import to_vllm_yaml
from tuner.tuning.layout import Layout, NodeCapacity
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.outcome import TrialOutcome
from tuner.tuning.points import RATE, USERS
from tuner.tuning.space import Candidate, SearchSpace
from tuner.tuning.store import TrialStatus
from tuner.tuning.verdict import EXIT_INTERRUPTED, EXIT_NO_CONFIG, Contender, Verdict


class RunView(Protocol):
    """What the end of a run reads of the tuner (tuner.tuning.tune.Tuner)."""

    config: TuneConfig
    objective: str
    hardware: Hardware
    hardware_label: str
    cpu_plan: CpuPlan
    launches: int
    note: str | None
    prediction_note: str
    predictions: dict[str, Prediction]
    shape: ModelShape
    space: SearchSpace
    vocab_size: int

    def capacity_of(self, outcome: TrialOutcome) -> NodeCapacity: ...
    def distance(self, outcome: TrialOutcome) -> int: ...
    def label(self, candidate: Candidate) -> str: ...
    def layout(self, candidate: Candidate) -> Layout: ...
    def predicted_capacity(self, candidate: Candidate) -> float | None: ...


LOAD_MODELS = {RATE: "Poisson arrivals (open loop)"}
CLOSED_LOOP = "concurrent users (closed loop)"


def run_headline(
    tuner: RunView,
    verdict: Verdict | None,
    contenders: list[Contender],
    stopped: str | None,
    error: str | None,
    outcomes: Mapping[str, TrialOutcome],
) -> tuple[str, int]:
    """The result's first line and the exit code it comes with (see the CLI's --help)."""
    if error is not None:
        return f"NO CONFIGURATION: {error}", EXIT_NO_CONFIG
    if verdict is not None:
        code = verdict.exit_code if stopped is None else EXIT_INTERRUPTED
        return verdict.headline, code
    if stopped == "interrupted":
        what = f"; best so far {contenders[0].label}, NOT PROVEN" if contenders else ""
        return (
            f"INTERRUPTED: trials kept in {tuner.config.store_path} (--resume carries on){what}",
            EXIT_INTERRUPTED,
        )
    reasons = [o.reason for o in outcomes.values() if o.status is not TrialStatus.FEASIBLE][:2]
    return (
        "NO CONFIGURATION met the SLO ("
        + tuner.config.slo.describe()
        + ")"
        + (": " + "; ".join(reasons) if reasons else ""),
        EXIT_NO_CONFIG,
    )


def export_text(
    tuner: RunView,
    contender: Contender,
    status_line: str,
    *,
    replica: tuple[int, tuple[int, ...], int] | None = None,
    data_parallel: int | None = None,
) -> str:
    """The exported file, its header opening with ``status_line`` (the verdict, or that it is pending).

    ``replica`` (its number, GPUs and port) writes one replica's file of a layout of several: its port in the
    file, its GPUs in the header (vLLM's config cannot set CUDA_VISIBLE_DEVICES). ``data_parallel`` writes the
    layout as one server whose replicas are data-parallel ranks."""
    cfg = tuner.config
    best = contender.capacity.best
    assert best is not None
    load_model = LOAD_MODELS.get(tuner.objective, CLOSED_LOOP)
    node = []
    if data_parallel:
        node.append(
            f"Layout: one server, --data-parallel-size {data_parallel} x TP "
            f"{contender.candidate.tensor_parallel_size or 1}, on all the node's GPUs ({tuner.hardware_label})"
        )
    elif contender.replicas > 1:
        node.append(
            f"Layout: {contender.replicas} replicas of this configuration on {tuner.hardware_label}; "
            "start them all with serve-node.sh (one server per replica, each on its own GPUs and port)"
        )
    if replica is not None:
        number, gpus, _ = replica
        node.append(
            f"Replica {number}: run with CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))}"
        )
    return to_vllm_yaml(
        cfg.model,
        contender.candidate,
        extra=(
            {"port": replica[2]}
            if replica is not None
            else {"data-parallel-size": data_parallel}
            if data_parallel
            else None
        ),
        comment_lines=[
            status_line,
            *node,
            f"SLO: {cfg.slo.describe()} (judged at {cfg.slo.judged_at} with {cfg.confidence:.0%} intervals)",
            f"Measured on {tuner.hardware_label}: {'one replica: ' if contender.replicas > 1 else ''}capacity "
            f"{contender.capacity.describe()} of {load_model}, "
            f"{best.output_tokens_per_s:,.0f} output tok/s{' per replica' if contender.replicas > 1 else ''} "
            f"({cfg.input_len} in / {cfg.output_len} out tokens"
            + (" on average" if cfg.workload else "")
            + ")",
            *([f"Workload: {cfg.workload.describe()}"] if cfg.workload else []),
        ],
    )


def build_report(
    tuner: RunView,
    outcomes: Mapping[str, TrialOutcome],
    ranked: list[TrialOutcome],
    defaults: Candidate,
    started: float,
    stopped: str | None,
    verdict: Verdict | None,
    headline: str,
    exit_code: int,
) -> dict[str, Any]:
    """The run as one JSON-able document (format infertop-tune-report, version 2)."""
    cfg = tuner.config
    slo = cfg.slo
    trials = []
    for key, o in outcomes.items():
        trials.append(
            {
                "key": key,
                "label": tuner.label(o.candidate),
                "config": o.candidate.config_dict(),
                "status": o.status.value,
                "reason": o.reason,
                "log_tail": o.log_tail or None,
                "is_defaults": key == defaults.key(),
                "startup_s": o.startup_s,
                "distance_from_defaults": tuner.distance(o),
                "capacity": o.capacity.to_dict() if o.capacity else None,
                "predicted": tuner.predicted_capacity(o.candidate),
                "prediction": _prediction_summary(tuner, o.candidate),
                "roofline": _roofline(tuner, o),
                "layout": tuner.layout(o.candidate).to_dict(),
                "node_capacity": tuner.capacity_of(o).lo if o.feasible and o.capacity else None,
            }
        )
    rank_keys = [o.candidate.key() for o in ranked]
    ties = []
    if len(ranked) > 1 and ties_with(
        tuner.capacity_of(ranked[0]), tuner.capacity_of(ranked[1]), cfg.resolution
    ):
        ties.append(
            f"{tuner.label(ranked[0].candidate)} and {tuner.label(ranked[1].candidate)} tie within the "
            "uncertainty of their capacities; the one closer to vLLM's defaults ranks first"
        )
    return {
        "format": "infertop-tune-report",
        "version": 2,
        "headline": headline,
        "exit_code": exit_code,
        "model": cfg.model,
        "hardware": tuner.hardware.to_dict(),
        "hardware_label": tuner.hardware_label,
        "gpus": tuner.hardware.gpu_count,
        "slo": {**slo.to_dict(), "describe": slo.describe(), "judged_at": slo.judged_at},
        "objective": tuner.objective,
        "workload": {
            "input_len": cfg.input_len,
            "output_len": cfg.output_len,
            "workload": cfg.workload.to_dict() if cfg.workload else None,
            "vocab_size": tuner.vocab_size,
            "load_model": "Poisson arrivals (open loop)"
            if tuner.objective == RATE
            else "concurrent users (closed loop)",
            "confidence": cfg.confidence,
            "min_phase_s": cfg.min_phase_s,
            "min_requests": cfg.min_requests,
            "max_requests": cfg.max_requests,
            "resolution": cfg.resolution,
        },
        "cpu": tuner.cpu_plan.note,
        "started_s": started,
        "finished_s": time.time(),
        "launches": tuner.launches,
        "grid_size": len(tuner.space.feasible()),
        "budget_note": tuner.note,
        "prediction": tuner.prediction_note or None,
        "trials": trials,
        "ranking": rank_keys,
        "ties": ties,
        "winner": verdict.chosen.candidate.key()
        if verdict and verdict.chosen
        else (rank_keys[0] if rank_keys else None),
        "defaults": defaults.key() if defaults.key() in outcomes else None,
        "verdict": verdict.to_dict() if verdict else None,
        "price_per_gpu_hour": cfg.price_per_gpu_hour,
        "interrupted": stopped == "interrupted",
    }


def _prediction_summary(tuner: RunView, candidate: Candidate) -> dict[str, Any] | None:
    """The model's figures at its predicted capacity for ``candidate`` (None: not predicted)."""
    prediction = tuner.predictions.get(candidate.key())
    if prediction is None:
        return None
    point = prediction.at_capacity(tuner.config.slo, tuner.objective) if prediction.fits else None
    return {
        "source": prediction.source,
        "fits": prediction.fits,
        "reason": prediction.reason,
        "concurrency": None if point is None else point.concurrency,
        "output_tokens_per_s": None if point is None else point.output_tokens_per_s,
        "ttft_s": None if point is None else point.ttft_s,
        "tpot_s": None if point is None else point.tpot_s,
    }


def _roofline(tuner: RunView, o: TrialOutcome) -> dict[str, Any] | None:
    """The trial's best load against the decode ceiling of the GPU's memory bandwidth at the same number of
    requests in flight (REFERENCE.md's roofline; None on the CPU build or an unknown GPU)."""
    best = o.capacity.best if o.feasible and o.capacity else None
    if best is None or tuner.hardware.is_cpu:
        return None
    in_flight = (
        best.load.users_count if best.load.kind == USERS else best.evidence.get("requests_running_mean")
    )
    if not in_flight:
        return None
    concurrency = max(1, round(float(in_flight)))
    workload = Workload(tuner.config.input_len, tuner.config.output_len)
    ceiling = decode_ceiling_tokens_per_s(o.candidate, tuner.shape, tuner.hardware, workload, concurrency)
    if not ceiling:
        return None
    return {
        "concurrency": concurrency,
        "ceiling_tokens_per_s": ceiling,
        "pct_of_ceiling": 100.0 * best.output_tokens_per_s / ceiling,
    }
