"""The tuning report: every trial as JSON, and a readable summary (Markdown and one self-contained HTML page)
with SVG plots.

:func:`write_report` takes the dict the tuner builds at the end of a run (``format: infertop-tune-report``,
version 1; see ``tuner/tuning/tune.py``) and writes ``report.json`` (that dict, as is), ``report.md``,
``report.html`` and three plots into a directory. The summary's sections are built here as one list of
:mod:`tuner.report.document` blocks, so the Markdown and the HTML say the same thing; the figures come from
:mod:`tuner.report.data` and the plots from :mod:`tuner.report.plots`. The dict may be incomplete (an interrupted
run, a trial with no points, fields that are None); every missing figure reads "n/a", never zero.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from tuner.report import svgplot
from tuner.report.data import (
    Headline,
    Point,
    Run,
    Trial,
    as_mapping,
    as_number,
    as_text,
    closest_point,
    cost_per_million_output_tokens_usd,
    run_headline,
)
from tuner.report.document import (
    NA,
    Block,
    Bullets,
    Code,
    Details,
    Figure,
    Heading,
    Inline,
    Para,
    Table,
    bold,
    code,
    fmt_bare,
    fmt_joules,
    fmt_ms,
    fmt_secs,
    fmt_times,
    fmt_tok_s,
    fmt_usd,
    fmt_users,
    ms_value,
    to_html,
    to_markdown,
)
from tuner.report.plots import plots

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "ReportError",
    "ReportFiles",
    "read_report",
    "write_report",
]

REPORT_FORMAT = "infertop-tune-report"
REPORT_VERSION = 1


class ReportError(Exception):
    """The report cannot be written or read (no permission, not a report file). One line for people."""


class ReportFiles(TypedDict):
    """What :func:`write_report` wrote."""

    json: Path
    markdown: Path
    html: Path
    plots: list[Path]


# --- a few figures in words ----------------------------------------------------------------------------


def _when(epoch_s: float | None) -> str:
    if epoch_s is None:
        return NA
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return NA
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


_BOUNDS = {
    "gpu_memory_bandwidth": "GPU memory bandwidth",
    "gpu_compute": "GPU compute",
    "kv_cache_queueing": "KV cache / queueing",
    "front_end_or_client": "API front end or client",
    "client": "load generator (client)",
    "engine": "engine (no GPU telemetry)",
    "unknown": "nothing saturated",
}


def _bound(point: Point | None) -> str:
    kind = as_text(point.bound.get("kind")) if point else None
    return NA if kind is None else _BOUNDS.get(kind, kind.replace("_", " "))


def _serve_command(model: str, config: Mapping[str, Any]) -> str:
    args = ["vllm", "serve", shlex.quote(model)]
    for key, value in config.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            text = json.dumps(value) if isinstance(value, (Mapping, list)) else str(value)
            args.extend((f"--{key}", shlex.quote(text)))
    return " ".join(args)


# --- the summary ---------------------------------------------------------------------------------------


def _intro(run: Run) -> list[Block]:
    raw = run.raw
    hardware = as_mapping(raw.get("hardware"))
    slo_raw = as_mapping(raw.get("slo"))
    workload = as_mapping(raw.get("workload"))
    model = as_text(raw.get("model")) or NA
    label = as_text(raw.get("hardware_label")) or as_text(hardware.get("gpu_name")) or NA
    vram = as_number(hardware.get("vram_per_gpu_bytes"))
    cc = hardware.get("compute_capability")
    hw_detail = []
    if vram:
        hw_detail.append(f"{vram / 2**30:.0f} GiB per GPU")
    if isinstance(cc, (list, tuple)) and len(cc) == 2:
        hw_detail.append(f"compute capability {cc[0]}.{cc[1]}")
    judged = str(slo_raw.get("judged_at") or "p95")
    slo_name = as_text(slo_raw.get("name")) or "SLO"
    describe = as_text(slo_raw.get("describe")) or (run.slo.describe() if run.slo else NA)
    source = as_text(slo_raw.get("source"))
    in_len, out_len = as_number(workload.get("input_len")), as_number(workload.get("output_len"))
    started, finished = as_number(raw.get("started_s")), as_number(raw.get("finished_s"))
    grid = as_number(raw.get("grid_size"))
    launches = as_number(raw.get("launches"))
    counts: dict[str, int] = {}
    for trial in run.trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"
    blocks: list[Block] = [
        Heading(1, "infertop tuning report"),
        Bullets(
            (
                ("Model: ", code(model)),
                ("Hardware: ", label + (f" ({', '.join(hw_detail)})" if hw_detail else "")),
                (
                    "SLO: ",
                    bold(slo_name),
                    f": {describe}" + (f". Source: {source}" if source else ""),
                ),
                (
                    f"Judged at {judged} over each phase. Phases last tens of seconds, so infertop checks the "
                    f"limits at {judged}, where MLPerf uses p99 over at least 600 s: a pass here makes a strong "
                    "candidate for a full-length run, not a certified result.",
                ),
                (
                    "Workload: ",
                    f"{fmt_bare(in_len)} input tokens and {fmt_bare(out_len)} output tokens per request"
                    if in_len is not None and out_len is not None
                    else NA,
                    f"; requests per measured point: {workload.get('requests_per_point')}"
                    if workload.get("requests_per_point")
                    else "",
                ),
                (
                    f"Run: started {_when(started)}, took "
                    f"{_duration(finished - started if started and finished else None)}; "
                    f"{fmt_bare(launches)} server launches; {len(run.trials)} trials ({tally})"
                    + (f" out of {grid:.0f} feasible configurations in the grid" if grid is not None else ""),
                ),
            )
        ),
    ]
    if raw.get("interrupted"):
        blocks.append(
            Para(
                (
                    bold("This run was interrupted."),
                    " The results cover the trials that finished before it stopped; run the same tune again "
                    "with ",
                    code("--resume"),
                    " to finish the rest.",
                ),
                "warning",
            )
        )
    return blocks


def _result(run: Run, head: Headline) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Result")]
    model = as_text(run.raw.get("model")) or "MODEL"
    price = as_number(run.raw.get("price_per_gpu_hour"))
    w, d = run.winner, run.defaults
    if w is None:
        return blocks + _no_winner(run)
    users = (
        f"serves up to {fmt_users(head.winner_max_users)} at once within the SLO"
        if head.winner_max_users != head.winner_concurrency
        else f"serves {fmt_users(head.winner_max_users)} at once within the SLO"
    )
    blocks.append(
        Para(
            (
                bold(f"Best configuration: {w.label}."),
                f" It {users}, with its best throughput {fmt_tok_s(head.winner_output_tokens_per_s)} "
                f"at {fmt_users(head.winner_concurrency)}"
                + (
                    f" ({fmt_tok_s(run.per_gpu(head.winner_output_tokens_per_s))} per GPU)."
                    if run.gpus > 1
                    else "."
                ),
            )
        )
    )
    if d is None:
        blocks.append(
            Para(("vLLM's defaults were not measured in this run, so there is no ratio against them.",))
        )
    elif d is w:
        blocks.append(
            Para(("vLLM's defaults were the best configuration found: no tuned change beat them.",))
        )
    elif head.defaults_output_tokens_per_s is None:
        why = d.reason or "no concurrency tried met the SLO"
        blocks.append(
            Para(
                (
                    "vLLM's defaults did not meet this SLO at any concurrency tried (",
                    why,
                    "): the tuned configuration is what makes the SLO reachable.",
                )
            )
        )
    else:
        blocks.append(
            Para(
                (
                    bold(f"{fmt_times(head.throughput_ratio)} the output throughput of vLLM's defaults"),
                    f" under the same SLO ({fmt_tok_s(head.winner_output_tokens_per_s)} vs "
                    f"{fmt_tok_s(head.defaults_output_tokens_per_s)}), and {fmt_times(head.users_ratio)} the "
                    f"concurrent users ({fmt_bare(head.winner_max_users)} vs {fmt_bare(head.defaults_max_users)}).",
                )
            )
        )
    blocks.append(Code(_serve_command(model, w.config)))

    best, d_best = w.best_point, d.best_point if d else None
    columns = ["", "best configuration"] + (["vLLM defaults"] if d is not None and d is not w else [])

    def row(name: str, value: Any) -> tuple[Inline, ...]:
        cells: list[Inline] = [name, value(w, best)]
        if len(columns) == 3:
            cells.append(value(d, d_best))
        return tuple(cells)

    def point_stat(name: str, fmt: Any) -> Any:
        return lambda t, p: fmt(p.stat(name) if p else None)

    blocks.append(
        Table(
            tuple(columns),
            (
                row("most concurrent users within the SLO", lambda t, p: fmt_users(t.max_users)),
                row("best output throughput", lambda t, p: fmt_tok_s(t.best_tok_s)),
                row("... measured at", lambda t, p: fmt_users(t.best_concurrency)),
                row(
                    "output throughput per GPU" if run.gpus else "output throughput (CPU server, no GPU)",
                    lambda t, p: fmt_tok_s(run.per_gpu(t.best_tok_s)),
                ),
                row("TTFT p95 there", point_stat("ttft_p95_s", fmt_ms)),
                row("tok/s per user (p50) there", point_stat("user_tok_per_s_p50", fmt_tok_s)),
                row(
                    "cost per 1M output tokens",
                    lambda t, p: fmt_usd(cost_per_million_output_tokens_usd(price, run.gpus, t.best_tok_s)),
                ),
                row(
                    "GPU energy per output token", lambda t, p: fmt_joules(p.joules_per_token if p else None)
                ),
            ),
            (False, True, True)[: len(columns)],
        )
    )
    blocks.append(Bullets((*_cost_and_energy(run, head, price), _proof(run), _production(run))))
    return blocks


def _cost_and_energy(run: Run, head: Headline, price: float | None) -> list[tuple[Inline, ...]]:
    if run.gpus < 1:
        cost: tuple[Inline, ...] = ("Cost per 1M output tokens: n/a (the CPU build: no GPU-hours to price).",)
    elif price is None:
        cost = (
            "Cost per 1M output tokens: n/a: give ",
            code("--price-per-gpu-hour USD"),
            " (your cloud's on-demand price for one GPU) to see it.",
        )
    else:
        cost = (
            "Cost per 1M output tokens: ",
            bold(fmt_usd(head.cost_per_million_output_tokens_usd)),
            f" at ${price:,.2f} per GPU-hour x {run.gpus} GPU{'s' if run.gpus > 1 else ''} "
            "(price x GPUs x 1e6 / (output tok/s x 3600), as Artificial Analysis computes it).",
        )
    if head.joules_per_output_token is not None:
        energy: tuple[Inline, ...] = (
            "GPU energy per output token: ",
            bold(fmt_joules(head.joules_per_output_token)),
            " (power integrated over the measured window, all GPUs, over the output tokens in it).",
        )
    else:
        energy = ("GPU energy per output token: n/a (no GPU power readings for that phase).",)
    return [cost, energy]


def _proof(run: Run) -> tuple[Inline, ...]:
    proof = run.raw.get("proof")
    if not isinstance(proof, Mapping):
        return ("Proof run: n/a (the configuration was not relaunched from its YAML file).",)
    yaml = as_text(proof.get("yaml")) or NA
    error = as_text(proof.get("error"))
    if error:
        return ("Proof run from ", code(yaml), f": failed: {error}")
    n = as_number(proof.get("concurrency"))
    startup_s, tok_s = as_number(proof.get("startup_s")), as_number(proof.get("output_tokens_per_s"))
    trial_tok_s = as_number(proof.get("trial_output_tokens_per_s"))
    verdict = "met the SLO" if proof.get("passed") is True else "missed the SLO"
    return (
        "Proof run: relaunched from ",
        code(yaml),
        f" (startup {fmt_secs(startup_s)}): {fmt_tok_s(tok_s)} "
        f"at {fmt_users(int(n) if n else None)} vs {fmt_tok_s(trial_tok_s)} in the trial (",
        bold(fmt_times(as_number(proof.get("ratio")))),
        f"); {verdict}.",
    )


def _production(run: Run) -> tuple[Inline, ...]:
    prod = run.raw.get("production")
    if not isinstance(prod, Mapping):
        return ("Production check: n/a (not run).",)
    fraction = as_number(prod.get("fraction_of_max"))
    share = f"{fraction * 100:.0f} %" if fraction is not None else NA
    rate = as_number(prod.get("request_rate_per_s"))
    error = as_text(prod.get("error"))
    if error:
        return (f"Production check (steady load at {share} of the max): failed to run: {error}",)
    stats = as_mapping(prod.get("stats"))
    reasons = [str(r) for r in prod.get("slo_reasons") or ()]
    verdict = bold("SLO met") if prod.get("passed") is True else bold("SLO missed")
    return (
        f"Production check: steady load at {share} of the max ({fmt_bare(rate, 2)} requests/s): TTFT p95 "
        f"{fmt_ms(as_number(stats.get('ttft_p95_s')))}, E2E p95 {fmt_secs(as_number(stats.get('e2e_p95_s')))}, "
        f"{fmt_tok_s(as_number(stats.get('output_tokens_per_s')))}: ",
        verdict,
        f" ({'; '.join(reasons)})." if reasons else ".",
    )


def _no_winner(run: Run) -> list[Block]:
    describe = as_text(as_mapping(run.raw.get("slo")).get("describe")) or (
        run.slo.describe() if run.slo else ""
    )
    blocks: list[Block] = [
        Para((bold("No configuration met the SLO"), f" ({describe})." if describe else "."), "warning")
    ]
    closest = closest_point(run.slo, run.trials)
    if closest is None:
        blocks.append(
            Para(
                (
                    "No trial produced a measurement: every trial failed, was rejected before launch or was "
                    "interrupted. The trial table below gives each one's reason.",
                )
            )
        )
        return blocks
    trial, point = closest
    why = "; ".join(point.slo_reasons) or "no reason recorded"
    blocks.append(
        Para(
            (
                "Closest: ",
                bold(trial.label),
                f" at {fmt_users(point.concurrency)}: {fmt_tok_s(point.tok_s)}, "
                f"TTFT p95 {fmt_ms(point.stat('ttft_p95_s'))}, "
                f"{fmt_tok_s(point.stat('user_tok_per_s_p50'))} per user (p50). It missed because: {why}. ",
                "Try a looser SLO, fewer input or output tokens, or a larger GPU.",
            )
        )
    )
    return blocks


def _trial_table(run: Run) -> list[Block]:
    if not run.trials:
        return [Heading(2, "Trials"), Para(("No trials were recorded.",))]
    rows = []
    for t in run.trials:
        closest = closest_point(run.slo, [t])
        shown = t.best_point or (closest[1] if closest else None)
        mark = " ★" if t is run.winner else ""
        reason = t.reason or ("" if t.status == "feasible" else NA)
        users = NA if shown is None else fmt_bare(shown.concurrency) + ("" if shown.passed else " (missed)")
        rows.append(
            (
                f"{t.index + 1}",
                bold(t.label + mark) if t is run.winner else t.label + _defaults_mark(t, run),
                t.status,
                users,
                fmt_bare(shown.tok_s if shown else None),
                fmt_bare(ms_value(shown.stat("ttft_p95_s")) if shown else None),
                fmt_bare(shown.stat("user_tok_per_s_p50") if shown else None, 1),
                fmt_bare(t.startup_s),
                _bound(shown),
                reason,
            )
        )
    return [
        Heading(2, "Trials"),
        Para(
            (
                "★ marks the best configuration. Figures are at each trial's best point within the SLO; for a "
                'trial with none, at the point that came closest to it (marked "missed").',
            )
        ),
        Table(
            (
                "#",
                "configuration",
                "status",
                "users",
                "output (tok/s)",
                "TTFT p95 (ms)",
                "per user p50 (tok/s)",
                "startup (s)",
                "bound by",
                "reason",
            ),
            tuple(rows),
            (True, False, False, True, True, True, True, True, False, False),
        ),
    ]


def _defaults_mark(trial: Trial, run: Run) -> str:
    return " (vLLM defaults)" if trial is run.defaults and "default" not in trial.label.lower() else ""


def _logs(run: Run) -> list[Block]:
    with_logs = [t for t in run.trials if t.log_tail]
    if not with_logs:
        return []
    blocks: list[Block] = [Heading(2, "Server logs of trials that did not run")]
    for t in with_logs:
        blocks.append(
            Details(f"{t.label} ({t.status}): {t.reason or 'no reason recorded'}", t.log_tail or "")
        )
    return blocks


def _point_tables(run: Run) -> list[Block]:
    measured = [t for t in run.trials if t.points]
    if not measured:
        return []
    blocks: list[Block] = [Heading(2, "Measured points")]
    for t in measured:
        blocks.append(Heading(3, f"{t.index + 1}. {t.label} ({t.status})"))
        rows = []
        for p in sorted(t.points, key=lambda p: p.concurrency):
            ok, failed = p.stat("requests_ok"), p.stat("requests_failed")
            power = as_number(p.evidence.get("power_w_mean"))
            kv = as_number(p.evidence.get("kv_cache_usage_pct_max"))
            rows.append(
                (
                    fmt_bare(p.concurrency),
                    "met" if p.passed else bold("missed"),
                    fmt_bare(p.tok_s),
                    fmt_bare(p.stat("user_tok_per_s_p50"), 1),
                    fmt_bare(ms_value(p.stat("ttft_p50_s"))),
                    fmt_bare(ms_value(p.stat("ttft_p95_s"))),
                    fmt_bare(ms_value(p.stat("tpot_p95_s")), 1),
                    fmt_bare(p.stat("e2e_p95_s"), 2),
                    f"{fmt_bare(ok)} / {fmt_bare(failed)}",
                    fmt_bare(kv),
                    fmt_bare(power),
                    fmt_bare(p.joules_per_token, 3),
                    _bound(p),
                    "; ".join(p.slo_reasons),
                )
            )
        blocks.append(
            Table(
                (
                    "users",
                    "SLO",
                    "output (tok/s)",
                    "per user p50 (tok/s)",
                    "TTFT p50 (ms)",
                    "TTFT p95 (ms)",
                    "TPOT p95 (ms)",
                    "E2E p95 (s)",
                    "requests ok / failed",
                    "KV cache max (%)",
                    "GPU power (W)",
                    "energy (J/token)",
                    "bound by",
                    "why it missed",
                ),
                tuple(rows),
                (True, False, *(True,) * 10, False, False),
            )
        )
        notes = [
            f"{p.concurrency} users: {p.tokens.get('note')}"
            for p in t.points
            if p.tokens.get("mismatch") is True
        ]
        if notes:
            blocks.append(Para(("Token counts disagree: " + "; ".join(notes) + ".",), "warning"))
    return blocks


def _reading_notes(run: Run) -> list[Block]:
    judged = str(as_mapping(run.raw.get("slo")).get("judged_at") or "p95")
    return [
        Heading(2, "How these numbers were measured"),
        Bullets(
            (
                (
                    "Each point is one phase of concurrent streaming requests at a fixed number of users; output "
                    "tokens come from the server's own usage counts, cross-checked against its /metrics counter.",
                ),
                (
                    f"TTFT is request start to the first text chunk. Tokens/s per user is 1 / TPOT, where TPOT = "
                    f"(E2E - TTFT) / (output tokens - 1); the SLO judges TTFT and TPOT at {judged}.",
                ),
                (
                    '"Bound by" is read from the phase\'s telemetry (GPU memory bandwidth via NVML GPM, SM activity, '
                    "the server's queue and KV cache, client and server CPU).",
                ),
            )
        ),
    ]


def _document(run: Run, figures: Sequence[tuple[str, str, str, str]]) -> list[Block]:
    head = run_headline(run)
    blocks = _intro(run) + _result(run, head) + _trial_table(run)
    if figures:
        blocks.append(Heading(2, "Plots"))
        blocks.extend(Figure(file, alt, svg, caption) for file, alt, svg, caption in figures)
    else:
        blocks += [Heading(2, "Plots"), Para(("No plots: no trial has a measured point.",))]
    return blocks + _logs(run) + _point_tables(run) + _reading_notes(run)


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
    """Write via a temporary file and a rename, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {path}: {error.strerror or error}") from None


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> ReportFiles:
    """Write ``report.json``, ``report.md``, ``report.html`` and the SVG plots into ``out_dir`` (created).

    Files are replaced atomically, so writing again (``infertop report``) is safe. Plots are written only
    when some trial has a measured point.

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
    blocks = _document(run, figures)
    model = as_text(data.get("model")) or "model"
    files = ReportFiles(
        json=out / "report.json", markdown=out / "report.md", html=out / "report.html", plots=plot_paths
    )
    _write_atomic(files["json"], json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(files["markdown"], to_markdown(blocks))
    _write_atomic(files["html"], to_html(blocks, f"infertop tuning report: {model}"))
    return files


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` this module wrote.

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
    if data.get("version") != REPORT_VERSION:
        raise ReportError(
            f"{path} is a report of version {data.get('version')!r}; this infertop reads {REPORT_VERSION}"
        )
    return data
