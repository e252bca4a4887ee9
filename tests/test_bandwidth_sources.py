"""DRAM bandwidth from each of its three sources, end to end: the card, the exporter and a recording say which.

GPUs CI does not have are scripted (NVML) and DCGM is a page in dcgm-exporter's real format served on loopback
(tests/fakes/dcgm_exporter_page.py); the sampler, the DCGM reader, the app, the exporter and the recorder are
the real ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes.dcgm_exporter_page import a100_gpu, exporter_page, h100_gpu, l4_gpus, serving_page
from helpers import FixedHost, prime, scripted_app
from prometheus_client.parser import text_string_to_metric_families

from tui.widgets.gpu_card import GpuCard
from tui.widgets.host_bar import HostBar
from tuner.measure import BoundKind, Evidence, classify_bound, summarise_snapshots
from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter
from tuner.telemetry.model import GpuSample, Snapshot
from tuner.telemetry.recording import Recorder, ReplaySource
from tuner.telemetry.sampler import LaunchedServer, LiveSource, Sampler, SamplerConfig

L4_PEAK_GBPS = 300.0


def text_of(widget: object) -> str:
    return str(widget.render())  # type: ignore[attr-defined]


def _source(nvml: scripted.ScriptedNvml, clock: scripted.ManualClock, dcgm: str) -> LiveSource:
    config = SamplerConfig(discover_vllm=False, dcgm=dcgm)
    return LiveSource(scripted.scripted_backend(nvml), config=config, host=FixedHost(), clock=clock)  # type: ignore[arg-type]


def _until_dcgm(sampler: Sampler, clock: scripted.ManualClock, timeout_s: float = 10.0) -> Snapshot:
    """Tick until every GPU carries DCGM's figures (DCGM is read on its own thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        clock.advance(0.25)
        snap = sampler.tick()
        assert snap is not None
        if snap.gpus and all(g.profiling_source == "dcgm" for g in snap.gpus):
            return snap
        assert time.monotonic() < deadline, f"no DCGM figures after {timeout_s} s: {snap.dcgm_status}"
        time.sleep(0.02)


@pytest.fixture
def l4_page() -> Iterator[str]:
    page = exporter_page(l4_gpus(2))  # DRAM active 0.62 and 0.63, SM active 0.41 and 0.42
    with serving_page(page) as server:
        yield server.url


def test_an_l4_with_dcgm_shows_dcgms_dram_bandwidth_named_as_dcgms(l4_page: str) -> None:
    clock = scripted.ManualClock()
    sampler = Sampler(_source(scripted.l4(2, clock=clock), clock, l4_page))
    sampler.open()
    try:
        snap = _until_dcgm(sampler, clock)
    finally:
        sampler.stop()
    first = snap.gpus[0]
    assert first.dram_bw_util_pct == pytest.approx(62.0)
    assert first.dram_bw_gbps == pytest.approx(0.62 * L4_PEAK_GBPS)  # DRAM active x the datasheet peak
    assert first.sm_active_pct == pytest.approx(41.0)
    assert snap.gpus[1].dram_bw_util_pct == pytest.approx(63.0)  # matched by UUID, GPU by GPU
    assert first.dram_bw_est_gbps is None  # measured: no estimate beside it
    assert snap.dcgm_status and "dcgm-exporter" in snap.dcgm_status


async def test_the_card_names_dcgm_and_the_duty_cycles_stay_duty_cycles(l4_page: str) -> None:
    clock = scripted.ManualClock()
    app = scripted_app(
        scripted.l4(2, clock=clock), clock, config=SamplerConfig(discover_vllm=False, dcgm=l4_page)
    )
    async with app.run_test(size=(200, 30)) as pilot:
        prime(app, clock, ticks=2)
        snap = _until_dcgm(app.sampler, clock)
        app.monitor.show_snapshot(snap)
        await pilot.pause()
        text = text_of(app.monitor.query(GpuCard).first())
        host = text_of(app.monitor.query_one(HostBar))
    first_line = text.splitlines()[0]
    assert "DCGM" in host and "dcgm-exporter" in host  # where the figures come from, on the host's line
    assert first_line.startswith("DRAM BW") and "62%" in first_line and "DCGM" in first_line
    assert "186 GB/s" in first_line
    assert "via DCGM" in text and "n/a (no GPM" not in text


