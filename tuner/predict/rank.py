"""Predict, then measure: which candidate to launch next, and when no launch left can pay off.

Every candidate has a predicted capacity (:meth:`tuner.predict.base.Prediction.capacity`). Measured trials
calibrate it: the ratio measured / predicted, per family of configurations that the model tends to get wrong
together (the same weights and KV-cache precision and tensor parallelism), else over all trials, else 1. The
contenders are the untried candidates whose optimistic value (calibrated x (1 + z x the model's error)) could
still beat the incumbent by the resolution; when there are none, the search stops, often well before its launch
budget. Of the contenders, one per family not yet tried goes first (one trial calibrates a whole family, and an
untried family may be off by the model's whole error), then the highest calibrated prediction.

The model's error starts at ``prior_error`` (aiconfigurator: 4-18 % on a real H100, REFERENCE.md). A family's
trials pin down its mean, not each member: what the model does not see (batched tokens, memory fraction, an error
that grows with the load) moves one configuration away from its family's mean however many trials the family
has. So an untried member's error is the spread of configurations around their family's mean, ``config_error``
before trials show it (a prior worth ``config_prior_weight`` trials, then the spread seen within families), plus
the uncertainty of the family's mean; never below ``floor_error`` (measurement noise). ``config_error`` 0 gives
the rule before issue 16 (the spread of all log ratios over the square root of the family's trials, plus the
floor), which stopped while untried configurations of the incumbent's family could still win.

:meth:`Ranker.next_batch` hands a parallel executor several contenders at once: one per family with neither a
trial nor a running one first, then the best calibrated predictions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Hashable, Mapping
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
    config_error: float = 0.10  # one configuration around its family's mean, before trials show the spread
    config_prior_weight: float = 3.0  # how many trials' worth of spread config_error counts for
    z: float = 2.0  # one-sided 97.7 %: an untried family is given up only when it is far below
    resolution: float = 0.02  # a contender must promise this much more than the incumbent
    explore_families: bool = True  # one trial in each family that could win before a second in any
    measured: dict[str, float] = field(default_factory=dict)  # key -> measured capacity (0: failed)
    # Calibrations per family, valid while the trials are the same (a search asks for every candidate's often).
    _cache: dict[Hashable, tuple[float, float]] = field(default_factory=dict, init=False, repr=False)
    _cache_for: tuple[int, int] = field(default=(-1, -1), init=False, repr=False)
    _version: int = field(default=0, init=False, repr=False)
    _families: dict[str, Hashable] = field(default_factory=dict, init=False, repr=False)

    def record(self, key: str, capacity: float) -> None:
        """A trial's measured capacity (0 for a launch that failed or held no load)."""
        self.measured[key] = capacity
        self._version += 1

    def _family_of(self, key: str) -> Hashable:
        if key not in self._families:
            self._families[key] = self.family(key)
        return self._families[key]

    def _log_ratios(self, keys: list[str]) -> list[float]:
        return [
            math.log(self.measured[k] / self.predicted[k])
            for k in keys
            if self.measured.get(k, 0) > 0 and self.predicted.get(k, 0) > 0
        ]

    def calibration(self, key: str) -> tuple[float, float]:
        """(measured / predicted to expect for ``key``, its relative error): from the key's family when it
        has trials, else from every trial, else (1, prior error)."""
        stamp = (self._version, len(self.measured))
        if stamp != self._cache_for:
            self._cache.clear()
            self._cache_for = stamp
        fam = self._family_of(key)
        if fam not in self._cache:
            self._cache[fam] = self._calibrate(fam)
        return self._cache[fam]

    def _calibrate(self, fam: Hashable) -> tuple[float, float]:
        own = [k for k in self.measured if self._family_of(k) == fam]
        ratios = self._log_ratios(own)
        pooled = self._log_ratios(list(self.measured))
        if ratios and self.config_error > 0:
            within = self.within_family_error()
            # This member's own departure from the family (does not shrink) and the family mean's uncertainty.
            error = within * math.sqrt(1 + 1 / len(ratios))
            return math.exp(statistics.fmean(ratios)), max(self.floor_error, error)
        if ratios:
            spread = _pstdev(pooled) if len(pooled) >= 2 else self.prior_error / 2
            return math.exp(statistics.fmean(ratios)), max(
                self.floor_error, spread / math.sqrt(len(ratios)) + self.floor_error
            )
        if pooled:
            # Another family's trials say something about the model's bias, not much about this family's.
            spread = _pstdev(pooled) if len(pooled) >= 2 else 0.0
            return math.exp(statistics.fmean(pooled)), max(self.prior_error, spread)
        return 1.0, self.prior_error

    def within_family_error(self) -> float:
        """How far one configuration strays from its family's mean (log ratio, one standard deviation):
        ``config_error`` as a prior worth ``config_prior_weight`` trials, pooled with the spread measured
        within the families that have two or more trials."""
        groups: dict[Hashable, list[float]] = {}
        for k in self.measured:
            for r in self._log_ratios([k]):
                groups.setdefault(self._family_of(k), []).append(r)
        squares = sum(sum((r - statistics.fmean(rs)) ** 2 for r in rs) for rs in groups.values())
        dof = sum(len(rs) - 1 for rs in groups.values())
        prior = self.config_prior_weight
        return math.sqrt((prior * self.config_error**2 + squares) / (prior + dof))

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

    def contenders(self, tried: Collection[str] | None = None) -> list[str]:
        """Untried candidates that could still beat the incumbent, best calibrated prediction first."""
        tried = set(self.measured) | set(tried or ())
        best = self.incumbent()
        bar = best[1] * (1 + self.resolution) if best is not None else 0.0
        open_keys = [k for k, p in self.predicted.items() if k not in tried and p > 0]
        contenders = [k for k in open_keys if self.optimistic(k) > bar]
        return sorted(contenders, key=lambda k: (-self.expected(k), -self.optimistic(k)))

    def next(self, tried: Collection[str] | None = None, prefer: list[str] | None = None) -> str | None:
        """The candidate to launch next, or None when no untried one could beat the incumbent.

        ``prefer``: candidates the last trial's evidence argues for (a full KV cache asks for an FP8 one, a
        queue for a larger batch), best first; the first of them that is a contender and whose calibrated
        prediction is within the model's error of the top one goes first: the model cannot tell them apart,
        the evidence can.
        """
        contenders = self.contenders(tried)
        if not contenders:
            return None
        measured_families = {self._family_of(k) for k in self.measured}
        unexplored = [k for k in contenders if self._family_of(k) not in measured_families]
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

    def next_batch(
        self, tried: Collection[str] | None = None, running: Collection[str] = (), k: int = 1
    ) -> list[str]:
        """Up to ``k`` candidates to launch side by side, best first, for a parallel executor: one per family
        that has neither a trial nor one running (best calibrated prediction first), then the other contenders
        by calibrated prediction. ``running``: launched, not yet measured (not offered again; their families
        count as explored). Empty when no untried candidate could beat the incumbent: the running trials'
        results may reopen the search."""
        busy = set(tried or ()) | set(running)
        contenders = self.contenders(busy)
        batch: list[str] = []
        if self.explore_families:
            explored = {self._family_of(key) for key in [*self.measured, *running]}
            for key in contenders:
                fam = self._family_of(key)
                if fam not in explored:
                    explored.add(fam)
                    batch.append(key)
        chosen = set(batch)
        batch += [key for key in contenders if key not in chosen]
        return batch[: max(0, k)]

    def why(self, key: str) -> str:
        """One line for the event log: what is predicted and how sure."""
        ratio, error = self.calibration(key)
        calibrated = "" if not self.measured else f", {ratio:.2f}x as trials so far measured"
        return (
            f"predicted {self.predicted.get(key, 0.0):.3g}{calibrated}: expect {self.expected(key):.3g} "
            f"± {100 * error:.0f} %"
        )


def _pstdev(values: list[float]) -> float:
    """The population standard deviation, in floats (statistics.pstdev's exact arithmetic is slow)."""
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
