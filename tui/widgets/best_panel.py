"""The best configuration so far: its throughput within the SLO, and how far it beats vLLM's defaults."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui.tune_state import BestView


def comparison(best: BestView) -> Text:
    """``"1.31x the defaults (1,764 tok/s)"``, or why there is no ratio."""
    if best.is_defaults:
        return Text("vLLM's defaults themselves", style="dim")
    speedup = best.speedup
    if speedup is not None:
        return Text.assemble(
            (f"{speedup:.2f}x", "bold green" if speedup >= 1 else "bold yellow"),
            (f" the defaults ({fmt.tokens_per_s(best.defaults_tok_s)})", "dim"),
        )
    if best.defaults_status in ("infeasible", "failed"):
        return Text(f"the defaults {best.defaults_status}: no ratio", style="dim")
    if best.defaults_status == "running":
        return Text("the defaults are being measured", style="dim")
    return Text("no defaults trial to compare with", style="dim")


class BestPanel(Widget):
    """Three lines: the winner so far; its tok/s and concurrency; its ratio over the defaults."""

    DEFAULT_CSS = """
    BestPanel { height: auto; min-height: 3; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    best: reactive[BestView | None] = reactive(None, layout=True)
    """The best configuration so far (None until one meets the SLO)."""

    final: reactive[bool] = reactive(False)
    """The search completed: the best so far is the winner."""

    def render(self) -> RenderableType:
        best = self.best
        title = Text("winner " if self.final else "best so far ", style="bold green")
        if best is None:
            title.append("none: no configuration met the SLO" if self.final else "none yet", style="dim")
            return title
        if best.index is not None:
            title.append(f"#{best.index} ", style="bold")
        title.append(best.label, style="bold")
        result = Text()
        result.append(fmt.tokens_per_s(best.output_tokens_per_s), style="bold green")
        result.append(" at concurrency ", style="dim")
        result.append(str(best.concurrency), style="bold")
        return Text("\n").join([title, result, comparison(best)])
