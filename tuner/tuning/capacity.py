"""How much one running server holds within the SLO, and when one server beats another.

A launch is the expensive step (1-2.5 minutes for an 8B model on an H100), so everything here happens on one
running server, through a ``measure(load, role)`` callable that holds a load, judges it against the SLO with
its intervals (:func:`tuner.tuning.slo.judge`) and returns a :class:`~tuner.tuning.points.Point`.

* **rate** (the default objective, MLPerf's server scenario): short closed-loop *scout* phases at 1, 2, 4, ...
  users find the server's pace (the request rate where adding users stops helping or breaks the SLO); then
  open-loop arrivals at that rate are judged, stepped by x1.25 up or down until one load passes and one does
  not, and the bracket is narrowed (geometric bisection) to ``resolution``.
* **users** (Artificial Analysis style): the same scouting, then judged closed-loop points at the most users
  a scout held and at the first that failed, and integer bisection between them.

Only points near the capacity are judged: a p95 needs 59 requests before it can pass at 90 % confidence
(:func:`tuner.loadgen.steady.min_requests_for`), which at one user is minutes; scouting costs seconds.

The result is a :class:`Capacity`: the highest load that passed, the lowest above it that did not, and every
point. That bracket is the uncertainty of the capacity: one configuration **beats** another only when it passed
a load the other failed (:func:`beats`); otherwise they tie, and :func:`rank` prefers the configuration closer
to vLLM's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tuner.tuning.points import RATE, USERS, Load, Point

Measure = Callable[[Load, str], Point]
T = TypeVar("T")


class Bracket(Protocol):
    """What comparing needs of a capacity: one server's :class:`Capacity`, or a node's
    (:class:`tuner.tuning.layout.NodeCapacity`: one server's times its replicas)."""

    @property
    def lo(self) -> float | None: ...

    @property
    def feasible(self) -> bool: ...

    def upper(self, resolution: float) -> float: ...


@dataclass(frozen=True)
class CapacityPlan:
    objective: str = RATE
    max_users: int = 512
    rate_step: float = 1.25  # open loop: the factor between loads while bracketing
    resolution: float = 0.10  # stop narrowing once the failing load is within 10 % of the passing one
    saturation_gain: float = 0.03  # a doubling of users that adds less than 3 % throughput is flat
    patience: int = 2  # flat doublings in a row that mean saturation
    max_steps: int = 6  # open loop: steps up (or down) from the scouted pace before giving up
    max_points: int = 16


@dataclass(frozen=True)
class Capacity:
    """What one server held. ``best`` passed; ``ceiling`` is the lowest load above it that did not (None: the
    search ended for another reason, told by ``note``)."""

    objective: str
    points: tuple[Point, ...]
    best: Point | None
    ceiling: Point | None
    note: str

    @property
    def lo(self) -> float | None:
        return self.best.load.value if self.best else None

    @property
    def hi(self) -> float | None:
        return self.ceiling.load.value if self.ceiling else None

    @property
    def feasible(self) -> bool:
        return self.best is not None

    def upper(self, resolution: float) -> float:
        """The most this server might hold: its failing load, or within ``resolution`` above the best."""
        if self.hi is not None:
            return self.hi
        return (self.lo or 0.0) * (1 + resolution)

    def describe(self) -> str:
        """``"2.4 req/s (2.7 failed)"`` or ``"nothing met the SLO"``."""
        if self.best is None:
            return "nothing met the SLO"
        above = f" ({self.ceiling.load.label()} did not)" if self.ceiling else ""
        return f"{self.best.load.label()}{above}"

    def with_point(self, point: Point) -> Capacity:
        """The capacity once ``point`` (another measurement on the same server) is known too."""
        return summarise(self.objective, (*self.points, point), self.note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "note": self.note,
            "points": [p.to_dict() for p in self.points],
            "best": _index(self.points, self.best),
            "ceiling": _index(self.points, self.ceiling),
            "lo": self.lo,
            "hi": self.hi,
            "describe": self.describe(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capacity:
        points = tuple(Point.from_dict(p) for p in data.get("points") or ())

        def at(key: str) -> Point | None:
            i = data.get(key)
            return points[i] if isinstance(i, int) and 0 <= i < len(points) else None

        return cls(
            str(data.get("objective", RATE)), points, at("best"), at("ceiling"), str(data.get("note", ""))
        )


def _index(points: Sequence[Point], point: Point | None) -> int | None:
    return next((i for i, p in enumerate(points) if p is point), None)


def summarise(objective: str, points: Sequence[Point], note: str = "") -> Capacity:
    """Best and ceiling from judged points of the objective's load kind (scouts only guide the search)."""
    kind = RATE if objective == RATE else USERS
    judged = [p for p in points if p.role == "judged" and p.load.kind == kind and p.aborted is None]
    # Conservative: a load that did not pass caps the capacity, even where a higher one passed (noise or not,
    # an operator should not be told the server holds more than the lowest load it failed at).
    ceiling = min((p for p in judged if not p.passed), key=lambda p: p.load.value, default=None)
    passing = [p for p in judged if p.passed and (ceiling is None or p.load.value < ceiling.load.value)]
    best = max(passing, key=lambda p: (p.load.value, p.output_tokens_per_s), default=None)
    return Capacity(objective, tuple(points), best, ceiling, note)


def find_capacity(
    measure: Measure, plan: CapacityPlan, cancelled: Callable[[], bool] = lambda: False
) -> Capacity:
    """Search one running server's capacity under ``plan.objective``; see the module docstring."""
    if plan.objective == USERS:
        return _users(measure, plan, cancelled)
    return _rate(measure, plan, cancelled)


class _Stop(Exception):
    """The search cannot go on: interrupted, or the server stopped answering."""


def _take(points: list[Point], point: Point) -> Point:
    points.append(point)
    if point.aborted:
        raise _Stop(point.aborted)
    return point


def _users(measure: Measure, plan: CapacityPlan, cancelled: Callable[[], bool]) -> Capacity:
    """Scout the closed loop's knee cheaply, then judge users around it: the most users a scout held first,
    then the first scout that failed, then integer bisection between (or halving down from a judged miss)."""
    points: list[Point] = []
    note = ""
    try:
        if _scout(measure, plan, points, cancelled) is None:
            if cancelled():
                raise _Stop("interrupted")
            return summarise(USERS, points, f"one user alone misses the SLO ({points[-1].why()})")
        scouts = [p for p in points if p.role == "scout"]
        c = max((p.load.users_count for p in scouts if p.passed), default=1)
        failing_scout = next((p for p in scouts if not p.passed), None)
        if _take(points, measure(Load.users(c), "judged")).passed:
            if failing_scout is not None and len(points) < plan.max_points and not cancelled():
                _take(points, measure(failing_scout.load, "judged"))  # the bracket's top, judged too
        else:  # the scout's point estimate was optimistic: halve until a judged load holds
            while c > 1 and not cancelled() and len(points) < plan.max_points:
                c = max(1, c // 2)
                if _take(points, measure(Load.users(c), "judged")).passed:
                    break
        cap = summarise(USERS, points)
        while cap.best and cap.ceiling and len(points) < plan.max_points and not cancelled():
            lo, hi = cap.best.load.users_count, cap.ceiling.load.users_count
            if hi - lo <= max(1, math.ceil(plan.resolution * lo)):
                break
            _take(points, measure(Load.users((lo + hi) // 2), "judged"))
            cap = summarise(USERS, points)
        if cap.best and cap.ceiling is None:
            top = cap.best.load.users_count
            note = (
                f"still within the SLO at the most users allowed ({plan.max_users})"
                if top >= plan.max_users
                else f"throughput stopped growing by {top} users"
            )
    except _Stop as stop:
        note = str(stop)
    if cancelled():
        note = "interrupted"
    return summarise(USERS, points, note or _bracket_note(summarise(USERS, points)))


def _scout(
    measure: Measure, plan: CapacityPlan, points: list[Point], cancelled: Callable[[], bool]
) -> float | None:
    """The request rate of the closed loop's knee: the most requests/s any number of users got within the
    SLO's point estimates. None when even one user misses the SLO."""
    c, best_tok_s, flat, knee = 1, 0.0, 0, None
    while len(points) < plan.max_points and not cancelled():
        p = _take(points, measure(Load.users(c), "scout"))
        if not p.passed:
            if c == 1:  # be sure before calling the whole configuration infeasible
                p = _take(points, measure(Load.users(1), "judged"))
                if not p.passed:
                    return None
            else:
                break
        knee = max(knee or 0.0, p.requests_per_s)
        flat = 0 if p.output_tokens_per_s >= best_tok_s * (1 + plan.saturation_gain) else flat + 1
        best_tok_s = max(best_tok_s, p.output_tokens_per_s)
        if flat >= plan.patience or c >= plan.max_users:
            break
        c = min(2 * c, plan.max_users)
    return knee


def _rate(measure: Measure, plan: CapacityPlan, cancelled: Callable[[], bool]) -> Capacity:
    points: list[Point] = []
    note = ""
    try:
        knee = _scout(measure, plan, points, cancelled)
        if knee is None:
            if cancelled():
                raise _Stop("interrupted")
            one = points[-1]
            return summarise(RATE, points, f"one user alone misses the SLO ({one.why()})")
        if knee <= 0:
            return summarise(RATE, points, "the scouting phases completed no request")
        rate = knee
        first = _take(points, measure(Load.rate(rate), "judged"))
        direction = 1 if first.passed else -1
        for _ in range(plan.max_steps):
            cap = summarise(RATE, points)
            if cancelled() or len(points) >= plan.max_points or (cap.best and cap.ceiling):
                break
            rate = rate * plan.rate_step if direction > 0 else rate / plan.rate_step
            _take(points, measure(Load.rate(rate), "judged"))
        cap = summarise(RATE, points)
        while cap.best and cap.ceiling and len(points) < plan.max_points and not cancelled():
            lo, hi = cap.best.load.value, cap.ceiling.load.value
            mid = Load.rate(math.sqrt(lo * hi))
            if hi / lo - 1 <= plan.resolution or mid.value in (lo, hi):
                break
            _take(points, measure(mid, "judged"))
            cap = summarise(RATE, points)
    except _Stop as stop:
        note = str(stop)
    if cancelled():
        note = "interrupted"
    cap = summarise(RATE, points)
    if not note and cap.best is None:
        lowest = min((p.load for p in points if p.role == "judged"), key=lambda ld: ld.value, default=None)
        note = f"no arrival rate down to {lowest.label() if lowest else 'n/a'} met the SLO"
    return summarise(RATE, points, note or _bracket_note(cap))


def _bracket_note(cap: Capacity) -> str:
    if cap.best and cap.ceiling:
        return f"bracketed between {cap.best.load.label()} and {cap.ceiling.load.label()}"
    if cap.best:
        return f"still within the SLO at {cap.best.load.label()}: the search stopped before a load failed"
    return "nothing met the SLO"


# --- comparing servers --------------------------------------------------------------------------------------


def beats(a: Bracket, b: Bracket, resolution: float) -> bool:
    """``a`` held a load that ``b`` did not: a difference beyond the measurements' uncertainty."""
    if a.lo is None:
        return False
    if b.lo is None:
        return True
    return a.lo >= b.upper(resolution) and a.lo > b.lo


def separating_load(a: Capacity, b: Capacity, objective: str) -> Load | None:
    """The one load that could tell two tied servers apart: the load ``b`` failed, on ``a``, when ``a`` passed
    below it and was not judged there yet. None when there is none."""
    if a.lo is None or b.hi is None or a.lo >= b.hi:
        return None
    if a.hi is not None and a.hi <= b.hi:
        return None  # a already failed at or below it
    return Load.rate(b.hi) if objective == RATE else Load.users(int(b.hi))


def rank(
    items: Sequence[T], capacity: Callable[[T], Bracket], distance: Callable[[T], int], resolution: float
) -> list[T]:
    """Best first. The top is the highest capacity; every item it does not beat ties with it, and among the
    tied ones the closest to vLLM's defaults (``distance``: dimensions changed) comes first, then the higher
    capacity. The rest are ranked the same way."""
    left = [x for x in items if capacity(x).feasible]
    ranked: list[T] = []
    while left:
        top = max(left, key=lambda x: (capacity(x).lo or 0.0, -distance(x)))
        tied = [x for x in left if not beats(capacity(top), capacity(x), resolution)]
        choice = min(tied, key=lambda x: (distance(x), -(capacity(x).lo or 0.0)))
        ranked.append(choice)
        left.remove(choice)
    return ranked


def ties_with(a: Bracket, b: Bracket, resolution: float) -> bool:
    """Neither beats the other."""
    return a.feasible and b.feasible and not beats(a, b, resolution) and not beats(b, a, resolution)
