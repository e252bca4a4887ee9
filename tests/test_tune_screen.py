"""The tune screen, driven through Pilot with a scripted tuner: what a run looks like and how its keys act.

The fake tuner emits the events of a realistic open-loop run (the default objective: Poisson arrivals judged
against the SLO) from the real thread worker, with a scripted H100 behind its sampler: vLLM's defaults, an FP8
candidate that fails at launch, a larger batch that wins, then the proof on vLLM relaunched from the exported
file and the verdict. Each trial scouts its pace with short closed-loop phases (1, 2, 4, ... users), then
judges arrival rates, measuring further where an interval straddles a limit ("uncertain", shown as "?").
Snapshot tests feed the same events on the UI thread with frozen clocks. Update snapshots with
`pytest tests/test_tune_screen.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from typing import Any

import pytest
from helpers import NO_DISCOVERY, FixedHost
from rich.style import Style
from rich.text import Text

from tui.screens.confirm import ConfirmScreen
from tui.screens.tune_help import TuneHelpScreen
from tui.tune_app import TuneApp, make_tune_app
from tui.tune_messages import TuneRunEnded
from tui.tune_state import PROOF_KEY, SloLimits, TuneRun, parse_load_label
from tui.widgets.best_panel import BestPanel
from tui.widgets.engine_line import EngineLine
from tui.widgets.event_log import EventLog
from tui.widgets.host_bar import HostBar
from tui.widgets.node_strip import NodeStrip
from tui.widgets.phase_panel import PhasePanel
from tui.widgets.slo_chart import SloChart, short_load
from tui.widgets.trial_table import COLUMNS, TrialTable
from tui.widgets.tune_header import TuneHeader
from tuner.telemetry import scripted
from tuner.telemetry.model import EngineSample, Snapshot
from tuner.telemetry.sampler import LiveSource, Sampler
from tuner.tuning import verdict as tuner_verdict
from tuner.tuning.events import (
    BestChanged,
    EtaUpdated,
    Listener,
    PhaseMeasured,
    PhaseProgressed,
    PhaseRepeated,
    ServerReady,
    TrialFinished,
    TrialStarted,
    TuneEvent,
    TuneFinished,
    TuneStarted,
    VerdictReached,
)
from tuner.tuning.points import Load
from tuner.tuning.slo import parse_slo

SLO = parse_slo("mlperf-llama3.1-8b-interactive")  # TTFT p95 <= 0.5 s, >= 33.3 tok/s per user
TTFT_MAX_S = 0.5
USER_MIN = 33.3
DEFAULTS = "vllm-defaults"
FP8 = "kv-cache-dtype=fp8;quantization=fp8"
BIG_BATCH = "max-num-batched-tokens=16384;max-num-seqs=512"
BIG_LABEL = "seqs 512, batch 16384"
URL = "http://127.0.0.1:8123"
PROOF_URL = "http://127.0.0.1:8131"
OOM = (
    "the server exited during start-up: CUDA out of memory while capturing CUDA graphs "
    "(try --gpu-memory-utilization 0.85)"
)
OUTPUTS = {
    "yaml": "/srv/tune/out/best.yaml",
    "markdown": "/srv/tune/out/report.md",
    "html": "/srv/tune/out/report.html",
}
PROVEN = (
    f"PROVEN: {BIG_LABEL} holds 12.1 req/s on vLLM relaunched from best.yaml (TTFT p95 0.27 s (0.24-0.31), "
    "66 tok/s per user at p95, 726 requests over 60 s); capacity 16.1 req/s in the search; 1.76x vLLM's "
    "defaults, reproduced at 0.99x"
)
NOT_PROVEN = (
    "NOT PROVEN: no configuration held the SLO on vLLM relaunched from the exported file "
    f"({BIG_LABEL}: TTFT p95 0.71 s > 0.50 s; vLLM defaults: TTFT p95 0.66 s > 0.50 s)"
)
BUSY = "measured again: other processes used 1.40 cores"
STRADDLES = "TTFT p95 interval 0.45 s-0.56 s straddles the limit 0.50 s"


def _point(
    key: str,
    load: Load,
    tok_s: float,
    ttft_s: float,
    tpot_s: float,
    bound: str = "gpu_memory_bandwidth",
    *,
    role: str = "judged",
    uncertain: str = "",
    requests: int = 120,
    disturbed: str = "",
) -> PhaseMeasured:
    """A measured load, judged as the tuner does: on point estimates for scouts, on intervals otherwise
    (``uncertain``: the reason an interval still straddled a limit after measuring more)."""
    user = 1 / tpot_s
    reasons: tuple[str, ...] = ()
    if ttft_s > TTFT_MAX_S:
        reasons += (f"TTFT p95 {ttft_s:.2f} s > {TTFT_MAX_S:.2f} s",)
    if user < USER_MIN:
        reasons += (f"per-user speed {user:.1f} tok/s < {USER_MIN} tok/s",)
    decision = "uncertain" if uncertain else ("fail" if reasons else "pass")
    ttft_ci = None if role == "scout" else (ttft_s * 0.9, ttft_s * 1.12)
    return PhaseMeasured(
        key=key,
        load_kind=load.kind,
        load=load.value,
        load_label=load.label(),
        role=role,
        decision=decision,
        output_tokens_per_s=tok_s,
        ttft_p95_s=ttft_s,
        tpot_p95_s=tpot_s,
        tok_s_per_user_p50=user * 1.1,
        error_rate=0.0,
        bound=bound,
        reasons=(*reasons, uncertain) if uncertain else reasons,
        requests=requests * 2 if uncertain else requests,
        phases=2 if uncertain else 1,
        ttft_p95_ci_s=ttft_ci,
        output_tokens_per_s_ci=None if role == "scout" else (tok_s * 0.97, tok_s * 1.03),
        requests_per_s=tok_s / 256,
        disturbed=disturbed,
    )


def _scouts(key: str, rows: list[tuple[int, float, float, float, str]]) -> list[PhaseMeasured]:
    return [
        _point(key, Load.users(u), tok, ttft, tpot, bound, role="scout") for u, tok, ttft, tpot, bound in rows
    ]


def _phase(key: str, load: Load, done: int, tok_s: float, role: str = "judged") -> PhaseProgressed:
    return PhaseProgressed(key, load.label(), "measure", done, 72, tok_s, role)


def _measured(point: PhaseMeasured, *before: TuneEvent) -> list[tuple[float, TuneEvent]]:
    """A phase's progress, anything said while it ran, then its result."""
    load = Load(point.load_kind, point.load)
    tick = _phase(point.key, load, 40, point.output_tokens_per_s, point.role)
    return [(8.0 if point.role == "scout" else 20.0, tick), *((6.0, e) for e in before), (12.0, point)]


FRONT = "front_end_or_client"
MEM = "gpu_memory_bandwidth"
KV = "kv_cache_queueing"

DEFAULTS_SCOUTS = _scouts(
    DEFAULTS,
    [
        (1, 98, 0.045, 0.0102, FRONT),
        (2, 190, 0.047, 0.0104, FRONT),
        (4, 372, 0.052, 0.0108, FRONT),
        (8, 720, 0.066, 0.0114, MEM),
        (16, 1290, 0.094, 0.0124, MEM),
        (32, 2210, 0.21, 0.0145, MEM),
        (64, 3420, 0.62, 0.0187, MEM),
    ],
)
BIG_SCOUTS = _scouts(
    BIG_BATCH,
    [
        (1, 99, 0.044, 0.0101, FRONT),
        (2, 194, 0.046, 0.0102, FRONT),
        (4, 380, 0.049, 0.0105, FRONT),
        (8, 742, 0.061, 0.0110, MEM),
        (16, 1370, 0.082, 0.0118, MEM),
        (32, 2460, 0.16, 0.0134, MEM),
        (64, 3890, 0.41, 0.0171, MEM),
        (128, 4630, 0.71, 0.0241, KV),
    ],
)
DEFAULTS_CAPACITY = Load.rate(9.13)
BIG_CAPACITY = Load.rate(16.1)
PRODUCTION = Load.rate(16.1 * 0.75)