def test_an_a100_with_dcgm_shows_its_bandwidth_on_its_own_peak() -> None:
    clock = scripted.ManualClock()
    with serving_page(exporter_page([a100_gpu(0, dram_active=0.35)])) as server:
        sampler = Sampler(_source(scripted.a100_80gb(1, clock=clock), clock, server.url))
        sampler.open()
        try:
            snap = _until_dcgm(sampler, clock)
        finally:
            sampler.stop()
    gpu = snap.gpus[0]
    peak = sampler.info.gpus[0].peak_dram_bw_gbps
    assert peak is not None and peak > 1500  # the A100 80GB SXM's HBM2e, not the L4's GDDR6
    assert gpu.dram_bw_util_pct == pytest.approx(35.0) and gpu.dram_bw_gbps == pytest.approx(0.35 * peak)


@pytest.mark.parametrize("machine", [scripted.l4, scripted.a100_80gb])
async def test_without_dcgm_or_a_server_the_card_says_na_and_why(machine) -> None:  # type: ignore[no-untyped-def]
    clock = scripted.ManualClock()
    app = scripted_app(machine(1, clock=clock), clock, config=SamplerConfig(discover_vllm=False, dcgm="off"))
    async with app.run_test(size=(110, 30)) as pilot:
        prime(app, clock, ticks=8)
        await pilot.pause()
        text = text_of(app.monitor.query_one(GpuCard))
    assert "DRAM BW n/a (no GPM, no DCGM)" in text
    assert (
        text.splitlines()[0].startswith("Mem busy") and "duty cycle, not BW" in text
    )  # named for what it is
    assert "est." not in text and "DCGM " not in text


def test_a_hopper_whose_gpm_dcgm_holds_shows_dcgms_values() -> None:
    clock = scripted.ManualClock()
    page = exporter_page([h100_gpu(0, dram_active=0.49)])
    with serving_page(page) as server:
        sampler = Sampler(_source(scripted.dcgm_beside(1, clock=clock), clock, server.url))
        sampler.open()
        try:
            snap = _until_dcgm(sampler, clock)
        finally:
            sampler.stop()
    gpu = snap.gpus[0]
    assert gpu.gpm_unavailable_reason is not None  # GPM still answers InUse ...
    assert gpu.dram_bw_util_pct == pytest.approx(49.0)  # ... and DCGM's value stands in
    assert gpu.dram_bw_gbps == pytest.approx(0.49 * 3350.0)
    assert gpu.profiling_source == "dcgm"


def test_gpm_wins_over_dcgm_where_it_measures() -> None:
    clock = scripted.ManualClock()
    page = exporter_page([h100_gpu(0, dram_active=0.05)])
    with serving_page(page) as server:
        sampler = Sampler(_source(scripted.h100_sxm(1, clock=clock), clock, server.url))
        sampler.open()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # long enough for DCGM's page to have been read
                clock.advance(0.25)
                snap = sampler.tick()
                time.sleep(0.02)
        finally:
            sampler.stop()
    assert snap is not None and snap.dcgm_status is not None
    gpu = snap.gpus[0]
    assert gpu.profiling_source == "gpm"
    assert (
        gpu.dram_bw_util_pct is not None and gpu.dram_bw_util_pct > 10
    )  # the scripted GPM's, not DCGM's 5 %


def _families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        f.name: [(dict(s.labels), s.value) for s in f.samples] for f in text_string_to_metric_families(text)
    }


def test_the_exporter_labels_dcgms_figures_with_their_source(l4_page: str) -> None:
    clock = scripted.ManualClock()
    exporter = Exporter(Sampler(_source(scripted.l4(2, clock=clock), clock, l4_page)), port=0, clock=clock)
    exporter.start(sampling=False)
    try:
        snap = _until_dcgm(exporter.sampler, clock)
        assert snap is not None
        got = _families(httpx.get(exporter.url, timeout=5).text)
    finally:
        exporter.stop()
    ratio = got["infertop_gpu_dram_bandwidth_ratio"]
    assert {labels["source"] for labels, _ in ratio} == {"dcgm"}
    assert sorted(v for _, v in ratio) == pytest.approx([0.62, 0.63])
    assert all(labels["source"] == "dcgm" for labels, _ in got["infertop_gpu_sm_active_ratio"])
    assert "infertop_gpu_dram_bandwidth_estimate_bytes_per_second" not in got  # nothing estimated
    (status,) = got["infertop_dcgm_info"]
    assert "dcgm-exporter" in status[0]["status"]


