"""The tuning report: its figures (ratio vs defaults, cost, energy, Pareto frontier), its files (JSON, Markdown,
HTML, SVG plots) and the runs that go wrong (no winner, all failed, interrupted, missing figures)."""

from __future__ import annotations

import copy
import dataclasses
import html.parser
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tuner.loadgen import PhaseStats
from tuner.measure import Evidence, TokenCheck, check_tokens
from tuner.report import svgplot
from tuner.report.data import (
    cost_per_million_output_tokens_usd,
    headline,
    joules_per_output_token,
    pareto_front,
)
from tuner.report.write import ReportError, read_report, write_report
from tuner.tuning.modelshape import Hardware
from tuner.tuning.slo import PRESETS, Slo, check
from tuner.tuning.space import Candidate

SVG = "{http://www.w3.org/2000/svg}"
SLO = PRESETS["mlperf-llama3.1-8b-server"]  # TTFT p95 <= 2 s, >= 10 tok/s per user
WALL_S = 30.0
POWER_W = 500.0
H100 = Hardware("NVIDIA H100 80GB HBM3", 1, 80 * 2**30, (9, 0))


def _point(
    concurrency: int,
    tok_s: float,
    user_p50: float,
    ttft_p95_s: float,
    *,
    slo: Slo = SLO,
    power_w: float | None = POWER_W,
    bound: str = "gpu_memory_bandwidth",
    tokens: TokenCheck | None = None,
) -> dict[str, Any]:
    """One measured point as the tuner stores it, built from the real dataclasses and judged by slo.check."""
    out_tokens = round(tok_s * WALL_S)
    stats = PhaseStats(
        requests_ok=max(1, out_tokens // 256),
        requests_failed=0,
        requests_cancelled=0,
        requests_short=0,
        output_tokens_total=out_tokens,
        prompt_tokens_total=out_tokens * 2,
        wall_s=WALL_S,
        output_tokens_per_s=tok_s,
        requests_per_s=tok_s / 256,
        max_in_flight=concurrency,
        ttft_p50_s=ttft_p95_s / 2,
        ttft_p95_s=ttft_p95_s,
        tpot_p50_s=1 / user_p50,
        tpot_p95_s=1 / (user_p50 * 0.85),
        e2e_p95_s=ttft_p95_s + 256 / user_p50,
        user_tok_per_s_p50=user_p50,
        user_tok_per_s_p5=user_p50 * 0.85,
    )
    evidence = Evidence(
        gpu_samples=120 if power_w is not None else 0,
        dram_bw_util_pct_mean=55.0 if power_w is not None else None,
        power_w_mean=power_w,
        energy_j=None if power_w is None else power_w * WALL_S,
        kv_cache_usage_pct_max=40.0,
        server_generation_tokens=float(out_tokens),
    )
    verdict = check(slo, stats)
    return {
        "concurrency": concurrency,
        "passed": verdict.passed,
        "slo_reasons": list(verdict.reasons),
        "stats": dataclasses.asdict(stats),
        "evidence": dataclasses.asdict(evidence),
        "bound": {"kind": bound, "reason": "DRAM bandwidth 55 % of peak (GPM)"},
        "tokens": dataclasses.asdict(tokens or check_tokens(out_tokens, float(out_tokens))),
    }


def _trial(
    candidate: Candidate,
    status: str,
    points: list[dict[str, Any]],
    *,
    reason: str | None = None,
    log_tail: str | None = None,
    startup_s: float | None = 130.0,
) -> dict[str, Any]:
    passing = [p for p in points if p["passed"]]
    best = max(passing, key=lambda p: p["stats"]["output_tokens_per_s"], default=None)
    return {
        "key": candidate.key(),
        "label": candidate.label(),
        "config": candidate.config_dict(),
        "status": status,
        "reason": reason,
        "log_tail": log_tail,
        "is_defaults": candidate == Candidate(),
        "startup_s": startup_s,
        "best": None
        if best is None
        else {
            "concurrency": best["concurrency"],
            "output_tokens_per_s": best["stats"]["output_tokens_per_s"],
        },
        "points": points,
    }


DEFAULTS = Candidate()
FP8 = Candidate(quantization="fp8", kv_cache_dtype="fp8")
TOO_BIG = Candidate(max_model_len=131072)
OOM = Candidate(gpu_memory_utilization=0.99, max_num_seqs=1024)
OOM_LOG = "INFO loading weights\nERROR torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def _report(**overrides: Any) -> dict[str, Any]:
    """A run on an H100 (numbers from REFERENCE.md's measurements): defaults, an FP8 winner, one trial
    rejected before launch with its log tail, and one whose server died."""
    defaults = _trial(
        DEFAULTS,
        "feasible",
        [
            _point(1, 150, 152, 0.03),
            _point(16, 1979, 140, 0.14),
            _point(64, 5358, 99, 0.81),
            _point(128, 7225, 71, 1.73),
            _point(256, 7400, 36, 3.9),  # TTFT over the limit
        ],
    )
    fp8 = _trial(
        FP8,
        "feasible",
        [
            _point(1, 217, 225, 0.03),
            _point(16, 2817, 203, 0.12),
            _point(64, 7710, 148, 0.60),
            _point(128, 10295, 104, 1.29),
            _point(256, 8991, 43, 1.95),  # passes, but less throughput: saturated
        ],
    )
    report = {
        "format": "infertop-tune-report",
        "version": 1,
        "model": "/models/Llama-3.1-8B",
        "hardware": H100.to_dict(),
        "hardware_label": "1x NVIDIA H100 80GB HBM3",
        "gpus": 1,
        "slo": {**SLO.to_dict(), "describe": SLO.describe(), "judged_at": "p95"},
        "workload": {"input_len": 512, "output_len": 256, "requests_per_point": "4x concurrency, >= 32"},
        "started_s": 1_795_000_000.0,
        "finished_s": 1_795_000_000.0 + 3 * 3600 + 20 * 60,
        "launches": 4,
        "grid_size": 96,
        "trials": [
            defaults,
            fp8,
            _trial(
                TOO_BIG,
                "infeasible",
                [],
                reason="KV cache too small for one 131,072-token sequence",
                log_tail="ValueError: max_model_len 131072 exceeds the KV cache capacity",
                startup_s=None,
            ),
            _trial(
                OOM, "failed", [], reason="out of GPU memory while starting", log_tail=OOM_LOG, startup_s=None
            ),
        ],
        "winner": FP8.key(),
        "defaults": DEFAULTS.key(),
        "proof": {
            "yaml": "out/best.yaml",
            "startup_s": 128.4,
            "concurrency": 128,
            "output_tokens_per_s": 10100.0,
            "trial_output_tokens_per_s": 10295.0,
            "ratio": 10100.0 / 10295.0,
            "passed": True,
            "error": None,
        },
        "production": {
            "fraction_of_max": 0.75,
            "request_rate_per_s": 30.2,
            "stats": _point(96, 7700, 120, 0.71)["stats"],
            "passed": True,
            "slo_reasons": [],
            "error": None,
        },
        "price_per_gpu_hour": 2.0,
        "interrupted": False,
    }
    report.update(overrides)
    return report


def _no_winner() -> dict[str, Any]:
    tight = Slo("tight", ttft_p95_max_s=0.1, tok_s_per_user_min=500.0)
    report = _report(slo={**tight.to_dict(), "describe": tight.describe(), "judged_at": "p95"})
    for trial in report["trials"]:
        trial["points"] = [_point(p["concurrency"], *_figures(p), slo=tight) for p in trial["points"]]
        if trial["points"]:
            trial["status"], trial["best"], trial["reason"] = "infeasible", None, "no concurrency met the SLO"
    report.update(winner=None, proof=None, production=None)
    return report


def _figures(point: dict[str, Any]) -> tuple[float, float, float]:
    s = point["stats"]
    return s["output_tokens_per_s"], s["user_tok_per_s_p50"], s["ttft_p95_s"]


def _svg_root(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text(encoding="utf-8"))


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


class _Html(html.parser.HTMLParser):
    """Tracks open tags; fails on a close tag that does not match (a void element needs none)."""

    VOID = frozenset(
        {"meta", "br", "img", "hr", "input", "link", "path", "line", "circle", "rect", "polyline", "polygon"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, (
            f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        )
        self.stack.pop()


def _parse_html(text: str) -> _Html:
    parser = _Html()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed: {parser.stack}"
    return parser


# --- figures ---------------------------------------------------------------------------------------------


def test_cost_formula() -> None:
    assert cost_per_million_output_tokens_usd(2.0, 1, 1000.0) == pytest.approx(0.5556, abs=1e-4)
    # Twice the GPUs at the same throughput: twice the cost.
    assert cost_per_million_output_tokens_usd(2.0, 2, 1000.0) == pytest.approx(1.1111, abs=1e-4)
    assert cost_per_million_output_tokens_usd(None, 1, 1000.0) is None
    assert cost_per_million_output_tokens_usd(2.0, 0, 1000.0) is None  # CPU build: no fake zero
    assert cost_per_million_output_tokens_usd(2.0, 1, 0.0) is None


def test_joules_per_token() -> None:
    assert joules_per_output_token(15_000.0, 300_000) == pytest.approx(0.05)
    assert joules_per_output_token(None, 300_000) is None
    assert joules_per_output_token(15_000.0, 0) is None


def test_pareto_front() -> None:
    points = [
        (100, 150),
        (2000, 140),
        (1500, 100),
        (5000, 99),
        (7000, 70),
        (7000, 60),
        (6000, 40),
        (2000, 140),
    ]
    assert pareto_front(points) == [(100, 150), (2000, 140), (5000, 99), (7000, 70)]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [(1.0, 1.0)]
    # A point beaten on one axis and tied on the other is dominated.
    assert pareto_front([(5, 5), (5, 3), (3, 5)]) == [(5, 5)]


def test_headline_ratio_cost_and_energy() -> None:
    head = headline(_report())
    assert head.winner_label == FP8.label()
    assert head.winner_output_tokens_per_s == 10295
    assert head.winner_concurrency == 128
    assert head.winner_max_users == 256  # 256 passed with less throughput
    assert head.defaults_output_tokens_per_s == 7225
    assert head.defaults_max_users == 128
    assert head.throughput_ratio == pytest.approx(10295 / 7225)
    assert head.users_ratio == pytest.approx(2.0)
    assert head.cost_per_million_output_tokens_usd == pytest.approx(2.0 * 1e6 / (10295 * 3600))
    assert head.joules_per_output_token == pytest.approx(POWER_W * WALL_S / round(10295 * WALL_S))


def test_palette_reads_on_light_and_dark() -> None:
    def luminance(color: str) -> float:
        channels = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    for color in (*svgplot.PALETTE, svgplot.LIMIT_COLOR):
        lum = luminance(color)
        assert 1.05 / (lum + 0.05) >= 3 and (lum + 0.05) / 0.05 >= 3, color
    ink = luminance(svgplot.INK)
    assert 1.05 / (ink + 0.05) >= 4.5 and (ink + 0.05) / 0.05 >= 4.5


def test_ticks() -> None:
    assert svgplot.nice_ticks(0, 10295 * 1.05) == [0, 2000, 4000, 6000, 8000, 10000, 12000]
    assert svgplot.nice_ticks(0, 0.9) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert svgplot.log2_ticks(1, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert svgplot.log2_ticks(96, 96) == [64, 128]  # a bisection point between two powers
    assert svgplot.log2_ticks(64, 64) == [32, 64, 128]  # one power alone gets a neighbour each side
    many = svgplot.log2_ticks(1, 2**20)
    assert len(many) <= 11 and many[0] <= 1 and many[-1] >= 2**20


# --- the files -------------------------------------------------------------------------------------------


def test_writes_every_file(tmp_path: Path) -> None:
    report = _report()
    files = write_report(report, tmp_path / "out")
    assert {p.name for p in files["plots"]} == {
        "pareto.svg",
        "ttft_vs_concurrency.svg",
        "throughput_vs_concurrency.svg",
    }
    for path in (files["json"], files["markdown"], files["html"], *files["plots"]):
        assert path.is_file() and path.parent == tmp_path / "out"
    as_json = json.loads(json.dumps(report))  # tuples (PhaseStats.errors) become lists
    assert json.loads(files["json"].read_text()) == as_json
    assert read_report(files["json"]) == as_json
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_markdown_headline(tmp_path: Path) -> None:
    md = write_report(_report(), tmp_path)["markdown"].read_text()
    assert "Best configuration: fp8 w, fp8 kv" in md
    assert f"{10295 / 7225:.2f}x the output throughput of vLLM's defaults" in md  # 1.42x
    assert "2.00x the concurrent users" in md
    assert "vllm serve /models/Llama-3.1-8B --quantization fp8 --kv-cache-dtype fp8" in md
    assert f"${2.0 * 1e6 / (10295 * 3600):.3f}" in md  # $0.054 per 1M output tokens
    assert f"{POWER_W * WALL_S / round(10295 * WALL_S):.3g} J/token" in md
    assert "judged at p95" in md.lower() and "600 s" in md  # the percentile and the short-phase caveat
    assert "0.98x" in md  # proof: 10,100 vs 10,295 tok/s
    assert "steady load at 75 % of the max" in md and "E2E p95" in md and "SLO met" in md
    assert "512 input tokens and 256 output tokens" in md
    for plot in ("pareto.svg", "ttft_vs_concurrency.svg", "throughput_vs_concurrency.svg"):
        assert f"]({plot})" in md  # relative links


def test_markdown_trial_table_and_logs(tmp_path: Path) -> None:
    md = write_report(_report(), tmp_path)["markdown"].read_text()
    table = [line for line in md.splitlines() if re.search(r"\| (feasible|infeasible|failed) \|", line)]
    assert len(table) == 4
    infeasible = next(line for line in table if "| infeasible |" in line)
    assert "KV cache too small for one 131,072-token sequence" in infeasible
    failed = next(line for line in table if "| failed |" in line)
    assert "out of GPU memory while starting" in failed and failed.count("n/a") >= 4
    winner = next(line for line in table if "★" in line)
    assert "| 128 | 10,295 | 1,290 | 104.0 |" in winner
    # The failed server's log tail, in a collapsible block.
    block = md[md.index("<details><summary>") :]
    assert "CUDA out of memory" in block and "</details>" in block
    # Per-trial points: the defaults' 256-user point missed on TTFT and says so.
    assert "TTFT p95 3.90 s > 2.00 s" in md
    assert "n/a" not in md.split("## Result")[1].split("## Trials")[0]  # every headline figure is known


def test_no_price_and_cpu(tmp_path: Path) -> None:
    md = write_report(_report(price_per_gpu_hour=None), tmp_path / "a")["markdown"].read_text()
    assert "--price-per-gpu-hour" in md
    assert "$" not in md.split("## Trials")[0]
    cpu = _report(
        gpus=0,
        hardware=Hardware.cpu(2**30).to_dict(),
        hardware_label="CPU (vLLM CPU build)",
        price_per_gpu_hour=2.0,
    )
    for trial in cpu["trials"]:
        trial["points"] = [
            _point(p["concurrency"], *_figures(p), power_w=None, bound="engine") for p in trial["points"]
        ]
    md = write_report(cpu, tmp_path / "b")["markdown"].read_text()
    assert "Cost per 1M output tokens: n/a" in md and "GPU energy per output token: n/a" in md
    assert "0.000" not in md and "$0." not in md  # never a fake zero
    pareto = _svg_root(tmp_path / "b" / "pareto.svg")
    assert "output tok/s (CPU server)" in _texts(pareto)


def test_svgs_are_xml_with_slo_lines(tmp_path: Path) -> None:
    files = write_report(_report(), tmp_path)
    roots = {p.name: _svg_root(p) for p in files["plots"]}
    pareto = roots["pareto.svg"]
    texts = _texts(pareto)
    assert any("SLO floor 10.0 tok/s per user" in t for t in texts)
    assert "output tok/s per GPU" in texts and "tok/s per user (p50)" in texts
    assert "best: 128 users" in texts and "vLLM defaults: 128 users" in texts  # highlighted points
    dashed = [
        e
        for e in pareto.iter(f"{SVG}line")
        if e.get("stroke-dasharray") and e.get("stroke") == svgplot.LIMIT_COLOR
    ]
    assert len(dashed) == 1
    # Markers: 10 measured points; the defaults' 256-user point missed the SLO and is hollow.
    circles = [e for e in pareto.iter(f"{SVG}circle") if e.get("r") == "4.5"]
    hollow = [e for e in circles if e.get("fill") == "none"]
    assert len(hollow) == 2  # the failing point and the "missed the SLO" legend key
    # The frontier: a polyline through the non-dominated points: fp8 at 1, 16, 64 and 128 users (every
    # defaults point is beaten by one of these, and fp8 at 256 by fp8 at 128).
    frontier = [e for e in pareto.iter(f"{SVG}polyline") if e.get("stroke") == svgplot.INK]
    assert len(frontier) == 1 and len(frontier[0].get("points", "").split()) == 4
    ttft_texts = _texts(roots["ttft_vs_concurrency.svg"])
    assert any("SLO TTFT p95 limit 2,000 ms" in t for t in ttft_texts) and "TTFT p95 (ms)" in ttft_texts
    assert {"1", "16", "256"} <= set(ttft_texts)  # log2 ticks
    assert "output tok/s (all GPUs)" in _texts(roots["throughput_vs_concurrency.svg"])


def test_html_is_self_contained(tmp_path: Path) -> None:
    files = write_report(_report(), tmp_path)
    page = files["html"].read_text()
    parser = _parse_html(page)
    assert parser.tags.count("svg") == 3 and "<img" not in page  # inlined, not linked
    assert "<script" not in page
    assert parser.tags.count("details") == 2
    assert "1.42x the output throughput" in page
    assert "CUDA out of memory" in page


def test_no_winner_says_so_and_shows_closest(tmp_path: Path) -> None:
    report = _no_winner()
    files = write_report(report, tmp_path)
    md = files["markdown"].read_text()
    assert "No configuration met the SLO" in md
    # The closest is the point with the largest SLO margin: fp8 at 1 user (TTFT 30 ms, 225 tok/s per user).
    closest = md[md.index("Closest:") :].splitlines()[0]
    assert "fp8 w, fp8 kv" in closest and "1 user:" in closest and "per-user speed" in closest
    assert headline(report).throughput_ratio is None
    _parse_html(files["html"].read_text())
    assert not [t for t in _texts(_svg_root(tmp_path / "pareto.svg")) if t.startswith("best")]


def test_all_failed_and_interrupted(tmp_path: Path) -> None:
    report = _report(winner=None, proof=None, production=None, interrupted=True)
    for trial in report["trials"]:
        trial.update(status="failed", points=[], best=None, reason="engine core initialization failed")
    files = write_report(report, tmp_path)
    md = files["markdown"].read_text()
    assert "No configuration met the SLO" in md and "No trial produced a measurement" in md
    assert "This run was interrupted" in md and "--resume" in md
    assert "No plots" in md and files["plots"] == []
    _parse_html(files["html"].read_text())


def test_nones_everywhere(tmp_path: Path) -> None:
    """A report whose every optional figure is missing still renders, with n/a where numbers would be."""
    report: dict[str, Any] = {"format": "infertop-tune-report", "version": 1}
    files = write_report(report, tmp_path / "empty")
    assert "No trials were recorded" in files["markdown"].read_text()
    sparse = copy.deepcopy(_report())
    for key in (
        "slo",
        "workload",
        "hardware",
        "started_s",
        "finished_s",
        "price_per_gpu_hour",
        "gpus",
        "proof",
    ):
        sparse[key] = None
    for trial in sparse["trials"]:
        trial["startup_s"] = None
        for point in trial["points"]:
            point["stats"] = {k: None for k in point["stats"]} | {"output_tokens_per_s": 100.0}
            point["evidence"] = {k: None for k in point["evidence"]}
            point["bound"] = None
            point["tokens"] = None
    files = write_report(sparse, tmp_path / "sparse")
    md = files["markdown"].read_text()
    assert "n/a" in md and "nan" not in md.lower().replace("n/a", "")
    for plot in files["plots"]:
        _svg_root(plot)
    _parse_html(files["html"].read_text())


def test_token_mismatch_warned(tmp_path: Path) -> None:
    report = _report()
    point = report["trials"][0]["points"][1]
    point["tokens"] = dataclasses.asdict(check_tokens(59_370, 80_000.0))
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "Token counts disagree: 16 users: client counted 59,370 output tokens, server 80,000" in md


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    report = _report()
    report["trials"][0]["points"][0]["stats"]["itl_p99_s"] = math.inf
    files = write_report(report, tmp_path)
    assert json.loads(files["json"].read_text())["trials"][0]["points"][0]["stats"]["itl_p99_s"] is None


def test_errors_are_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match=r"^cannot create .*file/out"):
        write_report(_report(), blocker / "out")
    with pytest.raises(ReportError, match="no such file"):
        read_report(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ReportError, match="not an infertop tuning report"):
        read_report(tmp_path / "other.json")


def test_markdown_escapes_table_text(tmp_path: Path) -> None:
    report = _report()
    report["trials"][2]["reason"] = "bad | pipe and *stars* <tag>"
    md = write_report(report, tmp_path)["markdown"].read_text()
    row = next(line for line in md.splitlines() if "| infeasible |" in line)
    assert r"bad \| pipe and \*stars\* \<tag>" in row
    assert "TTFT p95 <= 2.00 s" in md  # a "<" that opens no tag stays readable


def test_defaults_win(tmp_path: Path) -> None:
    report = _report(winner=DEFAULTS.key())
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "Best configuration: vLLM defaults." in md
    assert "vLLM's defaults were the best configuration found" in md
    assert headline(report).throughput_ratio == pytest.approx(1.0)


def test_pareto_x_is_per_gpu(tmp_path: Path) -> None:
    """Two GPUs: the x axis halves (10,295 tok/s in all is 5,148 per GPU), and so does nothing else."""
    two = write_report(_report(gpus=2), tmp_path / "two")
    one = write_report(_report(), tmp_path / "one")
    x_ticks = {
        name: [t for t in _texts(_svg_root(files["plots"][0])) if re.fullmatch(r"[0-9,]+", t)]
        for name, files in (("one", one), ("two", two))
    }
    assert "12,000" in x_ticks["one"] and "12,000" not in x_ticks["two"] and "5,000" in x_ticks["two"]
    md = two["markdown"].read_text()
    assert "(5,148 tok/s per GPU)" in md
    assert f"${2.0 * 2 * 1e6 / (10295 * 3600):.3f}" in md  # two GPUs cost twice per token