def run_script(verdict: str = "proven") -> list[tuple[float, TuneEvent]]:
    """(seconds since the previous event, event): a whole run of three launches and the proof.

    ``verdict``: "proven" (exit 0) or "not_proven" (exit 3: the winner did not hold on the relaunch)."""
    script: list[tuple[float, TuneEvent]] = [
        (
            0.0,
            TuneStarted(
                "meta-llama/Llama-3.1-8B-Instruct",
                SLO.describe(),
                "1x NVIDIA H100 80GB HBM3",
                48,
                8,
                0,
                "/srv/tune/llama8b.sqlite",
                SLO.ttft_p95_max_s,
                SLO.tok_s_per_user_min,
                "rate",
                prediction="ranked by aiconfigurator 0.12.0, h100_sxm, vLLM data 0.24.0 (49 candidates predicted)",
            ),
        ),
        (
            1.0,
            TrialStarted(
                DEFAULTS, "vLLM defaults", {}, 1, "the baseline: vLLM's own defaults", predicted=10.4
            ),
        ),
        (112.4, ServerReady(DEFAULTS, URL, 112.4, 4242)),
    ]
    for point in DEFAULTS_SCOUTS:
        script += _measured(point)
    script += _measured(_point(DEFAULTS, Load.rate(8.63), 2210, 0.19, 0.0139))
    script += _measured(_point(DEFAULTS, Load.rate(10.79), 2760, 0.58, 0.0171, KV))
    script += _measured(
        _point(DEFAULTS, Load.rate(9.65), 2470, 0.47, 0.0158, uncertain=STRADDLES),
        PhaseRepeated(DEFAULTS, Load.rate(9.65).label(), "measuring further: " + STRADDLES),
    )
    script += _measured(_point(DEFAULTS, DEFAULTS_CAPACITY, 2337, 0.31, 0.0148))
    script += [
        (
            1.0,
            TrialFinished(
                DEFAULTS,
                "vLLM defaults",
                "feasible",
                "9.13 req/s (9.65 req/s did not); 2,337 tok/s",
                DEFAULTS_CAPACITY.label(),
                2337.0,
                capacity="9.13 req/s (9.65 req/s did not)",
                predicted=10.4,
                measured=9.13,
            ),
        ),
        (0.0, BestChanged(DEFAULTS, "vLLM defaults", 2337.0, DEFAULTS_CAPACITY.label())),
        (
            5.0,
            TrialStarted(
                FP8,
                "fp8 w, fp8 kv",
                {"quantization": "fp8", "kv-cache-dtype": "fp8"},
                2,
                "predicted 21.4: expect 18.8 ± 27 %",
                predicted=21.4,
            ),
        ),
        (
            64.0,
            TrialFinished(
                FP8, "fp8 w, fp8 kv", "failed", OOM, log_tail="torch.OutOfMemoryError: CUDA out of memory"
            ),
        ),
        (
            5.0,
            TrialStarted(
                BIG_BATCH,
                BIG_LABEL,
                {"max-num-seqs": 512, "max-num-batched-tokens": 16384},
                3,
                "predicted 17.9, 0.88x as trials so far measured: expect 15.7 ± 27 %",
                predicted=17.9,
            ),
        ),
        (98.7, ServerReady(BIG_BATCH, URL, 98.7, 4311)),
    ]
    for point in BIG_SCOUTS:
        script += _measured(point)
    script += _measured(
        _point(BIG_BATCH, Load.rate(15.2), 3870, 0.44, 0.0178, disturbed="other processes used 0.60 cores"),
        PhaseRepeated(BIG_BATCH, Load.rate(15.2).label(), BUSY),
    )
    script += _measured(_point(BIG_BATCH, Load.rate(19.0), 4480, 0.83, 0.0229, KV))
    script += _measured(
        _point(BIG_BATCH, Load.rate(17.0), 4240, 0.5, 0.0188, uncertain=STRADDLES),
        PhaseRepeated(BIG_BATCH, Load.rate(17.0).label(), "measuring further: " + STRADDLES),
    )
    script += [
        (20.0, _phase(BIG_BATCH, BIG_CAPACITY, 40, 4012.0)),
        # ---- mid-run: the snapshot tests stop here (MID_RUN events) ----
        (12.0, _point(BIG_BATCH, BIG_CAPACITY, 4090, 0.43, 0.0176)),
        (
            1.0,
            TrialFinished(
                BIG_BATCH,
                BIG_LABEL,
                "feasible",
                "16.1 req/s (17 req/s did not); 4,090 tok/s",
                BIG_CAPACITY.label(),
                4090.0,
                capacity="16.1 req/s (17 req/s did not)",
                predicted=17.9,
                measured=16.1,
            ),
        ),
        (0.0, BestChanged(BIG_BATCH, BIG_LABEL, 4090.0, BIG_CAPACITY.label())),
        (95.0, ServerReady(PROOF_KEY, PROOF_URL, 95.0, 4400)),
    ]
    if verdict == "proven":
        script += _measured(_point(PROOF_KEY, BIG_CAPACITY, 4050, 0.44, 0.0177, role="proof"))
        script += _measured(
            _point(PROOF_KEY, PRODUCTION, 3080, 0.27, 0.0151, role="production", requests=726)
        )
        headline, code, point = PROVEN, 0, PRODUCTION.label()
    else:
        script += _measured(_point(PROOF_KEY, BIG_CAPACITY, 4410, 0.71, 0.0199, KV, role="proof"))
        script += _measured(_point(PROOF_KEY, PRODUCTION, 3390, 0.66, 0.0186, KV, role="production"))
        headline, code, point = NOT_PROVEN, 3, None
    script += [
        (2.0, VerdictReached(verdict, headline, BIG_BATCH, BIG_LABEL, point, code)),
        (1.0, TuneFinished(BIG_BATCH, BIG_LABEL, 3, 1142.0, None, OUTPUTS, verdict, headline, code)),
    ]
    return script


MID_RUN = next(
    i
    for i, (_, e) in enumerate(run_script())
    if isinstance(e, PhaseMeasured) and e.load_label == "16.1 req/s"
)  # up to the phase at 16.1 req/s under way, before its result


class CandidateSource(LiveSource):
    """The scripted H100s and host, plus a vLLM /metrics reading of each candidate server (at ``urls``)."""

    urls: tuple[str, ...] = (URL,)

    def next_snapshot(self) -> Snapshot:
        snap = super().next_snapshot()
        engines = tuple(
            EngineSample(
                url=url,
                time_s=snap.time_s,
                requests_running=64.0,
                requests_waiting=3.0,
                kv_cache_usage_pct=87.5,
                generation_tokens_per_s=4012.0,
                ttft_p95_s=0.48,
            )
            for url in self.urls
        )
        return dataclasses.replace(snap, engines=engines)


