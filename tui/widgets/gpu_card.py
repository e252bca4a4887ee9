"""A card per GPU: bandwidth, SM, VRAM and power with their history, then the details an operator checks."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tuner.telemetry.model import GpuInfo, GpuSample
from tuner.telemetry.throttle import THROTTLE_SERIES, throttle_shares

Series = dict[str, list[float | None]]

LABEL_W = 10
VALUE_W = 24
PCT_SERIES = ("dram_bw_util_pct", "dram_bw_est_pct", "sm_active_pct", "gpu_util_pct", "mem_busy_pct")
CARD_SERIES = (*PCT_SERIES, "power_w", "time_s", *THROTTLE_SERIES)
"""The history a card draws: the sampler keeps more series than a card shows."""
REASON_SHORT = {
    "sw_power_cap": "sw power cap",
    "hw_slowdown": "hw slowdown",
    "sw_thermal_slowdown": "sw thermal",
    "hw_thermal_slowdown": "hw thermal",
    "hw_power_brake_slowdown": "hw power brake",
    "display_clock_setting": "display clock",
    "board_limit": "board limit",
}
COMPACT_FIXED_W = 66  # everything on a compact row but its sparkline
SPARK_MAX_W = 60  # wider history stops being readable: a minute at 4 Hz is 240 readings anyway


def _level_style(value: float | None, warn: float, crit: float) -> str:
    if value is None:
        return "dim"
    if value >= crit:
        return "bold red"
    if value >= warn:
        return "yellow"
    return "bold"


def reason_text(reasons: tuple[str, ...] | None) -> str:
    """Throttle reasons for people: 'sw power cap, hw thermal slowdown'."""
    if reasons is None:
        return fmt.NA
    costly = [r for r in reasons if r not in ("gpu_idle", "applications_clocks_setting", "sync_boost")]
    if not costly:
        return "idle" if "gpu_idle" in reasons else "none"
    return ", ".join(r.replace("_", " ") for r in costly)


def window_seconds(times: list[float | None], last: int | None = None) -> float | None:
    """How many seconds the (``last``) readings stamped ``times`` cover: first to last plus one interval."""
    known = [t for t in (times[-last:] if last else times) if t is not None]
    if len(known) < 2 or known[-1] <= known[0]:
        return None
    return (known[-1] - known[0]) * len(known) / (len(known) - 1)


class GpuCard(Widget):
    """One GPU, full size (6 lines) or compact (1 line)."""

    DEFAULT_CSS = """
    GpuCard {
        height: 8;
        text-wrap: nowrap;
        text-overflow: clip;
        border: round $primary 60%;
        border-title-color: $text;
        border-title-style: bold;
        padding: 0 1;
    }
    GpuCard.compact {
        height: 1;
        border: none;
        padding: 0 1;
    }
    GpuCard.throttled { border: round $warning; }
    GpuCard.lost { border: round $error; }
    GpuCard.compact.throttled, GpuCard.compact.lost { border: none; }
    """

    sample: reactive[GpuSample | None] = reactive(None, layout=False)
    """The latest reading of this GPU."""

    compact: reactive[bool] = reactive(False)
    """One line instead of the full card (many GPUs on a small terminal)."""

    def __init__(self, info: GpuInfo, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.info = info
        self.series: Series = {}
        self.readings_per_cell = 4  # one sparkline cell per second at the default 4 Hz
        self.history_needed = SPARK_MAX_W * self.readings_per_cell
        self.border_title = Content(f"GPU {info.index} · {info.name}")  # plain text: a name is not markup
        self._update_subtitle()

    def show(self, sample: GpuSample, series: Series) -> None:
        """Take a new reading and its history; repaints."""
        self.series = series
        self.sample = sample

    def watch_sample(self, sample: GpuSample | None) -> None:
        self.set_class(bool(sample and sample.throttled), "throttled")
        self.set_class(bool(sample and sample.error), "lost")
        self._update_subtitle()
        self._update_tooltip(sample)

    def watch_compact(self, compact: bool) -> None:
        self.set_class(compact, "compact")

    def _update_subtitle(self) -> None:
        bits = []
        if self.info.peak_dram_bw_gbps:
            src = "" if self.info.peak_dram_bw_source == "datasheet" else " (derived)"
            bits.append(f"peak {fmt.gbps(self.info.peak_dram_bw_gbps)}{src}")
        if self.info.mig_enabled:
            bits.append("MIG")
        self.border_subtitle = " · ".join(bits)

    def render(self) -> RenderableType:
        s = self.sample
        if s is None:
            return Text("waiting for the first reading…", style="dim")
        if s.error:
            return Text.assemble(("! ", "bold red"), (s.error, "red"))
        width = max(20, self.size.width)
        if self.compact:
            return self._render_compact(s, width)
        return self._render_full(s, width)

    # --- full card -----------------------------------------------------------------------------------

    def _spark(self, name: str, width: int, hi: float | None) -> str:
        """A sparkline of one series on a fixed scale: 0-100 for percentages, else 0..``hi`` (a limit)."""
        values = self.series.get(name, [])
        if name in PCT_SERIES:
            return fmt.pct_sparkline(values, width, per_cell=self.readings_per_cell)
        return fmt.sparkline(values, width, hi=hi, per_cell=self.readings_per_cell)

    def _measured(self, s: GpuSample) -> bool:
        """Profiling counters to show: GPM's (a GPM GPU whose counters answer), or DCGM's (an L4, an A100, a
        Hopper whose counters DCGM holds). Recordings older than ``profiling_source`` are GPM's or nothing."""
        if s.profiling_source is not None:
            return True
        return self.info.gpm_supported and s.gpm_unavailable_reason is None

    def _update_tooltip(self, s: GpuSample | None) -> None:
        """Where the bandwidth figure comes from, in full: the card has room for a word of it."""
        if s is None or s.error:
            self.tooltip = None
        elif s.profiling_source == "dcgm":
            age = f", at most {s.profiling_age_s:.0f} s old" if s.profiling_age_s is not None else ""
            self.tooltip = f"DRAM BW, SM and tensor active measured by DCGM's profiling counters{age}"
        elif s.profiling_source == "gpm":
            self.tooltip = "DRAM BW, SM and tensor active measured by GPM (NVML)"
        elif s.dram_bw_est_gbps is not None:
            self.tooltip = (
                "DRAM BW ESTIMATED, not measured: the bytes the inference server's decode steps must read "
                f"(weights and KV cache) times its step rate. {s.dram_bw_est_basis or ''}"
            )
        else:
            self.tooltip = None

    def _spark_width(self, width: int) -> int:
        return min(SPARK_MAX_W, width - LABEL_W - VALUE_W - 1)

    def _row(
        self,
        label: str,
        value: Text,
        series: str | None,
        hi: float | None,
        width: int,
        spark_style: str = "cyan",
    ) -> Text:
        line = Text(label.ljust(LABEL_W), style="dim")
        value.truncate(VALUE_W, pad=True)
        line.append_text(value)
        spark_w = self._spark_width(width)
        if series and spark_w >= 6:
            line.append(" " + self._spark(series, spark_w, hi), style=spark_style)
        return line

    def _gauge_row(self, label: str, value: Text, fraction: float | None, width: int) -> Text:
        line = self._row(label, value, None, None, width)
        bar_w = min(SPARK_MAX_W, width - LABEL_W - VALUE_W - 1)
        if bar_w >= 6:
            line.append(" " + fmt.bar(fraction, bar_w), style="cyan")
        return line

    def _render_full(self, s: GpuSample, width: int) -> Text:
        lines: list[Text] = []
        if self._measured(s):
            value = Text.assemble(
                (fmt.pct(s.dram_bw_util_pct).rjust(4), "bold"), "  ", fmt.gbps(s.dram_bw_gbps)
            )
            if s.profiling_source == "dcgm":
                value.append("  DCGM", style="dim")
            lines.append(self._row("DRAM BW", value, "dram_bw_util_pct", 100.0, width))
            value = Text.assemble(
                (fmt.pct(s.sm_active_pct).rjust(4), "bold"), f"  tensor {fmt.pct(s.tensor_active_pct)}"
            )
            lines.append(self._row("SM active", value, "sm_active_pct", 100.0, width))
        elif s.dram_bw_est_pct is not None:
            # A model's estimate, never shown as a measurement: its own row style, its own word, its own series.
            value = Text.assemble(
                (fmt.pct(s.dram_bw_est_pct).rjust(4), "italic yellow"),
                "  ",
                (fmt.gbps(s.dram_bw_est_gbps), "italic"),
                ("  est.", "yellow"),
            )
            lines.append(self._row("DRAM BW", value, "dram_bw_est_pct", 100.0, width, spark_style="yellow"))
            value = Text.assemble((fmt.pct(s.mem_busy_pct).rjust(4), "bold"), ("  duty cycle, not BW", "dim"))
            lines.append(self._row("Mem busy", value, "mem_busy_pct", 100.0, width))
        else:
            # Without GPM (or while another client holds it) there is no bandwidth counter: show the duty
            # cycles, named as such.
            value = Text.assemble((fmt.pct(s.mem_busy_pct).rjust(4), "bold"), ("  duty cycle, not BW", "dim"))
            lines.append(self._row("Mem busy", value, "mem_busy_pct", 100.0, width))
            value = Text.assemble((fmt.pct(s.gpu_util_pct).rjust(4), "bold"), ("  duty cycle", "dim"))
            lines.append(self._row("GPU util", value, "gpu_util_pct", 100.0, width))
        vram_pct = s.vram_used_pct
        value = Text.assemble(
            (f"{fmt.gib(s.vram_used_bytes)} / {fmt.gib(s.vram_total_bytes)}", _level_style(vram_pct, 90, 98))
        )
        value.append(f"  {fmt.pct(vram_pct)}", style="dim")
        lines.append(self._gauge_row("VRAM", value, vram_pct / 100 if vram_pct is not None else None, width))
        power_pct = s.power_pct_of_limit
        value = Text.assemble(
            (fmt.watts(s.power_w), _level_style(power_pct, 90, 99)), f" / {fmt.watts(s.power_limit_w)}"
        )
        # Power on the limit's scale (the default limit where the enforced one is not reported).
        power_hi = s.power_limit_w or self.info.power_limit_default_w
        lines.append(self._row("Power", value, "power_w", power_hi, width))
        lines.append(self._details_line(s))
        lines.append(self._clocks_line(s, width))
        return Text("\n").join(line[:width] if len(line) > width else line for line in lines)

    def _details_line(self, s: GpuSample) -> Text:
        line = Text()
        if s.profiling_source == "dcgm":
            line.append("via DCGM", style="dim")
            if s.profiling_age_s is not None:  # at most this old: DCGM samples at its own interval
                line.append(f" ≤{s.profiling_age_s:.0f} s old", style="dim")
            line.append("  util ", style="dim")
            line.append(fmt.pct(s.gpu_util_pct), style="bold")
            line.append("  mem busy ", style="dim")
            line.append(fmt.pct(s.mem_busy_pct), style="bold")
            line.append("  temp ", style="dim")
            return self._temps(line, s)
        if s.dram_bw_est_pct is not None and not self._measured(s):
            line.append("est.: decode reads, not measured", style="yellow")
            line.append("  util ", style="dim")
            line.append(fmt.pct(s.gpu_util_pct), style="bold")
            line.append("  temp ", style="dim")
            return self._temps(line, s)
        if s.dram_bw_est_basis and s.dram_bw_est_pct is None and not self._measured(s):
            # A server runs here but its traffic cannot be estimated: say why, not just n/a.
            line.append("DRAM BW n/a, ", style="dim")
            line.append(s.dram_bw_est_basis, style="yellow")
            line.append("  temp ", style="dim")
            return self._temps(line, s)
        if not self.info.gpm_supported:
            line.append("DRAM BW ", style="dim")
            line.append("n/a (no GPM, no DCGM)", style="dim")
            line.append("  temp ", style="dim")
            return self._temps(line, s)
        if s.gpm_unavailable_reason is not None:
            line.append("DRAM BW n/a: ", style="dim")
            line.append(s.gpm_unavailable_reason, style="yellow")
            line.append("  temp ", style="dim")
            return self._temps(line, s)
        line.append("util ", style="dim")
        line.append(fmt.pct(s.gpu_util_pct), style="bold")
        line.append("  mem busy ", style="dim")
        line.append(fmt.pct(s.mem_busy_pct), style="bold")
        line.append(" (duty cycle)", style="dim")
        line.append("  temp ", style="dim")
        return self._temps(line, s)

    def _temps(self, line: Text, s: GpuSample) -> Text:
        line.append(fmt.celsius(s.gpu_temp_c), style=_level_style(s.gpu_temp_c, 80, 88))
        line.append(" HBM " if "HBM" in self.info.name or self.info.gpm_supported else " mem ", style="dim")
        line.append(fmt.celsius(s.mem_temp_c), style=_level_style(s.mem_temp_c, 85, 95))
        if s.fan_pct is not None:
            line.append("  fan ", style="dim")
            line.append(fmt.pct(s.fan_pct))
        line.append("  energy ", style="dim")
        line.append(fmt.joules(s.energy_counter_j))
        return line

    def _clocks_line(self, s: GpuSample, width: int) -> Text:
        line = Text()
        line.append("SM ", style="dim")
        line.append(fmt.mhz(s.sm_clock_mhz))
        line.append("  mem ", style="dim")
        line.append(fmt.mhz(s.mem_clock_mhz))
        line.append("  throttle ", style="dim")
        reasons = reason_text(s.clock_event_reasons)
        line.append(reasons, style="bold red" if s.throttled else "green")
        line.append_text(self._throttle_history(width))
        line.append("  PCIe ", style="dim")
        line.append(f"↑{fmt.rate_bytes(s.pcie_tx_bytes_per_s)} ↓{fmt.rate_bytes(s.pcie_rx_bytes_per_s)}")
        if s.nvlink_tx_bytes_per_s is not None or (self.info.nvlink_links or 0) > 0:
            line.append("  NVLink ", style="dim")
            line.append(
                f"↑{fmt.rate_bytes(s.nvlink_tx_bytes_per_s)} ↓{fmt.rate_bytes(s.nvlink_rx_bytes_per_s)}"
            )
        return line

    def _throttle_history(self, width: int) -> Text:
        """' (41 s: sw power cap 38%, hw thermal 5%)': the share of the window the sparklines show that each
        throttle reason held; empty when the GPU reports no reasons."""
        spark_w = self._spark_width(width)
        last = spark_w * self.readings_per_cell if spark_w >= 6 else None
        window_s = window_seconds(self.series.get("time_s", []), last)
        if window_s is None or not any(self.series.get(name) for name in THROTTLE_SERIES):
            return Text()
        shares = throttle_shares(self.series, last)
        text = Text(" (", style="dim")
        if not shares:
            text.append(f"none in {window_s:.0f} s", style="dim")
        else:
            text.append(f"{window_s:.0f} s: ", style="dim")
            parts = [f"{REASON_SHORT.get(reason, reason)} {share:.0f}%" for reason, share in shares]
            text.append(", ".join(parts), style="yellow")
        text.append(")", style="dim")
        return text

    # --- compact row ---------------------------------------------------------------------------------

    def _render_compact(self, s: GpuSample, width: int) -> Text:
        line = Text()
        spark_w = max(4, min(40, width - COMPACT_FIXED_W))
        name = self.info.name.replace("NVIDIA ", "")
        line.append(f"{self.info.index} ", style="bold")
        line.append(f"{name[:9]:<9} ", style="dim")
        if self._measured(s):
            line.append("DRAM " if s.profiling_source != "dcgm" else "DCGM ", style="dim")
            line.append(
                f"{fmt.pct(s.dram_bw_util_pct):>4} {fmt.gbps(s.dram_bw_gbps).replace(' ', ''):>10} ",
                style="bold",
            )
            line.append(self._spark("dram_bw_util_pct", spark_w, 100.0), style="cyan")
            line.append(" SM ", style="dim")
            line.append(f"{fmt.pct(s.sm_active_pct):>4}", style="bold")
        elif s.dram_bw_est_pct is not None:
            line.append("est. ", style="yellow")
            line.append(
                f"{fmt.pct(s.dram_bw_est_pct):>4} {fmt.gbps(s.dram_bw_est_gbps).replace(' ', ''):>10} ",
                style="italic yellow",
            )
            line.append(self._spark("dram_bw_est_pct", spark_w, 100.0), style="yellow")
            line.append(" busy ", style="dim")
            line.append(f"{fmt.pct(s.mem_busy_pct):>4}", style="bold")
        else:
            line.append("busy ", style="dim")
            line.append(f"{fmt.pct(s.mem_busy_pct):>4}", style="bold")
            line.append(" util ", style="dim")
            line.append(f"{fmt.pct(s.gpu_util_pct):>4} ", style="bold")
            line.append(self._spark("gpu_util_pct", spark_w + 2, 100.0), style="cyan")
        line.append(" VRAM ", style="dim")
        line.append(f"{fmt.pct(s.vram_used_pct):>4} ", style=_level_style(s.vram_used_pct, 90, 98))
        power = "n/a" if s.power_w is None else f"{s.power_w:.0f}"
        limit = "n/a" if s.power_limit_w is None else f"{s.power_limit_w:.0f}"
        line.append(f"{power:>3}/{limit} W ", style=_level_style(s.power_pct_of_limit, 90, 99))
        line.append(fmt.celsius(s.gpu_temp_c), style=_level_style(s.gpu_temp_c, 80, 88))
        if s.throttled:
            line.append(" ! " + reason_text(s.clock_event_reasons), style="bold red")
        line.truncate(width)
        return line
