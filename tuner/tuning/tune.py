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
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.loadgen.dataset import DatasetError, check_ids, tokenize_dataset_locally
from tuner.loadgen.vocab import vocab_size_from_dir
from tuner.loadgen.workload import DATASET_OUTPUT_LEN, Workload, WorkloadError, fit_to_context, with_tokens
from tuner.outputs import write_private
from tuner.predict import aic
from tuner.predict.base import PredictError, Prediction
from tuner.predict.base import Workload as TokenCounts
from tuner.serving.affinity import pin_process, plan_cpus
from tuner.serving.launcher import LaunchError, python_of
from tuner.serving.leftovers import create_time_of, stop_leftover
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
from tuner.tuning.config import TuneConfig
from tuner.tuning.dryrun import DryRun, plan_dry_run
from tuner.tuning.executor import Done, Executor, Job
from tuner.tuning.layout import Layout, NodeCapacity, layout_for
from tuner.tuning.machine import detect_node
from tuner.tuning.modelshape import ModelShape, SpaceError
from tuner.tuning.nodeexport import every_replica, write_data_parallel, write_replicas
from tuner.tuning.outcome import TrialOutcome
from tuner.tuning.placement import Placement
from tuner.tuning.points import RATE, USERS, Load
from tuner.tuning.runner import AllRequestsFailed, EngineUrls, MeasurePlan, ServerHooks, TrialRunner
from tuner.tuning.search import propose_moves, signals_from
from tuner.tuning.space import Candidate, SearchSpace, default_space, resolve
from tuner.tuning.store import BestPoint, RunMeta, TrialRecord, TrialStatus, TrialStore
from tuner.tuning.strategy import EvidenceStrategy, PredictedStrategy, Strategy
from tuner.tuning.verdict import (
    Contender,
    Verdict,
    reach_verdict,
    unverified,
)

GiB = 2**30
OBJECTIVES = {"rate": RATE, "throughput": RATE, "users": USERS}
"""--objective: "rate" (default; "throughput" is the same: the highest sustained arrival rate is the most
throughput a server gives within the SLO) or "users"."""


