"""The best configuration so far: its capacity within the SLO, and how far it beats vLLM's defaults."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui.tune_state import BestView


def comparison(best: BestView) -> Text:
    """``"1.76x the defaults (9.13 req/s)"``: the capacities compared, as the tuner's headline does (the
    nodes', ``"1.76x the defaults' node (73 req/s)"``, when both are known); or ``"1.31x the defaults' tok/s
    (2,980)"`` when the loads are not of one kind; or why there is no ratio."""
    if best.is_defaults:
        return Text("vLLM's defaults themselves", style="dim")
    speedup = best.speedup
    if speedup is not None:
        if best.speedup_basis == "node":
            versus = f" the defaults' node ({best.defaults_node_load_label})"
        elif best.speedup_basis == "load":
            versus = f" the defaults ({best.defaults_load_label})"
        else:
            versus = f" the defaults' tok/s ({fmt.number(best.defaults_tok_s)})"
        return Text.assemble(
            (f"{speedup:.2f}x", "bold green" if speedup >= 1 else "bold yellow"), (versus, "dim")
        )
    if best.defaults_status in ("infeasible", "failed"):
        return Text(f"the defaults {best.defaults_status}: no ratio", style="dim")
    if best.defaults_status == "running":
        return Text("the defaults are being measured", style="dim")
    return Text("no defaults trial to compare with", style="dim")


class BestPanel(Widget):
    """Three lines: the winner so far; its load within the SLO and tok/s; its ratio over the defaults (on the
    line before, when the panel is wide enough). One more when it tied with the one it replaced (within the
    measurements' uncertainty) and was kept as the closer to vLLM's defaults."""

    DEFAULT_CSS = """
    BestPanel { height: auto; min-height: 3; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    best: reactive[BestView | None] = reactive(None, layout=True)
    """The best configuration so far (None until one meets the SLO)."""

    final: reactive[bool] = reactive(False)
    """The search completed: the best so far is the winner."""

    room: reactive[int] = reactive(4, layout=True)
    """Lines the screen can spare: with three, a tie is marked in the first line and told in the log."""

    def render(self) -> RenderableType:
        best = self.best
        title = Text("winner " if self.final else "best so far ", style="bold green")
        if best is None:
            title.append("none: no configuration met the SLO" if self.final else "none yet", style="dim")
            return title
        tie_line = Text.assemble(("= ", "bold yellow"), (best.note, "yellow")) if best.note else None
        if best.index is not None:
            title.append(f"#{best.index} ", style="bold")
        title.append(best.label, style="bold")
        if best.layout:
            title.append(f" · {best.layout}", style="dim")
        width = max(20, self.size.width)
        result = Text()
        # The longest wording that fits: "2.4 req/s within the SLO · 1,234 tok/s" down to "2.4 req/s · 1,234 tok/s".
        wordings = [(within, True) for within in (" within the SLO · ", " in the SLO · ", " · ")]
        if best.node_load_label:  # the node's capacity says more than one server's tok/s
            wordings.append((" · ", False))
        for within, with_tok_s in wordings:
            result = Text()
            result.append(best.load_label, style="bold green")
            result.append(within, style="dim")
            if best.node_load_label and best.node_load_label != best.load_label:
                result.append("node ", style="dim")
                result.append(best.node_load_label, style="bold green")
                result.append(" · ", style="dim")
            if with_tok_s:
                result.append(fmt.tokens_per_s(best.output_tokens_per_s), style="bold")
            else:
                result.right_crop(3)  # the last " · "
            if result.cell_len <= width:
                break
        ratio = comparison(best)
        if result.cell_len + 3 + ratio.cell_len <= width:  # a wide panel: the ratio on the same line
            lines = [title, Text.assemble(result, (" · ", "dim"), ratio)]
        else:
            lines = [title, result, ratio]
        if tie_line is not None:
            if len(lines) < self.room:
                lines.append(tie_line)
            else:  # no room for the note: a mark where it is seen first
                title.append(" (a tie)", style="bold yellow")
        return Text("\n").join(lines)
