"""The verdict: does the winner hold on a server started from the exported file alone?

For the winner (then, if it does not hold, the runner-up), vLLM is relaunched from the exported
``vllm serve --config`` YAML (plus the run's fixed arguments) and, on that one server:

* **proof**: the capacity point is held again, as long as in the search, with the same load model: it must
  meet the SLO again and its steady throughput must come within ``proof_tolerance`` (10 %) of the trial's;
* **production check**: ``production_fraction`` (75 %) of the capacity, the load a production server should be
  sized for, held long enough for the judged percentile (``MeasurePlan.production_s``, at least three requests
  beyond the p95). If it does not hold, the load backs off by x0.8, at most ``backoffs`` times: the highest
  load that holds becomes the exported operating point.

Statuses: ``proven`` (proof reproduced and the first check held), ``backed_off`` (a check held only lower, the
proof did not reproduce, or the runner-up was proven instead), ``not_proven`` (nothing held: the command exits
3), ``unverified`` (the operator skipped the relaunch with --no-prove).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.serving.launcher import LaunchError
from tuner.tuning import events as ev
from tuner.tuning.capacity import Capacity
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
    capacity: Capacity


@dataclass
class Attempt:
    """One relaunch from the exported file."""

    key: str
    label: str
    yaml: str
    error: str | None = None
    startup_s: float | None = None
    proof: Point | None = None
    proof_ratio: float | None = None
    proof_ok: bool = False
    checks: list[Point] = field(default_factory=list)

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
        }


@dataclass
class Verdict:
    status: str  # "proven" | "backed_off" | "not_proven" | "unverified"
    headline: str
    chosen: Contender | None  # the configuration the exported file holds
    operating_point: Point | None  # the production check that held
    attempts: list[Attempt] = field(default_factory=list)

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
        }


WriteYaml = Callable[[Contender, str], Path]
"""Writes the export for a contender with a header line; returns its path."""


def reach_verdict(
    runner: TrialRunner,
    ranked: Sequence[Contender],
    write_yaml: WriteYaml,
    plan: VerdictPlan,
    *,
    defaults_capacity: Capacity | None = None,
    first_launch: int = 1,
) -> Verdict:
    """Relaunch the best contender from its exported file and check it; the runner-up if it does not hold."""
    attempts: list[Attempt] = []
    for contender in ranked[: plan.candidates]:
        if runner.cancelled():
            break
        path = write_yaml(
            contender, "NOT YET PROVEN: infertop is relaunching vLLM from this file to check it"
        )
        attempt = _attempt(runner, contender, path, plan, first_launch + len(attempts))
        attempts.append(attempt)
        held = attempt.held
        if held is not None:
            first_try = attempt is attempts[0]
            clean = attempt.proof_ok and held is attempt.checks[0] and first_try
            status = "proven" if clean else "backed_off"
            return Verdict(
                status,
                _headline(status, contender, attempt, attempts, defaults_capacity),
                contender,
                held,
                attempts,
            )
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
    runner: TrialRunner, contender: Contender, path: Path, plan: VerdictPlan, launch: int
) -> Attempt:
    attempt = Attempt(contender.candidate.key(), contender.label, str(path))
    best = contender.capacity.best
    assert best is not None  # only feasible contenders are ranked
    runner.emit(
        ev.TrialStarted(
            PROOF_KEY, f"proof: {contender.label} from {path.name}", {"config": str(path)}, launch,
            "relaunch from the exported file: the proof, then the production check",
        )
    )  # fmt: skip
    try:
        with runner.serve(
            PROOF_KEY, ("--config", str(path)), f"proof-{len(contender.label)}-{path.stem}"
        ) as session:
            attempt.startup_s = session.startup_s
            proof = session.measure(best.load, "proof")
            attempt.proof = proof
            if best.output_tokens_per_s > 0 and proof.aborted is None:
                attempt.proof_ratio = proof.output_tokens_per_s / best.output_tokens_per_s
            attempt.proof_ok = bool(
                proof.passed
                and attempt.proof_ratio is not None
                and abs(attempt.proof_ratio - 1) <= plan.proof_tolerance
            )
            load: Load | None = best.load.scaled(plan.production_fraction)
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


def _speedup(contender: Contender, defaults: Capacity | None) -> str:
    best = contender.capacity.best
    if (
        defaults is None
        or defaults.best is None
        or best is None
        or defaults is contender.capacity  # the defaults themselves
    ):
        return ""
    if defaults.best.load.kind != best.load.kind or defaults.best.load.value <= 0:
        return ""
    return f"; {best.load.value / defaults.best.load.value:.2f}x vLLM's defaults"


def _headline(
    status: str,
    contender: Contender,
    attempt: Attempt,
    attempts: Sequence[Attempt],
    defaults: Capacity | None,
) -> str:
    held = attempt.held
    assert held is not None
    best = contender.capacity.best
    assert best is not None
    file = Path(attempt.yaml).name
    where = f"{held.load.label()} on vLLM relaunched from {file} ({describe_point(held)})"
    capacity = f"capacity {best.load.label()} in the search{_speedup(contender, defaults)}"
    if status == "proven":
        ratio = f", reproduced at {attempt.proof_ratio:.2f}x" if attempt.proof_ratio else ""
        return f"PROVEN: {contender.label} holds {where}; {capacity}{ratio}"
    why = []
    if len(attempts) > 1:
        why.append(
            f"the winner {attempts[0].label} did not hold ({_failure(attempts[0])}); the runner-up did"
        )
    if not attempt.proof_ok:
        ratio = f"{attempt.proof_ratio:.2f}x" if attempt.proof_ratio is not None else "n/a"
        why.append(
            f"its capacity did not reproduce on the relaunch ({ratio}, {attempt.proof.why() if attempt.proof else ''})"
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
