"""The report's sections as one list of :mod:`tuner.report.document` blocks: the verdict's line first, then
what was exported and at which load, the run, the verdict's relaunches, the trials, the plots, each trial's
points, the server logs and how to read the figures. :mod:`tuner.report.write` renders them and writes files.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.report.data import (
    Attempt,
    Capacity,
    Headline,
    Point,
    Run,
    Trial,
    as_interval,
    as_mapping,
    as_number,
    as_text,
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
    fmt_estimate,
    fmt_joules,
    fmt_secs,
    fmt_times,
    fmt_usd,
    num_ms,
    num_secs,
    num_tok_s,
)
from tuner.tuning.export import serve_cli_flags

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


def _load(point: Point | None) -> str:
    return point.load.label if point and point.load else NA


def _tok_s(p: Point | None, unit: str = "") -> str:
    return fmt_estimate(p.tok_s, p.tok_s_ci, num_tok_s, unit) if p else NA


def _ttft(p: Point | None, unit: str = "") -> str:
    return fmt_estimate(p.figure("ttft_p95_s"), p.ttft_p95_ci, num_secs, unit) if p else NA


def _tpot(p: Point | None, unit: str = "") -> str:
    return fmt_estimate(p.figure("tpot_p95_s"), p.tpot_p95_ci, num_ms, unit) if p else NA


def _decision(p: Point) -> Inline:
    if p.aborted:
        return bold("aborted")
    words: dict[str, Inline] = {"pass": "pass", "fail": bold("fail"), "uncertain": bold("at the limit")}
    return words.get(p.decision, NA)


def _bracket(capacity: Capacity | None) -> str:
    """``"32.1 req/s held; 34 req/s did not"``: the capacity and what bounds it from above."""
    if capacity is None:
        return NA
    if capacity.best is None:
        return "nothing held"
    above = f"{_load(capacity.ceiling)} did not" if capacity.ceiling else "no load above it failed"
    return f"{_load(capacity.best)} held; {above}"


def _figures_line(figures: Mapping[str, Any]) -> str:
    """The operating point's figures with their intervals, as the verdict recorded them."""
    confidence = as_number(figures.get("confidence"))
    requests, window_s = as_number(figures.get("requests")), as_number(figures.get("window_s"))
    tok_s = fmt_estimate(
        as_number(figures.get("output_tokens_per_s")),
        as_interval(figures.get("output_tokens_per_s_ci")),
        num_tok_s,
        " tok/s",
    )
    ttft = fmt_estimate(
        as_number(figures.get("ttft_p95_s")), as_interval(figures.get("ttft_p95_ci_s")), num_secs, " s"
    )
    tpot = fmt_estimate(
        as_number(figures.get("tpot_p95_s")), as_interval(figures.get("tpot_p95_ci_s")), num_ms, " ms"
    )
    level = f"{confidence * 100:.0f} %" if confidence is not None else NA
    return (
        f"output {tok_s}, TTFT p95 {ttft}, TPOT p95 {tpot}; {level} intervals, {fmt_bare(requests)} requests "
        f"over {fmt_secs(window_s)} of steady window"
    )


def _serve_command(model: str, config: Mapping[str, Any]) -> str:
    args = ["vllm", "serve", shlex.quote(model)]
    for key, value in config.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            text = json.dumps(value) if isinstance(value, (Mapping, list)) else str(value)
            args.extend((f"--{key}", shlex.quote(text)))
    return " ".join(args)


_LOAD_MODELS = {
    "rate": (
        "Poisson arrivals, open loop",
        "Poisson arrivals at a fixed rate (open loop): capacity in requests/s",
    ),
    "users": (
        "concurrent users, closed loop",
        "concurrent users, each sending the next request when the last ends (closed loop): capacity in users",
    ),
}
"""Each objective's load model: (a few words, a sentence)."""


# --- the opening: the result's line, then what was exported and how sure it is -------------------------


