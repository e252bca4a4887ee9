"""TTFT and per-user speed against load for one trial, with the SLO limits drawn on each bar.

A text chart, one row per measured load (requests/s or users): the TTFT p95 bar must stay left of its limit
mark, the per-user speed bar must reach past its floor mark. The mark sits mid-bar, so a bar runs to twice the
limit. The verdict column: ``✓`` passed, ``×`` failed, ``?`` at the limit (an interval straddled it); scouting
phases (which only find the server's pace) are dimmed.
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

LOAD_MIN_W = 4  # "load"; the column is as wide as the longest label shown ("12.5 req/s", "256 users")
TTFT_W = 6  # "310 ms", "1.52 s"
USER_W = 5  # "123.4"
OUT_W = 9  # "out tok/s" / "12,345"
MIN_BAR_W = 4
MARK = "┃"
CHROME_LINES = 2  # the limits line and the column headings


def _fixed_width(load_w: int, with_out: bool) -> int:
    # load, gap, TTFT, gap, bar, gap, user, gap, bar, gap, [out, gap], verdict
    return load_w + 1 + TTFT_W + 1 + 1 + USER_W + 1 + 1 + (OUT_W + 1 if with_out else 0) + 1


def short_load(label: str) -> str:
    """A load label for a narrow chart: ``"12.5 req/s"`` -> ``"12.5/s"``, ``"256 users"`` -> ``"256u"``."""
    if label.endswith(" req/s"):
        return label.removesuffix(" req/s") + "/s"
    for unit in (" users", " user"):
        if label.endswith(unit):
            return label.removesuffix(unit) + "u"
    return label


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
    """One trial's measured loads against the SLO, in the order measured."""

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

    measuring: reactive[str | None] = reactive(None, layout=True)
    """The load being measured right now on this trial (drawn as a pending row)."""

    def watch_trial(self, trial: TrialView | None) -> None:
        if trial is None:
            self.border_title = "SLO vs load"
        elif trial.is_proof:
            self.border_title = "proof: SLO vs load"
        else:
            number = f"#{trial.index} " if trial.index is not None else ""
            self.border_title = f"{number}SLO vs load"

    def render(self) -> RenderableType:
        width = max(24, self.size.width)
        lines = [self._limits_line(width)]
        trial = self.trial
        points = list(trial.points) if trial else []
        if not points and self.measuring is None:
            still = " yet" if trial is None or trial.running else ""
            lines.append(Text(f"no load measured{still}", style="dim"))
            return Text("\n").join(lines)
        room = max(1, self.size.height - CHROME_LINES) if self.size.height else len(points) + 1
        if self.measuring is not None:
            room -= 1
        # Keep the latest measurements when they do not all fit: that is where the search is narrowing in.
        shown = points[-room:] if room > 0 else []
        labels = [p.load_label for p in shown] + ([self.measuring] if self.measuring is not None else [])
        load_w = max((len(label) for label in labels), default=0)
        if _fixed_width(max(LOAD_MIN_W, load_w), False) + 2 * MIN_BAR_W > width:
            labels = [short_load(label) for label in labels]  # narrower than 80 columns: units abbreviated
        load_w = max(LOAD_MIN_W, *(len(label) for label in labels))
        with_out = (width - _fixed_width(load_w, True)) // 2 >= MIN_BAR_W + 1
        bar_w = max(MIN_BAR_W, (width - _fixed_width(load_w, with_out)) // 2)
        lines.append(self._heading(load_w, bar_w, with_out))
        ttft_max = max((p.ttft_p95_s or 0.0 for p in points), default=0.0)
        user_max = max((user_tok_s(p) or 0.0 for p in points), default=0.0)
        rows = [
            self._row(p, label.rjust(load_w), bar_w, with_out, ttft_max, user_max)
            for p, label in zip(shown, labels, strict=False)
        ]
        if self.measuring is not None:
            pending = Text(f"{labels[-1]:>{load_w}} ", style="bold")
            pending.append("measuring…", style="dim")
            rows.append(pending)
        lines.extend(rows)
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

    def _heading(self, load_w: int, bar_w: int, with_out: bool) -> Text:
        head = Text(style="dim")
        head.append("load".rjust(load_w) + " ")
        head.append("TTFT p95".ljust(TTFT_W + 1 + bar_w) + " ")
        head.append("tok/s/user".ljust(USER_W + 1 + bar_w) + " ")
        if with_out:
            head.append("out tok/s".rjust(OUT_W) + " ")
        return head

    def _row(
        self, p: PhaseMeasured, label: str, bar_w: int, with_out: bool, ttft_max: float, user_max: float
    ) -> Text:
        """One measured load: its label (padded), TTFT and per-user speed against their limits, its verdict."""
        lim = self.limits
        user = user_tok_s(p)
        ttft_ok = (
            None if lim.ttft_p95_max_s is None or p.ttft_p95_s is None else p.ttft_p95_s <= lim.ttft_p95_max_s
        )
        user_ok = None if lim.tok_s_per_user_min is None or user is None else user >= lim.tok_s_per_user_min
        row = Text()
        row.append(label + " ", style="dim" if p.role == "scout" else "bold")
        row.append(fmt.seconds(p.ttft_p95_s).rjust(TTFT_W) + " ", style="" if ttft_ok is not False else "red")
        row.append_text(limit_bar(p.ttft_p95_s, lim.ttft_p95_max_s, ttft_max, bar_w, ttft_ok))
        row.append(" ")
        row.append(fmt.number(user, 1).rjust(USER_W) + " ", style="" if user_ok is not False else "red")
        row.append_text(limit_bar(user, lim.tok_s_per_user_min, user_max, bar_w, user_ok))
        row.append(" ")
        if with_out:
            row.append(
                fmt.number(p.output_tokens_per_s).rjust(OUT_W) + " ", style="bold" if p.passed else "dim"
            )
        mark, style = {"pass": ("✓", "bold green"), "uncertain": ("?", "bold yellow")}.get(
            p.decision, ("×", "bold red")
        )
        row.append(mark, style=style)
        return row
