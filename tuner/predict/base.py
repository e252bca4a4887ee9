"""What a performance model says about one vLLM configuration on one GPU type for one workload.

A prediction is a curve: TTFT, TPOT and output tokens/s at each number of concurrent requests (the batch the
server decodes), up to what the configuration's KV cache and ``max-num-seqs`` admit. Under an SLO the curve
gives a predicted capacity: of the loads whose TTFT and per-user speed stay inside the limits, the one that
completes the most requests per second (or, for the users objective, the most concurrent requests).

Predictions are means from a model of the GPU's kernels, not p95s from traffic: they rank candidates and say
what to expect, and the measured trials correct them (:mod:`tuner.predict.rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.tuning.slo import Slo

# Concurrencies a curve is evaluated at (those above the configuration's limit are left out).
BATCH_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024)


class PredictError(RuntimeError):
    """A prediction that cannot be made (model, GPU or option outside the model's coverage). One line."""


@dataclass(frozen=True, slots=True)
class Workload:
    """The traffic a prediction is for: prompt and output tokens per request."""

    input_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise PredictError(f"token counts must be >= 1, got {self.input_len} in / {self.output_len} out")


@dataclass(frozen=True, slots=True)
class Estimate:
    """The model's figures at one concurrency (requests in flight)."""

    concurrency: int
    ttft_s: float
    tpot_s: float
    output_tokens_per_s: float  # all requests together
    memory_gib_per_gpu: float | None = None

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s > 0 else float("inf")

    def requests_per_s(self, workload: Workload) -> float:
        """The request rate this point completes: output tokens/s over tokens per request (the models cap
        tokens/s below concurrency / TPOT where prefills share the steps, so this is the consistent figure)."""
        return self.output_tokens_per_s / workload.output_len

    def meets(self, slo: Slo) -> bool:
        """Whether these (mean) figures are inside the SLO's limits."""
        if slo.ttft_p95_max_s is not None and self.ttft_s > slo.ttft_p95_max_s:
            return False
        tpot_max = slo.tpot_p95_max_s
        return tpot_max is None or self.tpot_s <= tpot_max


@dataclass(frozen=True, slots=True)
class Prediction:
    """A configuration's predicted curve, or why it cannot run (``fits`` False, ``reason`` says why)."""

    source: str  # "aiconfigurator 0.12.0, h100_sxm, vLLM data 0.24.0" / "roofline"
    workload: Workload
    fits: bool
    curve: tuple[Estimate, ...] = ()
    reason: str = ""  # why it does not fit, or what limits the curve
    max_concurrency: int | None = None  # what the KV cache (and max-num-seqs) admit
    extra: dict[str, Any] = field(default_factory=dict)

    def at_capacity(self, slo: Slo, objective: str = "rate") -> Estimate | None:
        """The point of the curve inside the SLO with the most requests/s (``"rate"``) or the most requests in
        flight (``"users"``); None when not even one request meets it."""
        passing = [e for e in self.curve if e.meets(slo)]
        if not passing:
            return None
        if objective == "users":
            return max(passing, key=lambda e: e.concurrency)
        return max(passing, key=lambda e: (e.output_tokens_per_s, -e.concurrency))

    def capacity(self, slo: Slo, objective: str = "rate") -> float:
        """The predicted capacity at the SLO: requests/s for ``"rate"``, concurrent users for ``"users"``;
        0 when it does not fit or nothing meets the SLO."""
        best = self.at_capacity(slo, objective) if self.fits else None
        if best is None:
            return 0.0
        return best.requests_per_s(self.workload) if objective == "rate" else float(best.concurrency)

    def at(self, concurrency: int) -> Estimate | None:
        """The curve's point at exactly ``concurrency`` (None when not evaluated)."""
        return next((e for e in self.curve if e.concurrency == concurrency), None)

    def to_dict(self, slo: Slo | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "source": self.source,
            "fits": self.fits,
            "reason": self.reason,
            "max_concurrency": self.max_concurrency,
            "curve": [
                {
                    "concurrency": e.concurrency,
                    "ttft_s": e.ttft_s,
                    "tpot_s": e.tpot_s,
                    "output_tokens_per_s": e.output_tokens_per_s,
                    "requests_per_s": e.requests_per_s(self.workload),
                    "memory_gib_per_gpu": e.memory_gib_per_gpu,
                }
                for e in self.curve
            ],
        }
        if slo is not None:
            best = self.at_capacity(slo) if self.fits else None
            data["at_capacity"] = None if best is None else best.concurrency
            data["capacity_requests_per_s"] = self.capacity(slo, "rate")
            data["capacity_output_tokens_per_s"] = None if best is None else best.output_tokens_per_s
        return data


def ladder(limit: int | None, ladder_values: Sequence[int] = BATCH_LADDER) -> tuple[int, ...]:
    """The concurrencies to evaluate up to ``limit`` (the limit itself included when it is off the ladder)."""
    if limit is None:
        return tuple(ladder_values)
    values = [b for b in ladder_values if b <= limit]
    if limit >= 1 and (not values or values[-1] != limit):
        values.append(limit)
    return tuple(values)
