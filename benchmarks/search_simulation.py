"""SIMULATION: how many launches each search strategy needs on GPU landscapes where the choice matters.

    .venv/bin/python benchmarks/search_simulation.py [--seeds 20] [--json FILE]

No GPU is used and no server is launched: this is a simulation, and it complements real runs, never replaces
them. Each scenario's landscape is the tuner's search space for that model and machine, each candidate's
"true" capacity under the SLO being aiconfigurator's prediction distorted by a seeded error: a shared error per
family of configurations (weights and KV-cache precision, tensor parallelism; 20 % standard deviation in log
space, standing for the model's own error, which was 4-18 % against a real H100) times a per-configuration error
(5 %, the dimensions the model hardly sees: batched tokens, memory fraction). A "launch" measures the true
capacity with 3 % noise. Candidates predicted not to fit fail their launch.

Strategies, each scored by the TRUE capacity of the configuration it picks against the best true capacity of
the exhaustive grid:
- grid: launch everything (the truth, at its cost);
- random: a quarter of the grid's launches in random order;
- evidence: today's coordinate search from vLLM's defaults (search.propose_moves, signals read off the
  simulated trial: KV cache full, batch capped, TTFT or per-user speed the limit), a quarter of the launches;
- predict: predict, then measure (tuner.predict.rank.Ranker), calibrating per family after every trial and
  stopping when no untried candidate could beat the incumbent, a quarter of the launches at most;
- tuner (evidence) and tuner (predict): the real ``Tuner`` (tuner/tuning/tune.py) with its search loop, defaults
  first, the evidence preference and the stop rule, its trials answered by the simulated landscape (a trial's
  capacity, its KV-cache use, queue, bound and which limit failed above it) instead of a vLLM launch; a quarter
  of the grid's launches.
Goal (issue 8): at least 95 % of the grid's best in at least 90 % of the seeds, with at most a quarter of the
grid's launches. Prints Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.predict import aic
from tuner.predict.base import PredictError, Prediction, Workload
from tuner.predict.rank import Ranker
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.capacity import summarise
from tuner.tuning.modelshape import ModelShape
from tuner.tuning.points import RATE, Load, Point, empty_steady
from tuner.tuning.search import Signals, propose_moves
from tuner.tuning.slo import Slo, parse_slo
from tuner.tuning.space import Candidate, SearchSpace, default_space, resolve
from tuner.tuning.store import TrialStatus
from tuner.tuning.tune import TrialOutcome, TuneConfig, Tuner

FAMILY_ERROR = 0.20
CONFIG_ERROR = 0.05
MEASUREMENT_NOISE = 0.03
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


@dataclass(frozen=True)
class Scenario:
    name: str
    model: dict[str, Any]
    system: str
    gpus: int
    slo: str
    tensor_parallel: tuple[int, ...] | None = None  # the TP values searched (None: the space's own)
    hf_config: bool = False  # ``model`` is a config.json, not write_tiny_model's arguments


SCENARIOS = (
    Scenario("Llama-3.1-8B, 1x H100", LLAMA_3_1_8B, "h100_sxm", 1, "mlperf-llama3.1-8b-interactive"),
    Scenario("Llama-3.1-8B, 1x H200", LLAMA_3_1_8B, "h200_sxm", 1, "mlperf-llama3.1-8b-interactive"),
    Scenario(
        "Llama-3.1-70B, 8x H100, TP4/TP8", LLAMA_70B, "h100_sxm", 8, "mlperf-llama2-70b-interactive", (4, 8)
    ),
    Scenario("Qwen2.5-32B, 1x H200", QWEN_32B, "h200_sxm", 1, "mlperf-llama3.1-8b-server", hf_config=True),
    Scenario("Llama-3.1-8B, 1x L40S", LLAMA_3_1_8B, "l40s", 1, "mlperf-llama3.1-8b-interactive"),
)


@dataclass
class Landscape:
    """A scenario's candidates with their predictions; truths are drawn per seed."""

    scenario: Scenario
    space: SearchSpace
    slo: Slo
    model: aic.AiconfiguratorModel
    folder: Path
    predictions: dict[str, Prediction] = field(default_factory=dict)
    candidates: dict[str, Candidate] = field(default_factory=dict)

    def predict(self, candidate: Candidate) -> Prediction | None:
        key = candidate.key()
        if key not in self.predictions:
            if not self.space.check(candidate).ok:
                return None
            try:
                self.predictions[key] = self.model.predict(candidate, self.space.hardware, WORKLOAD)
            except PredictError:
                return None
            self.candidates[key] = candidate
        return self.predictions[key]

    def predicted(self, key: str) -> float:
        return self.predictions[key].capacity(self.slo, "rate")