def _opening(run: Run, head: Headline) -> list[Block]:
    if head.text:
        title = head.text
    elif run.legacy:
        title = "REPORT OF AN OLDER INFERTOP (format version 1): limited view"
    else:
        title = "NO RESULT LINE: this report records no headline (n/a)"
    blocks: list[Block] = [Heading(1, title)]
    verdict = run.verdict
    if run.legacy:
        blocks.append(
            Para(
                (
                    bold("Report of an older infertop (format version 1): limited view."),
                    " It measured fixed numbers of concurrent users without intervals and kept no verdict; the "
                    "trials and their points follow as far as they can be read. Run ",
                    code("infertop tune"),
                    " again for a verdict with 90 % intervals.",
                ),
                "warning",
            )
        )
    elif verdict and verdict.status == "not_proven":
        blocks.append(Para((bold("The exported file is NOT proven."), " ", *_not_proven_why(run)), "warning"))
    elif verdict and verdict.status == "unverified":
        blocks.append(
            Para(
                (
                    bold("The exported file is UNVERIFIED:"),
                    " vLLM was never relaunched from it (",
                    code("--no-prove"),
                    "), so its figures come from the search alone.",
                ),
                "warning",
            )
        )
    if run.raw.get("interrupted"):
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
    if not run.legacy:
        blocks.append(Bullets(tuple(_summary_lines(run, head))))
        command = _commands(run)
        if command:
            blocks.append(Code(command))
    return blocks


def _not_proven_why(run: Run) -> tuple[Inline, ...]:
    verdict = run.verdict
    attempts = verdict.attempts if verdict else ()
    if not attempts:
        return ("vLLM was never relaunched from it before the run ended.",)
    failures = "; ".join(f"{a.label}: {_attempt_failure(a)}" for a in attempts)
    return (f"vLLM relaunched from it did not hold the SLO ({failures}). Do not size a server on it.",)


def _attempt_failure(a: Attempt) -> str:
    if a.error:
        return f"did not start ({a.error})"
    if not a.checks and a.proof is None:
        return "nothing measured"
    if a.checks and a.held is None:
        lowest = a.checks[-1]
        return f"no production check held, down to {_load(lowest)} ({lowest.why()})"
    proof = a.proof
    return f"the proof at {_load(proof)}: {proof.why()}" if proof else "n/a"


def _summary_lines(run: Run, head: Headline) -> list[tuple[Inline, ...]]:
    verdict, w = run.verdict, run.winner
    lines: list[tuple[Inline, ...]] = []
    if w is None:
        lines.append(
            ("Nothing exported: no configuration held a load within the SLO (each trial's reason is below).",)
        )
    else:
        attempt = next((a for a in verdict.attempts if a.key == w.key), None) if verdict else None
        where = (" in ", code(Path(attempt.yaml).name)) if attempt and attempt.yaml else ()
        op = verdict.operating_point if verdict else None
        if op is not None and verdict:
            held = "(the production check that held on the server relaunched from the file)."
            lines.append(("Exported: ", bold(w.label), *where, ", to be run at ", bold(op.label), f" {held}"))
            lines.append((f"At {op.label} on the relaunched server: {_figures_line(verdict.figures)}.",))
        else:
            lines.append(("Exported: ", bold(w.label), *where, ", with no proven operating point."))
        kind = _LOAD_MODELS.get(run.objective or "", (NA, NA))[0]
        if w.replicas > 1 and w.capacity is not None and w.capacity.lo is not None:
            node = w.capacity.lo * w.replicas
            lines.append(
                (
                    "Capacity found in the search: one replica ",
                    bold(_bracket(w.capacity)),
                    f" ({kind}); "
                    f"the node as {w.layout or f'{w.replicas} replicas'}: {fmt_bare(node)} "
                    f"(one replica's x {w.replicas}: a prediction until the node proof).",
                )
            )
        else:
            lines.append(("Capacity found in the search: ", bold(_bracket(w.capacity)), f" ({kind})."))
    lines.append(_against_defaults(run, head))
    lines.extend((bold("Tie:"), f" {tie}.") for tie in run.ties)
    lines.extend(_cost_and_energy(run, head))
    return lines


