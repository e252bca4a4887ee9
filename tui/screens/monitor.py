"""The monitor: status line, host bar, a card per GPU, the vLLM panel and the GPU process table."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer

from tui.messages import GpusFound, ReplayEnded, SnapshotTaken
from tui.widgets.banner import HINTS, StateBanner
from tui.widgets.engine_panel import EnginePanel
from tui.widgets.fleet import FleetPanel
from tui.widgets.gpu_card import CARD_SERIES, GpuCard
from tui.widgets.host_bar import HostBar
from tui.widgets.process_table import ProcessTable
from tui.widgets.status_bar import StatusBar
from tuner.telemetry.energy import SnapshotWindow
from tuner.telemetry.model import GpuProcess, GpuState, Snapshot, SystemInfo
from tuner.telemetry.remote import RemoteWatcher
from tuner.telemetry.sampler import History

FULL_CARD_ROWS = 8
RESERVED_ROWS = 12  # status, host, footer, engine panel and a few process rows


class MonitorScreen(Screen[None]):
    """Live view of the machine. Receives snapshots as messages; never reads hardware itself."""

    DEFAULT_CSS = """
    MonitorScreen { layout: vertical; }
    #gpus { height: auto; max-height: 70%; }
    #gpus.compact { border: round $primary 60%; border-title-color: $text; }
    #engines { display: none; }
    #engines.attached { display: block; }
    #fleet { display: none; }
    #fleet.shown { display: block; }
    #banner { display: none; }
    #banner.shown { display: block; }
    """

    BINDINGS = [
        Binding("c", "toggle_compact", "Compact"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse", show=False),
    ]

    def __init__(
        self, history: History, *, redraw_interval_s: float = 0.5, remote: RemoteWatcher | None = None
    ) -> None:
        super().__init__()
        self.history = history
        self.remote = remote  # other hosts' exporters (--host), read on their own threads
        self.redraw_interval_s = redraw_interval_s
        self._pending: Snapshot | None = None
        self.info: SystemInfo | None = None
        self.cards: dict[int, GpuCard] = {}
        self.compact_forced: bool | None = None  # None = decide from the terminal size
        self.last_snapshot: Snapshot | None = None
        self.energy_window = SnapshotWindow()  # every reading of the last minute: energy per token

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield HostBar(id="host")
        yield StateBanner(id="banner")
        yield VerticalScroll(id="gpus")
        yield FleetPanel(id="fleet")
        yield EnginePanel(id="engines")
        yield ProcessTable(id="processes")
        yield Footer()

    # --- messages ------------------------------------------------------------------------------------

    def on_gpus_found(self, message: GpusFound) -> None:
        self.show_system(message.info)

    def show_system(self, info: SystemInfo) -> None:
        self.info = info
        self.query_one(StatusBar).info = info
        container = self.query_one("#gpus", VerticalScroll)
        container.remove_children()
        self.cards = {g.index: GpuCard(g, id=f"gpu-{g.index}") for g in info.gpus}
        if self.cards:
            container.mount_all(self.cards.values())
        if info.state is not GpuState.OK:
            self.show_banner(f"! {info.message}\n{HINTS.get(info.state, '')}".rstrip(), error=False)
        self._apply_compact()

    def show_banner(self, text: str, *, error: bool) -> None:
        banner = self.query_one(StateBanner)
        banner.update(Text(text))  # NVML's and a recording's words, never read as markup ([@click=...])
        banner.set_class(True, "shown")
        banner.set_class(error, "error")

    def on_mount(self) -> None:
        # Redraws are paced separately from sampling: every reading still lands in the history (sparklines),
        # but the screen is repainted at most this often, which is where most of the CPU goes (BENCHMARKS.md).
        self.set_interval(self.redraw_interval_s, self._redraw_pending)
        if self.remote is not None and self.remote.urls:
            self.query_one(FleetPanel).set_class(True, "shown")
            self.show_fleet()
            self.set_interval(self.remote.interval_s, self.show_fleet)

    def show_fleet(self) -> None:
        """The remote hosts' latest readings (taken on their own threads: this never waits on a host)."""
        if self.remote is not None:
            self.query_one(FleetPanel).show(self.remote.latest(), self.remote.clock())

    def on_snapshot_taken(self, message: SnapshotTaken) -> None:
        self.energy_window.add(message.snapshot)
        if self.last_snapshot is None:
            self.show_snapshot(message.snapshot)  # the first reading at once
        else:
            self._pending = message.snapshot

    def _redraw_pending(self) -> None:
        if self._pending is not None:
            snap, self._pending = self._pending, None
            self.show_snapshot(snap)

    def show_snapshot(self, snap: Snapshot) -> None:
        self.last_snapshot = snap
        if "replay_position_s" in snap.extra:
            self.query_one(StatusBar).replay_position_s = snap.extra["replay_position_s"]
        if snap.host is not None:
            host = self.query_one(HostBar)
            host.dcgm_status = snap.dcgm_status
            host.show(snap.host, self.history.host_cpu_series())
        for sample in snap.gpus:
            card = self.cards.get(sample.index)
            if card is not None:
                series = {
                    name: self.history.gpu_series(sample.index, name, card.history_needed)
                    for name in CARD_SERIES
                }
                card.show(sample, series)
        if snap.gpu_error:
            self.show_banner(
                f"! GPU telemetry stopped: {snap.gpu_error}. Last readings kept; host telemetry is live.",
                error=True,
            )
        engines = self.query_one(EnginePanel)
        engines.set_class(bool(snap.engines), "attached")
        if snap.engines or engines.engines:
            gen = {e.url: self.history.engine_series(e.url, "generation_tokens_per_s") for e in snap.engines}
            power = {e.url: self.energy_window.power(e.url) for e in snap.engines if e.error is None}
            engines.show(snap.engines, gen, power)
        procs: list[GpuProcess] = []
        for sample in snap.gpus:
            procs.extend(sample.processes or ())
        self.query_one(ProcessTable).set_processes(procs)

    def on_replay_ended(self, message: ReplayEnded) -> None:
        self.notify("End of recording. Press q to quit.", timeout=10)

    # --- layout --------------------------------------------------------------------------------------

    def on_resize(self) -> None:
        self._apply_compact()

    def _apply_compact(self) -> None:
        if self.compact_forced is not None:
            compact = self.compact_forced
        else:
            fleet = len(self.remote.urls) + 2 if self.remote is not None and self.remote.urls else 0
            compact = len(self.cards) * FULL_CARD_ROWS > max(0, self.size.height - RESERVED_ROWS - fleet)
        container = self.query_one("#gpus", VerticalScroll)
        container.set_class(compact and bool(self.cards), "compact")
        container.border_title = "GPUs" if compact else None
        for card in self.cards.values():
            card.compact = compact

    @property
    def compact(self) -> bool:
        return any(card.compact for card in self.cards.values())

    # --- actions -------------------------------------------------------------------------------------

    def action_toggle_compact(self) -> None:
        self.compact_forced = not self.compact
        self._apply_compact()

    def action_cycle_sort(self) -> None:
        key = self.query_one(ProcessTable).cycle_sort()
        self.notify(f"processes sorted by {key}", timeout=2)

    def action_reverse_sort(self) -> None:
        self.query_one(ProcessTable).reverse_sort()