def family(c: Candidate) -> tuple[Any, ...]:
    return (c.quantization, c.kv_cache_dtype, c.tensor_parallel_size)


@dataclass
class World:
    """One seed: the true capacities (drawn lazily, so that candidates outside the grid get theirs too)."""

    land: Landscape
    rng: random.Random
    family_error: dict[tuple[Any, ...], float] = field(default_factory=dict)
    truth: dict[str, float] = field(default_factory=dict)

    def true_capacity(self, key: str) -> float:
        if key not in self.truth:
            c = self.land.candidates[key]
            f = family(c)
            if f not in self.family_error:
                self.family_error[f] = self.rng.gauss(0.0, FAMILY_ERROR)
            predicted = self.land.predicted(key)
            self.truth[key] = predicted * math.exp(self.family_error[f] + self.rng.gauss(0.0, CONFIG_ERROR))
        return self.truth[key]

    def measure(self, key: str) -> float:
        return self.true_capacity(key) * math.exp(self.rng.gauss(0.0, MEASUREMENT_NOISE))


@dataclass
class Outcome:
    strategy: str
    launches: int
    chosen: str | None


def run_grid(world: World, grid: list[str], budget: int) -> Outcome:
    measured = {k: world.measure(k) for k in grid}
    return Outcome("grid", len(grid), max(measured, key=lambda k: measured[k]))


def run_random(world: World, grid: list[str], budget: int) -> Outcome:
    order = list(grid)
    world.rng.shuffle(order)
    measured = {k: world.measure(k) for k in order[:budget]}
    return Outcome("random", len(measured), max(measured, key=lambda k: measured[k]))


def signals_for(land: Landscape, key: str) -> Signals:
    """What a trial's evidence would say, read off the prediction's curve around its capacity."""
    p = land.predictions[key]
    best = p.at_capacity(land.slo)
    if best is None:
        return Signals(ttft_failed=True)
    beyond = next((e for e in p.curve if e.concurrency > best.concurrency), None)
    at_limit = p.max_concurrency is not None and best.concurrency >= p.max_concurrency
    kv_limited = at_limit and p.reason.startswith("the KV cache")
    ttft_failed = (
        beyond is not None and land.slo.ttft_p95_max_s is not None and beyond.ttft_s > land.slo.ttft_p95_max_s
    )
    tpot_max = land.slo.tpot_p95_max_s
    tpot_failed = beyond is not None and tpot_max is not None and beyond.tpot_s > tpot_max
    c = land.candidates[key]
    return Signals(
        kv_cache_full=kv_limited,
        waiting=at_limit and not kv_limited,
        batch_capped=at_limit and not kv_limited,
        memory_bound=not c.fp8_weights,  # decode reads every weight each step
        ttft_failed=ttft_failed,
        tpot_failed=tpot_failed,
        best_concurrency=best.concurrency,
    )


