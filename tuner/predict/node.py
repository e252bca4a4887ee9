"""Predicted layouts of a node, ranked by what the whole node serves.

For one GPU type and a node of ``node_gpus`` such GPUs, every candidate of the tuner's search space is predicted
(one server's curve), and each candidate with tensor parallelism ``tp`` fills the node as ``node_gpus // tp``
replicas (:mod:`tuner.tuning.layout`: idle GPUs count as lost). The layouts are ranked by the node's predicted
capacity, so eight TP-1 servers beat one TP-8 server when they serve more together.

Where the figures come from, said in :attr:`NodeRanking.kind` and every prediction's ``source``:

- ``"aiconfigurator SILICON"``: NVIDIA aiconfigurator from timings measured on that GPU;
- ``"aiconfigurator EMPIRICAL (...)"``: for a GPU it has no measured data for (L4, H100 PCIe, A30, A100 PCIe),
  aiconfigurator's speed of light for that GPU times the measured efficiency of a GPU of the same architecture
  (:mod:`tuner.predict.aic`); an estimate transferred across GPUs, and :attr:`NodeRanking.note` says so;
- ``"roofline ceiling, not a prediction"``: the memory-bandwidth ceiling of decoding
  (:mod:`tuner.predict.roofline`) where aiconfigurator is not installed or cannot model the GPU; it has no TTFT
  and no compute limit, so it ranks by what the node could at most serve, and :attr:`NodeRanking.note` says why.

No printing and no arguments here: ``infertop predict`` and ``infertop tune --dry-run`` both call
:func:`rank_layouts`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.predict import aic
from tuner.predict.base import Estimate, PredictError, Prediction, Workload, ladder
from tuner.predict.roofline import decode_ceiling_tokens_per_s
from tuner.telemetry import gpus
from tuner.tuning.layout import Layout, NodeFigures, layout_for, node_figures
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.slo import Slo
from tuner.tuning.space import Candidate, SearchSpace, default_space, estimate_max_concurrency

__all__ = ["ROOFLINE_KIND", "NodeRanking", "RankedLayout", "rank_layouts", "roofline_prediction"]

ROOFLINE_KIND = "roofline ceiling, not a prediction"
OBJECTIVES = ("rate", "users")


@dataclass(frozen=True, slots=True)
class RankedLayout:
    """One candidate laid out on the node, with its server's prediction and the node's figures."""

    candidate: Candidate
    prediction: Prediction
    layout: Layout
    figures: NodeFigures  # the node's: capacity, tokens/s, per GPU, per kW, $/1M
    server_capacity: float  # one replica's, in the objective's unit (calibrated when a scale was given)
    point: Estimate  # the server's curve point at that capacity (TTFT, TPOT: not scaled)

    def label(self) -> str:
        """The configuration's flags, or "vLLM defaults" when it sets none."""
        return self.candidate.label() if self.candidate.config_dict() else "vLLM defaults"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the layout, the configuration, one server's figures and the node's."""
        return {
            "layout": self.layout.label(),
            "config": self.candidate.config_dict(),
            "label": self.label(),
            "server": {
                "capacity": self.server_capacity,
                "concurrency": self.point.concurrency,
                "ttft_s": self.point.ttft_s,
                "tpot_s": self.point.tpot_s,
                "source": self.prediction.source,
            },
            "node": self.figures.to_dict(),
        }


@dataclass(frozen=True)
class NodeRanking:
    """A node of ``node_gpus`` GPUs of one type: its layouts ranked by predicted node capacity, best first."""

    gpu: str  # the GPU table's name: "H100 SXM", "L4"
    system: str | None  # aiconfigurator's system name, None for a GPU it has none for
    kind: str  # "aiconfigurator SILICON", "aiconfigurator EMPIRICAL (...)" or ROOFLINE_KIND
    source: str  # the predictions' source in full
    node_gpus: int
    objective: str  # "rate" (requests/s) or "users" (concurrent requests)
    layouts: tuple[RankedLayout, ...] = ()  # every candidate that fits and meets the SLO, best first
    predicted: int = 0  # candidates the model could predict
    fitting: int = 0  # ... of which fit in memory
    skipped: tuple[str, ...] = ()  # why others could not be predicted (distinct reasons)
    note: str = ""  # why the roofline stands in, or how far EMPIRICAL figures go; else ""
    error: str = ""  # why nothing could be ranked, else ""

    @property
    def best(self) -> RankedLayout | None:
        return self.layouts[0] if self.layouts else None

    @property
    def is_ceiling(self) -> bool:
        """The figures are the bandwidth roofline's: a ceiling, not a prediction."""
        return self.kind == ROOFLINE_KIND

    def best_per_layout(self, count: int | None = None) -> list[RankedLayout]:
        """The best candidate of each distinct layout ("8 x TP 1", "1 x TP 8", ...), in rank order."""
        seen: set[str] = set()
        found: list[RankedLayout] = []
        for entry in self.layouts:
            label = entry.layout.label()
            if label not in seen:
                seen.add(label)
                found.append(entry)
        return found if count is None else found[:count]


