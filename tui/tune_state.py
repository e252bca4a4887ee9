"""What a tuning run has shown so far, folded from its events: the model behind the tune screen.

Plain Python, no Textual: :class:`TuneRun` applies each :mod:`tuner.tuning.events` event in order and hands out
frozen views (:class:`TrialView`, :class:`BestView`) that widgets hold in reactive attributes, so a repaint
happens exactly when something visible changed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from tuner.tuning.events import (
    BestChanged,
    EtaUpdated,
    PhaseMeasured,
    PhaseProgressed,
    PhaseRepeated,
    ServerReady,
    TrialFinished,
    TrialStarted,
    TuneEvent,
    TuneFinished,
    TuneStarted,
    VerdictReached,
)
from tuner.tuning.points import Load

DEFAULTS_KEY = "vllm-defaults"
"""``Candidate.key()`` of vLLM with no flags: the trial every other one is compared with."""

DEFAULTS_LABEL = "vLLM defaults"
"""How the tuner labels its baseline: alone, or followed by the operator's pins ("vLLM defaults (tp 2)")."""


PROOF_KEY = "proof"
"""``tuner.tuning.verdict.PROOF_KEY``: the key of vLLM relaunched from the exported file (the proof and the
production check), which may come without a TrialStarted of its own."""

PROOF_LABEL = "proof: from the YAML"
"""The proof's row when the tuner did not announce it with a TrialStarted."""

PROOF_WHY = "the winner, relaunched from the exported file"

VERDICT_STATUSES = {"proven": "proven", "backed_off": "backed off", "not_proven": "not proven"}
"""VerdictReached.status -> the proof row's status."""


def is_defaults(key: str, label: str) -> bool:
    """Whether a trial is the baseline every other one is compared with."""
    return key == DEFAULTS_KEY or label.startswith(DEFAULTS_LABEL)


def gpu_list(gpus: tuple[int, ...]) -> str:
    """GPUs for people: ``"4-7"`` for a run, ``"0,2"`` otherwise, ``"–"`` for none (the CPU build)."""
    if not gpus:
        return "–"
    ordered = sorted(set(gpus))
    if len(ordered) > 2 and ordered[-1] - ordered[0] == len(ordered) - 1:
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(str(g) for g in ordered)


_RATE_LABEL = re.compile(r"(\S+) req/s")
_USERS_LABEL = re.compile(r"(\d+) users?")


def parse_load_label(label: str) -> tuple[str, float] | None:
    """``"2.4 req/s"`` -> ``("rate", 2.4)``, ``"8 users"`` -> ``("users", 8.0)`` (``tuner.tuning.points.Load.label``
    read back, for trials that came from the store without their points); None for anything else."""
    if match := _RATE_LABEL.fullmatch(label.strip()):
        try:
            return "rate", float(match.group(1))
        except ValueError:
            return None
    if match := _USERS_LABEL.fullmatch(label.strip()):
        return "users", float(match.group(1))
    return None


# TuneStarted carries the SLO as the line ``tuner.tuning.slo.Slo.describe()`` writes; the limits are read back from
# it (tests/test_tune_screen.py checks this against the real describe(), so a change of format shows).
_TTFT_LIMIT = re.compile(r"TTFT p\d+ <= ([0-9]*\.?[0-9]+) s")
_SPEED_FLOOR = re.compile(r">= ([0-9]*\.?[0-9]+) tok/s per user")


@dataclass(frozen=True)
class SloLimits:
    """The SLO's latency limits as numbers, for drawing them. None: not limited (or not known)."""

    ttft_p95_max_s: float | None = None
    tok_s_per_user_min: float | None = None

    @classmethod
    def from_description(cls, text: str) -> SloLimits:
        """Limits from ``"TTFT p95 <= 0.50 s, >= 33.3 tok/s per user (TPOT p95 <= 30.0 ms), errors <= 1 %"``."""
        ttft = _TTFT_LIMIT.search(text)
        speed = _SPEED_FLOOR.search(text)
        return cls(
            ttft_p95_max_s=float(ttft.group(1)) if ttft else None,
            tok_s_per_user_min=float(speed.group(1)) if speed else None,
        )