def run_evidence(world: World, grid: list[str], budget: int) -> Outcome:
    land = world.land
    ladders = {name: tuple(v for v in values if v is not None) for name, values in land.space.values.items()}
    start = land.space.baseline()
    if land.predict(start) is None:
        start = land.candidates[grid[0]]
    measured: dict[str, float] = {}
    tried: set[str] = set()
    queue = [start]
    incumbent: str | None = None
    while queue and len(measured) < budget:
        candidate = queue.pop(0)
        key = candidate.key()
        if key in tried:
            continue
        tried.add(key)
        if land.predict(candidate) is None:
            measured[key] = 0.0  # a launch that fails
        else:
            measured[key] = world.measure(key)
        if incumbent is None or measured[key] > measured[incumbent] * 1.02:
            incumbent = key
        if not queue and incumbent is not None and land.predictions.get(incumbent) is not None:
            base = land.candidates[incumbent]
            current = dataclasses.asdict(resolve(base, land.space.hardware, land.space.shape))
            for move in propose_moves(current, signals_for(land, incumbent), ladders):
                nxt = base.with_values(**move.values)
                if nxt.key() not in tried:
                    queue.append(nxt)
                    break
    chosen = max(measured, key=lambda k: measured[k]) if measured else None
    return Outcome("evidence", len(measured), chosen)


def run_predict(world: World, grid: list[str], budget: int) -> Outcome:
    land = world.land
    ranker = Ranker({k: land.predicted(k) for k in grid}, family=lambda k: family(land.candidates[k]))
    while len(ranker.measured) < budget:
        key = ranker.next()
        if key is None:
            break
        ranker.record(key, world.measure(key))
    best = ranker.incumbent()
    return Outcome("predict", len(ranker.measured), best[0] if best else None)


def _simulated_capacity(land: Landscape, key: str, capacity: float) -> Any:
    """What the tuner's capacity search would have found: a point held at ``capacity`` req/s with the
    evidence the landscape says (KV cache, queue, bound), and one above it failing for the limit that broke."""
    s = signals_for(land, key)
    evidence = {
        "kv_cache_usage_pct_max": 95.0 if s.kv_cache_full else 50.0,
        "requests_waiting_mean": 2.0 if s.waiting else 0.0,
        "requests_running_mean": float(s.best_concurrency or 1),
    }
    phase = {
        "evidence": evidence,
        "bound": {"kind": "gpu_memory_bandwidth" if s.memory_bound else "gpu_compute"},
    }
    tok_s = capacity * WORKLOAD.output_len
    held = dataclasses.replace(empty_steady(), output_tokens_per_s=tok_s, requests_per_s=capacity)
    reason = "TTFT p95 above the limit" if s.ttft_failed else "per-user speed below the floor (TPOT p95)"
    points = [
        Point(Load.rate(capacity), "judged", "pass", held, phases=(phase,)),
        Point(Load.rate(capacity * 1.1), "judged", "fail", held, (reason,), phases=(phase,)),
    ]
    return summarise(RATE, points)


def run_tuner(world: World, grid: list[str], budget: int, *, predict: bool) -> Outcome:
    land = world.land
    with tempfile.TemporaryDirectory() as tmp:
        tuner = Tuner(
            TuneConfig(
                model=str(land.folder), slo=land.slo, store_path=Path(tmp) / "t.sqlite", out_dir=Path(tmp) / "out",
                gpus=False, prove=False, launch_budget=budget, predict=predict,
                input_len=WORKLOAD.input_len, output_len=WORKLOAD.output_len,
            )
        )  # fmt: skip
        tuner.hardware, tuner.space = land.space.hardware, land.space  # the simulated GPU machine

        def simulated_predict(feasible: list[Candidate]) -> None:  # the landscape's predictions, made once
            if predict:
                tuner.predictions = dict(land.predictions)
                tuner.prediction_note = "SIMULATION"

        def simulated_trial(
            store: Any, candidate: Candidate, why: str, incumbent: Any, placement: Any = None
        ) -> TrialOutcome:
            key = candidate.key()
            feasibility = land.space.check(candidate)
            if not feasibility.ok:  # as the real trial: judged without a launch
                reason = "not launched: " + "; ".join(feasibility.reasons)
                store.record_result(candidate, TrialStatus.INFEASIBLE, reason)
                return TrialOutcome(candidate, TrialStatus.INFEASIBLE, reason)
            tuner.launches += 1
            if land.predict(candidate) is None or not land.predictions[key].fits:
                outcome = TrialOutcome(candidate, TrialStatus.FAILED, "out of memory (simulated)")
            else:
                capacity = _simulated_capacity(land, key, max(world.measure(key), 1e-3))
                outcome = TrialOutcome(candidate, TrialStatus.FEASIBLE, "simulated", capacity)
            store.record_result(candidate, outcome.status, outcome.reason)
            return outcome

        tuner._predict = simulated_predict  # type: ignore[method-assign]
        tuner._trial = simulated_trial  # type: ignore[method-assign]
        result = tuner.run()
        chosen = result.winner.key() if result.winner is not None else None
        return Outcome("tuner", tuner.launches, chosen)


