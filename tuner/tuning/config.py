"""One tuning run's settings: the model, the SLO, the traffic, the search's limits and the node it runs on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.loadgen.steady import DEFAULT_CONFIDENCE, min_requests_for
from tuner.loadgen.workload import Workload
from tuner.tuning.slo import Slo
from tuner.tuning.verdict import VerdictPlan

__all__ = ["TuneConfig"]


@dataclass(frozen=True)
class TuneConfig:
    model: str  # a local model directory (its config.json sizes the search)
    slo: Slo
    command: tuple[str, ...] = ("vllm", "serve")
    fixed_args: tuple[str, ...] = ()  # passed to every launch (e.g. --load-format dummy)
    env: Mapping[str, str] = field(default_factory=dict)
    pins: Mapping[str, Any] = field(default_factory=dict)
    values: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # replace a dimension's ladder
    input_len: int = 512
    output_len: int = 256
    vocab_size: int | None = None  # prompt token ids are drawn below this; None: the model directory's
    objective: str = "rate"
    min_phase_s: float = 10.0  # a phase lasts at least this long: sub-second phases measure start-up noise
    min_requests: int = round(1.25 * min_requests_for(95))  # 59 in the steady window, room for the ramp
    max_requests: int = 240  # per point; a point still uncertain after this many counts as not passing
    production_s: float = 30.0
    confidence: float = DEFAULT_CONFIDENCE
    resolution: float = 0.10  # the capacity search narrows its bracket to this
    max_concurrency: int = 512
    launch_budget: int | None = (
        None  # default: a third of the feasible grid, at least 3 (+1: prefix cache off)
    )
    store_path: Path = Path("infertop-tune.sqlite")
    out_dir: Path = Path("infertop-tune")
    startup_timeout_s: float = 900.0
    prove: bool = True  # relaunch from the exported YAML: proof and production check
    price_per_gpu_hour: float | None = None
    gpus: bool = True  # read NVML (False: tune the CPU build)
    pin_cpus: str = "auto"  # "auto", "off" or "SERVER:CLIENT" cpu lists (tuner.serving.affinity)
    predict: bool = True  # rank candidates by a performance model where one covers the GPU (tuner.predict)
    # The traffic to tune for (tuner.loadgen.workload): its lengths and shared prefixes replace input_len and
    # output_len in every phase; their means size predictions, and its longest sequence max-model-len.
    workload: Workload | None = None
    verdict: VerdictPlan = field(default_factory=VerdictPlan)
    # The node: the GPUs the tune may use (physical indices; None: every GPU NVML sees) and how many trials may
    # run at once (None: as many as the free GPUs hold; 1: one after another).
    gpu_ids: tuple[int, ...] | None = None
    parallel: int | None = None
    nvml: Any = None  # a pynvml-like module to read the GPUs through (tests: a scripted one); None: pynvml
    simulated: str | None = (
        None  # the scripted machine behind ``nvml`` ("h100x8"): every label says SIMULATED
    )
