"""The tuning report (version 2): what it says first (the verdict's line), the verdict's attempts, the trials and
their points with 90 % intervals, the plots against the load, and the runs that go wrong (not proven, no
configuration, interrupted, missing figures, a version-1 report of an older infertop).

The report dicts are made by the real code: points judged by the real SLO judge, capacities summarised by the
capacity search's own rules, the verdict reached by :func:`reach_verdict` on a scripted relaunch, and the
whole dict built by :func:`tuner.tuning.conclusion.build_report`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import html.parser
import json
import math
import os
import re
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tuner.loadgen import LoadMode, LoadSpec, PhaseStats
from tuner.loadgen.runner import PhaseResult
from tuner.loadgen.steady import SteadyStats
from tuner.measure import Bound, BoundKind, Evidence, MeasuredPhase, check_tokens
from tuner.report import svgplot
from tuner.report.data import (
    Run,
    cost_per_million_output_tokens_usd,
    headline,
    joules_per_output_token,
    pareto_front,
)
from tuner.report.write import ReportError, read_report, write_report
from tuner.serving.launcher import LaunchError
from tuner.serving.launchlog import FailureKind
from tuner.serving.tinymodel import write_tiny_model
from tuner.tuning.capacity import Capacity, rank, summarise
from tuner.tuning.conclusion import build_report
from tuner.tuning.modelshape import Hardware
from tuner.tuning.points import RATE, USERS, Load, Point, empty_steady
from tuner.tuning.runner import _stored
from tuner.tuning.slo import PRESETS, check, judge
from tuner.tuning.space import Candidate
from tuner.tuning.store import TrialStatus
from tuner.tuning.tune import TrialOutcome, TuneConfig, Tuner
from tuner.tuning.verdict import Contender, Verdict, VerdictPlan, reach_verdict, unverified

SVG = "{http://www.w3.org/2000/svg}"
SLO = PRESETS["mlperf-llama3.1-8b-server"]  # TTFT p95 <= 2 s, >= 10 tok/s per user (TPOT p95 <= 100 ms)
POWER_W = 520.0
OUTPUT_LEN = 256
H100 = Hardware("NVIDIA H100 80GB HBM3", 1, 80 * 2**30, (9, 0))

DEFAULTS = Candidate()
FP8_KV = Candidate(kv_cache_dtype="fp8")
FP8 = Candidate(quantization="fp8", kv_cache_dtype="fp8")
TOO_BIG = Candidate(max_model_len=131072)
OOM = Candidate(gpu_memory_utilization=0.99, max_num_seqs=1024)
OOM_LOG = "INFO loading weights\nERROR torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def _point(
    load: Load,
    role: str,
    tok_s: float,
    ttft_s: tuple[float, float, float | None],
    tpot_ms: float,
    *,
    requests: int = 120,
    phases: int = 1,
    power_w: float | None = POWER_W,
    disturbed: str = "",
    bound: BoundKind = BoundKind.GPU_MEMORY_BANDWIDTH,
) -> Point:
    """One load held and judged as the tuner does it: steady figures with their intervals, judged by the real
    SLO judge (scouts on point estimates), one stored phase per pooled phase with GPU telemetry."""
    rps = load.value if load.open_loop else tok_s / OUTPUT_LEN
    window_s = requests / rps
    ttft_p95, ttft_lo, ttft_hi = ttft_s
    steady = SteadyStats(
        phases=phases, window_s=window_s, requests_ok=requests, requests_failed=0, output_tokens_per_s=tok_s,
        output_tokens_per_s_ci=(tok_s * 0.96, tok_s * 1.04), requests_per_s=rps, ttft_p50_s=ttft_p95 / 2,
        ttft_p95_s=ttft_p95, ttft_p95_ci_s=(ttft_lo, ttft_hi), tpot_p50_s=tpot_ms / 1000 * 0.85,
        tpot_p95_s=tpot_ms / 1000, tpot_p95_ci_s=(tpot_ms / 1000 * 0.95, tpot_ms / 1000 * 1.06),
        user_tok_per_s_p50=1000 / (tpot_ms * 0.85), ttft_growth_s=0.01, whole_phase=False,
    )  # fmt: skip
    verdict = check(SLO, steady) if role == "scout" else judge(SLO, steady, open_loop=load.open_loop)
    decision = ("pass" if verdict.passed else "fail") if role == "scout" else verdict.decision
    stored = []
    for i in range(phases):
        wall_s = window_s / phases * 1.3  # the ramp and the drain around the steady window
        out_tokens = round(tok_s * 0.95 * wall_s)
        stats = PhaseStats(
            requests_ok=requests // phases, requests_failed=0, requests_cancelled=0, requests_short=0,
            output_tokens_total=out_tokens, prompt_tokens_total=out_tokens * 2, wall_s=wall_s,
            output_tokens_per_s=out_tokens / wall_s, requests_per_s=rps, max_in_flight=load.users_count
            if not load.open_loop else 64, ttft_p95_s=ttft_p95 * 0.97, tpot_p95_s=tpot_ms / 1000,
            e2e_p95_s=ttft_p95 + OUTPUT_LEN * tpot_ms / 1000, user_tok_per_s_p50=1000 / (tpot_ms * 0.85),
        )  # fmt: skip
        spec = LoadSpec(
            mode=LoadMode.RATE if load.open_loop else LoadMode.CONCURRENCY,
            concurrency=None if load.open_loop else load.users_count,
            request_rate_per_s=load.value if load.open_loop else None,
            num_requests=requests // phases, input_len=512, output_len=OUTPUT_LEN, seed=i,
        )  # fmt: skip
        evidence = Evidence(
            gpu_samples=120 if power_w is not None else 0,
            dram_bw_util_pct_mean=55.0 if power_w is not None else None,
            power_w_mean=power_w,
            energy_j=None if power_w is None else power_w * wall_s,
            kv_cache_usage_pct_max=40.0,
            server_generation_tokens=float(out_tokens),
        )
        result = PhaseResult(
            "http://127.0.0.1:8000", "m", spec, stats, (), 1_795_000_000.0, 1_795_000_000.0 + wall_s, 2.0
        )
        phase = MeasuredPhase(
            result, evidence, Bound(bound, "DRAM bandwidth 55 % of peak (GPM)"),
            check_tokens(out_tokens, float(out_tokens)), steady=steady,
        )  # fmt: skip
        stored.append(_stored(phase))
    return Point(
        load,
        role,
        decision,
        steady,
        verdict.reasons,
        getattr(verdict, "uncertain", ()),
        tuple(stored),
        disturbed,
    )


def _rate(value: float, tok_s: float, ttft: tuple[float, float, float | None], **kw: Any) -> Point:
    """A judged open-loop point; per-user speed falls as the batch grows with the arrival rate."""
    return _point(Load.rate(value), "judged", tok_s, ttft, 10.0 + 1.1 * value, **kw)


def _scouts(*rows: tuple[int, float, float, float]) -> list[Point]:
    return [
        _point(Load.users(u), "scout", tok, (t, t * 0.8, t * 1.3), tpot, requests=4 * u)
        for u, tok, t, tpot in rows
    ]


def _searched(points: list[Point], objective: str = RATE) -> Capacity:
    """Best and ceiling by the capacity search's own rule, with the note the search leaves."""
    cap = summarise(objective, points)
    return summarise(objective, points, f"bracketed between {_label(cap.best)} and {_label(cap.ceiling)}")


