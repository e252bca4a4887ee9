"""SIMULATION: ranking layouts on a whole node, in a harder world than the model's own, serial against parallel.

    .venv/bin/python benchmarks/node_simulation.py [--seeds 20] [--json FILE] [--only SUBSTRING]
        [--strategies "SUBSTRING;SUBSTRING"] [--ms-per-minute N]

No GPU is used and no server is launched: this is a simulation. It complements real runs and never replaces
them; every figure it prints is SIMULATED.

The thing ranked is the LAYOUT: a candidate configuration with tensor parallelism ``tp`` fills a node of ``n``
GPUs as ``n // tp`` replicas (tuner.tuning.layout; idle GPUs are lost), and a layout is worth one server's
capacity times its replicas. Scenarios: Llama-3.1-8B on 8x H100 (TP 1/2/4/8), Llama-3.1-70B on 8x H100 (TP 4
x 2 against TP 8), Llama-3.1-8B on 8x L4 (TP 1/2/4/8) and Qwen2.5-32B on 8x H200 (TP 1/2/4/8).

The predictions are aiconfigurator's (tuner.predict.aic), made once per candidate. aiconfigurator 0.12 has no
measured L4 data and its EMPIRICAL database mode loads a view for ``l4`` but cannot predict with it (no data
directory): on the L4 the prediction is a roofline model written here (the decode ceiling of
tuner/predict/roofline.py at 73 % efficiency, the 152-of-208 tok/s seen on a real H100, plus compute, prefill
and PCIe all-reduce time), and its truth is that model distorted like the others.

The truth is harder than search_simulation.py's (where it is the prediction times a seeded error):
- the model's error depends on the load: per family of configurations (weights and KV precision, TP) a shared
  error (20 %) plus one that grows with the concurrency (a seeded slope per doubling above 16 requests in
  flight, mean -2 %, standard deviation 4 %), plus 8 % per configuration; TTFT has its own family error (20 %);
- what the model does not see has a real, structured effect: ``--max-num-batched-tokens`` is the prefill budget
  of a step, so prompts queue for it as the load grows (TTFT x (1 + u / (2 (1 - u))), u = the step budget's share
  the load needs: TTFT-limited configurations want a larger budget) while larger prefill chunks stall decoding
  (TPOT + 3 % per doubling above 2048: TPOT-limited ones want a smaller one); ``--gpu-memory-utilization`` sizes
  the KV cache, which holds less than predicted (a seeded 0.5-3 GiB per GPU of CUDA graphs and activation peaks
  the estimate misses), so KV-limited configurations gain from a larger fraction;
- launches fail although predicted to fit: 3 % at random, 10 % at memory fraction >= 0.95, 5 % at TP >= 4, and
  always when the real KV cache cannot hold one max-model-len sequence (vLLM refuses to start); a failed launch
  costs 50-100 % of its start-up time;
- time: each launch starts up in a seeded time (8B on H100 1-2.5 min, REFERENCE.md; 32B on H200 2-5 min; 8B
  on L4 1.5-3.5 min; 70B on H100 4-8 min) and measures for 3-5 min (the capacity search's phases).

A trial measures one replica (3 % noise); the node's figure is that times the replicas, as NodeCapacity has it.
Wall time is discrete-event: a trial holds ``tp`` of the node's GPUs from its launch to its end;
tuner.tuning.placement.pack_batch decides which of the wanted trials start when GPUs free up; the proof at the
end relaunches the pick as its whole layout, alone on the node (start-up + one measurement).

Strategies (vLLM's defaults first in each, at the smallest TP that fits where they do not fit one GPU; a launch
budget of a third of the grid, the tuner's default):
- serial, per server (today): one trial at a time, ranked by one server's capacity with the rule before issue
  16 (Ranker(config_error=0)): the bug, it picks TP 8 for an 8B model;
- serial, by node (old rule): the same search ranking layouts (predictions and measurements x replicas);
- serial, by node: ranking layouts with today's Ranker (a per-configuration error that does not shrink);
- parallel, by node (old rule) and parallel, by node: Ranker.next_batch (one per unexplored family first, then
  the best contenders) filling the free GPUs, pack_batch deciding what starts.
- grid, parallel: every candidate, packed on the node (the truth, at its cost);
- tuner (serial) and tuner (parallel): the real Tuner (tuner/tuning/tune.py ``_search``: PredictedStrategy,
  the Executor's thread per trial on a placement from a Node of 8 GPUs, the best proposal waiting for its GPUs;
  its tie rule and its separating load), ``--parallel`` 1 or 8, its trials answered by this world. A trial thread
  sleeps its start-up and measuring time (a failed launch 50-100 % of its start-up) on a virtual clock that moves
  only when the search loop waits and every started trial sleeps (``--ms-per-minute N``: real sleeps of N ms per
  simulated minute instead, wall = real time of the search / the scale); the proof (``prove=False`` in the Tuner)
  is added as one more start-up and measurement of the pick, alone. A trial's capacity is the measured one held
  and 10 % above it failing, with the evidence this world shows at its best load (KV cache full, a full batch,
  which limit broke), as search_simulation.py builds it.
Scored by the TRUE node capacity of the pick against the best true node capacity of the grid (a configuration
whose launch fails is worth 0). Goals (issue 16): >= 95 % of the best in >= 90 % of the seeds; simulated wall
time to PROVEN for 8B on 8x H100 at most a quarter of today's serial search. Prints Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.predict import aic
from tuner.predict.base import Estimate, PredictError, Prediction, Workload, ladder
from tuner.predict.rank import Ranker
from tuner.predict.roofline import decode_ceiling_tokens_per_s
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning import tune as tune_module
from tuner.tuning.capacity import Capacity, summarise
from tuner.tuning.executor import Done, Job
from tuner.tuning.executor import Executor as TrialExecutor
from tuner.tuning.layout import layout_for
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.placement import Node, Placement, pack_batch
from tuner.tuning.points import RATE, Load, Point, empty_steady
from tuner.tuning.slo import Slo, parse_slo
from tuner.tuning.space import Candidate, SearchSpace, default_space, estimate_memory, resolve
from tuner.tuning.store import TrialStatus
from tuner.tuning.tune import TrialOutcome, TuneConfig, Tuner

# search_simulation.py's shapes and workload, restated.
WORKLOAD = Workload(512, 256)
LLAMA_70B = {
    **LLAMA_3_1_8B,
    "hidden_size": 8192,
    "num_layers": 80,
    "num_heads": 64,
    "intermediate_size": 28672,
}
QWEN_32B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GiB = 1024**3
FAMILY_ERROR = 0.20
LOAD_SLOPE_MEAN, LOAD_SLOPE_SD = -0.02, 0.04  # log error per doubling of concurrency above 16
CONFIG_ERROR = 0.08
TTFT_FAMILY_ERROR = 0.20
MEASUREMENT_NOISE = 0.03
EXTRA_OVERHEAD_GIB = (0.5, 3.0)  # per GPU, per family: what the memory estimate misses
FAIL_RANDOM, FAIL_HIGH_MEMORY, FAIL_LARGE_TP = 0.03, 0.07, 0.02
MEASURE_S = (180.0, 300.0)
NODE_GPUS = 8
MS_PER_MINUTE = 0.0  # the tuner's trials: 0 on the virtual clock, else real ms slept per simulated minute

# The roofline model of an L4 (REFERENCE.md: 300 GB/s, 242 TFLOPS FP8 dense; bf16 half that; PCIe, no NVLink).
L4_BF16_FLOPS, L4_FP8_FLOPS, L4_MFU = 121e12, 242e12, 0.5
L4_DECODE_EFFICIENCY = 0.73  # 152 of a 208 tok/s ceiling on an H100 (REFERENCE.md)
L4_ALLREDUCE_LATENCY_S, L4_PCIE_BYTES_PER_S = 20e-6, 25e9


@dataclass(frozen=True)
class Scenario:
    name: str
    model: dict[str, Any]
    system: str  # aiconfigurator's system, or "l4" (the roofline model here)
    slo: str
    tensor_parallel: tuple[int, ...]
    startup_s: tuple[float, float]
    hf_config: bool = False


SCENARIOS = (
    Scenario(
        "Llama-3.1-8B, 8x H100",
        LLAMA_3_1_8B,
        "h100_sxm",
        "mlperf-llama3.1-8b-interactive",
        (1, 2, 4, 8),
        (60, 150),
    ),
    Scenario(
        "Llama-3.1-70B, 8x H100", LLAMA_70B, "h100_sxm", "mlperf-llama2-70b-interactive", (4, 8), (240, 480)
    ),
    Scenario(
        "Llama-3.1-8B, 8x L4 (roofline)",
        LLAMA_3_1_8B,
        "l4",
        "mlperf-llama3.1-8b-server",
        (1, 2, 4, 8),
        (90, 210),
    ),
    Scenario(
        "Qwen2.5-32B, 8x H200",
        QWEN_32B,
        "h200_sxm",
        "mlperf-llama3.1-8b-server",
        (1, 2, 4, 8),
        (120, 300),
        True,
    ),
)


def family(c: Candidate) -> tuple[Any, ...]:
    return (c.quantization, c.kv_cache_dtype, c.tensor_parallel_size or 1)


def l4_prediction(c: Candidate, shape: ModelShape, hardware: Hardware) -> Prediction:
    """The roofline model's curve for the L4: memory-bound decode at 73 % of the ceiling or compute-bound,
    whichever is slower, plus the prompts' prefill compute shared across the steps and PCIe all-reduces; TTFT a
    prompt's prefill plus a step and a half. Sees memory fraction (through the KV cache), not batched tokens."""
    r = resolve(c, hardware, shape)
    tp = r.tensor_parallel_size or 1
    flops = (L4_FP8_FLOPS if r.quantization == "fp8" else L4_BF16_FLOPS) * L4_MFU * tp
    params = shape.param_count
    prefill_s = 2 * params * WORKLOAD.input_len / flops
    memory = estimate_memory(c, shape, hardware)
    by_kv = memory.kv_capacity_tokens // (WORKLOAD.input_len + WORKLOAD.output_len)
    limit = min(by_kv, r.max_num_seqs or by_kv)
    source = "roofline (L4, this simulation)"
    if limit < 1:
        return Prediction(source, WORKLOAD, False, reason="no room for one request")
    curve = []
    for b in ladder(limit):
        ceiling = decode_ceiling_tokens_per_s(c, shape, hardware, WORKLOAD, b)
        assert ceiling is not None
        step = max(b / (ceiling * L4_DECODE_EFFICIENCY), 2 * params * b / flops)
        if tp > 1:
            volume = 2 * (tp - 1) / tp * b * shape.hidden_size * 2
            step += 2 * shape.num_layers * (L4_ALLREDUCE_LATENCY_S + volume / L4_PCIE_BYTES_PER_S)
        tpot = step + b * prefill_s / WORKLOAD.output_len
        curve.append(Estimate(b, prefill_s + 1.5 * tpot, tpot, b / tpot))
    reason = f"the KV cache admits {by_kv} requests" if by_kv < (r.max_num_seqs or by_kv) else "max-num-seqs"
    return Prediction(source, WORKLOAD, True, tuple(curve), reason, limit)


