"""``infertop tune --dry-run``: what the search would do on this machine, launching nothing.

It ranks the layouts (a candidate times how it fills the node) by predicted node capacity: aiconfigurator's
prediction where the ``predict`` extra covers the GPU, else the memory-bandwidth roofline's decode ceiling (a
ceiling, not a prediction: said so). It replays the search's first batches as the executor would pack them on
the node's GPUs (assuming the predictions hold, so later batches can only be guessed), and gives the launch budget
and the expected wall time one trial after another against side by side. Times are estimates from REFERENCE.md's
figures (an 8B model starts in 1-2.5 minutes on an H100; a trial measures for a few minutes), not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from tuner.predict.base import Workload
from tuner.predict.roofline import decode_ceiling_tokens_per_s
from tuner.tuning.config import TuneConfig
from tuner.tuning.layout import Layout
from tuner.tuning.modelshape import Hardware, ModelShape, weight_bytes
from tuner.tuning.placement import Node
from tuner.tuning.space import Candidate, estimate_max_concurrency
from tuner.tuning.strategy import PredictedStrategy, SearchView

GiB = 2**30
MEASURE_S = 180.0  # one trial's capacity search: scouting and 5-8 judged loads of 10-30 s (BENCHMARKS §6)
CPU_STARTUP_S = (
    90.0  # the CPU build on the 2-core machine: 66 s eager, ~105 s with compilation (REFERENCE.md)
)


class PlanView(SearchView, Protocol):
    """What the dry run reads of the tuner (tuner.tuning.tune.Tuner)."""

    config: TuneConfig
    objective: str
    hardware: Hardware
    hardware_label: str
    shape: ModelShape
    node: Node
    prediction_note: str

    def launch_budget(self, feasible: list[Candidate]) -> int: ...
    def predict_candidates(self, feasible: list[Candidate]) -> bool: ...
    def predicted_capacity(self, candidate: Candidate) -> float | None: ...
    def label(self, candidate: Candidate) -> str: ...
    def layout(self, candidate: Candidate) -> Layout: ...


@dataclass
class DryRun:
    hardware: str
    node_gpus: tuple[int, ...]
    parallel: int
    source: str  # where the ranking comes from, for people
    ranking: list[tuple[str, str, float | None, str]]  # (candidate label, layout, node value, unit)
    batches: list[list[str]]  # the first batches: "label as layout on GPUs 0-3"
    budget: int
    launches: int  # launches the search expects (at most the budget)
    trial_s: float
    serial_s: float
    parallel_s: float
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        unit = self.ranking[0][3] if self.ranking else ""
        lines = [
            f"infertop tune --dry-run: nothing is launched. On {self.hardware}"
            + (f", GPUs {','.join(map(str, self.node_gpus))}" if self.node_gpus else "")
            + f"; up to {self.parallel} trial{'s' if self.parallel != 1 else ''} at once.",
            "",
            f"Layouts ranked by the node's {unit} ({self.source}):",
        ]
        width = max([len(r[0]) for r in self.ranking[:12]] + [14])
        for label, layout, value, _ in self.ranking[:12]:
            shown = "n/a" if value is None else f"{value:,.3g}"
            lines.append(f"  {label:<{width}}  {layout:<22} {shown:>9}")
        if len(self.ranking) > 12:
            lines.append(f"  ... and {len(self.ranking) - 12} more")
        lines += ["", "First batches (as the executor packs them; later ones follow the measurements):"]
        for i, batch in enumerate(self.batches, 1):
            lines.append(f"  batch {i}:")
            lines.extend(f"    {entry}" for entry in batch)
        lines += [
            "",
            f"Launch budget {self.budget}; the search expects about {self.launches} launches.",
            f"Expected wall time (an estimate, ~{self.trial_s / 60:.1f} min per trial and the proof): "
            f"{self.serial_s / 60:.0f} min one trial after another, {self.parallel_s / 60:.0f} min side by side "
            f"on {self.parallel} slot{'s' if self.parallel != 1 else ''}.",
            *self.notes,
        ]
        return "\n".join(lines)


def plan_dry_run(tuner: PlanView, *, predict: bool = True) -> DryRun:
    """The dry run's plan; ``predict`` False skips the performance model (a quick estimate for the ETA)."""
    feasible = tuner.space.feasible()
    budget = tuner.launch_budget(feasible)
    if predict:
        tuner.predict_candidates(feasible)
    unit = "requests/s" if tuner.objective == "rate" else "concurrent users"
    predicted = any(tuner.predicted_capacity(c) for c in feasible)
    ranking: list[tuple[str, str, float | None, str]] = []
    if predicted:
        source = tuner.prediction_note
        values = {c.key(): tuner.predicted_node(c) for c in feasible}
    else:
        source = "memory-bandwidth roofline: a ceiling, not a prediction" + (
            f"; {tuner.prediction_note}" if tuner.prediction_note else ""
        )
        values = {c.key(): _roofline_node(tuner, c) for c in feasible}
        unit = "output tokens/s ceiling"
    for c in sorted(feasible, key=lambda c: -(values.get(c.key()) or 0.0)):
        ranking.append((tuner.label(c), tuner.layout(c).label(), values.get(c.key()), unit))
    batches, launches = _batches(tuner, feasible, budget, predicted)
    trial_s = _startup_s(tuner) + MEASURE_S
    waves = max(1, math.ceil(launches / max(1, tuner.parallel))) if launches else 0
    proof = trial_s if tuner.config.prove else 0.0
    return DryRun(
        hardware=tuner.hardware_label,
        node_gpus=tuner.node.gpus,
        parallel=tuner.parallel,
        source=source or "no prediction",
        ranking=ranking,
        batches=batches,
        budget=budget,
        launches=launches,
        trial_s=trial_s,
        serial_s=launches * trial_s + proof,
        parallel_s=_packed_s(tuner, batches, launches, trial_s) + proof
        if batches
        else waves * trial_s + proof,
        notes=[]
        if predicted
        else [
            "Without a performance model the search follows the evidence from vLLM's "
            "defaults: the launches after the first batch depend on what it measures."
        ],
    )


