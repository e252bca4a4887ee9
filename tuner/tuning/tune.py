"""`infertop tune`: launch vLLM with candidate settings, find each one's best load under the SLO, keep the best.

One trial = launch a candidate, search its concurrency (no relaunch), store the result, stop the server. The
search starts at vLLM's defaults and follows the evidence (tuner/tuning/search.py). Every trial is saved when it ends,
so Ctrl-C or a crash loses nothing and ``--resume`` carries on. At the end the winner is exported as a
``vllm serve --config`` file, proven by relaunching vLLM from that file, held at a steady 75 % of its maximum
load (the production check), and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.loadgen import LoadMode, LoadSpec, PhaseProgress
from tuner.measure import MeasuredPhase, measure_phase
from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer
from tuner.telemetry.model import GpuState
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig
from tuner.tuning import events as ev
from tuner.tuning.export import to_vllm_yaml
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.search import (
    ConcurrencyPlan,
    PointResult,
    best_point,
    find_max_concurrency,
    propose_moves,
    score,
    signals_from,
)
from tuner.tuning.slo import Slo, check
from tuner.tuning.space import Candidate, SearchSpace, default_space, resolve
from tuner.tuning.store import BestPoint, RunMeta, TrialRecord, TrialStatus, TrialStore

GiB = 2**30
PRODUCTION_FRACTION = 0.75  # the steady share of the maximum load a production server should run at


class TuneError(RuntimeError):
    """The run cannot start (model, hardware, store). One line for people."""


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
    requests_per_stream: int = 4  # per measured concurrency: enough for a p95 without a long phase
    min_requests: int = 16
    min_phase_s: float = (
        10.0  # and enough requests to last this long: sub-second phases measure start-up noise
    )
    vocab_size: int = 1000
    max_concurrency: int = 512
    launch_budget: int | None = None  # default: a third of the feasible grid, at least 3
    store_path: Path = Path("infertop-tune.sqlite")
    out_dir: Path = Path("infertop-tune")
    startup_timeout_s: float = 900.0
    prove: bool = True  # relaunch from the exported YAML and measure again
    production_check: bool = True
    price_per_gpu_hour: float | None = None
    gpus: bool = True  # read NVML (False: tune the CPU build)
    objective: str = "throughput"  # or "users": the most concurrent users within the SLO


@dataclass
class TrialOutcome:
    candidate: Candidate
    status: TrialStatus
    reason: str
    points: list[PointResult] = field(default_factory=list)
    log_tail: str = ""
    startup_s: float | None = None
    objective: str = "throughput"
    failure_kind: str | None = None  # launcher.FailureKind value when the server did not start

    @property
    def best(self) -> PointResult | None:
        return best_point(self.points, self.objective)


@dataclass
class TuneResult:
    winner: Candidate | None
    defaults: Candidate
    trials: list[TrialRecord]
    launches: int
    stopped: str | None
    outputs: dict[str, str]
    report: dict[str, Any]


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
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise TuneError(f"{config.model}: no config.json there (tune needs a local model directory)")
        try:
            self.shape = ModelShape.from_dir(model_dir)
        except (ValueError, OSError) as exc:
            raise TuneError(f"{config.model}/config.json: {exc}") from None
        self.hardware, self.hardware_label = detect_hardware(config.gpus, config.env)
        try:
            space = default_space(self.shape, self.hardware, dict(config.pins))
            values = {**space.values, **{k: tuple(v) for k, v in config.values.items()}}
            self.space = SearchSpace(self.shape, self.hardware, values, dict(config.pins))
        except ValueError as exc:
            raise TuneError(str(exc)) from None
        self.explicit = {
            k for k in config.values
        }  # operator-chosen ladders are launched even if predicted to fail
        self.sampler = Sampler(
            LiveSource(
                NvmlBackend() if config.gpus and not self.hardware.is_cpu else None,
                config=SamplerConfig(discover_vllm=False, history_len=480),
            ),
            history_len=480,
        )
        self._engine_url: str | None = None
        self._last_rate: tuple[int, float] | None = None  # (concurrency, requests/s) of the last phase
        self._moves: dict[str, dict[str, Any]] = {}  # candidate key -> the values its move changed
        self._rejected: set[tuple[str, Any]] = set()  # (dimension, value) vLLM refused as unsupported
        self.launches = 0
        self.note: str | None = None  # why the search ended before it ran out of moves (the launch budget)
        self._listener: ev.Listener = lambda e: None
        self._cancel = threading.Event()

    # --- the run ---------------------------------------------------------------------------------------------

    def run(self, listener: ev.Listener | None = None, cancel: threading.Event | None = None) -> TuneResult:
        self._listener = listener or (lambda e: None)
        self._cancel = cancel or threading.Event()
        started = time.time()
        feasible = self.space.feasible()
        budget = self.config.launch_budget or max(3, -(-len(feasible) // 3))
        meta = RunMeta(
            model=str(Path(self.config.model).resolve()),
            hardware=self.hardware.to_dict(),
            slo=self.config.slo.to_dict(),
            space=self.space.to_dict(),
            workload={
                "input_len": self.config.input_len,
                "output_len": self.config.output_len,
                "objective": self.config.objective,
            },
        )
        if self.config.store_path.exists() and not self.resume:
            raise TuneError(
                f"{self.config.store_path} exists: pass --resume to continue that run, or another --store"
            )
        store = TrialStore.open(self.config.store_path, run_meta=meta)
        outcomes: dict[str, TrialOutcome] = {
            r.key: _outcome_from_record(r, self.config.objective)
            for r in store.trials()
            if r.status.value in ("feasible", "infeasible", "failed")
        }
        self.launches = sum(
            1
            for o in outcomes.values()
            if o.startup_s is not None or o.status is TrialStatus.FAILED or o.points
        )
        self.sampler.open()
        self.sampler.start()
        self._emit(
            ev.TuneStarted(
                self.config.model,
                self.config.slo.describe(),
                self.hardware_label,
                len(feasible),
                budget,
                len(outcomes),
                str(self.config.store_path),
                self.config.slo.ttft_p95_max_s,
                self.config.slo.tok_s_per_user_min,
            )
        )
        for key, done in outcomes.items():  # what a resumed run already knows, so watchers show it too
            best = done.best
            self._emit(
                ev.TrialFinished(
                    key,
                    self.label(done.candidate),
                    done.status.value,
                    done.reason,
                    best.concurrency if best else None,
                    best.output_tokens_per_s if best else None,
                    done.log_tail,
                )
            )
        stopped: str | None = None
        obj = self.config.objective
        defaults = self.space.baseline()
        try:
            incumbent: TrialOutcome | None = None
            queue: list[tuple[Candidate, str]] = [(defaults, "vLLM's defaults: the configuration to beat")]
            tried: set[str] = set()
            while queue:
                if self._cancel.is_set():
                    stopped = "interrupted"
                    break
                candidate, why = queue.pop(0)
                if candidate.key() in tried:
                    continue
                tried.add(candidate.key())
                outcome = outcomes.get(candidate.key())
                if outcome is None:
                    if self.launches >= budget:
                        self._emit_note(f"launch budget of {budget} used")
                        break
                    outcome = self._trial(store, candidate, why)
                    if outcome is None:  # interrupted
                        stopped = "interrupted"
                        break
                    outcomes[candidate.key()] = outcome
                if outcome.failure_kind == "unsupported_option" or "(unsupported option)" in outcome.reason:
                    self._rejected.update(self._moves.get(candidate.key(), {}).items())
                if outcome.best is not None and (
                    incumbent is None or score(outcome.best, obj) > score(incumbent.best, obj)
                ):
                    incumbent = outcome
                    self._emit(
                        ev.BestChanged(
                            candidate.key(),
                            self.label(candidate),
                            outcome.best.output_tokens_per_s,
                            outcome.best.concurrency,
                        )
                    )
                if not queue:
                    queue = self._next_moves(incumbent or outcome, tried)
            winner = incumbent.candidate if incumbent and incumbent.best else None
            report = self._finish(store, meta, outcomes, winner, defaults, started, stopped)
        finally:
            self.sampler.stop()
            trials = store.trials()
            store.close()
        outputs = report.pop("_outputs", {})
        self._emit(
            ev.TuneFinished(
                winner.key() if winner else None,
                self.label(winner) if winner else None,
                self.launches,
                time.time() - started,
                stopped,
                outputs,
            )
        )
        return TuneResult(winner, defaults, trials, self.launches, stopped, outputs, report)

    def label(self, candidate: Candidate) -> str:
        """The candidate's short label; the baseline says that it is vLLM's defaults (plus any pins)."""
        if candidate == self.space.baseline():
            pinned = candidate.label()
            return "vLLM defaults" + (f" ({pinned})" if pinned != "vLLM defaults" else "")
        return candidate.label()

    def _emit_note(self, note: str) -> None:
        self.note = note

    def _emit(self, event: ev.TuneEvent) -> None:
        with contextlib.suppress(Exception):  # a broken listener must not end the run
            self._listener(event)

    def _next_moves(self, base: TrialOutcome, tried: set[str]) -> list[tuple[Candidate, str]]:
        # Step from the values the server really ran with (None = vLLM's default, e.g. 128 sequences on CPU).
        current = dataclasses.asdict(resolve(base.candidate, self.hardware, self.shape))
        signals = signals_from(base.points, base.candidate.max_num_seqs)
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

    # --- one trial -------------------------------------------------------------------------------------------

    def _trial(self, store: TrialStore, candidate: Candidate, why: str) -> TrialOutcome | None:
        feasibility = self.space.check(candidate)
        explicit = any(getattr(candidate, k) is not None for k in self.explicit)
        if not feasibility.ok and not explicit:
            reason = "; ".join(feasibility.reasons) or "predicted not to fit"
            store.record_result(candidate, TrialStatus.INFEASIBLE, reason)
            self._emit(
                ev.TrialFinished(
                    candidate.key(), self.label(candidate), "infeasible", f"not launched: {reason}"
                )
            )
            return TrialOutcome(candidate, TrialStatus.INFEASIBLE, f"not launched: {reason}")
        self.launches += 1
        self._emit(
            ev.TrialStarted(
                candidate.key(), self.label(candidate), candidate.config_dict(), self.launches, why
            )
        )
        store.record_start(candidate)
        spec = ServerSpec(
            model=self.config.model,
            args=(*self.config.fixed_args, *candidate.vllm_args()),
            command=self.config.command,
            env=dict(self.config.env),
            startup_timeout_s=self.config.startup_timeout_s,
            log_path=self.config.out_dir / "logs" / f"{candidate.key()[:60]}.log",
        )
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        server = VllmServer(spec)
        try:
            server.start()
        except LaunchError as exc:
            status = TrialStatus.FAILED
            store.record_result(candidate, status, exc.summary, log_tail=exc.log_tail)
            self._emit(
                ev.TrialFinished(
                    candidate.key(), self.label(candidate), status.value, exc.summary, log_tail=exc.log_tail
                )
            )
            return TrialOutcome(
                candidate, status, exc.summary, log_tail=exc.log_tail, failure_kind=exc.kind.value
            )
        except KeyboardInterrupt:
            server.stop()
            store.record_result(candidate, TrialStatus.INTERRUPTED, "interrupted during start-up")
            return None
        try:
            self._emit(ev.ServerReady(candidate.key(), server.url, server.startup_s or 0.0, server.pid))
            self._watch(server.url)
            points = self._search_concurrency(server, candidate)
        finally:
            self._watch(None)
            server.stop()
        if self._cancel.is_set():
            store.record_result(
                candidate, TrialStatus.INTERRUPTED, "interrupted", phases=[p.summary for p in points]
            )
            self._emit(ev.TrialFinished(candidate.key(), self.label(candidate), "interrupted", "interrupted"))
            return None
        best = best_point(points, self.config.objective)
        if best is None:
            first = points[0].summary.get("slo_reasons") if points else None
            reason = f"no load met the SLO ({'; '.join(first or ['no phase finished'])})"
            status = TrialStatus.INFEASIBLE
        else:
            reason = f"{best.output_tokens_per_s:,.0f} tok/s at {best.concurrency} concurrent"
            status = TrialStatus.FEASIBLE
        died = not server_was_healthy(points)
        if died:
            status, reason = TrialStatus.FAILED, "the server stopped answering during the search"
        store.record_result(
            candidate,
            status,
            reason,
            phases=[{**p.summary, "startup_s": server.startup_s} for p in points],
            best=BestPoint(best.concurrency, best.output_tokens_per_s) if best else None,
            log_tail=server.log_tail(30) if died else None,
        )
        self._emit(
            ev.TrialFinished(
                candidate.key(),
                self.label(candidate),
                status.value,
                reason,
                best.concurrency if best else None,
                best.output_tokens_per_s if best else None,
            )
        )
        return TrialOutcome(
            candidate, status, reason, points, startup_s=server.startup_s, objective=self.config.objective
        )

    def _watch(self, url: str | None) -> None:
        """Point the sampler's engine scraping at the running candidate (or at nothing)."""
        source = self.sampler.source
        if isinstance(source, LiveSource):
            source.set_engine_urls([url] if url else [])

    def _search_concurrency(self, server: VllmServer, candidate: Candidate) -> list[PointResult]:
        self._last_rate = None  # a new server: its own pace
        cap = min(self.config.max_concurrency, 2 * (candidate.max_num_seqs or self.config.max_concurrency))
        plan = ConcurrencyPlan(start=1, max_concurrency=max(1, cap))

        def measure(concurrency: int) -> PointResult:
            if self._cancel.is_set():
                return PointResult(
                    concurrency, False, 0.0, {"concurrency": concurrency, "slo_reasons": ["interrupted"]}
                )
            phase = asyncio.run(self._measure(server, candidate, concurrency))
            verdict = check(self.config.slo, phase.load.stats)
            summary = {
                "concurrency": concurrency,
                "passed": verdict.passed,
                "slo_reasons": list(verdict.reasons),
                **_phase_dict(phase),
            }
            s = phase.load.stats
            errors = s.requests_failed / max(1, s.requests_ok + s.requests_failed)
            self._emit(
                ev.PhaseMeasured(
                    candidate.key(), concurrency, verdict.passed, s.output_tokens_per_s, s.ttft_p95_s, s.tpot_p95_s,
                    s.user_tok_per_s_p50, errors, phase.bound.kind.value, tuple(verdict.reasons),
                )
            )  # fmt: skip
            return PointResult(concurrency, verdict.passed, s.output_tokens_per_s, summary)

        points = find_max_concurrency(measure, plan)
        return [p for p in points if p.summary.get("stats") is not None]

    def phase_requests(self, concurrency: int) -> int:
        """Requests for a phase at ``concurrency``: the configured floor, or enough to last ``min_phase_s`` at
        the request rate the last phase reached, scaled to this concurrency (an over-estimate: fine)."""
        floor = max(self.config.min_requests, self.config.requests_per_stream * concurrency)
        if self._last_rate is None:
            return floor
        last_c, last_req_s = self._last_rate
        expected_req_s = last_req_s * max(1.0, concurrency / last_c)
        return max(floor, int(expected_req_s * self.config.min_phase_s + 0.5))

    async def _measure(self, server: VllmServer, candidate: Candidate, concurrency: int) -> MeasuredPhase:
        spec = LoadSpec(
            mode=LoadMode.CONCURRENCY,
            concurrency=concurrency,
            num_requests=self.phase_requests(concurrency),
            warmup_requests=min(concurrency, 32),
            input_len=self.config.input_len,
            output_len=self.config.output_len,
            vocab_size=self.config.vocab_size,
        )

        def progress(p: PhaseProgress) -> None:
            rate = p.output_tokens / p.elapsed_s if p.elapsed_s > 0 else 0.0
            self._emit(
                ev.PhaseProgressed(
                    candidate.key(), concurrency, p.stage, p.requests_done, p.requests_total, rate
                )
            )

        slo = self.config.slo
        phase = await measure_phase(
            server.url, spec, sampler=self.sampler, server_pid=server.pid, ttft_max_s=slo.ttft_p95_max_s,
            tpot_max_s=slo.tpot_p95_max_s, on_progress=progress, cancel=self._cancel,
        )  # fmt: skip
        if phase.load.stats.requests_per_s > 0:
            self._last_rate = (concurrency, phase.load.stats.requests_per_s)
        return phase

    # --- the end: export, prove, production check, report -------------------------------------------------

    def _finish(
        self,
        store: TrialStore,
        meta: RunMeta,
        outcomes: Mapping[str, TrialOutcome],
        winner: Candidate | None,
        defaults: Candidate,
        started: float,
        stopped: str | None,
    ) -> dict[str, Any]:
        from tuner.tuning.verify import prove_and_check

        out = self.config.out_dir
        out.mkdir(parents=True, exist_ok=True)
        outputs: dict[str, str] = {}
        proof = production = None
        if winner is not None:
            best = outcomes[winner.key()].best
            assert best is not None
            yaml_path = out / "best.yaml"
            yaml_path.write_text(
                to_vllm_yaml(
                    self.config.model,
                    winner,
                    comment_lines=[
                        f"SLO: {self.config.slo.describe()} (judged at {self.config.slo.judged_at} over short phases)",
                        f"Measured on {self.hardware_label}: {best.output_tokens_per_s:,.0f} output tok/s at "
                        f"{best.concurrency} concurrent requests "
                        f"({self.config.input_len} in / {self.config.output_len} out tokens)",
                    ],
                )
            )
            outputs["yaml"] = str(yaml_path)
            if not self._cancel.is_set() and (self.config.prove or self.config.production_check):
                proof, production = prove_and_check(self, yaml_path, best)
        report = build_report(self, outcomes, winner, defaults, started, stopped, proof, production)
        from tuner.report.write import write_report

        written = write_report(report, out)
        outputs.update({k: str(v) for k, v in written.items() if not isinstance(v, list)})
        report["_outputs"] = outputs
        return report


