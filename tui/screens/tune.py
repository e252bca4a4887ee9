"""Watch a tuning run: the trials so far, the phase under way, the best result, and the node's GPUs.

The screen folds the tuner's events (:mod:`tuner.tuning.events`, arriving as :class:`TuneEventReceived`) into a
:class:`~tui.tune_state.TuneRun` and shows it; it never drives the search. Several trials may run at once, one
per slot of the node: the trial table has a row for each, the node strip shows which holds which GPU, and the
"current trial" panel and the chart follow the trial active last, or the one selected in the table. Telemetry
arrives as the monitor's :class:`SnapshotTaken`, repainted at most every ``redraw_interval_s`` like the
monitor. Times on screen come from the injected ``clock``, so tests and screenshots freeze them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tui.messages import SnapshotTaken
from tui.tune_messages import TelemetryAttached, TuneEventReceived, TuneRunEnded
from tui.tune_state import TrialView, TuneRun, gpu_list
from tui.widgets.best_panel import BestPanel
from tui.widgets.engine_line import EngineLine
from tui.widgets.event_log import EventLog, describe, describe_error
from tui.widgets.host_bar import HostBar
from tui.widgets.node_strip import NodeStrip
from tui.widgets.phase_panel import PhasePanel
from tui.widgets.slo_chart import SloChart
from tui.widgets.trial_table import TrialTable
from tui.widgets.tune_header import TuneHeader
from tuner.telemetry.model import EngineSample, GpuSample, GpuState, Snapshot, SystemInfo
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
    TuneScreen NodeStrip { display: none; }
    TuneScreen NodeStrip.shown { display: block; }
    TuneScreen #log {
        height: 1fr;
        min-height: 3;
        border: round $primary 60%;
        border-title-color: $text;
        border-title-style: bold;
    }
    TuneScreen.node #telemetry { max-height: 13; }  /* the server's line and a line per GPU of eight, wide */
    TuneScreen.short #telemetry { max-height: 5; }
    /* A node of several GPUs on a short terminal: its grid (four rows for eight GPUs) takes the telemetry's
       place whole, under a top border only, and so does the log; the candidate server's line gives way. */
    TuneScreen.short.node #telemetry { border: none; border-top: round $primary 60%; max-height: 5; }
    TuneScreen.short.node EngineLine { display: none; }
    TuneScreen.short.node #log { border: none; border-top: round $primary 60%; min-height: 2; }
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
        self.gpus: tuple[int, ...] = ()  # the GPUs the sampler reads
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
            yield NodeStrip(id="node")
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

    @property
    def shown_trial(self) -> TrialView | None:
        """The trial the "current trial" panel and the chart show: the one selected in the trial table, else
        the running trial active last, else the last one."""
        selected = self.query_one(TrialTable).selected_key
        if selected is not None and selected in self.run.trials:
            return self.run.trials[selected]
        return self.run.last

    def on_data_table_row_highlighted(self, message: DataTable.RowHighlighted) -> None:
        # The cursor moved (the operator, or the table following a new row): show the trial it picked.
        self.show_run()

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
        self.query_one(TrialTable).show(run.trials.values())
        selected = self.query_one(TrialTable).selected_key
        shown = self.shown_trial
        key = shown.key if shown is not None else None
        self._show_clock()
        phase = self.query_one(PhasePanel)
        phase.trial = shown
        phase.selected = selected is not None and shown is not None and selected == shown.key
        phase.phase = run.phase_of(key) if shown is not None and shown.running else None
        phase.repeated = run.repeats.get(key) if key is not None else None
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
        chart.trial = run.chart_trial_for(selected if selected in run.trials else None)
        chart.measuring = run.measuring_on(chart.trial.key) if chart.trial is not None else None
        self._show_node()

    def _show_node(self) -> None:
        """Who holds each of the node's GPUs; the strip is shown once there are GPUs to show."""
        run = self.run
        strip = self.query_one(NodeStrip)
        strip.slots = run.node_slots(self.gpus)
        has_node = bool(strip.slots) and (self.info is None or self.info.state is GpuState.OK)
        strip.set_class(has_node, "shown")
        self.set_class(has_node and len(strip.slots) > 1, "node")
        telemetry = self.query_one("#telemetry")
        if has_node:
            busy = sum(1 for slot in strip.slots if not slot.idle)
            parallel = run.started.parallel if run.started is not None else 1
            slots = f" · {parallel} at once" if parallel > 1 else ""
            telemetry.border_title = (
                f"node · GPU {gpu_list(tuple(s.gpu for s in strip.slots))} · {busy} busy{slots}"
            )
        else:
            telemetry.border_title = "candidate telemetry"

    def _show_clock(self) -> None:
        elapsed = self.elapsed_s
        header = self.query_one(TuneHeader)
        header.elapsed_s = None if elapsed is None else int(elapsed)
        eta = self.run.eta_s(self.clock())
        header.eta_s = None if eta is None else int(eta)
        shown = self.shown_trial
        waiting = None
        if (
            shown is not None
            and shown.running
            and shown.server_url is None
            and shown.started_at_s is not None
        ):
            waiting = int(self.clock() - shown.started_at_s)
        self.query_one(PhasePanel).waiting_s = waiting

    # --- telemetry -----------------------------------------------------------------------------------

    def on_telemetry_attached(self, message: TelemetryAttached) -> None:
        self.attach_telemetry(message.info, message.history)

    def attach_telemetry(self, info: SystemInfo, history: History) -> None:
        """The sampler's machine and history: the node's GPUs, or a line saying why there are none."""
        self.info = info
        self.history = history
        no_gpu = info.state is not GpuState.OK or not info.gpus
        self.gpus = () if no_gpu else tuple(g.index for g in info.gpus)
        self.query_one("#no-gpu", Static).update(
            f"no GPU telemetry: {info.message or 'no GPU'}" if no_gpu else ""
        )
        self.query_one("#no-gpu").set_class(no_gpu, "shown")
        # Without GPUs (the CPU build of vLLM) the host's CPU is what runs the model: show it instead.
        self.query_one(HostBar).set_class(no_gpu, "shown")
        self._show_node()

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
        strip = self.query_one(NodeStrip)
        if history is not None:
            strip.show(snap.gpus, {s.index: self._bandwidth_series(history, s) for s in snap.gpus})
        if snap.host is not None and history is not None:
            self.query_one(HostBar).show(snap.host, history.host_cpu_series())
        engine = self._candidate_engine(snap.engines)
        gen = history.engine_series(engine.url, "generation_tokens_per_s") if engine and history else []
        line = self.query_one(EngineLine)
        shown = self.shown_trial
        if shown is None or not shown.running:
            line.note = "no candidate server running"
        elif shown.server_url is None:
            line.note = "the candidate server is starting"
        else:
            line.note = f"no /metrics reading from {shown.server_url} yet"
        line.show(engine, gen)

    @staticmethod
    def _bandwidth_series(history: History, sample: GpuSample) -> list[float | None]:
        """A GPU's recent DRAM bandwidth, or its memory duty cycle where there is no bandwidth counter."""
        if sample.dram_bw_util_pct is not None:
            name = "dram_bw_util_pct"
        else:
            name = "dram_bw_est_pct" if sample.dram_bw_est_pct is not None else "mem_busy_pct"
        return history.gpu_series(sample.index, name, 4 * 30)

    def _candidate_engine(self, engines: tuple[EngineSample, ...]) -> EngineSample | None:
        """The shown trial's server among those the sampler reads (it may also see other servers)."""
        trial = self.shown_trial
        if trial is None or not trial.running or trial.server_url is None:
            return None
        url = trial.server_url.rstrip("/")
        for engine in engines:
            # The tuner may give the API base (".../v1") while the sampler scrapes the server root.
            base = engine.url.rstrip("/")
            if url == base or url.startswith(base + "/"):
                return engine
        return None