def _against_defaults(run: Run, head: Headline) -> tuple[Inline, ...]:
    w, d = run.winner, run.defaults
    if d is None:
        return ("vLLM's defaults were not measured in this run: no comparison with them.",)
    if w is None:
        return (f"vLLM's defaults: {_bracket(d.capacity)} ({d.reason or d.status}).",)
    if w is d:
        return ("vLLM's defaults were the best configuration: no tuned change held a load they did not.",)
    if d.best_point is None:
        return (
            f"vLLM's defaults held no load within the SLO ({d.reason or d.status}): the tuned configuration is "
            "what makes the SLO reachable.",
        )
    clear = (
        f"; {w.label} held a load the defaults did not"
        if head.clear_win
        else "; within the uncertainty of the two brackets, not a clear win"
    )
    return (
        f"Against vLLM's defaults ({_bracket(d.capacity)}): ",
        bold(f"{fmt_times(head.capacity_ratio)} the capacity"),
        f"{clear}.",
    )


def _cost_and_energy(run: Run, head: Headline) -> list[tuple[Inline, ...]]:
    at = head.figures_at
    if at is None:
        return []
    where = f"at {_load(at)}" + (
        " (the operating point)" if head.figures_at_operating_point else " (the best load held in the search)"
    )
    price = run.price_per_gpu_hour
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
            f"Cost per 1M output tokens {where}: ",
            bold(fmt_usd(head.cost_per_million_output_tokens_usd)),
            f" at ${price:,.2f} per GPU-hour x {run.gpus} GPU{'s' if run.gpus > 1 else ''} "
            "(price x GPUs x 1e6 / (output tok/s x 3600), as Artificial Analysis computes it).",
        )
    if head.joules_per_output_token is not None:
        energy: tuple[Inline, ...] = (
            f"GPU energy per output token {where}: ",
            bold(fmt_joules(head.joules_per_output_token)),
            " (power integrated over the measured phases, all GPUs, over their output tokens).",
        )
    else:
        energy = ("GPU energy per output token: n/a (no GPU power readings for those phases).",)
    lines = [cost, energy]
    if head.tokens_per_s_per_gpu is not None:
        per_kw = head.tokens_per_s_per_kw
        lines.append(
            (
                f"The node {where}: {fmt_bare(head.output_tokens_per_s)} output tok/s, ",
                bold(f"{fmt_bare(head.tokens_per_s_per_gpu)} per GPU"),
                f" over its {run.gpus} GPU{'s' if run.gpus != 1 else ''} (idle ones count)",
                *(
                    (
                        "; ",
                        bold(f"{fmt_bare(per_kw)} per kW"),
                        f" of the GPUs' measured power ({fmt_bare(head.power_w)} W).",
                    )
                    if per_kw is not None
                    else ("; per kW: n/a (no GPU power readings).",)
                ),
            )
        )
    return lines


def _commands(run: Run) -> str:
    w = run.winner
    if w is None:
        return ""
    model = as_text(run.raw.get("model")) or "MODEL"
    verdict = run.verdict
    attempt = next((a for a in verdict.attempts if a.key == w.key and a.yaml), None) if verdict else None
    lines = []
    if attempt and attempt.yaml:
        flags = serve_cli_flags(w.config)
        lines += [
            " ".join(("vllm serve --config", shlex.quote(attempt.yaml), *flags)),
            "# the same, as flags:",
        ]
    return "\n".join([*lines, _serve_command(model, w.config)])


# --- the run ---------------------------------------------------------------------------------------------