def server_was_healthy(points: Sequence[PointResult]) -> bool:
    """False when the last phase aborted because the server went away."""
    return not (points and points[-1].summary.get("aborted"))


def _phase_dict(phase: MeasuredPhase) -> dict[str, Any]:
    d = phase.to_dict()
    d["stats"].pop("errors", None)
    d["errors"] = [dataclasses.asdict(e) for e in phase.load.stats.errors]
    return d


def _outcome_from_record(record: TrialRecord, objective: str) -> TrialOutcome:
    points = [
        PointResult(
            int(p["concurrency"]),
            bool(p.get("passed")),
            float(p.get("stats", {}).get("output_tokens_per_s", 0.0)),
            dict(p),
        )
        for p in record.phases
    ]
    startup = next((p.get("startup_s") for p in record.phases if p.get("startup_s") is not None), None)
    return TrialOutcome(
        record.candidate,
        record.status,
        record.reason or "",
        points,
        record.log_tail or "",
        startup,
        objective,
    )


def build_report(
    tuner: Tuner,
    outcomes: Mapping[str, TrialOutcome],
    winner: Candidate | None,
    defaults: Candidate,
    started: float,
    stopped: str | None,
    proof: dict[str, Any] | None,
    production: dict[str, Any] | None,
) -> dict[str, Any]:
    slo = tuner.config.slo
    trials = []
    for key, o in outcomes.items():
        best = o.best
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
                "best": {"concurrency": best.concurrency, "output_tokens_per_s": best.output_tokens_per_s}
                if best
                else None,
                "points": [p.summary for p in o.points],
            }
        )
    return {
        "format": "infertop-tune-report",
        "version": 1,
        "model": tuner.config.model,
        "hardware": tuner.hardware.to_dict(),
        "hardware_label": tuner.hardware_label,
        "gpus": tuner.hardware.gpu_count,
        "slo": {**slo.to_dict(), "describe": slo.describe(), "judged_at": slo.judged_at},
        "workload": {
            "input_len": tuner.config.input_len,
            "output_len": tuner.config.output_len,
            "requests_per_point": (
                f"max({tuner.config.min_requests}, {tuner.config.requests_per_stream} x concurrency, "
                f"enough for {tuner.config.min_phase_s:g} s)"
            ),
        },
        "started_s": started,
        "finished_s": time.time(),
        "launches": tuner.launches,
        "grid_size": len(tuner.space.feasible()),
        "trials": trials,
        "winner": winner.key() if winner else None,
        "defaults": defaults.key() if defaults.key() in outcomes else None,
        "proof": proof,
        "production": production,
        "price_per_gpu_hour": tuner.config.price_per_gpu_hour,
        "interrupted": stopped == "interrupted",
    }


ProgressCallback = Callable[[ev.TuneEvent], None]
