"""The sampler: one cadence, bounded history, slow metrics on slow ticks, listeners isolated from failures."""

from __future__ import annotations

import threading
import time
import tracemalloc

from helpers import FixedHost

from tuner.telemetry import scripted
from tuner.telemetry.model import Snapshot
from tuner.telemetry.sampler import History, LiveSource, Sampler, SamplerConfig

NO_DISCOVERY = SamplerConfig(discover_vllm=False)


def _sampler(
    n_gpus: int = 1, config: SamplerConfig = NO_DISCOVERY, **options: object
) -> tuple[Sampler, scripted.ScriptedNvml, scripted.ManualClock]:
    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(n_gpus, clock=clock, **options)  # type: ignore[arg-type]
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    sampler = Sampler(source, history_len=config.history_len)
    sampler.open()
    return sampler, nvml, clock


def test_slow_metrics_are_read_once_every_slow_every_ticks() -> None:
    sampler, nvml, clock = _sampler(config=SamplerConfig(discover_vllm=False, slow_every=4))
    for _ in range(16):
        clock.advance(0.25)
        sampler.tick()
    assert nvml.calls["nvmlDeviceGetUtilizationRates"] == 16
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 4  # ticks 0, 4, 8, 12
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1  # at most every 5 s (it costs ~4 ms)
    snap = sampler.latest
    assert snap is not None and snap.gpus[0].energy_counter_j is not None  # repeated on fast ticks
    assert snap.gpus[0].processes  # likewise


def test_history_is_bounded_and_memory_stays_flat() -> None:
    sampler, _, clock = _sampler(2, config=SamplerConfig(discover_vllm=False, history_len=50))
    for _ in range(60):
        clock.advance(0.25)
        sampler.tick()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(2000):
        clock.advance(0.25)
        sampler.tick()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(sampler.history.gpu_series(0, "dram_bw_util_pct")) == 50
    assert len(sampler.history.host_cpu_series()) == 50
    assert grown < 200_000, f"memory grew by {grown} bytes over 2000 ticks"


def test_history_keeps_none_for_unsupported_metrics() -> None:
    h = History(3)
    from tuner.telemetry.model import GpuSample

    for v in (1.0, None, 3.0, 4.0):
        h.add(Snapshot(time_s=0, host=None, gpus=(GpuSample(index=0, time_s=0, power_w=v),)))
    assert h.gpu_series(0, "power_w") == [None, 3.0, 4.0]
    assert h.gpu_series(0, "dram_bw_util_pct") == [None, None, None]


def test_a_failing_listener_does_not_stop_telemetry() -> None:
    sampler, _, clock = _sampler()
    got: list[Snapshot] = []

    def broken(snap: Snapshot) -> None:
        raise RuntimeError("listener bug")

    sampler.add_listener(broken)
    sampler.add_listener(got.append)
    for _ in range(3):
        clock.advance(0.25)
        sampler.tick()
    assert len(got) == 3


def test_background_thread_keeps_its_cadence_pauses_and_stops() -> None:
    clock_source = time.time
    nvml = scripted.h100_sxm(1)
    config = SamplerConfig(interval_s=0.02, discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=FixedHost(), clock=clock_source)
    sampler = Sampler(source)
    sampler.open()
    ticked = threading.Event()
    sampler.add_listener(lambda s: ticked.set())
    sampler.start()
    try:
        assert ticked.wait(2.0)
        time.sleep(0.5)
        ticks = sampler.ticks
        assert 10 <= ticks <= 40, ticks  # ~25 at 50 Hz; generous for a loaded CI machine
        sampler.set_paused(True)
        time.sleep(0.1)
        paused_at = sampler.ticks
        time.sleep(0.2)
        assert sampler.ticks - paused_at <= 1
        sampler.set_paused(False)
        time.sleep(0.2)
        assert sampler.ticks > paused_at + 2
    finally:
        sampler.stop()
    assert nvml.initialized is False  # closing the sampler shut NVML down


def test_driver_gone_sets_gpu_error_once_and_stops_calling_nvml() -> None:
    sampler, nvml, clock = _sampler(driver_gone_after_reads=2)
    for _ in range(6):
        clock.advance(0.25)
        sampler.tick()
    snap = sampler.latest
    assert snap is not None and snap.gpu_error
    assert snap.gpus == () and snap.host is not None
    calls = nvml.calls["nvmlDeviceGetUtilizationRates"]
    clock.advance(0.25)
    sampler.tick()
    assert nvml.calls["nvmlDeviceGetUtilizationRates"] == calls


def test_history_tail_copies_only_the_newest_readings() -> None:
    from tuner.telemetry.model import GpuSample

    h = History(10)
    for v in range(8):
        h.add(Snapshot(time_s=0, host=None, gpus=(GpuSample(index=0, time_s=0, power_w=float(v)),)))
    assert h.gpu_series(0, "power_w", last=3) == [5.0, 6.0, 7.0]
    assert h.gpu_series(0, "power_w", last=50) == [float(v) for v in range(8)]


def test_a_call_hanging_at_stop_is_not_pulled_from_under_the_thread() -> None:
    """stop() while a GPM call hangs (a sick GPU): the samples are freed only after that call returns, by the
    thread that made it; freeing them first is a use-after-free inside libnvidia-ml."""
    nvml = scripted.h100_sxm(1)
    config = SamplerConfig(interval_s=0.05, discover_vllm=False)
    sampler = Sampler(LiveSource(scripted.scripted_backend(nvml), config=config, host=FixedHost()))
    sampler.open()
    release = threading.Event()
    try:
        sampler.start()
        deadline = time.monotonic() + 5
        while nvml.calls["nvmlGpmSampleGet"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        nvml.hang("nvmlGpmSampleGet", release)
        assert nvml.hanging.wait(5.0)
        started = time.monotonic()
        sampler.stop(timeout_s=0.3)
        assert time.monotonic() - started < 2.0  # stop() does not wait for the stuck call
        assert nvml.initialized and nvml.gpm_samples_live == 2  # nothing freed under the call
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while nvml.initialized and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nvml.use_after_free == 0
    assert nvml.gpm_samples_live == 0 and not nvml.initialized and nvml.calls["nvmlShutdown"] == 1


def test_a_sampler_never_started_is_closed_by_stop() -> None:
    nvml = scripted.h100_sxm(1)
    sampler = Sampler(
        LiveSource(
            scripted.scripted_backend(nvml), config=SamplerConfig(discover_vllm=False), host=FixedHost()
        )
    )
    sampler.open()
    sampler.tick()
    sampler.stop()
    sampler.stop()
    assert not nvml.initialized and nvml.calls["nvmlShutdown"] == 1


def test_stop_during_start_up_leaves_nothing_open() -> None:
    """The TUI opens the sampler on a worker thread: a quit meanwhile must not close under the open, and the
    start that follows must not leave NVML running."""
    nvml = scripted.h100_sxm(1)
    sampler = Sampler(
        LiveSource(
            scripted.scripted_backend(nvml), config=SamplerConfig(discover_vllm=False), host=FixedHost()
        )
    )
    release = threading.Event()
    nvml.hang("nvmlDeviceGetCount", release)
    opener = threading.Thread(target=sampler.open)
    opener.start()
    assert nvml.hanging.wait(5.0)
    stopper = threading.Thread(target=sampler.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # the stop waits for the open ...
    release.set()
    opener.join(5.0)
    stopper.join(5.0)
    assert not nvml.initialized  # ... then closes what it opened
    sampler.start()  # the worker's next step: no thread, nothing reopened
    assert not nvml.initialized and nvml.calls["nvmlShutdown"] == 1
    assert sampler._thread is None