def _roofline_node(tuner: PlanView, candidate: Candidate) -> float | None:
    """The node's decode ceiling (output tokens/s) for a candidate: one server's at the requests its KV cache
    admits, times the replicas. None on the CPU build."""
    if tuner.hardware.is_cpu:
        return None
    cfg = tuner.config
    concurrency = max(
        1, estimate_max_concurrency(candidate, tuner.shape, tuner.hardware, cfg.input_len, cfg.output_len)
    )
    ceiling = decode_ceiling_tokens_per_s(
        candidate, tuner.shape, tuner.hardware, Workload(cfg.input_len, cfg.output_len), concurrency
    )
    return None if ceiling is None else ceiling * tuner.layout(candidate).replicas


def _batches(
    tuner: PlanView, feasible: list[Candidate], budget: int, predicted: bool
) -> tuple[list[list[str]], int]:
    """The first batches the search would start (assuming each trial measures what the model predicts), and the
    launches it would make in all."""
    node = Node(tuner.node.gpus, cpu_plan=tuner.node.cpu_plan)
    defaults = tuner.space.baseline()
    if not predicted:
        first = [
            f"{tuner.label(defaults)} as {tuner.layout(defaults).label()} (then every move its evidence argues for)"
        ]
        return [first], min(budget, max(1, len(feasible)))
    strategy = PredictedStrategy(tuner, {}, defaults)
    tried: set[str] = set()
    batches: list[list[str]] = []
    launches = 0
    while launches < budget and len(batches) < 6:
        proposals = strategy.propose(tried, None)
        if not proposals:
            break
        batch: list[str] = []
        taken = []
        for i, (candidate, _why) in enumerate(proposals):
            if launches >= budget or len(batch) >= tuner.parallel:
                break
            tp = candidate.tensor_parallel_size or 1
            placement = node.take(tp)
            if placement is None:
                if i == 0:
                    break
                continue
            taken.append((placement, candidate))
            tried.add(candidate.key())
            launches += 1
            batch.append(
                f"{tuner.label(candidate)} as {tuner.layout(candidate).label()} on {placement.label()}"
            )
        if not batch:
            break
        batches.append(batch)
        for placement, candidate in taken:
            node.release(placement)
            # As if it measured what the model predicts: the stop rule then says when the search would end.
            strategy.ranker.record(candidate.key(), tuner.predicted_node(candidate) or 0.0)
    return batches, launches


def _startup_s(tuner: PlanView) -> float:
    """One server's start-up: the CPU build's as measured here; on a GPU 60 s plus ~5 s per GiB of weights
    (an 8B model: ~2.5 min, REFERENCE.md's 110-160 s on an H100)."""
    if tuner.hardware.is_cpu:
        return CPU_STARTUP_S
    return 60.0 + 5.0 * weight_bytes(tuner.shape) / GiB


def _packed_s(tuner: PlanView, batches: list[list[str]], launches: int, trial_s: float) -> float:
    """Side by side: each batch takes one trial's time; launches beyond the replayed batches go as many at a
    time as the node's slots allow."""
    replayed = sum(len(b) for b in batches)
    rest = max(0, launches - replayed)
    return (len(batches) + math.ceil(rest / max(1, tuner.parallel))) * trial_s
