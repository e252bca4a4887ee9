"""DRAM bandwidth from each of its three sources, end to end: the card, the exporter and a recording say which.

GPUs CI does not have are scripted (NVML) and DCGM is a page in dcgm-exporter's real format served on loopback
(tests/fakes/dcgm_exporter_page.py); the sampler, the DCGM reader, the app, the exporter and the recorder are
the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes.dcgm_exporter_page import exporter_page, h100_gpu, l4_gpus, serving_page
from helpers import FixedHost, prime, scripted_app
from prometheus_client.parser import text_string_to_metric_families

from tui.widgets.gpu_card import GpuCard
from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter
from tuner.telemetry.model import GpuSample, Snapshot
from tuner.telemetry.recording import Recorder, ReplaySource
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

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
    async with app.run_test(size=(110, 30)) as pilot:
        prime(app, clock, ticks=2)
        snap = _until_dcgm(app.sampler, clock)
        app.monitor.show_snapshot(snap)
        await pilot.pause()
        text = text_of(app.monitor.query(GpuCard).first())
    first_line = text.splitlines()[0]
    assert first_line.startswith("DRAM BW") and "62%" in first_line and "DCGM" in first_line
    assert "186 GB/s" in first_line
    assert "via DCGM" in text and "n/a (no GPM" not in text


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