def make_sampler(clock: scripted.ManualClock, *, gpus: bool = True) -> Sampler:
    nvml = (
        scripted.h100_sxm(1, clock=clock, load=scripted.steady_load(dram_bw_util_pct=62.0)) if gpus else None
    )
    backend = scripted.scripted_backend(nvml) if nvml is not None else None
    source = CandidateSource(backend, config=NO_DISCOVERY, host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    return Sampler(source)


class FakeTuner:
    """Emits a scripted run from ``run()`` like the real tuner: its own sampler, events in order, ``cancel``.

    ``hold_after`` events it waits for ``cancel`` (as a long phase would); ``fail_after`` events it raises.
    """

    def __init__(
        self,
        script: Iterable[tuple[float, TuneEvent]],
        *,
        hold_after: int | None = None,
        fail_after: int | None = None,
        gpus: bool = True,
    ) -> None:
        self.script = list(script)
        self.hold_after = hold_after
        self.fail_after = fail_after
        self.gpus = gpus
        self.sampler: Sampler | None = None  # created inside run(), as the real tuner does
        self.clock = scripted.ManualClock()
        self.held = threading.Event()
        self.stopped_cleanly = False

    def run(self, listener: Listener, cancel: threading.Event) -> object:
        self.sampler = make_sampler(self.clock, gpus=self.gpus)
        self.sampler.open()
        current: TrialStarted | None = None
        for i, (delay_s, event) in enumerate(self.script):
            if i == self.fail_after:
                raise RuntimeError("port 8123 is taken by another process")
            if i == self.hold_after:
                self.held.set()
                cancel.wait(timeout=30)
            if cancel.is_set():
                break
            listener(event)
            current = event if isinstance(event, TrialStarted) else current
            self.clock.advance(delay_s)
            # Readings on this thread, as the sampler's own thread would take them: the last two 0.25 s apart,
            # so that GPM (which re-primes after a gap) has an interval to report.
            self.sampler.tick()
            self.clock.advance(0.25)
            self.sampler.tick()
        if cancel.is_set():
            if current is not None:
                listener(TrialFinished(current.key, current.label, "interrupted", "interrupted"))
            headline = (
                "INTERRUPTED: trials kept in /srv/tune/llama8b.sqlite (--resume carries on); "
                "best so far vLLM defaults, NOT PROVEN"
            )
            listener(TuneFinished(None, None, 3, 900.0, "interrupted", {}, None, headline, 130))
            self.stopped_cleanly = True
            return "interrupted"
        return "done"


async def settle(pilot: Any, rounds: int = 5) -> None:
    for _ in range(rounds):
        await pilot.pause()


async def wait_until_held(pilot: Any, tuner: FakeTuner) -> None:
    for _ in range(200):
        if tuner.held.is_set():
            break
        await pilot.pause(0.02)
    assert tuner.held.is_set()
    await settle(pilot)


def rendered(widget: Any) -> Text:
    text = widget.render()
    assert isinstance(text, Text)
    return text


def text_of(widget: Any) -> str:
    text = widget.render()
    return text.plain if isinstance(text, Text) else str(text)


def style_at(text: Text, needle: str) -> Style:
    """The style the first character of ``needle`` is drawn with in ``text``."""
    at = text.plain.index(needle)
    return text.get_style_at_offset(_console(), at)


def _console() -> Any:
    from rich.console import Console

    return Console()


def cells(table: TrialTable, key: str) -> dict[str, str]:
    """A trial's row as column key -> plain text."""
    return {column: table.get_cell(key, column).plain for _, column, _ in COLUMNS}


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def fold(events: Iterable[tuple[float, TuneEvent]]) -> TuneRun:
    run = TuneRun()
    for _, event in events:
        run.apply(event, 0.0)
    return run


# --- the model ------------------------------------------------------------------------------------------------


def test_slo_limits_are_read_back_from_the_real_slo_description() -> None:
    limits = SloLimits.from_description(SLO.describe())
    assert limits.ttft_p95_max_s == pytest.approx(0.5)
    assert limits.tok_s_per_user_min == pytest.approx(33.3, abs=0.05)
    only_ttft = SloLimits.from_description(parse_slo("ttft=2").describe())
    assert only_ttft.ttft_p95_max_s == pytest.approx(2.0) and only_ttft.tok_s_per_user_min is None


def test_the_screen_knows_the_tuners_proof_key_and_reads_its_load_labels_back() -> None:
    assert PROOF_KEY == tuner_verdict.PROOF_KEY
    assert parse_load_label(Load.rate(9.13).label()) == ("rate", pytest.approx(9.13))
    assert parse_load_label(Load.rate(0.845).label()) == ("rate", pytest.approx(0.845))
    assert parse_load_label(Load.users(1).label()) == ("users", 1.0)
    assert parse_load_label(Load.users(256).label()) == ("users", 256.0)
    assert parse_load_label("a lot") is None


def test_a_running_trials_result_is_its_highest_judged_load_that_passed_below_any_that_did_not() -> None:
    run = fold(run_script()[:MID_RUN])
    running = run.trials[BIG_BATCH]
    assert running.running
    assert [p.decision for p in running.points if p.role == "judged"] == ["pass", "fail", "uncertain"]
    best = running.best_point
    # 15.2 passed; 17 was uncertain, which counts as not passing; the scouts (users) only find the pace.
    assert best is not None and best.load_label == "15.2 req/s" and best.role == "judged"
    assert run.measuring == "16.1 req/s"
    assert run.repeated is None  # the last "measuring further" belonged to the phase before
    assert run.trials[FP8].status == "failed" and run.trials[FP8].reason == OOM
    assert run.best is not None and run.best.is_defaults and run.best.load_label == "9.13 req/s"


def test_the_ratio_over_the_defaults_compares_their_capacities_in_requests_per_second() -> None:
    run = fold(run_script())
    trial = run.trials[BIG_BATCH]
    assert trial.status == "feasible" and trial.capacity == "16.1 req/s (17 req/s did not)"
    assert trial.best_point is not None and trial.best_point.load_label == "16.1 req/s"
    best = run.best
    assert best is not None and best.label == BIG_LABEL
    assert best.speedup == pytest.approx(16.1 / 9.13)  # loads, not tok/s (4,090 / 2,337 = 1.75)
    assert best.speedup_basis == "load" and best.defaults_load_label == "9.13 req/s"


def test_resumed_trials_without_points_are_compared_by_their_load_labels() -> None:
    events: list[TuneEvent] = [
        TuneStarted("m", SLO.describe(), "1x NVIDIA H100 80GB HBM3", 9, 4, 2, "/tmp/s.sqlite"),
        TrialFinished(DEFAULTS, "vLLM defaults", "feasible", "resumed", "8 users", 900.0),
        TrialFinished(BIG_BATCH, BIG_LABEL, "feasible", "resumed", "12 users", 1500.0),
        BestChanged(BIG_BATCH, BIG_LABEL, 1500.0, "12 users"),
    ]
    run = fold((0.0, e) for e in events)
    best = run.best
    assert best is not None and best.speedup == pytest.approx(1.5) and best.speedup_basis == "load"
    assert run.trials[BIG_BATCH].index is None  # resumed: not launched in this run
    # Loads of different kinds cannot be divided: the ratio falls back to tok/s, and says so.
    mixed = fold((0.0, e) for e in [*events[:3], BestChanged(BIG_BATCH, BIG_LABEL, 1500.0, "4.2 req/s")])
    assert mixed.best is not None and mixed.best.speedup_basis == "tok/s"
    assert mixed.best.speedup == pytest.approx(1500 / 900)


def test_the_fold_copes_with_unlaunched_candidates_pinned_defaults_and_a_run_ending_mid_trial() -> None:
    pinned = "tensor-parallel-size=2"
    events: list[TuneEvent] = [
        TuneStarted("m", SLO.describe(), "2x NVIDIA H100 80GB HBM3", 9, 4, 0, "/tmp/s.sqlite"),
        TrialStarted(pinned, "vLLM defaults (tp 2)", {"tensor-parallel-size": 2}, 1, "the baseline"),
        TrialFinished(pinned, "vLLM defaults (tp 2)", "feasible", "4 req/s; 1,000 tok/s", "4 req/s", 1000.0),
        BestChanged(pinned, "vLLM defaults (tp 2)", 1000.0, "4 req/s"),
        TrialFinished("max-num-seqs=4096", "seqs 4096", "infeasible", "not launched: KV cache too small"),
        TrialStarted("max-num-seqs=512", "seqs 512", {"max-num-seqs": 512}, 2, "queueing"),
        TuneFinished(pinned, "vLLM defaults (tp 2)", 2, 300.0, "interrupted", {}),
    ]
    run = fold((0.0, e) for e in events)
    assert run.defaults_trial is not None and run.defaults_trial.key == pinned
    assert run.trials["max-num-seqs=4096"].index is None  # never launched: no launch number
    assert run.trials["max-num-seqs=512"].status == "interrupted"  # the run ended under it
    assert run.current is None and not run.active
    best = run.best
    assert best is not None and best.is_defaults and best.speedup == pytest.approx(1.0)


def test_the_proof_relaunch_is_a_trial_of_its_own_that_the_verdict_closes() -> None:
    script = run_script()
    ready = next(i for i, (_, e) in enumerate(script) if isinstance(e, ServerReady) and e.key == PROOF_KEY)
    run = fold(script[: ready + 2])  # the proof's server is up and its first phase under way
    proof = run.current
    assert proof is not None and proof.key == PROOF_KEY and proof.running and proof.index is None
    assert run.phase is not None and run.phase.role == "proof" and run.measuring == "16.1 req/s"
    assert run.chart_trial is proof
    run = fold(script)
    proof = run.trials[PROOF_KEY]
    assert [p.role for p in proof.points] == ["proof", "production"]
    assert proof.status == "proven" and proof.reason == PROVEN
    assert proof.best_point is not None and proof.best_point.load_label == "12.1 req/s"  # the operating point
    assert run.verdict is not None and run.verdict.exit_code == 0
    assert run.chart_trial is run.trials[BIG_BATCH]  # once over: the winner's search
    failed = fold(run_script("not_proven")).trials[PROOF_KEY]
    assert failed.status == "not proven" and failed.best_point is None


def test_a_second_proof_launch_for_the_runner_up_starts_afresh() -> None:
    script = run_script("not_proven")
    verdict = next(i for i, (_, e) in enumerate(script) if isinstance(e, VerdictReached))
    again: list[tuple[float, TuneEvent]] = [(0.0, ServerReady(PROOF_KEY, PROOF_URL, 90.0, 4500))]
    run = fold(script[:verdict] + again)
    proof = run.trials[PROOF_KEY]
    assert proof.running and proof.points == () and run.current is proof
    assert run.phase is None and run.measuring is None  # the first launch's production check is over


# --- behaviour through Pilot ------------------------------------------------------------------------------------


async def test_a_whole_run_shows_every_trial_the_best_with_its_ratio_and_the_verdict() -> None:
    tuner = FakeTuner(run_script())
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await settle(pilot)
        screen = app.tune_screen
        table = screen.query_one(TrialTable)
        assert table.row_count == 4
        assert table.statuses == {
            DEFAULTS: "feasible",
            FP8: "failed",
            BIG_BATCH: "feasible",
            PROOF_KEY: "proven",
        }
        best = text_of(screen.query_one(BestPanel))
        assert f"winner #3 {BIG_LABEL}" in best
        assert "16.1 req/s within the SLO · 4,090 tok/s" in best
        assert "1.76x the defaults (9.13 req/s)" in best
        phase = rendered(screen.query_one(PhasePanel))
        assert phase.plain.startswith("finished: 3 launches in 19 min 02 s")
        assert PROVEN in phase.plain.replace("\n", " ")
        assert style_at(phase, "PROVEN").color is not None and style_at(phase, "PROVEN").color.name == "green"
        assert (
            "YAML   /srv/tune/out/best.yaml" in phase.plain
            and "report /srv/tune/out/report.md" in phase.plain
        )
        log = screen.query_one(EventLog).plain
        assert OOM in log  # the failure's reason, whole
        assert "#1 9.65 req/s: measuring further: " + STRADDLES in log
        assert "#3 15.2 req/s: " + BUSY in log
        assert "proof 16.1 req/s: 4,050 tok/s" in log and "proof production 12.1 req/s:" in log
        header = screen.query_one(TuneHeader)
        assert header.state == "finished" and "✓ PROVEN" in text_of(header)
        assert app.result == "done"
        assert not app.run_active
        assert app.check_action("stop_run", ()) is False  # "Stop run" has left the footer
        await pilot.press("q")  # nothing left to lose: no question
        assert not isinstance(app.screen, ConfirmScreen)
    assert app.cancel.is_set()


@pytest.mark.parametrize("size", [(80, 24), (110, 34)], ids=["80x24", "110x34"])
async def test_a_run_that_is_not_proven_ends_on_its_headline_in_red_whole(size: tuple[int, int]) -> None:
    tuner = FakeTuner(run_script("not_proven"))
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=size) as pilot:
        await app.workers.wait_for_complete()
        await settle(pilot)
        screen = app.tune_screen
        panel = screen.query_one(PhasePanel)
        phase = rendered(panel)
        assert NOT_PROVEN in phase.plain.replace("\n", " ")
        style = style_at(phase, "NOT PROVEN")
        assert style.bold and style.color is not None and style.color.name == "red"
        # Every word of it is on screen: wrapped within the panel, not cut, and the panel is not cut either.
        lines = panel.render_lines(panel.region.reset_offset)
        shown = " ".join(line.text.strip() for line in lines)
        assert " ".join(NOT_PROVEN.split()) in " ".join(shown.split())
        assert panel.region.bottom <= screen.query_one(EventLog).region.y
        assert screen.query_one(TrialTable).statuses[PROOF_KEY] == "not proven"
        header = text_of(screen.query_one(TuneHeader))
        assert "NOT PROVEN" in header and "✓" not in header
        assert NOT_PROVEN in screen.query_one(EventLog).plain
        assert app.result == "done"


