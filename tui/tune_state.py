"""What a tuning run has shown so far, folded from its events: the model behind the tune screen.

Plain Python, no Textual: :class:`TuneRun` applies each :mod:`tuner.tuning.events` event in order and hands out
frozen views (:class:`TrialView`, :class:`BestView`) that widgets hold in reactive attributes, so a repaint
happens exactly when something visible changed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from tuner.tuning.events import (
    BestChanged,
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

    @property
    def is_defaults(self) -> bool:
        return is_defaults(self.key, self.label)

    @property
    def speedup_basis(self) -> str | None:
        """What the ratio over the defaults compares: ``"load"`` (the capacities, both requests/s or both users,
        as the tuner's headline does), ``"tok/s"`` when the loads are not of one kind, None without a ratio."""
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
        if basis == "load" and self.load is not None and self.defaults_load is not None:
            return self.load[1] / self.defaults_load[1]
        if basis == "tok/s" and self.defaults_tok_s is not None:
            return self.output_tokens_per_s / self.defaults_tok_s
        return None


class TuneRun:
    """The fold of a run's events. Call :meth:`apply` with each event in order; read the properties."""

    def __init__(self) -> None:
        self.started: TuneStarted | None = None
        self.started_at_s: float | None = None
        self.trials: dict[str, TrialView] = {}
        self.current_key: str | None = None
        self.last_key: str | None = None
        self.phase: PhaseProgressed | None = None
        self.phase_measured = False  # the phase above has its PhaseMeasured already
        self.best_event: BestChanged | None = None
        self.finished: TuneFinished | None = None
        self.error: str | None = None  # the tuner raised instead of finishing
        self.limits = SloLimits()
        self.verdict: VerdictReached | None = None
        self.repeated: PhaseRepeated | None = None  # the last "measured again / further" of the current phase

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
        """The trial running now, or else the one that ran last."""
        return self.current or (self.trials.get(self.last_key) if self.last_key else None)

    @property
    def measuring(self) -> str | None:
        """The load being held right now (its label), until its result arrives."""
        if self.phase is None or self.phase_measured:
            return None
        return self.phase.load_label

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
        )

    @property
    def chart_trial(self) -> TrialView | None:
        """Whose points the SLO chart shows: the running trial, else the best one, else the latest one
        that measured something, else the last one."""
        if self.current is not None:
            return self.current
        if self.best_event is not None and self.best_event.key in self.trials:
            return self.trials[self.best_event.key]
        measured = [t for t in self.trials.values() if t.points]
        return measured[-1] if measured else self.last

    # --- folding -----------------------------------------------------------------------------------------

    def apply(self, event: TuneEvent, now_s: float) -> None:
        """Take one event; ``now_s`` is the screen's clock when it arrived."""
        on_server = ServerReady | PhaseProgressed | PhaseMeasured | PhaseRepeated
        if isinstance(event, on_server) and event.key == PROOF_KEY:
            self._start_proof(now_s, fresh=isinstance(event, ServerReady))
        if isinstance(event, TuneStarted):
            self.started = event
            self.started_at_s = now_s
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
            )
            self.current_key = self.last_key = event.key
            self.phase = None
        elif isinstance(event, ServerReady):
            self._update(event.key, server_url=event.url, startup_s=event.startup_s)
        elif isinstance(event, PhaseProgressed):
            if event.key == self.current_key:
                if self.phase is None or self.phase.load_label != event.load_label:
                    self.repeated = None
                self.phase = event
                self.phase_measured = False
        elif isinstance(event, PhaseRepeated):
            if event.key == self.current_key:
                self.repeated = event
        elif isinstance(event, PhaseMeasured):
            trial = self.trials.get(event.key)
            if trial is not None:
                self._update(event.key, points=(*trial.points, event))
            if self.phase is not None and self.phase.load_label == event.load_label:
                self.phase_measured = True
                self.repeated = None
        elif isinstance(event, TrialFinished):
            self._finish_trial(event)
        elif isinstance(event, BestChanged):
            self.best_event = event
        elif isinstance(event, VerdictReached):
            self.verdict = event
            self._finish_proof(event)
        elif isinstance(event, TuneFinished):
            self.finished = event
            self._close_running(event.stopped or "the run ended before this trial did")

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
        self.current_key = self.last_key = PROOF_KEY
        self.phase = None
        self.repeated = None

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
        if self.current_key == PROOF_KEY:
            self.current_key = None
            self.phase = None

    def _finish_trial(self, event: TrialFinished) -> None:
        # A candidate the search skipped was never started: it gets a row without a launch number.
        trial = self.trials.get(event.key) or TrialView(key=event.key, label=event.label, index=None)
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
        )
        if event.key == self.current_key:
            self.current_key = None
            self.phase = None
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
        self.phase = None