def _about(run: Run) -> list[Block]:
    raw = run.raw
    hardware = as_mapping(raw.get("hardware"))
    slo_raw = as_mapping(raw.get("slo"))
    workload = as_mapping(raw.get("workload"))
    label = as_text(raw.get("hardware_label")) or as_text(hardware.get("gpu_name")) or NA
    vram = as_number(hardware.get("vram_per_gpu_bytes"))
    cc = hardware.get("compute_capability")
    hw_detail = []
    if vram:
        hw_detail.append(f"{vram / 2**30:.0f} GiB per GPU")
    if isinstance(cc, (list, tuple)) and len(cc) == 2:
        hw_detail.append(f"compute capability {cc[0]}.{cc[1]}")
    judged = str(slo_raw.get("judged_at") or "p95")
    describe = as_text(slo_raw.get("describe")) or (run.slo.describe() if run.slo else NA)
    source = as_text(slo_raw.get("source"))
    in_len, out_len = as_number(workload.get("input_len")), as_number(workload.get("output_len"))
    vocab = as_number(workload.get("vocab_size"))
    confidence = as_number(workload.get("confidence"))
    min_phase_s = as_number(workload.get("min_phase_s"))
    requests = (as_number(workload.get("min_requests")), as_number(workload.get("max_requests")))
    started, finished = as_number(raw.get("started_s")), as_number(raw.get("finished_s"))
    grid, launches = as_number(raw.get("grid_size")), as_number(raw.get("launches"))
    counts: dict[str, int] = {}
    for trial in run.trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"
    model = as_text(raw.get("model"))
    slo_name = as_text(slo_raw.get("name"))
    over = "each phase, on point estimates" if run.legacy else "each steady window, with its interval"
    items: list[tuple[Inline, ...]] = [
        ("Model: ", code(model) if model else NA),
        ("Hardware: ", label + (f" ({', '.join(hw_detail)})" if hw_detail else "")),
        (
            "SLO: ",
            *((bold(slo_name), ": ") if slo_name else ()),
            describe + (f". Source: {source}" if source else ""),
        ),
        (
            f"Judged at {judged} over {over}. Phases last tens of seconds, where MLPerf judges p99 over at "
            "least 600 s: a pass here makes a strong candidate for a full-length run, not a certified result.",
        ),
        (
            "Load: ",
            "fixed numbers of concurrent users (closed loop)"
            if run.legacy
            else _LOAD_MODELS.get(run.objective or "", (NA, NA))[1],
        ),
        (
            "Workload: ",
            f"{fmt_bare(in_len)} input and {fmt_bare(out_len)} output tokens per request"
            if in_len is not None and out_len is not None
            else NA,
            f", prompt token ids below {fmt_bare(vocab)}" if vocab is not None else "",
            f"; each phase at least {fmt_secs(min_phase_s)}" if min_phase_s is not None else "",
            f", {fmt_bare(requests[0])} to {fmt_bare(requests[1])} requests a point"
            if None not in requests
            else "",
            f"; {confidence * 100:.0f} % intervals" if confidence is not None else "",
        ),
    ]
    traffic = as_text(as_mapping(as_mapping(raw.get("workload")).get("workload")).get("describe"))
    if traffic:
        items.append(("Traffic: ", traffic, " (the lengths above are its means)"))
    best = run.winner.best_point if run.winner is not None else None
    hits, queries = (
        (as_number(best.evidence.get(k)) for k in ("prefix_cache_hits", "prefix_cache_queries"))
        if best
        else (None, None)
    )
    if hits is not None and queries:
        items.append(
            (
                "Prefix cache: ",
                f"vLLM's prefix cache served {hits / queries:.0%} of the prompt tokens at the exported "
                "configuration's capacity (its counters, the last phase)",
            )
        )
    cpu = as_text(raw.get("cpu"))
    if cpu:
        items.append(("CPU: ", cpu))
    prediction = as_text(raw.get("prediction"))
    if prediction:
        items.append(("Search order: ", prediction))
    budget = as_text(raw.get("budget_note"))
    exit_code = as_number(raw.get("exit_code"))
    items.append(
        (
            f"Run: started {_when(started)}, took "
            f"{_duration(finished - started if started and finished else None)}; "
            f"{fmt_bare(launches)} server launches; {len(run.trials)} trials ({tally})"
            + (f" out of {grid:.0f} feasible configurations in the grid" if grid is not None else "")
            + (f"; {budget}" if budget else "")
            + (f"; exit status {exit_code:.0f}" if exit_code is not None else ""),
        )
    )
    return [Heading(2, "The run"), Bullets(tuple(items))]


# --- the verdict -----------------------------------------------------------------------------------------

_MEANING = {
    "proven": "vLLM relaunched from the exported file held the capacity and the production check with every "
    "interval inside the SLO: size a production server for {op} of this workload.",
    "backed_off": "the exported file holds {op}, but not everything the search promised (below): size a server "
    "for {op}, not for the capacity found in the search.",
    "unverified": "vLLM was never relaunched from the exported file (--no-prove): the capacity comes from the "
    "search alone. Run again without --no-prove before sizing a server on it.",
}


_STATUS_WORDS = {"proven": "PROVEN", "backed_off": "PROVEN AFTER BACKING OFF", "unverified": "UNVERIFIED"}


