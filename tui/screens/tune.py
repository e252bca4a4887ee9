"""Watch a tuning run: the trials so far, the phase under way, the best result, and the candidate's telemetry.

The screen folds the tuner's events (:mod:`tuner.tuning.events`, arriving as :class:`TuneEventReceived`) into a
:class:`~tui.tune_state.TuneRun` and shows it; it never drives the search. Telemetry of the candidate server
arrives as the monitor's :class:`SnapshotTaken`, repainted at most every ``redraw_interval_s`` like the
monitor. Times on screen come from the injected ``clock``, so tests and screenshots freeze them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from tui.messages import SnapshotTaken
from tui.tune_messages import TelemetryAttached, TuneEventReceived, TuneRunEnded
from tui.tune_state import TuneRun
from tui.widgets.best_panel import BestPanel
from tui.widgets.engine_line import EngineLine
from tui.widgets.event_log import EventLog, describe, describe_error
from tui.widgets.gpu_card import CARD_SERIES, GpuCard
from tui.widgets.host_bar import HostBar
from tui.widgets.phase_panel import PhasePanel
from tui.widgets.slo_chart import SloChart
from tui.widgets.trial_table import TrialTable
from tui.widgets.tune_header import TuneHeader
from tuner.telemetry.model import EngineSample, GpuState, Snapshot, SystemInfo
from tuner.telemetry.sampler import History
from tuner.tuning.events import PhaseProgressed, TrialFinished, TuneEvent

SHORT_HEIGHT = (
    28  # below this many rows (80x24): tighter caps and no divider, so every panel stays on screen;
)
# once the run is over, the chart and telemetry make way for the verdict


class TuneScreen(Screen[None]):
    """Live view of one tuning run. Receives events and snapshots as messages; reads nothing itself."""

    DEFAULT_CSS = """
    TuneScreen { layout: vertical; }
    TuneScreen #middle { height: auto; }
    TuneScreen #now {
        width: 1fr;
        height: auto;
        border: round $primary 60%;
        border-title-color: $text;
        border-title-style: bold;
        padding: 0 1;
    }
    TuneScreen #best { border-top: solid $primary 30%; }
    TuneScreen.short #best { border-top: none; }
    TuneScreen SloChart { width: 1fr; height: 100%; }
    TuneScreen.short TrialTable { max-height: 6; }
    TuneScreen #telemetry {
        height: auto;
        max-height: 8;
        border: round $primary 60%;
        border-title-color: $text;
        border-title-style: bold;
    }
    TuneScreen #no-gpu { display: none; padding: 0 1; color: $text-muted; }
    TuneScreen #no-gpu.shown { display: block; }
    TuneScreen HostBar { display: none; background: transparent; }
    TuneScreen HostBar.shown { display: block; }
    TuneScreen #gpus { height: auto; }
    TuneScreen #log {
        height: 1fr;
        min-height: 3;
        border: round $primary 60%;
        border-title-color: $text;
        border-title-style: bold;
    }
    TuneScreen.short #telemetry { max-height: 5; }
    /* A short terminal once the run is over: the verdict and the files need the room. The chart gives way
       (the trial table keeps the winner's numbers), and so does the telemetry, whose readings stopped with
       the tuner. */
    TuneScreen.short.ended #telemetry { display: none; }
    TuneScreen.short.ended SloChart { display: none; }
    TuneScreen.short.ended BestPanel { min-height: 2; }
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, redraw_interval_s: float = 0.5
    ) -> None:
        super().__init__()
        self.clock = clock
        self.redraw_interval_s = redraw_interval_s
        self.run = TuneRun()
        self.stopping = False  # the user asked the run to stop; waiting for the tuner to wind down
        self.ended = False  # the tuner's run() returned or raised
        self.info: SystemInfo | None = None
        self.history: History | None = None
        self.cards: dict[int, GpuCard] = {}
        self.last_snapshot: Snapshot | None = None
        self._pending: Snapshot | None = None
        self._progress_pending = False
        self._phase_of_run = (False, True)

    def compose(self) -> ComposeResult:
        yield TuneHeader(id="header")
        yield TrialTable(id="trials")
        with Horizontal(id="middle"):
            with Vertical(id="now"):
                yield PhasePanel(id="phase")
                yield BestPanel(id="best")
            yield SloChart(id="chart")
        with VerticalScroll(id="telemetry"):
            yield EngineLine(id="engine")
            yield Static(id="no-gpu")
            yield HostBar(id="host")
            yield Vertical(id="gpus")
        yield EventLog(id="log")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#now").border_title = "current trial"
        self.query_one("#telemetry").border_title = "candidate telemetry"
        self.query_one("#log").border_title = "events"
        self.set_interval(self.redraw_interval_s, self._redraw_pending)
        self.show_run()

    def on_resize(self) -> None:
        short = self.size.height < SHORT_HEIGHT
        self.set_class(short, "short")
        self.query_one(BestPanel).room = 3 if short else 4  # at 80x24 every row is spoken for

    # --- tuner events --------------------------------------------------------------------------------

    def on_tune_event_received(self, message: TuneEventReceived) -> None:
        self.show_event(message.event)

    def show_event(self, event: TuneEvent) -> None:
        """Fold one event into the run and show it. Progress ticks are repainted on the redraw timer."""
        self.run.apply(event, self.clock())
        index = {key: t.index for key, t in self.run.trials.items() if t.index is not None}
        line = describe(event, index)
        if line is not None:
            failed = isinstance(event, TrialFinished) and event.status in ("failed", "infeasible")
            self.query_one(EventLog).add(self.elapsed_s, line, whole=failed)
        if isinstance(event, PhaseProgressed):
            self._progress_pending = True  # may come hundreds of times a second under load
        else:
            self.show_run()

    def on_tune_run_ended(self, message: TuneRunEnded) -> None:
        self.ended = True
        if message.error is not None:
            self.run.fail(message.error)
            self.query_one(EventLog).add(self.elapsed_s, describe_error(message.error), whole=True)
        self.show_run()

    def set_stopping(self) -> None:
        """The user asked the run to stop: say so until the tuner has wound down."""
        self.stopping = True
        self.show_run()

    @property
    def elapsed_s(self) -> float | None:
        if self.run.finished is not None:
            return self.run.finished.wall_s
        if self.run.started_at_s is None:
            return None
        return self.clock() - self.run.started_at_s

    @property
    def state(self) -> str:
        """What the header says the run is doing."""
        run = self.run
        if run.error is not None:
            return "crashed"
        if run.finished is not None:
            return "stopped" if run.finished.stopped else "finished"
        if self.ended:
            return "stopped"
        if self.stopping:
            return "stopping"
        return "running" if run.started is not None else "waiting"

    def show_run(self) -> None:
        """Push the run's state into the widgets (reactives repaint only what changed)."""
        run = self.run
        self._progress_pending = False
        self.set_class(not run.active or self.ended, "ended")
        header = self.query_one(TuneHeader)
        header.started = run.started
        header.launches_used = run.launches_used
        header.state = self.state
        header.verdict = run.finished.verdict if run.finished else None
        header.exit_code = run.finished.exit_code if run.finished else None
        self._show_clock()
        self.query_one(TrialTable).show(run.trials.values())
        phase = self.query_one(PhasePanel)
        phase.trial = run.last
        phase.phase = run.phase
        phase.repeated = run.repeated
        phase.finished = run.finished
        phase.error = run.error
        self.query_one("#now").border_title = "current trial" if run.active else "result"
        best = self.query_one(BestPanel)
        best.best = run.best
        best.final = run.finished is not None and not run.finished.stopped  # a completed search: the winner
        phase_of_run = (run.started is not None, run.active)
        if phase_of_run != self._phase_of_run:
            self._phase_of_run = phase_of_run
            self.app.refresh_bindings()  # "Stop run" shows only while there is a run to stop
        chart = self.query_one(SloChart)
        chart.limits = run.limits
        chart.trial = run.chart_trial
        chart.measuring = run.measuring if run.chart_trial is run.current else None

    def _show_clock(self) -> None:
        elapsed = self.elapsed_s
        self.query_one(TuneHeader).elapsed_s = None if elapsed is None else int(elapsed)
        current = self.run.current
        waiting = None
        if current is not None and current.server_url is None and current.started_at_s is not None:
            waiting = int(self.clock() - current.started_at_s)
        self.query_one(PhasePanel).waiting_s = waiting

    # --- telemetry -----------------------------------------------------------------------------------

    def on_telemetry_attached(self, message: TelemetryAttached) -> None:
        self.attach_telemetry(message.info, message.history)

    def attach_telemetry(self, info: SystemInfo, history: History) -> None:
        """The sampler's machine and history: a compact row per GPU, or a line saying why there is none."""
        self.info = info
        self.history = history
        container = self.query_one("#gpus", Vertical)
        container.remove_children()
        self.cards = {g.index: GpuCard(g, id=f"tune-gpu-{g.index}") for g in info.gpus}
        for card in self.cards.values():
            card.compact = True
        if self.cards:
            container.mount_all(self.cards.values())
        no_gpu = info.state is not GpuState.OK or not info.gpus
        self.query_one("#no-gpu", Static).update(
            f"no GPU telemetry: {info.message or 'no GPU'}" if no_gpu else ""
        )
        self.query_one("#no-gpu").set_class(no_gpu, "shown")
        # Without GPUs (the CPU build of vLLM) the host's CPU is what runs the model: show it instead.
        self.query_one(HostBar).set_class(no_gpu, "shown")

    def on_snapshot_taken(self, message: SnapshotTaken) -> None:
        if self.last_snapshot is None:
            self.show_snapshot(message.snapshot)  # the first reading at once
        else:
            self._pending = message.snapshot

    def _redraw_pending(self) -> None:
        self._show_clock()
        if self._progress_pending:
            self.show_run()
        if self._pending is not None:
            snap, self._pending = self._pending, None
            self.show_snapshot(snap)

    def show_snapshot(self, snap: Snapshot) -> None:
        """Show one reading of the machine and of the candidate server."""
        self.last_snapshot = snap
        history = self.history
        for sample in snap.gpus:
            card = self.cards.get(sample.index)
            if card is not None and history is not None:
                card.show(
                    sample,
                    {
                        name: history.gpu_series(sample.index, name, card.history_needed)
                        for name in CARD_SERIES
                    },
                )
        if snap.host is not None and history is not None:
            self.query_one(HostBar).show(snap.host, history.host_cpu_series())
        engine = self._candidate_engine(snap.engines)
        gen = history.engine_series(engine.url, "generation_tokens_per_s") if engine and history else []
        line = self.query_one(EngineLine)
        current = self.run.current
        if current is None:
            line.note = "no candidate server running"
        elif current.server_url is None:
            line.note = "the candidate server is starting"
        else:
            line.note = f"no /metrics reading from {current.server_url} yet"
        line.show(engine, gen)

    def _candidate_engine(self, engines: tuple[EngineSample, ...]) -> EngineSample | None:
        """The running candidate's server among those the sampler reads (it may also see other servers)."""
        trial = self.run.current
        if trial is None or trial.server_url is None:
            return None
        url = trial.server_url.rstrip("/")
        for engine in engines:
            # The tuner may give the API base (".../v1") while the sampler scrapes the server root.
            base = engine.url.rstrip("/")
            if url == base or url.startswith(base + "/"):
                return engine
        return None
