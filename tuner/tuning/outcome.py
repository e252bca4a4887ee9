"""What one trial came to: a configuration, how its launch went, and the capacity its server held."""

from __future__ import annotations

from dataclasses import dataclass

from tuner.tuning.capacity import Capacity
from tuner.tuning.space import Candidate
from tuner.tuning.store import TrialRecord, TrialStatus

__all__ = ["THROTTLED_PCT_DISTURBS", "TrialOutcome"]

THROTTLED_PCT_DISTURBS = 10.0
"""A trial whose GPUs were slowed (power cap, thermal, HW slowdown) in more than this share of a kept window's
readings is flagged as disturbed: its capacity is what a throttled GPU held."""


@dataclass
class TrialOutcome:
    """One trial: measured (``capacity``), not launched (infeasible), or failed with the reason."""

    candidate: Candidate
    status: TrialStatus
    reason: str
    capacity: Capacity | None = None
    log_tail: str = ""
    startup_s: float | None = None
    failure_kind: str | None = None  # launcher.FailureKind value when the server did not start
    gpus: tuple[int, ...] = ()  # the GPUs its server held

    @property
    def disturbed(self) -> str:
        """Why other work on the node (trials beside it, other processes) disturbed a kept point, "" if none: the
        host's CPU busy, or its GPUs slowed (trials side by side share the node's power and cooling)."""
        points = self.capacity.points if self.capacity else ()
        host = next((p.disturbed for p in points if p.disturbed), "")
        worst = max(points, key=lambda p: p.evidence.get("throttled_pct") or 0.0, default=None)
        share = worst.evidence.get("throttled_pct") if worst is not None else None
        if share is not None and share > THROTTLED_PCT_DISTURBS:
            reasons = ", ".join(worst.evidence.get("throttle_reasons") or ()) if worst else ""
            gpus = f"its GPUs slowed {share:.0f} % of a window ({reasons or 'throttled'})"
            return f"{host}; {gpus}" if host else gpus
        return host

    @property
    def feasible(self) -> bool:
        return self.status is TrialStatus.FEASIBLE and self.capacity is not None and self.capacity.feasible

    @classmethod
    def from_record(cls, record: TrialRecord) -> TrialOutcome:
        """A trial as the store kept it (a resumed run's)."""
        capacity = Capacity.from_dict(record.capacity) if record.capacity else None
        return cls(
            record.candidate,
            record.status,
            record.reason or "",
            capacity,
            record.log_tail or "",
            record.startup_s,
        )
