"""The verdict: does the winner hold on a server started from the exported file alone?

For the winner (then, if it does not hold, the runner-up), vLLM is relaunched from the exported
``vllm serve --config`` YAML (plus the run's fixed arguments): one server per replica of its layout, on the GPUs
each would hold, all loaded together as one node (the load split across them as a random router would:
:class:`tuner.tuning.runner.NodeSession`). One replica's capacity times the replicas is the search's
*prediction* of the node; this is its *measurement*:

* **proof**: the node's capacity (the trial's per server, times the replicas) is held, as long as in the
  search, with the same load model. It passes when the SLO holds with its intervals inside the limits and,
  under an open loop, the node delivered the load offered to it (the throughput's interval reaches the arrival
  rate times the mean output tokens, within ``proof_tolerance``). Under an open loop the throughput of a window at
  a fixed rate is the offered load plus where a short window starts and ends, not a property of the server, so it
  is compared with what was offered, never with the trial's window;
* **production check**: ``production_fraction`` (75 %) of the capacity, the load a production server should be
  sized for, held long enough for the judged percentile (``MeasurePlan.production_s``, at least three requests
  beyond the p95). If it does not hold, the load backs off by x0.8, at most ``backoffs`` times: the highest
  load that holds becomes the exported operating point.

Statuses: ``proven`` (the proof held and the first check held), ``backed_off`` (something actually backed off:
a check held only at a lower load, the capacity did not hold on the relaunch while the operating point did, or the
runner-up was proven instead), ``not_proven`` (nothing held: the command exits 3), ``unverified`` (the operator
skipped the relaunch with --no-prove).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.serving.launcher import LaunchError
from tuner.tuning import events as ev
from tuner.tuning.capacity import Bracket, Capacity
from tuner.tuning.placement import Placement
from tuner.tuning.points import Load, Point
from tuner.tuning.runner import AllRequestsFailed, TrialRunner
from tuner.tuning.space import Candidate

PROOF_KEY = "proof"
EXIT_OK = 0
EXIT_NO_CONFIG = 1  # no configuration met the SLO (or the server refused every request)
EXIT_USAGE = 2
EXIT_NOT_PROVEN = 3
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class VerdictPlan:
    proof_tolerance: float = 0.10
    production_fraction: float = 0.75
    backoff: float = 0.8
    backoffs: int = 2
    candidates: int = 2  # the winner, then the runner-up


@dataclass(frozen=True)
class Contender:
    """A configuration the verdict may try: its search result and how it is labelled."""

    candidate: Candidate
    label: str
    capacity: Capacity  # one server's, as the search measured it
    replicas: int = 1  # servers of the layout on the node: the proof starts and loads them all

    def node_load(self) -> Load:
        """The node's capacity load: the server's best times the replicas (a prediction until the proof)."""
        best = self.capacity.best
        assert best is not None
        return _times(best.load, self.replicas)


@dataclass
class Attempt:
    """One relaunch from the exported file."""

    key: str
    label: str
    yaml: str
    error: str | None = None
    startup_s: float | None = None
    proof: Point | None = None
    proof_ratio: float | None = None  # open loop: delivered / offered (requests completed over arrivals)
    proof_ok: bool = False
    checks: list[Point] = field(default_factory=list)
    replicas: int = 1
    predicted_node_tokens_per_s: float | None = None  # the trial's throughput times the replicas

    @property
    def held(self) -> Point | None:
        return next((c for c in self.checks if c.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "yaml": self.yaml,
            "error": self.error,
            "startup_s": self.startup_s,
            "proof": self.proof.to_dict() if self.proof else None,
            "proof_ratio": self.proof_ratio,
            "proof_ok": self.proof_ok,
            "checks": [c.to_dict() for c in self.checks],
            "replicas": self.replicas,
            "predicted_node_tokens_per_s": self.predicted_node_tokens_per_s,
            "measured_node_tokens_per_s": self.proof.output_tokens_per_s if self.proof else None,
        }


@dataclass
class DpCheck:
    """One vLLM server with ``--data-parallel-size`` on all the layout's GPUs, held at the loads the independent
    replicas held: exported instead of them only where it holds as they did (vLLM's API server balances the
    ranks and can become the bottleneck: vLLM issues #30655, #30084)."""

    yaml: str
    replicas: int
    error: str | None = None
    points: list[Point] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return self.error is None and bool(self.points) and all(p.passed for p in self.points)

    def describe(self) -> str:
        if self.error:
            return f"one --data-parallel-size {self.replicas} server did not start ({self.error})"
        failed = next((p for p in self.points if not p.passed), None)
        if failed is not None:
            held = f"one --data-parallel-size {self.replicas} server did not hold {failed.load.label()}"
            return f"{held} ({failed.why()})"
        loads = " and ".join(p.load.label() for p in self.points)
        return f"one --data-parallel-size {self.replicas} server held {loads} as the independent servers did"

    def to_dict(self) -> dict[str, Any]:
        return {
            "yaml": self.yaml,
            "replicas": self.replicas,
            "error": self.error,
            "held": self.held,
            "describe": self.describe(),
            "points": [p.to_dict() for p in self.points],
        }


@dataclass
class Verdict:
    status: str  # "proven" | "backed_off" | "not_proven" | "unverified"
    headline: str
    chosen: Contender | None  # the configuration the exported file holds
    operating_point: Point | None  # the production check that held
    attempts: list[Attempt] = field(default_factory=list)
    dp: DpCheck | None = None  # the data-parallel server measured against the independent replicas

    @property
    def export_as(self) -> str:
        """How the node is exported: "data_parallel" (one server) or "independent" (one per replica)."""
        return "data_parallel" if self.dp is not None and self.dp.held else "independent"

    @property
    def exit_code(self) -> int:
        return EXIT_NOT_PROVEN if self.status == "not_proven" else EXIT_OK

    @property
    def shippable(self) -> bool:
        return self.status in ("proven", "backed_off")

    def to_dict(self) -> dict[str, Any]:
        op = self.operating_point
        return {
            "status": self.status,
            "headline": self.headline,
            "key": self.chosen.candidate.key() if self.chosen else None,
            "label": self.chosen.label if self.chosen else None,
            "capacity": self.chosen.capacity.describe() if self.chosen else None,
            "operating_point": op.load.to_dict() if op else None,
            "operating_point_figures": _figures(op) if op else None,
            "exit_code": self.exit_code,
            "attempts": [a.to_dict() for a in self.attempts],
            "dp": self.dp.to_dict() if self.dp else None,
            "export_as": self.export_as,
        }


WriteYaml = Callable[[Contender, str], Path]
"""Writes the export for a contender with a header line; returns its path."""
PlacementsFor = Callable[[Contender], Sequence[Placement]]
"""Where each replica of a contender's layout runs for the proof (one placement per replica)."""


def reach_verdict(
    runner: TrialRunner,
    ranked: Sequence[Contender],
    write_yaml: WriteYaml,
    plan: VerdictPlan,
    *,
    defaults_capacity: Bracket | None = None,
    first_launch: int = 1,
    placements_for: PlacementsFor | None = None,
    write_dp_yaml: WriteYaml | None = None,
) -> Verdict:
    """Relaunch the best contender from its exported file and check it; the runner-up if it does not hold."""
    attempts: list[Attempt] = []
    for contender in ranked[: plan.candidates]:
        if runner.cancelled():
            break
        path = write_yaml(
            contender, "NOT YET PROVEN: infertop is relaunching vLLM from this file to check it"
        )
        placements = placements_for(contender) if placements_for is not None else ()
        attempt = _attempt(runner, contender, path, plan, first_launch + len(attempts), placements)
        attempts.append(attempt)
        held = attempt.held
        if held is not None:
            first_try = attempt is attempts[0]
            clean = attempt.proof_ok and held is attempt.checks[0] and first_try
            status = "proven" if clean else "backed_off"
            dp = None
            if write_dp_yaml is not None and contender.replicas > 1 and not runner.cancelled():
                loads = [p.load for p in (attempt.proof if attempt.proof_ok else None, held) if p is not None]
                dp_path = write_dp_yaml(
                    contender, "NOT YET PROVEN: infertop is checking this one-server layout"
                )
                dp = _dp_check(runner, contender, dp_path, placements, loads, first_launch + len(attempts))
            headline = _headline(status, contender, attempt, attempts, defaults_capacity)
            if dp is not None:
                headline += (
                    f"; exported as one server with --data-parallel-size {contender.replicas}: {dp.describe()}"
                    if dp.held
                    else f"; exported as {contender.replicas} independent servers (serve-node.sh): {dp.describe()}"
                )
            return Verdict(status, headline, contender, held, attempts, dp)
    chosen = ranked[0] if ranked else None
    headline = _not_proven(attempts, interrupted=runner.cancelled())
    return Verdict("not_proven", headline, chosen, None, attempts)


def unverified(contender: Contender) -> Verdict:
    best = contender.capacity.best
    what = best.load.label() if best else "n/a"
    headline = (
        f"UNVERIFIED (--no-prove): {contender.label} held {what} in the search; vLLM was never relaunched from "
        "the exported file to check it"
    )
    return Verdict("unverified", headline, contender, None)


def _attempt(
    runner: TrialRunner,
    contender: Contender,
    path: Path,
    plan: VerdictPlan,
    launch: int,
    placements: Sequence[Placement] = (),
) -> Attempt:
    attempt = Attempt(contender.candidate.key(), contender.label, str(path), replicas=contender.replicas)
    best = contender.capacity.best
    assert best is not None  # only feasible contenders are ranked
    attempt.predicted_node_tokens_per_s = best.output_tokens_per_s * contender.replicas
    node_load = contender.node_load()
    gpus = tuple(g for p in placements for g in p.gpus)
    on = f" on {contender.replicas} replicas" if contender.replicas > 1 else ""
    runner.emit(
        ev.TrialStarted(
            PROOF_KEY, f"proof: {contender.label} from {path.name}{on}", {"config": str(path)}, launch,
            "relaunch from the exported file: the proof, then the production check", gpus=gpus,
        )
    )  # fmt: skip
    try:
        with runner.serve_node(
            PROOF_KEY, ("--config", str(path)), f"proof-{len(contender.label)}-{path.stem}", placements
        ) as session:
            attempt.startup_s = session.startup_s
            proof = session.measure(node_load, "proof")
            attempt.proof = proof
            attempt.proof_ratio, delivered = _delivered(proof, plan.proof_tolerance)
            attempt.proof_ok = bool(proof.passed and delivered)
            load: Load | None = node_load.scaled(plan.production_fraction)
            for _ in range(plan.backoffs + 1):
                if load is None or runner.cancelled():
                    break
                check = session.measure(load, "production")
                attempt.checks.append(check)
                if check.passed or check.aborted:
                    break
                lower = load.scaled(plan.backoff)
                load = lower if lower.value < load.value else None
    except LaunchError as error:
        attempt.error = error.summary
    except AllRequestsFailed as error:
        attempt.error = f"every request failed: {error}"
    return attempt


def _dp_check(
    runner: TrialRunner,
    contender: Contender,
    path: Path,
    placements: Sequence[Placement],
    loads: Sequence[Load],
    launch: int,
) -> DpCheck:
    """One server with --data-parallel-size on every GPU the replicas held, at the loads they held."""
    check = DpCheck(str(path), contender.replicas)
    gpus = tuple(g for p in placements for g in p.gpus)
    union = [p.server_cpus for p in placements if p.server_cpus]
    clients = [p.client_cpus for p in placements if p.client_cpus]
    whole = Placement(
        gpus,
        frozenset().union(*union) if union else None,
        frozenset().union(*clients) if clients else None,
        "every replica's GPUs and cores",
    )
    runner.emit(
        ev.TrialStarted(
            PROOF_KEY, f"data-parallel check: {contender.label} as one server from {path.name}",
            {"config": str(path)}, launch,
            f"one --data-parallel-size {contender.replicas} server against {contender.replicas} independent ones",
            gpus=gpus,
        )
    )  # fmt: skip
    try:
        with runner.serve_node(
            PROOF_KEY, ("--config", str(path)), f"proof-dp-{path.stem}", [whole]
        ) as session:
            for load in loads:
                point = session.measure(load, "proof")
                check.points.append(point)
                if not point.passed or runner.cancelled():
                    break
    except LaunchError as error:
        check.error = error.summary
    except AllRequestsFailed as error:
        check.error = f"every request failed: {error}"
    return check


def _times(load: Load, factor: int) -> Load:
    """``load`` for ``factor`` servers side by side."""
    if factor == 1:
        return load
    return Load.rate(load.value * factor) if load.open_loop else Load.users(load.users_count * factor)


def _delivered(proof: Point, tolerance: float) -> tuple[float | None, bool]:
    """(delivered / offered, whether the server delivered the load offered to it). Open loop: requests completed
    per second over arrivals per second, and the throughput's interval must reach the offered tokens/s (the
    rate times the mean output tokens) within ``tolerance``. A closed loop offers what it is given: True."""
    if proof.aborted is not None:
        return None, False
    s = proof.steady
    if not proof.load.open_loop or proof.load.value <= 0:
        return None, True
    ratio = s.requests_per_s / proof.load.value if s.requests_per_s > 0 else None
    if s.requests_per_s <= 0 or s.output_tokens_per_s <= 0:
        return ratio, False
    offered_tok_s = proof.load.value * s.output_tokens_per_s / s.requests_per_s
    top = s.output_tokens_per_s_ci[1] if s.output_tokens_per_s_ci else s.output_tokens_per_s
    return ratio, top >= (1 - tolerance) * offered_tok_s


def _figures(p: Point) -> dict[str, Any]:
    s = p.steady
    return {
        "load": p.load.label(),
        "output_tokens_per_s": s.output_tokens_per_s,
        "output_tokens_per_s_ci": s.output_tokens_per_s_ci,
        "ttft_p95_s": s.ttft_p95_s,
        "ttft_p95_ci_s": s.ttft_p95_ci_s,
        "tpot_p95_s": s.tpot_p95_s,
        "tpot_p95_ci_s": s.tpot_p95_ci_s,
        "requests": s.requests_ok,
        "window_s": s.window_s,
        "confidence": s.confidence,
    }


def describe_point(p: Point) -> str:
    """``"TTFT p95 0.21 s (0.18-0.25 s, 90 %), 33 tok/s per user at p95, 180 requests over 75 s"``."""
    s = p.steady
    parts = []
    if s.ttft_p95_s is not None:
        ci = ""
        if s.ttft_p95_ci_s is not None:
            lo, hi = s.ttft_p95_ci_s
            ci = f" ({lo:.2f}-{'?' if hi is None else f'{hi:.2f}'} s, {s.confidence:.0%})"
        parts.append(f"TTFT p95 {s.ttft_p95_s:.2f} s{ci}")
    if s.tpot_p95_s is not None and s.tpot_p95_s > 0:
        parts.append(f"{1 / s.tpot_p95_s:.0f} tok/s per user at p95")
    parts.append(f"{s.requests_ok} requests over {s.window_s:.0f} s")
    return ", ".join(parts)


def _speedup(contender: Contender, defaults: Bracket | None) -> str:
    """How the contender's node compares with vLLM's defaults' node (both: one server's capacity x replicas)."""
    best = contender.capacity.best
    if (
        defaults is None
        or best is None
        or not defaults.lo
        or getattr(defaults, "server", None) is contender.capacity
    ):
        return ""
    node = best.load.value * contender.replicas
    if abs(node - defaults.lo) < 1e-9 * node:
        return ""  # the defaults themselves
    return f"; {node / defaults.lo:.2f}x vLLM's defaults" + (
        " (both nodes)" if contender.replicas > 1 else ""
    )


def _headline(
    status: str,
    contender: Contender,
    attempt: Attempt,
    attempts: Sequence[Attempt],
    defaults: Bracket | None,
) -> str:
    held = attempt.held
    assert held is not None
    best = contender.capacity.best
    assert best is not None
    file = Path(attempt.yaml).name
    node = f" on {contender.replicas} replicas" if contender.replicas > 1 else ""
    where = f"{held.load.label()} on vLLM relaunched from {file}{node} ({describe_point(held)})"
    searched = (
        f"{contender.replicas} x {best.load.label()} predicted from one replica"
        if contender.replicas > 1
        else f"{best.load.label()} in the search"
    )
    capacity = f"capacity {searched}{_speedup(contender, defaults)}"
    if status == "proven":
        proof = attempt.proof
        ratio = (
            f", the proof held {proof.load.label()} (delivered {attempt.proof_ratio:.2f}x the arrivals)"
            if proof is not None and attempt.proof_ratio
            else ""
        )
        return f"PROVEN: {contender.label} holds {where}; {capacity}{ratio}"
    why = []
    if len(attempts) > 1:
        why.append(
            f"the winner {attempts[0].label} did not hold ({_failure(attempts[0])}); the runner-up did"
        )
    if not attempt.proof_ok:
        proof = attempt.proof
        what = proof.load.label() if proof else "its capacity"
        ratio = (
            f"delivered {attempt.proof_ratio:.2f}x the arrivals, " if attempt.proof_ratio is not None else ""
        )
        why.append(
            f"the capacity {what} did not hold on the relaunch ({ratio}{proof.why() if proof else ''})"
        )
    if held is not attempt.checks[0]:
        why.append(f"{attempt.checks[0].load.label()} did not hold ({attempt.checks[0].why()})")
    return f"PROVEN AFTER BACKING OFF: {contender.label} holds {where}; {capacity}; " + "; ".join(why)


def _failure(attempt: Attempt) -> str:
    if attempt.error:
        return attempt.error
    last = attempt.checks[-1] if attempt.checks else attempt.proof
    return last.why() if last else "nothing measured"


def _not_proven(attempts: Sequence[Attempt], *, interrupted: bool) -> str:
    if not attempts:
        return (
            "NOT PROVEN: interrupted before vLLM was relaunched from the exported file"
            if interrupted
            else ("NOT PROVEN: nothing to relaunch")
        )
    tried = "; ".join(f"{a.label}: {_failure(a)}" for a in attempts)
    more = " (interrupted)" if interrupted else ""
    return (
        f"NOT PROVEN{more}: no configuration held the SLO on vLLM relaunched from the exported file ({tried})"
    )
