"""One line about the candidate vLLM server, from its /metrics: queue, KV cache and generation speed."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tuner.telemetry.model import EngineSample

SPARK_W = 12


class EngineLine(Widget):
    """The server under test in one line (the monitor's EnginePanel is the roomy version)."""

    DEFAULT_CSS = """
    EngineLine { height: 1; padding: 0 1; text-wrap: nowrap; text-overflow: clip; }
    """

    sample: reactive[EngineSample | None] = reactive(None)
    """The latest /metrics reading of the candidate server."""

    note: reactive[str] = reactive("no candidate server running")
    """What to say while there is no reading."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.gen_history: list[float | None] = []

    def show(self, sample: EngineSample | None, gen_history: list[float | None]) -> None:
        """Take a new reading and the server's generation-rate history; repaints."""
        self.gen_history = gen_history
        self.sample = sample

    def render(self) -> RenderableType:
        e = self.sample
        line = Text("vLLM ", style="bold")
        if e is None:
            line.append(self.note, style="dim")
            return line
        if e.error:
            line.append(f"! {e.error}", style="yellow")
            return line
        line.append("running ", style="dim")
        line.append(fmt.number(e.requests_running), style="bold")
        line.append("  waiting ", style="dim")
        line.append(
            fmt.number(e.requests_waiting), style="bold yellow" if (e.requests_waiting or 0) > 0 else "bold"
        )
        line.append("  KV cache ", style="dim")
        kv = e.kv_cache_usage_pct
        line.append(fmt.pct(kv, 1), style="bold red" if (kv or 0) > 95 else "bold")
        line.append("  gen ", style="dim")
        line.append(fmt.tokens_per_s(e.generation_tokens_per_s), style="bold green")
        rest = Text()
        rest.append("  TTFT p95 ", style="dim")
        rest.append(fmt.seconds(e.ttft_p95_s))
        if e.preemptions_total:
            rest.append("  preempted ", style="dim")
            rest.append(fmt.number(e.preemptions_total), style="bold yellow")
        width = max(1, self.size.width)
        spark_w = min(SPARK_W, width - line.cell_len - rest.cell_len - 1)  # the history gives way first
        if spark_w >= 4:
            line.append(" " + fmt.sparkline(self.gen_history, spark_w), style="green")
        line.append_text(rest)
        line.truncate(width)
        return line