def test_a_recording_keeps_the_source_and_its_replay_shows_it(l4_page: str, tmp_path: Path) -> None:
    clock = scripted.ManualClock()
    sampler = Sampler(_source(scripted.l4(2, clock=clock), clock, l4_page))
    info = sampler.open()
    path = tmp_path / "l4-dcgm.ndjson"
    recorder = Recorder(path, info)
    try:
        for _ in range(3):
            recorder(_until_dcgm(sampler, clock))
    finally:
        recorder.close()
        sampler.stop()
    replay = ReplaySource(path)
    replay.open()
    read = replay.next_snapshot()
    replay.close()
    assert read is not None
    gpu: GpuSample = read.gpus[0]
    assert gpu.profiling_source == "dcgm" and gpu.dram_bw_util_pct == pytest.approx(62.0)
    assert gpu.profiling_age_s is not None
    assert read.dcgm_status and "dcgm-exporter" in read.dcgm_status


def test_without_dcgm_an_l4_exports_no_bandwidth_at_all() -> None:
    clock = scripted.ManualClock()
    exporter = Exporter(Sampler(_source(scripted.l4(1, clock=clock), clock, "off")), port=0, clock=clock)
    exporter.start(sampling=False)
    try:
        for _ in range(4):
            clock.advance(0.25)
            exporter.sampler.tick()
        got = _families(httpx.get(exporter.url, timeout=5).text)
    finally:
        exporter.stop()
    assert "infertop_gpu_dram_bandwidth_ratio" not in got  # never a made-up 0
    assert "infertop_gpu_dram_bandwidth_estimate_ratio" not in got
    assert "infertop_gpu_memory_duty_cycle_ratio" in got  # the duty cycle, under its own name


# --- the estimate: a server on a GPU nothing measures -----------------------------------------------------------

FAKE_VLLM = Path(__file__).parent / "fakes" / "fake_vllm.py"
LLAMA_8B_SHAPE = Path(__file__).parent / "data" / "llama-3.1-8b-shape"


@pytest.fixture
def busy_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The stand-in vLLM (tests/fakes/fake_vllm.py), kept decoding by 8 streams for as long as the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, str(FAKE_VLLM), "serve", str(LLAMA_8B_SHAPE), "--port", str(port)]
    argv += ["--max-num-seqs", "8", "--kv-cache-dtype", "fp8"]
    env = {**os.environ, "FAKE_VLLM_STEP_S": "0.07"}  # an L4's pace for an 8B model in 16 bits: ~8 steps/s
    server = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()

    def stream() -> None:
        body = {"model": str(LLAMA_8B_SHAPE), "prompt": "x", "max_tokens": 400, "stream": True}
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                with (
                    contextlib.suppress(httpx.HTTPError),
                    client.stream("POST", f"{url}/v1/completions", json=body) as answer,
                ):
                    for _ in answer.iter_bytes():
                        if stop.is_set():
                            break

    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "the stand-in vLLM did not start"
            time.sleep(0.1)
        streams = [threading.Thread(target=stream, daemon=True) for _ in range(8)]
        for t in streams:
            t.start()
        yield server, url
    finally:
        stop.set()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def _until_estimate(sampler: Sampler, clock: scripted.ManualClock, timeout_s: float = 20.0) -> Snapshot:
    deadline = time.monotonic() + timeout_s
    while True:
        clock.advance(0.25)
        snap = sampler.tick()
        assert snap is not None
        if snap.gpus[0].dram_bw_est_gbps:
            return snap
        assert time.monotonic() < deadline, (
            f"no estimate after {timeout_s} s: {snap.gpus[0].dram_bw_est_basis} {snap.engines}"
        )
        time.sleep(0.05)


def _serving_l4(server_pid: int, url: str, clock: scripted.ManualClock, argv: tuple[str, ...]) -> Sampler:
    """A scripted L4 pair whose GPU 0 holds the server's process; the server as the tuner hands it over."""
    nvml = scripted.l4(2, clock=clock, processes=[scripted.FakeProcess(server_pid, 0, 20 * 2**30)])
    config = SamplerConfig(discover_vllm=False, dcgm="off", engine_interval_s=0.25)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    sampler = Sampler(source)
    sampler.open()
    source.set_engine_urls([url], {url: LaunchedServer(server_pid, argv)})
    return sampler


