"""The last things the tuner reported, newest at the bottom, each stamped with the run's elapsed time."""

from __future__ import annotations

from collections import deque

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui import tune_format as tfmt
from tui.tune_state import PROOF_KEY, gpu_list, user_tok_s
from tuner.tuning.events import (
    BestChanged,
    EtaUpdated,
    PhaseMeasured,
    PhaseRepeated,
    ServerReady,
    TrialFinished,
    TrialStarted,
    TuneEvent,
    TuneFinished,
    TuneStarted,
    VerdictReached,
)

MAX_LINES = 200


def describe(event: TuneEvent, index: dict[str, int]) -> Text | None:
    """One line for the log, or None for events not worth a line (progress ticks). ``index``: key -> launch #."""

    def trial(key: str) -> str:
        if key == PROOF_KEY and key not in index:
            return "proof"
        return f"#{index[key]}" if key in index else "trial"

    if isinstance(event, TuneStarted):
        resumed = f", {event.resumed_trials} trials resumed" if event.resumed_trials else ""
        node = ""
        if event.node_gpus:
            node = f" on GPU {gpu_list(event.node_gpus)}"
            node += f", {event.parallel} at once" if event.parallel > 1 else ""
        line = Text(
            f"tuning {event.model}{node}: {event.candidates_total} candidates, "
            f"up to {event.launch_budget} launches{resumed}; trials stored in {event.store_path}"
        )
        if event.prediction:
            line.append(f"; {event.prediction}", style="dim")
        return line
    if isinstance(event, TrialStarted):
        where = f" on GPU {gpu_list(event.gpus)}" if event.gpus else ""
        layout = f", {event.layout}" if event.layout else ""
        return Text.assemble(
            (f"#{event.index} launching ", "bold"), event.label, (f"{where}{layout} ({event.why})", "dim")
        )
    if isinstance(event, ServerReady):
        pid = f", pid {event.pid}" if event.pid is not None else ""
        return Text(
            f"{trial(event.key)} server up in {tfmt.duration(event.startup_s)} at {event.url}{pid}",
            style="dim",
        )
    if isinstance(event, PhaseMeasured):
        # The proof's own phase is "proof 2.4 req/s"; its production check "proof production 1.8 req/s".
        role = "" if event.role in ("judged", "proof") else f"{event.role} "
        line = Text(f"{trial(event.key)} {role}{event.load_label}: ")
        line.append(fmt.tokens_per_s(event.output_tokens_per_s))
        line.append(
            f", TTFT p95 {fmt.seconds(event.ttft_p95_s)}, {tfmt.per_user(user_tok_s(event))}/user ",
            style="dim",
        )
        if event.passed:
            line.append("✓ meets the SLO", style="green")
        elif event.decision == "uncertain":
            line.append("? at the limit: " + "; ".join(event.reasons), style="yellow")
        else:
            line.append("× " + ("; ".join(event.reasons) or "misses the SLO"), style="yellow")
        if event.disturbed:
            line.append(f" (disturbed: {event.disturbed})", style="dim")
        return line
    if isinstance(event, PhaseRepeated):
        return Text(f"{trial(event.key)} {event.load_label}: {event.why}", style="dim")
    if isinstance(event, VerdictReached):
        return Text(event.headline, style=tfmt.verdict_style(event.exit_code))
    if isinstance(event, TrialFinished):
        style = tfmt.STATUS_STYLES.get(event.status, "")
        line = Text.assemble((f"{trial(event.key)} {event.status}", style), ": ", event.reason)
        if event.predicted and event.measured is not None:
            ratio = event.measured / event.predicted
            line.append(
                f" ({ratio:.2f}x the model's {event.predicted:.3g})",
                style="dim" if 0.85 <= ratio <= 1.15 else "yellow",
            )
        if event.disturbed:
            line.append(f" ! disturbed: {event.disturbed}", style="yellow")
        return line
    if isinstance(event, EtaUpdated):
        left = "?" if event.remaining_s is None else tfmt.duration(event.remaining_s)
        return Text(f"time left {left}: {event.basis}", style="dim")
    if isinstance(event, BestChanged):
        return Text.assemble(
            ("new best ", "bold green"),
            f"{trial(event.key)} {event.label}: {event.load_label}, {fmt.tokens_per_s(event.output_tokens_per_s)}",
            (f" ({event.note})" if event.note else "", "dim"),
        )
    if isinstance(event, TuneFinished):
        how = f"stopped ({event.stopped})" if event.stopped else "finished"
        winner = event.winner_label or "no configuration met the SLO"
        return Text.assemble(
            (f"{how}: ", "bold"), f"{winner}; {event.launches} launches in {tfmt.duration(event.wall_s)}"
        )
    return None


def describe_error(error: str) -> Text:
    """The line for a tuner that raised instead of finishing."""
    return Text.assemble(("the tuner stopped with an error: ", "bold red"), error)


class EventLog(Widget):
    """The newest lines that fit. The newest wraps, and so do failures (their reason is the point);
    other older lines are cut to one line each, so a few recent events stay in view."""

    DEFAULT_CSS = """
    EventLog { height: 4; padding: 0 1; }
    """

    lines: reactive[tuple[tuple[Text, bool], ...]] = reactive((), layout=False)
    """Every line so far (the last MAX_LINES), each with whether it must be shown whole."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._lines: deque[tuple[Text, bool]] = deque(maxlen=MAX_LINES)

    def add(self, elapsed_s: float | None, text: Text, *, whole: bool = False) -> None:
        """Append a line stamped with the run's elapsed time; ``whole``: never cut it (a failure's reason)."""
        line = Text(f"{tfmt.clock(elapsed_s):>7} ", style="dim") if elapsed_s is not None else Text()
        line.append_text(text)
        self._lines.append((line, whole))
        self.lines = tuple(self._lines)

    @property
    def plain(self) -> str:
        """Everything logged, as plain text (tests, the screenshot script)."""
        return "\n".join(line.plain for line, _ in self.lines)

    def render(self) -> RenderableType:
        width = max(10, self.size.width)
        room = max(1, self.size.height)
        shown: list[Text] = []
        for n, (line, whole) in enumerate(reversed(self.lines)):
            if room <= 0:
                break
            rows = len(line.wrap(self.app.console, width)) if whole or n == 0 else 1
            if rows > room and shown:  # an older line without room to be whole: cut to one line
                rows = 1
            if rows == 1:
                line = line.copy()
                line.truncate(width, overflow="ellipsis")
            shown.insert(0, line)
            room -= rows
        return Text("\n").join(shown) if shown else Text("nothing yet", style="dim")
