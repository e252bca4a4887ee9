"""What the inference server is doing: queue, KV cache, tokens/s and TTFT from vLLM's /metrics."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tuner.telemetry.model import EngineSample


class EnginePanel(Widget):
    """One or two lines per attached vLLM server. Hidden when none is attached."""

    DEFAULT_CSS = """
    EnginePanel {
        height: auto;
        border: round $accent 60%;
        border-title-color: $text;
        padding: 0 1;
    }
    """

    engines: reactive[tuple[EngineSample, ...]] = reactive((), layout=True)
    """Latest reading of each attached server."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "vLLM"
        self.gen_history: dict[str, list[float | None]] = {}

    def show(self, engines: tuple[EngineSample, ...], gen_history: dict[str, list[float | None]]) -> None:
        self.gen_history = gen_history
        self.engines = engines

    def render(self) -> RenderableType:
        width = max(20, self.size.width)
        lines = [self._engine_lines(e, width) for e in self.engines]
        return Text("\n").join(lines) if lines else Text("no vLLM server attached", style="dim")

    def _engine_lines(self, e: EngineSample, width: int) -> Text:
        head = Text()
        head.append(e.url, style="bold")
        if e.model_name:
            head.append(f"  {e.model_name}", style="dim")
        if e.error:
            head.append(f"  ! {e.error}", style="yellow")
            return head
        body = Text()
        body.append("running ", style="dim")
        body.append(fmt.number(e.requests_running), style="bold")
        body.append("  waiting ", style="dim")
        waiting_style = "bold yellow" if (e.requests_waiting or 0) > 0 else "bold"
        body.append(fmt.number(e.requests_waiting), style=waiting_style)
        body.append("  KV cache ", style="dim")
        kv = e.kv_cache_usage_pct
        body.append(fmt.pct(kv, 1), style="bold red" if (kv or 0) > 95 else "bold")
        body.append("  gen ", style="dim")
        body.append(fmt.tokens_per_s(e.generation_tokens_per_s), style="bold green")
        spark_w = max(0, min(16, width - body.cell_len - 40))
        if spark_w:
            body.append(" " + fmt.sparkline(self.gen_history.get(e.url, []), spark_w), style="green")
        body.append("  TTFT ", style="dim")
        body.append(f"mean {fmt.seconds(e.ttft_mean_s)} p95 {fmt.seconds(e.ttft_p95_s)}")
        if e.preemptions_total:
            body.append("  preempted ", style="dim")
            body.append(fmt.number(e.preemptions_total), style="bold yellow")
        return Text("\n").join([head, body])