def user_tok_s(point: PhaseMeasured) -> float | None:
    """Per-user output speed as the SLO judges it: 1 / TPOT p95 (95 % of requests were at least this fast)."""
    if point.tpot_p95_s is None or point.tpot_p95_s <= 0:
        return None
    return 1.0 / point.tpot_p95_s


@dataclass(frozen=True)
class TrialView:
    """One launched configuration as far as the events have told."""

    key: str
    label: str
    index: int | None  # 1-based launch number; None for a candidate that was never launched
    why: str = ""
    status: str = "running"  # then "feasible", "infeasible", "failed", "interrupted" or "skipped"; the proof:
    # "proven", "backed off" or "not proven"
    reason: str = ""
    points: tuple[PhaseMeasured, ...] = ()  # measured loads, in the order measured
    best_load_label: str | None = None
    best_output_tokens_per_s: float | None = None
    capacity: str = ""  # "2.4 req/s (2.7 req/s did not)", once finished
    server_url: str | None = None
    startup_s: float | None = None
    started_at_s: float | None = None  # screen clock when the launch began
    log_tail: str = ""
    predicted: float | None = None  # the performance model's capacity (the objective's unit)
    measured: float | None = None  # the capacity measured, same unit, once finished
    gpus: tuple[int, ...] = ()  # the GPUs its server holds (physical indices); () on the CPU build
    layout: str = ""  # how the candidate fills the node: "8 x TP 1"
    node_capacity: float | None = None  # measured x replicas (the objective's unit), once finished
    node_load_label: str | None = None  # the node's capacity as a load ("129 req/s"), once finished
    disturbed: str = ""  # why trials beside it disturbed its measurement, "" if they did not

    @property
    def vs_prediction(self) -> float | None:
        """Measured over predicted capacity (None until both are known)."""
        if self.predicted is None or self.measured is None or self.predicted <= 0:
            return None
        return self.measured / self.predicted

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def is_defaults(self) -> bool:
        return is_defaults(self.key, self.label)

    @property
    def is_proof(self) -> bool:
        return self.key == PROOF_KEY

    @property
    def best_point(self) -> PhaseMeasured | None:
        """The phase behind the trial's result: the tuner's pick once finished, else the best passing one.

        Scouting phases never count: they only find the server's pace. The proof's phases (proof, production)
        count as judged ones; its result is the verdict's operating point."""
        if self.best_load_label is not None:
            at_best = [p for p in self.points if p.load_label == self.best_load_label and p.role != "scout"]
            if at_best:
                return at_best[-1]
        # The same rule as tuner.tuning.capacity.summarise: the highest judged load that passed, below any
        # judged load that did not.
        judged = [p for p in self.points if p.role != "scout"]
        ceiling = min((p.load for p in judged if not p.passed), default=None)
        passing = [p for p in judged if p.passed and (ceiling is None or p.load < ceiling)]
        if not passing:
            return None
        return max(passing, key=lambda p: (p.load_kind == "rate", p.load, p.output_tokens_per_s))

    @property
    def result_tok_s(self) -> float | None:
        if self.best_output_tokens_per_s is not None:
            return self.best_output_tokens_per_s
        point = self.best_point
        return None if point is None else point.output_tokens_per_s

    @property
    def result_load_label(self) -> str | None:
        """The trial's capacity as a load (``"2.4 req/s"``), when it has one."""
        if self.best_load_label is not None:
            return self.best_load_label
        point = self.best_point
        return None if point is None else point.load_label

    def load_of(self, label: str | None) -> tuple[str, float] | None:
        """(kind, value) of the load labelled ``label``: from the measured point, else read from the label."""
        if label is None:
            return None
        for p in reversed(self.points):
            if p.load_label == label and p.role != "scout":
                return p.load_kind, p.load
        return parse_load_label(label)


