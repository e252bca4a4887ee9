"""The tune screen's top lines: what is tuned on what, against which SLO, how far the run has got."""

from __future__ import annotations

import math
import re

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import tune_format as tfmt
from tuner.tuning.events import TuneStarted

_TPOT_ALIAS = re.compile(r" \(TPOT [^)]*\)")


def spread(left: Text, right: Text, width: int) -> Text:
    """``left`` flush left and ``right`` flush right on one line; ``left`` is cut when both do not fit."""
    room = width - right.cell_len - 2
    line = left.copy()
    if room < 8:  # too narrow for both: the left part matters more
        line.truncate(width, overflow="ellipsis")
        return line
    line.truncate(room, overflow="ellipsis")
    line.append(" " * (width - line.cell_len - right.cell_len))
    line.append_text(right)
    return line


def eta_text(seconds: float | None) -> str:
    """The time a run still needs, as coarse as an estimate is: ``"14 min"``, ``"1 h 05 min"``, ``"<1 min"``;
    ``"?"`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return "<1 min"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TuneHeader(Widget):
    """Two lines: model, launches, elapsed time, the time left and the run's state; then the SLO and the
    hardware (with how many trials run at once)."""

    DEFAULT_CSS = """
    TuneHeader {
        height: 2;
        background: $primary-background;
        color: $text;
        padding: 0 1;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    started: reactive[TuneStarted | None] = reactive(None)
    """What the run tunes, on what, against which SLO."""

    launches_used: reactive[int] = reactive(0)
    """vLLM servers launched so far (a launch is the expensive step)."""

    elapsed_s: reactive[int | None] = reactive(None)
    """Whole seconds since the run started (whole, so the header repaints once a second at most)."""

    eta_s: reactive[int | None] = reactive(None)
    """Whole seconds the run is expected to go on (the tuner's latest estimate, counted down); None: unknown."""

    state: reactive[str] = reactive("waiting")
    """"waiting", "running", "stopping", "finished", "stopped" or "crashed"."""

    verdict: reactive[str | None] = reactive(None)
    """How a finished run was judged (``TuneFinished.verdict``: "proven", "backed_off", "not_proven",
    "unverified"), None before the end or without a verdict."""

    exit_code: reactive[int | None] = reactive(None)
    """The finished run's exit status (0: a configuration was proven or exported), None before the end."""

    def render(self) -> RenderableType:
        width = max(20, self.size.width)
        title = Text("infertop tune", style="bold")
        ev = self.started
        if ev is None:
            title.append("  waiting for the tuner to start…", style="dim")
            return title
        progress = Text()
        progress.append("launches ", style="dim")
        progress.append(f"{self.launches_used}/{ev.launch_budget}", style="bold")
        progress.append("  elapsed ", style="dim")
        progress.append(tfmt.duration(self.elapsed_s), style="bold")
        if self.state in ("running", "stopping"):
            progress.append("  ETA ", style="dim")
            progress.append(eta_text(self.eta_s), style="bold" if self.eta_s is not None else "dim")
        progress.append("  ")
        progress.append(*self._state_badge())
        # What gives way when the line is short: the model's organisation, then the app's name.
        model = ev.model
        if title.cell_len + 2 + len(model) + 2 + progress.cell_len > width:
            model = model.rstrip("/").rsplit("/", 1)[-1]
        if title.cell_len + 2 + len(model) + 2 + progress.cell_len > width:
            title = Text()
        title.append(f"  {model}" if title else model, style="bold magenta")
        text = ev.slo
        resumed = f" · resumed {ev.resumed_trials} trials" if ev.resumed_trials else ""
        # ... and on the second: the per-user floor restated as TPOT, then "NVIDIA", then the hardware.
        hardware = ev.hardware + (f" · {ev.parallel} at once" if ev.parallel > 1 else "")
        if 4 + len(text) + len(resumed) + 2 + len(hardware) > width:
            text = _TPOT_ALIAS.sub("", text)
        if 4 + len(text) + len(resumed) + 2 + len(hardware) > width:
            hardware = hardware.replace("NVIDIA ", "")
        if 4 + len(text) + len(resumed) + 2 + len(hardware) > width:
            hardware = ""  # the telemetry panel names the GPUs too
        slo = Text.assemble(("SLO ", "dim"), text, (resumed, "dim"))
        first = spread(title, progress, width)
        return Text("\n").join([first, spread(slo, Text(hardware, style="dim"), width)])

    def _state_badge(self) -> tuple[str, str]:
        if self.state == "finished":
            verdicts = {
                "proven": ("✓ PROVEN", "bold green"),
                "backed_off": ("✓ PROVEN AFTER BACKING OFF", "bold green"),
                "not_proven": ("✗ NOT PROVEN", "bold red"),
                "unverified": ("finished · UNVERIFIED", "bold yellow"),
            }
            if self.verdict in verdicts:
                return verdicts[self.verdict]
            if self.exit_code:  # no configuration met the SLO
                return ("✗ finished: no configuration", "bold red")
        return {
            "running": ("● running", "bold cyan"),
            "stopping": ("■ stopping… (stopping the vLLM server)", "bold yellow"),
            "finished": ("✓ finished", "bold green"),
            "stopped": ("■ stopped", "bold yellow"),
            "crashed": ("! tuner error", "bold red"),
        }.get(self.state, (self.state, "dim"))
