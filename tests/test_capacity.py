"""The capacity search on one server, and when one server beats another (a simulated server: no vLLM)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tuner.tuning.capacity import (
    Capacity,
    CapacityPlan,
    beats,
    find_capacity,
    rank,
    separating_load,
    summarise,
    ties_with,
)
from tuner.tuning.points import RATE, USERS, Load, Point, empty_steady


@dataclasses.dataclass
class SimulatedServer:
    """A server that serves ``per_user_rps`` requests/s per user up to ``max_rps``; the SLO holds below
    ``open_capacity_rps`` arrivals (open loop) and up to ``max_users`` users (closed loop). Loads within
    ``fuzzy`` of a limit come out uncertain. Records every load it was asked to hold."""

    per_user_rps: float = 0.4
    max_rps: float = 3.2
    open_capacity_rps: float = 2.9
    max_users: int = 10
    one_user_fails: bool = False
    fuzzy: float = 0.0
    asked: list[tuple[Load, str]] = dataclasses.field(default_factory=list)

    def measure(self, load: Load, role: str) -> Point:
        self.asked.append((load, role))
        if load.open_loop:
            rps, limit = min(load.value, self.max_rps), self.open_capacity_rps
            x = load.value
        else:
            rps = min(load.users_count * self.per_user_rps, self.max_rps)
            limit, x = float(self.max_users), float(load.users_count)
            if self.one_user_fails:
                limit = 0.5
        if self.fuzzy > 0 and abs(x - limit) <= self.fuzzy * limit and role != "scout":
            decision = "uncertain"
        else:
            decision = "pass" if x <= limit else "fail"
        steady = dataclasses.replace(empty_steady(), requests_per_s=rps, output_tokens_per_s=rps * 256)
        reasons = ("TTFT p95 0.80 s > 0.50 s",) if decision != "pass" else ()
        return Point(load, role, decision, steady, reasons)


def test_rate_search_scouts_the_pace_then_brackets_the_open_loop_capacity() -> None:
    server = SimulatedServer()
    cap = find_capacity(server.measure, CapacityPlan(objective=RATE, max_users=64))
    scouts = [load for load, role in server.asked if role == "scout"]
    assert scouts and all(not load.open_loop for load in scouts)  # closed loop finds the pace first
    assert cap.best is not None and cap.ceiling is not None
    assert cap.best.load.open_loop and cap.lo is not None and cap.hi is not None
    assert cap.lo <= server.open_capacity_rps < cap.hi  # the true capacity lies in the bracket
    assert cap.hi / cap.lo - 1 <= 0.10 + 1e-9  # narrowed to the resolution
    assert "bracketed" in cap.note


def test_rate_search_steps_down_when_the_scouted_pace_already_fails() -> None:
    server = SimulatedServer(open_capacity_rps=1.1)  # queueing hurts far below the closed-loop knee
    cap = find_capacity(server.measure, CapacityPlan(objective=RATE))
    assert cap.lo is not None and cap.hi is not None
    assert cap.lo <= 1.1 < cap.hi


def test_one_user_missing_the_slo_means_infeasible_after_a_judged_second_look() -> None:
    server = SimulatedServer(one_user_fails=True)
    cap = find_capacity(server.measure, CapacityPlan(objective=RATE))
    assert cap.best is None and "one user alone misses the SLO" in cap.note
    assert server.asked[-1] == (Load.users(1), "judged")  # the scout's failure was checked before giving up


def test_users_search_scouts_then_judges_only_around_the_knee() -> None:
    server = SimulatedServer(max_users=11)
    cap = find_capacity(server.measure, CapacityPlan(objective=USERS, max_users=64))
    assert cap.best is not None and cap.best.load == Load.users(11)
    assert cap.ceiling is not None and cap.ceiling.load == Load.users(12)
    scouts = [load.users_count for load, role in server.asked if role == "scout"]
    judged = [load.users_count for load, role in server.asked if role == "judged"]
    assert scouts == [1, 2, 4, 8, 16]  # doubling until a scout fails
    assert judged[:2] == [8, 16] and min(judged) == 8  # judged (59+ requests each) only near the capacity


def test_users_search_halves_when_the_scouts_were_optimistic() -> None:
    """Scouts judge point estimates over short phases: the judged look can disagree, and then wins."""
    server = SimulatedServer(max_users=5)
    measure = server.measure

    def optimistic_scouts(load: Load, role: str) -> Point:
        point = measure(load, role)
        return (
            dataclasses.replace(point, decision="pass")
            if role == "scout" and load.users_count <= 8
            else point
        )

    cap = find_capacity(optimistic_scouts, CapacityPlan(objective=USERS, max_users=64))
    assert cap.best is not None and cap.best.load == Load.users(5)


def test_an_uncertain_point_counts_as_not_passing() -> None:
    server = SimulatedServer(max_users=8, fuzzy=0.01)  # 8 users is "at the limit"
    cap = find_capacity(server.measure, CapacityPlan(objective=USERS, max_users=64))
    assert cap.best is not None and cap.best.load == Load.users(7)
    assert cap.ceiling is not None and cap.ceiling.decision == "uncertain"


def test_a_failure_below_a_pass_caps_the_capacity() -> None:
    """Conservative: noise or not, the lowest failing load bounds what the server is said to hold."""
    p = SimulatedServer().measure
    points = [p(Load.rate(2.0), "judged"), p(Load.rate(3.0), "judged")]
    fail = dataclasses.replace(p(Load.rate(2.5), "judged"), decision="fail")
    cap = summarise(RATE, [*points, fail])
    assert cap.lo == 2.0 and cap.hi == 2.5


def _cap(lo: float | None, hi: float | None) -> Capacity:
    server = SimulatedServer(open_capacity_rps=lo or 0.1)
    points = []
    if lo is not None:
        points.append(server.measure(Load.rate(lo), "judged"))
    if hi is not None:
        points.append(dataclasses.replace(server.measure(Load.rate(hi), "judged"), decision="fail"))
    return summarise(RATE, points)


def test_beats_needs_a_load_one_held_and_the_other_failed() -> None:
    assert beats(_cap(3.0, 3.3), _cap(2.5, 2.8), 0.10)  # held 3.0 where the other failed at 2.8
    assert not beats(_cap(2.7, 3.0), _cap(2.5, 2.8), 0.10)  # 2.7 < 2.8: inside the other's bracket
    assert ties_with(_cap(2.7, 3.0), _cap(2.5, 2.8), 0.10)
    assert beats(_cap(1.0, 1.1), _cap(None, 0.5), 0.10)  # anything feasible beats nothing
    assert not beats(_cap(None, 0.5), _cap(1.0, 1.1), 0.10)


def test_rank_prefers_the_configuration_closer_to_the_defaults_among_ties() -> None:
    items = {
        "defaults": _cap(2.5, 2.8),
        "fp8": _cap(2.7, 3.0),
        "big": _cap(3.5, 3.9),
        "none": _cap(None, 0.5),
    }
    distance = {"defaults": 0, "fp8": 1, "big": 2, "none": 1}
    order = rank(list(items), items.__getitem__, distance.__getitem__, 0.10)
    assert order == ["big", "defaults", "fp8"]  # big beats both; the tied pair goes defaults-first; none out
    tied_only = rank(["fp8", "defaults"], items.__getitem__, distance.__getitem__, 0.10)
    assert tied_only == ["defaults", "fp8"]


def test_separating_load_is_where_the_incumbent_failed() -> None:
    incumbent, challenger = _cap(2.5, 2.8), _cap(2.7, 3.0)
    assert separating_load(challenger, incumbent, RATE) == Load.rate(2.8)
    assert separating_load(_cap(2.7, 2.75), incumbent, RATE) is None  # it already failed below 2.8
    assert separating_load(_cap(3.0, 3.3), incumbent, RATE) is None  # already clear


def test_capacity_round_trips_through_its_stored_form() -> None:
    cap = find_capacity(SimulatedServer().measure, CapacityPlan(objective=RATE))
    again = Capacity.from_dict(cap.to_dict())
    assert (again.lo, again.hi, again.note, len(again.points)) == (cap.lo, cap.hi, cap.note, len(cap.points))
    assert again.best is not None and again.best.load == cap.best.load  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "label"), [(2.4, "2.4 req/s"), (12.345, "12.3 req/s"), (0.25, "0.25 req/s")]
)
def test_rate_loads_keep_three_significant_figures(value: float, label: str) -> None:
    assert Load.rate(value).label() == label
    assert Load.rate(value).value == float(label.split()[0])


def test_users_loads_scale_down_to_at_least_one_user() -> None:
    assert Load.users(8).scaled(0.75) == Load.users(6)
    assert Load.users(1).scaled(0.5) == Load.users(1)
    assert math.isclose(Load.rate(4.0).scaled(0.75).value, 3.0)
