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
    ServerReady,
    TrialFinished,
    TrialStarted,
    TuneEvent,
    TuneFinished,
    TuneStarted,
)

DEFAULTS_KEY = "vllm-defaults"
"""``Candidate.key()`` of vLLM with no flags: the trial every other one is compared with."""

DEFAULTS_LABEL = "vLLM defaults"
"""How the tuner labels its baseline: alone, or followed by the operator's pins ("vLLM defaults (tp 2)")."""


def is_defaults(key: str, label: str) -> bool:
    """Whether a trial is the baseline every other one is compared with."""
    return key == DEFAULTS_KEY or label.startswith(DEFAULTS_LABEL)


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
    status: str = "running"  # then "feasible", "infeasible", "failed", "interrupted" or "skipped"
    reason: str = ""
    points: tuple[PhaseMeasured, ...] = ()  # measured concurrencies, in the order measured
    best_concurrency: int | None = None
    best_output_tokens_per_s: float | None = None
    server_url: str | None = None
    startup_s: float | None = None
    started_at_s: float | None = None  # screen clock when the launch began
    log_tail: str = ""

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def is_defaults(self) -> bool:
        return is_defaults(self.key, self.label)

    @property
    def best_point(self) -> PhaseMeasured | None:
        """The phase behind the trial's result: the tuner's pick once finished, else the best passing one."""
        if self.best_concurrency is not None:
            at_best = [p for p in self.points if p.concurrency == self.best_concurrency]
            if at_best:
                return at_best[-1]
        passing = [p for p in self.points if p.passed]
        if not passing:
            return None
        # The same rule as tuner.tuning.search.best_point: most throughput, then fewer users (lower latency).
        return max(passing, key=lambda p: (p.output_tokens_per_s, -p.concurrency))

    @property
    def result_tok_s(self) -> float | None:
        if self.best_output_tokens_per_s is not None:
            return self.best_output_tokens_per_s
        point = self.best_point
        return None if point is None else point.output_tokens_per_s


@dataclass(frozen=True)
class BestView:
    """The best configuration so far, and how it compares with vLLM's defaults."""

    key: str
    label: str
    index: int | None
    output_tokens_per_s: float
    concurrency: int
    defaults_tok_s: float | None = None  # the defaults trial's result, when it has one
    defaults_status: str | None = None  # the defaults trial's status, when it ran

    @property
    def is_defaults(self) -> bool:
        return is_defaults(self.key, self.label)

    @property
    def speedup(self) -> float | None:
        """Best tok/s over the defaults' tok/s (1.31 = 31 % more), when both exist."""
        if self.defaults_tok_s is None or self.defaults_tok_s <= 0:
            return None
        return self.output_tokens_per_s / self.defaults_tok_s


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
    def measuring(self) -> int | None:
        """The concurrency under load right now, until its result arrives."""
        if self.phase is None or self.phase_measured:
            return None
        return self.phase.concurrency

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
        return BestView(
            key=ev.key,
            label=ev.label,
            index=trial.index if trial else None,
            output_tokens_per_s=ev.output_tokens_per_s,
            concurrency=ev.concurrency,
            defaults_tok_s=defaults.result_tok_s if defaults and defaults.status == "feasible" else None,
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
        if isinstance(event, TuneStarted):
            self.started = event
            self.started_at_s = now_s
            if event.ttft_p95_max_s is not None or event.tok_s_per_user_min is not None:
                self.limits = SloLimits(event.ttft_p95_max_s, event.tok_s_per_user_min)
            else:  # an older event without the numbers
                self.limits = SloLimits.from_description(event.slo)
        elif isinstance(event, TrialStarted):
            self.trials[event.key] = TrialView(
                key=event.key, label=event.label, index=event.index, why=event.why, started_at_s=now_s
            )
            self.current_key = self.last_key = event.key
            self.phase = None
        elif isinstance(event, ServerReady):
            self._update(event.key, server_url=event.url, startup_s=event.startup_s)
        elif isinstance(event, PhaseProgressed):
            if event.key == self.current_key:
                self.phase = event
                self.phase_measured = False
        elif isinstance(event, PhaseMeasured):
            trial = self.trials.get(event.key)
            if trial is not None:
                self._update(event.key, points=(*trial.points, event))
            if self.phase is not None and self.phase.concurrency == event.concurrency:
                self.phase_measured = True
        elif isinstance(event, TrialFinished):
            self._finish_trial(event)
        elif isinstance(event, BestChanged):
            self.best_event = event
        elif isinstance(event, TuneFinished):
            self.finished = event
            self._close_running(event.stopped or "the run ended before this trial did")

    def _finish_trial(self, event: TrialFinished) -> None:
        # A candidate the search skipped was never started: it gets a row without a launch number.
        trial = self.trials.get(event.key) or TrialView(key=event.key, label=event.label, index=None)
        self.trials[event.key] = dataclasses.replace(
            trial,
            status=event.status,
            reason=event.reason,
            best_concurrency=event.best_concurrency,
            best_output_tokens_per_s=event.best_output_tokens_per_s,
            log_tail=event.log_tail,
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