class TuneError(RuntimeError):
    """The run cannot start or go on (model, hardware, store, a workload the server refuses). One line."""


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
        try:
            self.node_info = detect_node(config.gpus, config.env, gpu_ids=config.gpu_ids, nvml=config.nvml)
        except SpaceError as exc:
            raise TuneError(str(exc)) from None
        self.hardware, self.hardware_label = self.node_info.hardware, self.node_info.label
        if config.simulated:
            self.hardware_label = f"SIMULATED {self.hardware_label} (scripted NVML, not this machine)"
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
        node = self.node_info.node
        if node.is_cpu or config.pin_cpus != "auto":
            # The CPU build's one slot, split as planned; on GPUs, the operator's own split (or "off") holds for
            # every trial instead of the cores near each trial's GPUs.
            node.cpu_plan = self.cpu_plan
        self.node = node
        if config.parallel is not None and config.parallel < 1:
            raise TuneError(f"--parallel must be at least 1, got {config.parallel}")
        self.parallel = 1 if node.is_cpu else min(config.parallel or node.size, node.size)
        self.explicit = set(config.values)  # operator-chosen ladders are launched even if predicted to fail
        self.sampler = Sampler(
            LiveSource(
                (NvmlBackend(nvml=config.nvml) if config.nvml is not None else NvmlBackend())
                if config.gpus and not self.hardware.is_cpu
                else None,
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
        self._emit_lock = threading.Lock()  # trials side by side emit from their own threads
        self.engines = EngineUrls(self.sampler)
        self._trial_s: list[float] = []  # wall times of the trials that ran (launch to stop), for the ETA
        self.predictions: dict[str, Prediction] = {}  # candidate key -> the model's prediction
        self.prediction_note = ""  # the model's source, or why candidates are not predicted

    # --- the run ---------------------------------------------------------------------------------------------

    def runner(self, placement: Placement | None = None) -> TrialRunner:
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
            hooks=ServerHooks(self._server_started, self._server_stopped), placement=placement,
            engines=self.engines, workers=self._client_workers(placement),
        )  # fmt: skip

    def _client_workers(self, placement: Placement | None) -> int:
        """Load-generator processes per phase. A trial's: one per core of its client's share (at most 4), so a
        small model on a fast GPU is not measured at one Python process's pace. The node proof's: half the
        host's cores over the replicas (at most 4 each). One (in this process) on the CPU build and small hosts."""
        if self.hardware.is_cpu:
            return 1
        if placement is not None:
            return max(1, min(4, len(placement.client_cpus or ())))
        cores = len(self.node.cores) or (os.cpu_count() or 1)
        replicas = max(1, self.hardware.gpu_count)
        return max(1, min(4, cores // 2 // replicas))

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

    def launch_budget(self, feasible: list[Candidate]) -> int:
        """The most launches: --budget, else a third of the grid. The prefix cache off is one evidence move at
        most (search.propose_moves), not a second grid: it adds one launch, not a third of the candidates."""
        core = [c for c in feasible if c.enable_prefix_caching is not False]
        return self.config.launch_budget or max(3, -(-len(core) // 3)) + (len(core) < len(feasible))

    def dry_run(self) -> DryRun:
        """What the search would do here, launching nothing (tuner.tuning.dryrun)."""
        return plan_dry_run(self)

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

    def _make_run_dir(self) -> None:
        """The run's directory (logs, report, exported files), private when this run creates it: vLLM's logs and
        the report carry its command line and what it printed, which are nobody else's to read."""
        out = self.config.out_dir
        try:
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TuneError(f"cannot create --out {out}: {exc.strerror or exc}") from None

    def _run(self) -> TuneResult:
        started = time.time()
        self._make_run_dir()
        feasible = self.space.feasible()
        budget = self.launch_budget(feasible)
        meta = self._meta()
        store_path = self.config.store_path
        if (store_path.exists() or store_path.is_symlink()) and not self.resume:  # a link is never followed
            raise TuneError(f"{store_path} exists: pass --resume to continue that run, or another --store")
        store = self._store = TrialStore.open(self.config.store_path, run_meta=meta)
        notes = [*self._stop_leftovers(store), self.workload_note]
        outcomes: dict[str, TrialOutcome] = {
            r.key: TrialOutcome.from_record(r)
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
                "; ".join(filter(None, [self.cpu_plan.note, *notes])), self.prediction_note, self.node.gpus,
                self.parallel, plan_dry_run(self, predict=False).parallel_s if not outcomes else None,
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
        if workload.longest_sequence > limit:
            # Nothing vLLM must refuse is sent: conversations and trace requests longer than the model's context
            # (or a pinned max-model-len) are left out, sessions end within it, and lengths drawn from a
            # distribution are drawn again within it (the note says how often and what that changes).
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

    def predict_candidates(self, feasible: list[Candidate]) -> bool:
        """Predict the candidates once (the dry run and the run share them); whether any was predicted."""
        if not self.predictions and not self.prediction_note:
            self._predict(feasible)
        return bool(self.predictions)

    def predicted_capacity(self, candidate: Candidate) -> float | None:
        prediction = self.predictions.get(candidate.key())
        return None if prediction is None else prediction.capacity(self.config.slo, self.objective)

    def _search(
        self, store: TrialStore, outcomes: dict[str, TrialOutcome], budget: int, defaults: Candidate
    ) -> str | None:
        """Run trials, side by side where the node has the GPUs, until the strategy has nothing left worth a
        launch or the budget is used. Returns why it stopped early ("interrupted") or None.

        The strategy (predict-then-measure where a performance model covers the GPU, else the evidence search
        from vLLM's defaults) proposes candidates best first; each starts as soon as its GPUs are free, the best
        waiting for its own rather than being overtaken. Each ending trial is recorded, the strategy recalibrated
        and asked again."""
        predicted = any(self.predicted_capacity(c) for c in self.space.feasible())
        strategy: Strategy = (
            PredictedStrategy(self, outcomes, defaults) if predicted else EvidenceStrategy(self, defaults)
        )
        if not predicted:  # a resumed run's trials: the evidence walks on from them (the defaults' last)
            for o in sorted(outcomes.values(), key=lambda o: o.candidate.key() == defaults.key()):
                strategy.record(o)
        executor: Executor[TrialOutcome] = Executor(self.node, self._run_job, self._cancel, self.parallel)
        self._jobs: dict[str, tuple[Candidate, TrialOutcome | None]] = {}
        self._submitted = self.launches
        tried: set[str] = set(outcomes)
        incumbent = self._incumbent(outcomes.values())
        while True:
            if self._cancel.is_set():
                self._keep_drained(executor.drain(), outcomes, strategy)
                return "interrupted"
            self._fill(strategy, executor, store, outcomes, tried, incumbent, budget)
            done = executor.wait()
            if done is None:
                break
            outcome = self._collect(done, executor, outcomes, strategy)
            if outcome is None:
                continue  # interrupted: the loop's first check returns
            outcomes[outcome.candidate.key()] = outcome
            strategy.record(outcome)
            incumbent = self._consider(outcome, incumbent)
            self._eta(strategy, executor, budget)
        return None

    def _collect(
        self,
        done: Done[TrialOutcome],
        executor: Executor[TrialOutcome],
        outcomes: dict[str, TrialOutcome],
        strategy: Strategy,
    ) -> TrialOutcome | None:
        """A finished job's outcome; a trial whose code raised stops the search (the others are stopped first,
        and what they finished is kept)."""
        self._jobs.pop(done.job.key, None)
        self._trial_s.append(done.wall_s)
        if done.error is not None:
            asked = self._cancel.is_set()  # the operator's own stop must survive this one
            self._cancel.set()  # the others stop within seconds; their trials are kept as interrupted
            self._keep_drained(executor.drain(), outcomes, strategy)
            if not asked:
                self._cancel.clear()
            raise done.error
        return done.result

    def _keep_drained(
        self, drained: list[Done[TrialOutcome]], outcomes: dict[str, TrialOutcome], strategy: Strategy
    ) -> None:
        """Trials that ended while the others were being stopped: what they finished is part of this run."""
        for done in drained:
            self._jobs.pop(done.job.key, None)
            if done.result is not None and done.error is None:
                outcomes[done.result.candidate.key()] = done.result
                strategy.record(done.result)

    def _run_job(self, job: Job, placement: Placement) -> TrialOutcome | None:
        """One trial on its placement, on the executor's thread."""
        candidate, incumbent = self._jobs[job.key]
        assert self._store is not None
        return self._trial(self._store, candidate, job.why, incumbent, placement)

    def _fill(
        self,
        strategy: Strategy,
        executor: Executor[TrialOutcome],
        store: TrialStore,
        outcomes: dict[str, TrialOutcome],
        tried: set[str],
        incumbent: TrialOutcome | None,
        budget: int,
    ) -> None:
        """Start what the strategy proposes while GPUs are free: the best first, then others that fit beside it
        (tuner.tuning.placement.pack_batch's rule). Candidates that cannot start are recorded without a launch."""
        while not self._cancel.is_set():
            proposals = strategy.propose(tried, incumbent)
            if not proposals:
                if not executor.running and strategy.stop_note and self.note is None:
                    self.note = strategy.stop_note
                return
            started = False
            for i, (candidate, why) in enumerate(proposals):
                key = candidate.key()
                if not self._can_start(candidate):
                    tried.add(key)
                    outcome = self._trial(store, candidate, why, incumbent)  # recorded, not launched
                    if outcome is not None:
                        outcomes[key] = outcome
                        strategy.record(outcome)
                    started = True
                    break
                if self._submitted >= budget:
                    self.note = f"launch budget of {budget} used"
                    return
                tp = candidate.tensor_parallel_size or 1
                if executor.has_room(tp):
                    self._jobs[key] = (candidate, incumbent)
                    executor.submit(Job(key, tp, why))
                    self._submitted += 1
                    tried.add(key)
                    started = True
                    break
                if i == 0:
                    return  # the best contender waits for its GPUs rather than be overtaken
            if not started:
                return

    def _can_start(self, candidate: Candidate) -> bool:
        """Whether a candidate is worth a launch: it fits, or the operator asked for its values explicitly."""
        explicit = any(getattr(candidate, k) is not None for k in self.explicit)
        return self.space.check(candidate).ok or explicit

    def _incumbent(self, outcomes: Iterable[TrialOutcome]) -> TrialOutcome | None:
        best: TrialOutcome | None = None
        for o in outcomes:
            if o.feasible and (best is None or self._prefer(o, best)):
                best = o
        return best

    def _eta(self, strategy: Strategy, executor: Executor[TrialOutcome], budget: int) -> None:
        """Tell watchers how long the rest should take: the launches left (the strategy's contenders, at most
        the budget left) at the trial time seen so far, over the slots, plus the proof."""
        left = max(0, min(strategy.expected_left(), budget - self._submitted)) + len(executor.running)
        per_trial = sorted(self._trial_s)[len(self._trial_s) // 2] if self._trial_s else None
        if per_trial is None:
            self._emit(ev.EtaUpdated(None, left + 1, "no trial has ended yet"))
            return
        waves = -(-left // max(1, self.parallel))
        remaining = (waves + (1 if self.config.prove else 0)) * per_trial
        basis = (
            f"{left} launch{'es' if left != 1 else ''} left on {self.parallel} slot"
            f"{'s' if self.parallel != 1 else ''} at ~{per_trial / 60:.1f} min each"
            + (", then the proof" if self.config.prove else "")
        )
        self._emit(ev.EtaUpdated(remaining, left + (1 if self.config.prove else 0), basis))

    # --- the node -------------------------------------------------------------------------------------------

    def layout(self, candidate: Candidate) -> Layout:
        """How ``candidate`` fills the node: replicas x TP, idle GPUs counted as lost."""
        return layout_for(candidate.tensor_parallel_size, self.hardware.gpu_count)

    def predicted_node(self, candidate: Candidate) -> float | None:
        """The model's capacity for the whole node: one server's times the replicas the node holds."""
        predicted = self.predicted_capacity(candidate)
        return None if predicted is None else predicted * self.layout(candidate).replicas

    def argued_for(self, base: TrialOutcome, tried: set[str]) -> dict[str, str]:
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

    def defaults_that_fit(self, defaults: Candidate) -> list[tuple[Candidate, str]]:
        """Where vLLM's defaults cannot start (a model too big for one GPU), the defaults at the smallest
        tensor parallelism that fits: the evidence search has no move for TP and would have nowhere to start."""
        if self.space.check(defaults).ok or defaults.tensor_parallel_size is not None:
            return []
        for tp in sorted(v for v in self.space.values.get("tensor_parallel_size", ()) if v):
            candidate = defaults.with_values(tensor_parallel_size=tp)
            if self.space.check(candidate).ok:
                return [(candidate, f"vLLM's defaults do not fit one GPU: the defaults at TP {tp}")]
        return []

    def note_refusal(self, outcome: TrialOutcome) -> None:
        """A value vLLM refused as unsupported is not tried again with other settings."""
        if outcome.failure_kind == "unsupported_option" or "(unsupported option)" in outcome.reason:
            self._rejected.update(self._moves.get(outcome.candidate.key(), {}).items())

    def node_measured(self, outcome: TrialOutcome) -> float:
        return self._measured(outcome)

    def _measured(self, outcome: TrialOutcome) -> float:
        """A trial's capacity for the whole node in the objective's unit (0: it failed or nothing met the SLO)."""
        return (self.capacity_of(outcome).lo or 0.0) if outcome.feasible and outcome.capacity else 0.0

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

    def capacity_of(self, outcome: TrialOutcome) -> NodeCapacity:
        """The node's capacity with this trial's configuration: its server's times the replicas the node holds."""
        assert outcome.capacity is not None
        return NodeCapacity(outcome.capacity, self.layout(outcome.candidate).replicas)

    def _prefer(self, new: TrialOutcome, incumbent: TrialOutcome) -> bool:
        """``new`` replaces the incumbent: it beats it, or ties with it closer to vLLM's defaults."""
        res = self.config.resolution
        a, b = self.capacity_of(new), self.capacity_of(incumbent)
        if beats(a, b, res):
            return True
        return ties_with(a, b, res) and self.distance(new) < self.distance(incumbent)

    def _emit(self, event: ev.TuneEvent) -> None:
        # Trials side by side emit from their own threads: one at a time, so a listener sees them in order.
        with self._emit_lock, contextlib.suppress(Exception):  # a broken listener must not end the run
            self._listener(event)

    def next_moves(
        self, base: TrialOutcome, tried: set[str], *, record: bool = True
    ) -> list[tuple[Candidate, str]]:
        """Every untried move the evidence of ``base`` argues for, best first (``record``: remember which values
        each move changed, so a refusal of one is not tried again; False only counts them)."""
        # Step from the values the server really ran with (None = vLLM's default, e.g. 128 sequences on CPU).
        current = dataclasses.asdict(resolve(base.candidate, self.hardware, self.shape))
        signals = signals_from(base.capacity, base.candidate.max_num_seqs)
        ladders = {
            name: tuple(v for v in values if v is not None) for name, values in self.space.values.items()
        }
        moves: list[tuple[Candidate, str]] = []
        for move in propose_moves(current, signals, ladders):
            if any((name, value) in self._rejected for name, value in move.values.items()):
                continue  # vLLM refused this value outright on this machine: no other combination will start
            candidate = base.candidate.with_values(**move.values)
            if candidate.key() not in tried and all(candidate.key() != c.key() for c, _ in moves):
                if record:
                    self._moves[candidate.key()] = dict(move.values)
                moves.append((candidate, move.why))
        return moves

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
        self,
        store: TrialStore,
        candidate: Candidate,
        why: str,
        incumbent: TrialOutcome | None,
        placement: Placement | None = None,
    ) -> TrialOutcome | None:
        """Launch ``candidate`` on ``placement`` (its GPUs and cores), search its server's capacity, store it, stop
        it. A candidate that cannot start is recorded without a launch. Runs on an executor thread."""
        feasibility = self.space.check(candidate)
        explicit = any(getattr(candidate, k) is not None for k in self.explicit)
        if not feasibility.ok and not explicit:
            reason = "; ".join(feasibility.reasons) or "predicted not to fit"
            store.record_result(candidate, TrialStatus.INFEASIBLE, reason)
            outcome = TrialOutcome(candidate, TrialStatus.INFEASIBLE, f"not launched: {reason}")
            self._emit(self._finished_event(candidate.key(), outcome))
            return outcome
        with self._emit_lock:
            self.launches += 1
            index = self.launches
        key = candidate.key()
        gpus = placement.gpus if placement else ()
        self._emit(
            ev.TrialStarted(
                key, self.label(candidate), candidate.config_dict(), index, why,
                self.predicted_capacity(candidate), gpus, self.layout(candidate).label(),
            )
        )  # fmt: skip
        store.record_start(candidate)
        runner = self.runner(placement)
        if self.parallel > 1:
            # Beside other trials the host is never quiet: measuring again would not make it so. Disturbed
            # points are kept and flagged (the proof runs alone and has the last word).
            runner.plan = dataclasses.replace(runner.plan, remeasures=0)
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
            # Its own log: trials side by side must not share (and truncate, and misread) one file.
            with runner.serve(key, candidate.vllm_args(), f"{index:03d}-{key[:50]}") as session:
                startup_s = session.startup_s
                capacity = find_capacity(session.measure, plan, self._cancel.is_set)
                load = self._separating_load(candidate, capacity, incumbent)
                if load is not None and not self._cancel.is_set() and not _died(capacity):
                    # Tied so far: one more point at the load the incumbent failed tells them apart.
                    capacity = capacity.with_point(session.measure(load, "judged"))
                log_tail = session.server.log_tail(30) if _died(capacity) else ""
        except LaunchError as exc:
            outcome = TrialOutcome(
                candidate, TrialStatus.FAILED, exc.summary, log_tail=exc.log_tail, failure_kind=exc.kind.value,
                gpus=gpus,
            )  # fmt: skip
            store.record_result(candidate, outcome.status, outcome.reason, log_tail=exc.log_tail)
            self._emit(self._finished_event(key, outcome))
            return outcome
        except AllRequestsFailed as exc:
            reason = f"the server refused every request: {exc}"
            store.record_result(candidate, TrialStatus.FAILED, reason, startup_s=startup_s)
            outcome = TrialOutcome(candidate, TrialStatus.FAILED, reason, startup_s=startup_s, gpus=gpus)
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
        outcome = TrialOutcome(candidate, status, reason, capacity, log_tail, startup_s, gpus=gpus)
        self._emit(self._finished_event(key, outcome))
        return outcome

    def _separating_load(
        self, candidate: Candidate, capacity: Capacity, incumbent: TrialOutcome | None
    ) -> Load | None:
        """The one load (on this server) that could tell this layout from a tied incumbent: the node load the
        incumbent's layout failed, over this layout's replicas."""
        if incumbent is None or incumbent.capacity is None:
            return None
        mine, theirs = self.layout(candidate).replicas, self.layout(incumbent.candidate).replicas
        if mine == theirs:
            return separating_load(capacity, incumbent.capacity, self.objective)
        node_hi = self.capacity_of(incumbent).hi
        if capacity.lo is None or node_hi is None or mine < 1:
            return None
        per_server = node_hi / mine
        if capacity.lo >= per_server or (capacity.hi is not None and capacity.hi <= per_server):
            return None
        if self.objective == RATE:
            return Load.rate(per_server)
        users = math.ceil(per_server)
        return Load.users(users) if capacity.lo < users else None

    def _finished_event(self, key: str, o: TrialOutcome) -> ev.TrialFinished:
        best = o.capacity.best if o.capacity else None
        server = (o.capacity.lo or 0.0) if o.feasible and o.capacity else 0.0
        measured = server if o.status is TrialStatus.FEASIBLE else None
        node = self._measured(o) if o.status is TrialStatus.FEASIBLE else None
        return ev.TrialFinished(
            key, self.label(o.candidate), o.status.value, o.reason, best.load.label() if best else None,
            best.output_tokens_per_s if best else None, o.log_tail, o.capacity.describe() if o.capacity else "",
            self.predicted_capacity(o.candidate), measured, o.gpus, self.layout(o.candidate).label(), node,
            o.disturbed,
        )  # fmt: skip

    # --- the end: export, verdict, report -------------------------------------------------------------------

    def contender(self, outcome: TrialOutcome) -> Contender:
        """A ranked trial as the verdict tries it: its layout's replicas and a label that names the layout."""
        assert outcome.capacity is not None
        layout = self.layout(outcome.candidate)
        label = self.label(outcome.candidate)
        if self.hardware.gpu_count > 1:
            label = f"{label} as {layout.label()}"
        return Contender(outcome.candidate, label, outcome.capacity, layout.replicas)

    def proof_placements(self, contender: Contender) -> list[Placement]:
        """Where each replica of the contender's layout runs for the proof: the whole node, one block each."""
        return every_replica(self.node, contender.candidate.tensor_parallel_size or 1, contender.replicas)

    def _write_dp(self, contender: Contender, status_line: str, out: Path) -> Path:
        return write_data_parallel(self, contender, status_line, out)

    def _write_replicas(self, contender: Contender, status_line: str, out: Path) -> dict[str, str]:
        return write_replicas(self, contender, status_line, out, self.proof_placements(contender))

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
        outputs: dict[str, str] = {}
        contenders = [self.contender(o) for o in ranked]
        defaults_outcome = outcomes.get(defaults.key())
        defaults_capacity = (
            self.capacity_of(defaults_outcome) if defaults_outcome and defaults_outcome.capacity else None
        )
        yaml_path = out / "best.yaml"
        verdict: Verdict | None = None
        if contenders:

            def write_yaml(contender: Contender, status_line: str) -> Path:
                write_private(yaml_path, export_text(self, contender, status_line), force=True)
                outputs.update(self._write_replicas(contender, status_line, out))
                return yaml_path

            if self.config.prove and not self._cancel.is_set():
                verdict = reach_verdict(
                    self.runner(),
                    contenders,
                    write_yaml,
                    self.config.verdict,
                    defaults_capacity=defaults_capacity,
                    first_launch=self.launches + 1,
                    placements_for=self.proof_placements,
                    write_dp_yaml=lambda contender, status: self._write_dp(contender, status, out),
                )
            elif not self.config.prove:
                verdict = unverified(contenders[0])
            chosen = verdict.chosen if verdict and verdict.chosen else contenders[0]
            status_line = (
                verdict.headline if verdict else "NOT PROVEN: the run was interrupted before the proof"
            )
            write_yaml(chosen, status_line)
            dp_path = out / "best-dp.yaml"
            if verdict is not None and verdict.export_as == "data_parallel":
                # One server serves the node as well as the replicas did: the simpler thing to run is exported.
                text = export_text(self, chosen, status_line, data_parallel=chosen.replicas)
                write_private(yaml_path, text, force=True)
                dp_path.unlink(missing_ok=True)
            else:
                dp_path.unlink(missing_ok=True)  # measured and not exported: the report says why
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
