"""A load (how requests arrive) and a measured point (that load held on one server, judged against the SLO).

Two load models:

* ``rate``: open loop. Requests arrive on their own clock (Poisson at ``value`` requests/s), whether or not the
  server keeps up, as an API behind real users sees them; queues build in bursts. MLPerf's server scenario
  measures capacity this way: the highest arrival rate that meets the latency limits.
* ``users``: closed loop. ``value`` users each send their next request when the last one ends, so the server is
  never offered more than it finishes (Artificial Analysis' "concurrent users at a per-user speed floor").

A :class:`Point` keeps the decision (``pass``, ``fail`` or ``uncertain``: an interval straddled a limit even
after measuring more), the steady-window figures with their intervals, and every phase it took, as stored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.loadgen.steady import SteadyStats

RATE = "rate"
USERS = "users"
ROLES = ("scout", "judged", "proof", "production")
"""scout: a short closed-loop phase that finds the server's pace (judged on point estimates); judged: a point of
the capacity search; proof: the capacity point again on the server relaunched from the exported file;
production: the steady check at the operating point."""


@dataclass(frozen=True, slots=True)
class Load:
    """How requests are offered: ``rate`` (requests/s, Poisson) or ``users`` (concurrent, closed loop)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in (RATE, USERS):
            raise ValueError(f"load kind must be {RATE!r} or {USERS!r}, got {self.kind!r}")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise ValueError(f"a load must be positive, got {self.value!r}")
        if self.kind == USERS:
            object.__setattr__(self, "value", float(max(1, round(self.value))))

    @classmethod
    def rate(cls, requests_per_s: float) -> Load:
        return cls(RATE, float(f"{requests_per_s:.3g}"))  # three significant figures: what is shown is sent

    @classmethod
    def users(cls, count: int) -> Load:
        return cls(USERS, count)

    @property
    def users_count(self) -> int:
        return int(self.value)

    @property
    def open_loop(self) -> bool:
        return self.kind == RATE

    def label(self) -> str:
        """``"2.4 req/s"`` or ``"8 users"``."""
        if self.kind == RATE:
            return f"{self.value:,.0f} req/s" if self.value >= 100 else f"{self.value:.3g} req/s"
        return f"{self.users_count} user{'s' if self.users_count != 1 else ''}"

    def scaled(self, factor: float) -> Load:
        """This load times ``factor`` (users rounded down, at least one)."""
        if self.kind == RATE:
            return Load.rate(self.value * factor)
        return Load.users(max(1, math.floor(self.value * factor)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "label": self.label()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Load:
        return cls(str(data["kind"]), float(data["value"]))


def steady_to_dict(steady: SteadyStats) -> dict[str, Any]:
    return dataclasses.asdict(steady)


def empty_steady() -> SteadyStats:
    """The figures of a point that measured nothing (interrupted, server gone)."""
    return SteadyStats(
        phases=0, window_s=0.0, requests_ok=0, requests_failed=0, output_tokens_per_s=0.0,
        output_tokens_per_s_ci=None, requests_per_s=0.0, ttft_p50_s=None, ttft_p95_s=None, ttft_p95_ci_s=None,
        tpot_p50_s=None, tpot_p95_s=None, tpot_p95_ci_s=None, user_tok_per_s_p50=None, ttft_growth_s=None,
        whole_phase=True,
    )  # fmt: skip


def steady_from_dict(data: Mapping[str, Any]) -> SteadyStats:
    names = {f.name for f in dataclasses.fields(SteadyStats)}
    values: dict[str, Any] = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names
    }
    try:
        return SteadyStats(**values)
    except TypeError:  # an incomplete record (an older or damaged store): figures unknown
        return empty_steady()


@dataclass(frozen=True)
class Point:
    """One load held on one server and judged. ``phases`` are the stored phase dicts (tuner.measure)."""

    load: Load
    role: str
    decision: str  # "pass" | "fail" | "uncertain"
    steady: SteadyStats
    reasons: tuple[str, ...] = ()  # the limits the point estimates broke, in words
    uncertain: tuple[str, ...] = ()  # the limits an interval straddled
    phases: tuple[Mapping[str, Any], ...] = ()
    disturbed: str = ""  # why the measurement kept was disturbed by other work on the host ("" = it was not)
    aborted: str | None = None  # the point could not be measured (server gone, interrupted)
    extra: Mapping[str, Any] = field(default_factory=dict)  # what a caller adds (proof ratio, ...)

    @property
    def passed(self) -> bool:
        return self.decision == "pass" and self.aborted is None

    @property
    def output_tokens_per_s(self) -> float:
        return self.steady.output_tokens_per_s

    @property
    def requests_per_s(self) -> float:
        return self.steady.requests_per_s

    @property
    def last_phase(self) -> Mapping[str, Any]:
        return self.phases[-1] if self.phases else {}

    @property
    def evidence(self) -> Mapping[str, Any]:
        return self.last_phase.get("evidence") or {}

    @property
    def bound(self) -> Mapping[str, Any]:
        return self.last_phase.get("bound") or {}

    def why(self) -> str:
        """One line: what failed, or what was uncertain, or that it passed."""
        if self.aborted:
            return self.aborted
        if self.decision == "fail":
            return "; ".join(self.reasons) or "failed"
        if self.decision == "uncertain":
            return "at the limit: " + "; ".join(self.uncertain or self.reasons)
        return "meets the SLO"

    def to_dict(self) -> dict[str, Any]:
        return {
            "load": self.load.to_dict(),
            "role": self.role,
            "decision": self.decision,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "uncertain": list(self.uncertain),
            "steady": steady_to_dict(self.steady),
            "phases": list(self.phases),
            "disturbed": self.disturbed,
            "aborted": self.aborted,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Point:
        return cls(
            load=Load.from_dict(data["load"]),
            role=str(data.get("role", "judged")),
            decision=str(data.get("decision", "fail")),
            steady=steady_from_dict(data.get("steady") or {}),
            reasons=tuple(data.get("reasons") or ()),
            uncertain=tuple(data.get("uncertain") or ()),
            phases=tuple(data.get("phases") or ()),
            disturbed=str(data.get("disturbed") or ""),
            aborted=data.get("aborted"),
            extra=dict(data.get("extra") or {}),
        )


def points_to_dicts(points: Sequence[Point]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in points]
