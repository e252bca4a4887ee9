"""The tune screen, driven through Pilot with a scripted tuner: what a run looks like and how its keys act.

The fake tuner emits the events of a realistic run (vLLM's defaults, an FP8 candidate that fails at launch, a
larger batch that wins) from the real thread worker, with a scripted H100 behind its sampler. Snapshot tests
feed the same events on the UI thread with frozen clocks. Update snapshots with
`pytest tests/test_tune_screen.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from typing import Any

import pytest
from helpers import NO_DISCOVERY, FixedHost
from rich.text import Text

from tui.screens.confirm import ConfirmScreen
from tui.screens.tune_help import TuneHelpScreen
from tui.tune_app import TuneApp, make_tune_app
from tui.tune_state import SloLimits, TuneRun
from tui.widgets.best_panel import BestPanel
from tui.widgets.engine_line import EngineLine
from tui.widgets.event_log import EventLog
from tui.widgets.gpu_card import GpuCard
from tui.widgets.host_bar import HostBar
from tui.widgets.phase_panel import PhasePanel
from tui.widgets.slo_chart import SloChart
from tui.widgets.trial_table import TrialTable
from tui.widgets.tune_header import TuneHeader
from tuner.telemetry import scripted
from tuner.telemetry.model import EngineSample, Snapshot
from tuner.telemetry.sampler import LiveSource, Sampler
from tuner.tuning.events import (
    BestChanged,
    Listener,
    PhaseMeasured,
    PhaseProgressed,
    ServerReady,
    TrialFinished,
    TrialStarted,
    TuneEvent,
    TuneFinished,
    TuneStarted,
)
from tuner.tuning.slo import parse_slo

SLO = parse_slo("mlperf-llama3.1-8b-interactive")  # TTFT p95 <= 0.5 s, >= 33.3 tok/s per user
DEFAULTS = "vllm-defaults"
FP8 = "kv-cache-dtype=fp8;quantization=fp8"
BIG_BATCH = "max-num-batched-tokens=16384;max-num-seqs=512"
URL = "http://127.0.0.1:8123"
OOM = (
    "the server exited during start-up: CUDA out of memory while capturing CUDA graphs "
    "(try --gpu-memory-utilization 0.85)"
)


def _point(
    key: str, c: int, tok_s: float, ttft_s: float, tpot_s: float, bound: str = "gpu_memory_bandwidth"
) -> PhaseMeasured:
    passed = ttft_s <= SLO.ttft_p95_max_s and 1 / tpot_s >= SLO.tok_s_per_user_min  # type: ignore[operator]
    reasons = () if passed else (f"TTFT p95 {ttft_s:.2f} s > {SLO.ttft_p95_max_s:.2f} s",)
    return PhaseMeasured(key, c, passed, tok_s, ttft_s, tpot_s, 1 / tpot_s * 1.1, 0.0, bound, reasons)


def _phase(key: str, c: int, done: int, tok_s: float) -> PhaseProgressed:
    return PhaseProgressed(key, c, "measure", done, 64, tok_s)


def run_script() -> list[tuple[float, TuneEvent]]:
    """(seconds since the previous event, event): a whole run of three launches."""
    defaults_points = [
        _point(DEFAULTS, 1, 98, 0.045, 0.0102, "front_end_or_client"),
        _point(DEFAULTS, 4, 372, 0.052, 0.0108, "front_end_or_client"),
        _point(DEFAULTS, 16, 1290, 0.094, 0.0124),
        _point(DEFAULTS, 32, 2210, 0.21, 0.0145),
        _point(DEFAULTS, 64, 3420, 0.62, 0.0187),
        _point(DEFAULTS, 48, 2980, 0.41, 0.0161),
    ]
    big_points = [
        _point(BIG_BATCH, 48, 3350, 0.33, 0.0158),
        _point(BIG_BATCH, 96, 4630, 0.71, 0.0241, "kv_cache_queueing"),
        _point(BIG_BATCH, 64, 3904, 0.46, 0.0196),
    ]
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
            ),
        ),
        (1.0, TrialStarted(DEFAULTS, "vLLM defaults", {}, 1, "the baseline: vLLM's own defaults")),
        (112.4, ServerReady(DEFAULTS, URL, 112.4, 4242)),
    ]
    for point in defaults_points:
        script.append((20.0, _phase(DEFAULTS, point.concurrency, 40, point.output_tokens_per_s)))
        script.append((12.0, point))
    script += [
        (
            1.0,
            TrialFinished(DEFAULTS, "vLLM defaults", "feasible", "2,980 tok/s at concurrency 48", 48, 2980.0),
        ),
        (0.0, BestChanged(DEFAULTS, "vLLM defaults", 2980.0, 48)),
        (
            5.0,
            TrialStarted(
                FP8,
                "fp8 w, fp8 kv",
                {"quantization": "fp8", "kv-cache-dtype": "fp8"},
                2,
                "DRAM bandwidth bound at 48: FP8 halves the bytes per token",
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
                "seqs 512, batch 16384",
                {"max-num-seqs": 512, "max-num-batched-tokens": 16384},
                3,
                "requests waited with KV cache to spare: a larger batch",
            ),
        ),
        (98.7, ServerReady(BIG_BATCH, URL, 98.7, 4311)),
    ]
    for point in big_points:
        script.append((20.0, _phase(BIG_BATCH, point.concurrency, 40, point.output_tokens_per_s)))
        script.append((12.0, point))
    script += [
        (0.0, BestChanged(BIG_BATCH, "seqs 512, batch 16384", 3904.0, 64)),
        (20.0, _phase(BIG_BATCH, 80, 40, 4012.0)),
        # ---- mid-run: the snapshot tests stop here (MID_RUN events) ----
        (12.0, _point(BIG_BATCH, 80, 4120, 0.55, 0.0214, "kv_cache_queueing")),
        (
            1.0,
            TrialFinished(
                BIG_BATCH, "seqs 512, batch 16384", "feasible", "3,904 tok/s at concurrency 64", 64, 3904.0
            ),
        ),
        (
            3.0,
            TuneFinished(
                BIG_BATCH,
                "seqs 512, batch 16384",
                3,
                608.0,
                None,
                {
                    "yaml": "/srv/tune/out/best.yaml",
                    "markdown": "/srv/tune/out/report.md",
                    "html": "/srv/tune/out/report.html",
                },
            ),
        ),
    ]
    return script


MID_RUN = len(run_script()) - 3  # up to the phase at concurrency 80, before its result


class CandidateSource(LiveSource):
    """The scripted H100 and host, plus a vLLM /metrics reading of the candidate server."""

    def next_snapshot(self) -> Snapshot:
        snap = super().next_snapshot()
        engine = EngineSample(
            url=URL,
            time_s=snap.time_s,
            requests_running=64.0,
            requests_waiting=3.0,
            kv_cache_usage_pct=87.5,
            generation_tokens_per_s=4012.0,
            ttft_p95_s=0.48,
        )
        return dataclasses.replace(snap, engines=(engine,))


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
            self.sampler.tick()  # a reading per event, on this thread, as the sampler's own thread would
        if cancel.is_set():
            if current is not None:
                listener(TrialFinished(current.key, current.label, "interrupted", "stopped by the operator"))
            listener(TuneFinished(None, None, 3, 900.0, "interrupted", {}))
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


def text_of(widget: Any) -> str:
    rendered = widget.render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


# --- the model ------------------------------------------------------------------------------------------------


def test_slo_limits_are_read_back_from_the_real_slo_description() -> None:
    limits = SloLimits.from_description(SLO.describe())
    assert limits.ttft_p95_max_s == pytest.approx(0.5)
    assert limits.tok_s_per_user_min == pytest.approx(33.3, abs=0.05)
    only_ttft = SloLimits.from_description(parse_slo("ttft=2").describe())
    assert only_ttft.ttft_p95_max_s == pytest.approx(2.0) and only_ttft.tok_s_per_user_min is None


def test_the_fold_keeps_the_best_phase_of_a_running_trial_and_the_tuners_pick_once_finished() -> None:
    run = TuneRun()
    for _, event in run_script()[:MID_RUN]:
        run.apply(event, 0.0)
    running = run.trials[BIG_BATCH]
    assert running.running and running.best_point is not None
    assert running.best_point.concurrency == 64  # most tok/s among the passing phases (96 failed)
    assert run.measuring == 80
    assert run.trials[FP8].status == "failed" and run.trials[FP8].reason == OOM
    best = run.best
    assert best is not None and best.speedup == pytest.approx(3904 / 2980)


def test_the_fold_copes_with_unlaunched_candidates_pinned_defaults_and_a_run_ending_mid_trial() -> None:
    run = TuneRun()
    pinned = "tensor-parallel-size=2"
    events: list[TuneEvent] = [
        TuneStarted("m", SLO.describe(), "2x NVIDIA H100 80GB HBM3", 9, 4, 0, "/tmp/s.sqlite"),
        TrialStarted(pinned, "vLLM defaults (tp 2)", {"tensor-parallel-size": 2}, 1, "the baseline"),
        TrialFinished(pinned, "vLLM defaults (tp 2)", "feasible", "1,000 tok/s at 8 concurrent", 8, 1000.0),
        BestChanged(pinned, "vLLM defaults (tp 2)", 1000.0, 8),
        TrialFinished("max-num-seqs=4096", "seqs 4096", "infeasible", "not launched: KV cache too small"),
        TrialStarted("max-num-seqs=512", "seqs 512", {"max-num-seqs": 512}, 2, "queueing"),
        TuneFinished(pinned, "vLLM defaults (tp 2)", 2, 300.0, "interrupted", {}),
    ]
    for event in events:
        run.apply(event, 0.0)
    assert run.defaults_trial is not None and run.defaults_trial.key == pinned
    assert run.trials["max-num-seqs=4096"].index is None  # never launched: no launch number
    assert run.trials["max-num-seqs=512"].status == "interrupted"  # the run ended under it
    assert run.current is None and not run.active
    best = run.best
    assert best is not None and best.is_defaults and best.speedup == pytest.approx(1.0)


# --- behaviour through Pilot ------------------------------------------------------------------------------------


async def test_a_whole_run_shows_every_trial_the_best_with_its_ratio_and_where_the_results_are() -> None:
    tuner = FakeTuner(run_script())
    app = make_tune_app(tuner, clock=tuner.clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await settle(pilot)
        screen = app.tune_screen
        table = screen.query_one(TrialTable)
        assert table.row_count == 3
        assert table.statuses == {DEFAULTS: "feasible", FP8: "failed", BIG_BATCH: "feasible"}
        best = text_of(screen.query_one(BestPanel))
        assert "#3 seqs 512, batch 16384" in best
        assert "3,904 tok/s at concurrency 64" in best and "1.31x the defaults (2,980 tok/s)" in best
        phase = text_of(screen.query_one(PhasePanel))
        assert "winner #3 seqs 512, batch 16384" in best
        assert phase.startswith("finished: 3 launches in 10 min 08 s")
        assert "YAML   /srv/tune/out/best.yaml" in phase and "report /srv/tune/out/report.md" in phase
        assert OOM in screen.query_one(EventLog).plain  # the failure's reason, whole
        assert screen.query_one(TuneHeader).state == "finished"
        assert app.result == "done"
        assert not app.run_active
        assert app.check_action("stop_run", ()) is False  # "Stop run" has left the footer
        await pilot.press("q")  # nothing left to lose: no question
        assert not isinstance(app.screen, ConfirmScreen)
    assert app.cancel.is_set()


async def test_the_candidates_telemetry_arrives_from_the_tuners_sampler_once_it_exists() -> None:
    tuner = FakeTuner(run_script(), hold_after=MID_RUN)
    app = make_tune_app(tuner, clock=tuner.clock, redraw_interval_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until_held(pilot, tuner)
        await pilot.pause(0.15)  # past the redraw timer, which paints the latest reading
        screen = app.tune_screen
        card = screen.query_one(GpuCard)
        assert card.compact and card.sample is not None
        assert "62%" in text_of(card)  # the scripted DRAM bandwidth
        engine = text_of(screen.query_one(EngineLine))
        assert "running 64" in engine and "waiting 3" in engine and "KV cache 87.5%" in engine
        assert "4,012 tok/s" in engine
        phase = text_of(screen.query_one(PhasePanel))
        assert "#3 seqs 512, batch 16384" in phase
        assert "concurrency 80 · measure 40/64 requests" in phase and "62 % · 4,012 tok/s" in phase
        chart = screen.query_one(SloChart)
        assert chart.measuring == 80 and chart.trial is not None and chart.trial.key == BIG_BATCH
        chart_text = text_of(chart)
        assert "TTFT p95 ≤ 500 ms" in chart_text and "≥ 33.3 tok/s/user" in chart_text
        assert "710 ms" in chart_text and "×" in chart_text  # the failing concurrency 96, marked
        app.cancel.set()


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
        assert "stopped (interrupted)" in text_of(screen.query_one(PhasePanel))
        assert "1.31x" in text_of(screen.query_one(BestPanel))  # finished trials are kept


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
        assert not screen.query(GpuCard)
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
        tick = _phase(DEFAULTS, 1, 12, 95.0)
        screen.show_event(tick)
        assert panel.phase is None  # not yet: ticks may come hundreds of times a second
        await pilot.pause(0.25)
        assert panel.phase == tick


@pytest.mark.parametrize("moment", [MID_RUN, len(run_script())], ids=["mid_run", "finished"])
async def test_at_80x24_every_panel_is_on_screen_with_every_trial_row(moment: int) -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        feed(app, clock, run_script()[:moment])
        await pilot.pause()
        screen = app.tune_screen
        for widget in (TuneHeader, TrialTable, PhasePanel, BestPanel, SloChart, EngineLine, EventLog):
            region = screen.query_one(widget).region
            assert region.height > 0 and region.bottom <= 23, widget  # above the footer, nothing scrolled off
        table = screen.query_one(TrialTable)
        assert table.region.height >= 1 + table.row_count  # heading and all three trials
        assert screen.query_one(GpuCard).region.bottom <= 23


async def test_help_explains_the_columns_and_closes() -> None:
    app = make_tune_app(FakeTuner([]), autostart=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, TuneHelpScreen)
        await pilot.press("escape")
        assert app.screen is app.tune_screen


# --- appearance ---------------------------------------------------------------------------------------------------


def feed(app: TuneApp, clock: scripted.ManualClock, events: list[tuple[float, TuneEvent]]) -> None:
    """Show ``events`` on the UI thread with the screen's clock moving as scripted, plus the candidate's
    telemetry: deterministic, unlike the worker's timing."""
    screen = app.tune_screen
    sampler = make_sampler(clock)
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


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
@pytest.mark.parametrize("moment", ["mid_run", "finished"])
def test_tune_snapshot(snap_compare: Any, moment: str, size: tuple[int, int]) -> None:
    clock = scripted.ManualClock()
    app = make_tune_app(FakeTuner([]), autostart=False, clock=clock)
    script = run_script()
    events = script[:MID_RUN] if moment == "mid_run" else script

    async def run_before(pilot: Any) -> None:
        feed(app, clock, events)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)