def _verdict(run: Run) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Verdict")]
    verdict = run.verdict
    if verdict is None:
        why = (
            "the run was interrupted before vLLM was relaunched from the exported file"
            if run.raw.get("interrupted")
            else "no configuration held a load within the SLO, so nothing was exported or relaunched"
        )
        return [*blocks, Para((f"No verdict: {why}.",))]
    op = verdict.operating_point.label if verdict.operating_point else NA
    word = _STATUS_WORDS.get(verdict.status, verdict.status.replace("_", " ").upper())
    if verdict.status == "not_proven":
        blocks.append(
            Para(
                (bold("NOT PROVEN: the exported file is NOT proven."), " ", *_not_proven_why(run)), "warning"
            )
        )
    else:
        meaning = _MEANING.get(verdict.status, "n/a").format(op=op)
        blocks.append(Para((bold(f"{word}:"), f" {meaning}")))
    for i, attempt in enumerate(verdict.attempts):
        role = "the winner" if i == 0 else "the runner-up"
        blocks.append(Heading(3, f"Relaunch {i + 1}: {attempt.label} ({role})"))
        blocks.extend(_attempt(run, attempt))
    blocks.extend(_node_export(run))
    return blocks


def _node_export(run: Run) -> list[Block]:
    """How a layout of several replicas is exported, decided by measurement: one --data-parallel-size server
    where it held the node's loads as the independent servers did, else one server per replica."""
    raw = run.raw.get("verdict")
    dp = raw.get("dp") if isinstance(raw, dict) else None
    if not isinstance(dp, dict):
        return []
    replicas = dp.get("replicas")
    what = str(dp.get("describe") or "")
    if dp.get("held") is True:
        text = (
            f"Exported as one server with --data-parallel-size {replicas} (best.yaml): {what}. "
            "serve-node.sh and best-replica-N.yaml start the same layout as independent servers."
        )
    else:
        text = (
            f"Exported as {replicas} independent servers (serve-node.sh, best-replica-N.yaml; best.yaml is one "
            f"replica's configuration): {what}."
        )
    return [Heading(3, "How the node is served"), Para((text,))]


def _attempt(run: Run, a: Attempt) -> list[Block]:
    yaml: Inline = code(a.yaml) if a.yaml else NA
    if a.error:
        return [Bullets((("Relaunched from ", yaml, f": did not start: {a.error}."),))]
    items: list[tuple[Inline, ...]] = [("Relaunched from ", yaml, f": start-up {fmt_secs(a.startup_s)}.")]
    trial = run.trial(a.key)
    searched = trial.best_point if trial else None
    if a.proof is not None:
        p = a.proof
        outcome: Inline = "held" if a.proof_ok else bold("did not hold")
        what = (
            f"the capacity found in the search, {a.replicas} replicas loaded together as one node"
            if a.replicas > 1
            else "the capacity found in the search"
        )
        delivered = (
            f", delivered {fmt_times(a.proof_ratio)} the arrivals" if a.proof_ratio is not None else ""
        )
        items.append(
            (
                f"Proof at {_load(p)} ({what}): ",
                _decision(p),
                f"; {_tok_s(p, ' tok/s')}{delivered}: ",
                outcome,
                f"; {p.why()}.",
            )
        )
        if a.replicas > 1:
            predicted = a.predicted_node_tokens_per_s
            items.append(
                (
                    f"The node: {fmt_bare(predicted)} tok/s predicted from one replica's trial x {a.replicas} "
                    f"(a prediction); {_tok_s(p, ' tok/s')} measured with every replica loaded (the measurement).",
                )
            )
        elif searched is not None:
            items.append((f"The trial's window read {_tok_s(searched, ' tok/s')} at its capacity.",))
    else:
        items.append(("Proof: n/a (not measured).",))
    held = a.held
    if held is not None:
        items.append((bold(f"Holds {_load(held)}"), " on a server started from the file alone."))
    elif a.checks:
        items.append((bold("No production check held"), f": not even {_load(a.checks[-1])}."))
    blocks: list[Block] = [Bullets(tuple(items))]
    if a.checks:
        rows = tuple(
            (
                _load(c),
                _decision(c),
                _tok_s(c),
                _ttft(c),
                _tpot(c),
                f"{fmt_bare(c.requests)} / {fmt_secs(c.figure('window_s'))}",
                c.why(),
            )
            for c in a.checks
        )
        blocks.append(
            Table(
                (
                    "production check",
                    "decision",
                    "output tok/s (90 % interval)",
                    "TTFT p95, s (90 % interval)",
                    "TPOT p95, ms (90 % interval)",
                    "requests / steady window",
                    "why",
                ),
                rows,
                (False, False, True, True, True, True, False),
            )
        )
    return blocks


