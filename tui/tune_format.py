"""How the tune screen writes durations, bounds and trial statuses (the units themselves come from tui.format)."""

from __future__ import annotations

from tui import format as fmt

STATUS_STYLES = {
    "running": "bold cyan",
    "feasible": "bold green",
    "infeasible": "yellow",
    "failed": "bold red",
    "interrupted": "magenta",
    "skipped": "dim",
    # The proof row: vLLM relaunched from the exported file.
    "proven": "bold green",
    "backed off": "bold green",
    "not proven": "bold red",
}

EXIT_INTERRUPTED = 130  # tui.tune_cli's exit status for a run stopped by the operator


def verdict_style(exit_code: int) -> str:
    """How the run's headline is drawn: green when the export was proven (exit 0), yellow when the run was
    stopped (130: --resume carries on), red otherwise (no configuration, NOT PROVEN)."""
    if exit_code == 0:
        return "bold green"
    return "bold yellow" if exit_code == EXIT_INTERRUPTED else "bold red"


# tuner.measure.BoundKind values, short enough for a table column; the help screen spells them out.
BOUND_SHORT = {
    "gpu_memory_bandwidth": "mem BW",
    "gpu_compute": "compute",
    "kv_cache_queueing": "KV/queue",
    "front_end_or_client": "frontend",
    "client": "client",
    "engine": "engine",
    "unknown": "unclear",
}


def duration(seconds: float | None) -> str:
    """``"42 s"``, ``"4 min 12 s"``, ``"1 h 02 min"``."""
    if seconds is None:
        return fmt.NA
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def clock(seconds: float) -> str:
    """Elapsed time as a stopwatch shows it: ``"4:12"``, ``"1:02:07"``."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bound_short(bound: str) -> str:
    return BOUND_SHORT.get(bound, bound.replace("_", " "))


def per_user(tok_s: float | None) -> str:
    """Per-user speed: one decimal, since SLO floors such as 33.3 tok/s sit between whole numbers."""
    return fmt.NA if tok_s is None else f"{tok_s:.1f} tok/s"


def truncate(text: str, width: int) -> str:
    """One line of at most ``width`` characters, an ellipsis marking a cut."""
    line = " ".join(text.split())
    if len(line) <= width:
        return line
    return line[: max(0, width - 1)] + "…"
