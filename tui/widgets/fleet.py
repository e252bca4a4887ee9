"""Other hosts beside the local GPUs: a line per host that opens onto its GPUs (`infertop --host URL`)."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui.widgets.engine_panel import EnginePanel
from tui.widgets.gpu_card import CARD_SERIES, GpuCard
from tuner.telemetry.energy import SnapshotWindow
from tuner.telemetry.remote import RemoteHost, summarise_host
from tuner.telemetry.sampler import History

NAME_W = 14
STATE_STYLE = {"ok": "green", "stale": "yellow", "down": "bold red", "waiting": "dim"}


def _kw(watts: float | None) -> str:
    return "n/a" if watts is None else f"{watts / 1000:.1f}"


class HostRow(Widget, can_focus=True):
    """One remote host in a line; Enter (or a click) opens its GPUs below it."""

    DEFAULT_CSS = """
    HostRow { height: 1; padding: 0 1; text-wrap: nowrap; text-overflow: clip; }
    HostRow:focus { background: $boost; }
    """

    BINDINGS = [Binding("enter", "open_host", "Open host", show=False)]

    host: reactive[RemoteHost | None] = reactive(None)
    """The latest of this host."""

    expanded: reactive[bool] = reactive(False)

    def __init__(self, host: RemoteHost, now_s: float, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.now_s = now_s
        self.host = host

    def show(self, host: RemoteHost, now_s: float) -> None:
        self.now_s = now_s
        self.host = host
        self.refresh()

    def action_open_host(self) -> None:
        self.expanded = not self.expanded

    def on_click(self) -> None:
        self.action_open_host()

    def render(self) -> RenderableType:
        h = self.host
        if h is None:
            return Text("")
        width = max(20, self.size.width)
        state = h.state(self.now_s)
        line = Text()
        line.append("▼ " if self.expanded else "▶ ", style="dim")
        line.append(f"{h.name[:NAME_W]:<{NAME_W}} ", style="bold" if state == "ok" else "dim")
        if h.snapshot is None:
            line.append(state, style=STATE_STYLE[state])
            if h.error:
                line.append(f"  {h.shown_url}: {h.error}", style="dim")
            line.truncate(width)
            return line
        s = summarise_host(h.info, h.snapshot)
        dim_all = state != "ok"
        if dim_all:  # first, so that even a narrow terminal shows it
            age = h.age_s(self.now_s)
            line.append(f"{state} {age:.0f}s " if age is not None else f"{state} ", style=STATE_STYLE[state])
        dim_from = len(line)
        model = (s.gpu_name.split() or ["?"])[0]  # "H100 80GB HBM3" -> "H100"
        line.append(f"{s.gpus}×{model[:5]:<5} ", style="dim")
        source = h.info.source if h.info is not None else "nvml"
        if source != "nvml":  # a simulated machine (exporter --simulate) or a replay says so
            line.append("SIM " if source == "scripted" else "REPLAY ", style="bold magenta")
        if s.dram_pct is not None:
            line.append("DRAM ", style="dim")
            line.append(f"{fmt.pct(s.dram_pct):>4} ", style="bold")
            spark_w = max(0, min(20, width - 76))
            if spark_w >= 4:
                line.append(fmt.pct_sparkline(h.bw_history, spark_w) + " ", style="cyan")
            line.append("SM ", style="dim")
            line.append(f"{fmt.pct(s.sm_pct):>4}", style="bold")
        else:
            line.append("util ", style="dim")
            line.append(f"{fmt.pct(s.duty_pct):>4} ", style="bold")
            line.append("duty", style="dim")
        vram = None if not s.vram_total_bytes else 100.0 * (s.vram_used_bytes or 0) / s.vram_total_bytes
        line.append(" VRAM ", style="dim")
        line.append(f"{fmt.pct(vram):>4}", style="bold")
        line.append(f" {_kw(s.power_w)}/{_kw(s.power_limit_w)} kW", style="bold")
        line.append(f" {fmt.celsius(s.max_temp_c)}", style="bold")
        if s.engines:
            line.append(f" {fmt.tokens_per_s(s.tokens_per_s)}", style="bold green")
        if s.throttled:
            line.append(f" !{s.throttled} throttled", style="bold red")
        if s.lost:
            line.append(f" !{s.lost} lost", style="bold red")
        if h.bad_fields:  # what its reading held that could not be read: shown n/a, and why
            word = "field" if h.bad_fields == 1 else "fields"
            why = f": {h.bad_field_reasons[0]}" if h.bad_field_reasons else ""
            line.append(f" ?{h.bad_fields} {word} n/a{why}", style="yellow")
        if dim_all:
            line.stylize("dim", dim_from)  # its last state, dimmed; the name and the state stay readable
        line.truncate(width)
        return line


class HostGroup(Vertical):
    """A host's line and, when open, its GPUs as compact cards (the same rows as the local GPUs) and its inference
    servers (the same panel as the local ones)."""

    DEFAULT_CSS = """
    HostGroup { height: auto; }
    HostGroup > GpuCard, HostGroup > EnginePanel { display: none; }
    HostGroup.open > GpuCard { display: block; }
    HostGroup.open > EnginePanel.attached { display: block; }
    HostGroup > EnginePanel { margin: 0 1; }
    """

    def __init__(self, host: RemoteHost, now_s: float, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.row = HostRow(host, now_s)
        self.history = History(maxlen=240)
        self.energy = SnapshotWindow()  # the host's readings of the last minute: its servers' J/token
        self.cards: dict[int, GpuCard] = {}
        self.engines: EnginePanel | None = None
        self._last_time_s: float | None = None

    def compose(self):  # type: ignore[no-untyped-def]
        yield self.row

    def on_mount(self) -> None:
        self.watch(self.row, "expanded", self._expanded)

    def _expanded(self, expanded: bool) -> None:
        self.set_class(expanded, "open")
        host = self.row.host
        if expanded and host is not None:
            self._update_cards(host)

    def show(self, host: RemoteHost, now_s: float) -> None:
        self.row.show(host, now_s)
        snap = host.snapshot
        if snap is not None and snap.time_s != self._last_time_s:
            self._last_time_s = snap.time_s
            self.history.add(snap)
            self.energy.add(snap)
        if self.row.expanded:
            self._update_cards(host)

    def _update_cards(self, host: RemoteHost) -> None:
        if host.info is None or host.snapshot is None:
            return
        if not self.cards:
            for info in host.info.gpus:
                card = GpuCard(info)
                card.compact = True
                card.readings_per_cell = 1  # remote hosts are read once a second
                self.cards[info.index] = card
            self.mount_all(self.cards.values())
            self.engines = EnginePanel()
            self.mount(self.engines)
        if self.engines is not None:
            # Its inference servers, as the local panel shows them: energy per token from the host's own
            # energy counters and token counters, on the GPUs its servers' processes hold.
            engines = host.snapshot.engines
            self.engines.set_class(bool(engines), "attached")
            power = {e.url: self.energy.power(e.url) for e in engines if e.error is None}
            gen = {e.url: self.history.engine_series(e.url, "generation_tokens_per_s") for e in engines}
            self.engines.show(engines, gen, power)
        for sample in host.snapshot.gpus:
            shown = self.cards.get(sample.index)
            if shown is not None:
                series = {
                    n: self.history.gpu_series(sample.index, n, shown.history_needed) for n in CARD_SERIES
                }
                shown.show(sample, series)


class FleetPanel(VerticalScroll):
    """Every remote host, a line each, in the order given."""

    DEFAULT_CSS = """
    FleetPanel {
        height: auto;
        max-height: 60%;
        border: round $primary 60%;
        border-title-color: $text;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.groups: dict[str, HostGroup] = {}

    def show(self, hosts: tuple[RemoteHost, ...], now_s: float) -> None:
        new = [h for h in hosts if h.url not in self.groups]
        for h in new:
            self.groups[h.url] = HostGroup(h, now_s)
        if new:
            self.mount_all(self.groups[h.url] for h in new)
        for h in hosts:
            self.groups[h.url].show(h, now_s)
        ok = sum(1 for h in hosts if h.state(now_s) == "ok")
        gpus = sum(len(h.snapshot.gpus) for h in hosts if h.snapshot is not None)
        self.border_title = f"Fleet · {ok}/{len(hosts)} hosts answering · {gpus} GPUs"
        self.border_subtitle = "Enter opens a host"