# --- the trials and their points -------------------------------------------------------------------------


def _ordered(run: Run) -> list[Trial]:
    """Ranked trials first, best first; then the rest as they ran."""
    return [*run.ranking, *(t for t in run.trials if t not in run.ranking)]


def _name(run: Run, t: Trial) -> Inline:
    if t is run.winner:
        return bold(f"{t.label} ★")
    mark = " (vLLM defaults)" if t is run.defaults and "default" not in t.label.lower() else ""
    return t.label + mark


def _trial_table(run: Run) -> list[Block]:
    if not run.trials:
        return [Heading(2, "Trials"), Para(("No trials were recorded.",))]
    ranks = {t.key: i + 1 for i, t in enumerate(run.ranking)}
    rows = []
    for t in _ordered(run):
        best = t.best_point
        rows.append(
            (
                str(ranks[t.key]) if t.key in ranks else "-",
                _name(run, t),
                t.status,
                _bracket(t.capacity),
                _vs_model(t),
                "-" if t.pct_of_ceiling is None else f"{t.pct_of_ceiling:.0f} %",
                _tok_s(best),
                _ttft(best),
                _bound(best),
                fmt_bare(t.startup_s),
                "" if t.status == "feasible" else t.reason or NA,
            )
        )
    return [
        Heading(2, "Trials"),
        Para(
            (
                "Best first (the ranking; unranked trials held nothing or did not run). ★ marks the exported "
                "configuration. Throughput and TTFT are at the best load each trial held, with their 90 % "
                'intervals. "vs model": the capacity measured over the performance model\'s prediction (in '
                "brackets); far from 1.00x is a finding: a client or front-end limit, throttling, a setting. "
                '"of BW ceiling": output tok/s over the most decoding could reach at that many requests in '
                "flight, reading weights and KV cache at the GPU's peak memory bandwidth each step.",
            )
        ),
        Table(
            (
                "rank",
                "configuration",
                "status",
                "capacity",
                "vs model",
                "of BW ceiling",
                "output tok/s (90 % interval)",
                "TTFT p95, s (90 % interval)",
                "bound by",
                "start-up (s)",
                "reason",
            ),
            tuple(rows),
            (True, False, False, False, True, True, True, True, False, True, False),
        ),
    ]


def _vs_model(t: Trial) -> str:
    """``"0.88x (10.4)"``: measured capacity over the model's prediction; the prediction alone when the
    trial measured nothing; "-" without a prediction."""
    if t.predicted is None:
        return "-"
    measured = t.capacity.lo if t.capacity else None
    if measured is None or t.predicted <= 0:
        return f"predicted {t.predicted:.3g}"
    return f"{measured / t.predicted:.2f}x ({t.predicted:.3g})"


def _role(p: Point, capacity: Capacity | None) -> str:
    if p.role == "scout":
        return "scout (pace only)"
    if capacity is not None and p is capacity.best:
        return f"{p.role}: capacity"
    if capacity is not None and p is capacity.ceiling:
        return f"{p.role}: ceiling"
    return p.role


def _point_tables(run: Run) -> list[Block]:
    measured = [t for t in _ordered(run) if t.points]
    if not measured:
        return []
    blocks: list[Block] = [Heading(2, "Measured points")]
    for t in measured:
        blocks.append(Heading(3, f"{t.label} ({t.status})"))
        note = t.capacity.note if t.capacity else None
        blocks.append(
            Para((f"Capacity: {_bracket(t.capacity)}" + (f"; the search: {note}." if note else "."),))
        )
        rows = []
        for p in t.points:
            phases = as_number(p.steady.get("phases"))
            rows.append(
                (
                    _role(p, t.capacity),
                    _load(p),
                    _decision(p),
                    _tok_s(p),
                    _ttft(p),
                    _tpot(p),
                    f"{fmt_bare(p.requests)} / {fmt_bare(phases)}",
                    _bound(p),
                    NA if run.legacy else (p.disturbed or "no"),
                    p.why(),
                )
            )
        blocks.append(
            Table(
                (
                    "role",
                    "load",
                    "decision",
                    "output tok/s (90 % interval)",
                    "TTFT p95, s (90 % interval)",
                    "TPOT p95, ms (90 % interval)",
                    "requests / phases",
                    "bound by",
                    "disturbed",
                    "why",
                ),
                tuple(rows),
                (False, True, False, True, True, True, True, False, False, False),
            )
        )
        notes = [f"{_load(p)}: {note}" for p in t.points for note in p.token_notes]
        if notes:
            blocks.append(Para(("Token counts disagree: " + "; ".join(notes) + ".",), "warning"))
    return blocks


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