async def test_the_candidates_telemetry_and_the_phase_under_way_are_shown() -> None:
    tuner = FakeTuner(run_script(), hold_after=MID_RUN)
    app = make_tune_app(tuner, clock=tuner.clock, redraw_interval_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until_held(pilot, tuner)
        await pilot.pause(0.15)  # past the redraw timer, which paints the latest reading
        screen = app.tune_screen
        strip = text_of(screen.query_one(NodeStrip))
        # An older tuner names no GPUs: the one trial running holds them all. The scripted DRAM bandwidth.
        assert "GPU 0" in strip and "#3 judged" in strip and "BW 62%" in strip
        engine = text_of(screen.query_one(EngineLine))
        assert "running 64" in engine and "waiting 3" in engine and "KV cache 87.5%" in engine
        assert "4,012 tok/s" in engine
        phase = text_of(screen.query_one(PhasePanel))
        assert f"#3 {BIG_LABEL}" in phase
        assert "judged 16.1 req/s · measure 40/72 requests" in phase and "56 % · 4,012 tok/s" in phase
        chart = screen.query_one(SloChart)
        assert chart.measuring == "16.1 req/s" and chart.trial is not None and chart.trial.key == BIG_BATCH
        chart_text = text_of(chart)
        assert "TTFT p95 ≤ 500 ms" in chart_text and "≥ 33.3 tok/s/user" in chart_text
        assert line_with(chart_text, "19 req/s").rstrip().endswith("×")  # the failing load, marked
        assert "830 ms" in line_with(chart_text, "19 req/s")
        assert line_with(chart_text, "17 req/s").rstrip().endswith("?")  # at the limit
        assert "16.1 req/s measuring…" in chart_text
        best = text_of(screen.query_one(BestPanel))
        assert "best so far #1 vLLM defaults" in best and "vLLM's defaults themselves" in best
        row = cells(screen.query_one(TrialTable), BIG_BATCH)
        assert row["load"] == "15.2 req/s" and row["tok_s"] == "3,870"  # the best so far, provisional
        assert row["model"] == "≈17.9"  # running: the model's prediction, until measured
        app.cancel.set()


async def test_the_chart_draws_scouting_rows_dim_judged_rows_bold_and_uncertain_as_a_yellow_question() -> (
    None
):
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(110, 34)) as pilot:
        feed(app, clock, run_script()[:MID_RUN])
        await pilot.pause()
        chart = rendered(app.tune_screen.query_one(SloChart))
        lines = chart.plain.splitlines()
        assert lines[1].split()[0] == "load"
        assert any("128 users" in line for line in lines)  # the last scout is in view
        assert style_at(chart, "128 users").dim
        assert style_at(chart, "15.2 req/s").bold and not style_at(chart, "15.2 req/s").dim
        uncertain = line_with(chart.plain, "17 req/s")
        at = chart.plain.index(uncertain) + len(uncertain.rstrip()) - 1
        mark = chart.get_style_at_offset(_console(), at)
        assert uncertain.rstrip()[-1] == "?" and mark.color is not None and mark.color.name == "yellow"
        # Each row fits the chart: the verdict column is never cut off.
        width = app.tune_screen.query_one(SloChart).content_region.width
        assert all(len(line.rstrip()) <= width for line in lines)


