"""What a tuning run tells whoever watches it (the TUI screen, the headless progress bars, tests).

Events are frozen dataclasses named as past events, delivered in order on the tuner's thread. A listener must
be quick and must not raise; the TUI forwards each one as a Textual message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TuneStarted:
    model: str
    slo: str  # human description of the targets
    hardware: str  # e.g. "1x NVIDIA H100 80GB HBM3" or "CPU (vLLM CPU build)"
    candidates_total: int  # feasible candidates in the space
    launch_budget: int
    resumed_trials: int  # trials already finished in the store (resume); a TrialFinished follows for each
    store_path: str
    ttft_p95_max_s: float | None = None  # the SLO's limits as numbers, for drawing them
    tok_s_per_user_min: float | None = None


@dataclass(frozen=True)
class TrialStarted:
    key: str
    label: str  # short, for a table row: "fp8 · kv fp8 · seqs 256 · mbt 8192"
    config: dict[str, Any]  # dashed vLLM options (what the YAML would hold)
    index: int  # 1-based launch number
    why: str  # why the search picked it


@dataclass(frozen=True)
class ServerReady:
    key: str
    url: str
    startup_s: float
    pid: int | None


@dataclass(frozen=True)
class PhaseProgressed:
    key: str
    concurrency: int
    stage: str  # "warmup" | "measure"
    requests_done: int
    requests_total: int | None
    output_tokens_per_s: float


@dataclass(frozen=True)
class PhaseMeasured:
    key: str
    concurrency: int
    passed: bool  # met the SLO
    output_tokens_per_s: float
    ttft_p95_s: float | None
    tpot_p95_s: float | None
    tok_s_per_user_p50: float | None
    error_rate: float
    bound: str
    reasons: tuple[str, ...] = ()  # which SLO limits failed, in words


@dataclass(frozen=True)
class TrialFinished:
    key: str
    label: str
    status: str  # "feasible" | "infeasible" | "failed" | "interrupted" | "skipped"
    reason: str  # one line: why infeasible/failed, or the headline result
    best_concurrency: int | None = None
    best_output_tokens_per_s: float | None = None
    log_tail: str = ""


@dataclass(frozen=True)
class BestChanged:
    key: str
    label: str
    output_tokens_per_s: float
    concurrency: int


@dataclass(frozen=True)
class TuneFinished:
    winner_key: str | None
    winner_label: str | None
    launches: int
    wall_s: float
    stopped: str | None = None  # why the run ended early (interrupt, budget), None when it completed
    outputs: dict[str, str] = field(default_factory=dict)  # "yaml", "json", "markdown", "html" -> paths


TuneEvent = (
    TuneStarted
    | TrialStarted
    | ServerReady
    | PhaseProgressed
    | PhaseMeasured
    | TrialFinished
    | BestChanged
    | TuneFinished
)
Listener = Callable[[TuneEvent], None]