def _reading_notes(run: Run) -> list[Block]:
    judged = str(as_mapping(run.raw.get("slo")).get("judged_at") or "p95")
    return [
        Heading(2, "How to read these numbers"),
        Bullets(
            (
                (
                    bold("Steady window."),
                    " Every figure comes from the steady part of each phase: the window opens one median request "
                    "time after the phase starts (the ramp, while the batch and the queue fill, is left out) and "
                    "closes when the last request is issued (the drain, with ever fewer requests in flight, is "
                    "left out). Latency counts the requests started inside it, throughput the tokens delivered "
                    'inside it. Phases at the same load are pooled ("requests / phases").',
                ),
                (
                    bold("90 % intervals."),
                    f" TTFT and TPOT {judged} intervals are distribution-free (two order statistics of the "
                    f"window's requests; how many fall below the true {judged} is binomial): with fewer than 59 "
                    f"requests nothing bounds a {judged} from above, the interval ends in ∞ and the point cannot "
                    "pass. The output tok/s interval is a bootstrap over sub-windows of about a second, so bursts "
                    "and stalls widen it.",
                ),
                (
                    bold("Judging a point."),
                    " A point passes only when every interval lies inside the SLO. It fails when one lies wholly "
                    "outside, errors exceed the limit, or (open loop) the queue builds through the window. An "
                    'interval that straddles a limit is "at the limit": the point is measured further, and if it '
                    "still straddles, it counts as not passing. The capacity is the highest load that passed; the "
                    "lowest load above it that did not bounds it.",
                ),
                (
                    bold("Open and closed loop."),
                    ' Open loop ("rate", MLPerf\'s server scenario): requests arrive as a Poisson process at a '
                    "fixed rate whatever the server does, as behind a public API, and queues build in bursts. "
                    'Closed loop ("users", Artificial Analysis style): each user sends the next request when the '
                    "last one ends, so the server is never offered more than it finishes. The rate search starts "
                    "with short closed-loop scout phases that only find the server's pace: judged on point "
                    "estimates, they do not count toward the capacity.",
                ),
                (
                    bold("Ties."),
                    " One configuration beats another only when it held a load the other did not. Otherwise the two "
                    "tie within what the measurements can tell, and the one closer to vLLM's defaults (fewer "
                    "settings changed) ranks first.",
                ),
                (
                    bold("Verdict."),
                    " The winner is exported and vLLM relaunched from that file alone: the proof holds the "
                    "capacity again (it must pass, with throughput close to the trial's), then production checks "
                    "hold a share of the capacity (75 % by default) for longer, backing off if it does not hold. "
                    "If the winner does not hold, the runner-up is tried.",
                ),
                (
                    bold("Bound by"),
                    " is read from the phase's telemetry (GPU memory bandwidth measured by NVML GPM or DCGM's DRAM "
                    "active, each named; where neither measures it, the decode-traffic estimate, labelled "
                    "ESTIMATED; SM activity, the server's queue and KV cache, client and server CPU).",
                ),
            )
        ),
    ]


def document(run: Run, figures: Sequence[tuple[str, str, str, str]]) -> list[Block]:
    blocks = _opening(run, run_headline(run)) + _about(run)
    if not run.legacy:
        blocks += _verdict(run)
    blocks += _trial_table(run)
    blocks.append(Heading(2, "Plots"))
    if figures:
        blocks.extend(Figure(file, alt, svg, caption) for file, alt, svg, caption in figures)
    else:
        blocks.append(Para(("No plots: no trial has a measured point.",)))
    return blocks + _point_tables(run) + _logs(run) + _reading_notes(run)