async def test_the_chart_rows_fit_at_80x24_with_the_verdict_column() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        feed(app, clock, run_script()[:MID_RUN])
        await pilot.pause()
        chart = app.tune_screen.query_one(SloChart)
        lines = text_of(chart).splitlines()
        width = chart.content_region.width
        assert all(len(line.rstrip()) <= width for line in lines), (width, lines)
        rows = [line for line in lines[2:] if "measuring" not in line]
        assert rows and all(line.rstrip()[-1] in "✓×?" for line in rows)
        assert rows[-1].split()[:2] == ["17", "req/s"]  # whole labels still, at 80 columns


async def test_narrower_than_80_columns_the_chart_abbreviates_the_units_rather_than_cut_the_verdict() -> None:
    assert [short_load(x) for x in ("12.5 req/s", "64 users", "1 user", "?")] == ["12.5/s", "64u", "1u", "?"]
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(70, 24)) as pilot:
        feed(app, clock, run_script()[:MID_RUN])
        await pilot.pause()
        chart = app.tune_screen.query_one(SloChart)
        lines = text_of(chart).splitlines()
        assert all(len(line.rstrip()) <= chart.content_region.width for line in lines[1:]), lines
        assert line_with("\n".join(lines), "17/s").rstrip().endswith("?")
        assert "16.1/s measuring…" in lines[-1]


async def test_a_tie_is_said_in_the_best_panel_and_the_log() -> None:
    note = f"ties with {BIG_LABEL} within the uncertainty; kept the one closer to vLLM's defaults"
    seqs = "max-num-seqs=512"
    script = [
        *run_script()[:MID_RUN],
        (1.0, TrialFinished(BIG_BATCH, BIG_LABEL, "feasible", "15.2 req/s", "15.2 req/s", 3870.0)),
        (0.0, BestChanged(BIG_BATCH, BIG_LABEL, 3870.0, "15.2 req/s")),
        (5.0, TrialStarted(seqs, "seqs 512", {"max-num-seqs": 512}, 4, "a smaller change")),
        (1.0, TrialFinished(seqs, "seqs 512", "feasible", "14.8 req/s", "14.8 req/s", 3790.0)),
        (0.0, BestChanged(seqs, "seqs 512", 3790.0, "14.8 req/s", note)),
    ]
    for size in ((100, 30), (80, 24)):
        clock = scripted.ManualClock()
        app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
        async with app.run_test(size=size) as pilot:
            feed(app, clock, script)
            await pilot.pause()
            screen = app.tune_screen
            best = text_of(screen.query_one(BestPanel)).splitlines()
            assert best[0].startswith("best so far #4 seqs 512")
            assert "1.62x the defaults (9.13 req/s)" in best[2]
            if size == (100, 30):
                assert best[3].startswith(f"= ties with {BIG_LABEL}")
            else:  # every row is spoken for at 80x24: a mark, and the note in the log
                assert best[0] == "best so far #4 seqs 512 (a tie)" and len(best) == 3
                assert screen.query_one(EventLog).region.bottom <= 23
            log = screen.query_one(EventLog).plain
            assert f"new best #4 seqs 512: 14.8 req/s, 3,790 tok/s ({note})" in log
            row = cells(screen.query_one(TrialTable), seqs)  # from the store's figures: no points
            assert [row["load"], row["tok_s"]] == ["14.8 req/s", "3,790"]


async def test_s_asks_first_then_stops_the_run_and_keeps_the_results_on_screen() -> None:
    tuner = FakeTuner(run_script(), hold_after=MID_RUN)
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until_held(pilot, tuner)
        assert app.run_active
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        assert "server is stopped, finished trials are kept" in app.screen.question
        await pilot.press("n")
        assert not app.cancel.is_set() and app.run_active
        await pilot.press("s")
        await pilot.press("y")
        assert app.cancel.is_set()
        await app.workers.wait_for_complete()
        await settle(pilot)
        assert tuner.stopped_cleanly and app.result == "interrupted"
        screen = app.tune_screen
        assert app.screen is screen  # still open, to read the results
        assert screen.query_one(TrialTable).statuses[BIG_BATCH] == "interrupted"
        assert screen.query_one(TuneHeader).state == "stopped"
        phase = rendered(screen.query_one(PhasePanel))
        assert "stopped (interrupted)" in phase.plain
        assert "INTERRUPTED: trials kept in /srv/tune/llama8b.sqlite" in phase.plain.replace("\n", " ")
        assert style_at(phase, "INTERRUPTED").color.name == "yellow"  # type: ignore[union-attr]
        assert "9.13 req/s within the SLO" in text_of(screen.query_one(BestPanel))  # finished trials kept


async def test_q_during_a_run_asks_and_leaves_only_after_the_tuner_has_stopped() -> None:
    tuner = FakeTuner(run_script(), hold_after=MID_RUN)
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until_held(pilot, tuner)
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert app.is_running and not app.cancel.is_set()
        await pilot.press("q")
        await pilot.press("y")
        assert app.cancel.is_set()
        await app.workers.wait_for_complete()
        await settle(pilot)
        assert not app.is_running  # left on its own once the tuner returned
    assert tuner.stopped_cleanly


async def test_a_tuner_that_raises_is_one_clear_line_not_a_traceback() -> None:
    tuner = FakeTuner(run_script(), fail_after=6)
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(200):  # wait_for_complete() would re-raise the worker's error here
            if app.worker is not None and app.worker.is_finished:
                break
            await pilot.pause(0.02)
        await settle(pilot)
        screen = app.tune_screen
        phase = text_of(screen.query_one(PhasePanel))
        assert (
            phase == "! the tuner stopped with an error: RuntimeError: port 8123 is taken by another process"
        )
        assert screen.query_one(TuneHeader).state == "crashed"
        assert screen.query_one(TrialTable).statuses == {DEFAULTS: "interrupted"}
        assert "Traceback" not in screen.query_one(EventLog).plain
        assert not app.run_active
        await pilot.press("q")
    assert app.cancel.is_set()


async def test_without_gpus_the_telemetry_says_so_and_shows_the_host_instead() -> None:
    tuner = FakeTuner(run_script(), hold_after=4, gpus=False)
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until_held(pilot, tuner)
        screen = app.tune_screen
        assert not screen.query_one(NodeStrip).display
        assert "no GPU telemetry: GPU telemetry disabled" in str(screen.query_one("#no-gpu").render())
        host = screen.query_one(HostBar)
        assert host.has_class("shown") and host.sample is not None
        app.cancel.set()


