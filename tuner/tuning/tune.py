"""`infertop tune`: launch vLLM with candidate settings, measure each one's capacity under the SLO, keep the best,
and prove it on a server relaunched from the exported file.

One trial = launch a candidate, search its capacity on that one server (:mod:`tuner.tuning.capacity`: the
highest Poisson arrival rate within the SLO by default, or the most concurrent users), store it, stop the
server. Every point is judged with its uncertainty, and one configuration beats another only when it held a
load the other did not; ties go to the configuration closer to vLLM's defaults. The search starts at vLLM's
defaults and follows the evidence (:mod:`tuner.tuning.search`). Every trial is saved when it ends, and every
running server is recorded, so Ctrl-C, a crash or ``kill -9`` loses nothing and ``--resume`` carries on after
stopping what an earlier run left running. At the end the winner is exported and the verdict
(:mod:`tuner.tuning.verdict`) relaunches vLLM from that file to prove it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.loadgen.dataset import DatasetError, check_ids, tokenize_dataset_locally
from tuner.loadgen.steady import DEFAULT_CONFIDENCE, min_requests_for
from tuner.loadgen.vocab import vocab_size_from_dir
from tuner.loadgen.workload import DATASET_OUTPUT_LEN, Workload, WorkloadError, fit_to_context, with_tokens
from tuner.predict import aic
from tuner.predict.base import PredictError, Prediction
from tuner.predict.base import Workload as TokenCounts
from tuner.predict.rank import Ranker
from tuner.serving.affinity import pin_process, plan_cpus
from tuner.serving.launcher import LaunchError, python_of
from tuner.serving.leftovers import create_time_of, stop_leftover
from tuner.telemetry.model import GpuState
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig
from tuner.tuning import events as ev
from tuner.tuning.capacity import (
    Capacity,
    CapacityPlan,
    beats,
    find_capacity,
    rank,
    separating_load,
    ties_with,
)
from tuner.tuning.conclusion import build_report, export_text, run_headline
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.points import RATE, USERS
from tuner.tuning.runner import AllRequestsFailed, MeasurePlan, ServerHooks, TrialRunner
from tuner.tuning.search import propose_moves, signals_from
from tuner.tuning.slo import Slo
from tuner.tuning.space import Candidate, SearchSpace, default_space, resolve
from tuner.tuning.store import BestPoint, RunMeta, TrialRecord, TrialStatus, TrialStore
from tuner.tuning.verdict import (
    Contender,
    Verdict,
    VerdictPlan,
    reach_verdict,
    unverified,
)

GiB = 2**30
OBJECTIVES = {"rate": RATE, "throughput": RATE, "users": USERS}
"""--objective: "rate" (default; "throughput" is the same: the highest sustained arrival rate is the most
throughput a server gives within the SLO) or "users"."""


class TuneError(RuntimeError):
    """The run cannot start or go on (model, hardware, store, a workload the server refuses). One line."""


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


@dataclass
class TrialOutcome:
    candidate: Candidate
    status: TrialStatus
    reason: str
    capacity: Capacity | None = None
    log_tail: str = ""
    startup_s: float | None = None
    failure_kind: str | None = None  # launcher.FailureKind value when the server did not start

    @property
    def feasible(self) -> bool:
        return self.status is TrialStatus.FEASIBLE and self.capacity is not None and self.capacity.feasible


@dataclass
class TuneResult:
    winner: Candidate | None  # the configuration exported (the runner-up, when it was proven instead)
    defaults: Candidate
    trials: list[TrialRecord]
    launches: int
    stopped: str | None
    outputs: dict[str, str]
    report: dict[str, Any]
    verdict: Verdict | None = None
    headline: str = ""
    exit_code: int = 0


def detect_hardware(use_gpus: bool, env: Mapping[str, str]) -> tuple[Hardware, str]:
    """The GPUs NVML sees, or the CPU build of vLLM sized by VLLM_CPU_KVCACHE_SPACE (GiB)."""
    if use_gpus:
        backend = NvmlBackend()
        info = backend.open()
        backend.close()
        if info.state is GpuState.OK and info.gpus:
            hw = Hardware.from_gpus(info.gpus)
            return hw, f"{hw.gpu_count}x {hw.gpu_name}"
    kv_gib = float(env.get("VLLM_CPU_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4)
    return Hardware.cpu(int(kv_gib * GiB)), f"CPU (vLLM CPU build, {kv_gib:g} GiB KV cache)"


class Tuner:
    """Runs one tuning run. ``sampler`` (GPU, host and the candidate's /metrics) is there from construction."""

    def __init__(self, config: TuneConfig, *, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        if config.objective not in OBJECTIVES:
            raise TuneError(f"unknown objective {config.objective!r}: rate (default) or users")
        self.objective = OBJECTIVES[config.objective]
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise TuneError(f"{config.model}: no config.json there (tune needs a local model directory)")
        try:
            self.shape = ModelShape.from_dir(model_dir)
        except (ValueError, OSError) as exc:
            raise TuneError(f"{config.model}/config.json: {exc}") from None
        self.vocab_size = config.vocab_size or vocab_size_from_dir(model_dir) or 1000
        self.workload_note = ""  # what was left out of the workload to fit a pinned max-model-len
        if config.workload is not None and config.workload.needs_tokens:
            self.config = config = dataclasses.replace(
                config, workload=self._tokenized(config, config.workload)
            )
        if config.workload is not None:
            self.config = config = self._for_workload(config, config.workload)
        self.hardware, self.hardware_label = detect_hardware(config.gpus, config.env)
        if self.hardware.is_cpu and "VLLM_CPU_KVCACHE_SPACE" not in {**os.environ, **config.env}:
            # Unset, vLLM's CPU build reserves 92 % of the NUMA node's memory for the KV cache and refuses to
            # start when anything else uses it: give it the size the search space assumes instead.
            kv_gib = f"{self.hardware.cpu_kv_cache_bytes / GiB:g}"
            self.config = config = dataclasses.replace(
                config, env={**config.env, "VLLM_CPU_KVCACHE_SPACE": kv_gib}
            )
        try:
            space = default_space(self.shape, self.hardware, dict(config.pins))
            values = {**space.values, **{k: tuple(v) for k, v in config.values.items()}}
            self.space = SearchSpace(self.shape, self.hardware, values, dict(config.pins))
            self.cpu_plan = plan_cpus(config.pin_cpus, cpu_build=self.hardware.is_cpu)
        except ValueError as exc:
            raise TuneError(str(exc)) from None
        self.explicit = set(config.values)  # operator-chosen ladders are launched even if predicted to fail
        self.sampler = Sampler(
            LiveSource(
                NvmlBackend() if config.gpus and not self.hardware.is_cpu else None,
                config=SamplerConfig(discover_vllm=False, history_len=480),
            ),
            history_len=480,
        )
        self.launches = 0
        self.note: str | None = None  # why the search ended before it ran out of moves (the launch budget)
        self._moves: dict[str, dict[str, Any]] = {}  # candidate key -> the values its move changed
        self._rejected: set[tuple[str, Any]] = set()  # (dimension, value) vLLM refused as unsupported
        self._listener: ev.Listener = lambda e: None
        self._cancel = threading.Event()
        self._store: TrialStore | None = None
        self.predictions: dict[str, Prediction] = {}  # candidate key -> the model's prediction
        self.prediction_note = ""  # the model's source, or why candidates are not predicted

    # --- the run ---------------------------------------------------------------------------------------------

    def runner(self) -> TrialRunner:
        cfg = self.config
        plan = MeasurePlan(
            input_len=cfg.input_len, output_len=cfg.output_len, vocab_size=self.vocab_size, workload=cfg.workload,
            min_phase_s=cfg.min_phase_s, min_requests=cfg.min_requests, max_requests=cfg.max_requests,
            production_s=cfg.production_s, confidence=cfg.confidence,
        )  # fmt: skip
        return TrialRunner(
            model=cfg.model, slo=cfg.slo, plan=plan, command=cfg.command, fixed_args=cfg.fixed_args, env=cfg.env,
            startup_timeout_s=cfg.startup_timeout_s, log_dir=cfg.out_dir / "logs", sampler=self.sampler,
            cpu_plan=self.cpu_plan, cpu_build=self.hardware.is_cpu, emit=self._emit, cancelled=self._cancel.is_set,
            hooks=ServerHooks(self._server_started, self._server_stopped),
        )  # fmt: skip

    def run(self, listener: ev.Listener | None = None, cancel: threading.Event | None = None) -> TuneResult:
        self._listener = listener or (lambda e: None)
        self._cancel = cancel or threading.Event()
        with self._pinned():
            return self._run()

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[None]:
        """The load generator (this whole process) on the client's cores; servers start on the others."""
        if self.cpu_plan.client:
            with pin_process(self.cpu_plan.client):
                yield
        else:
            yield

    def _meta(self) -> RunMeta:
        cfg = self.config
        return RunMeta(
            model=str(Path(cfg.model).resolve()),
            hardware=self.hardware.to_dict(),
            slo=cfg.slo.to_dict(),
            space=self.space.to_dict(),
            workload={
                "input_len": cfg.input_len,
                "output_len": cfg.output_len,
                "objective": self.objective,
                "vocab_size": self.vocab_size,
                # Only with a workload: a run stored before workloads existed resumes as it was.
                **({"traffic": cfg.workload.to_dict()} if cfg.workload else {}),
            },
        )

    def _run(self) -> TuneResult:
        started = time.time()
        feasible = self.space.feasible()
        # A third of the grid; the prefix cache off is one evidence move at most (search.propose_moves), not a
        # second grid: it adds one launch, not a third of the candidates it doubles.
        core = [c for c in feasible if c.enable_prefix_caching is not False]
        budget = self.config.launch_budget or max(3, -(-len(core) // 3)) + (len(core) < len(feasible))
        meta = self._meta()
        if self.config.store_path.exists() and not self.resume:
            raise TuneError(
                f"{self.config.store_path} exists: pass --resume to continue that run, or another --store"
            )
        store = self._store = TrialStore.open(self.config.store_path, run_meta=meta)
        notes = [*self._stop_leftovers(store), self.workload_note]
        outcomes: dict[str, TrialOutcome] = {
            r.key: _outcome_from_record(r)
            for r in store.trials()
            if r.status in (TrialStatus.FEASIBLE, TrialStatus.INFEASIBLE, TrialStatus.FAILED)
        }
        self.launches = sum(
            1 for o in outcomes.values() if o.startup_s is not None or o.status is TrialStatus.FAILED
        )
        self._predict(feasible)
        self.sampler.open()
        self.sampler.start()
        self._emit(
            ev.TuneStarted(
                self.config.model, self.config.slo.describe(), self.hardware_label, len(feasible), budget,
                len(outcomes), str(self.config.store_path), self.config.slo.ttft_p95_max_s,
                self.config.slo.tok_s_per_user_min, self.objective,
                "; ".join(filter(None, [self.cpu_plan.note, *notes])), self.prediction_note,
            )
        )  # fmt: skip
        for key, done in outcomes.items():  # what a resumed run already knows, so watchers show it too
            self._emit(self._finished_event(key, done))
        stopped: str | None = None
        defaults = self.space.baseline()
        verdict: Verdict | None = None
        error: str | None = None
        try:
            try:
                stopped = self._search(store, outcomes, budget, defaults)
            except TuneError as exc:
                error = str(exc)
            feasible_outcomes = [o for o in outcomes.values() if o.feasible]
            ranked = rank(feasible_outcomes, self.capacity_of, self.distance, self.config.resolution)
            report, verdict = self._finish(outcomes, ranked, defaults, started, stopped, error)
        finally:
            self.sampler.stop()
            trials = store.trials()
            store.close()
            self._store = None
        outputs = report.pop("_outputs", {})
        headline = str(report.get("headline", ""))
        exit_code = int(report.get("exit_code", 0))
        winner = verdict.chosen.candidate if verdict and verdict.chosen else None
        self._emit(
            ev.TuneFinished(
                winner.key() if winner else None, self.label(winner) if winner else None, self.launches,
                time.time() - started, stopped, outputs, verdict.status if verdict else None, headline, exit_code,
            )
        )  # fmt: skip
        return TuneResult(
            winner, defaults, trials, self.launches, stopped, outputs, report, verdict, headline, exit_code
        )

    def _tokenized(self, config: TuneConfig, workload: Workload) -> Workload:
        """A dataset workload tokenised before any launch, by the tokenizer vLLM loads for the model (run by the
        vLLM environment's python): max-model-len is sized from its lengths."""
        assert workload.dataset is not None
        python = python_of(config.command)
        if python is None:
            raise TuneError(
                f"cannot find the python of {' '.join(config.command)} to tokenise {workload.dataset.source}: "
                "give --vllm-python"
            )
        try:
            dataset = tokenize_dataset_locally(
                workload.dataset, python, config.model,
                trust_remote_code="--trust-remote-code" in config.fixed_args,
            ).with_default_output_len(DATASET_OUTPUT_LEN)  # fmt: skip
            check_ids(dataset, self.vocab_size)
            return with_tokens(workload, dataset)
        except (DatasetError, WorkloadError) as exc:
            raise TuneError(str(exc)) from None

    def _for_workload(self, config: TuneConfig, workload: Workload) -> TuneConfig:
        """The config with the workload's mean lengths (for predictions, ceilings and the summary) and, unless
        pinned, max-model-len set to its longest sequence (at most the model's own limit)."""
        context = self.shape.max_position_embeddings
        pin = config.pins.get("max_model_len")  # None: pinned to vLLM's default, the model's own context
        limit = context if pin is None else int(pin)
        cuttable = workload.dataset is not None or workload.trace is not None or workload.sessions is not None
        if cuttable and workload.longest_sequence > limit:
            # Conversations and trace requests longer than the model's context (or a pinned max-model-len) are
            # left out; sessions end within it.
            where = f"the model's {context}-token context" if pin is None else f"max-model-len {limit}"
            try:
                workload, self.workload_note = fit_to_context(workload, limit, where)
            except WorkloadError as exc:
                raise TuneError(str(exc)) from None
        if workload.longest_sequence > context:
            raise TuneError(
                f"the workload's longest request ({workload.longest_sequence} tokens in and out) is longer than "
                f"the model's {context}-token context: give a workload with shorter lengths"
            )
        pins = dict(config.pins)
        if "max_model_len" not in pins:
            pins["max_model_len"] = workload.longest_sequence
        return dataclasses.replace(
            config,
            workload=workload,
            input_len=max(1, round(workload.mean_prompt)),
            output_len=max(1, round(workload.output.mean)),
            pins=pins,
        )

    def _predict(self, feasible: list[Candidate]) -> None:
        """Predict every feasible candidate where a performance model covers this GPU (tuner.predict)."""
        if not self.config.predict:
            self.prediction_note = "no prediction (--no-predict): the search follows the evidence"
            return
        if self.hardware.is_cpu:
            self.prediction_note = "no prediction for vLLM's CPU build: the search follows the evidence"
            return
        if not aic.available():
            self.prediction_note = (
                f"no performance model installed ({aic.INSTALL_HINT}): the search follows the evidence"
            )
            return
        system = aic.system_for(self.hardware.gpu_name)
        if system is None:
            self.prediction_note = (
                f"aiconfigurator has no data for {self.hardware.gpu_name}: the search follows the evidence"
            )
            return
        workload = TokenCounts(self.config.input_len, self.config.output_len)
        try:
            model = aic.AiconfiguratorModel(self.config.model, self.shape, system)
        except PredictError as exc:
            self.prediction_note = f"{exc}: the search follows the evidence"
            return
        for candidate in [self.space.baseline(), *feasible]:
            if candidate.enable_prefix_caching is False:
                continue  # no model knows what the cache is worth: left to the evidence (or the operator's --values)
            with contextlib.suppress(PredictError):  # an option it does not model: that one goes unpredicted
                self.predictions.setdefault(
                    candidate.key(), model.predict(candidate, self.hardware, workload)
                )
        self.prediction_note = f"ranked by {model.source} ({len(self.predictions)} candidates predicted)"

    def predicted_capacity(self, candidate: Candidate) -> float | None:
        prediction = self.predictions.get(candidate.key())
        return None if prediction is None else prediction.capacity(self.config.slo, self.objective)

    def _search(
        self, store: TrialStore, outcomes: dict[str, TrialOutcome], budget: int, defaults: Candidate
    ) -> str | None:
        if any(self.predicted_capacity(c) for c in self.space.feasible()):
            return self._search_predicted(store, outcomes, budget, defaults)
        return self._search_evidence(store, outcomes, budget, defaults)

    def _search_predicted(
        self, store: TrialStore, outcomes: dict[str, TrialOutcome], budget: int, defaults: Candidate
    ) -> str | None:
        """Predict, then measure: vLLM's defaults first (the reference every result is compared with), then the
        best calibrated prediction that could still beat the incumbent (tuner.predict.rank); stops when none
        can. Returns why it stopped early ("interrupted") or None."""
        candidates = {c.key(): c for c in [defaults, *self.space.feasible()]}  # the defaults calibrate too
        predicted = {k: self.predicted_capacity(c) or 0.0 for k, c in candidates.items()}
        ranker = Ranker(
            predicted,
            family=lambda k: (
                candidates[k].quantization,
                candidates[k].kv_cache_dtype,
                candidates[k].tensor_parallel_size,
            ),
        )
        incumbent: TrialOutcome | None = None
        for o in outcomes.values():  # a resumed run's trials calibrate the model too
            if o.candidate.key() in predicted:
                ranker.record(o.candidate.key(), self._measured(o))
            if o.feasible and (incumbent is None or self._prefer(o, incumbent)):
                incumbent = o
        queue: list[tuple[Candidate, str]] = [(defaults, "vLLM's defaults: the configuration to beat")]
        tried: set[str] = set(outcomes)
        while True:
            if self._cancel.is_set():
                return "interrupted"
            if queue:
                candidate, why = queue.pop(0)
            else:
                argued = self._argued_for(incumbent, tried) if incumbent is not None else {}
                key = ranker.next(tried, prefer=list(argued))
                if key is None:
                    self.note = "no untried configuration could beat the best, given the model's error so far"
                    break
                candidate, why = candidates[key], ranker.why(key)
                if key in argued:
                    why = f"{argued[key]}; {why}"
            key = candidate.key()
            if key in tried and key in outcomes:
                continue
            tried.add(key)
            if self.launches >= budget:
                self.note = f"launch budget of {budget} used"
                break
            outcome = self._trial(store, candidate, why, incumbent)
            if outcome is None:
                return "interrupted"
            outcomes[key] = outcome
            if key in predicted:
                ranker.record(key, self._measured(outcome))
            incumbent = self._consider(outcome, incumbent)
        return None

    def _argued_for(self, base: TrialOutcome, tried: set[str]) -> dict[str, str]:
        """Candidate key -> why, for the moves the incumbent's evidence argues for (search.propose_moves),
        best first: where the model cannot tell candidates apart, these go first."""
        current = dataclasses.asdict(resolve(base.candidate, self.hardware, self.shape))
        signals = signals_from(base.capacity, base.candidate.max_num_seqs)
        ladders = {
            name: tuple(v for v in values if v is not None) for name, values in self.space.values.items()
        }
        argued: dict[str, str] = {}
        for move in propose_moves(current, signals, ladders):
            key = base.candidate.with_values(**move.values).key()
            if key not in tried:
                argued.setdefault(key, move.why)
        return argued

    def _defaults_that_fit(self, defaults: Candidate) -> list[tuple[Candidate, str]]:
        """Where vLLM's defaults cannot start (a model too big for one GPU), the defaults at the smallest
        tensor parallelism that fits: the evidence search has no move for TP and would have nowhere to start."""
        if self.space.check(defaults).ok or defaults.tensor_parallel_size is not None:
            return []
        for tp in sorted(v for v in self.space.values.get("tensor_parallel_size", ()) if v):
            candidate = defaults.with_values(tensor_parallel_size=tp)
            if self.space.check(candidate).ok:
                return [(candidate, f"vLLM's defaults do not fit one GPU: the defaults at TP {tp}")]
        return []

    def _measured(self, outcome: TrialOutcome) -> float:
        """A trial's capacity in the objective's unit (0: it failed or nothing met the SLO)."""
        return (outcome.capacity.lo or 0.0) if outcome.feasible and outcome.capacity else 0.0

    def _consider(self, outcome: TrialOutcome, incumbent: TrialOutcome | None) -> TrialOutcome | None:
        """The incumbent after ``outcome``: it, when it beats the incumbent or ties closer to the defaults."""
        if not outcome.feasible or (incumbent is not None and not self._prefer(outcome, incumbent)):
            return incumbent
        tie = incumbent is not None and not beats(
            self.capacity_of(outcome), self.capacity_of(incumbent), self.config.resolution
        )
        note = (
            f"ties with {self.label(incumbent.candidate)} within the uncertainty; kept the one closer to "
            "vLLM's defaults"
            if tie and incumbent is not None
            else ""
        )
        best = self.capacity_of(outcome).best
        assert best is not None
        self._emit(
            ev.BestChanged(
                outcome.candidate.key(), self.label(outcome.candidate), best.output_tokens_per_s, best.load.label(),
                note,
            )
        )  # fmt: skip
        return outcome

    def _search_evidence(
        self, store: TrialStore, outcomes: dict[str, TrialOutcome], budget: int, defaults: Candidate
    ) -> str | None:
        """Coordinate search from vLLM's defaults. Returns why it stopped early ("interrupted") or None."""
        incumbent: TrialOutcome | None = None
        queue: list[tuple[Candidate, str]] = [(defaults, "vLLM's defaults: the configuration to beat")]
        queue += self._defaults_that_fit(defaults)
        tried: set[str] = set()
        for o in outcomes.values():  # a resumed run's incumbent
            if o.feasible and (incumbent is None or self._prefer(o, incumbent)):
                incumbent = o
        while queue:
            if self._cancel.is_set():
                return "interrupted"
            candidate, why = queue.pop(0)
            if candidate.key() in tried:
                continue
            tried.add(candidate.key())
            outcome = outcomes.get(candidate.key())
            if outcome is None:
                if self.launches >= budget:
                    self.note = f"launch budget of {budget} used"
                    break
                outcome = self._trial(store, candidate, why, incumbent)
                if outcome is None:
                    return "interrupted"
                outcomes[candidate.key()] = outcome
            if outcome.failure_kind == "unsupported_option" or "(unsupported option)" in outcome.reason:
                self._rejected.update(self._moves.get(candidate.key(), {}).items())
            incumbent = self._consider(outcome, incumbent)
            if not queue:
                queue = self._next_moves(incumbent or outcome, tried)
        return None

    def label(self, candidate: Candidate) -> str:
        """The candidate's short label; the baseline says that it is vLLM's defaults (plus any pins)."""
        if candidate == self.space.baseline():
            pinned = candidate.label()
            return "vLLM defaults" + (f" ({pinned})" if pinned != "vLLM defaults" else "")
        return candidate.label()

    def distance(self, outcome: TrialOutcome) -> int:
        """How far a configuration is from vLLM's defaults: the dimensions it sets beyond the pins."""
        baseline = self.space.baseline().config_dict()
        return sum(1 for k, v in outcome.candidate.config_dict().items() if baseline.get(k) != v)

    @staticmethod
    def capacity_of(outcome: TrialOutcome) -> Capacity:
        assert outcome.capacity is not None
        return outcome.capacity

    def _prefer(self, new: TrialOutcome, incumbent: TrialOutcome) -> bool:
        """``new`` replaces the incumbent: it beats it, or ties with it closer to vLLM's defaults."""
        res = self.config.resolution
        a, b = self.capacity_of(new), self.capacity_of(incumbent)
        if beats(a, b, res):
            return True
        return ties_with(a, b, res) and self.distance(new) < self.distance(incumbent)

    def _emit(self, event: ev.TuneEvent) -> None:
        with contextlib.suppress(Exception):  # a broken listener must not end the run
            self._listener(event)

    def _next_moves(self, base: TrialOutcome, tried: set[str]) -> list[tuple[Candidate, str]]:
        # Step from the values the server really ran with (None = vLLM's default, e.g. 128 sequences on CPU).
        current = dataclasses.asdict(resolve(base.candidate, self.hardware, self.shape))
        signals = signals_from(base.capacity, base.candidate.max_num_seqs)
        ladders = {
            name: tuple(v for v in values if v is not None) for name, values in self.space.values.items()
        }
        for move in propose_moves(current, signals, ladders):
            if any((name, value) in self._rejected for name, value in move.values.items()):
                continue  # vLLM refused this value outright on this machine: no other combination will start
            candidate = base.candidate.with_values(**move.values)
            if candidate.key() not in tried:
                self._moves[candidate.key()] = dict(move.values)
                return [(candidate, move.why)]
        return []

    # --- servers: recorded while they run, stopped on resume if an earlier run left them -------------------

    def _server_started(self, key: str, pid: int, port: int) -> None:
        if self._store is not None:
            self._store.record_server(key, pid, port, create_time_of(pid))

    def _server_stopped(self, pid: int) -> None:
        if self._store is not None:
            self._store.forget_server(pid)

    def _stop_leftovers(self, store: TrialStore) -> list[str]:
        notes = []
        for record in store.servers():
            if stop_leftover(record.pid, record.create_time):
                notes.append(
                    f"stopped the vLLM server an earlier run left (pid {record.pid}, port {record.port})"
                )
            store.forget_server(record.pid)
        return notes

    # --- one trial -------------------------------------------------------------------------------------------

    def _trial(
        self, store: TrialStore, candidate: Candidate, why: str, incumbent: TrialOutcome | None
    ) -> TrialOutcome | None:
        feasibility = self.space.check(candidate)
        explicit = any(getattr(candidate, k) is not None for k in self.explicit)
        if not feasibility.ok and not explicit:
            reason = "; ".join(feasibility.reasons) or "predicted not to fit"
            store.record_result(candidate, TrialStatus.INFEASIBLE, reason)
            outcome = TrialOutcome(candidate, TrialStatus.INFEASIBLE, f"not launched: {reason}")
            self._emit(self._finished_event(candidate.key(), outcome))
            return outcome
        self.launches += 1
        key = candidate.key()
        self._emit(
            ev.TrialStarted(
                key, self.label(candidate), candidate.config_dict(), self.launches, why,
                self.predicted_capacity(candidate),
            )
        )  # fmt: skip
        store.record_start(candidate)
        runner = self.runner()
        plan = CapacityPlan(
            objective=self.objective,
            max_users=max(
                1,
                min(self.config.max_concurrency, 2 * (candidate.max_num_seqs or self.config.max_concurrency)),
            ),
            resolution=self.config.resolution,
        )
        startup_s: float | None = None
        try:
            with runner.serve(key, candidate.vllm_args(), key) as session:
                startup_s = session.startup_s
                capacity = find_capacity(session.measure, plan, self._cancel.is_set)
                load = (
                    separating_load(capacity, incumbent.capacity, self.objective)
                    if incumbent and incumbent.capacity
                    else None
                )
                if load is not None and not self._cancel.is_set() and not _died(capacity):
                    # Tied so far: one more point at the load the incumbent failed tells them apart.
                    capacity = capacity.with_point(session.measure(load, "judged"))
                log_tail = session.server.log_tail(30) if _died(capacity) else ""
        except LaunchError as exc:
            outcome = TrialOutcome(
                candidate, TrialStatus.FAILED, exc.summary, log_tail=exc.log_tail, failure_kind=exc.kind.value
            )
            store.record_result(candidate, outcome.status, outcome.reason, log_tail=exc.log_tail)
            self._emit(self._finished_event(key, outcome))
            return outcome
        except AllRequestsFailed as exc:
            reason = f"the server refused every request: {exc}"
            store.record_result(candidate, TrialStatus.FAILED, reason, startup_s=startup_s)
            outcome = TrialOutcome(candidate, TrialStatus.FAILED, reason, startup_s=startup_s)
            self._emit(self._finished_event(key, outcome))
            if candidate == self.space.baseline():
                raise TuneError(f"vLLM's defaults: {reason}") from None  # the workload itself is refused
            return outcome
        except KeyboardInterrupt:
            store.record_result(candidate, TrialStatus.INTERRUPTED, "interrupted")
            return None
        if self._cancel.is_set():
            store.record_result(
                candidate, TrialStatus.INTERRUPTED, "interrupted", capacity=capacity.to_dict()
            )
            self._emit(ev.TrialFinished(key, self.label(candidate), "interrupted", "interrupted"))
            return None
        if _died(capacity):
            status, reason = (
                TrialStatus.FAILED,
                f"the server stopped answering during the search ({capacity.note})",
            )
        elif capacity.best is None:
            status, reason = TrialStatus.INFEASIBLE, f"no load met the SLO: {capacity.note}"
        else:
            status, reason = (
                TrialStatus.FEASIBLE,
                f"{capacity.describe()}; {capacity.best.output_tokens_per_s:,.0f} tok/s",
            )
        best = capacity.best
        store.record_result(
            candidate, status, reason, capacity=capacity.to_dict(),
            best=BestPoint(best.load.value, best.output_tokens_per_s, best.load.kind) if best else None,
            log_tail=log_tail or None, startup_s=startup_s,
        )  # fmt: skip
        outcome = TrialOutcome(candidate, status, reason, capacity, log_tail, startup_s)
        self._emit(self._finished_event(key, outcome))
        return outcome

    def _finished_event(self, key: str, o: TrialOutcome) -> ev.TrialFinished:
        best = o.capacity.best if o.capacity else None
        measured = self._measured(o) if o.status is TrialStatus.FEASIBLE else None
        return ev.TrialFinished(
            key, self.label(o.candidate), o.status.value, o.reason, best.load.label() if best else None,
            best.output_tokens_per_s if best else None, o.log_tail, o.capacity.describe() if o.capacity else "",
            self.predicted_capacity(o.candidate), measured,
        )  # fmt: skip

    # --- the end: export, verdict, report -------------------------------------------------------------------

    def _finish(
        self,
        outcomes: Mapping[str, TrialOutcome],
        ranked: list[TrialOutcome],
        defaults: Candidate,
        started: float,
        stopped: str | None,
        error: str | None,
    ) -> tuple[dict[str, Any], Verdict | None]:
        from tuner.report.write import write_report

        out = self.config.out_dir
        out.mkdir(parents=True, exist_ok=True)
        outputs: dict[str, str] = {}
        contenders = [Contender(o.candidate, self.label(o.candidate), self.capacity_of(o)) for o in ranked]
        defaults_outcome = outcomes.get(defaults.key())
        defaults_capacity = defaults_outcome.capacity if defaults_outcome else None
        yaml_path = out / "best.yaml"
        verdict: Verdict | None = None
        if contenders:

            def write_yaml(contender: Contender, status_line: str) -> Path:
                yaml_path.write_text(export_text(self, contender, status_line))
                return yaml_path

            if self.config.prove and not self._cancel.is_set():
                verdict = reach_verdict(
                    self.runner(),
                    contenders,
                    write_yaml,
                    self.config.verdict,
                    defaults_capacity=defaults_capacity,
                    first_launch=self.launches + 1,
                )
            elif not self.config.prove:
                verdict = unverified(contenders[0])
            chosen = verdict.chosen if verdict and verdict.chosen else contenders[0]
            status_line = (
                verdict.headline if verdict else "NOT PROVEN: the run was interrupted before the proof"
            )
            write_yaml(chosen, status_line)
            outputs["yaml"] = str(yaml_path)
        headline, exit_code = run_headline(self, verdict, contenders, stopped, error, outcomes)
        report = build_report(
            self, outcomes, ranked, defaults, started, stopped, verdict, headline, exit_code
        )
        written = write_report(report, out)
        outputs.update({k: str(v) for k, v in written.items() if not isinstance(v, list)})
        report["_outputs"] = outputs
        if verdict is not None:
            op = verdict.operating_point
            self._emit(
                ev.VerdictReached(
                    verdict.status, headline, verdict.chosen.candidate.key() if verdict.chosen else None,
                    verdict.chosen.label if verdict.chosen else None, op.load.label() if op else None, exit_code,
                )
            )  # fmt: skip
        return report, verdict


def _died(capacity: Capacity) -> bool:
    return any(p.aborted and p.aborted != "interrupted" for p in capacity.points)


def _outcome_from_record(record: TrialRecord) -> TrialOutcome:
    capacity = Capacity.from_dict(record.capacity) if record.capacity else None
    return TrialOutcome(
        record.candidate,
        record.status,
        record.reason or "",
        capacity,
        record.log_tail or "",
        record.startup_s,
    )