def _label(p: Point | None) -> str:
    return p.load.label() if p else "n/a"


def _capacities() -> dict[str, Capacity]:
    """An H100 serving an 8B model under the MLPerf server SLO (open loop). The defaults hold 23.9 req/s; FP8
    KV cache 32.1 (34 did not); FP8 weights and KV cache 33 (36 did not): the two FP8 configurations tie
    within their brackets, and the one closer to vLLM's defaults ranks first."""
    scouts = _scouts(
        (1, 150, 0.03, 6.6), (16, 1979, 0.14, 8.1), (64, 5358, 0.81, 11.8), (128, 7225, 1.73, 16.5)
    )
    defaults = _searched(
        [
            *scouts,
            _rate(28.2, 6950, (3.10, 2.60, 3.70)),  # fails: the queue builds
            _rate(22.6, 5790, (0.62, 0.55, 0.71)),
            _rate(25.2, 6430, (1.90, 1.60, 2.30)),  # at the limit: its interval straddles 2 s
            _rate(23.9, 6120, (0.84, 0.74, 0.97), phases=2, requests=236),
        ],
    )
    fp8_kv = _searched(
        [
            *_scouts(
                (1, 151, 0.03, 6.5), (16, 2010, 0.13, 7.9), (64, 6400, 0.70, 10.2), (128, 8700, 1.50, 14.7)
            ),
            _rate(34.0, 8400, (2.45, 2.10, 2.90)),
            _rate(27.2, 6960, (0.55, 0.49, 0.63)),
            _rate(30.4, 7780, (0.74, 0.66, 0.85), disturbed="other processes used 1.2 cores (limit 0.3)"),
            _rate(32.1, 8218, (1.02, 0.90, 1.18)),
        ],
    )
    fp8 = _searched(
        [
            *_scouts(
                (1, 217, 0.03, 4.6), (16, 2817, 0.12, 5.6), (64, 7710, 0.60, 7.9), (128, 9400, 1.29, 11.2)
            ),
            _rate(36.0, 9200, (2.30, 2.05, 2.60)),
            _rate(33.0, 8450, (1.10, 0.98, 1.30)),
        ],
    )
    return {DEFAULTS.key(): defaults, FP8_KV.key(): fp8_kv, FP8.key(): fp8}


Script = Callable[[str, Load, str], Point]
"""(label of the configuration relaunched, load, role) -> the point that relaunch measures."""


def _proven(label: str, load: Load, role: str) -> Point:
    if role == "proof":
        return _point(load, role, 8105, (1.05, 0.92, 1.21), 42.0, requests=240)
    return _point(load, role, 6190, (0.41, 0.36, 0.47), 38.0, requests=722)


class _Relaunch:
    """vLLM relaunched from the exported file, scripted: configurations in ``broken`` do not start."""

    startup_s = 128.4

    def __init__(self, script: Script, broken: frozenset[str]) -> None:
        self.script, self.broken, self.serving = script, broken, ""

    def cancelled(self) -> bool:
        return False

    def emit(self, event: object) -> None:
        pass  # the tune screen's events: not part of the report

    @contextlib.contextmanager
    def serve(self, key: str, args: tuple[str, ...], log_name: str) -> Iterator[_Relaunch]:
        label = Path(args[1]).read_text().splitlines()[0]
        if label in self.broken:
            raise LaunchError(FailureKind.CUDA_OOM, "vLLM failed to start (CUDA out of memory)")
        self.serving = label
        yield self

    @contextlib.contextmanager
    def serve_node(
        self, key: str, args: tuple[str, ...], log_name: str, placements: object
    ) -> Iterator[_Relaunch]:
        with self.serve(key, args, log_name) as session:
            yield session

    def measure(self, load: Load, role: str) -> Point:
        return self.script(self.serving, load, role)