async def test_progress_ticks_are_repainted_on_the_redraw_timer_not_each_one() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock, redraw_interval_s=0.1)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.tune_screen
        for _, event in run_script()[:3]:
            screen.show_event(event)
        panel = screen.query_one(PhasePanel)
        tick = _phase(DEFAULTS, Load.users(1), 12, 95.0, "scout")
        screen.show_event(tick)
        assert panel.phase is None  # not yet: ticks may come hundreds of times a second
        await pilot.pause(0.25)
        assert panel.phase == tick
        assert "scout 1 user · measure 12/72 requests" in text_of(panel)


async def test_a_phase_measured_again_says_so_and_the_log_says_why() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    script = run_script()
    repeats = [i for i, (_, e) in enumerate(script) if isinstance(e, PhaseRepeated) and e.key == BIG_BATCH]
    async with app.run_test(size=(100, 30)) as pilot:
        feed(app, clock, script[: repeats[0] + 1])  # the host was busy during 15.2 req/s
        await pilot.pause()
        screen = app.tune_screen
        phase = screen.query_one(PhasePanel)
        assert text_of(phase).splitlines()[1] == "judged 15.2 req/s · measure again 40/72 req"
        # The reason, whole, as the log's newest line (the phase panel keeps to three lines).
        assert screen.query_one(EventLog).plain.splitlines()[-1].endswith("#3 15.2 req/s: " + BUSY)
        for _, event in script[repeats[0] + 1 : repeats[1] + 1]:  # ... then 17 req/s straddled the limit
            screen.show_event(event)
        screen.show_run()
        await pilot.pause()
        assert text_of(phase).splitlines()[1] == "judged 17 req/s · measure further 40/72 req"
        assert "#3 17 req/s: measuring further: " + STRADDLES in screen.query_one(EventLog).plain
        screen.show_event(script[repeats[1] + 1][1])  # its result: the marker goes with the phase
        screen.show_event(_phase(BIG_BATCH, BIG_CAPACITY, 3, 4012.0))
        screen.show_run()
        await pilot.pause()
        assert text_of(phase).splitlines()[1] == "judged 16.1 req/s · measure 3/72 requests"


@pytest.mark.parametrize("verdict", ["proven", "not_proven"])
async def test_at_80x24_every_panel_is_on_screen_with_every_trial_row(verdict: str) -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    script = run_script(verdict)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.tune_screen
        feed(app, clock, script[:MID_RUN])
        await pilot.pause()
        for widget in (
            TuneHeader,
            TrialTable,
            PhasePanel,
            BestPanel,
            SloChart,
            EngineLine,
            EventLog,
            NodeStrip,
        ):
            region = screen.query_one(widget).region
            assert region.height > 0 and region.bottom <= 23, widget  # above the footer, nothing scrolled off
        table = screen.query_one(TrialTable)
        assert table.region.height >= 1 + table.row_count  # heading and every trial
        for _, event in script[MID_RUN:]:
            screen.show_event(event)
        screen.on_tune_run_ended(TuneRunEnded())
        await pilot.pause()
        # Over: the verdict and the files take the room of the chart and of the telemetry, which has stopped.
        for widget in (TuneHeader, TrialTable, PhasePanel, BestPanel, EventLog):
            region = screen.query_one(widget).region
            assert region.height > 0 and region.bottom <= 23, widget
        assert not screen.query_one(SloChart).display and not screen.query_one("#telemetry").display
        assert table.row_count == 4 and table.region.height >= 1 + table.row_count
        phase = screen.query_one(PhasePanel)
        shown = " ".join(line.text.strip() for line in phase.render_lines(phase.region.reset_offset))
        headline = PROVEN if verdict == "proven" else NOT_PROVEN
        assert " ".join(headline.split()) in " ".join(shown.split())  # whole, wrapped
        assert "/srv/tune/out/best.yaml" in shown and "/srv/tune/out/report.html" in shown
        best = text_of(screen.query_one(BestPanel))
        assert "16.1 req/s within the SLO · 4,090 tok/s · 1.76x the defaults (9.13 req/s)" in best


async def test_help_explains_the_columns_and_closes() -> None:
    app = make_tune_app(FakeTuner([]), autostart=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, TuneHelpScreen)
        await pilot.press("escape")
        assert app.screen is app.tune_screen


# --- appearance ---------------------------------------------------------------------------------------------------


def feed(
    app: TuneApp,
    clock: scripted.ManualClock,
    events: list[tuple[float, TuneEvent]],
    sampler: Sampler | None = None,
) -> None:
    """Show ``events`` on the UI thread with the screen's clock moving as scripted, plus the candidate's
    telemetry (from ``sampler``, else the scripted H100): deterministic, unlike the worker's timing."""
    screen = app.tune_screen
    sampler = sampler or make_sampler(clock)
    screen.attach_telemetry(sampler.open(), sampler.history)
    for delay_s, event in events:
        screen.show_event(event)
        clock.advance(delay_s)
    for _ in range(120):  # half a minute of readings at 4 Hz, for the sparklines
        clock.advance(0.25)
        sampler.tick()
    assert sampler.latest is not None
    screen.show_snapshot(sampler.latest)
    screen.show_run()


@pytest.mark.parametrize("size", [(110, 34), (80, 24)], ids=["110x34", "80x24"])
@pytest.mark.parametrize("moment", ["mid_run", "proven", "not_proven"])
def test_tune_snapshot(snap_compare: Any, moment: str, size: tuple[int, int]) -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    events = {
        "mid_run": run_script()[:MID_RUN],
        "proven": run_script(),
        "not_proven": run_script("not_proven"),
    }[moment]

    async def run_before(pilot: Any) -> None:
        feed(app, clock, events)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_the_model_column_shows_the_prediction_then_measured_over_predicted() -> None:
    from tui.tune_state import TuneRun
    from tui.widgets.trial_table import model_cell

    state = TuneRun()
    state.apply(TrialStarted("k", "fp8 w", {}, 2, "predicted 40", predicted=40.0), 0.0)
    assert model_cell(state.trials["k"]).plain == "≈40.0"
    state.apply(TrialFinished("k", "fp8 w", "feasible", "ok", predicted=40.0, measured=22.0), 1.0)
    cell = model_cell(state.trials["k"])
    assert cell.plain == "0.55x" and "red" in str(cell.style)  # far off: a finding
    state.apply(TrialFinished("j", "bf16", "feasible", "ok", predicted=20.0, measured=19.0), 2.0)
    assert model_cell(state.trials["j"]).plain == "0.95x" and "green" in str(
        model_cell(state.trials["j"]).style
    )
    state.apply(TrialFinished("n", "defaults", "feasible", "ok"), 3.0)
    assert model_cell(state.trials["n"]).plain == "–"


# --- a node of eight GPUs, trials in parallel ----------------------------------------------------------------

NODE = tuple(range(8))
SEQS_256 = "max-num-seqs=256"
KV_FP8 = "kv-cache-dtype=fp8"
TP4 = "max-num-seqs=512;tensor-parallel-size=4"
MEM95 = "gpu-memory-utilization=0.95"
SQUEEZED = "host CPU busy: the clients of 7 trials beside it used 14.2 cores"


def node_started(eta_s: float | None = 2400.0) -> TuneStarted:
    return TuneStarted(
        "meta-llama/Llama-3.1-8B-Instruct",
        SLO.describe(),
        "8x NVIDIA H100 80GB HBM3",
        48,
        12,
        0,
        "/srv/tune/llama8b-node.sqlite",
        SLO.ttft_p95_max_s,
        SLO.tok_s_per_user_min,
        "rate",
        node_gpus=NODE,
        parallel=8,
        eta_s=eta_s,
    )