@dataclass(frozen=True)
class BestView:
    """The best configuration so far, and how it compares with vLLM's defaults."""

    key: str
    label: str
    index: int | None
    output_tokens_per_s: float
    load_label: str
    note: str = ""  # a tie with the one it replaced
    load: tuple[str, float] | None = None  # (kind, value) of load_label
    defaults_tok_s: float | None = None  # the defaults trial's result, when it has one
    defaults_load_label: str | None = None  # the defaults trial's capacity, when it has one
    defaults_load: tuple[str, float] | None = None
    defaults_status: str | None = None  # the defaults trial's status, when it ran
    layout: str = ""  # how the best fills the node: "8 x TP 1"
    node_capacity: float | None = None  # its node's capacity (measured x replicas), the objective's unit
    node_load_label: str | None = None  # the same as a load: "129 req/s"
    defaults_node_capacity: float | None = None
    defaults_node_load_label: str | None = None

    @property
    def is_defaults(self) -> bool:
        return is_defaults(self.key, self.label)

    @property
    def speedup_basis(self) -> str | None:
        """What the ratio over the defaults compares: ``"node"`` (what each one's whole node serves, when both
        are known: layouts of different TP compare so), ``"load"`` (one server's capacities, both requests/s or
        both users, as the tuner's headline does), ``"tok/s"`` when the loads are not of one kind, None without
        a ratio."""
        if self.node_capacity is not None and self.defaults_node_capacity:
            return "node"
        if self.load is not None and self.defaults_load is not None:
            (kind, _), (defaults_kind, defaults_value) = self.load, self.defaults_load
            if kind == defaults_kind and defaults_value > 0:
                return "load"
        if self.defaults_tok_s is not None and self.defaults_tok_s > 0:
            return "tok/s"
        return None

    @property
    def speedup(self) -> float | None:
        """The best's capacity over the defaults' (1.31 = 31 % more requests/s within the SLO), or its tok/s
        over theirs when the capacities cannot be compared (:attr:`speedup_basis`); None without a ratio."""
        basis = self.speedup_basis
        if basis == "node" and self.node_capacity is not None and self.defaults_node_capacity:
            return self.node_capacity / self.defaults_node_capacity
        if basis == "load" and self.load is not None and self.defaults_load is not None:
            return self.load[1] / self.defaults_load[1]
        if basis == "tok/s" and self.defaults_tok_s is not None:
            return self.output_tokens_per_s / self.defaults_tok_s
        return None


@dataclass(frozen=True)
class NodeSlot:
    """One GPU of the node and the trial on it, for the node strip."""

    gpu: int  # physical index
    key: str | None = None  # the trial whose server holds it; None: idle
    name: str = ""  # the trial as the strip names it: "#3", "proof"
    label: str = ""  # the trial's configuration: "fp8 w, fp8 kv"
    layout: str = ""  # "8 x TP 1"
    role: str = ""  # "starting", "ready", or the phase's role: "scout", "judged", "proof", "production"
    load_label: str = ""  # the load under way, "" between phases

    @property
    def idle(self) -> bool:
        return self.key is None


