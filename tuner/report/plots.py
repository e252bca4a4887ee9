"""The plots of a tuning report, as :mod:`tuner.report.svgplot` charts: TTFT p95 and output throughput against
the load of each judged point (with their 90 % intervals as error bars, the SLO limit, and the exported
configuration's relaunch), and throughput per GPU against speed per user (with the Pareto frontier).

Only the capacity search's judged points at the run's own load kind go on the "vs load" charts: scouting phases
are closed loop at a handful of users and only found the pace, so they would sit on another axis. They do go on
the Pareto chart, which needs no common load axis and shows the whole throughput/latency trade-off.
"""

from __future__ import annotations

from collections.abc import Callable

from tuner.report import svgplot
from tuner.report.data import Interval, Point, Run, Trial, as_mapping, pareto_front
from tuner.report.document import fmt_estimate, num_secs, num_tok_s

Figure = Callable[[Point], tuple[float | None, Interval | None]]
"""A point's y value and its interval."""


def _ttft(p: Point) -> tuple[float | None, Interval | None]:
    return p.figure("ttft_p95_s"), p.ttft_p95_ci


def _tok_s(p: Point) -> tuple[float | None, Interval | None]:
    return p.tok_s, p.tok_s_ci


def plots(run: Run) -> list[tuple[str, svgplot.Chart, str]]:
    """(file name, chart, caption) for each plot; none when no trial has a measured point."""
    measured = [t for t in [*run.ranking, *run.trials] if t.points]
    measured = list(dict.fromkeys(measured))
    if not measured:
        return []
    kind = run.objective or next((p.load.kind for t in measured for p in t.points if p.load), "users")
    styles = {t.key: svgplot.style_for(i) for i, t in enumerate(measured)}
    judged = str(as_mapping(run.raw.get("slo")).get("judged_at") or "p95")
    key = ("met the SLO", "did not (failed or at the limit)")

    def name(trial: Trial) -> str:
        if trial is run.winner:
            return f"{trial.label} (exported)"
        defaults = trial is run.defaults and "default" not in trial.label.lower()
        return trial.label + (" (vLLM defaults)" if defaults else "")

    def highlight(trial: Trial, point: Point) -> str | None:
        if point is not trial.best_point or point.load is None:
            return None
        if trial is run.winner:
            return f"capacity: {point.load.label}"
        if trial is run.defaults:
            return f"vLLM defaults: {point.load.label}"
        return None

    def tip(trial: Trial, p: Point) -> str:
        return (
            f"{trial.label}, {p.role} at {p.load.label if p.load else 'n/a'}: "
            f"{fmt_estimate(p.tok_s, p.tok_s_ci, num_tok_s, ' tok/s')}, TTFT {judged} "
            f"{fmt_estimate(p.figure('ttft_p95_s'), p.ttft_p95_ci, num_secs, ' s')}: {p.why()}"
        )

    def vs_load(figure: Figure) -> list[svgplot.Series]:
        out = []
        for trial in measured:
            color, shape = styles[trial.key]
            marks = []
            for p in trial.points:
                y, ci = figure(p)
                judged = p.role != "scout"  # scouting only found the pace, closed loop, on point estimates
                if judged and p.load and p.load.kind == kind and y is not None and not p.aborted:
                    marks.append(
                        svgplot.Marker(p.load.value, y, p.passed, highlight(trial, p), tip(trial, p), ci)
                    )
            width_px = 3.0 if trial is run.winner else 2.0  # the exported configuration stands out
            out.append(svgplot.Series(name(trial), tuple(marks), color, shape, width_px=width_px))
        relaunch = _relaunch(run, kind, figure, tip, styles)
        return out + ([relaunch] if relaunch else [])

    x_label = "arrival rate (req/s, Poisson)" if kind == "rate" else "concurrent users (log2 scale)"
    load_word = "arrival rate" if kind == "rate" else "concurrency"
    slo = run.slo
    ttft_max = slo.ttft_p95_max_s if slo else None
    ttft = svgplot.Chart(
        title=f"TTFT {judged} vs {load_word}",
        subtitle="judged points of each search, bars: 90 % intervals; lower is better",
        x_label=x_label,
        y_label=f"TTFT {judged} (s)",
        series=tuple(vs_load(_ttft)),
        hlines=(svgplot.HLine(ttft_max, f"SLO TTFT {judged} limit {ttft_max:.2f} s"),) if ttft_max else (),
        x_log2=kind != "rate",
        marker_key=key,
    )
    throughput = svgplot.Chart(
        title=f"Output throughput vs {load_word}",
        subtitle="all users together, bars: 90 % intervals; higher is better",
        x_label=x_label,
        y_label="output tok/s (all GPUs)" if run.gpus >= 1 else "output tok/s",
        series=tuple(vs_load(_tok_s)),
        x_log2=kind != "rate",
        marker_key=key,
    )
    return [
        (
            "ttft_vs_load.svg",
            ttft,
            f"TTFT {judged} of each judged point of the capacity searches, with its 90 % interval (a dashed bar "
            "running to the top: too few requests to bound it from above). Filled markers passed: the whole "
            "interval under the dashed SLO limit. Diamonds: vLLM relaunched from the exported file (proof and "
            "production checks).",
        ),
        (
            "throughput_vs_load.svg",
            throughput,
            "Output tokens/s in the steady window of each judged point, with its 90 % interval (a bootstrap over "
            "sub-windows). Past the capacity more load only adds queueing.",
        ),
        ("pareto.svg", _pareto(run, measured, styles, key, judged), _PARETO_CAPTION.format(judged=judged)),
        *_vs_model(run, measured, styles, kind),
    ]


