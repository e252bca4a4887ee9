"""Every configuration the tuner launched: its status and its best SLO-meeting result, one row each."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable

from tui import format as fmt
from tui import tune_format as tfmt
from tui.tune_state import TrialView, gpu_list, user_tok_s

LABEL_W = 22
REASON_W = 72

# (header, key, width); None width = as wide as its content.
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("#", "index", 2),
    ("config", "label", LABEL_W),
    ("status", "status", 12),
    ("GPUs", "gpus", 5),
    ("load", "load", 11),
    ("node", "node", 11),
    ("vs model", "model", 8),
    ("out tok/s", "tok_s", 9),
    ("TTFT p95", "ttft", 8),
    ("tok/s/user", "user", 10),
    ("bound", "bound", 9),
    ("layout", "layout", 10),
    ("reason", "reason", None),
)


def _right(text: str, style: str = "") -> Text:
    return Text(text, style=style, justify="right")


def model_cell(trial: TrialView) -> Text:
    """Measured against the performance model: "0.83x" once finished (far off is a finding, in colour),
    "≈37.4" (the predicted capacity) while it runs, "–" without a prediction."""
    ratio = trial.vs_prediction
    if ratio is not None:
        style = "green" if 0.85 <= ratio <= 1.15 else "yellow" if 0.65 <= ratio <= 1.5 else "bold red"
        return _right(f"{ratio:.2f}x", style)
    if trial.predicted is not None and trial.predicted > 0:
        return _right(f"≈{fmt.number(trial.predicted, 1)}", "dim")
    return _right("–", "dim")


def row_cells(trial: TrialView) -> tuple[Text, ...]:
    """The cells of one trial's row. A running trial shows its best SLO-meeting phase so far."""
    point = trial.best_point
    status_style = tfmt.STATUS_STYLES.get(trial.status, "")
    status = Text(("● " if trial.running else "") + trial.status, style=status_style)
    if trial.disturbed:  # trials beside it disturbed its measurement: its numbers are less sure
        status.append(" !", style="bold yellow")
    reason = trial.reason or (f"launch: {trial.why}" if trial.why and trial.running else "")
    if trial.disturbed:
        reason = f"disturbed: {trial.disturbed}; {reason}" if reason else f"disturbed: {trial.disturbed}"
    node = trial.node_load_label
    node_cell = _right(node or "–", ("bold green" if trial.status == "feasible" else "") if node else "dim")
    muted = "dim" if trial.running else ""  # a running trial's numbers are provisional
    if point is None:
        # A trial resumed from the store comes without its points: its capacity and tok/s are still known.
        load, tok_s = trial.result_load_label, trial.result_tok_s
        numbers = [
            _right(load or "–", "" if load else "dim"),
            node_cell,
            model_cell(trial),
            _right(fmt.number(tok_s), "bold green" if trial.status == "feasible" else "")
            if tok_s is not None
            else _right("–", "dim"),
            *(_right("–", "dim") for _ in range(2)),
            Text("–", style="dim"),
        ]
    else:
        tok_s = trial.result_tok_s
        numbers = [
            _right(point.load_label, muted),
            node_cell,
            model_cell(trial),
            _right(fmt.number(tok_s), "bold green" if trial.status == "feasible" else muted),
            _right(fmt.seconds(point.ttft_p95_s), muted),
            _right(fmt.number(user_tok_s(point), 1), muted),
            Text(tfmt.bound_short(point.bound), style="dim"),
        ]
    return (
        _right("–" if trial.index is None else str(trial.index), "dim"),
        Text(tfmt.truncate(trial.label, LABEL_W), style="bold" if trial.running else ""),
        status,
        _right(gpu_list(trial.gpus), "" if trial.gpus else "dim"),
        *numbers,
        Text(tfmt.truncate(trial.layout, 10) or "–", style="" if trial.layout else "dim"),
        Text(tfmt.truncate(reason, REASON_W), style="red" if trial.status == "failed" else "dim"),
    )


class TrialTable(DataTable[Text]):
    """One row per trial, in launch order; follows the running trial unless the cursor was moved up."""

    DEFAULT_CSS = """
    TrialTable { height: auto; min-height: 3; max-height: 35%; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._shown: dict[str, TrialView] = {}

    def on_mount(self) -> None:
        for label, key, width in COLUMNS:
            numeric = key in ("index", "gpus", "load", "node", "model", "tok_s", "ttft", "user")
            self.add_column(Text(label, justify="right" if numeric else "left"), key=key, width=width)

    @property
    def selected_key(self) -> str | None:
        """The trial the operator picked by moving the cursor up off the newest row; None while the cursor
        follows the newest row (the screen then follows the trial active last)."""
        if self.row_count == 0 or self.cursor_row >= self.row_count - 1:
            return None
        row_key, _ = self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0))
        return row_key.value

    @property
    def statuses(self) -> dict[str, str]:
        """Trial key -> status as shown (for tests and the screenshot script)."""
        return {key: trial.status for key, trial in self._shown.items()}

    def show(self, trials: Iterable[TrialView]) -> None:
        """Show these trials: new ones are appended, changed ones updated in place, the rest left alone."""
        for trial in trials:
            shown = self._shown.get(trial.key)
            if shown == trial:
                continue
            cells = row_cells(trial)
            if shown is None:
                following = self.row_count == 0 or self.cursor_row >= self.row_count - 1
                self.add_row(*cells, key=trial.key)
                if following:
                    self.move_cursor(row=self.row_count - 1)
            else:
                for (_, column, _), cell in zip(COLUMNS, cells, strict=True):
                    self.update_cell(trial.key, column, cell, update_width=column == "reason")
            self._shown[trial.key] = trial
