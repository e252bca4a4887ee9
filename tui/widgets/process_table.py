"""The processes holding GPU memory, sortable, with the selection kept on the same PID across updates."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import RowDoesNotExist

from tui import format as fmt
from tuner.telemetry.model import GpuProcess

SORT_KEYS: dict[str, Callable[[GpuProcess], Any]] = {
    "vram": lambda p: p.vram_used_bytes or 0,
    "cpu": lambda p: p.cpu_pct or 0.0,
    "gpu": lambda p: (p.gpu_index, -(p.vram_used_bytes or 0)),
    "pid": lambda p: p.pid,
}
SORT_ORDER = tuple(SORT_KEYS)


def sort_processes(procs: Iterable[GpuProcess], key: str, descending: bool) -> list[GpuProcess]:
    return sorted(procs, key=SORT_KEYS[key], reverse=descending)


class ProcessTable(DataTable[Text | str]):
    """GPU processes: GPU, PID, user, VRAM, SM and memory duty cycles on the GPU, CPU %, host RSS, command."""

    DEFAULT_CSS = """
    ProcessTable { height: 1fr; min-height: 3; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.sort_key = "vram"
        self.descending = True
        self._procs: tuple[GpuProcess, ...] = ()
        self._shown_signature: tuple[Any, ...] | None = None

    def on_mount(self) -> None:
        for label, key in (
            ("GPU", "gpu"),
            ("PID", "pid"),
            ("USER", "user"),
            ("VRAM", "vram"),
            ("SM", "sm"),  # duty cycles from the driver's per-process samples: not bandwidth
            ("MEM BUSY", "mem_busy"),
            ("CPU", "cpu"),
            ("RSS", "rss"),
            ("COMMAND", "command"),
        ):
            self.add_column(label, key=key)
        self._refresh_header()

    def _refresh_header(self) -> None:
        arrow = "▼" if self.descending else "▲"
        for key, column in self.columns.items():
            base = str(column.label).rstrip(" ▼▲")
            column.label = Text(f"{base} {arrow}" if key.value == self.sort_key else base)
        self.refresh()

    @property
    def selected_process(self) -> GpuProcess | None:
        if not self.row_count:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except Exception:
            return None
        for p in self._procs:
            if f"{p.gpu_index}:{p.pid}" == row_key.value:
                return p
        return None

    def set_processes(self, procs: Iterable[GpuProcess]) -> None:
        """Show these processes, re-rendering only when something visible changed."""
        self._procs = tuple(procs)
        self._rebuild()

    def cycle_sort(self) -> str:
        self.sort_key = SORT_ORDER[(SORT_ORDER.index(self.sort_key) + 1) % len(SORT_ORDER)]
        self.descending = self.sort_key not in ("gpu", "pid")
        self._refresh_header()
        self._rebuild(force=True)
        return self.sort_key

    def reverse_sort(self) -> None:
        self.descending = not self.descending
        self._refresh_header()
        self._rebuild(force=True)

    def _rebuild(self, force: bool = False) -> None:
        rows = sort_processes(self._procs, self.sort_key, self.descending)
        signature = tuple(
            (
                p.gpu_index,
                p.pid,
                p.vram_used_bytes,
                None if p.sm_util_pct is None else round(p.sm_util_pct),
                None if p.mem_util_pct is None else round(p.mem_util_pct),
                round(p.cpu_pct or 0),
                p.host_rss_bytes,
                p.command,
                p.host_verified,
            )
            for p in rows
        )
        if not force and signature == self._shown_signature:
            return
        self._shown_signature = signature
        selected = self.selected_process
        self.clear()
        for p in rows:
            self.add_row(
                str(p.gpu_index),
                str(p.pid),
                Text(p.user or fmt.NA),  # anyone's text: a user named [/] is not markup
                Text(fmt.vram_short(p.vram_used_bytes), justify="right"),
                Text(fmt.pct(p.sm_util_pct), justify="right"),
                Text(fmt.pct(p.mem_util_pct), justify="right"),
                Text(fmt.pct(p.cpu_pct), justify="right"),
                Text(fmt.vram_short(p.host_rss_bytes), justify="right"),
                _command(p),
                key=f"{p.gpu_index}:{p.pid}",
            )
        if selected is not None:
            with contextlib.suppress(RowDoesNotExist):  # the selected process ended
                self.move_cursor(row=self.get_row_index(f"{selected.gpu_index}:{selected.pid}"))


OTHER_NAMESPACE = "(pid of another namespace: a container; not this host's process)"


def _command(p: GpuProcess) -> Text:
    """The command line; a pid that does not hold the GPU here says so instead of naming a stranger."""
    if p.host_verified is False:
        return Text(OTHER_NAMESPACE, style="dim italic", no_wrap=True, overflow="ellipsis")
    return Text(p.command or p.name or fmt.NA, no_wrap=True, overflow="ellipsis")