@dataclass
class Landscape:
    """A scenario's candidates and their predictions (made once)."""

    scenario: Scenario
    space: SearchSpace
    slo: Slo
    predictions: dict[str, Prediction] = field(default_factory=dict)
    candidates: dict[str, Candidate] = field(default_factory=dict)
    defaults: str = ""
    folder: Path = Path()  # the model directory (a tiny model or a config.json): the Tuner is built on it

    def replicas(self, key: str) -> int:
        return layout_for(self.candidates[key].tensor_parallel_size, NODE_GPUS).replicas

    def tp(self, key: str) -> int:
        return self.candidates[key].tensor_parallel_size or 1

    def predicted_server(self, key: str) -> float:
        return self.predictions[key].capacity(self.slo, "rate")


def build(scenario: Scenario, work: Path) -> Landscape:
    folder = work / scenario.name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    if scenario.hf_config:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(scenario.model))
    else:
        write_tiny_model(folder, **scenario.model)
    shape = ModelShape.from_dir(folder)
    model: aic.AiconfiguratorModel | None = None
    if scenario.system == "l4":
        hardware = Hardware("NVIDIA L4", NODE_GPUS, 24 * GiB, (8, 9))  # FP8: compute capability 8.9
    else:
        model = aic.AiconfiguratorModel(folder, shape, scenario.system)
        hardware = aic.hardware_for(scenario.system, model, NODE_GPUS)
    space = default_space(shape, hardware)
    # aiconfigurator does not model prefix caching: its off twins would be duplicates.
    values = {
        **space.values,
        "enable_prefix_caching": (None,),
        "tensor_parallel_size": scenario.tensor_parallel,
    }
    space = SearchSpace(shape, hardware, values)
    land = Landscape(scenario, space, parse_slo(scenario.slo), folder=folder)
    defaults = space.baseline()
    if not space.check(defaults).ok:  # as the tuner: vLLM's defaults at the smallest TP that fits
        for tp in sorted(scenario.tensor_parallel):
            if space.check(defaults.with_values(tensor_parallel_size=tp)).ok:
                defaults = defaults.with_values(tensor_parallel_size=tp)
                break
    for c in [defaults, *space.candidates()]:
        if not space.check(c).ok:
            continue
        try:
            p = (
                model.predict(c, hardware, WORKLOAD)
                if model is not None
                else l4_prediction(c, shape, hardware)
            )
        except PredictError:
            continue
        land.predictions[c.key()] = p
        land.candidates[c.key()] = c
    land.defaults = defaults.key()
    return land


