"""What a tuning run tells whoever watches it (the TUI screen, the headless progress lines, tests).

Events are frozen dataclasses named as past events, delivered in order on the tuner's thread. A listener must
be quick and must not raise; the TUI forwards each one as a Textual message. A load is told by its kind
(``rate``: open-loop requests/s; ``users``: closed-loop concurrent users), its value and a label for people.
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
    objective: str = "rate"  # "rate": highest arrival rate within the SLO; "users": most concurrent users
    cpu_note: str = ""  # how client and server were placed on the host's cores
    prediction: str = ""  # the performance model ranking the candidates, or why there is none
    node_gpus: tuple[int, ...] = ()  # the GPUs the tune may use (physical indices); () on the CPU build
    parallel: int = 1  # how many trials may run at once (slots); 1 = one after another
    eta_s: float | None = None  # expected wall time of the whole run (search and proof), None: unknown


@dataclass(frozen=True)
class TrialStarted:
    key: str
    label: str  # short, for a table row: "fp8 · kv fp8 · seqs 256 · mbt 8192"
    config: dict[str, Any]  # dashed vLLM options (what the YAML would hold)
    index: int  # 1-based launch number
    why: str  # why the search picked it
    predicted: float | None = None  # the model's capacity for it (the objective's unit), None: no prediction
    gpus: tuple[
        int, ...
    ] = ()  # the GPUs this trial's server holds (CUDA_VISIBLE_DEVICES); () on the CPU build
    layout: str = ""  # how the candidate fills the node: "8 x TP 1"


@dataclass(frozen=True)
class ServerReady:
    key: str
    url: str
    startup_s: float
    pid: int | None


@dataclass(frozen=True)
class PhaseProgressed:
    key: str
    load_label: str  # "2.4 req/s" or "8 users"
    stage: str  # "warmup" | "measure"
    requests_done: int
    requests_total: int | None
    output_tokens_per_s: float
    role: str = "judged"  # scout, judged, proof, production


@dataclass(frozen=True)
class PhaseMeasured:
    """One load judged on the trial's server (a point; its phases pooled)."""

    key: str
    load_kind: str
    load: float
    load_label: str
    role: str
    decision: str  # "pass", "fail" or "uncertain" (an interval straddled a limit after measuring more)
    output_tokens_per_s: float  # over the steady window
    ttft_p95_s: float | None
    tpot_p95_s: float | None
    tok_s_per_user_p50: float | None
    error_rate: float
    bound: str
    reasons: tuple[str, ...] = ()  # which SLO limits failed or were uncertain, in words
    requests: int = 0  # requests in the steady window(s)
    phases: int = 1  # phases pooled (more than one: the interval straddled a limit, so more was measured)
    ttft_p95_ci_s: tuple[float, float | None] | None = None  # top None: too few requests to bound it
    output_tokens_per_s_ci: tuple[float, float] | None = None
    requests_per_s: float = 0.0
    disturbed: str = ""  # why other work on the host disturbed the measurement that was kept

    @property
    def passed(self) -> bool:
        return self.decision == "pass"


@dataclass(frozen=True)
class PhaseRepeated:
    """A phase was measured again or further: the host was busy with other work, or an interval straddled."""

    key: str
    load_label: str
    why: str


@dataclass(frozen=True)
class TrialFinished:
    key: str
    label: str
    status: str  # "feasible" | "infeasible" | "failed" | "interrupted" | "skipped"
    reason: str  # one line: why infeasible/failed, or the headline result
    best_load_label: str | None = None
    best_output_tokens_per_s: float | None = None
    log_tail: str = ""
    capacity: str = ""  # "2.4 req/s (2.7 req/s did not)"
    predicted: float | None = None  # the model's capacity (the objective's unit); None: no prediction
    measured: float | None = None  # the capacity measured, same unit (0: nothing met the SLO)
    gpus: tuple[int, ...] = ()  # the GPUs its server held, now free again
    layout: str = ""  # "8 x TP 1"
    node_capacity: float | None = None  # measured x replicas: the node's capacity in the objective's unit
    disturbed: str = (
        ""  # why trials beside it disturbed its measurement (host CPU busy, throttling), "" if not
    )


@dataclass(frozen=True)
class BestChanged:
    key: str
    label: str
    output_tokens_per_s: float
    load_label: str
    note: str = ""  # "ties with vLLM defaults within the uncertainty; kept the one closer to the defaults"


@dataclass(frozen=True)
class VerdictReached:
    """Whether the winner holds on a server relaunched from the exported file."""

    status: str  # "proven", "backed_off", "not_proven", "unverified"
    headline: str  # the result's first line
    key: str | None
    label: str | None
    operating_point: str | None  # the load the export is proven for, "2.4 req/s"
    exit_code: int


@dataclass(frozen=True)
class EtaUpdated:
    """The expected time left, re-estimated as trials end (start-up and trial times seen so far)."""

    remaining_s: float | None  # None: cannot tell yet
    launches_left: int  # launches the search still expects (at most the budget left), the proof included
    basis: str  # "predicted: 4 launches x ~3.1 min on 8 slots" for people


@dataclass(frozen=True)
class TuneFinished:
    winner_key: str | None
    winner_label: str | None
    launches: int
    wall_s: float
    stopped: str | None = None  # why the run ended early (interrupt, budget), None when it completed
    outputs: dict[str, str] = field(default_factory=dict)  # "yaml", "json", "markdown", "html" -> paths
    verdict: str | None = None  # VerdictReached.status, None when no verdict was reached
    headline: str = ""  # the result's first line
    exit_code: int = 0


TuneEvent = (
    TuneStarted
    | TrialStarted
    | ServerReady
    | PhaseProgressed
    | PhaseMeasured
    | PhaseRepeated
    | TrialFinished
    | BestChanged
    | VerdictReached
    | EtaUpdated
    | TuneFinished
)
Listener = Callable[[TuneEvent], None]
