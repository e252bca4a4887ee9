"""The node's GPUs during a tune: which trial holds each one, what that trial is doing, and the GPU's readings.

Trials run in parallel on one node (a slot each), so a GPU is either held by a trial's server or idle. Each GPU
gets a line on a wide screen, or a cell of a two-column grid on a narrow one (eight GPUs in four rows at 80
columns). A trial's GPUs share a colour, so a TP-4 server reads as one block.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.geometry import Size
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui.tune_state import NodeSlot
from tuner.telemetry.model import GpuSample

WIDE_W = 110
"""From this width on, a line per GPU; below it, a grid of two cells a row (one GPU alone keeps its line)."""
LINE_MIN_W = 70  # narrower than this, even one GPU gets a grid cell's wording

GAP = 2  # between the grid's cells
WHO_W = 11  # "#12 judged", "proof prod"
TRIAL_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta")
ROLE_SHORT = {"starting": "start", "production": "prod"}
SPARK_MAX_W = 30
LABEL_MAX_W = 44  # the trial's configuration and layout, on a wide screen


def trial_colour(slot: NodeSlot) -> str:
    """The colour of the trial holding ``slot`` (by launch number, so it stays put while the trial runs)."""
    if slot.name == "proof":
        return "bold green"
    digits = slot.name.lstrip("#")
    return TRIAL_COLOURS[int(digits) % len(TRIAL_COLOURS)] if digits.isdigit() else "white"


def who(slot: NodeSlot) -> Text:
    """``"#3 judged"``, ``"proof prod"``, ``"#4 start"``, ``"idle"``: who holds the GPU, doing what."""
    if slot.idle:
        return Text("idle", style="dim")
    role = ROLE_SHORT.get(slot.role, slot.role)
    if slot.name == "proof" and slot.role == "proof":
        role = ""  # "proof proof" says it twice
    text = Text(slot.name, style=f"bold {trial_colour(slot)}")
    if role:
        text.append(f" {role}", style="dim" if slot.role in ("starting", "ready") else "")
    return text


def readings(sample: GpuSample | None) -> list[Text]:
    """The GPU's readings, most telling first: DRAM bandwidth (measured by GPM or DCGM, else the decode-traffic
    estimate marked ``~``, else the memory duty cycle), power against its limit, VRAM."""
    if sample is None:
        return [Text("no reading yet", style="dim")]
    if sample.error:
        return [Text(f"! {sample.error}", style="bold red")]
    if sample.dram_bw_util_pct is not None:
        first = Text.assemble(("BW ", "dim"), (fmt.pct(sample.dram_bw_util_pct).rjust(3), "bold"))
    elif sample.dram_bw_est_pct is not None:  # the decode-traffic estimate: marked, never shown as measured
        first = Text.assemble(("BW~", "yellow"), (fmt.pct(sample.dram_bw_est_pct).rjust(3), "italic yellow"))
    else:  # a duty cycle, not bandwidth: named as such
        first = Text.assemble(("busy ", "dim"), (fmt.pct(sample.mem_busy_pct).rjust(3), "bold"))
    power = "n/a" if sample.power_w is None else f"{sample.power_w:.0f}"
    limit = "n/a" if sample.power_limit_w is None else f"{sample.power_limit_w:.0f}"
    power_pct = sample.power_pct_of_limit
    power_style = "bold red" if (power_pct or 0) >= 99 else "yellow" if (power_pct or 0) >= 90 else ""
    vram = sample.vram_used_pct
    return [
        first,
        Text(f"{power:>3}/{limit}W", style=power_style),
        Text.assemble(("VRAM ", "dim"), (fmt.pct(vram).rjust(3), "bold red" if (vram or 0) >= 98 else "")),
    ]


class NodeStrip(Widget):
    """The node's GPUs, each with the trial on it and its live readings."""

    DEFAULT_CSS = """
    NodeStrip { height: auto; text-wrap: nowrap; text-overflow: clip; }
    """

    slots: reactive[tuple[NodeSlot, ...]] = reactive((), layout=True)
    """Each GPU of the node and the trial holding it (the fold's :meth:`~tui.tune_state.TuneRun.node_slots`)."""

    samples: reactive[tuple[GpuSample, ...]] = reactive(())
    """The latest reading of the machine's GPUs (any order; GPUs outside the node are left out)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.series: dict[int, list[float | None]] = {}
        """Recent DRAM bandwidth (or duty cycle) of each GPU, drawn as a sparkline on a wide screen."""

    def show(self, samples: tuple[GpuSample, ...], series: dict[int, list[float | None]]) -> None:
        """Take a new reading of the GPUs and their history; repaints."""
        self.series = series
        self.samples = samples

    @property
    def columns(self) -> int:
        """GPUs a row: one on a wide screen, else two (when there are two or more)."""
        return self._columns_at(self.size.width)

    def _columns_at(self, width: int) -> int:
        return 1 if width >= WIDE_W or len(self.slots) < 2 else 2

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        """As many rows as the GPUs take at the width it is given (its own size is not known yet while the
        layout asks): eight lines on a wide screen, four rows of two on a narrow one."""
        columns = self._columns_at(width)
        return -(-len(self.slots) // columns) if self.slots else 0

    def render(self) -> RenderableType:
        if not self.slots:
            return Text("")
        width = max(20, self.size.width)
        by_gpu = {s.index: s for s in self.samples}
        columns = self.columns
        if columns == 1 and width >= LINE_MIN_W:
            return Text("\n").join(self._line(slot, by_gpu.get(slot.gpu), width) for slot in self.slots)
        cell_w = (width - GAP * (columns - 1)) // columns
        index_w = max(len(str(slot.gpu)) for slot in self.slots)
        cells = [self._cell(slot, by_gpu.get(slot.gpu), cell_w, index_w) for slot in self.slots]
        rows = []
        for at in range(0, len(cells), columns):
            rows.append(Text(" " * GAP).join(cells[at : at + columns]))
        return Text("\n").join(rows)

    def _cell(self, slot: NodeSlot, sample: GpuSample | None, width: int, index_w: int) -> Text:
        """``0 #3 judged  BW 62% 490/700W VRAM 90%``: a grid cell, padded to ``width``."""
        line = Text(f"{slot.gpu:>{index_w}} ", style="bold")
        line.append_text(who(slot).copy())
        line.pad_right(index_w + 1 + WHO_W + 1 - line.cell_len)
        parts = readings(sample)
        while len(parts) > 1 and line.cell_len + sum(p.cell_len + 1 for p in parts) - 1 > width:
            parts.pop()  # VRAM first, then power: bandwidth says most about a trial
        line.append_text(Text(" ").join(parts))
        room = width - line.cell_len - 1
        if room >= 6 and sample is not None and not sample.error:
            line.append(" " + self._spark(slot.gpu, min(room, SPARK_MAX_W // 2)), style="cyan")
        line.truncate(width, overflow="ellipsis", pad=True)
        return line

    def _line(self, slot: NodeSlot, sample: GpuSample | None, width: int) -> Text:
        """A line per GPU: ``GPU 0  #3 judged 16.1 req/s  seqs 512 … · 8 x TP 1  BW 62% ▃▅▆ 490/700W …``."""
        line = Text(f"GPU {slot.gpu:<2} ", style="bold")
        line.append_text(who(slot).copy())
        line.pad_right(7 + WHO_W + 1 - line.cell_len)
        line.append(f"{slot.load_label:<11} ", style="bold")
        parts = readings(sample)
        tail = Text(" ").join(parts[1:])
        if sample is not None and not sample.error:
            tail.append("  ")
            tail.append(fmt.celsius(sample.gpu_temp_c), style="dim")
        room = width - line.cell_len - parts[0].cell_len - tail.cell_len - 6
        label_w = min(LABEL_MAX_W, room - 8) if room >= 18 else 0  # too narrow: the readings matter more
        spark_w = min(SPARK_MAX_W, max(0, room - label_w))
        trial = Text()
        if not slot.idle:
            trial.append(slot.label)
            if slot.layout:
                trial.append(f" · {slot.layout}", style="dim")
        trial.truncate(label_w, overflow="ellipsis", pad=True)
        line.append_text(trial)
        line.append("  ")
        line.append_text(parts[0])
        if spark_w >= 4 and sample is not None and not sample.error:
            line.append(" " + self._spark(slot.gpu, spark_w), style="cyan")
        line.append("  ")
        line.append_text(tail)
        line.truncate(width, overflow="ellipsis")
        return line

    def _spark(self, gpu: int, width: int) -> str:
        return fmt.pct_sparkline(self.series.get(gpu, []), width, per_cell=4)
