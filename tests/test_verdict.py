"""The verdict: proof and production check on a relaunch, backing off, the runner-up, not proven (no vLLM:
a scripted runner stands in for the relaunched servers; tests/test_tune.py runs the real thing)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

from tuner.serving.launcher import LaunchError
from tuner.serving.launchlog import FailureKind
from tuner.tuning.capacity import summarise
from tuner.tuning.points import RATE, Load, Point, empty_steady
from tuner.tuning.space import Candidate
from tuner.tuning.verdict import EXIT_NOT_PROVEN, EXIT_OK, Contender, VerdictPlan, reach_verdict

Decide = Callable[[str, Load, str], tuple[str, float]]  # (contender label, load, role) -> (decision, tok/s)


TOKENS_PER_REQUEST = 250


def _point(load: Load, role: str, decision: str, tok_s: float) -> Point:
    """A point whose window delivered ``tok_s`` (±5 %, 90 %) of 250-token requests."""
    steady = dataclasses.replace(
        empty_steady(), requests_ok=180, output_tokens_per_s=tok_s, ttft_p95_s=0.2, ttft_p95_ci_s=(0.18, 0.25),
        output_tokens_per_s_ci=(0.95 * tok_s, 1.05 * tok_s), requests_per_s=tok_s / TOKENS_PER_REQUEST,
    )  # fmt: skip
    reasons = ("TTFT p95 0.80 s > 0.50 s",) if decision == "fail" else ()
    return Point(load, role, decision, steady, reasons)


class ScriptedRunner:
    """Relaunches that never start (``broken``) or whose points are decided by ``decide``."""

    def __init__(self, decide: Decide, broken: frozenset[str] = frozenset()) -> None:
        self.decide = decide
        self.broken = broken
        self.held: list[tuple[str, Load, str]] = []
        self.serving: str | None = None
        self.events: list[object] = []

    def cancelled(self) -> bool:
        return False

    def emit(self, event: object) -> None:
        self.events.append(event)

    @contextlib.contextmanager
    def serve(self, key: str, args: tuple[str, ...], log_name: str) -> Iterator[ScriptedRunner]:
        label = Path(args[1]).read_text().splitlines()[0]
        if label in self.broken:
            raise LaunchError(FailureKind.CUDA_OOM, "vLLM failed to start (CUDA out of memory)")
        self.serving = label
        yield self

    @contextlib.contextmanager
    def serve_node(
        self, key: str, args: tuple[str, ...], log_name: str, placements: object
    ) -> Iterator[ScriptedRunner]:
        self.placements = placements
        with self.serve(key, args, log_name) as session:
            yield session

    startup_s = 42.0

    def measure(self, load: Load, role: str) -> Point:
        assert self.serving is not None
        self.held.append((self.serving, load, role))
        decision, tok_s = self.decide(self.serving, load, role)
        return _point(load, role, decision, tok_s)


def _contender(label: str, capacity_rps: float, tok_s: float = 1000.0, replicas: int = 1) -> Contender:
    best = _point(Load.rate(capacity_rps), "judged", "pass", tok_s)
    ceiling = _point(Load.rate(capacity_rps * 1.1), "judged", "fail", tok_s)
    return Contender(Candidate(max_num_seqs=len(label)), label, summarise(RATE, [best, ceiling]), replicas)


def _verdict(
    tmp_path: Path,
    decide: Decide,
    broken: frozenset[str] = frozenset(),
    ranked: list[Contender] | None = None,
    dp: bool = False,
) -> tuple[object, ScriptedRunner]:
    runner = ScriptedRunner(decide, broken)
    ranked = ranked or [_contender("winner", 4.0), _contender("runner-up", 3.0)]

    def write_dp_yaml(contender: Contender, status: str) -> Path:
        path = tmp_path / "best-dp.yaml"
        path.write_text(f"data-parallel\n# {status}\n")
        return path

    def write_yaml(contender: Contender, status: str) -> Path:
        path = tmp_path / "best.yaml"
        path.write_text(f"{contender.label}\n# {status}\n")
        return path

    verdict = reach_verdict(
        runner,
        ranked,
        write_yaml,
        VerdictPlan(),
        write_dp_yaml=write_dp_yaml if dp else None,  # type: ignore[arg-type]
    )
    return verdict, runner


def test_a_reproduced_capacity_and_a_held_check_are_proven(tmp_path: Path) -> None:
    verdict, runner = _verdict(
        tmp_path, lambda who, load, role: ("pass", 1000.0 if role == "proof" else 750.0)
    )
    assert verdict.status == "proven" and verdict.exit_code == EXIT_OK  # type: ignore[attr-defined]
    assert verdict.headline.startswith("PROVEN: winner holds 3 req/s")  # type: ignore[attr-defined]
    assert [(load, role) for _, load, role in runner.held] == [
        (Load.rate(4.0), "proof"),
        (Load.rate(3.0), "production"),
    ]


def test_a_capacity_the_relaunch_does_not_deliver_is_only_proven_after_backing_off(tmp_path: Path) -> None:
    # 4 req/s of 250-token requests offer 1,000 tok/s; the relaunch delivered 840 (its interval tops at 882).
    verdict, _ = _verdict(tmp_path, lambda who, load, role: ("pass", 840.0 if role == "proof" else 750.0))
    assert verdict.status == "backed_off" and verdict.exit_code == EXIT_OK  # type: ignore[attr-defined]
    assert (
        "the capacity 4 req/s did not hold on the relaunch (delivered 0.84x the arrivals" in verdict.headline  # type: ignore[attr-defined]
    )


def test_a_relaunch_whose_window_reads_higher_than_the_trials_is_still_proven(tmp_path: Path) -> None:
    # The case: the trial's short window read 2,839 tok/s, the relaunch's 3,564 (1.26x), both at the same
    # arrival rate with the SLO met. Throughput at a fixed arrival rate is the offered load, not a property of
    # the server: the proof compares it with what was offered (here 4 req/s x 250 tokens), and nothing backed off.
    ranked = [_contender("winner", 4.0, tok_s=790.0), _contender("runner-up", 3.0)]
    verdict, _ = _verdict(
        tmp_path, lambda who, load, role: ("pass", 995.0 if role == "proof" else 750.0), ranked=ranked
    )
    assert verdict.status == "proven", verdict.headline  # type: ignore[attr-defined]
    assert "AFTER BACKING OFF" not in verdict.headline  # type: ignore[attr-defined]
    assert "delivered 0.99x the arrivals" in verdict.headline  # type: ignore[attr-defined]


def test_a_node_of_replicas_is_proven_at_the_nodes_load(tmp_path: Path) -> None:
    # 4 replicas of a server that held 4 req/s: the proof holds 16 req/s across them, production 12 req/s.
    ranked = [_contender("winner", 4.0, replicas=4)]
    verdict, runner = _verdict(
        tmp_path, lambda who, load, role: ("pass", load.value * TOKENS_PER_REQUEST), ranked=ranked
    )
    assert verdict.status == "proven", verdict.headline  # type: ignore[attr-defined]
    assert [(load, role) for _, load, role in runner.held] == [
        (Load.rate(16.0), "proof"),
        (Load.rate(12.0), "production"),
    ]
    assert (
        "on 4 replicas" in verdict.headline and "4 x 4 req/s predicted from one replica" in verdict.headline
    )  # type: ignore[attr-defined]
    attempt = verdict.attempts[0].to_dict()  # type: ignore[attr-defined]
    assert attempt["replicas"] == 4 and attempt["predicted_node_tokens_per_s"] == 4000.0
    assert attempt["measured_node_tokens_per_s"] == 4000.0


def test_a_check_that_fails_backs_off_to_the_highest_load_that_holds(tmp_path: Path) -> None:
    def decide(who: str, load: Load, role: str) -> tuple[str, float]:
        if role == "production" and load.value > 2.5:
            return "fail", 700.0
        return "pass", 1000.0

    verdict, _ = _verdict(tmp_path, decide)
    assert verdict.status == "backed_off"  # type: ignore[attr-defined]
    assert verdict.operating_point.load == Load.rate(2.4)  # type: ignore[attr-defined]  # 4.0 x 0.75 x 0.8
    assert "3 req/s did not hold" in verdict.headline  # type: ignore[attr-defined]


def test_the_runner_up_is_proven_when_the_winner_does_not_start(tmp_path: Path) -> None:
    verdict, runner = _verdict(
        tmp_path, lambda who, load, role: ("pass", 1000.0), broken=frozenset({"winner"})
    )
    assert verdict.status == "backed_off" and verdict.chosen.label == "runner-up"  # type: ignore[attr-defined]
    assert "the winner winner did not hold (vLLM failed to start (CUDA out of memory))" in verdict.headline  # type: ignore[attr-defined]
    assert {who for who, _, _ in runner.held} == {"runner-up"}


def test_nothing_holding_is_not_proven_with_exit_code_3(tmp_path: Path) -> None:
    verdict, runner = _verdict(tmp_path, lambda who, load, role: ("fail", 500.0))
    assert verdict.status == "not_proven" and verdict.exit_code == EXIT_NOT_PROVEN == 3  # type: ignore[attr-defined]
    assert verdict.headline.startswith("NOT PROVEN")  # type: ignore[attr-defined]
    assert "winner" in verdict.headline and "runner-up" in verdict.headline  # type: ignore[attr-defined]
    # each one: the proof, then the check at 75 %, backed off twice
    assert len([1 for who, _, role in runner.held if who == "winner" and role == "production"]) == 3


def test_one_data_parallel_server_is_exported_only_where_it_holds_as_the_replicas_did(tmp_path: Path) -> None:
    node = [_contender("winner", 4.0, replicas=4)]

    def decide(dp_fails: bool) -> Decide:
        def at(who: str, load: Load, role: str) -> tuple[str, float]:
            if who == "data-parallel" and dp_fails and load.value > 13:
                return "fail", load.value * TOKENS_PER_REQUEST * 0.7
            return "pass", load.value * TOKENS_PER_REQUEST

        return at

    held, runner = _verdict(tmp_path, decide(dp_fails=False), ranked=node, dp=True)
    # The replicas held 16 req/s (proof) and 12 req/s (production); the one server is held at both.
    assert [(who, load) for who, load, _ in runner.held] == [
        ("winner", Load.rate(16.0)), ("winner", Load.rate(12.0)),
        ("data-parallel", Load.rate(16.0)), ("data-parallel", Load.rate(12.0)),
    ]  # fmt: skip
    assert held.export_as == "data_parallel" and held.status == "proven"  # type: ignore[attr-defined]
    assert "exported as one server with --data-parallel-size 4" in held.headline  # type: ignore[attr-defined]
    lost, _ = _verdict(tmp_path, decide(dp_fails=True), ranked=node, dp=True)
    assert lost.export_as == "independent" and lost.status == "proven"  # type: ignore[attr-defined]
    assert "exported as 4 independent servers (serve-node.sh)" in lost.headline  # type: ignore[attr-defined]
    assert "did not hold 16 req/s" in lost.headline  # type: ignore[attr-defined]
    assert lost.to_dict()["dp"]["held"] is False  # type: ignore[attr-defined]