def _node_trial(key: str, label: str, index: int, gpus: tuple[int, ...], why: str) -> TrialStarted:
    layout = f"{8 // len(gpus)} x TP {len(gpus)}"
    return TrialStarted(key, label, {}, index, why, gpus=gpus, layout=layout)


def _node_finished(
    key: str, label: str, gpus: tuple[int, ...], load: Load, tok_s: float, disturbed: str = ""
) -> TrialFinished:
    replicas = 8 // len(gpus)
    return TrialFinished(
        key,
        label,
        "feasible",
        f"{load.label()}; {tok_s:,.0f} tok/s",
        load.label(),
        tok_s,
        capacity=load.label(),
        measured=load.value,
        gpus=gpus,
        layout=f"{replicas} x TP {len(gpus)}",
        node_capacity=load.value * replicas,
        disturbed=disturbed,
    )


def node_script() -> list[tuple[float, TuneEvent]]:
    """An 8-GPU tune mid-run: two TP-1 trials finished (one disturbed by its neighbours), one failed, and four
    running at once: a judged phase on GPU 0, a scout on GPU 1, a server starting on GPU 2, a TP-4 server on
    GPUs 4-7; GPU 3 is idle."""
    script: list[tuple[float, TuneEvent]] = [
        (0.0, node_started()),
        (1.0, _node_trial(DEFAULTS, "vLLM defaults", 1, (0,), "the baseline: vLLM's own defaults")),
        (0.0, _node_trial(KV_FP8, "fp8 kv", 2, (1,), "predicted 11.9")),
        (0.0, _node_trial(FP8, "fp8 w, fp8 kv", 3, (2,), "predicted 21.4")),
        (64.0, TrialFinished(FP8, "fp8 w, fp8 kv", "failed", OOM, gpus=(2,), layout="8 x TP 1")),
        (48.0, ServerReady(DEFAULTS, "http://127.0.0.1:8101", 112.4, 4242)),
        (2.0, ServerReady(KV_FP8, "http://127.0.0.1:8102", 114.0, 4243)),
    ]
    script += _measured(_point(DEFAULTS, DEFAULTS_CAPACITY, 2337, 0.31, 0.0148))
    script += _measured(_point(KV_FP8, Load.rate(10.2), 2580, 0.34, 0.0151, disturbed=SQUEEZED))
    script += [
        (1.0, _node_finished(DEFAULTS, "vLLM defaults", (0,), DEFAULTS_CAPACITY, 2337.0)),
        (0.0, BestChanged(DEFAULTS, "vLLM defaults", 2337.0, DEFAULTS_CAPACITY.label())),
        (1.0, _node_finished(KV_FP8, "fp8 kv", (1,), Load.rate(10.2), 2580.0, disturbed=SQUEEZED)),
        (0.0, BestChanged(KV_FP8, "fp8 kv", 2580.0, "10.2 req/s")),
        (0.0, EtaUpdated(1260.0, 6, "predicted: 6 launches x ~3.5 min on 8 slots")),
        (2.0, _node_trial(BIG_BATCH, BIG_LABEL, 4, (0,), "predicted 17.9")),
        (0.0, _node_trial(SEQS_256, "seqs 256", 5, (1,), "predicted 13.0")),
        (0.0, _node_trial(TP4, "TP 4, seqs 512", 6, (4, 5, 6, 7), "predicted 31.0 per server")),
        (95.0, ServerReady(TP4, "http://127.0.0.1:8106", 95.0, 4301)),
        (3.0, ServerReady(BIG_BATCH, "http://127.0.0.1:8104", 98.0, 4302)),
        (1.0, ServerReady(SEQS_256, "http://127.0.0.1:8105", 99.0, 4303)),
        (0.0, _node_trial(MEM95, "gpu mem 0.95", 7, (2,), "predicted 9.8")),
    ]
    script += _measured(_point(TP4, Load.rate(28.0), 7200, 0.29, 0.0141))
    script += _measured(_point(BIG_BATCH, Load.rate(15.2), 3870, 0.44, 0.0178))
    script += [
        (4.0, _phase(SEQS_256, Load.users(32), 30, 2400.0, "scout")),
        (3.0, _phase(TP4, Load.rate(31.0), 22, 7800.0)),
        (2.0, _phase(BIG_BATCH, BIG_CAPACITY, 40, 4012.0)),
    ]
    return script


def node_load(t: float, gpu: int) -> scripted.Load:
    """What each GPU of the node does: decode under load where a server holds it, idle elsewhere."""
    if gpu in (2, 3):  # GPU 2's server is still starting, GPU 3 is idle
        return scripted.decode_load(0.0, 0)  # the idle part of the decode cycle
    bandwidth = {0: 62.0, 1: 48.0}.get(gpu, 71.0)
    return scripted.steady_load(dram_bw_util_pct=bandwidth, power_frac=0.55 + bandwidth / 250)(t, gpu)


def make_node_sampler(clock: scripted.ManualClock) -> Sampler:
    """Eight scripted H100s, GPU 3 empty (nothing loaded on it), with the trials' servers' /metrics."""
    empty = dataclasses.replace(scripted.H100_SXM, vram_used_frac=0.006)
    specs = [empty if gpu == 3 else scripted.H100_SXM for gpu in NODE]
    nvml = scripted.ScriptedNvml(specs, clock=clock, load=node_load)
    source = CandidateSource(
        scripted.scripted_backend(nvml),
        config=NO_DISCOVERY,
        host=FixedHost(),
        clock=clock,  # type: ignore[arg-type]
    )
    source.urls = ("http://127.0.0.1:8104", "http://127.0.0.1:8105", "http://127.0.0.1:8106")
    return Sampler(source)


def feed_node(app: TuneApp, clock: scripted.ManualClock, events: list[tuple[float, TuneEvent]]) -> None:
    """:func:`feed` on the scripted 8-GPU node."""
    feed(app, clock, events, sampler=make_node_sampler(clock))


def strip_lines(screen: Any) -> list[str]:
    return text_of(screen.query_one(NodeStrip)).splitlines()


def test_interleaved_trials_keep_their_phases_apart() -> None:
    run = fold(node_script())
    assert [t.key for t in run.running] == [BIG_BATCH, SEQS_256, TP4, MEM95]
    assert run.current_key == BIG_BATCH  # the last to begin a phase
    assert run.measuring_on(BIG_BATCH) == "16.1 req/s" and run.measuring_on(TP4) == "31 req/s"
    assert run.phase_of(SEQS_256) is not None and run.phase_of(SEQS_256).role == "scout"  # type: ignore[union-attr]
    assert run.measuring_on(MEM95) is None  # its server is still starting
    # A result on one trial does not end the phase under way on another.
    run.apply(_point(TP4, Load.rate(31.0), 7800, 0.33, 0.0146), 0.0)
    assert run.measuring_on(TP4) is None and run.measuring_on(BIG_BATCH) == "16.1 req/s"
    assert run.current_key == TP4
    run.apply(_node_finished(TP4, "TP 4, seqs 512", (4, 5, 6, 7), Load.rate(31.0), 7800.0), 0.0)
    assert run.current_key == BIG_BATCH  # back to the running trial active last
    fp8 = run.trials[KV_FP8]
    assert fp8.node_capacity == pytest.approx(81.6) and fp8.node_load_label == "81.6 req/s"
    assert fp8.layout == "8 x TP 1" and fp8.disturbed == SQUEEZED
    tp4 = run.trials[TP4]
    assert tp4.node_load_label == "62 req/s" and tp4.gpus == (4, 5, 6, 7)
    best = run.best
    assert best is not None and best.speedup_basis == "node"
    assert best.speedup == pytest.approx(81.6 / 73.04) and best.defaults_node_load_label == "73 req/s"