def _vs_model(
    run: Run, measured: list[Trial], styles: dict[str, tuple[str, str]], kind: str
) -> list[tuple[str, svgplot.Chart, str]]:
    """Measured capacity against the performance model's prediction, one marker per trial, with the line where
    they agree; none when no trial was predicted."""
    pairs = [
        (t, t.predicted, t.capacity.lo) for t in measured if t.predicted and t.capacity and t.capacity.lo
    ]
    if not pairs:
        return []
    unit = "req/s" if kind == "rate" else "users"
    series = []
    for trial, predicted, capacity in pairs:
        color, shape = styles[trial.key]
        label = "exported" if trial is run.winner else None
        tip = f"{trial.label}: measured {capacity:.3g} {unit}, predicted {predicted:.3g} ({capacity / predicted:.2f}x)"
        series.append(
            svgplot.Series(
                trial.label, (svgplot.Marker(predicted, capacity, True, label, tip),), color, shape, False
            )
        )
    top = max(max(p, c) for _, p, c in pairs) * 1.1
    agree = svgplot.Series(
        "measured = predicted",
        (svgplot.Marker(0.0, 0.0), svgplot.Marker(top, top)),
        markers=False,
        dashed=True,
    )
    chart = svgplot.Chart(
        title="Measured capacity vs the performance model's",
        subtitle="one marker per trial; on the dashed line the model was right, below it optimistic",
        x_label=f"predicted capacity ({unit})",
        y_label=f"measured capacity ({unit})",
        series=(agree, *series),
    )
    caption = (
        "Each trial's capacity under the SLO as measured against what the performance model predicted for it "
        "before the launch. The search launched in the order of these predictions, corrected after every trial; "
        "a trial far below the line is a finding (a client or API front-end limit, throttling, a driver setting)."
    )
    return [("measured_vs_predicted.svg", chart, caption)]


def _relaunch(
    run: Run,
    kind: str,
    figure: Figure,
    tip: Callable[[Trial, Point], str],
    styles: dict[str, tuple[str, str]],
) -> svgplot.Series | None:
    """The verdict's proof and production checks for the exported configuration, as diamonds."""
    verdict, winner = run.verdict, run.winner
    if verdict is None or winner is None:
        return None
    marks = []
    for attempt in verdict.attempts:
        if attempt.key != winner.key:
            continue
        for p in (attempt.proof, *attempt.checks):
            y, ci = figure(p) if p else (None, None)
            if p and p.load and p.load.kind == kind and y is not None and not p.aborted:
                marks.append(svgplot.Marker(p.load.value, y, p.passed, None, tip(winner, p), ci))
    if not marks:
        return None
    color = styles.get(winner.key, (svgplot.INK, ""))[0]
    return svgplot.Series(
        f"{winner.label}: relaunched from the file", tuple(marks), color, "diamond", line=False
    )


_PARETO_CAPTION = (
    "Each marker is one measured point (scouting and judged) of one configuration; filled markers met the SLO. "
    "The grey line joins the points no other point beats on both axes. The dashed line is the SLO's per-user "
    "floor; the SLO judges it on TPOT {judged}, so a marker above it (p50) can still miss."
)


def _pareto(
    run: Run, measured: list[Trial], styles: dict[str, tuple[str, str]], key: tuple[str, str], judged: str
) -> svgplot.Chart:
    scatter = []
    for trial in measured:
        color, shape = styles[trial.key]
        marks = []
        for p in trial.points:
            x, y = run.per_gpu(p.tok_s), p.figure("user_tok_per_s_p50")
            if x is not None and y is not None and not p.aborted:
                hl = (
                    f"best: {p.load.label}"
                    if trial is run.winner and p is trial.best_point and p.load
                    else None
                )
                marks.append(
                    svgplot.Marker(
                        x, y, p.passed, hl, f"{trial.label}, {p.role} at {p.load.label if p.load else 'n/a'}"
                    )
                )
        scatter.append(svgplot.Series(trial.label, tuple(marks), color, shape, line=False))
    front = pareto_front((m.x, m.y) for s in scatter for m in s.points)
    frontier = svgplot.Series(
        "Pareto frontier (all points)",
        tuple(svgplot.Marker(x, y) for x, y in front),
        svgplot.INK,
        markers=False,
        width_px=1.5,
    )
    floor = run.slo.tok_s_per_user_min if run.slo else None
    return svgplot.Chart(
        title="Throughput per GPU vs speed per user",
        subtitle="one marker per measured point; up and to the right is better",
        x_label="output tok/s per GPU" if run.gpus >= 1 else "output tok/s (CPU server)",
        y_label="tok/s per user (p50)",
        series=(frontier, *scatter),
        hlines=(svgplot.HLine(floor, f"SLO floor {floor:.1f} tok/s per user (judged on TPOT {judged})"),)
        if floor
        else (),
        marker_key=key,
    )