@dataclass
class World:
    """One seed's truth, drawn per family and per configuration from seeded generators (the same truth for
    every strategy whatever order it asks in)."""

    land: Landscape
    seed: int
    families: dict[tuple[Any, ...], tuple[float, float, float, float]] = field(default_factory=dict)
    truth: dict[str, float] = field(default_factory=dict)
    failing: dict[str, bool] = field(default_factory=dict)
    # What a trial's capacity search would show at its best load (the tuner's evidence): the KV cache full, a
    # full batch, which limit failed above it, the requests in flight there.
    evidence: dict[str, tuple[bool, bool, bool, bool, int]] = field(default_factory=dict)

    def _rng(self, *parts: Any) -> random.Random:
        return random.Random("/".join(map(str, (self.land.scenario.name, self.seed, *parts))))

    def _family(self, c: Candidate) -> tuple[float, float, float, float]:
        f = family(c)
        if f not in self.families:
            rng = self._rng("family", f)
            self.families[f] = (
                rng.gauss(0.0, FAMILY_ERROR),
                rng.gauss(LOAD_SLOPE_MEAN, LOAD_SLOPE_SD),
                rng.gauss(0.0, TTFT_FAMILY_ERROR),
                rng.uniform(*EXTRA_OVERHEAD_GIB) * GiB,
            )
        return self.families[f]

    def _draw(self, key: str) -> None:
        land = self.land
        c = land.candidates[key]
        r = resolve(c, land.space.hardware, land.space.shape)
        bias, slope, ttft_bias, extra = self._family(c)
        rng = self._rng("config", key)
        config_error, fail_draw = rng.gauss(0.0, CONFIG_ERROR), rng.random()
        memory = estimate_memory(c, land.space.shape, land.space.hardware)
        kv_tokens = memory.kv_capacity_tokens - int(extra // max(1, memory.kv_bytes_per_token))
        p_fail = FAIL_RANDOM
        p_fail += FAIL_HIGH_MEMORY if (r.gpu_memory_utilization or 0.0) >= 0.95 else 0.0
        p_fail += FAIL_LARGE_TP if (r.tensor_parallel_size or 1) >= 4 else 0.0
        fails = fail_draw < p_fail or kv_tokens < (r.max_model_len or 0)
        limit = min(kv_tokens // (WORKLOAD.input_len + WORKLOAD.output_len), r.max_num_seqs or 10**6)
        prediction = land.predictions[key]
        if fails or limit < 1 or not prediction.fits:
            self.failing[key], self.truth[key] = True, 0.0
            return
        budget = r.max_num_batched_tokens or 2048
        tpot_stall = 1 + 0.03 * max(0.0, math.log2(budget / 2048))
        best, last = 0.0, None
        at, broke = 0, ""  # the concurrency of the best passing point; the limit the next one broke
        for e in _truncated(prediction.curve, limit):
            load = slope * max(0.0, math.log2(e.concurrency / 16))
            speed = math.exp(bias + load + config_error) / tpot_stall
            need = e.concurrency * (1 + WORKLOAD.input_len / WORKLOAD.output_len) / budget
            queue = math.inf if need >= 0.95 else 1 + need / (2 * (1 - need))
            true = Estimate(
                e.concurrency,
                e.ttft_s * math.exp(ttft_bias) * queue,
                e.tpot_s / speed,
                e.output_tokens_per_s * speed,
            )
            if true.meets(land.slo):
                if true.output_tokens_per_s > best:
                    best, at, broke = true.output_tokens_per_s, e.concurrency, ""
            elif last is not None and last.meets(land.slo):
                crossing = _crossing(last, true, land.slo)  # a capacity is a rate, not a ladder step
                ttft = land.slo.ttft_p95_max_s
                if crossing >= best:
                    best, at = crossing, last.concurrency
                    broke = "ttft" if ttft is not None and true.ttft_s > ttft else "tpot"
            last = true
        at_limit = at >= limit and not broke
        kv_limited = at_limit and limit < (r.max_num_seqs or 10**6)
        self.evidence[key] = (kv_limited, at_limit and not kv_limited, broke == "ttft", broke == "tpot", at)
        self.failing[key], self.truth[key] = False, best / WORKLOAD.output_len

    def server(self, key: str) -> float:
        """The true capacity of one server (requests/s; 0: its launch fails or nothing meets the SLO)."""
        if key not in self.truth:
            self._draw(key)
        return self.truth[key]

    def fails(self, key: str) -> bool:
        self.server(key)
        return self.failing[key]

    def node(self, key: str) -> float:
        return self.server(key) * self.land.replicas(key)


def _crossing(ok: Estimate, bad: Estimate, slo: Slo) -> float:
    """Output tokens/s where the line from a passing point to a failing one meets the SLO's first limit."""
    t = 1.0
    for limit, a, b in (
        (slo.ttft_p95_max_s, ok.ttft_s, bad.ttft_s),
        (slo.tpot_p95_max_s, ok.tpot_s, bad.tpot_s),
    ):
        if limit is not None and b > limit:
            t = min(t, (limit - a) / (b - a) if math.isfinite(b) else 0.0)
    return ok.output_tokens_per_s + max(0.0, t) * (bad.output_tokens_per_s - ok.output_tokens_per_s)


def _truncated(curve: tuple[Estimate, ...], limit: int) -> list[Estimate]:
    """The curve up to ``limit`` requests in flight, with a point at the limit (interpolated) when it falls
    between two of the curve's."""
    kept = [e for e in curve if e.concurrency <= limit]
    above = next((e for e in curve if e.concurrency > limit), None)
    if above is not None and kept and kept[-1].concurrency < limit:
        lo, t = kept[-1], (limit - kept[-1].concurrency) / (above.concurrency - kept[-1].concurrency)

        def mix(a: float, b: float) -> float:
            return a + t * (b - a)

        kept.append(
            Estimate(
                limit, mix(lo.ttft_s, above.ttft_s), mix(lo.tpot_s, above.tpot_s),
                mix(lo.output_tokens_per_s, above.output_tokens_per_s),
            )
        )  # fmt: skip
    return kept


@dataclass
class Outcome:
    launches: int
    failed: int
    wall_s: float  # to PROVEN: the search, then the proof alone on the node
    gpu_s: float  # GPU-seconds the trials and the proof held
    chosen: str | None


@dataclass
class Executor:
    """Runs trials on the node's GPUs in simulated time."""

    world: World
    rng: random.Random
    node: bool  # rank layouts (x replicas) or servers
    now: float = 0.0
    free: int = NODE_GPUS
    gpu_s: float = 0.0
    launches: int = 0
    failed: int = 0
    running: list[tuple[float, int, str]] = field(default_factory=list)  # (end, order, key): a heap

    def scale(self, key: str) -> int:
        return self.world.land.replicas(key) if self.node else 1

    def start(self, key: str) -> None:
        land, tp = self.world.land, self.world.land.tp(key)
        startup = self.rng.uniform(*land.scenario.startup_s)
        took = (
            startup * self.rng.uniform(0.5, 1.0)
            if self.world.fails(key)
            else startup + self.rng.uniform(*MEASURE_S)
        )
        self.free -= tp
        self.gpu_s += took * tp
        self.launches += 1
        heapq.heappush(self.running, (self.now + took, self.launches, key))

    def finish(self) -> tuple[str, float]:
        """The next trial to end: its key and its measured capacity (one replica's, x replicas by node)."""
        end, _, key = heapq.heappop(self.running)
        self.now = end
        self.free += self.world.land.tp(key)
        if self.world.fails(key):
            self.failed += 1
            return key, 0.0
        measured = self.world.server(key) * math.exp(self.rng.gauss(0.0, MEASUREMENT_NOISE))
        return key, measured * self.scale(key)

    def prove(self, key: str | None) -> None:
        """The pick relaunched as its whole layout, alone on the node: start-up and one measurement."""
        while self.running:
            self.finish()
        if key is not None:
            took = self.rng.uniform(*self.world.land.scenario.startup_s) + self.rng.uniform(*MEASURE_S)
            self.now += took
            self.gpu_s += took * NODE_GPUS

    def outcome(self, chosen: str | None) -> Outcome:
        return Outcome(self.launches, self.failed, self.now, self.gpu_s, chosen)


def _ranker(world: World, grid: list[str], node: bool, old_rule: bool) -> Ranker:
    land = world.land
    keys = [land.defaults, *grid]  # the defaults calibrate too
    predicted = {k: land.predicted_server(k) * (land.replicas(k) if node else 1) for k in keys}
    return Ranker(
        predicted, family=lambda k: family(land.candidates[k]), **({"config_error": 0.0} if old_rule else {})
    )


def run_serial(world: World, grid: list[str], budget: int, *, node: bool, old_rule: bool) -> Outcome:
    ex = Executor(world, world._rng("serial", node, old_rule), node)
    ranker = _ranker(world, grid, node, old_rule)
    queue = [world.land.defaults]
    while ex.launches < budget:
        key = queue.pop(0) if queue else ranker.next()
        if key is None:
            break
        ex.start(key)
        ranker.record(*ex.finish())
    best = ranker.incumbent()
    chosen = best[0] if best is not None and best[1] > 0 else None
    ex.prove(chosen)
    return ex.outcome(chosen)


def run_parallel(world: World, grid: list[str], budget: int, *, old_rule: bool) -> Outcome:
    land = world.land
    ex = Executor(world, world._rng("parallel", old_rule), True)
    ranker = _ranker(world, grid, True, old_rule)
    first = [land.defaults]
    while True:
        running = [key for _, _, key in ex.running]
        left = budget - ex.launches
        wanted = first + [k for k in ranker.next_batch(running=running, k=NODE_GPUS) if k not in first]
        wanted = wanted[: max(0, left)]
        first = []
        for i in pack_batch([land.tp(k) for k in wanted], ex.free, NODE_GPUS):
            ex.start(wanted[i])
        if not ex.running:
            break  # nothing left to try (or the budget spent) and nothing to wait for
        ranker.record(*ex.finish())
    best = ranker.incumbent()
    chosen = best[0] if best is not None and best[1] > 0 else None
    ex.prove(chosen)
    return ex.outcome(chosen)


def run_grid(world: World, grid: list[str], budget: int) -> Outcome:
    land = world.land
    ex = Executor(world, world._rng("grid"), True)
    order = sorted(grid, key=lambda k: -land.tp(k))  # the big ones first, the small ones fill the gaps
    measured: dict[str, float] = {}
    while order or ex.running:
        for i in sorted(pack_batch([land.tp(k) for k in order], ex.free, NODE_GPUS), reverse=True):
            ex.start(order.pop(i))
        if ex.running:
            key, value = ex.finish()
            measured[key] = value
    chosen = max(measured, key=lambda k: measured[k])
    ex.prove(chosen)
    return ex.outcome(chosen)


class VirtualClock:
    """Simulated time for the real executor's threads: a trial thread sleeps its simulated duration here, and the
    clock moves to the next trial's end only when the search loop waits and every started trial is asleep, so the
    schedule is the real executor's and the times do not depend on how busy this machine is."""

    def __init__(self) -> None:
        self.now = 0.0
        self._cond = threading.Condition()
        self._starting = 0  # trials submitted that have not reached their sleep yet
        self._sleepers: list[tuple[float, int, threading.Event]] = []
        self._order = 0

    def starting(self, n: int) -> None:
        with self._cond:
            self._starting += n
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        wake = threading.Event()
        with self._cond:
            self._order += 1
            heapq.heappush(self._sleepers, (self.now + seconds, self._order, wake))
            self._starting -= 1
            self._cond.notify_all()
        wake.wait()

    def advance(self) -> None:
        """Wake the trial that ends first (once every started trial sleeps)."""
        with self._cond:
            self._cond.wait_for(lambda: self._starting <= 0)
            if self._sleepers:
                end, _, wake = heapq.heappop(self._sleepers)
                self.now = end
                wake.set()


def _virtual_executor(clock: VirtualClock) -> type[TrialExecutor[TrialOutcome]]:
    class VirtualExecutor(TrialExecutor[TrialOutcome]):
        """The real executor (threads, placements on the Node), waiting on the virtual clock."""

        def submit(self, job: Job) -> Placement | None:
            clock.starting(1)
            placement = super().submit(job)
            if placement is None:
                clock.starting(-1)
            return placement

        def wait(self, timeout_s: float | None = None) -> Done[TrialOutcome] | None:
            if self._running and self._done.empty():
                clock.advance()
            return super().wait(timeout_s)

    return VirtualExecutor


@contextmanager
def _executor_on(clock: VirtualClock | None) -> Iterator[None]:
    """The Tuner's executor, on the virtual clock (None: real time, unchanged)."""
    if clock is None:
        yield
        return
    real = tune_module.Executor
    tune_module.Executor = _virtual_executor(clock)  # type: ignore[misc]
    try:
        yield
    finally:
        tune_module.Executor = real  # type: ignore[misc]


def _trial_capacity(world: World, key: str, measured: float) -> Capacity:
    """What the tuner's capacity search would have found, as search_simulation.py has it: the measured capacity
    held and 10 % above it failing, with the evidence the world shows at its best load (KV cache, queue, bound)
    and the limit that broke above it."""
    kv_full, batch_full, ttft, _tpot, at = world.evidence[key]
    lo = measured
    evidence = {
        "kv_cache_usage_pct_max": 95.0 if kv_full else 50.0,
        "requests_waiting_mean": 2.0 if batch_full else 0.0,
        "requests_running_mean": float(max(1, at)),
    }
    bound = "gpu_compute" if world.land.candidates[key].fp8_weights else "gpu_memory_bandwidth"
    phase = {"evidence": evidence, "bound": {"kind": bound}}
    reason = (
        "TTFT p95 above the limit"
        if ttft
        else "queue building (requests waiting)"
        if batch_full or kv_full
        else "per-user speed below the floor (TPOT p95)"
    )

    def held(rate: float) -> Any:
        return dataclasses.replace(
            empty_steady(), output_tokens_per_s=rate * WORKLOAD.output_len, requests_per_s=rate
        )

    points = [
        Point(Load.rate(lo), "judged", "pass", held(lo), phases=(phase,)),
        Point(Load.rate(lo * 1.1), "judged", "fail", held(lo * 1.1), (reason,), phases=(phase,)),
    ]
    return summarise(RATE, points)


def run_tuner(
    world: World, grid: list[str], budget: int, *, parallel: bool, ms_per_minute: float = 0.0
) -> Outcome:
    """The real Tuner (tuner/tuning/tune.py: PredictedStrategy, Executor, Node), its trials answered by the world:
    a trial takes its start-up and measuring time (a failed launch part of its start-up), on the virtual clock
    (``ms_per_minute`` 0) or sleeping that many real milliseconds per simulated minute."""
    land = world.land
    mode = "parallel" if parallel else "serial"
    clock = VirtualClock() if ms_per_minute <= 0 else None
    lock = threading.Lock()
    gpu_s = [0.0]
    failed = [0]
    with tempfile.TemporaryDirectory() as tmp:
        tuner = Tuner(
            TuneConfig(
                model=str(land.folder), slo=land.slo, store_path=Path(tmp) / "t.sqlite", out_dir=Path(tmp) / "out",
                gpus=False, prove=False, launch_budget=budget, parallel=NODE_GPUS if parallel else 1,
                input_len=WORKLOAD.input_len, output_len=WORKLOAD.output_len,
            )
        )  # fmt: skip
        tuner.hardware, tuner.space = land.space.hardware, land.space  # the simulated node
        tuner.node = Node(tuple(range(NODE_GPUS)))  # placements without NVML
        tuner.parallel = NODE_GPUS if parallel else 1

        def simulated_predict(feasible: list[Candidate]) -> None:  # the landscape's predictions, made once
            tuner.predictions = dict(land.predictions)
            tuner.prediction_note = "SIMULATION"

        def simulated_trial(
            store: Any, candidate: Candidate, why: str, incumbent: Any, placement: Placement | None = None
        ) -> TrialOutcome:
            key = candidate.key()
            feasibility = land.space.check(candidate)
            if not feasibility.ok or key not in land.candidates:  # as the real trial: judged without a launch
                reason = "not launched: " + ("; ".join(feasibility.reasons) or "not predicted")
                store.record_result(candidate, TrialStatus.INFEASIBLE, reason)
                if placement is not None and clock is not None:
                    clock.starting(-1)
                return TrialOutcome(candidate, TrialStatus.INFEASIBLE, reason)
            with lock:
                tuner.launches += 1
            store.record_start(candidate)
            rng = world._rng("tuner", mode, key)
            startup = rng.uniform(*land.scenario.startup_s)
            fails = world.fails(key)
            took = startup * rng.uniform(0.5, 1.0) if fails else startup + rng.uniform(*MEASURE_S)
            with lock:
                gpu_s[0] += took * land.tp(key)
                failed[0] += fails
            if clock is not None:
                clock.sleep(took)
            else:
                time.sleep(took / 60 * ms_per_minute / 1000)
            if fails:
                outcome = TrialOutcome(candidate, TrialStatus.FAILED, "the server did not start (simulated)")
            else:
                measured = world.server(key) * math.exp(rng.gauss(0.0, MEASUREMENT_NOISE))
                capacity = _trial_capacity(world, key, measured)
                load = tuner._separating_load(candidate, capacity, incumbent)
                if load is not None:  # as the real trial: one more point, at the load a tied incumbent failed
                    passed = measured >= load.value
                    point = Point(
                        load, "judged", "pass" if passed else "fail",
                        dataclasses.replace(empty_steady(), requests_per_s=load.value),
                        () if passed else ("TTFT p95 above the limit",),
                    )  # fmt: skip
                    capacity = capacity.with_point(point)
                outcome = TrialOutcome(candidate, TrialStatus.FEASIBLE, "simulated", capacity)
            store.record_result(candidate, outcome.status, outcome.reason)
            return outcome

        real_search = tuner._search
        search_s = [0.0]

        def timed_search(*args: Any) -> str | None:
            t0 = time.monotonic()
            try:
                return real_search(*args)
            finally:
                search_s[0] = time.monotonic() - t0

        tuner._predict = simulated_predict  # type: ignore[method-assign]
        tuner._trial = simulated_trial  # type: ignore[method-assign]
        tuner._search = timed_search  # type: ignore[method-assign]
        with _executor_on(clock):
            result = tuner.run()
        chosen = result.winner.key() if result.winner is not None else None
        wall = clock.now if clock is not None else search_s[0] / (ms_per_minute / 1000) * 60
        if chosen is not None:  # the proof: the pick's whole layout, alone on the node
            rng = world._rng("tuner-proof", mode)
            took = rng.uniform(*land.scenario.startup_s) + rng.uniform(*MEASURE_S)
            wall += took
            gpu_s[0] += took * NODE_GPUS
        return Outcome(tuner.launches, failed[0], wall, gpu_s[0], chosen)


STRATEGIES: dict[str, Callable[[World, list[str], int], Outcome]] = {
    "serial, per server (today)": lambda w, g, b: run_serial(w, g, b, node=False, old_rule=True),
    "serial, by node (old rule)": lambda w, g, b: run_serial(w, g, b, node=True, old_rule=True),
    "serial, by node": lambda w, g, b: run_serial(w, g, b, node=True, old_rule=False),
    "parallel, by node (old rule)": lambda w, g, b: run_parallel(w, g, b, old_rule=True),
    "parallel, by node": lambda w, g, b: run_parallel(w, g, b, old_rule=False),
    "grid, parallel": run_grid,
    "tuner (serial)": lambda w, g, b: run_tuner(w, g, b, parallel=False, ms_per_minute=MS_PER_MINUTE),
    "tuner (parallel)": lambda w, g, b: run_tuner(w, g, b, parallel=True, ms_per_minute=MS_PER_MINUTE),
}
TODAY = "serial, per server (today)"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    parser.add_argument(
        "--strategies", default="", help="run the strategies whose name contains one of these (;)"
    )
    parser.add_argument(
        "--ms-per-minute", type=float, default=0.0,
        help="the tuner's trials sleep this many real ms per simulated minute (0: a virtual clock, the default)",
    )  # fmt: skip
    args = parser.parse_args()
    global MS_PER_MINUTE
    MS_PER_MINUTE = args.ms_per_minute
    wanted = [w.strip() for w in args.strategies.split(";") if w.strip()]
    strategies = {
        name: run for name, run in STRATEGIES.items() if not wanted or any(w in name for w in wanted)
    }
    if not aic.available():
        print(f"node_simulation: {aic.INSTALL_HINT}", file=sys.stderr)
        return 2
    started = time.time()
    report: list[dict[str, Any]] = []
    lines = [
        f"machine: 2-core CPU machine, no GPU ({platform.machine()}, Python {platform.python_version()}, "
        f"aiconfigurator-core {aic.package_version()}); date: {time.strftime('%Y-%m-%d')}; command: "
        f"benchmarks/node_simulation.py --seeds {args.seeds}",
        "",
        "SIMULATION: every figure below is simulated (no GPU, no server); wall times are simulated minutes.",
        "",
        "| scenario | grid | strategy | launches: mean (max) | failed | SIMULATED wall to PROVEN, min: median "
        "(max) | vs today | GPU-h | % of the best node: median (worst) | seeds >= 95 % | picks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS:
            if args.only not in scenario.name:
                continue
            land = build(scenario, Path(tmp))
            grid = [k for k in land.candidates if land.predictions[k].fits and k != land.defaults]
            budget = max(3, -(-len(grid) // 3))
            runs: dict[str, list[tuple[Outcome, float]]] = {name: [] for name in strategies}
            for seed in range(args.seeds):
                world = World(land, seed)
                best = max(world.node(k) for k in [land.defaults, *grid])
                for name, strategy in strategies.items():
                    outcome = strategy(world, grid, budget)
                    got = world.node(outcome.chosen) if outcome.chosen is not None else 0.0
                    runs[name].append((outcome, got / best if best else 0.0))
            today = statistics.median(o.wall_s for o, _ in runs[TODAY]) if TODAY in runs else math.nan
            for name, results in runs.items():
                outs = [o for o, _ in results]
                shares = [s for _, s in results]
                walls = [o.wall_s / 60 for o in outs]
                picks: dict[str, int] = {}
                for o in outs:
                    label = layout_for(land.tp(o.chosen), NODE_GPUS).label() if o.chosen else "none"
                    picks[label] = picks.get(label, 0) + 1
                pick_text = ", ".join(
                    f"{n}x {label}" for label, n in sorted(picks.items(), key=lambda p: -p[1])
                )
                launches = [o.launches for o in outs]
                lines.append(
                    f"| {scenario.name} | {len(grid) + 1} | {name} "
                    f"| {statistics.fmean(launches):.1f} ({max(launches)}) "
                    f"| {statistics.fmean(o.failed for o in outs):.1f} | {statistics.median(walls):.0f} "
                    f"({max(walls):.0f}) | {statistics.median(walls) * 60 / today:.2f}x "
                    f"| {statistics.fmean(o.gpu_s for o in outs) / 3600:.1f} "
                    f"| {100 * statistics.median(shares):.1f} % ({100 * min(shares):.1f} %) "
                    f"| {sum(s >= 0.95 for s in shares)}/{len(shares)} | {pick_text} |"
                )
                report.append(
                    {
                        "scenario": scenario.name,
                        "grid": len(grid) + 1,
                        "budget": budget,
                        "strategy": name,
                        "launches": launches,
                        "failed": [o.failed for o in outs],
                        "wall_s": [round(o.wall_s, 1) for o in outs],
                        "gpu_s": [round(o.gpu_s, 1) for o in outs],
                        "share_of_best_node": [round(s, 4) for s in shares],
                        "picks": picks,
                        "simulated": True,
                    }
                )
    lines += ["", f"({time.time() - started:.0f} s)"]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