def test_the_eta_counts_down_from_the_tuners_estimates() -> None:
    run = TuneRun()
    run.apply(node_started(eta_s=1800.0), 100.0)
    assert run.eta_s(100.0) == pytest.approx(1800.0)
    assert run.eta_s(700.0) == pytest.approx(1200.0)
    run.apply(EtaUpdated(840.0, 3, "measured: 3 launches x ~4.7 min on 8 slots"), 700.0)
    assert run.eta_s(760.0) == pytest.approx(780.0)
    assert run.eta_s(2000.0) is None  # overdue: the estimate no longer tells
    run.apply(EtaUpdated(None, 3, "no launch has finished yet"), 800.0)
    assert run.eta_s(800.0) is None
    unknown = TuneRun()
    unknown.apply(node_started(eta_s=None), 0.0)
    assert unknown.eta_s(0.0) is None


async def test_two_trials_in_parallel_then_a_tp4_trial_hold_their_gpus_in_the_strip() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(110, 40)) as pilot:
        screen = app.tune_screen
        sampler = make_node_sampler(clock)
        screen.attach_telemetry(sampler.open(), sampler.history)
        for event in (
            node_started(),
            _node_trial(DEFAULTS, "vLLM defaults", 1, (0,), "the baseline"),
            _node_trial(KV_FP8, "fp8 kv", 2, (1,), "predicted 11.9"),
            ServerReady(DEFAULTS, "http://127.0.0.1:8101", 100.0, 1),
            _phase(DEFAULTS, Load.users(4), 10, 380.0, "scout"),
        ):
            screen.show_event(event)
        screen.show_run()
        await pilot.pause()
        table = screen.query_one(TrialTable)
        assert table.statuses == {DEFAULTS: "running", KV_FP8: "running"}  # two running rows
        assert cells(table, KV_FP8)["gpus"] == "1" and cells(table, KV_FP8)["layout"] == "8 x TP 1"
        lines = strip_lines(screen)
        assert len(lines) == 4  # 8 GPUs, two a row at 110 columns
        assert lines[0].startswith("0 #1 scout") and "1 #2 start" in lines[0]
        assert all(line.count("idle") == 2 for line in lines[1:])
        assert "GPU 0-7 · 2 busy · 8 at once" in str(screen.query_one("#telemetry").border_title)
        assert text_of(screen.query_one(PhasePanel)).startswith("#1 vLLM defaults · GPU 0 · 8 x TP 1")
        # The first finishes and frees GPU 0; a TP-4 trial takes GPUs 4-7.
        screen.show_event(_node_finished(DEFAULTS, "vLLM defaults", (0,), DEFAULTS_CAPACITY, 2337.0))
        screen.show_event(_node_trial(TP4, "TP 4, seqs 512", 3, (4, 5, 6, 7), "predicted 31.0"))
        await pilot.pause()
        lines = strip_lines(screen)
        assert lines[0].startswith("0 idle") and "1 #2 start" in lines[0]
        assert lines[2].startswith("4 #3 start") and "5 #3 start" in lines[2]
        assert lines[3].startswith("6 #3 start") and "7 #3 start" in lines[3]
        assert cells(table, DEFAULTS)["node"] == "73 req/s"
        assert cells(table, TP4)["gpus"] == "4-7" and cells(table, TP4)["layout"] == "2 x TP 4"
        phase = text_of(screen.query_one(PhasePanel))
        assert phase.startswith("#3 TP 4, seqs 512 · GPU 4-7 · 2 x TP 4")  # follows the trial active last
        assert "starting the vLLM server" in phase
        # Every trial over: every GPU idle.
        screen.show_event(TrialFinished(KV_FP8, "fp8 kv", "failed", OOM, gpus=(1,)))
        screen.show_event(TrialFinished(TP4, "TP 4, seqs 512", "failed", OOM, gpus=(4, 5, 6, 7)))
        await pilot.pause()
        assert " ".join(strip_lines(screen)).count("idle") == 8


async def test_the_header_shows_the_eta_and_counts_it_down() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(110, 34)) as pilot:
        screen = app.tune_screen
        header = screen.query_one(TuneHeader)
        screen.show_event(node_started(eta_s=1800.0))
        await pilot.pause()
        assert "ETA 30 min" in text_of(header)
        clock.advance(600.0)
        screen.show_run()
        await pilot.pause()
        assert "ETA 20 min" in text_of(header)
        screen.show_event(EtaUpdated(840.0, 3, "measured: 3 launches x ~4.7 min on 8 slots"))
        await pilot.pause()
        assert "ETA 14 min" in text_of(header)
        assert screen.query_one(EventLog).plain.endswith(
            "time left 14 min 00 s: measured: 3 launches x ~4.7 min on 8 slots"
        )
        screen.show_event(EtaUpdated(None, 3, "no launch has finished yet"))
        await pilot.pause()
        assert "ETA ?" in text_of(header)
        screen.show_event(TuneFinished(None, None, 0, 700.0, "interrupted"))
        await pilot.pause()
        assert "ETA" not in text_of(header)


async def test_selecting_a_trial_shows_it_and_a_disturbed_trial_is_marked() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(110, 40)) as pilot:
        feed_node(app, clock, node_script())
        await pilot.pause()
        screen = app.tune_screen
        table = screen.query_one(TrialTable)
        assert table.selected_key is None  # following
        assert text_of(screen.query_one(PhasePanel)).startswith(f"#4 {BIG_LABEL} · GPU 0")
        row = cells(table, KV_FP8)
        assert row["status"] == "feasible !" and row["reason"].startswith("disturbed: host CPU busy")
        table.focus()
        for _ in range(5):  # up to #2, the disturbed trial
            await pilot.press("up")
        await pilot.pause()
        assert table.selected_key == KV_FP8
        phase = text_of(screen.query_one(PhasePanel)).splitlines()
        assert phase[0] == "#2 fp8 kv · GPU 1 · 8 x TP 1 (selected)"
        assert phase[2].startswith("node 81.6 req/s (8 x TP 1) · ! disturbed: host CPU")
        chart = screen.query_one(SloChart)
        assert chart.trial is not None and chart.trial.key == KV_FP8 and chart.measuring is None
        # Back down to the newest row: the screen follows the trial active last again.
        for _ in range(5):
            await pilot.press("down")
        await pilot.pause()
        assert table.selected_key is None
        assert text_of(screen.query_one(PhasePanel)).startswith(f"#4 {BIG_LABEL}")
        best = text_of(screen.query_one(BestPanel))
        assert "best so far #2 fp8 kv · 8 x TP 1" in best
        assert "node 81.6 req/s" in best and "1.12x the defaults' node (73 req/s)" in best


async def test_an_8_gpu_node_fits_80x24() -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        feed_node(app, clock, node_script())
        await pilot.pause()
        screen = app.tune_screen
        for widget in (TuneHeader, TrialTable, PhasePanel, BestPanel, SloChart, NodeStrip, EventLog):
            region = screen.query_one(widget).region
            assert region.height > 0 and region.bottom <= 23, widget
        strip = screen.query_one(NodeStrip)
        assert strip.region.height == 4  # eight GPUs, two a row, none scrolled away
        lines = strip_lines(screen)
        assert lines[0].startswith("0 #4 judged") and "1 #5 scout" in lines[0]
        assert lines[1].startswith("2 #7 start") and "3 idle" in lines[1]
        assert lines[2].startswith("4 #6 judged") and lines[3].startswith("6 #6 judged")
        assert all(len(line) <= strip.content_region.width for line in lines)
        assert "ETA 18 min" in text_of(screen.query_one(TuneHeader))


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_node_snapshot(snap_compare: Any, size: tuple[int, int]) -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)

    async def run_before(pilot: Any) -> None:
        feed_node(app, clock, node_script())
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)