def _report(
    root: Path,
    script: Script | None = _proven,
    *,
    broken: frozenset[str] = frozenset(),
    capacities: dict[str, Capacity] | None = None,
    price: float | None = 2.0,
    objective: str = "rate",
) -> dict[str, Any]:
    """The report dict of a whole run, built by the tuner's own ``build_report``: three measured trials, one
    rejected before launch, one whose server ran out of memory, and the verdict (``script`` None: --no-prove)."""
    root.mkdir(parents=True, exist_ok=True)
    config = TuneConfig(
        model=str(write_tiny_model(root / "Llama-3.1-8B")), slo=SLO, store_path=root / "t.sqlite",
        out_dir=root / "out", gpus=False, price_per_gpu_hour=price, objective=objective,
    )  # fmt: skip
    tuner = Tuner(config)
    tuner.hardware, tuner.hardware_label, tuner.launches = H100, "1x NVIDIA H100 80GB HBM3", 4
    caps = _capacities() if capacities is None else capacities
    outcomes = {
        c.key(): TrialOutcome(
            c, TrialStatus.FEASIBLE if caps[c.key()].feasible else TrialStatus.INFEASIBLE,
            caps[c.key()].describe() if caps[c.key()].feasible else f"no load met the SLO: {caps[c.key()].note}",
            caps[c.key()], startup_s=131.0,
        )
        for c in (DEFAULTS, FP8_KV, FP8) if c.key() in caps
    }  # fmt: skip
    outcomes[TOO_BIG.key()] = TrialOutcome(
        TOO_BIG, TrialStatus.INFEASIBLE, "not launched: KV cache too small for one 131,072-token sequence"
    )
    outcomes[OOM.key()] = TrialOutcome(
        OOM, TrialStatus.FAILED, "vLLM failed to start (CUDA out of memory)", log_tail=OOM_LOG
    )
    feasible = [o for o in outcomes.values() if o.feasible]
    ranked = rank(feasible, tuner.capacity_of, tuner.distance, config.resolution)
    contenders = [tuner.contender(o) for o in ranked]
    verdict: Verdict | None = None
    if contenders and script is not None:

        def write_yaml(contender: Contender, status: str) -> Path:
            path = root / "best.yaml"
            path.write_text(f"{contender.label}\n# {status}\n")
            return path

        verdict = reach_verdict(
            _Relaunch(script, broken), contenders, write_yaml, VerdictPlan(),  # type: ignore[arg-type]
            defaults_capacity=caps.get(DEFAULTS.key()),
        )  # fmt: skip
    elif contenders:
        verdict = unverified(contenders[0])
    headline_text = verdict.headline if verdict else "NO CONFIGURATION met the SLO"
    exit_code = verdict.exit_code if verdict else 1
    started = time.time() - 3 * 3600 - 20 * 60
    return build_report(tuner, outcomes, ranked, DEFAULTS, started, None, verdict, headline_text, exit_code)


def _not_proven(label: str, load: Load, role: str) -> Point:
    """Every relaunch is slower than its trial: the proof misses and no production check holds."""
    if role == "proof":
        return _point(load, role, 6900, (2.60, 2.30, 2.95), 60.0, requests=240)
    return _point(load, role, 5100, (2.40, 2.15, 2.70), 55.0, requests=700)


def _backed_off(label: str, load: Load, role: str) -> Point:
    """The proof reproduces; 75 % of the capacity is at the limit, 80 % of that holds."""
    if role == "proof":
        return _point(load, role, 8105, (1.05, 0.92, 1.21), 42.0, requests=240)
    if load.value > 20:
        return _point(load, role, 6190, (1.95, 1.70, 2.20), 38.0, requests=722)
    return _point(load, role, 4950, (0.35, 0.31, 0.40), 30.0, requests=580)


