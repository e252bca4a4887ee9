"""The three plots of a tuning report, as :mod:`tuner.report.svgplot` charts: throughput per GPU against speed per
user (with the Pareto frontier), TTFT against concurrency, and aggregate throughput against concurrency."""

from __future__ import annotations

from typing import Any

from tuner.report import svgplot
from tuner.report.data import Point, Run, Trial, as_mapping, pareto_front
from tuner.report.document import fmt_ms, fmt_tok_s, fmt_users, ms_value


def plots(run: Run) -> list[tuple[str, svgplot.Chart, str]]:
    """(file name, chart, caption) for each plot; none when no trial has a measured point."""
    measured = [t for t in run.trials if t.points]
    if not measured:
        return []
    styles = {t.key: svgplot.style_for(i) for i, t in enumerate(measured)}
    slo = run.slo
    judged = str(as_mapping(run.raw.get("slo")).get("judged_at") or "p95")
    key = ("met the SLO", "missed the SLO")

    def name(trial: Trial) -> str:
        # Numbered as in the trials table: labels of similar configs differ only at their end.
        return f"{trial.index + 1}. {trial.label}" + (" (best)" if trial is run.winner else "")

    def highlight(trial: Trial, point: Point) -> str | None:
        if trial is run.winner and point is trial.best_point:
            return f"best: {fmt_users(point.concurrency)}"
        if trial is run.defaults and trial is not run.winner and point is trial.best_point:
            return f"vLLM defaults: {fmt_users(point.concurrency)}"
        return None

    def tip(trial: Trial, point: Point) -> str:
        return (
            f"{trial.label}: {fmt_users(point.concurrency)}, {fmt_tok_s(point.tok_s)}, "
            f"{fmt_tok_s(point.stat('user_tok_per_s_p50'))} per user (p50), TTFT p95 {fmt_ms(point.stat('ttft_p95_s'))}"
            + ("" if point.passed else " (missed the SLO)")
        )

    def series(x: Any, y: Any, *, line: bool, marks: bool = True) -> list[svgplot.Series]:
        out = []
        for trial in measured:
            color, shape = styles[trial.key]
            points = []
            for p in trial.points:
                xv, yv = x(p), y(p)
                if xv is not None and yv is not None:
                    hl = highlight(trial, p) if marks else None
                    points.append(svgplot.Marker(xv, yv, p.passed, hl, tip(trial, p)))
            width_px = 3.0 if trial is run.winner else 2.0  # the winner's line stands out among many
            out.append(svgplot.Series(name(trial), tuple(points), color, shape, line=line, width_px=width_px))
        return out

    per_gpu = "output tok/s per GPU" if run.gpus >= 1 else "output tok/s (CPU server)"
    scatter = series(lambda p: run.per_gpu(p.tok_s), lambda p: p.stat("user_tok_per_s_p50"), line=False)
    front = pareto_front((m.x, m.y) for s in scatter for m in s.points)
    frontier = svgplot.Series(
        "Pareto frontier (all points)",
        tuple(svgplot.Marker(x, y) for x, y in front),
        svgplot.INK,
        markers=False,
        width_px=1.5,
    )
    floor = slo.tok_s_per_user_min if slo else None
    pareto = svgplot.Chart(
        title="Throughput per GPU vs speed per user",
        subtitle="one marker per measured concurrency; up and to the right is better",
        x_label=per_gpu,
        y_label="tok/s per user (p50)",
        series=(frontier, *scatter),
        hlines=(svgplot.HLine(floor, f"SLO floor {floor:.1f} tok/s per user (judged on TPOT {judged})"),)
        if floor
        else (),
        marker_key=key,
    )
    ttft_max = slo.ttft_p95_max_s if slo else None
    ttft = svgplot.Chart(
        title="Time to first token vs concurrency",
        subtitle="lower is better",
        x_label="concurrent users (log2 scale)",
        y_label="TTFT p95 (ms)",
        series=tuple(
            series(
                lambda p: float(p.concurrency),
                lambda p: ms_value(p.stat("ttft_p95_s")),
                line=True,
                marks=False,
            )
        ),
        hlines=(svgplot.HLine(ttft_max * 1000, f"SLO TTFT {judged} limit {ttft_max * 1000:,.0f} ms"),)
        if ttft_max
        else (),
        x_log2=True,
        marker_key=key,
    )
    throughput = svgplot.Chart(
        title="Aggregate output throughput vs concurrency",
        subtitle="all users together; higher is better",
        x_label="concurrent users (log2 scale)",
        y_label="output tok/s (all GPUs)" if run.gpus >= 1 else "output tok/s",
        series=tuple(series(lambda p: float(p.concurrency), lambda p: p.tok_s, line=True)),
        x_log2=True,
        marker_key=key,
    )
    return [
        (
            "pareto.svg",
            pareto,
            "Each marker is one measured concurrency of one configuration; filled markers met the SLO. The grey "
            "line joins the points no other point beats on both axes. The dashed line is the SLO's per-user "
            f"floor; the SLO judges it on TPOT {judged}, so a marker above it (p50) can still miss.",
        ),
        (
            "ttft_vs_concurrency.svg",
            ttft,
            f"TTFT {judged} per configuration; the dashed line is the SLO limit.",
        ),
        (
            "throughput_vs_concurrency.svg",
            throughput,
            "Aggregate output tokens/s of all concurrent users; past saturation more users only add latency.",
        ),
    ]