class TuneRun:
    """The fold of a run's events. Call :meth:`apply` with each event in order; read the properties.

    Several trials may run at once (one per slot of the node), their events interleaved: everything about a
    trial is kept by its key. ``current_key`` is the running trial that was active last (it started, its
    server came up, a phase of it began or was judged): what the screen follows unless told otherwise."""

    def __init__(self) -> None:
        self.started: TuneStarted | None = None
        self.started_at_s: float | None = None
        self.trials: dict[str, TrialView] = {}
        self.current_key: str | None = None
        self.last_key: str | None = None
        self.phases: dict[str, PhaseProgressed] = {}  # the latest progress of each trial's phase under way
        self.phases_measured: set[str] = set()  # trials whose phase above has its PhaseMeasured already
        self.repeats: dict[str, PhaseRepeated] = {}  # the last "measured again / further" of a trial's phase
        self.best_event: BestChanged | None = None
        self.finished: TuneFinished | None = None
        self.error: str | None = None  # the tuner raised instead of finishing
        self.limits = SloLimits()
        self.verdict: VerdictReached | None = None
        self.eta: EtaUpdated | None = None  # the latest re-estimate, None before the first
        self.eta_at_s: float | None = None  # screen clock when the ETA above (or TuneStarted's) was given
        self._activity: dict[str, int] = {}  # key -> when it was last active (a counter)
        self._events = 0

    # --- reading -----------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """The run may still produce results (not finished, not crashed)."""
        return self.finished is None and self.error is None

    @property
    def current(self) -> TrialView | None:
        return self.trials.get(self.current_key) if self.current_key else None

    @property
    def last(self) -> TrialView | None:
        """The trial running now (the one active last), or else the one that ran last."""
        return self.current or (self.trials.get(self.last_key) if self.last_key else None)

    @property
    def running(self) -> list[TrialView]:
        """The trials running now, in launch order."""
        return [t for t in self.trials.values() if t.running]

    @property
    def phase(self) -> PhaseProgressed | None:
        """The phase under way on the current trial."""
        return self.phase_of(self.current_key)

    @property
    def repeated(self) -> PhaseRepeated | None:
        """Why the current trial's phase is measured again or further, if it is."""
        return self.repeats.get(self.current_key) if self.current_key else None

    @property
    def measuring(self) -> str | None:
        """The load being held right now on the current trial (its label), until its result arrives."""
        return self.measuring_on(self.current_key)

    def phase_of(self, key: str | None) -> PhaseProgressed | None:
        return self.phases.get(key) if key else None

    def measuring_on(self, key: str | None) -> str | None:
        """The load being held right now on trial ``key`` (its label), until its result arrives."""
        phase = self.phase_of(key)
        if phase is None or phase.key in self.phases_measured:
            return None
        return phase.load_label

    @property
    def launches_used(self) -> int:
        if self.finished is not None:
            return self.finished.launches
        return max((t.index for t in self.trials.values() if t.index is not None), default=0)

    @property
    def defaults_trial(self) -> TrialView | None:
        for trial in self.trials.values():
            if trial.is_defaults:
                return trial
        return None

    @property
    def best(self) -> BestView | None:
        ev = self.best_event
        if ev is None:
            return None
        trial = self.trials.get(ev.key)
        defaults = self.defaults_trial
        feasible = defaults if defaults is not None and defaults.status == "feasible" else None
        defaults_load_label = feasible.result_load_label if feasible else None
        return BestView(
            key=ev.key,
            label=ev.label,
            index=trial.index if trial else None,
            output_tokens_per_s=ev.output_tokens_per_s,
            load_label=ev.load_label,
            note=ev.note,
            load=trial.load_of(ev.load_label) if trial else parse_load_label(ev.load_label),
            defaults_tok_s=feasible.result_tok_s if feasible else None,
            defaults_load_label=defaults_load_label,
            defaults_load=feasible.load_of(defaults_load_label) if feasible else None,
            defaults_status=defaults.status if defaults else None,
            layout=trial.layout if trial else "",
            node_capacity=trial.node_capacity if trial else None,
            node_load_label=trial.node_load_label if trial else None,
            defaults_node_capacity=feasible.node_capacity if feasible else None,
            defaults_node_load_label=feasible.node_load_label if feasible else None,
        )

    def chart_trial_for(self, key: str | None) -> TrialView | None:
        """Whose points the SLO chart shows: trial ``key`` when given (the one selected), else the running
        trial, else the best one, else the latest one that measured something, else the last one."""
        if key is not None and key in self.trials:
            return self.trials[key]
        if self.current is not None:
            return self.current
        if self.best_event is not None and self.best_event.key in self.trials:
            return self.trials[self.best_event.key]
        measured = [t for t in self.trials.values() if t.points]
        return measured[-1] if measured else self.last

    @property
    def chart_trial(self) -> TrialView | None:
        """:meth:`chart_trial_for` with nothing selected."""
        return self.chart_trial_for(None)

    def eta_s(self, now_s: float) -> float | None:
        """Seconds the run is expected to go on from ``now_s``: the latest estimate less the time since it was
        given. None: unknown, over, or overdue (an estimate that has run out no longer tells anything)."""
        if not self.active or self.eta_at_s is None:
            return None
        if self.eta is not None:
            remaining = self.eta.remaining_s
        else:
            remaining = self.started.eta_s if self.started is not None else None
        if remaining is None:
            return None
        left = remaining - (now_s - self.eta_at_s)
        return left if left > 0 else None

    @property
    def node_gpus(self) -> tuple[int, ...]:
        """The GPUs the tune may use, as TuneStarted told (() on the CPU build, or from an older tuner)."""
        return self.started.node_gpus if self.started is not None else ()

    def node_slots(self, gpus: tuple[int, ...] = ()) -> tuple[NodeSlot, ...]:
        """Each of the node's GPUs (``gpus`` when the tuner did not say which: those the sampler sees) and the
        running trial on it. Without the node's GPUs from the tuner (an older tuner: one trial at a time), a
        running trial that names no GPUs of its own is taken to hold them all."""
        node = self.node_gpus or gpus
        holders: dict[int, TrialView] = {}
        for running in self.running:
            for gpu in running.gpus:
                holders[gpu] = running
        legacy = None if self.node_gpus else self.current
        slots = []
        for gpu in sorted(set(node) | set(holders)):
            trial = holders.get(gpu)
            if trial is None and legacy is not None and not legacy.gpus:
                trial = legacy
            if trial is None:
                slots.append(NodeSlot(gpu))
                continue
            phase = self.phase_of(trial.key)
            if trial.server_url is None:
                role, load = "starting", ""
            elif phase is None:
                role, load = "ready", ""
            else:
                role = phase.role
                load = "" if trial.key in self.phases_measured else phase.load_label
            name = "proof" if trial.is_proof else (f"#{trial.index}" if trial.index is not None else "–")
            slots.append(NodeSlot(gpu, trial.key, name, trial.label, trial.layout, role, load))
        return tuple(slots)

    # --- folding -----------------------------------------------------------------------------------------

    def apply(self, event: TuneEvent, now_s: float) -> None:
        """Take one event; ``now_s`` is the screen's clock when it arrived."""
        self._events += 1
        on_server = ServerReady | PhaseProgressed | PhaseMeasured | PhaseRepeated
        if isinstance(event, on_server) and event.key == PROOF_KEY:
            self._start_proof(now_s, fresh=isinstance(event, ServerReady))
        if isinstance(event, TuneStarted):
            self.started = event
            self.started_at_s = self.eta_at_s = now_s
            if event.ttft_p95_max_s is not None or event.tok_s_per_user_min is not None:
                self.limits = SloLimits(event.ttft_p95_max_s, event.tok_s_per_user_min)
            else:  # an older event without the numbers
                self.limits = SloLimits.from_description(event.slo)
        elif isinstance(event, TrialStarted):
            self.trials[event.key] = TrialView(
                key=event.key,
                label=event.label,
                index=event.index,
                why=event.why,
                started_at_s=now_s,
                predicted=event.predicted,
                gpus=event.gpus,
                layout=event.layout,
            )
            self._forget_phase(event.key)
            self._touch(event.key)
        elif isinstance(event, ServerReady):
            self._update(event.key, server_url=event.url, startup_s=event.startup_s)
            self._touch(event.key)
        elif isinstance(event, PhaseProgressed):
            before = self.phases.get(event.key)
            if before is None or before.load_label != event.load_label or event.key in self.phases_measured:
                self.repeats.pop(event.key, None)  # a new phase: a "measured again" was about the last one
                self._touch(event.key)
            elif before.stage != event.stage:
                self._touch(event.key)
            self.phases[event.key] = event
            self.phases_measured.discard(event.key)
        elif isinstance(event, PhaseRepeated):
            self.repeats[event.key] = event
            self._touch(event.key)
        elif isinstance(event, PhaseMeasured):
            trial = self.trials.get(event.key)
            if trial is not None:
                self._update(event.key, points=(*trial.points, event))
            phase = self.phases.get(event.key)
            if phase is not None and phase.load_label == event.load_label:
                self.phases_measured.add(event.key)
                self.repeats.pop(event.key, None)
            self._touch(event.key)
        elif isinstance(event, TrialFinished):
            self._finish_trial(event)
        elif isinstance(event, BestChanged):
            self.best_event = event
        elif isinstance(event, VerdictReached):
            self.verdict = event
            self._finish_proof(event)
        elif isinstance(event, EtaUpdated):
            self.eta = event
            self.eta_at_s = now_s
        elif isinstance(event, TuneFinished):
            self.finished = event
            self._close_running(event.stopped or "the run ended before this trial did")

    def _touch(self, key: str) -> None:
        """Trial ``key`` did something: it becomes the current one if it is running."""
        self._activity[key] = self._events
        trial = self.trials.get(key)
        if trial is not None and trial.running:
            self.current_key = self.last_key = key

    def _forget_phase(self, key: str) -> None:
        self.phases.pop(key, None)
        self.phases_measured.discard(key)
        self.repeats.pop(key, None)

    def _leave(self, key: str) -> None:
        """Trial ``key`` stopped running: the current trial becomes the running one active last, if any."""
        self._forget_phase(key)
        if self.current_key != key:
            return
        running = [t.key for t in self.running]
        self.current_key = max(running, key=lambda k: self._activity.get(k, 0), default=None)

    def _start_proof(self, now_s: float, *, fresh: bool) -> None:
        """vLLM relaunched from the exported file: a trial of its own, whether or not a TrialStarted told of it.
        ``fresh`` (its server came up): a second relaunch (the runner-up's) starts without the first's points."""
        proof = self.trials.get(PROOF_KEY)
        if proof is None:
            proof = TrialView(key=PROOF_KEY, label=PROOF_LABEL, index=None, why=PROOF_WHY, started_at_s=now_s)
        elif fresh and (proof.points or not proof.running):
            proof = dataclasses.replace(
                proof, status="running", reason="", points=(), best_load_label=None, started_at_s=now_s
            )
        else:
            return
        self.trials[PROOF_KEY] = proof
        self._forget_phase(PROOF_KEY)
        self._touch(PROOF_KEY)

    def _finish_proof(self, event: VerdictReached) -> None:
        proof = self.trials.get(PROOF_KEY)
        if proof is None:  # --no-prove: nothing was relaunched
            return
        self.trials[PROOF_KEY] = dataclasses.replace(
            proof,
            status=VERDICT_STATUSES.get(event.status, event.status.replace("_", " ")),
            reason=event.headline,
            best_load_label=event.operating_point,
        )
        self._leave(PROOF_KEY)

    def _finish_trial(self, event: TrialFinished) -> None:
        # A candidate the search skipped was never started: it gets a row without a launch number.
        trial = self.trials.get(event.key) or TrialView(key=event.key, label=event.label, index=None)
        kind = self.started.objective if self.started is not None else "rate"
        node_load = None
        if event.node_capacity is not None and event.node_capacity > 0 and math.isfinite(event.node_capacity):
            node_load = Load(kind, event.node_capacity) if kind == "users" else Load.rate(event.node_capacity)
        self.trials[event.key] = dataclasses.replace(
            trial,
            status=event.status,
            reason=event.reason,
            best_load_label=event.best_load_label,
            best_output_tokens_per_s=event.best_output_tokens_per_s,
            capacity=event.capacity,
            log_tail=event.log_tail,
            predicted=event.predicted if event.predicted is not None else trial.predicted,
            measured=event.measured,
            gpus=event.gpus or trial.gpus,
            layout=event.layout or trial.layout,
            node_capacity=event.node_capacity,
            node_load_label=node_load.label() if node_load is not None else None,
            disturbed=event.disturbed,
        )
        self._leave(event.key)
        self.last_key = event.key

    def _update(self, key: str, **changes: Any) -> None:
        trial = self.trials.get(key)
        if trial is not None:
            self.trials[key] = dataclasses.replace(trial, **changes)

    def fail(self, message: str) -> None:
        """The tuner raised: the run is over without a TuneFinished."""
        self.error = message
        self._close_running(message)

    def _close_running(self, reason: str) -> None:
        # A trial the run ended under (without its own TrialFinished) must not go on saying "running".
        for key, trial in list(self.trials.items()):
            if trial.running:
                self._update(key, status="interrupted", reason=reason)
        self.current_key = None
        self.phases.clear()
        self.phases_measured.clear()
        self.repeats.clear()
