"""TTFT and per-user speed against concurrency for one trial, with the SLO limits drawn on each bar.

A text chart, one row per measured concurrency: the TTFT p95 bar must stay left of its limit mark, the
per-user speed bar must reach past its floor mark. The mark sits mid-bar, so a bar runs to twice the limit.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui import format as fmt
from tui import tune_format as tfmt
from tui.tune_state import SloLimits, TrialView, user_tok_s
from tuner.tuning.events import PhaseMeasured

CONC_W = 5
TTFT_W = 6  # "310 ms", "1.52 s"
USER_W = 5  # "123.4"
OUT_W = 9  # "out tok/s" / "12,345"
MIN_BAR_W = 4
MARK = "┃"
CHROME_LINES = 2  # the limits line and the column headings


def _fixed_width(with_out: bool) -> int:
    # conc, gap, TTFT, gap, bar, 2 gaps, user, gap, bar, 2 gaps, [out, gap], verdict
    return CONC_W + 1 + TTFT_W + 1 + 2 + USER_W + 1 + 2 + (OUT_W + 1 if with_out else 0) + 1


def limit_bar(
    value: float | None, limit: float | None, scale_max: float, width: int, ok: bool | None
) -> Text:
    """A bar for ``value`` with the limit marked mid-bar (0..2x limit), or scaled to ``scale_max`` without one."""
    if value is None:
        return Text(fmt.bar(None, width), style="dim")
    top = 2 * limit if limit else scale_max
    cells = list(fmt.bar(value / top if top > 0 else None, width))
    style = "cyan" if ok is None else ("green" if ok else "red")
    bar = Text()
    mark_at = width // 2 if limit else None
    for i, cell in enumerate(cells):
        if i == mark_at and cell == " ":
            bar.append(MARK, style="bold yellow")
        else:
            bar.append(cell, style=style)
    return bar


class SloChart(Widget):
    """One trial's measured concurrencies against the SLO."""

    DEFAULT_CSS = """
    SloChart {
        height: auto;
        min-height: 4;
        border: round $accent 60%;
        border-title-color: $text;
        padding: 0 1;
        text-wrap: nowrap;
        text-overflow: clip;
    }
    """

    trial: reactive[TrialView | None] = reactive(None, layout=True)
    """The trial whose points are drawn."""

    limits: reactive[SloLimits] = reactive(SloLimits())
    """The SLO's TTFT ceiling and per-user speed floor."""

    measuring: reactive[int | None] = reactive(None, layout=True)
    """The concurrency being measured right now on this trial (drawn as a pending row)."""

    def watch_trial(self, trial: TrialView | None) -> None:
        if trial is None:
            self.border_title = "SLO vs concurrency"
        else:
            number = f"#{trial.index} " if trial.index is not None else ""
            self.border_title = f"{number}SLO vs concurrency"

    def render(self) -> RenderableType:
        width = max(24, self.size.width)
        lines = [self._limits_line(width)]
        trial = self.trial
        points = list(trial.points) if trial else []
        if not points and self.measuring is None:
            still = " yet" if trial is None or trial.running else ""
            lines.append(Text(f"no concurrency measured{still}", style="dim"))
            return Text("\n").join(lines)
        with_out = (width - _fixed_width(True)) // 2 >= MIN_BAR_W + 1
        bar_w = max(MIN_BAR_W, (width - _fixed_width(with_out)) // 2)
        lines.append(self._heading(bar_w, with_out))
        room = max(1, self.size.height - CHROME_LINES) if self.size.height else len(points) + 1
        if self.measuring is not None:
            room -= 1
        # Keep the latest measurements when they do not all fit: that is where the search is narrowing in.
        shown = sorted(points[-room:] if room > 0 else [], key=lambda p: p.concurrency)
        ttft_max = max((p.ttft_p95_s or 0.0 for p in points), default=0.0)
        user_max = max((user_tok_s(p) or 0.0 for p in points), default=0.0)
        rows = [(p.concurrency, self._row(p, bar_w, with_out, ttft_max, user_max)) for p in shown]
        if self.measuring is not None:
            pending = Text(f"{self.measuring:>{CONC_W}} ", style="bold")
            pending.append("measuring…", style="dim")
            rows.append((self.measuring, pending))
            rows.sort(key=lambda row: row[0])
        lines.extend(row for _, row in rows)
        return Text("\n").join(lines)

    def _limits_line(self, width: int) -> Text:
        lim = self.limits
        ttft = None if lim.ttft_p95_max_s is None else fmt.seconds(lim.ttft_p95_max_s)
        speed = None if lim.tok_s_per_user_min is None else tfmt.per_user(lim.tok_s_per_user_min)
        line = Text()
        # The longest wording that fits: units always stay.
        for label, ttft_name in (("limit: ", "TTFT p95"), ("", "TTFT p95"), ("", "TTFT")):
            parts = []
            if ttft is not None:
                parts.append(f"{ttft_name} ≤ {ttft}")
            if speed is not None:
                parts.append(f"≥ {speed}/user")
            line = Text(f"{MARK} {label}", style="bold yellow")
            line.append(" · ".join(parts) or "no latency limit known", style="yellow" if parts else "dim")
            if line.cell_len <= width:
                break
        return line

    def _heading(self, bar_w: int, with_out: bool) -> Text:
        head = Text(style="dim")
        head.append("conc".rjust(CONC_W) + " ")
        head.append("TTFT p95".ljust(TTFT_W + 1 + bar_w) + "  ")
        head.append("tok/s/user".ljust(USER_W + 1 + bar_w) + "  ")
        if with_out:
            head.append("out tok/s".rjust(OUT_W) + " ")
        return head

    def _row(self, p: PhaseMeasured, bar_w: int, with_out: bool, ttft_max: float, user_max: float) -> Text:
        lim = self.limits
        user = user_tok_s(p)
        ttft_ok = (
            None if lim.ttft_p95_max_s is None or p.ttft_p95_s is None else p.ttft_p95_s <= lim.ttft_p95_max_s
        )
        user_ok = None if lim.tok_s_per_user_min is None or user is None else user >= lim.tok_s_per_user_min
        row = Text()
        row.append(f"{p.concurrency:>{CONC_W}} ", style="bold")
        row.append(fmt.seconds(p.ttft_p95_s).rjust(TTFT_W) + " ", style="" if ttft_ok is not False else "red")
        row.append_text(limit_bar(p.ttft_p95_s, lim.ttft_p95_max_s, ttft_max, bar_w, ttft_ok))
        row.append("  ")
        row.append(fmt.number(user, 1).rjust(USER_W) + " ", style="" if user_ok is not False else "red")
        row.append_text(limit_bar(user, lim.tok_s_per_user_min, user_max, bar_w, user_ok))
        row.append("  ")
        if with_out:
            row.append(
                fmt.number(p.output_tokens_per_s).rjust(OUT_W) + " ", style="bold" if p.passed else "dim"
            )
        row.append("✓" if p.passed else "×", style="bold green" if p.passed else "bold red")
        return row