def test_an_l4_running_a_server_shows_the_estimate_apart_from_any_measurement(
    busy_server: tuple[subprocess.Popen[bytes], str],
) -> None:
    server, url = busy_server
    clock = scripted.ManualClock()
    sampler = _serving_l4(
        server.pid, url, clock, ("vllm", "serve", str(LLAMA_8B_SHAPE), "--kv-cache-dtype", "fp8")
    )
    try:
        snap = _until_estimate(sampler, clock)
    finally:
        sampler.stop()
    busy, idle = snap.gpus
    engine = next(e for e in snap.engines if e.url == url)
    assert engine.steps_per_s and engine.kv_cache_blocks and engine.kv_cache_dtype == "fp8"
    assert (
        busy.dram_bw_util_pct is None and busy.profiling_source is None
    )  # nothing measured: nothing claims to
    # By hand: the Llama-3.1-8B shape's weights (16-bit, every weight but the input embedding's once a step:
    # 15.01 GB) plus the KV cache in use (FP8: 64 KiB a token) times the server's steps per second.
    kv_bytes = (engine.kv_cache_usage_pct or 0) / 100 * engine.kv_cache_blocks * 16 * 32 * 8 * 128 * 2
    by_hand = (15.01e9 + kv_bytes) * engine.steps_per_s
    assert busy.dram_bw_est_gbps == pytest.approx(by_hand / 1e9, rel=0.05)
    assert busy.dram_bw_est_pct == pytest.approx(100 * busy.dram_bw_est_gbps / L4_PEAK_GBPS)
    assert busy.dram_bw_est_basis and "est." in busy.dram_bw_est_basis
    assert idle.dram_bw_est_gbps is None  # the server's GPU only


def test_a_model_it_cannot_read_says_why_instead_of_estimating(
    busy_server: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    server, url = busy_server
    clock = scripted.ManualClock()
    sampler = _serving_l4(server.pid, url, clock, ("vllm", "serve", str(tmp_path / "no-such-model")))
    try:
        deadline = time.monotonic() + 10
        while True:
            clock.advance(0.25)
            snap = sampler.tick()
            assert snap is not None
            if snap.gpus[0].dram_bw_est_basis or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        sampler.stop()
    gpu = snap.gpus[0]
    assert gpu.dram_bw_est_gbps is None
    assert gpu.dram_bw_est_basis and gpu.dram_bw_est_basis.startswith("no estimate")


async def test_the_card_marks_the_estimate_as_one() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.l4(1, clock=clock), clock)
    async with app.run_test(size=(110, 30)) as pilot:
        prime(app, clock, ticks=2)
        snap = app.sampler.latest
        assert snap is not None
        estimated = dataclasses.replace(
            snap.gpus[0],
            dram_bw_est_gbps=96.0,
            dram_bw_est_pct=32.0,
            dram_bw_est_basis="15.0 GB x 6 steps/s (est.)",
        )
        app.monitor.show_snapshot(dataclasses.replace(snap, gpus=(estimated,)))
        await pilot.pause()
        card = app.monitor.query(GpuCard).first()
        text = text_of(card)
    first = text.splitlines()[0]
    assert first.startswith("DRAM BW") and "32%" in first and "96 GB/s" in first and "est." in first
    assert "decode reads, not measured" in text
    assert "ESTIMATED" in str(card.tooltip)


async def test_the_card_says_why_a_server_gets_no_estimate() -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.l4(1, clock=clock), clock)
    async with app.run_test(size=(130, 30)) as pilot:
        prime(app, clock, ticks=2)
        snap = app.sampler.latest
        assert snap is not None
        why = dataclasses.replace(snap.gpus[0], dram_bw_est_basis="no estimate: MoE models are not estimated")
        app.monitor.show_snapshot(dataclasses.replace(snap, gpus=(why,)))
        await pilot.pause()
        text = text_of(app.monitor.query(GpuCard).first())
    assert "DRAM BW n/a, no estimate: MoE models are not estimated" in text
    assert "est." not in text.splitlines()[0]  # no figure where there is none


