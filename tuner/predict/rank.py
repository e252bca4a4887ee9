"""Predict, then measure: which candidate to launch next, and when no launch left can pay off.

Every candidate has a predicted capacity (:meth:`tuner.predict.base.Prediction.capacity`). Measured trials
calibrate it: the ratio measured / predicted, per family of configurations that the model tends to get wrong
together (the same weights and KV-cache precision and tensor parallelism), else over all trials, else 1. The
contenders are the untried candidates whose optimistic value (calibrated x (1 + z x the model's error)) could
still beat the incumbent by the resolution; when there are none, the search stops, often well before its launch
budget. Of the contenders, one per family not yet tried goes first (one trial calibrates a whole family, and an
untried family may be off by the model's whole error), then the highest calibrated prediction.

The model's error starts at ``prior_error`` (aiconfigurator: 4-18 % on a real H100, REFERENCE.md) and is then
the spread of the log ratios seen, never below ``floor_error`` (what measurement noise and the dimensions the
model does not see leave).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

Family = Callable[[str], Hashable]


@dataclass
class Ranker:
    """Orders candidates by calibrated prediction. ``predicted`` maps a candidate key to its predicted
    capacity (0: predicted not to fit or not to meet the SLO at any load); ``family`` groups keys whose
    errors go together."""

    predicted: Mapping[str, float]
    family: Family = lambda key: None
    prior_error: float = 0.25  # relative, one standard deviation, before any trial
    floor_error: float = 0.05
    z: float = 2.0  # one-sided 97.7 %: an untried family is given up only when it is far below
    resolution: float = 0.02  # a contender must promise this much more than the incumbent
    explore_families: bool = True  # one trial in each family that could win before a second in any
    measured: dict[str, float] = field(default_factory=dict)  # key -> measured capacity (0: failed)

    def record(self, key: str, capacity: float) -> None:
        """A trial's measured capacity (0 for a launch that failed or held no load)."""
        self.measured[key] = capacity

    def _log_ratios(self, keys: list[str]) -> list[float]:
        return [
            math.log(self.measured[k] / self.predicted[k])
            for k in keys
            if self.measured.get(k, 0) > 0 and self.predicted.get(k, 0) > 0
        ]

    def calibration(self, key: str) -> tuple[float, float]:
        """(measured / predicted to expect for ``key``, its relative error): from the key's family when it
        has trials, else from every trial, else (1, prior error)."""
        own = [k for k in self.measured if self.family(k) == self.family(key)]
        ratios = self._log_ratios(own)
        pooled = self._log_ratios(list(self.measured))
        if ratios:
            spread = statistics.pstdev(pooled) if len(pooled) >= 2 else self.prior_error / 2
            return math.exp(statistics.fmean(ratios)), max(
                self.floor_error, spread / math.sqrt(len(ratios)) + self.floor_error
            )
        if pooled:
            # Another family's trials say something about the model's bias, not much about this family's.
            spread = statistics.pstdev(pooled) if len(pooled) >= 2 else 0.0
            return math.exp(statistics.fmean(pooled)), max(self.prior_error, spread)
        return 1.0, self.prior_error

    def expected(self, key: str) -> float:
        ratio, _ = self.calibration(key)
        return self.predicted.get(key, 0.0) * ratio

    def optimistic(self, key: str) -> float:
        ratio, error = self.calibration(key)
        return self.predicted.get(key, 0.0) * ratio * (1 + self.z * error)

    def incumbent(self) -> tuple[str, float] | None:
        """The best measured so far."""
        if not self.measured:
            return None
        key = max(self.measured, key=lambda k: self.measured[k])
        return key, self.measured[key]

    def contenders(self, tried: set[str] | None = None) -> list[str]:
        """Untried candidates that could still beat the incumbent, best calibrated prediction first."""
        tried = set(self.measured) | set(tried or ())
        best = self.incumbent()
        bar = best[1] * (1 + self.resolution) if best is not None else 0.0
        open_keys = [k for k, p in self.predicted.items() if k not in tried and p > 0]
        contenders = [k for k in open_keys if self.optimistic(k) > bar]
        return sorted(contenders, key=lambda k: (-self.expected(k), -self.optimistic(k)))

    def next(self, tried: set[str] | None = None, prefer: list[str] | None = None) -> str | None:
        """The candidate to launch next, or None when no untried one could beat the incumbent.

        ``prefer``: candidates the last trial's evidence argues for (a full KV cache asks for an FP8 one, a
        queue for a larger batch), best first; the first of them that is a contender and whose calibrated
        prediction is within the model's error of the top one goes first: the model cannot tell them apart,
        the evidence can.
        """
        contenders = self.contenders(tried)
        if not contenders:
            return None
        measured_families = {self.family(k) for k in self.measured}
        unexplored = [k for k in contenders if self.family(k) not in measured_families]
        if self.explore_families and unexplored:
            # A family without a trial of its own could be off by the model's whole error: one trial there
            # calibrates all its members, so each plausible family is tried once before any is exploited.
            contenders = unexplored
        top = contenders[0]
        _, error = self.calibration(top)
        floor = self.expected(top) * (1 - error)
        for key in prefer or ():
            if key in contenders and self.expected(key) >= floor:
                return key
        return top

    def why(self, key: str) -> str:
        """One line for the event log: what is predicted and how sure."""
        ratio, error = self.calibration(key)
        calibrated = "" if not self.measured else f", {ratio:.2f}x as trials so far measured"
        return (
            f"predicted {self.predicted.get(key, 0.0):.3g}{calibrated}: expect {self.expected(key):.3g} "
            f"± {100 * error:.0f} %"
        )
