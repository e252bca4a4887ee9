"""`infertop bench` and the measurement phase: against a real vLLM (CPU build), plus the bound rules."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from tuner.bench import BenchPlan, run_bench
from tuner.loadgen import LoadSpec, PhaseProgress
from tuner.measure import BoundKind, Evidence, check_tokens, classify_bound, disturbance, measure_phase
from tuner.serving.launcher import VllmServer
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

# --- the rules that name what bound a phase (no server needed) -------------------------------------------


def test_h100_small_model_many_streams_is_called_front_end_or_client_bound() -> None:
    # REFERENCE.md: 1B model, 256 streams on an H100: DRAM 8 %, SM 13 %, the client and API server were the limit.
    e = Evidence(
        gpu_samples=40, dram_bw_util_pct_mean=8.0, sm_active_pct_mean=13.0, requests_running_mean=180.0
    )
    bound = classify_bound(e, concurrency=256)
    assert bound.kind is BoundKind.FRONT_END_OR_CLIENT
    assert "180 of 256" in bound.reason and "DRAM 8 %" in bound.reason


@pytest.mark.parametrize(
    ("evidence", "kind"),
    [
        (
            Evidence(gpu_samples=9, dram_bw_util_pct_mean=72.0, sm_active_pct_mean=40.0),
            BoundKind.GPU_MEMORY_BANDWIDTH,
        ),
        (Evidence(gpu_samples=9, dram_bw_util_pct_mean=30.0, sm_active_pct_mean=92.0), BoundKind.GPU_COMPUTE),
        (Evidence(gpu_samples=9, dram_bw_util_pct_mean=50.0, preemptions=3.0), BoundKind.KV_CACHE_QUEUEING),
        (Evidence(requests_waiting_mean=4.0, requests_waiting_max=9.0), BoundKind.KV_CACHE_QUEUEING),
        (Evidence(client_cpu_pct=97.0, dram_bw_util_pct_mean=20.0, gpu_samples=3), BoundKind.CLIENT),
        (Evidence(server_cpu_pct=190.0), BoundKind.ENGINE),
        (Evidence(), BoundKind.UNKNOWN),
    ],
)
def test_bound_rules(evidence: Evidence, kind: BoundKind) -> None:
    assert classify_bound(evidence, concurrency=64).kind is kind


def test_a_phase_is_disturbed_by_other_processes_steal_or_a_late_client() -> None:
    # 10 s on 2 CPUs: 12 busy core-seconds, the client 30 % of a core and the server 80 %: 0.1 core left over.
    quiet = disturbance(10.0, 12.0, 0.0, 30.0, 80.0, 2)
    assert not quiet.disturbed and quiet.other_load_cores == pytest.approx(0.1) and quiet.why == ""
    busy = disturbance(10.0, 20.0, 0.0, 30.0, 80.0, 2)
    assert busy.disturbed and "other processes used 0.90 cores" in busy.why
    stolen = disturbance(10.0, 12.0, 2.0, 30.0, 80.0, 2)
    assert stolen.disturbed and "CPU steal 10 %" in stolen.why
    on_time = disturbance(10.0, 12.0, 0.0, 30.0, 80.0, 2, client_late_p99_s=0.004)
    assert not on_time.disturbed
    late = disturbance(10.0, 12.0, 0.0, 30.0, 80.0, 2, client_late_p99_s=0.15)
    assert late.disturbed and "over 150 ms late" in late.why
    # Without the server's CPU (an endpoint bench) only the client's own schedule can be judged.
    endpoint = disturbance(0.0, 0.0, None, None, None, 2, client_late_p99_s=0.15)
    assert endpoint.disturbed and endpoint.other_load_cores is None and "late" in endpoint.why


def test_token_check_flags_a_mismatch() -> None:
    assert not check_tokens(1000, 1000.0).mismatch
    bad = check_tokens(1000, 1500.0)
    assert bad.mismatch and "MISMATCH" in bad.note
    assert not check_tokens(1000, None).mismatch


# --- against a real vLLM ------------------------------------------------------------------------------------


def _sampler(url: str) -> Sampler:
    config = SamplerConfig(interval_s=0.1, discover_vllm=False, engine_interval_s=0.2)
    sampler = Sampler(LiveSource(None, config=config, vllm_urls=[url]))
    sampler.open()
    sampler.start()
    return sampler


@pytest.mark.vllm
def test_measured_phase_counts_match_what_was_asked_and_the_server(vllm_server: VllmServer) -> None:
    spec = LoadSpec(
        concurrency=4, num_requests=24, warmup_requests=4, input_len=48, output_len=24, vocab_size=1000
    )
    sampler = _sampler(vllm_server.url)
    try:
        phase = asyncio.run(measure_phase(vllm_server.url, spec, sampler=sampler, server_pid=vllm_server.pid))
    finally:
        sampler.stop()
    s = phase.load.stats
    assert s.requests_ok == 24 and s.requests_failed == 0
    assert s.output_tokens_total == 24 * 24 and s.prompt_tokens_total == 24 * 48
    timed = [(r.ttft_s, r.e2e_s) for r in phase.load.requests if r.ttft_s is not None and r.e2e_s is not None]
    # <=, not <: on this 2-core box the server (or a starved client read) can deliver every token of a
    # request in one burst, and then the first token and the last arrive together.
    assert len(timed) == 24 and all(0 < ttft <= e2e for ttft, e2e in timed)
    assert phase.evidence.server_generation_tokens == 24 * 24  # warm-up excluded on both sides
    assert not phase.tokens.mismatch
    assert phase.evidence.engine_samples > 0 and phase.evidence.requests_running_mean is not None
    assert phase.evidence.server_cpu_pct is not None and phase.evidence.server_cpu_pct > 0
    assert phase.bound.kind is not BoundKind.UNKNOWN and phase.bound.reason


@pytest.mark.vllm
def test_bench_cli_against_a_running_server_writes_every_phase(
    vllm_server: VllmServer, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "tui.cli", "bench", "--endpoint", vllm_server.url, "--concurrency", "1,4",
         "--num-requests", "8", "--input-len", "32", "--output-len", "16", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    saved = json.loads(out.read_text())
    assert printed["phases"] == saved["phases"]
    assert [p["spec"]["concurrency"] for p in saved["phases"]] == [1, 4]
    assert all(p["stats"]["output_tokens_total"] == 8 * 16 for p in saved["phases"])
    assert all(p["tokens"]["mismatch"] is False for p in saved["phases"])


@pytest.mark.vllm
def test_server_killed_mid_phase_gives_a_clear_error_and_keeps_partial_results(
    vllm_spec, tiny_model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    server = VllmServer(vllm_spec(tiny_model_dir, log_path=tmp_path / "server.log"))
    server.start()
    killed = threading.Event()

    def kill_after_some(index: int, count: int, spec: LoadSpec, p: PhaseProgress) -> None:
        if index == 1 and p.stage == "measure" and p.requests_done >= 3 and not killed.is_set():
            killed.set()
            assert server.pid is not None
            os.killpg(server.pid, signal.SIGKILL)

    out = tmp_path / "bench.json"
    plan = BenchPlan(input_len=32, output_len=64, concurrencies=(2, 4), num_requests=40, warmup_requests=0)
    try:
        report = run_bench(server.url, plan, out, with_gpus=False, on_progress=kill_after_some)
    finally:
        stop = server.stop()
    assert killed.is_set()
    assert report.error and "\n" not in report.error
    assert len(report.phases) == 2  # the first, whole; the second, partial
    first, second = report.phases
    assert first.load.stats.requests_ok == 40
    assert second.load.stats.requests_ok >= 3 and second.load.stats.requests_failed >= 1
    saved = json.loads(out.read_text())
    assert len(saved["phases"]) == 2 and saved["error"] == report.error
    assert stop.leftover_pids == ()


@pytest.mark.vllm
def test_bench_launch_of_a_bad_model_path_fails_in_one_line_and_leaves_nothing(
    vllm_python: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    before = {p.pid for p in psutil.process_iter()}
    run = subprocess.run(
        [sys.executable, "-m", "tui.cli", "bench", "--launch", str(tmp_path / "no-such-model"),
         "--vllm-python", str(vllm_python), "--out", str(out), "--", "--load-format", "dummy"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("infertop bench:") and "Traceback" not in run.stderr
    assert json.loads(out.read_text())["launched"]["kind"]
    leftovers = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and "vllm" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_the_bench_table_gives_steady_figures_with_their_intervals(tmp_path: Path) -> None:
    """Against the fast stand-in server: enough requests for a bounded p95, and the table says how sure."""
    from fakes.sse_server import EmitterConfig, EmitterProcess

    with EmitterProcess(EmitterConfig(first_chunk_delay_s=0.01, chunk_interval_s=0.002)) as emitter:
        run = subprocess.run(
            [sys.executable, "-m", "tui.cli", "bench", "--endpoint", emitter.base_url, "--no-gpu",
             "--concurrency", "4", "--num-requests", "160", "--output-len", "16", "--vocab-size", "1000",
             "--out", str(tmp_path / "b.json")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    head, _, row = run.stdout.strip().splitlines()[:3]
    assert "out tok/s, steady (90 % interval)" in head and "TTFT p95 ms (90 % interval)" in head
    cells = [c.strip() for c in row.split("|")]
    assert re.fullmatch(r"[\d,]+ \([\d,]+-[\d,]+\)", cells[4]), cells[4]  # tok/s (lo-hi)
    assert re.fullmatch(r"[\d,]+ \([\d,]+-[\d,?]+\)", cells[7]), cells[7]  # TTFT p95 ms (lo-hi)


def test_every_phase_sends_its_own_prompts_so_the_prefix_cache_cannot_answer_one_from_another() -> None:
    import itertools

    from tuner.bench import BenchPlan
    from tuner.loadgen.spec import make_requests

    for plan in (BenchPlan(concurrencies=(1, 4, 8)), BenchPlan(request_rates=(1.0, 2.0))):
        firsts = [
            {r.prompt_token_ids for r in itertools.islice(make_requests(spec), 16)}
            for spec in plan.specs(vocab_size=1000)
        ]
        for a, b in itertools.combinations(firsts, 2):
            assert a.isdisjoint(b)


def test_the_results_file_keeps_a_file_that_appeared_since_the_check_then_replaces_only_its_own(
    tmp_path: Path,
) -> None:
    from tuner.bench import BenchReport, ResultsFile
    from tuner.outputs import OutputError

    path = tmp_path / "bench.json"
    path.write_text("written by someone after the CLI checked")
    report = BenchReport(endpoint="http://127.0.0.1:8000", model=None, system=None)
    with pytest.raises(OutputError, match="exists"):
        ResultsFile(path).save(report)
    assert path.read_text() == "written by someone after the CLI checked"
    path.unlink()
    results = ResultsFile(path)
    results.save(report)  # after the first phase
    report.error = "phase 2 stopped"
    results.save(report)  # after the second: its own file, replaced
    assert json.loads(path.read_text())["error"] == "phase 2 stopped"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    report.error = None
    ResultsFile(path, force=True).save(report)  # --force: whatever is there
    assert json.loads(path.read_text())["error"] is None


def test_fixed_lengths_the_server_must_refuse_are_never_sent(tmp_path: Path) -> None:
    """A server with a 1,024-token context refuses 900 + 200 tokens (the stand-in answers 400 above it, as
    vLLM does): the bench says so in one line before a request is sent, rather than count the refusals
    against the server."""
    from tests.fakes.hostile_server import HostileServer
    from tuner.bench import BenchError

    server = HostileServer("context", context=1024).start()
    try:
        plan = BenchPlan(input_len=900, output_len=200, concurrencies=(1,), vocab_size=1000, model="hostile")
        with pytest.raises(BenchError, match=r"up to 1100 tokens .* exceed the server's 1024-token context"):
            run_bench(server.url, plan, tmp_path / "r.json", with_gpus=False)
        ranged = BenchPlan(
            input_len=600, output_len=300, len_range_ratio=0.5, concurrencies=(1,), vocab_size=1000
        )
        with pytest.raises(
            BenchError, match=r"up to 1350 tokens \(--input-len 600 \+ --output-len 300 \(±0.5\)\)"
        ):
            run_bench(server.url, ranged, tmp_path / "s.json", with_gpus=False)
        assert server.prompts == []
    finally:
        server.stop()


def test_bench_workload_chat_against_a_small_context_sends_nothing_it_would_refuse(tmp_path: Path) -> None:
    """The finding as a user met it: `bench --workload chat` against a 1,024-token server warned, then sent
    requests of up to 3,691 tokens and 2 of 24 failed. Now every request fits and the phase line says how
    many draws were drawn again."""
    from tests.fakes.hostile_server import HostileServer

    server = HostileServer("context", context=1024).start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "tui.cli", "bench", "--endpoint", server.url, "--workload", "chat",
             "--concurrency", "4", "--num-requests", "24", "--vocab-size", "1000", "--no-gpu",
             "--out", str(tmp_path / "b.json")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    assert server.refused == 0 and all(p + m <= 1024 for p, m in server.prompts)
    assert "are drawn again" in run.stderr
    assert re.search(
        r"phase 1: \d+ ok, 0 failed \(\d+ draws longer than the context drawn again\)", run.stderr
    )