def test_the_exporter_never_exports_the_estimate_as_a_measurement(
    busy_server: tuple[subprocess.Popen[bytes], str],
) -> None:
    server, url = busy_server
    clock = scripted.ManualClock()
    sampler = _serving_l4(server.pid, url, clock, ("vllm", "serve", str(LLAMA_8B_SHAPE)))
    exporter = Exporter(sampler, port=0, clock=clock)
    exporter.start(sampling=False)
    try:
        snap = _until_estimate(sampler, clock)
        got = _families(httpx.get(exporter.url, timeout=5).text)
    finally:
        exporter.stop()
    assert "infertop_gpu_dram_bandwidth_ratio" not in got
    assert "infertop_gpu_dram_bandwidth_bytes_per_second" not in got
    (estimate,) = got["infertop_gpu_dram_bandwidth_estimate_bytes_per_second"]
    assert estimate[0]["gpu"] == "0"
    assert estimate[1] == pytest.approx(
        snap.gpus[0].dram_bw_est_gbps * 1e9, rel=0.5
    )  # a later tick's reading


def test_bound_attribution_names_its_source_and_judges_the_estimate_on_its_own_threshold() -> None:
    measured = classify_bound(Evidence(gpu_samples=40, dram_bw_util_pct_mean=71.0, dram_bw_source="DCGM"), 64)
    assert measured.kind is BoundKind.GPU_MEMORY_BANDWIDTH and "(DCGM)" in measured.reason
    estimated = classify_bound(Evidence(gpu_samples=40, dram_bw_est_pct_mean=62.0), 64)
    assert estimated.kind is BoundKind.GPU_MEMORY_BANDWIDTH and "ESTIMATED" in estimated.reason
    # 50 % estimated may be 52-79 % measured (BENCHMARKS §13): not called memory-bound on an estimate.
    unsure = classify_bound(Evidence(gpu_samples=40, dram_bw_est_pct_mean=50.0), 64)
    assert unsure.kind is not BoundKind.GPU_MEMORY_BANDWIDTH and "DRAM ~50 % est." in unsure.reason
    low = classify_bound(Evidence(gpu_samples=40, dram_bw_est_pct_mean=20.0, gpu_util_pct_mean=80.0), 64)
    assert low.kind is BoundKind.UNKNOWN
    assert (
        "DRAM ~20 % est." in low.reason
        and "GPU util 80 % (duty cycle)" in low.reason
        and "nan" not in low.reason
    )
    # A measurement wins over an estimate of the same phase.
    both = classify_bound(Evidence(gpu_samples=40, dram_bw_util_pct_mean=30.0, dram_bw_est_pct_mean=90.0), 64)
    assert both.kind is not BoundKind.GPU_MEMORY_BANDWIDTH


def test_a_phase_counts_only_dcgm_figures_taken_inside_it() -> None:
    # dcgm-exporter samples every 30 s: over a 10 s phase, a figure up to 32 s old may be the previous load's.
    def row(t: float, age_s: float) -> Snapshot:
        gpu = GpuSample(
            index=0,
            time_s=t,
            dram_bw_util_pct=80.0,
            sm_active_pct=70.0,
            profiling_source="dcgm",
            profiling_age_s=age_s,
        )
        return Snapshot(time_s=t, host=None, gpus=(gpu,))

    stale = summarise_snapshots([row(100.0 + t, 32.0) for t in range(10)])
    assert stale["dram_bw_util_pct_mean"] is None and stale["dram_bw_source"] is None
    fresh = summarise_snapshots([row(100.0 + t, 1.0 if t >= 2 else 32.0) for t in range(10)])
    assert fresh["dram_bw_util_pct_mean"] == pytest.approx(80.0) and fresh["dram_bw_source"] == "DCGM"


def test_dcgm_fields_without_dram_active_do_not_make_a_card_read_as_measured() -> None:
    # A counters CSV with PCIe bytes but no DRAM active: the GPU keeps its duty cycles (and any estimate).
    from fakes.dcgm_exporter_page import ALL_DCP

    from tuner.telemetry.dcgm import DcgmReading, apply_dcgm, parse_exporter_page

    page = parse_exporter_page(exporter_page(l4_gpus(1), dcp=[n for n in ALL_DCP if "DRAM" not in n]))
    clock = scripted.ManualClock()
    sampler = Sampler(_source(scripted.l4(1, clock=clock), clock, "off"))
    info = sampler.open()
    clock.advance(0.25)
    snap = sampler.tick()
    sampler.stop()
    assert snap is not None
    now = snap.time_s
    (out,) = apply_dcgm(snap.gpus, info.gpus, DcgmReading(now, "test", 30.0, page.gpus, ""), now)
    assert out.profiling_source is None and out.dram_bw_util_pct is None and out.sm_active_pct is None
