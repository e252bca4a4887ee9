"""On an 8-GPU box the tuner's evidence is the candidate's GPUs', not the machine's: a trial on a stand-in server
whose process the scripted NVML lists on GPU 3 only (the other seven idle)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tuner.measure import summarise_snapshots, visible_devices
from tuner.telemetry import scripted
from tuner.telemetry.model import GpuInfo, GpuSample, Snapshot
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig
from tuner.tuning.placement import Placement
from tuner.tuning.points import Load
from tuner.tuning.runner import MeasurePlan, ServerHooks, TrialRunner
from tuner.tuning.slo import parse_slo

FAKE_SERVER = Path(__file__).resolve().parent / "fakes" / "sse_server.py"
BUSY_GPU = 3


def _load(t: float, gpu_index: int) -> scripted.Load:
    busy = scripted.steady_load(dram_bw_util_pct=60.0, sm_active_pct=40.0, power_frac=0.9)(t, gpu_index)
    idle = scripted.steady_load(dram_bw_util_pct=1.0, sm_active_pct=0.5, power_frac=0.1)(t, gpu_index)
    return busy if gpu_index == BUSY_GPU else idle


def test_a_trial_on_one_of_eight_gpus_reads_that_gpu_alone(tmp_path: Path) -> None:
    nvml = scripted.h100_sxm(8, load=_load, processes=[])
    # The energy counter read on every slow tick (5 s in the monitor), so a phase holds several readings.
    backend = NvmlBackend(nvml, source="scripted", energy_interval_s=0.0)
    source = LiveSource(backend, config=SamplerConfig(discover_vllm=False, interval_s=0.1, slow_every=2))
    sampler = Sampler(source)
    sampler.open()
    sampler.start()

    def started(key: str, pid: int, port: int) -> None:  # the driver lists the new server on GPU 3
        nvml.processes = (scripted.FakeProcess(pid, BUSY_GPU, 2 * 2**30),)

    runner = TrialRunner(
        model="fake-model",
        slo=parse_slo("ttft=2,tps=5"),
        plan=MeasurePlan(input_len=16, output_len=8, vocab_size=1000, min_phase_s=1.5, min_requests=40),
        command=(sys.executable, str(FAKE_SERVER)),  # a stand-in for vLLM: serves /health and completions
        log_dir=tmp_path,
        sampler=sampler,
        hooks=ServerHooks(started=started),
    )
    try:
        # 8 tokens 50 ms apart: a request takes ~0.4 s and the phase seconds, so that it spans many readings.
        with runner.serve("trial", ("--chunk-interval-s", "0.05"), "fake") as session:
            point = session.measure(Load.users(4), "judged")
    finally:
        sampler.stop()
    evidence = point.evidence
    assert list(evidence["gpu_indices"]) == [BUSY_GPU], evidence.get("gpu_attribution")
    assert evidence["gpu_attribution"] == "the GPUs holding the server's processes"
    assert evidence["dram_bw_util_pct_mean"] == pytest.approx(
        60.0, abs=1.0
    )  # not ~8 %: seven idle GPUs left out
    assert evidence["power_w_mean"] == pytest.approx(0.9 * 700, rel=0.05)  # one GPU's power, not eight
    phase = point.last_phase
    length_s = phase["ended_at_s"] - phase["started_at_s"]
    assert evidence["gpu_samples"] >= 8 and length_s > 1.0
    # The energy of GPU 3 alone (630 W for the phase), from its counter: all eight would be 1,120 W.
    assert evidence["energy_j"] == pytest.approx(0.9 * 700 * length_s, rel=0.15)
    bound = point.bound["kind"]
    assert bound == "gpu_memory_bandwidth", point.bound  # the memory-bound rule can fire again


def _sample(index: int, t: float, power_w: float, energy_j: float | None) -> GpuSample:
    return GpuSample(index=index, time_s=t, power_w=power_w, energy_counter_j=energy_j)


def test_energy_comes_from_the_driver_counter_where_it_was_read_twice() -> None:
    """Power is a one-second average: over a window the energy counter is the better witness. GPU 0's counter
    was read at t=0 and t=5 (1,000 J: 200 W); its power readings say 100 W. GPU 1 has no counter: its power
    is integrated."""
    snaps = [
        Snapshot(
            time_s=t,
            host=None,
            gpus=(_sample(0, t, 100.0, 5000.0 if t < 5 else 6000.0), _sample(1, t, 50.0, None)),
        )
        for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0)
    ]
    summary = summarise_snapshots(snaps)
    assert summary["energy_j"] == pytest.approx(200.0 * 10 + 50.0 * 10)
    only_gpu_1 = summarise_snapshots(snaps, {1})
    assert only_gpu_1["energy_j"] == pytest.approx(500.0) and only_gpu_1["power_w_mean"] == pytest.approx(
        50.0
    )


def test_cuda_visible_devices_names_the_gpus_of_a_server_in_another_pid_namespace(tmp_path: Path) -> None:
    import subprocess

    gpus = [GpuInfo(i, "H100", f"GPU-{i:04d}aaaa", 80 * 2**30, 3350.0, "datasheet", True) for i in range(8)]
    env = {"CUDA_VISIBLE_DEVICES": "GPU-0005aaaa,6", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(["sleep", "30"], env=env)
    try:
        deadline = time.monotonic() + 5  # until the exec, /proc shows the parent's environment
        while b"sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert visible_devices([proc.pid], gpus) == {5, 6}
    finally:
        proc.kill()
        proc.wait()
    assert visible_devices([], gpus) is None


def test_the_no_gpu_hint_does_not_blame_cuda_visible_devices() -> None:
    from tui.widgets.banner import HINTS
    from tuner.telemetry.model import GpuState

    hint = HINTS[GpuState.NO_GPU]
    assert "ignores CUDA_VISIBLE_DEVICES" in hint  # NVML sees every GPU whatever that variable says


FAKE_VLLM = Path(__file__).resolve().parent / "fakes" / "fake_vllm.py"
LLAMA_8B_SHAPE = Path(__file__).resolve().parent / "data" / "llama-3.1-8b-shape"


def test_a_trial_on_an_l4_without_counters_is_judged_on_the_decode_estimate_labelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An L4 pair with no GPM and no DCGM, whose process lists show nothing (as in a container): the trial's
    # server is known by what the tuner gave it (GPU 1) and how it started it (the model, for the estimate).
    monkeypatch.setenv("FAKE_VLLM_STEP_S", "0.03")  # a busy L4's pace for an 8B model in 16 bits
    nvml = scripted.l4(2, processes=[])
    backend = NvmlBackend(nvml, source="scripted", energy_interval_s=0.0)
    config = SamplerConfig(
        discover_vllm=False, interval_s=0.1, slow_every=2, engine_interval_s=0.25, dcgm="off"
    )
    sampler = Sampler(LiveSource(backend, config=config))
    sampler.open()
    sampler.start()
    runner = TrialRunner(
        model=str(LLAMA_8B_SHAPE),
        slo=parse_slo("ttft=5,tps=1"),
        plan=MeasurePlan(input_len=16, output_len=16, vocab_size=1000, min_phase_s=2.0, min_requests=8),
        command=(sys.executable, str(FAKE_VLLM), "serve"),
        log_dir=tmp_path,
        sampler=sampler,
        placement=Placement(gpus=(1,)),
    )
    try:
        with runner.serve("trial", ("--max-num-seqs", "8"), "fake") as session:
            point = session.measure(Load.users(8), "judged")
    finally:
        sampler.stop()
    evidence = point.evidence
    assert list(evidence["gpu_indices"]) == [1]
    assert (
        evidence["dram_bw_util_pct_mean"] is None and evidence["dram_bw_source"] is None
    )  # nothing measured
    # 15 GB of weights a step at ~8 steps/s on a 300 GB/s L4: tens of % of peak, never a made-up 0.
    assert 20 < evidence["dram_bw_est_pct_mean"] < 150
    assert point.bound["kind"] != "unknown", point.bound
    assert "est" in point.bound["reason"].lower(), point.bound