@pytest.fixture(scope="module")
def proven(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole run, proven on the first relaunch (built once: tests deep-copy it before changing it)."""
    return json.loads(json.dumps(_report(tmp_path_factory.mktemp("run")), default=str))


@pytest.fixture
def report(proven: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(proven)


def _write(report: dict[str, Any], out: Path) -> tuple[str, str]:
    files = write_report(report, out)
    return files["markdown"].read_text(), files["html"].read_text()


def _svg_root(path: Path) -> ET.Element:
    return ET.fromstring(path.read_text(encoding="utf-8"))


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def _tooltips(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for g in root.iter(f"{SVG}g") for t in g.iter(f"{SVG}title")]


class _Html(html.parser.HTMLParser):
    """Tracks open tags (fails on a close tag that does not match) and collects headings and table cells."""

    VOID = frozenset(
        {"meta", "br", "img", "hr", "input", "link", "path", "line", "circle", "rect", "polyline", "polygon"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.headings: list[str] = []
        self.cells: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag in ("h1", "h2", "h3", "th", "td"):
            self._text = []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, (
            f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        )
        self.stack.pop()
        if tag in ("h1", "h2", "h3", "th", "td") and self._text is not None:
            (self.headings if tag.startswith("h") else self.cells).append("".join(self._text))
            self._text = None


def _parse_html(text: str) -> _Html:
    parser = _Html()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed: {parser.stack}"
    return parser


def _md_plain(text: str) -> str:
    """Markdown inline text as a reader sees it: no bold markers, code ticks or backslash escapes."""
    return re.sub(r"\\(.)", r"\1", text.replace("**", "").replace("`", "")).strip()


def _md_headings(md: str) -> list[str]:
    prose = re.sub(
        r"^```.*?^```", "", md, flags=re.MULTILINE | re.DOTALL
    )  # a "#" in a code block is no heading
    return [_md_plain(m.group(1)) for m in re.finditer(r"^#{1,3} (.*)$", prose, re.MULTILINE)]


def _md_cells(md: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    return [_md_plain(cell) for row in rows for cell in re.split(r"(?<!\\)\|", row)[1:-1]]


def _section(md: str, heading: str) -> str:
    """The text of one ``## heading`` section."""
    start = md.index(f"\n## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end >= 0 else None]


def _row(md: str, *words: str) -> str:
    """The one table row holding every word."""
    rows = [line for line in md.splitlines() if line.startswith("| ") and all(w in line for w in words)]
    assert len(rows) == 1, (words, rows)
    return rows[0]


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


def test_headline_figures_are_at_the_operating_point(report: dict[str, Any]) -> None:
    head = headline(report)
    assert head.text == report["headline"] and head.text.startswith("PROVEN: fp8 kv")
    assert head.winner_label == "fp8 kv"
    assert head.capacity_ratio == pytest.approx(32.1 / 23.9)
    assert head.clear_win  # 32.1 req/s held where the defaults failed at 25.2
    # Cost and energy at the production check that held (24.1 req/s, 6,190 tok/s), not at the search's best.
    assert head.figures_at_operating_point and head.output_tokens_per_s == 6190
    assert head.cost_per_million_output_tokens_usd == pytest.approx(2.0 * 1e6 / (6190 * 3600))
    check = report["verdict"]["attempts"][0]["checks"][0]["phases"]
    energy = sum(p["evidence"]["energy_j"] for p in check)
    tokens = sum(p["stats"]["output_tokens_total"] for p in check)
    assert head.joules_per_output_token == pytest.approx(energy / tokens)


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


# --- what the report says first ----------------------------------------------------------------------------


def test_the_first_line_is_the_verdict_then_what_was_exported(report: dict[str, Any], tmp_path: Path) -> None:
    md, page = _write(report, tmp_path)
    assert md.splitlines()[0] == f"# {report['headline']}"
    assert _parse_html(page).headings[0] == report["headline"]
    opening = md[: md.index("\n## ")]
    assert "Exported: **fp8 kv** in `best.yaml`, to be run at **24.1 req/s**" in opening
    # The figures at the operating point, each with its 90 % interval, and how much was measured.
    assert (
        "output 6,190 tok/s (5,942-6,438 tok/s), TTFT p95 0.41 s (0.36-0.47 s), TPOT p95 38.0 ms (36.1-40.3 ms); "
        "90 % intervals, 722 requests over 30 s of steady window"
    ) in opening
    assert "Capacity found in the search: **32.1 req/s held; 34 req/s did not**" in opening
    assert "Against vLLM's defaults (23.9 req/s held; 25.2 req/s did not): **1.34x the capacity**" in opening
    assert "fp8 kv held a load the defaults did not" in opening
    assert f"**Tie:** {report['ties'][0]}." in opening  # the two FP8 configurations
    assert f"${2.0 * 1e6 / (6190 * 3600):.3f}" in opening and "at 24.1 req/s (the operating point)" in opening
    assert "J/token" in opening
    # Per GPU over the node's GPUs, per kW of the GPUs' measured power (520 W in the scripted evidence).
    assert "**6,190 per GPU** over its 1 GPU (idle ones count); **11,904 per kW**" in opening
    assert "vllm serve --config" in opening and "--kv-cache-dtype fp8" in opening
    assert "NOT PROVEN" not in md and "n/a" not in opening  # every opening figure is known


def test_markdown_and_html_say_the_same(report: dict[str, Any], tmp_path: Path) -> None:
    md, page = _write(report, tmp_path)
    parsed = _parse_html(page)
    assert _md_headings(md) == parsed.headings
    assert _md_cells(md) == [cell.strip() for cell in parsed.cells]
    plain = re.sub(r"<[^>]+>", "", page)
    for sentence in ("TTFT p95 0.41 s (0.36-0.47 s)", "1.34x the capacity", "tie within the uncertainty"):
        assert sentence in md and sentence in html.unescape(plain)


def test_the_verdict_section_walks_through_each_relaunch(report: dict[str, Any], tmp_path: Path) -> None:
    md, _ = _write(report, tmp_path)
    verdict = _section(md, "Verdict")
    assert "**PROVEN:**" in verdict and "size a production server for 24.1 req/s" in verdict
    assert "### Relaunch 1: fp8 kv (the winner)" in verdict and "start-up 128 s" in verdict
    assert "Proof at 32.1 req/s (the capacity found in the search): pass" in verdict
    # Judged against the load offered, not the trial's window (issue 16): both are shown.
    assert "8,105 tok/s (7,781-8,429 tok/s), delivered 1.00x the arrivals: held" in verdict
    assert "The trial's window read 8,218 tok/s (7,889-8,547 tok/s) at its capacity." in verdict
    assert "**Holds 24.1 req/s**" in verdict
    row = _row(verdict, "24.1 req/s")
    assert "| pass | 6,190 (5,942-6,438) | 0.41 (0.36-0.47) | 38.0 (36.1-40.3) | 722 / 30 s |" in row


def test_not_proven_is_said_plainly(tmp_path: Path) -> None:
    report = _report(tmp_path / "run", _not_proven)
    md, page = _write(report, tmp_path / "out")
    assert md.startswith("# NOT PROVEN: no configuration held the SLO")
    assert report["exit_code"] == 3 and "exit status 3" in md
    opening = md[: md.index("\n## ")]
    assert "> **The exported file is NOT proven.**" in opening and "Do not size a server on it." in opening
    assert "no production check held, down to" in opening  # what failed, per relaunch
    verdict = _section(md, "Verdict")
    assert "NOT PROVEN: the exported file is NOT proven." in verdict
    assert (
        "Relaunch 1: fp8 kv (the winner)" in verdict
        and "Relaunch 2: fp8 w, fp8 kv (the runner-up)" in verdict
    )
    assert verdict.count("**No production check held**") == 2
    assert "**did not hold**" in verdict and "TTFT p95 2.60 s > 2.00 s" in verdict
    assert "to be run at" not in md  # no operating point is claimed
    assert "warning" in page and "NOT PROVEN" in page


def test_backing_off_shows_the_check_that_did_not_hold(tmp_path: Path) -> None:
    report = _report(tmp_path / "run", _backed_off)
    md, _ = _write(report, tmp_path / "out")
    assert md.startswith("# PROVEN AFTER BACKING OFF: fp8 kv holds 19.3 req/s")
    assert "to be run at **19.3 req/s**" in md
    verdict = _section(md, "Verdict")
    assert "not for the capacity found in the search" in verdict
    assert "| **at the limit** |" in _row(verdict, "| 24.1 req/s |")
    assert "1.70-2.20" in _row(verdict, "| 24.1 req/s |")
    assert "| pass |" in _row(verdict, "| 19.3 req/s |")


def test_the_runner_up_exported_when_the_winner_does_not_start(tmp_path: Path) -> None:
    report = _report(tmp_path / "run", broken=frozenset({"fp8 kv"}))
    md, _ = _write(report, tmp_path / "out")
    assert md.startswith("# PROVEN AFTER BACKING OFF: fp8 w, fp8 kv holds")
    assert "Exported: **fp8 w, fp8 kv**" in md
    verdict = _section(md, "Verdict")
    assert ": did not start: vLLM failed to start (CUDA out of memory)" in verdict
    assert "**fp8 w, fp8 kv ★**" in _row(md, "| feasible |", "fp8 w, fp8 kv ★")


def test_unverified_says_the_file_was_never_relaunched(tmp_path: Path) -> None:
    md, _ = _write(_report(tmp_path / "run", None), tmp_path / "out")
    assert md.startswith("# UNVERIFIED (--no-prove): fp8 kv held 32.1 req/s")
    assert "**The exported file is UNVERIFIED:**" in md
    assert "at 32.1 req/s (the best load held in the search)" in md  # cost and energy where they are known
    assert "with no proven operating point" in md


# --- the trials and their points --------------------------------------------------------------------------


def test_trials_table_is_in_ranking_order_with_brackets_and_intervals(
    report: dict[str, Any], tmp_path: Path
) -> None:
    md, _ = _write(report, tmp_path)
    trials = _section(md, "Trials")
    rows = [line for line in trials.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert [r.split(" | ")[1] for r in rows] == [
        "**fp8 kv ★**",
        "fp8 w, fp8 kv",
        "vLLM defaults",
        "len 131072",
        "seqs 1024, mem 0.99",
    ]
    assert rows[0].startswith("| 1 |") and rows[2].startswith("| 3 |") and rows[3].startswith("| - |")
    assert "| 32.1 req/s held; 34 req/s did not | - | - | 8,218 (7,889-8,547) | 1.02 (0.90-1.18) |" in rows[0]
    assert "| 23.9 req/s held; 25.2 req/s did not |" in rows[2]
    assert "KV cache too small for one 131,072-token sequence" in rows[3]
    failed = rows[4]
    assert "vLLM failed to start (CUDA out of memory)" in failed and failed.count("n/a") >= 4
    block = md[md.index("<details><summary>") :]  # the failed server's log tail, collapsed
    assert "CUDA out of memory" in block and "</details>" in block


def test_point_tables_mark_scouts_and_show_every_interval(report: dict[str, Any], tmp_path: Path) -> None:
    md, _ = _write(report, tmp_path)
    points = _section(md, "Measured points")
    assert points.index("### fp8 kv (feasible)") < points.index("### vLLM defaults (feasible)")  # ranked
    assert "Capacity: 23.9 req/s held; 25.2 req/s did not; the search: bracketed between" in points
    defaults = points[points.index("### vLLM defaults") :]
    scout = _row(defaults, "| scout (pace only) | 64 users |")
    assert "within the SLO on point estimates" in scout
    limit = _row(defaults, "| 25.2 req/s |")
    assert "judged: ceiling" in limit and "**at the limit**" in limit and "1.90 (1.60-2.30)" in limit
    assert "straddles the limit 2.00 s" in limit
    pooled = _row(defaults, "| 23.9 req/s |")
    assert "judged: capacity" in pooled and "| 236 / 2 |" in pooled  # two phases pooled at one load
    assert "other processes used 1.2 cores" in _row(points, "| 30.4 req/s |")


def test_an_interval_without_upper_bound_reads_as_such(tmp_path: Path) -> None:
    caps = _capacities()
    few = _rate(35.0, 8900, (1.05, 0.92, None), requests=40)  # 40 requests cannot bound a p95 from above
    assert few.decision == "uncertain"
    caps[FP8.key()] = _searched([*caps[FP8.key()].points, few])
    files = write_report(_report(tmp_path / "run", capacities=caps), tmp_path / "out")
    md = files["markdown"].read_text()
    row = _row(md, "| 35 req/s |")
    assert "1.05 (0.92-∞)" in row and "cannot bound the TTFT p95 from above" in row
    ttft = _svg_root(tmp_path / "out" / "ttft_vs_load.svg")
    open_bars = [e for e in ttft.iter(f"{SVG}line") if e.get("stroke-dasharray") == "3 3"]
    assert len(open_bars) == 1


def test_token_mismatch_warned(report: dict[str, Any], tmp_path: Path) -> None:
    point = report["trials"][0]["capacity"]["points"][1]
    point["phases"][0]["tokens"] = dataclasses.asdict(check_tokens(59_370, 80_000.0))
    md, _ = _write(report, tmp_path)
    assert "Token counts disagree: 16 users: client counted 59,370 output tokens, server 80,000" in md


# --- plots -----------------------------------------------------------------------------------------------


def test_plots_are_against_the_load_with_intervals_and_the_slo(
    report: dict[str, Any], tmp_path: Path
) -> None:
    files = write_report(report, tmp_path)
    assert [p.name for p in files["plots"]] == ["ttft_vs_load.svg", "throughput_vs_load.svg", "pareto.svg"]
    md = files["markdown"].read_text()
    for plot in files["plots"]:
        assert f"]({plot.name})" in md  # relative links
    roots = {p.name: _svg_root(p) for p in files["plots"]}
    ttft = roots["ttft_vs_load.svg"]
    texts = _texts(ttft)
    assert "arrival rate (req/s, Poisson)" in texts and "TTFT p95 (s)" in texts
    assert "SLO TTFT p95 limit 2.00 s" in texts
    assert "capacity: 32.1 req/s" in texts and "vLLM defaults: 23.9 req/s" in texts
    tips = _tooltips(ttft)
    # Ten judged points of three searches, plus the proof and the production check of the relaunch; the
    # scouting phases (closed loop) are not on a rate axis.
    assert sum(" judged at " in t for t in tips) == 10 and not any(" scout at " in t for t in tips)
    assert sum(" proof at " in t for t in tips) == 1 and sum(" production at " in t for t in tips) == 1
    bars = [
        e for e in ttft.iter(f"{SVG}line") if e.get("stroke-opacity") == "0.75" and e.get("x1") == e.get("x2")
    ]
    assert len(bars) == 12  # one interval per marker
    assert "output tok/s (all GPUs)" in _texts(roots["throughput_vs_load.svg"])
    pareto = roots["pareto.svg"]
    assert any(t.startswith("SLO floor 10.0 tok/s per user") for t in _texts(pareto))
    assert sum(" scout at " in t for t in _tooltips(pareto)) == 12  # the trade-off includes the scouting


def test_users_objective_plots_on_a_log2_axis(tmp_path: Path) -> None:
    def users(n: int, tok_s: float, ttft: float, tpot_ms: float) -> Point:
        return _point(Load.users(n), "judged", tok_s, (ttft, ttft * 0.9, ttft * 1.1), tpot_ms, requests=200)

    cap = _searched(
        [users(1, 150, 0.03, 6.6), users(4, 600, 0.05, 7.0), users(16, 2300, 0.3, 9.0), users(64, 5000, 2.6, 12.0),
         users(32, 4100, 1.3, 10.0), users(48, 4700, 2.1, 11.0), users(40, 4400, 1.6, 10.5)],
        USERS,
    )  # fmt: skip
    files = write_report(
        _report(tmp_path / "run", capacities={DEFAULTS.key(): cap}, objective="users"), tmp_path / "out"
    )
    md = files["markdown"].read_text()
    assert "40 users held; 48 users did not" in md and "closed loop" in md
    assert "concurrent users (log2 scale)" in _texts(_svg_root(tmp_path / "out" / "ttft_vs_load.svg"))
    assert "vLLM's defaults were the best configuration" in md


def test_pareto_x_is_per_gpu(report: dict[str, Any], tmp_path: Path) -> None:
    """Two GPUs: the x axis halves, and the cost per token doubles at the same throughput."""
    one = write_report(report, tmp_path / "one")
    two = write_report({**report, "gpus": 2}, tmp_path / "two")

    def x_ticks(path: Path) -> list[str]:
        return [t for t in _texts(_svg_root(path)) if re.fullmatch(r"[0-9,]+", t)]

    assert "10,000" in x_ticks(one["plots"][2]) and "10,000" not in x_ticks(two["plots"][2])
    assert f"${2.0 * 2 * 1e6 / (6190 * 3600):.3f}" in two["markdown"].read_text()


# --- runs that go wrong ------------------------------------------------------------------------------------


def test_no_configuration(tmp_path: Path) -> None:
    tight = _searched([_rate(1.0, 250, (2.6, 2.3, 2.9)), _rate(0.8, 200, (2.4, 2.2, 2.7))])
    assert not tight.feasible
    report = _report(tmp_path / "run", capacities={DEFAULTS.key(): tight})
    md, page = _write(report, tmp_path / "out")
    assert md.startswith("# NO CONFIGURATION met the SLO")
    assert "Nothing exported" in md and "No verdict: no configuration held a load" in md
    assert "| nothing held |" in _row(md, "| vLLM defaults |", "infeasible")
    _parse_html(page)


def test_interrupted_run_with_failed_trials(report: dict[str, Any], tmp_path: Path) -> None:
    report.update(interrupted=True, verdict=None, winner=None, ranking=[], ties=[])
    report["headline"] = "INTERRUPTED: trials kept in t.sqlite (--resume carries on)"
    for trial in report["trials"]:
        trial.update(status="failed", capacity=None, reason="engine core initialization failed")
    files = write_report(report, tmp_path)
    md = files["markdown"].read_text()
    assert md.startswith("# INTERRUPTED") and "This run was interrupted" in md and "--resume" in md
    assert "No verdict: the run was interrupted" in md
    assert "No plots" in md and files["plots"] == []
    _parse_html(files["html"].read_text())


def test_missing_fields_read_na_never_zero(report: dict[str, Any], tmp_path: Path) -> None:
    """A report whose every optional figure is missing still renders, with n/a where numbers would be."""
    empty = write_report({"format": "infertop-tune-report", "version": 2}, tmp_path / "empty")
    md = empty["markdown"].read_text()
    assert md.startswith("# NO RESULT LINE") and "No trials were recorded" in md
    for key in (
        "slo",
        "workload",
        "hardware",
        "started_s",
        "finished_s",
        "price_per_gpu_hour",
        "gpus",
        "cpu",
    ):
        report[key] = None
    report["verdict"]["operating_point_figures"] = {"load": "24.1 req/s"}
    for trial in report["trials"]:
        trial["startup_s"] = None
        for point in (trial["capacity"] or {}).get("points", []):
            point["steady"] = {"output_tokens_per_s": 100.0, "output_tokens_per_s_ci": [90.0, None]}
            point["phases"] = [{"evidence": None, "bound": None, "stats": None, "tokens": None}]
    files = write_report(report, tmp_path / "sparse")
    md = files["markdown"].read_text()
    assert "output n/a, TTFT p95 n/a, TPOT p95 n/a; n/a intervals, n/a requests over n/a" in md
    row = _row(md, "| 34 req/s |")
    assert "| 100 (90.0-∞) | n/a | n/a | n/a / n/a | n/a |" in row
    assert "nan" not in md.lower().replace("n/a", "") and "0.000" not in md
    for plot in files["plots"]:
        _svg_root(plot)
    _parse_html(files["html"].read_text())


def test_an_aborted_point_has_no_figures(report: dict[str, Any], tmp_path: Path) -> None:
    why = "the server stopped answering: connection refused"
    gone = Point(Load.rate(40.0), "judged", "fail", empty_steady(), (why,), aborted=why)
    report["trials"][1]["capacity"]["points"].append(gone.to_dict())
    md, _ = _write(report, tmp_path)
    row = _row(md, "| 40 req/s |")
    assert "| **aborted** | n/a | n/a | n/a | n/a / n/a |" in row and why in row
    assert "| 0 |" not in row and "0.0" not in row  # stored zeros are no measurement


def test_garbage_in_the_dict_does_not_crash(report: dict[str, Any], tmp_path: Path) -> None:
    report["trials"].append("not a trial")
    report["trials"][0]["capacity"]["best"] = 99  # an index out of range
    report["trials"][1]["capacity"]["points"][0]["load"] = {"kind": "bogus", "value": -1}
    report["verdict"]["attempts"].append({"checks": [None, {"decision": 3}]})
    report["ranking"] = [None, "no-such-key", *report["ranking"]]
    report["ties"] = "not a list"
    md, page = _write(report, tmp_path)
    assert "trial-6" in md
    _parse_html(page)


def test_version_1_gets_a_limited_view(tmp_path: Path) -> None:
    def point(users: int, tok_s: float, passed: bool) -> dict[str, Any]:
        stats = {"output_tokens_per_s": tok_s, "ttft_p95_s": 0.5 if passed else 3.9, "requests_ok": 4 * users}
        return {"concurrency": users, "passed": passed, "slo_reasons": [] if passed else ["TTFT p95 3.90 s > 2.00 s"],
                "stats": stats, "evidence": {"energy_j": None}, "bound": {"kind": "gpu_compute"}}  # fmt: skip

    old = {
        "format": "infertop-tune-report",
        "version": 1,
        "model": "/models/m",
        "trials": [
            {
                "key": "vllm-defaults",
                "label": "vLLM defaults",
                "status": "feasible",
                "is_defaults": True,
                "best": {"concurrency": 128, "output_tokens_per_s": 7225.0},
                "points": [point(64, 5358.0, True), point(128, 7225.0, True), point(256, 7400.0, False)],
            },
            {
                "key": "max-model-len=131072",
                "label": "len 131072",
                "status": "infeasible",
                "best": None,
                "points": [],
                "reason": "KV cache too small",
            },
        ],
        "winner": "vllm-defaults",
        "proof": {"yaml": "best.yaml", "ratio": 0.98},
    }
    path = write_report(old, tmp_path)["json"]
    assert read_report(path)["version"] == 1
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# REPORT OF AN OLDER INFERTOP (format version 1): limited view")
    assert "## Verdict" not in md
    assert "| 128 users held; 256 users did not | - | - | 7,225 | 0.50 | GPU compute |" in _row(
        md, "vLLM defaults ★"
    )
    assert "KV cache too small" in _row(md, "len 131072")
    assert "| measured: ceiling | 256 users | **fail** |" in md
    assert "within the SLO on point estimates" in _row(md, "| measured: capacity | 128 users |")


def test_no_price_and_cpu(report: dict[str, Any], tmp_path: Path) -> None:
    md, _ = _write({**report, "price_per_gpu_hour": None}, tmp_path / "a")
    assert "--price-per-gpu-hour" in md and "$" not in md[: md.index("\n## ")]
    cpu = {
        **report,
        "gpus": 0,
        "hardware": Hardware.cpu(2**30).to_dict(),
        "hardware_label": "CPU (vLLM CPU build)",
    }
    for attempt in cpu["verdict"]["attempts"]:
        for held in attempt["checks"]:
            for phase in held["phases"]:
                phase["evidence"]["energy_j"] = None
    md, _ = _write(cpu, tmp_path / "b")
    assert "Cost per 1M output tokens: n/a (the CPU build" in md and "GPU energy per output token: n/a" in md
    assert "$0." not in md  # never a fake zero
    assert "output tok/s (CPU server)" in _texts(_svg_root(tmp_path / "b" / "pareto.svg"))


# --- the files -------------------------------------------------------------------------------------------


def test_writes_every_file(report: dict[str, Any], tmp_path: Path) -> None:
    files = write_report(report, tmp_path / "out")
    for path in (files["json"], files["markdown"], files["html"], *files["plots"]):
        assert path.is_file() and path.parent == tmp_path / "out"
    assert json.loads(files["json"].read_text()) == report
    assert read_report(files["json"]) == report
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_html_is_self_contained(report: dict[str, Any], tmp_path: Path) -> None:
    page = write_report(report, tmp_path)["html"].read_text()
    parser = _parse_html(page)
    assert parser.tags.count("svg") == 3 and "<img" not in page  # inlined, not linked
    assert "<script" not in page
    assert parser.tags.count("details") == 1 and "CUDA out of memory" in page


def test_non_finite_values_become_null(report: dict[str, Any], tmp_path: Path) -> None:
    report["trials"][0]["capacity"]["points"][0]["steady"]["ttft_growth_s"] = math.inf
    files = write_report(report, tmp_path)
    assert (
        json.loads(files["json"].read_text())["trials"][0]["capacity"]["points"][0]["steady"]["ttft_growth_s"]
        is None
    )


def test_errors_are_one_line(report: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match=r"^cannot create .*file/out"):
        write_report(report, blocker / "out")
    with pytest.raises(ReportError, match="no such file"):
        read_report(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ReportError, match="not an infertop tuning report"):
        read_report(tmp_path / "other.json")
    (tmp_path / "future.json").write_text(json.dumps({"format": "infertop-tune-report", "version": 9}))
    with pytest.raises(ReportError, match="version 9; this infertop reads 1 and 2"):
        read_report(tmp_path / "future.json")


def test_every_file_is_private_and_a_planted_symlink_is_replaced_not_followed(
    report: dict[str, Any], tmp_path: Path
) -> None:
    """The report carries the server's command line and log tail: 0600. Writing it again over the run's own
    files is the point (``infertop report``, ``--resume``), but never through a link someone left there."""
    victim = tmp_path / "victim"
    victim.write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").symlink_to(victim)
    (out / f".report.json.{os.getpid()}.tmp").symlink_to(victim)  # the predictable name it once wrote through
    files = write_report(report, out)
    again = write_report(report, out)
    assert again["json"].read_text() == files["json"].read_text()
    written = [files["json"], files["markdown"], files["html"], *files["plots"]]
    assert {p.name: stat.S_IMODE(p.lstat().st_mode) for p in written} == {p.name: 0o600 for p in written}
    assert victim.read_text() == "someone else's file" and not files["markdown"].is_symlink()
    assert not [p for p in out.iterdir() if p.name.endswith((".part", ".tmp")) and not p.is_symlink()]


def test_markdown_escapes_table_text(report: dict[str, Any], tmp_path: Path) -> None:
    report["trials"][3]["reason"] = "bad | pipe and *stars* <tag>"
    md, _ = _write(report, tmp_path)
    row = _row(md, "| infeasible |")
    assert r"bad \| pipe and \*stars\* \<tag>" in row
    assert "TTFT p95 <= 2.00 s" in md  # a "<" that opens no tag stays readable


def test_run_reads_the_dict_it_was_given(report: dict[str, Any]) -> None:
    run = Run.parse(report)
    assert [t.label for t in run.ranking] == ["fp8 kv", "fp8 w, fp8 kv", "vLLM defaults"]
    assert run.winner is run.ranking[0] and run.defaults is run.ranking[2]
    assert run.verdict is not None and run.verdict.status == "proven"
    assert run.verdict.chosen_attempt is not None and run.verdict.chosen_attempt.held is not None


def test_the_prefix_caches_share_at_the_winners_capacity_is_said_when_its_counters_were_read(
    report: dict[str, Any], tmp_path: Path
) -> None:
    md, _ = _write(report, tmp_path / "without")
    assert "Prefix cache:" not in md  # no counters: nothing said
    winner = next(t for t in report["trials"] if t["key"] == report["winner"])
    for point in winner["capacity"]["points"]:
        for phase in point["phases"]:
            phase["evidence"].update(prefix_cache_hits=300.0, prefix_cache_queries=1000.0)
    md, _ = _write(report, tmp_path / "with")
    assert (
        "vLLM's prefix cache served 30% of the prompt tokens at the exported configuration's capacity" in md
    )
