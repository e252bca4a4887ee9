"""What the inference servers are doing: queue, KV cache, tokens/s, TTFT and TPOT percentiles, and the energy
each generated token costs on the GPUs the server uses."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tuner.redact import redact_url
from tuner.telemetry.energy import EnginePower
from tuner.telemetry.engines import engine_title
from tuner.telemetry.model import EngineSample


def latency_triplet(p50: float | None, p95: float | None, p99: float | None) -> str:
    """p50/p95/p99 in one unit: "120/480/950 ms", "0.85/2.10/4.00 s"; n/a for any the engine does not give."""
    known = [v for v in (p50, p95, p99) if v is not None]
    if not known:
        return fmt.NA
    if max(known) < 1:
        parts = [fmt.NA if v is None else f"{v * 1000:.0f}" for v in (p50, p95, p99)]
        return "/".join(parts) + " ms"
    parts = [fmt.NA if v is None else f"{v:.2f}" for v in (p50, p95, p99)]
    return "/".join(parts) + " s"


def joules_per_token(value: float | None) -> str:
    if value is None:
        return fmt.NA
    if value < 0.01:
        return f"{value * 1000:.1f} mJ/token"
    return f"{value:.3g} J/token"


def tokens_per_s_per_watt(value: float | None) -> str:
    if value is None:
        return fmt.NA
    return f"{value:.2f} tok/s/W" if value < 10 else f"{value:.1f} tok/s/W"


def gpus_label(power: EnginePower) -> str:
    if not power.attributed:
        return "all GPUs"
    word = "GPU" if len(power.gpu_indices) == 1 else "GPUs"
    return f"{word} {','.join(str(i) for i in power.gpu_indices)}"


def panel_title(engines: tuple[EngineSample, ...]) -> str:
    """The engine's name when all servers run one, else "Inference servers"."""
    titles = {engine_title(e.engine) for e in engines}
    return titles.pop() if len(titles) == 1 else "Inference servers"


class EnginePanel(Widget):
    """A few lines per attached inference server. Hidden when none is attached."""

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
        self.border_title = "Inference servers"
        self.gen_history: dict[str, list[float | None]] = {}
        self.power: dict[str, EnginePower] = {}

    def show(
        self,
        engines: tuple[EngineSample, ...],
        gen_history: dict[str, list[float | None]],
        power: dict[str, EnginePower] | None = None,
    ) -> None:
        """Take the latest readings, each server's generation-rate history and energy figures; repaints."""
        self.gen_history = gen_history
        self.power = power or {}
        self.engines = engines

    def watch_engines(self, engines: tuple[EngineSample, ...]) -> None:
        # Plain text: an engine's name from another host is not markup.
        self.border_title = Content(panel_title(engines)) if engines else "Inference servers"

    def render(self) -> RenderableType:
        width = max(20, self.size.width)
        mixed = len({engine_title(e.engine) for e in self.engines}) > 1
        lines = [self._engine_lines(e, width, mixed) for e in self.engines]
        return Text("\n").join(lines) if lines else Text("no inference server attached", style="dim")

    def _engine_lines(self, e: EngineSample, width: int, mixed: bool) -> Text:
        head = Text()
        if mixed:
            head.append(f"{engine_title(e.engine)} ", style="bold")
        head.append(redact_url(e.url), style="bold")  # a reading from elsewhere may still carry credentials
        if e.model_name:
            head.append(f"  {e.model_name}", style="dim")
        if e.error:
            head.append(f"  ! {e.error}", style="yellow")
            return head
        return Text("\n").join([head, self._load_line(e, width), self._latency_line(e), self._energy_line(e)])

    def _load_line(self, e: EngineSample, width: int) -> Text:
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
        if e.preemptions_total:
            body.append("  preempted ", style="dim")
            body.append(fmt.number(e.preemptions_total), style="bold yellow")
        spark_w = max(0, min(16, width - body.cell_len - 3))
        if spark_w >= 4:
            body.append(" " + fmt.sparkline(self.gen_history.get(e.url, []), spark_w), style="green")
        return body

    def _latency_line(self, e: EngineSample) -> Text:
        line = Text()
        line.append("TTFT p50/p95/p99 ", style="dim")
        line.append(latency_triplet(e.ttft_p50_s, e.ttft_p95_s, e.ttft_p99_s), style="bold")
        line.append("  TPOT ", style="dim")
        tpot = latency_triplet(e.tpot_p50_s, e.tpot_p95_s, e.tpot_p99_s)
        if tpot == fmt.NA and e.itl_mean_s is not None:
            line.append(f"mean {fmt.seconds(e.itl_mean_s)}", style="bold")  # llama.cpp: no histogram
        else:
            line.append(tpot, style="bold")
        if e.latency_window_s is not None:
            line.append(f"  last {e.latency_window_s:.0f} s", style="dim")
        return line

    def _energy_line(self, e: EngineSample) -> Text:
        line = Text()
        power = self.power.get(e.url)
        line.append("energy ", style="dim")
        if power is None:
            line.append(fmt.NA)
            return line
        if power.joules_per_token is None:
            line.append(f"{fmt.NA}: {power.unavailable}", style="dim")
            line.append(f"  {gpus_label(power)}", style="dim")
            return line
        line.append(joules_per_token(power.joules_per_token), style="bold cyan")
        line.append("  ")
        line.append(tokens_per_s_per_watt(power.tokens_per_s_per_watt), style="bold cyan")
        line.append(f"  {fmt.watts(power.power_w)} on {gpus_label(power)}", style="dim")
        if power.window_s is not None:
            line.append(f"  last {power.window_s:.0f} s", style="dim")
        return line