def rank_layouts(
    model_dir: str | Path,
    shape: ModelShape,
    gpu: str,
    node_gpus: int,
    workload: Workload,
    slo: Slo,
    *,
    objective: str = "rate",
    price_per_gpu_hour: float | None = None,
    pins: Mapping[str, Any] | None = None,
    values: Mapping[str, tuple[Any, ...]] | None = None,
    space: SearchSpace | None = None,
    capacity_scale: float = 1.0,
) -> NodeRanking:
    """Predict every candidate on a node of ``node_gpus`` GPUs of type ``gpu`` and rank the layouts.

    ``gpu``: a name as typed after ``--gpu`` ("h100", "l4") or as NVML reports it ("NVIDIA L4"). The search
    space is ``space`` when given (the tuner's own), else :func:`~tuner.tuning.space.default_space` with
    ``pins``, tensor parallelism over every size up to the node that the model's heads divide, and ``values``
    replacing any dimension's ladder. ``capacity_scale``: a measured/predicted ratio from a tune on this GPU
    type (1: the model's own figures); it scales capacities and tokens/s, not the order. Ties go to fewer
    flags set, then to smaller tensor parallelism.

    Raises:
        PredictError: ``node_gpus`` < 1, an unknown objective or GPU (one line).
        SpaceError: ``pins`` that cannot run on this GPU.
    """
    if node_gpus < 1:
        raise PredictError(f"a node has at least one GPU, got {node_gpus}")
    if objective not in OBJECTIVES:
        raise PredictError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    found = aic.model_for(gpu)
    known = gpus.lookup(aic.gpu_model_for(found[0]) if found is not None else gpu)
    if found is None and known is None:
        raise PredictError(f"unknown GPU {gpu!r}")
    model, note = _aiconfigurator(Path(model_dir), shape, found)
    system = found[0] if found is not None else None
    hardware = _hardware(system, model, known, node_gpus)
    if space is None:
        space = _node_space(shape, hardware, pins, values)
    elif values:
        space = SearchSpace(shape, space.hardware, {**space.values, **values}, space.pins)
    kind = model.kind if model is not None else ROOFLINE_KIND
    source = model.source if model is not None else _roofline_source(hardware)
    board_power_w = known.tdp_w if known is not None else None
    ranked: list[tuple[tuple[float, int, int, int], RankedLayout]] = []
    reasons: list[str] = []
    predicted = fitting = 0
    for index, candidate in enumerate(space.candidates()):
        try:
            if model is not None:
                prediction = model.predict(candidate, space.hardware, workload)
            else:
                prediction = roofline_prediction(candidate, shape, space.hardware, workload)
        except PredictError as exc:
            if str(exc) not in reasons:
                reasons.append(str(exc))
            continue
        predicted += 1
        if not prediction.fits:
            continue
        fitting += 1
        entry = _laid_out(
            candidate,
            prediction,
            node_gpus,
            slo,
            objective,
            scale=capacity_scale,
            board_power_w=board_power_w,
            price_per_gpu_hour=price_per_gpu_hour,
        )
        if entry is None:
            continue
        ranked.append((_rank_key(entry, index), entry))
    ranked.sort(key=lambda pair: pair[0])
    layouts = tuple(entry for _, entry in ranked)
    error = ""
    if not layouts:  # what happened: "fits in memory" only where predictions said so
        if predicted == 0:
            error = f"nothing could be predicted: {reasons[0] if reasons else 'no candidate to predict'}"
        elif fitting == 0 and reasons:
            error = (
                f"none of the {predicted} configurations predicted fits in memory; "
                f"the others could not be predicted: {reasons[0]}"
            )
        elif fitting == 0:
            error = "no configuration fits in memory"
        else:
            error = "no configuration meets the SLO"
    name = known.model if known is not None else aic.gpu_model_for(system or gpu)
    return NodeRanking(
        name,
        system,
        kind,
        source,
        node_gpus,
        objective,
        layouts,
        predicted,
        fitting,
        tuple(reasons),
        note,
        error,
    )


