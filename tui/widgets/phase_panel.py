"""The candidate being measured now: its server, the load it holds, and how far the phase has got.

When the run ends the same place says how it ended, the verdict (the run's headline: PROVEN, NOT PROVEN, ...)
and where the YAML and the report were written.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui import tune_format as tfmt
from tui.tune_state import TrialView, gpu_list
from tuner.tuning.events import PhaseProgressed, PhaseRepeated, TuneFinished

# What the tuner wrote, by its key in TuneFinished.outputs; an unknown key is shown as it is.
OUTPUT_NAMES = {
    "yaml": "YAML",
    "report_md": "report",
    "markdown": "report",
    "report_json": "JSON",
    "json": "JSON",
    "html": "HTML",
}


def gauge(fraction: float | None, width: int) -> Text:
    """A progress bar on a visible track, so an early phase does not look like an empty line."""
    cells = fmt.bar(fraction, width)
    if fraction is None:  # total unknown: a track without a bar
        return Text(cells, style="grey23")
    filled = cells.rstrip(" ")
    return Text.assemble((filled, "cyan"), ("░" * (width - len(filled)), "grey23"))


class PhasePanel(Widget):
    """Three or four lines about the running trial, or the run's outcome once it is over."""

    DEFAULT_CSS = """
    PhasePanel { height: auto; min-height: 3; }
    """

    trial: reactive[TrialView | None] = reactive(None, layout=True)
    """The trial shown: the one the operator selected, else the running one active last (or the last one,
    between trials)."""

    selected: reactive[bool] = reactive(False)
    """The trial shown is the one the operator selected (not followed): a finished one shows its result."""

    phase: reactive[PhaseProgressed | None] = reactive(None)
    """Latest progress of the phase under way on that trial."""

    repeated: reactive[PhaseRepeated | None] = reactive(None)
    """Why the phase under way is measured again or further (a busy host, an interval straddling a limit)."""

    waiting_s: reactive[int | None] = reactive(None)
    """Whole seconds the running trial's server has been starting."""

    finished: reactive[TuneFinished | None] = reactive(None, layout=True)
    """How the run ended, once it has."""

    error: reactive[str | None] = reactive(None, layout=True)
    """The tuner raised instead of finishing: what happened, in one line."""

    def render(self) -> RenderableType:
        width = max(20, self.size.width)
        if self.error is not None:
            return Text.assemble(("! the tuner stopped with an error: ", "bold red"), (self.error, "red"))
        if self.finished is not None:
            return self._render_finished(self.finished)
        trial = self.trial
        if trial is None:
            return Text("waiting for the first candidate…", style="dim")
        lines = [self._title(trial, width)]
        if not trial.running:
            status = Text(trial.status, style=tfmt.STATUS_STYLES.get(trial.status, ""))
            lines.append(Text.assemble(status, ": ", trial.reason or "done"))
            if self.selected or trial.node_load_label or trial.disturbed:
                lines.append(self._result(trial))
            else:
                lines.append(Text("choosing the next candidate…", style="dim"))
        elif trial.server_url is None:
            waited = "" if self.waiting_s is None else f" {tfmt.duration(self.waiting_s)}"
            lines.append(Text(f"starting the vLLM server…{waited}", style="yellow"))
        else:
            lines.extend(self._phase_lines(width))
        for line in lines:
            line.truncate(width, overflow="ellipsis")
        return Text("\n").join(lines)

    def _title(self, trial: TrialView, width: int) -> Text:
        line = Text()
        if trial.index is not None:
            line.append(f"#{trial.index} ", style="bold")
        line.append(trial.label, style="bold")
        if trial.gpus or trial.layout:
            where = f"GPU {gpu_list(trial.gpus)}" if trial.gpus else ""
            line.append(" · " + " · ".join(w for w in (where, trial.layout) if w), style="dim")
        if self.selected:
            line.append(" (selected)", style="dim")
        return line

    def _result(self, trial: TrialView) -> Text:
        """A finished trial's node: ``node 129 req/s (8 x TP 1)``, and whether neighbours disturbed it."""
        line = Text()
        if trial.node_load_label:
            line.append("node ", style="dim")
            line.append(trial.node_load_label, style="bold green" if trial.status == "feasible" else "bold")
            if trial.layout:
                line.append(f" ({trial.layout})", style="dim")
        if trial.disturbed:
            line.append(" · " if line else "")
            line.append(f"! disturbed: {trial.disturbed}", style="yellow")
        return line or Text("no node capacity", style="dim")

    def _phase_lines(self, width: int) -> list[Text]:
        p = self.phase
        if p is None:
            return [Text("waiting for the first load phase…", style="dim")]
        done = (
            f"{p.requests_done:,}"
            if p.requests_total is None
            else f"{p.requests_done:,}/{p.requests_total:,}"
        )
        tok_s = fmt.tokens_per_s(p.output_tokens_per_s)
        line = Text()
        # The longest wording that fits, from "judged 2.4 req/s · measure 40/72 requests" to "2.4 req/s · 40/72
        # req". The role (scout, judged, proof, production) says how the phase counts: it goes last. A phase
        # measured again (a busy host) or further (an interval straddled a limit) says so in its stage; the
        # log has the reason whole.
        role = f"{p.role} "
        stage = f" · {p.stage}{self._again(p)} "
        for role_word, stage_word, req_word in (
            (role, stage, "requests"),
            (role, stage, "req"),
            (role, " · ", "req") if stage == " · measure " else ("", stage, "req"),
            ("", " · ", "req"),
        ):
            line = Text()
            line.append(role_word, style="dim")
            line.append(p.load_label, style="bold")
            line.append(stage_word, style="dim")
            line.append(done, style="bold")
            line.append(f" {req_word}", style="dim")
            if line.cell_len <= width:
                break
        fraction = None if not p.requests_total else p.requests_done / p.requests_total
        tail = Text()
        if fraction is not None:
            tail.append(f" {fraction * 100:3.0f} %")
        tail.append(" · ", style="dim")
        tail.append(tok_s, style="bold green")
        return [line, Text.assemble(gauge(fraction, max(4, width - tail.cell_len)), tail)]

    def _again(self, p: PhaseProgressed) -> str:
        again = self.repeated
        if again is None or again.key != p.key or again.load_label != p.load_label:
            return ""
        return " further" if again.why.startswith("measuring further") else " again"

    def _render_finished(self, ev: TuneFinished) -> Text:
        head = Text()
        if ev.stopped:
            head.append(f"stopped ({ev.stopped})", style="bold yellow")
        else:
            head.append("finished", style="bold green" if ev.exit_code == 0 else "bold")
        head.append(f": {ev.launches} launches in {tfmt.duration(ev.wall_s)}", style="dim")
        head.truncate(max(20, self.size.width), overflow="ellipsis")
        lines = [head]
        if ev.headline:  # the verdict: wraps, since every word of it matters
            lines.append(Text(ev.headline, style=tfmt.verdict_style(ev.exit_code)))
        names = {key: OUTPUT_NAMES.get(key, key) for key in ev.outputs}
        pad = max((len(name) for name in names.values()), default=0) + 1
        # Paths are the one thing allowed to wrap: they must stay whole to be copied.
        for key, path in ev.outputs.items():
            lines.append(Text.assemble((names[key].ljust(pad), "dim"), path))
        return Text("\n").join(lines)
