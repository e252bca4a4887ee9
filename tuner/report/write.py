"""The tuning report: every trial as JSON, and a readable summary (Markdown and one self-contained HTML page)
with SVG plots.

:func:`write_report` takes the dict the tuner builds at the end of a run (``format: infertop-tune-report``,
version 2; see ``build_report`` in ``tuner/tuning/conclusion.py``) and writes ``report.json`` (that dict, as is),
``report.md``, ``report.html`` and the plots into a directory. The summary opens with the result's line (the
verdict: PROVEN, NOT PROVEN, ...) because that is what an operator must read first; then what was exported and
at which load, with the figures and their 90 % intervals. Its sections are built here as one list of
:mod:`tuner.report.document` blocks, so the Markdown and the HTML say the same thing; the figures come from
:mod:`tuner.report.data` and the plots from :mod:`tuner.report.plots`. The dict may be incomplete (an
interrupted run, a failed trial, fields that are None, a version-1 report of an older infertop); every missing
figure reads "n/a", never zero.

Every file is written private (0600) and whole through :mod:`tuner.outputs`: the report carries the server's
command line and log tail. The directory is the run's own, so writing a report again replaces the one there
(``infertop report``, ``--resume``); a symlink planted under one of its names is replaced, never followed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from tuner.outputs import OutputError, write_private
from tuner.report import svgplot
from tuner.report.data import (
    Run,
    as_text,
)
from tuner.report.document import (
    to_html,
    to_markdown,
)
from tuner.report.plots import plots
from tuner.report.sections import document

__all__ = [
    "READABLE_VERSIONS",
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "ReportError",
    "ReportFiles",
    "read_report",
    "write_report",
]

REPORT_FORMAT = "infertop-tune-report"
REPORT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 (an older infertop: fixed concurrencies, no intervals, no verdict) still renders, as a limited view."""


class ReportError(Exception):
    """The report cannot be written or read (no permission, not a report file). One line for people."""


class ReportFiles(TypedDict):
    """What :func:`write_report` wrote."""

    json: Path
    markdown: Path
    html: Path
    plots: list[Path]


# --- files ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON: tuples as lists, paths as text, NaN and infinities as null (JSON has none)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` whole and private over this report's earlier file of that name (see the module's rules)."""
    try:
        write_private(path, text, force=True)
    except OutputError as error:
        raise ReportError(str(error)) from None
    except OSError as error:  # a write that failed midway (disk full): the partial file was discarded
        raise ReportError(f"cannot write {path}: {error.strerror or error}") from None


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> ReportFiles:
    """Write ``report.json``, ``report.md``, ``report.html`` and the SVG plots into ``out_dir`` (created).

    Files are written 0600 and replaced whole, so writing again (``infertop report``) is safe. Plots are written
    only when some trial has a measured point.

    Raises:
        ReportError: the directory or a file cannot be written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"cannot create {out}: {error.strerror or error}") from None
    data = _jsonable(report)
    run = Run.parse(data)
    figures, plot_paths = [], []
    for file, chart, caption in plots(run):
        svg = svgplot.render(chart)
        _write_atomic(out / file, svg)
        plot_paths.append(out / file)
        figures.append((file, chart.title, svg, caption))
    blocks = document(run, figures)
    model = as_text(data.get("model")) or "model"
    files = ReportFiles(
        json=out / "report.json", markdown=out / "report.md", html=out / "report.html", plots=plot_paths
    )
    _write_atomic(files["json"], json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(files["markdown"], to_markdown(blocks))
    _write_atomic(files["html"], to_html(blocks, f"infertop tuning report: {model}"))
    return files


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` this module wrote (this version or an older one it still renders).

    Raises:
        ReportError: no such file, not JSON, or not an infertop tuning report of a known version.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ReportError(f"{path} is not an infertop tuning report")
    if data.get("version") not in READABLE_VERSIONS:
        raise ReportError(
            f"{path} is a report of version {data.get('version')!r}; this infertop reads "
            + " and ".join(map(str, READABLE_VERSIONS))
        )
    return data