STRATEGIES: dict[str, Callable[[World, list[str], int], Outcome]] = {
    "grid": run_grid,
    "random": run_random,
    "evidence": run_evidence,
    "predict": run_predict,
    "tuner (evidence)": lambda world, grid, budget: run_tuner(world, grid, budget, predict=False),
    "tuner (predict)": lambda world, grid, budget: run_tuner(world, grid, budget, predict=True),
}


def build(scenario: Scenario, work: Path) -> Landscape:
    folder = work / scenario.name.replace(" ", "_").replace(",", "").replace("/", "-")
    if scenario.hf_config:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(scenario.model))
    else:
        write_tiny_model(folder, **scenario.model)
    shape = ModelShape.from_dir(folder)
    model = aic.AiconfiguratorModel(folder, shape, scenario.system)
    hardware = aic.hardware_for(scenario.system, model, scenario.gpus)
    space = default_space(shape, hardware)
    # The landscape is aiconfigurator's, which does not model prefix caching: its off twins would be duplicates.
    values = {**space.values, "enable_prefix_caching": (None,)}
    if scenario.tensor_parallel is not None:
        values["tensor_parallel_size"] = scenario.tensor_parallel
    space = SearchSpace(shape, hardware, values)
    land = Landscape(scenario, space, parse_slo(scenario.slo), model, folder)
    for candidate in space.candidates():
        land.predict(candidate)
    land.predict(space.baseline())
    return land


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not aic.available():
        print(f"search_simulation: {aic.INSTALL_HINT}", file=sys.stderr)
        return 2
    started = time.time()
    report: list[dict[str, Any]] = []
    lines = [
        f"machine: {platform.machine()}, Python {platform.python_version()}; "
        f"date: {time.strftime('%Y-%m-%d')}; command: benchmarks/search_simulation.py --seeds {args.seeds}",
        "",
        "SIMULATION (aiconfigurator's predictions distorted by seeded errors; no GPU, no server).",
        "",
        "| scenario | grid (launches) | strategy | launches: mean (max) | % of the grid's best: median (worst) "
        "| seeds >= 95 % |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS:
            land = build(scenario, Path(tmp))
            grid = [k for k in land.predictions if land.predictions[k].fits]
            grid = [k for k in land.candidates if k in grid]
            budget = max(1, len(grid) // 4)
            results: dict[str, list[tuple[int, float]]] = {name: [] for name in STRATEGIES}
            for seed in range(args.seeds):
                for name, strategy in STRATEGIES.items():
                    world = World(land, random.Random(f"{scenario.name}/{seed}"))
                    best_truth = max(world.true_capacity(k) for k in grid)
                    outcome = strategy(world, grid, budget)
                    got = world.true_capacity(outcome.chosen) if outcome.chosen in land.candidates else 0.0
                    results[name].append((outcome.launches, got / best_truth if best_truth else 0.0))
            for name, runs in results.items():
                launches = [n for n, _ in runs]
                shares = [s for _, s in runs]
                hit = sum(s >= 0.95 for s in shares)
                lines.append(
                    f"| {scenario.name} | {len(grid)} | {name} | {statistics.fmean(launches):.1f} ({max(launches)}) "
                    f"| {100 * statistics.median(shares):.1f} % ({100 * min(shares):.1f} %) | {hit}/{len(shares)} |"
                )
                report.append(
                    {
                        "scenario": scenario.name,
                        "grid": len(grid),
                        "budget": budget,
                        "strategy": name,
                        "launches": launches,
                        "share_of_best": shares,
                    }
                )
    lines += ["", f"({time.time() - started:.0f} s)"]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
