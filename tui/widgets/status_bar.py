"""The top line: what is being watched, from where, how often, and whether it is recording or paused."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tuner.telemetry.model import SystemInfo


class StatusBar(Widget):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $primary-background; color: $text; padding: 0 1; }
    """

    info: reactive[SystemInfo | None] = reactive(None)
    """What the GPU source found at start-up."""

    rate_hz: reactive[float] = reactive(4.0)
    """Sampling rate."""

    paused: reactive[bool] = reactive(False)
    """Sampling paused by the user."""

    recording_to: reactive[str | None] = reactive(None)
    """File name while recording."""

    replay_position_s: reactive[float | None] = reactive(None)
    """Seconds into a replayed recording."""

    def render(self) -> RenderableType:
        line = Text()
        line.append("infertop", style="bold")
        info = self.info
        if info is not None and info.label:
            line.append(f"  {info.label}", style="bold magenta")
        if info is not None:
            if info.driver_version:
                line.append(f"  driver {info.driver_version}", style="dim")
            if info.cuda_driver_version:
                line.append(f"  CUDA {info.cuda_driver_version}", style="dim")
            n = len(info.gpus)
            if n:
                line.append(f"  {n} GPU{'s' if n != 1 else ''}", style="dim")
            if info.source.startswith("replay"):
                line.append(f"  ▶ {info.source}", style="bold magenta")
                if self.replay_position_s is not None:
                    line.append(f" {self.replay_position_s:5.0f} s", style="magenta")
        if self.rate_hz > 0:
            line.append(f"  {self.rate_hz:g} Hz", style="dim")
        if self.recording_to:
            line.append(f"  ● REC {self.recording_to}", style="bold red")
        if self.paused:
            line.append("  ‖ PAUSED", style="bold yellow")
        line.truncate(max(1, self.size.width))
        return line
