"""One line about the host: CPU, RAM and load, so a starved CPU is never mistaken for a slow GPU; then DCGM, where
it runs (what it gives the GPU cards, or why nothing)."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tuner.telemetry.model import HostSample


class HostBar(Widget):
    DEFAULT_CSS = """
    HostBar { height: 1; padding: 0 1; background: $boost; }
    """

    sample: reactive[HostSample | None] = reactive(None)
    """The latest host reading."""

    dcgm_status: reactive[str | None] = reactive(None)
    """DCGM as the sampler finds it (where bandwidth on GPUs without GPM comes from, or why not); None: no DCGM."""

    cpu_history: list[float | None]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cpu_history = []

    def watch_dcgm_status(self, status: str | None) -> None:
        self.tooltip = status  # in full: the line may cut it

    def show(self, sample: HostSample, cpu_history: list[float | None]) -> None:
        self.cpu_history = cpu_history
        self.sample = sample

    def render(self) -> RenderableType:
        s = self.sample
        if s is None:
            return Text("host: reading…", style="dim")
        line = Text()
        line.append(s.hostname, style="bold")
        line.append("  CPU ", style="dim")
        line.append(fmt.pct(s.cpu_pct).rjust(4), style="bold red" if (s.cpu_pct or 0) > 90 else "bold")
        if s.cpu_count:
            line.append(f" of {s.cpu_count} cores ", style="dim")
        line.append(fmt.sparkline(self.cpu_history, 10, hi=100.0), style="cyan")
        line.append("  RAM ", style="dim")
        line.append(f"{fmt.gib(s.ram_used_bytes)} / {fmt.gib(s.ram_total_bytes)}", style="bold")
        if s.load_avg_1m is not None:
            line.append("  load ", style="dim")
            line.append(" ".join(fmt.number(v, 2) for v in (s.load_avg_1m, s.load_avg_5m, s.load_avg_15m)))
        if self.dcgm_status:
            line.append("  DCGM ", style="dim")
            line.append(self.dcgm_status.removeprefix("DCGM ").removeprefix("DCGM: "))  # text, never markup
        line.truncate(max(1, self.size.width))
        return line