def _aiconfigurator(
    model_dir: Path, shape: ModelShape, found: tuple[str, str] | None
) -> tuple[aic.AiconfiguratorModel | None, str]:
    """aiconfigurator's model for the GPU and, for EMPIRICAL figures, how far they go; or None and the one line
    that says why the roofline is used."""
    if found is None:
        return None, "aiconfigurator has no system description of this GPU"
    if not aic.available():
        return None, f"no performance model installed ({aic.INSTALL_HINT})"
    system, mode = found
    try:
        model = aic.AiconfiguratorModel(model_dir, shape, system, mode)
    except PredictError as exc:
        return None, str(exc)
    if model.reference is None or model.reference == system:
        return model, ""
    gpu, reference = aic.gpu_model_for(system), aic.gpu_model_for(model.reference)
    return model, (
        f"EMPIRICAL: an estimate transferred from {reference}'s measurements to the {gpu} (the same "
        f"architecture), not checked against a real {gpu}"
    )


def _hardware(
    system: str | None, model: aic.AiconfiguratorModel | None, known: gpus.KnownGpu | None, node_gpus: int
) -> Hardware:
    if system is not None:
        return aic.hardware_for(system, model, node_gpus)
    assert known is not None  # rank_layouts refused a GPU neither knows
    if known.memory_gb is None:
        raise PredictError(f"the GPU table does not know the memory of a {known.model}")
    return Hardware(known.model, node_gpus, int(known.memory_gb * 1e9), None)


def _node_space(
    shape: ModelShape,
    hardware: Hardware,
    pins: Mapping[str, Any] | None,
    values: Mapping[str, tuple[Any, ...]] | None,
) -> SearchSpace:
    """The default space with tensor parallelism over every size up to the node that the heads divide: a size
    that leaves GPUs idle is a layout too (it is ranked with those GPUs lost)."""
    space = default_space(shape, hardware, pins)
    sizes = [tp for tp in range(1, hardware.gpu_count + 1) if _heads_divide(shape, tp)]
    ladders = dict(space.values)
    ladders["tensor_parallel_size"] = tuple(sizes) if len(sizes) > 1 else (None,)
    ladders.update(values or {})
    return SearchSpace(shape, hardware, ladders, space.pins)


def _heads_divide(shape: ModelShape, tp: int) -> bool:
    """vLLM's rule: TP divides the attention heads, and the KV heads divide TP or TP divides them."""
    kv = shape.num_kv_heads
    return shape.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def _laid_out(
    candidate: Candidate,
    prediction: Prediction,
    node_gpus: int,
    slo: Slo,
    objective: str,
    *,
    scale: float,
    board_power_w: float | None,
    price_per_gpu_hour: float | None,
) -> RankedLayout | None:
    """The candidate on the node with its server's capacity and the node's figures (None: no load meets the SLO,
    or not one replica fits the node)."""
    point = prediction.at_capacity(slo, objective)
    layout = layout_for(candidate.tensor_parallel_size, node_gpus)
    capacity = prediction.capacity(slo, objective) * scale
    if point is None or capacity <= 0 or not layout.fits:
        return None
    figures = node_figures(
        layout,
        capacity,
        point.output_tokens_per_s * scale,
        board_power_w=board_power_w,
        price_per_gpu_hour=price_per_gpu_hour,
    )
    return RankedLayout(candidate, prediction, layout, figures, capacity, point)


def _rank_key(entry: RankedLayout, index: int) -> tuple[float, int, int, int]:
    """Most node capacity first (equal within 0.01 %), then fewer flags set, smaller TP, the space's order."""
    bucket = -round(math.log(entry.figures.capacity) * 1e4)
    return (bucket, len(entry.candidate.config_dict()), entry.layout.tp, index)


def roofline_prediction(
    candidate: Candidate, shape: ModelShape, hardware: Hardware, workload: Workload
) -> Prediction:
    """The memory-bandwidth ceiling as a curve: at each concurrency the KV cache admits, the most output
    tokens/s decoding can reach (TPOT = concurrency / that). No TTFT (0: prefill is not modelled) and no
    compute limit: a ceiling, not a prediction, and its source says so."""
    source = _roofline_source(hardware)
    limit = estimate_max_concurrency(candidate, shape, hardware, workload.input_len, workload.output_len)
    if limit < 1:
        return Prediction(
            source, workload, fits=False, reason="no request fits in the KV cache", max_concurrency=0
        )
    curve = []
    for concurrency in ladder(limit):
        tokens_per_s = decode_ceiling_tokens_per_s(candidate, shape, hardware, workload, concurrency)
        if tokens_per_s is None:
            raise PredictError(f"no datasheet bandwidth for {hardware.gpu_name}: no roofline")
        curve.append(Estimate(concurrency, 0.0, concurrency / tokens_per_s, tokens_per_s))
    return Prediction(source, workload, True, tuple(curve), "the KV cache and max-num-seqs", limit)


def _roofline_source(hardware: Hardware) -> str:
    known = gpus.lookup(hardware.gpu_name)
    bandwidth = f", {known.peak_dram_bw_gbps:,.0f} GB/s" if known is not None else ""
    return f"{ROOFLINE_KIND} (memory bandwidth{bandwidth}; no TTFT, no compute limit)"
