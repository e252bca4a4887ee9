"""NvmlBackend against the scripted NVML: conversions, start-up states, faults, fallbacks, GPM, processes."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pynvml
import pytest

from tuner.telemetry import host, nvml, scripted
from tuner.telemetry.backend import GpuLostError
from tuner.telemetry.model import GpuSample, GpuState
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.scripted import MIB, ManualClock, ScriptedNvml, nvml_error, scripted_backend, steady_load

GPM_FIELDS = (
    "dram_bw_util_pct",
    "dram_bw_gbps",
    "sm_active_pct",
    "sm_occupancy_pct",
    "tensor_active_pct",
    "pcie_tx_bytes_per_s",
    "pcie_rx_bytes_per_s",
    "nvlink_tx_bytes_per_s",
    "nvlink_rx_bytes_per_s",
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_s=1_800_000_020.0)  # 20 s into the decode cycle: decode phase


def opened(fake: ScriptedNvml, *, energy_interval_s: float = 0.0) -> NvmlBackend:
    """The backend on a scripted NVML; by default it reads the energy counter on every slow tick."""
    backend = NvmlBackend(fake, source="scripted", energy_interval_s=energy_interval_s)
    info = backend.open()
    assert info.state is GpuState.OK, info.message
    return backend


def tick(
    backend: NvmlBackend, clock: ManualClock, *, slow: bool = False, dt_s: float = 0.25
) -> tuple[GpuSample, ...]:
    return backend.read(clock.advance(dt_s), slow=slow)


# --- the names we rely on are pynvml's ----------------------------------------------------------------------


def test_backend_constants_are_pynvml_constants() -> None:
    for name, value in vars(nvml).items():
        if name.startswith(
            ("NVML_ERROR_", "NVML_FI_", "NVML_CLOCK_", "NVML_TEMPERATURE_", "NVML_DEVICE_MIG", "NVML_PSTATE_")
        ):
            assert getattr(pynvml, name) == value, name
    assert nvml.NVML_GPM_METRICS_GET_VERSION == pynvml.NVML_GPM_METRICS_GET_VERSION
    assert nvml.GPM_DRAM_BW_UTIL == pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL
    assert nvml.GPM_SM_UTIL == pynvml.NVML_GPM_METRIC_SM_UTIL
    assert nvml.GPM_SM_OCCUPANCY == pynvml.NVML_GPM_METRIC_SM_OCCUPANCY
    assert nvml.GPM_ANY_TENSOR_UTIL == pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
    assert nvml.GPM_PCIE_TX_PER_SEC == pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC
    assert nvml.GPM_PCIE_RX_PER_SEC == pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC
    assert nvml.GPM_NVLINK_TOTAL_RX_PER_SEC == pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC
    assert nvml.GPM_NVLINK_TOTAL_TX_PER_SEC == pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC


def test_clock_event_reason_bits_are_pynvml_bits() -> None:
    pynvml_names = {
        "gpu_idle": "GpuIdle",
        "applications_clocks_setting": "ApplicationsClocksSetting",
        "sw_power_cap": "SwPowerCap",
        "hw_slowdown": "HwSlowdown",
        "sync_boost": "SyncBoost",
        "sw_thermal_slowdown": "SwThermalSlowdown",
        "hw_thermal_slowdown": "HwThermalSlowdown",
        "hw_power_brake_slowdown": "HwPowerBrakeSlowdown",
        "display_clock_setting": "DisplayClockSetting",
        "board_limit": "BoardLimit",
        "reliability": "Reliability",
    }
    for bit, name in nvml.CLOCK_EVENT_REASONS:
        assert getattr(pynvml, "nvmlClocksThrottleReason" + pynvml_names[name]) == bit
        if name not in ("board_limit", "reliability"):  # pynvml names these two only the old way
            assert getattr(pynvml, "nvmlClocksEventReason" + pynvml_names[name]) == bit


def test_scripted_module_mirrors_pynvml_names_and_values() -> None:
    fake = scripted.h100_sxm()
    functions = [n for n, _ in inspect.getmembers(ScriptedNvml, inspect.isfunction) if n.startswith("nvml")]
    assert len(functions) > 30
    for name in functions:
        assert callable(getattr(pynvml, name, None)), f"pynvml has no {name}"
    for name in dir(fake):
        if name.startswith(("NVML_", "nvmlMemory_", "nvmlClocksEventReason")) and not name.endswith("_MAX"):
            assert getattr(pynvml, name) == getattr(fake, name), name
    for class_name in scripted.ERROR_CLASS_NAMES:
        real, fake_class = getattr(pynvml, class_name), getattr(fake, class_name)
        assert issubclass(fake_class, fake.NVMLError)
        assert pynvml.NVMLError(fake_class.value).__class__ is real
    struct_fields = {f[0] for f in pynvml.c_nvmlGpmMetricsGet_t._fields_}
    assert {"version", "numMetrics", "sample1", "sample2", "metrics"} <= struct_fields
    assert {"metricId", "nvmlReturn", "value"} <= {f[0] for f in pynvml.c_nvmlGpmMetric_t._fields_}


def test_pynvml_documents_gpm_link_rates_in_mib_per_second() -> None:
    source = inspect.getsource(pynvml)
    for name in ("NVML_GPM_METRIC_PCIE_TX_PER_SEC", "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC"):
        line = next(line for line in source.splitlines() if line.startswith(name))
        assert "MiB/sec" in line


# --- conversions --------------------------------------------------------------------------------------------


def test_unit_helpers() -> None:
    assert nvml.mw_to_w(481_234) == pytest.approx(481.234)
    assert nvml.mw_to_w(None) is None
    assert nvml.gpm_dram_gbps(50.0, 3350.0) == pytest.approx(1675.0)
    assert nvml.gpm_dram_gbps(None, 3350.0) is None
    assert nvml.gpm_dram_gbps(50.0, None) is None
    assert nvml.mib_per_s_to_bytes(2.0) == 2 * 1024 * 1024
    assert nvml.mib_per_s_to_bytes(None) is None


def test_clock_event_reasons_decode_to_names() -> None:
    assert nvml.decode_clock_event_reasons(0) == ()
    assert nvml.decode_clock_event_reasons(0x4 | 0x40) == ("sw_power_cap", "hw_thermal_slowdown")
    assert nvml.decode_clock_event_reasons(0x7FF) == tuple(name for _, name in nvml.CLOCK_EVENT_REASONS)
    assert nvml.decode_clock_event_reasons(0x400) == ("reliability",)
    assert nvml.decode_clock_event_reasons(0x200 | 0x8) == ("hw_slowdown", "board_limit")
    # A bit no table knows (a newer driver's) is named, not dropped, and counts as throttling.
    assert nvml.decode_clock_event_reasons(0x8000 | 0x1) == ("gpu_idle", "other(0x8000)")
    assert GpuSample(index=0, time_s=0.0, clock_event_reasons=("gpu_idle", "other(0x8000)")).throttled


def test_readings_are_converted_to_the_models_units(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load(dram_bw_util_pct=50.0, power_frac=0.7))
    backend = opened(fake)
    tick(backend, clock, slow=True)
    (sample,) = tick(backend, clock)
    total = scripted.H100_SXM.vram_total_bytes
    assert sample.vram_total_bytes == total == 81_559 * MIB
    assert sample.vram_used_bytes == int(total * 0.9)  # v2: driver-reserved memory not counted as used
    assert sample.power_w == pytest.approx(490.0)  # 490,000 mW
    assert sample.power_limit_w == pytest.approx(700.0)
    assert sample.gpu_util_pct == 100.0
    assert sample.mem_busy_pct == 64.0
    assert sample.dram_bw_util_pct == pytest.approx(50.0)
    assert sample.dram_bw_gbps == pytest.approx(1675.0)  # 50 % of the H100 SXM's 3350 GB/s
    assert sample.pcie_tx_bytes_per_s == pytest.approx(10 * 1024 * 1024)
    assert sample.pcie_rx_bytes_per_s == pytest.approx(20 * 1024 * 1024)
    assert sample.gpu_temp_c == round(30 + 38 * 0.7)
    assert sample.mem_temp_c == sample.gpu_temp_c + 7
    assert sample.sm_clock_mhz == 1980 and sample.mem_clock_mhz == 2619
    assert sample.clock_event_reasons == ()
    assert sample.pstate == 0
    assert sample.fan_pct is None  # SXM boards have no fan of their own
    assert sample.error is None


def test_unknown_pstate_is_none(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    backend = opened(fake)
    fake.nvmlDeviceGetPerformanceState = lambda handle: pynvml.NVML_PSTATE_UNKNOWN  # type: ignore[method-assign]
    (sample,) = tick(backend, clock)
    assert sample.pstate is None
    fake.nvmlDeviceGetPerformanceState = lambda handle: 2  # type: ignore[method-assign]
    (sample,) = tick(backend, clock)
    assert sample.pstate == 2


def test_energy_interval_is_the_counter_delta_between_slow_reads(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load(power_frac=0.7))
    backend = opened(fake)
    (first,) = tick(backend, clock, slow=True)
    assert first.energy_counter_j == pytest.approx(int(fake.devices[0].energy_mj) / 1000)
    assert first.energy_interval_j is None  # one counter reading is no interval
    tick(backend, clock)
    tick(backend, clock)
    tick(backend, clock)
    (second,) = tick(backend, clock, slow=True)
    assert second.energy_interval_s == pytest.approx(1.0)
    assert second.energy_interval_j == pytest.approx(490.0, abs=0.002)  # 490 W for 1 s, counter in whole mJ
    assert first.energy_counter_j is not None and second.energy_counter_j is not None
    assert second.energy_counter_j - first.energy_counter_j == pytest.approx(second.energy_interval_j)


def test_energy_counter_is_read_at_most_once_per_energy_interval(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load(power_frac=0.7))
    backend = opened(fake, energy_interval_s=5.0)
    for _ in range(40):  # 10 s of slow ticks, 4 per second
        tick(backend, clock, slow=True)
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 2  # t = 0.25 s and 5.25 s
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 40  # processes stay on every slow tick
    (last,) = tick(backend, clock, slow=True)
    assert last.energy_interval_s == pytest.approx(5.0)
    assert last.energy_interval_j == pytest.approx(490.0 * 5.0, abs=0.01)


def test_energy_counter_going_backwards_gives_no_interval(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load(power_frac=0.5))
    backend = opened(fake)
    tick(backend, clock, slow=True)
    fake.devices[0].energy_mj = 1_000.0  # the driver was reloaded: the counter restarted
    (after_reset,) = tick(backend, clock, slow=True, dt_s=1.0)
    assert after_reset.energy_counter_j == pytest.approx(1.0 + 350.0, abs=0.002)  # restarted at 1 J
    assert after_reset.energy_interval_j is None and after_reset.energy_interval_s is None
    (next_one,) = tick(backend, clock, slow=True, dt_s=1.0)
    assert next_one.energy_interval_j == pytest.approx(350.0, abs=0.002)


def test_fast_ticks_repeat_the_last_slow_values(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    backend = opened(fake)
    (slow,) = tick(backend, clock, slow=True)
    energy_calls = fake.calls["nvmlDeviceGetTotalEnergyConsumption"]
    (fast,) = tick(backend, clock)
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == energy_calls
    assert fast.energy_counter_j == slow.energy_counter_j is not None
    assert fast.processes == slow.processes is not None


def test_first_read_is_slow_even_when_asked_for_a_fast_one(clock: ManualClock) -> None:
    backend = opened(scripted.h100_sxm(clock=clock))
    (sample,) = tick(backend, clock, slow=False)
    assert sample.energy_counter_j is not None
    assert sample.processes is not None


# --- start-up states ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fake", "state", "message_part"),
    [
        (scripted.no_library, GpuState.NO_DRIVER, "No NVIDIA driver found (libnvidia-ml.so not loadable)"),
        (scripted.driver_not_loaded, GpuState.NO_DRIVER, "not loaded"),
        (scripted.no_permission, GpuState.PERMISSION_DENIED, "Insufficient Permissions"),
        (scripted.zero_gpus, GpuState.NO_GPU, "sees no GPU"),
        (scripted.driver_mismatch, GpuState.DRIVER_MISMATCH, "versions differ"),
        (
            lambda: ScriptedNvml([scripted.H100_SXM], init_error=scripted.NVML_ERROR_UNKNOWN),
            GpuState.ERROR,
            "NVML failed to start: Unknown Error",
        ),
    ],
)
def test_startup_failures_become_states(fake: Any, state: GpuState, message_part: str) -> None:
    module = fake()
    backend = scripted_backend(module)
    info = backend.open()
    assert info.state is state
    assert message_part in info.message
    assert "\n" not in info.message
    assert info.gpus == ()
    assert backend.read(1.0, slow=True) == ()
    assert module.initialized is False  # a failed start leaves NVML shut down
    backend.close()


def test_library_that_cannot_be_loaded_at_all_is_no_driver() -> None:
    class Unloadable(ScriptedNvml):
        def nvmlInit(self) -> None:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    info = scripted_backend(Unloadable([])).open()
    assert info.state is GpuState.NO_DRIVER
    assert info.message == "No NVIDIA driver found (libnvidia-ml.so not loadable)"


def test_missing_bindings_are_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    info = NvmlBackend().open()
    assert info.state is GpuState.NO_DRIVER
    assert "nvidia-ml-py" in info.message


def test_real_pynvml_without_a_driver_is_no_driver() -> None:
    backend = NvmlBackend()  # the installed nvidia-ml-py, for real
    info = backend.open()
    try:
        if info.state is GpuState.OK:
            pytest.skip("this machine has an NVIDIA driver")
        assert info.state is GpuState.NO_DRIVER
        assert info.message == "No NVIDIA driver found (libnvidia-ml.so not loadable)"
    finally:
        backend.close()


def test_a_failed_start_is_retried_by_the_next_open() -> None:
    module = scripted.no_permission()
    backend = scripted_backend(module)
    assert backend.open().state is GpuState.PERMISSION_DENIED
    module.init_error = None  # the user fixed the permissions
    info = backend.open()
    assert info.state is GpuState.OK
    assert len(info.gpus) == 1
    backend.close()


def test_open_reads_static_facts(clock: ManualClock) -> None:
    backend = scripted_backend(scripted.h100_sxm(2, clock=clock))
    info = backend.open()
    assert info.state is GpuState.OK and info.source == "scripted"
    assert (info.driver_version, info.cuda_driver_version, info.nvml_version) == (
        "580.95.05",
        "13.0",
        "13.580.95.05",
    )
    assert [g.index for g in info.gpus] == [0, 1]
    gpu = info.gpus[0]
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.uuid.startswith("GPU-")
    assert gpu.uuid != info.gpus[1].uuid
    assert (gpu.peak_dram_bw_gbps, gpu.peak_dram_bw_source) == (3350.0, "datasheet")
    assert gpu.gpm_supported and gpu.fp8_supported and gpu.compute_capability == (9, 0)
    assert gpu.power_limit_default_w == 700.0
    assert (gpu.sm_clock_max_mhz, gpu.mem_clock_max_mhz) == (1980, 2619)
    assert (gpu.pcie_gen_max, gpu.pcie_width_max, gpu.nvlink_links) == (5, 16, 18)
    assert gpu.mig_enabled is False
    assert gpu.vram_total_bytes == 81_559 * MIB
    assert backend.open() is info  # opening twice is harmless
    backend.close()


def test_unknown_gpu_gets_derived_peak_bandwidth() -> None:
    spec = scripted.FakeGpuSpec(
        name="NVIDIA Future GPU",
        vram_total_bytes=96 * 1024 * MIB,
        compute_capability=(12, 0),
        power_limit_w=600,
        sm_clock_max_mhz=2500,
        mem_clock_max_mhz=3000,
        bus_width_bits=4096,
        pcie_gen=6,
        pcie_width=16,
        nvlink_links=None,
        gpm=True,
        mem_temp=True,
        fan=False,
        mig_capable=False,
    )
    info = scripted_backend(ScriptedNvml([spec])).open()
    assert info.gpus[0].peak_dram_bw_source == "derived"
    assert info.gpus[0].peak_dram_bw_gbps == pytest.approx(3072.0)
    assert info.gpus[0].fp8_supported is True
    assert info.gpus[0].mig_enabled is None  # not MIG-capable: NVML says "not supported"


def test_a_gpu_whose_handle_cannot_be_had_keeps_a_card_with_an_error(clock: ManualClock) -> None:
    class SecondGpuLost(ScriptedNvml):
        def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
            if index == 1:
                raise nvml_error(scripted.NVML_ERROR_GPU_IS_LOST)
            return super().nvmlDeviceGetHandleByIndex(index)

    backend = scripted_backend(SecondGpuLost([scripted.H100_SXM] * 2, clock=clock))
    info = backend.open()
    assert info.state is GpuState.OK
    assert len(info.gpus) == 2 and info.gpus[1].name == "NVIDIA GPU (unreadable)"
    good, lost = tick(backend, clock)
    assert good.error is None and good.power_w is not None
    assert lost.error == "GPU 1 unreadable: GPU is lost" and lost.power_w is None
    backend.close()


def test_no_handle_at_all_is_a_startup_state() -> None:
    class NoAccess(ScriptedNvml):
        def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
            raise nvml_error(scripted.NVML_ERROR_NO_PERMISSION)

    assert scripted_backend(NoAccess([scripted.H100_SXM] * 2)).open().state is GpuState.PERMISSION_DENIED


# --- faults while running -----------------------------------------------------------------------------------


def test_gpu_lost_mid_run_marks_that_gpu_and_the_others_continue(clock: ManualClock) -> None:
    fake = scripted.gpu_lost_after(3, gpu_index=1, n_gpus=2, clock=clock)
    backend = opened(fake)
    for _ in range(3):
        assert all(s.error is None for s in tick(backend, clock))
    good, lost = tick(backend, clock, slow=True)
    assert good.error is None and good.power_w is not None and good.energy_counter_j is not None
    assert lost.index == 1 and lost.error is not None and lost.error.startswith("GPU lost: GPU is lost")
    assert all(getattr(lost, f) is None for f in ("power_w", "vram_used_bytes", "processes", *GPM_FIELDS))
    memory_calls = fake.calls["nvmlDeviceGetMemoryInfo_v2"]  # the first call of every GPU's tick
    good, lost = tick(backend, clock)
    assert good.error is None and lost.error is not None and lost.error.startswith("GPU lost")
    # Only GPU 0 was asked: a lost GPU stays lost until it is reset, so the backend stops calling it.
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == memory_calls + 1
    backend.close()


def test_unknown_error_is_no_value_for_that_call_not_a_lost_gpu(clock: ManualClock) -> None:
    """NVML's catch-all UNKNOWN means "no value this tick" for that one call: the GPU's other metrics stay."""
    fake = scripted.h100_sxm(2, clock=clock)
    backend = opened(fake)
    tick(backend, clock)
    fake.inject("nvmlDeviceGetClockInfo", scripted.NVML_ERROR_UNKNOWN, gpu=0)
    first, second = tick(backend, clock)
    assert first.error is None and first.sm_clock_mhz is None
    assert (
        first.power_w is not None and first.vram_used_bytes is not None and first.dram_bw_util_pct is not None
    )
    assert second.sm_clock_mhz is not None
    first, _ = tick(backend, clock)
    assert first.sm_clock_mhz is not None  # asked again, and answered


def test_unknown_error_at_open_does_not_lose_the_gpu(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    fake.inject("nvmlDeviceGetCudaComputeCapability", scripted.NVML_ERROR_UNKNOWN)
    backend = opened(fake)
    info = backend.open().gpus[0]
    assert info.compute_capability is None and info.name == scripted.H100_SXM.name
    (sample,) = tick(backend, clock)
    assert sample.error is None and sample.power_w is not None


def test_a_gpu_answering_nothing_but_unknown_shows_it_for_that_tick_only(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(2, clock=clock)
    backend = opened(fake)
    tick(backend, clock)
    tick(backend, clock)
    real_device = fake._device

    def unknown_on_gpu_0(function: str, handle: Any) -> Any:
        device = real_device(function, handle)
        if device.index == 0:
            raise nvml_error(scripted.NVML_ERROR_UNKNOWN)
        return device

    fake._device = unknown_on_gpu_0  # type: ignore[method-assign]
    first, second = tick(backend, clock)
    assert first.error == "GPU not answering this tick (NVML: Unknown Error)" and second.error is None
    fake._device = real_device  # type: ignore[method-assign]
    first, _ = tick(backend, clock)
    assert first.error is None and first.power_w is not None
    assert first.dram_bw_util_pct is None  # GPM restarts after the gap: one sample is not an interval
    first, _ = tick(backend, clock)
    assert first.dram_bw_util_pct is not None


def test_transient_error_gives_none_this_tick_and_is_asked_again(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    backend = opened(fake)
    fake.inject("nvmlDeviceGetClockInfo", scripted.NVML_ERROR_TIMEOUT)
    (sample,) = tick(backend, clock)
    assert sample.sm_clock_mhz is None and sample.error is None and sample.gpu_util_pct is not None
    (sample,) = tick(backend, clock)
    assert sample.sm_clock_mhz is not None


def test_driver_gone_mid_run_raises_gpu_lost_error(clock: ManualClock) -> None:
    fake = scripted.driver_gone_after(2, n_gpus=2, clock=clock)
    backend = opened(fake)
    tick(backend, clock)
    tick(backend, clock)
    with pytest.raises(GpuLostError, match="stopped answering"):
        tick(backend, clock)
    backend.close()  # the driver is gone: clean-up must not raise either
    backend.close()


def test_driver_not_loaded_mid_run_also_raises_gpu_lost_error(clock: ManualClock) -> None:
    fake = scripted.driver_gone_after(1, clock=clock, driver_gone_error=scripted.NVML_ERROR_DRIVER_NOT_LOADED)
    backend = opened(fake)
    tick(backend, clock)
    with pytest.raises(GpuLostError):
        tick(backend, clock)


# --- old drivers and old bindings ---------------------------------------------------------------------------


def test_old_driver_falls_back_to_older_functions(clock: ManualClock) -> None:
    fake = scripted.old_driver(clock=clock, load=steady_load())
    backend = opened(fake)
    assert backend.open().gpus[0].gpm_supported is False
    for i in range(4):
        (sample,) = tick(backend, clock, slow=i == 0)
    total = scripted.A100_80GB.vram_total_bytes
    assert sample.vram_used_bytes == int(total * 0.9) + 543 * MIB  # v1 counts reserved memory as used
    assert sample.clock_event_reasons == ()  # read through the older ...ThrottleReasons name
    assert sample.processes is not None and len(sample.processes) == 2  # through the _v2 process lists
    assert backend.process_layout == "_v2:24B"
    assert sample.power_w is not None  # no instantaneous power field: nvmlDeviceGetPowerUsage
    assert all(getattr(sample, f) is None for f in GPM_FIELDS)
    # Each missing function was tried once, then never again.
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 0  # its symbol is missing: never called
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 4
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 5  # once at open, once per tick
    assert fake.calls["nvmlGpmSampleGet"] == 0


def test_old_bindings_without_functions_fall_back_too(clock: ManualClock) -> None:
    fake = ScriptedNvml(
        [scripted.H100_SXM],
        clock=clock,
        absent_functions=[
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlGpmQueryDeviceSupport",
            "nvmlMemory_v2",
            "nvmlDeviceGetTemperature",
        ],
    )
    backend = opened(fake)
    (sample,) = tick(backend, clock)
    assert sample.clock_event_reasons is not None
    assert sample.gpu_temp_c is not None  # through nvmlDeviceGetTemperatureV
    assert sample.vram_used_bytes is not None
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 0
    assert backend.open().gpus[0].gpm_supported is False


# --- unsupported metrics, GPM -------------------------------------------------------------------------------


def test_unsupported_metrics_are_none_and_not_asked_again(clock: ManualClock) -> None:
    fake = scripted.l4(clock=clock)
    backend = opened(fake)
    (sample,) = tick(backend, clock)
    after_first = dict(fake.calls)
    for _ in range(5):
        (sample,) = tick(backend, clock)
    assert sample.fan_pct is None and sample.mem_temp_c is None
    assert fake.calls["nvmlDeviceGetFanSpeed"] == after_first["nvmlDeviceGetFanSpeed"] == 1
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 0  # power comes from the instantaneous field ...
    assert (
        fake.calls["nvmlDeviceGetFieldValues"] == after_first["nvmlDeviceGetFieldValues"] + 5
    )  # ... each tick
    requested: list[list[int]] = []
    real_fields = fake.nvmlDeviceGetFieldValues

    def spy(handle: Any, field_ids: Any) -> Any:
        requested.append(list(field_ids))
        return real_fields(handle, field_ids)

    fake.nvmlDeviceGetFieldValues = spy  # type: ignore[method-assign]
    tick(backend, clock, slow=True)
    assert all(nvml.NVML_FI_DEV_MEMORY_TEMP not in ids for ids in requested)  # unsupported: not asked again


def test_l4_has_no_gpm_fields_but_has_the_duty_cycle(clock: ManualClock) -> None:
    fake = scripted.l4(clock=clock, load=steady_load(power_frac=0.5))
    backend = opened(fake)
    info = backend.open().gpus[0]
    assert not info.gpm_supported and info.fp8_supported and info.peak_dram_bw_gbps == 300.0
    assert info.nvlink_links is None and info.mig_enabled is None
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.mem_busy_pct == 64.0 and sample.gpu_util_pct == 100.0
    assert sample.power_w == pytest.approx(36.0)
    assert all(getattr(sample, f) is None for f in GPM_FIELDS)
    assert fake.calls["nvmlGpmSampleAlloc"] == 0 and fake.calls["nvmlGpmSampleGet"] == 0


def test_gpm_first_tick_is_none_then_values(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(2, clock=clock, load=steady_load(dram_bw_util_pct=47.0, sm_active_pct=35.0))
    backend = opened(fake)
    first = tick(backend, clock)
    assert all(getattr(s, f) is None for s in first for f in GPM_FIELDS)
    second = tick(backend, clock)
    for sample in second:
        assert sample.dram_bw_util_pct == pytest.approx(47.0)
        assert sample.dram_bw_gbps == pytest.approx(0.47 * 3350)
        assert sample.sm_active_pct == pytest.approx(35.0)
        assert sample.sm_occupancy_pct == pytest.approx(20.0)
        assert sample.tensor_active_pct == pytest.approx(18.0)
        assert sample.nvlink_rx_bytes_per_s == sample.nvlink_tx_bytes_per_s == pytest.approx(1000 * MIB)
    assert fake.calls["nvmlGpmSampleAlloc"] == 4  # two per GPU, once
    tick(backend, clock)
    assert fake.calls["nvmlGpmSampleAlloc"] == 4
    assert fake.calls["nvmlGpmMetricsGet"] == 4  # from the second tick on, one per GPU per tick


def test_gpm_metric_a_gpu_lacks_is_none_and_dropped_after_failing_in_a_row(clock: ManualClock) -> None:
    pcie_h100 = scripted.FakeGpuSpec(**{**_spec_fields(scripted.H100_SXM), "nvlink_links": None})
    fake = ScriptedNvml([pcie_h100], clock=clock, load=steady_load())
    backend = opened(fake)
    requested: list[list[int]] = []
    real_get = fake.nvmlGpmMetricsGet

    def spy(request: Any) -> Any:
        requested.append([m.metricId for m in request.metrics[: request.numMetrics]])
        return real_get(request)

    fake.nvmlGpmMetricsGet = spy  # type: ignore[method-assign]
    for _ in range(1 + nvml.GPM_FAILURES_TO_DROP):
        (sample,) = tick(backend, clock)
    assert sample.nvlink_rx_bytes_per_s is None and sample.nvlink_tx_bytes_per_s is None
    assert sample.dram_bw_util_pct == pytest.approx(50.0)
    assert all(nvml.GPM_NVLINK_TOTAL_RX_PER_SEC in ids for ids in requested)  # asked while failing ...
    tick(backend, clock)
    assert nvml.GPM_NVLINK_TOTAL_RX_PER_SEC not in requested[-1]  # ... then set aside
    assert nvml.GPM_DRAM_BW_UTIL in requested[-1]
    tick(backend, clock, dt_s=nvml.GPM_REPROBE_S)  # (a pause: this tick re-primes)
    tick(backend, clock)
    assert nvml.GPM_NVLINK_TOTAL_RX_PER_SEC in requested[-1]  # asked for again a minute later


def test_one_gpm_metric_failing_once_is_kept_and_a_skipped_entry_does_not_repeat(clock: ManualClock) -> None:
    """A transient failure of one metric costs that tick's value only; an entry the driver leaves unwritten
    must read as missing, not as last tick's value."""
    fake = scripted.h100_sxm(clock=clock, load=steady_load(dram_bw_util_pct=40.0))
    backend = opened(fake)
    tick(backend, clock)
    (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct == pytest.approx(40.0)
    fake.inject_gpm_metric(nvml.GPM_DRAM_BW_UTIL, None)  # left unwritten by the driver
    (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct is None and sample.sm_active_pct is not None
    fake.inject_gpm_metric(nvml.GPM_DRAM_BW_UTIL, scripted.NVML_ERROR_UNKNOWN)
    (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct is None
    (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct == pytest.approx(40.0)  # still asked for: it never failed 3 times in a row


def test_gpm_call_failing_as_a_whole_falls_back_to_the_core_metrics(clock: ManualClock) -> None:
    class StrictGpm(ScriptedNvml):
        def nvmlGpmMetricsGet(self, request: Any) -> Any:
            if any(m.metricId >= 20 for m in request.metrics[: request.numMetrics]):
                self.calls["nvmlGpmMetricsGet"] += 1
                raise nvml_error(scripted.NVML_ERROR_NOT_SUPPORTED)
            return super().nvmlGpmMetricsGet(request)

    fake = StrictGpm([scripted.H100_SXM], clock=clock, load=steady_load())
    backend = opened(fake)
    tick(backend, clock)
    for _ in range(nvml.GPM_FAILURES_TO_DROP):
        (failed,) = tick(backend, clock)
        assert failed.dram_bw_util_pct is None and failed.error is None
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct == pytest.approx(50.0) and sample.sm_active_pct == pytest.approx(35.0)
    assert sample.pcie_rx_bytes_per_s is None and sample.nvlink_rx_bytes_per_s is None
    assert fake.calls["nvmlGpmMetricsGet"] == nvml.GPM_FAILURES_TO_DROP + 3


def test_gpm_set_aside_after_failures_is_probed_again_and_info_stays_true(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load())
    backend = opened(fake)
    tick(backend, clock)
    fake.inject("nvmlGpmSampleGet", *[scripted.NVML_ERROR_NOT_SUPPORTED] * nvml.GPM_FAILURES_TO_DROP)
    for _ in range(10):
        (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct is None
    assert fake.calls["nvmlGpmSampleGet"] == 1 + nvml.GPM_FAILURES_TO_DROP  # then left alone ...
    assert backend.open().gpus[0].gpm_supported is True
    tick(backend, clock, dt_s=nvml.GPM_REPROBE_S)  # ... until a minute has passed
    (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct == pytest.approx(50.0)


def test_gpm_given_up_for_a_while_when_even_the_core_metrics_fail(clock: ManualClock) -> None:
    class NoGpmMetrics(ScriptedNvml):
        def nvmlGpmMetricsGet(self, request: Any) -> Any:
            self.calls["nvmlGpmMetricsGet"] += 1
            raise nvml_error(scripted.NVML_ERROR_NOT_SUPPORTED)

    fake = NoGpmMetrics([scripted.H100_SXM], clock=clock)
    backend = opened(fake)
    for _ in range(12):
        (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct is None and sample.power_w is not None
    assert (
        fake.calls["nvmlGpmMetricsGet"] == 2 * nvml.GPM_FAILURES_TO_DROP
    )  # full set, core set, then a pause


def test_gpm_samples_are_at_least_0_2_s_apart_however_fast_the_ticks(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load(dram_bw_util_pct=30.0))
    backend = opened(fake)
    seen = []
    for _ in range(40):  # 2 s at 20 Hz
        (sample,) = tick(backend, clock, dt_s=0.05)
        seen.append(sample.dram_bw_util_pct)
    assert fake.gpm_short_intervals == 0
    assert fake.calls["nvmlGpmSampleGet"] == 10  # one per 0.2 s
    assert seen[:3] == [None, None, None] and seen[-1] == pytest.approx(30.0)
    assert all(v == pytest.approx(30.0) for v in seen[8:])  # between samples the last interval stands


def test_gpm_after_a_pause_measures_from_the_resume_not_across_the_pause(clock: ManualClock) -> None:
    resume_at = clock() + 30.0
    fake = scripted.h100_sxm(
        clock=clock,
        load=lambda t, i: steady_load(dram_bw_util_pct=90.0 if t < resume_at else 10.0)(t, i),
    )
    backend = opened(fake)
    for _ in range(4):
        tick(backend, clock)
    clock.advance(30.0)  # the sampler was paused while the GPU ran hot
    (first,) = tick(backend, clock)
    (second,) = tick(backend, clock)
    assert first.dram_bw_util_pct is None  # re-primed
    assert second.dram_bw_util_pct == pytest.approx(10.0)  # not the pause's 90 %


# --- MIG, power, clocks, deprecated calls, per-tick cost -------------------------------------------------


def test_mig_unprivileged_reads_memory_processes_and_gpm_from_the_gpu_instances(clock: ManualClock) -> None:
    """MIG mode as an ordinary user: the parent handle's memory and process lists answer NO_PERMISSION and
    utilisation is unsupported; the MIG device handles give memory and processes, GPM comes per instance."""
    procs = [
        scripted.FakeProcess(os.getpid(), 0, 4 * 2**30, gpu_instance_id=1),
        scripted.FakeProcess(os.getpid() + 1, 0, 2**30, gpu_instance_id=2),
    ]
    fake = scripted.mig_h100(clock=clock, load=steady_load(dram_bw_util_pct=40.0), processes=procs)
    backend = opened(fake)
    info = backend.open().gpus[0]
    card = scripted.H100_SXM.vram_total_bytes
    assert info.mig_enabled is True and info.gpm_supported is True
    assert info.vram_total_bytes == int(card * 3 / 7) + int(
        card * 4 / 7
    )  # the tuner's memory check has a size
    tick(backend, clock, slow=True)
    (sample,) = tick(backend, clock)
    assert sample.gpu_util_pct is None  # not supported on MIG-enabled GPUs
    assert sample.vram_used_bytes == int(int(card * 3 / 7) * 0.9) + int(int(card * 4 / 7) * 0.9)
    assert sample.processes is not None and {p.pid for p in sample.processes} == {p.pid for p in procs}
    assert sample.dram_bw_util_pct == pytest.approx(40.0)
    assert fake.calls["nvmlGpmMigSampleGet"] >= 4 and fake.calls["nvmlGpmSampleGet"] == 0


def test_mig_privileged_uses_the_parent_handle(clock: ManualClock) -> None:
    fake = scripted.mig_h100(clock=clock, privileged=True)
    backend = opened(fake)
    (sample,) = tick(backend, clock, slow=True)
    assert sample.vram_total_bytes == scripted.H100_SXM.vram_total_bytes
    assert sample.processes is not None and len(sample.processes) == 2


def test_live_power_is_the_instantaneous_reading_not_the_one_second_average(clock: ManualClock) -> None:
    step_at = clock() + 2.0
    fake = scripted.h100_sxm(
        clock=clock, load=lambda t, i: steady_load(power_frac=0.2 if t < step_at else 0.9)(t, i)
    )
    backend = opened(fake)
    for _ in range(8):
        tick(backend, clock)
    (sample,) = tick(backend, clock)  # 0.25 s after the step
    assert sample.power_w == pytest.approx(0.9 * 700)  # the 1 s average would still say ~315 W
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 0


def test_power_falls_back_to_power_usage_without_the_instant_field(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(
        clock=clock, load=steady_load(power_frac=0.5), missing_fields=[nvml.NVML_FI_DEV_POWER_INSTANT]
    )
    backend = opened(fake)
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.power_w == pytest.approx(350.0)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 3


@pytest.mark.parametrize(
    ("fake_driver", "layout"), [(scripted.h100_sxm, "_v3:24B"), (scripted.driver_535, "_v3:32B")]
)
def test_process_lists_are_read_in_the_layout_the_driver_fills(
    clock: ManualClock, fake_driver: Any, layout: str
) -> None:
    """Some 535 drivers fill 32-byte entries where pynvml reads 24: every entry after the first is garbage."""
    pids = [os.getpid(), 4_100_001, 4_100_002, 4_100_003]
    procs = [scripted.FakeProcess(pid, 0, (i + 1) * 2**30) for i, pid in enumerate(pids)]
    fake = fake_driver(clock=clock, processes=procs)
    backend = opened(fake)
    (sample,) = tick(backend, clock, slow=True)
    assert backend.process_layout == layout
    assert sample.processes is not None
    assert [(p.pid, p.vram_used_bytes) for p in sample.processes] == [
        (p.pid, p.vram_used_bytes) for p in procs
    ]
    assert fake.buffer_overflows == 0


def test_pynvmls_own_wrapper_garbles_a_535_drivers_list() -> None:
    """What the backend avoids: the fake decodes like pynvml, so this shows the bug is really scripted."""
    fake = scripted.driver_535(processes=[scripted.FakeProcess(p, 0, 2**30) for p in (11, 12, 13)])
    fake.nvmlInit()
    procs = fake.nvmlDeviceGetComputeRunningProcesses_v3(fake.nvmlDeviceGetHandleByIndex(0))
    assert procs[0].pid == 11 and [p.pid for p in procs] != [11, 12, 13]


def test_deprecated_calls_go_to_their_successors(clock: ManualClock) -> None:
    fake = ScriptedNvml(
        [scripted.H100_SXM],
        clock=clock,
        deprecated_functions=["nvmlDeviceGetTemperature", "nvmlDeviceGetCurrentClocksThrottleReasons"],
    )
    backend = opened(fake)
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.gpu_temp_c is not None and sample.clock_event_reasons is not None
    assert fake.calls["nvmlDeviceGetTemperature"] == 0  # the versioned call is asked first


def test_temperature_falls_back_to_the_old_call_where_the_versioned_one_is_missing(
    clock: ManualClock,
) -> None:
    fake = ScriptedNvml([scripted.H100_SXM], clock=clock, missing_functions=["nvmlDeviceGetTemperatureV"])
    backend = opened(fake)
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.gpu_temp_c is not None
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 1 and fake.calls["nvmlDeviceGetTemperature"] == 3


def test_clock_event_bits_outside_the_table_count_as_throttling(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(
        clock=clock,
        load=lambda t, i: dataclasses.replace(steady_load()(t, i), clock_event_bits=0x400 | 0x2000),
    )
    backend = opened(fake)
    (sample,) = tick(backend, clock)
    assert sample.clock_event_reasons == ("reliability", "other(0x2000)") and sample.throttled


def test_slowly_changing_values_are_read_on_slow_ticks_only(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    backend = opened(fake)
    tick(backend, clock, slow=True)
    before = dict(fake.calls)
    for _ in range(3):
        (sample,) = tick(backend, clock)
    fast = {name: n - before.get(name, 0) for name, n in fake.calls.items() if n != before.get(name, 0)}
    assert "nvmlDeviceGetEnforcedPowerLimit" not in fast
    assert fast["nvmlDeviceGetClockInfo"] == 3  # the SM clock; the memory clock waits for a slow tick
    assert sum(fast.values()) / 3 <= 9  # NVML calls per GPU per fast tick (11 and more before)
    assert sample.power_limit_w == 700.0 and sample.mem_clock_mhz == 2619 and sample.mem_temp_c is not None
    tick(backend, clock, slow=True)
    assert fake.calls["nvmlDeviceGetEnforcedPowerLimit"] == before["nvmlDeviceGetEnforcedPowerLimit"] + 1


def _spec_fields(spec: scripted.FakeGpuSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in scripted.FakeGpuSpec.__dataclass_fields__}


# --- processes ----------------------------------------------------------------------------------------------


def test_processes_are_enriched_from_the_host(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    backend = opened(fake)
    (sample,) = tick(backend, clock, slow=True)
    assert sample.processes is not None
    mine = next(p for p in sample.processes if p.pid == os.getpid())
    me = psutil.Process()
    assert mine.kind == "compute" and mine.gpu_index == 0
    assert mine.user == me.username() and mine.name == me.name()
    assert mine.command is not None and mine.command.startswith(me.cmdline()[0])
    assert mine.host_rss_bytes is not None and mine.host_rss_bytes > 10 * MIB
    assert mine.cpu_pct is None  # psutil's first cpu_percent() has nothing to compare with
    assert mine.vram_used_bytes == int(scripted.H100_SXM.vram_total_bytes * 0.9) - 512 * MIB
    sum(range(200_000))  # spend a little CPU between the two reads
    (sample,) = tick(backend, clock, slow=True)
    assert sample.processes is not None
    mine = next(p for p in sample.processes if p.pid == os.getpid())
    assert isinstance(mine.cpu_pct, float)


def test_invisible_process_keeps_its_gpu_facts_with_host_fields_none(clock: ManualClock) -> None:
    backend = opened(scripted.h100_sxm(clock=clock))
    (sample,) = tick(backend, clock, slow=True)
    assert sample.processes is not None
    ghost = next(p for p in sample.processes if p.pid == scripted.INVISIBLE_PID)
    assert ghost.vram_used_bytes == 512 * MIB
    assert (ghost.user, ghost.name, ghost.command, ghost.cpu_pct, ghost.host_rss_bytes) == (None,) * 5


def test_access_denied_fields_are_none(clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: psutil.Process) -> str:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "username", denied)
    backend = opened(scripted.h100_sxm(clock=clock))
    (sample,) = tick(backend, clock, slow=True)
    assert sample.processes is not None
    mine = next(p for p in sample.processes if p.pid == os.getpid())
    assert mine.user is None and mine.name is not None


@pytest.fixture
def long_command_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "x" * 500])
    yield proc
    proc.kill()
    proc.wait()


def test_long_command_lines_are_truncated_and_kinds_kept(
    clock: ManualClock, long_command_process: subprocess.Popen[bytes]
) -> None:
    processes = [
        scripted.FakeProcess(long_command_process.pid, 0, 2 * 1024 * MIB, "compute"),
        scripted.FakeProcess(os.getpid(), 0, None, "graphics"),
    ]
    backend = opened(scripted.h100_sxm(clock=clock, processes=processes))
    (sample,) = tick(backend, clock, slow=True)
    assert sample.processes is not None
    by_pid = {p.pid: p for p in sample.processes}
    long = by_pid[long_command_process.pid]
    assert long.command is not None and len(long.command) == host.COMMAND_MAX_CHARS
    assert long.command.endswith("…") and "time.sleep(60)" in long.command
    graphics = by_pid[os.getpid()]
    assert graphics.kind == "graphics" and graphics.vram_used_bytes is None


def test_a_process_on_several_gpus_appears_on_each(clock: ManualClock) -> None:
    backend = opened(scripted.h100_sxm(4, clock=clock))
    samples = tick(backend, clock, slow=True)
    for sample in samples:
        assert sample.processes is not None
        assert [p.gpu_index for p in sample.processes if p.pid == os.getpid()] == [sample.index]


# --- clean-up, the scripted load, the benchmark helper ------------------------------------------------------


def test_close_frees_gpm_samples_and_shuts_down_once(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(2, clock=clock)
    backend = opened(fake)
    tick(backend, clock)
    assert fake.gpm_samples_live == 4
    backend.close()
    backend.close()
    assert fake.gpm_samples_live == 0
    assert fake.initialized is False
    assert fake.calls["nvmlShutdown"] == 1
    assert backend.read(clock.advance(0.25), slow=True) == ()


def test_decode_load_looks_like_a_busy_h100() -> None:
    cycle_start = ManualClock(start_s=1_800_000_000.0)  # a multiple of the 60 s cycle: starts idle
    backend = opened(scripted.h100_sxm(clock=cycle_start))
    samples = [tick(backend, cycle_start)[0] for _ in range(240)]  # one 60 s cycle at 4 Hz
    decode = [s for s in samples[40:] if s.gpu_util_pct == 100 and s.sm_active_pct and s.sm_active_pct < 50]
    assert len(decode) > 150
    assert all(44.0 <= (s.dram_bw_util_pct or 0) <= 51.0 for s in decode)
    assert all(455.0 <= (s.power_w or 0) <= 505.0 for s in decode)
    assert any(s.clock_event_reasons == ("gpu_idle",) for s in samples)
    assert any(s.throttled for s in samples)  # the power cap and the thermal slowdown show up once a cycle
    assert all(s.power_w is not None and s.power_w <= 700.0 for s in samples)


def test_read_benchmark_helper_measures_cpu_per_tick() -> None:
    per_tick_s = scripted.read_cpu_s_per_tick(2, ticks=20)
    assert 0.0 < per_tick_s < 0.05


def test_a_process_list_longer_than_the_buffer_kept_is_read_whole(clock: ManualClock) -> None:
    procs = [scripted.FakeProcess(4_000_000 + i, 0, 2**30) for i in range(40)]
    fake = scripted.driver_535(clock=clock, processes=procs)
    backend = opened(fake)
    (sample,) = tick(backend, clock, slow=True)
    assert sample.processes is not None and [p.pid for p in sample.processes] == [p.pid for p in procs]
    assert fake.buffer_overflows == 0
    calls = fake.calls["nvmlDeviceGetComputeRunningProcesses_v3"]
    tick(backend, clock, slow=True)
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == calls + 1  # the grown buffer is kept


def test_power_falls_back_when_the_instant_field_is_refused_or_field_values_are_missing(
    clock: ManualClock,
) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load(power_frac=0.5))
    real_field_value = fake._field_value

    def unknown_field(device: Any, field_id: int) -> Any:  # a 470 driver that answers INVALID_ARGUMENT
        value = real_field_value(device, field_id)
        if field_id == nvml.NVML_FI_DEV_POWER_INSTANT:
            value.nvmlReturn = scripted.NVML_ERROR_INVALID_ARGUMENT
        return value

    fake._field_value = unknown_field  # type: ignore[method-assign]
    backend = opened(fake)
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.power_w == pytest.approx(350.0)
    no_fields = ScriptedNvml(
        [scripted.H100_SXM],
        clock=clock,
        load=steady_load(power_frac=0.5),
        absent_functions=["nvmlDeviceGetFieldValues"],
    )
    backend = opened(no_fields)
    (sample,) = tick(backend, clock)
    assert sample.power_w == pytest.approx(350.0)


def test_mig_gpm_survives_a_failed_instance_count_and_shared_gpu_instances_count_once(
    clock: ManualClock,
) -> None:
    fake = scripted.mig_h100(clock=clock, load=steady_load(dram_bw_util_pct=40.0))
    real_handle = fake.nvmlDeviceGetMigDeviceHandleByIndex

    def two_compute_instances_in_gi_1(handle: Any, index: int) -> Any:  # slots 0 and 1 share GPU instance 1
        if index == 1:
            return real_handle(handle, 0)
        if index == 2:
            return real_handle(handle, 1)
        return real_handle(handle, index + 5)  # empty slots

    fake.nvmlDeviceGetMigDeviceHandleByIndex = two_compute_instances_in_gi_1  # type: ignore[method-assign]
    backend = opened(fake)
    card = scripted.H100_SXM.vram_total_bytes
    assert backend.open().gpus[0].vram_total_bytes == int(card * 3 / 7) + int(card * 4 / 7)  # not 3/7 twice
    fake.inject("nvmlDeviceGetMaxMigDeviceCount", scripted.NVML_ERROR_TIMEOUT)
    tick(backend, clock, slow=True)
    for _ in range(3):
        (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct == pytest.approx(40.0)
    assert sample.pcie_rx_bytes_per_s == pytest.approx(2 * 20 * MIB)  # two GPU instances' traffic, not three


def test_gpm_after_the_wall_clock_steps_back_starts_a_fresh_interval(clock: ManualClock) -> None:
    level = {"dram": 30.0}
    fake = scripted.h100_sxm(clock=clock, load=lambda t, i: steady_load(dram_bw_util_pct=level["dram"])(t, i))
    backend = opened(fake)
    for _ in range(3):
        tick(backend, clock)
    clock.advance(-5.0)  # an NTP step
    level["dram"] = 70.0
    tick(backend, clock)
    (sample,) = tick(backend, clock)
    assert sample.dram_bw_util_pct == pytest.approx(70.0)  # not the last value before the step, for 5 s


# --- per-process SM and memory duty cycles ------------------------------------------------------------------


def _procs_by_pid(sample: GpuSample) -> dict[int, Any]:
    assert sample.processes is not None
    return {p.pid: p for p in sample.processes}


def test_process_utilization_flows_from_the_driver_into_each_process(clock: ManualClock) -> None:
    procs = [
        scripted.FakeProcess(scripted.INVISIBLE_PID, 0, 10 * 2**30, sm_util_pct=71.0, mem_util_pct=38.0),
        scripted.FakeProcess(scripted.INVISIBLE_PID + 1, 0, 2**30),  # no sample from the driver
        scripted.FakeProcess(scripted.INVISIBLE_PID + 2, 1, 2**30, sm_util_pct=12.0, mem_util_pct=0.0),
    ]
    fake = scripted.h100_sxm(2, clock=clock, processes=procs)
    backend = opened(fake)
    first = tick(backend, clock, slow=True)
    busy, quiet = _procs_by_pid(first[0])[procs[0].pid], _procs_by_pid(first[0])[procs[1].pid]
    assert (busy.sm_util_pct, busy.mem_util_pct) == (71.0, 38.0)
    assert (quiet.sm_util_pct, quiet.mem_util_pct) == (None, None)  # shown as n/a, never a made-up 0
    other = _procs_by_pid(first[1])[procs[2].pid]
    assert (other.sm_util_pct, other.mem_util_pct) == (12.0, 0.0)
    # Fast ticks repeat the slow reading; the driver is asked once per slow tick and GPU.
    asked = fake.calls["nvmlDeviceGetProcessUtilization"]
    tick(backend, clock)
    assert fake.calls["nvmlDeviceGetProcessUtilization"] == asked
    tick(backend, clock, slow=True)
    assert fake.calls["nvmlDeviceGetProcessUtilization"] == asked + 2


def test_process_utilization_asks_only_for_samples_newer_than_the_last_seen(clock: ManualClock) -> None:
    seen: list[int] = []
    proc = scripted.FakeProcess(scripted.INVISIBLE_PID, 0, 2**30, sm_util_pct=50.0, mem_util_pct=20.0)

    class Recording(ScriptedNvml):
        def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> Any:
            seen.append(timeStamp)
            return super().nvmlDeviceGetProcessUtilization(handle, timeStamp)

    backend = opened(Recording([scripted.H100_SXM], clock=clock, processes=[proc]))
    tick(backend, clock, slow=True)
    tick(backend, clock, slow=True)
    assert seen[0] == int((clock() - 0.25) * 1e6) - 1_000_000  # the first read: the last second
    assert seen[1] == int((clock() - 0.25) * 1e6)  # then: newer than the newest sample seen


def test_no_new_process_sample_keeps_the_processes_with_none(clock: ManualClock) -> None:
    proc = scripted.FakeProcess(scripted.INVISIBLE_PID, 0, 2**30, sm_util_pct=50.0, mem_util_pct=20.0)
    fake = scripted.h100_sxm(clock=clock, processes=[proc])
    backend = opened(fake)
    tick(backend, clock, slow=True)
    # The clock stands still: no sample is newer than the last one seen, so the driver answers NOT_FOUND.
    (sample,) = backend.read(clock(), slow=True)
    (p,) = sample.processes or ()
    assert p.pid == proc.pid and p.vram_used_bytes == 2**30
    assert (p.sm_util_pct, p.mem_util_pct) == (None, None)
    # NOT_FOUND is "nothing new", not "unsupported": the next slow tick has values again.
    (sample,) = tick(backend, clock, slow=True)
    (p,) = sample.processes or ()
    assert (p.sm_util_pct, p.mem_util_pct) == (50.0, 20.0)


def test_process_utilization_not_supported_is_set_aside(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, process_utilization=False)
    backend = opened(fake)
    for _ in range(3):
        (sample,) = tick(backend, clock, slow=True)
        assert sample.processes and all(p.sm_util_pct is None for p in sample.processes)
    assert fake.calls["nvmlDeviceGetProcessUtilization"] == 1  # asked once, then never again


def test_process_utilization_failing_once_is_none_for_that_tick_only(clock: ManualClock) -> None:
    proc = scripted.FakeProcess(scripted.INVISIBLE_PID, 0, 2**30, sm_util_pct=50.0, mem_util_pct=20.0)
    fake = scripted.h100_sxm(clock=clock, processes=[proc])
    backend = opened(fake)
    fake.inject("nvmlDeviceGetProcessUtilization", scripted.NVML_ERROR_TIMEOUT)
    (sample,) = tick(backend, clock, slow=True)
    assert [p.sm_util_pct for p in sample.processes or ()] == [None]
    (sample,) = tick(backend, clock, slow=True)
    assert [p.sm_util_pct for p in sample.processes or ()] == [50.0]


def test_default_processes_follow_the_gpu_load(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, load=steady_load())
    (sample,) = tick(opened(fake), clock, slow=True)
    mine = _procs_by_pid(sample)[os.getpid()]
    assert (mine.sm_util_pct, mine.mem_util_pct) == (100.0, 64.0)  # the GPU's util and mem busy
    assert _procs_by_pid(sample)[scripted.INVISIBLE_PID].sm_util_pct is None


# --- GPM held by another client (DCGM) ----------------------------------------------------------------------


def test_gpm_held_by_dcgm_says_so_and_keeps_the_duty_cycles(clock: ManualClock) -> None:
    fake = scripted.dcgm_beside(clock=clock)
    backend = scripted_backend(fake)
    assert backend.open().gpus[0].gpm_supported  # the GPU can do GPM: it is taken, not missing
    for _ in range(2):
        (sample,) = tick(backend, clock, slow=True)
        assert sample.gpm_unavailable_reason == "DCGM holds the profiling counters"
        assert all(getattr(sample, name) is None for name in GPM_FIELDS)
        assert sample.mem_busy_pct is not None and sample.gpu_util_pct is not None
    # DCGM stops: GPM is asked again once it is set aside no more, and the reason goes away.
    fake.gpm_in_use = fake.dcgm_running = False
    for _ in range(int(nvml.GPM_REPROBE_S / 0.25) + 4):
        (sample,) = tick(backend, clock)
    assert sample.gpm_unavailable_reason is None and sample.dram_bw_util_pct is not None


def test_gpm_in_use_without_dcgm_running_names_no_culprit(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock, gpm_in_use=True)
    backend = scripted_backend(fake)
    backend.open()
    (sample,) = tick(backend, clock)
    assert sample.gpm_unavailable_reason == "another client holds the profiling counters"


def test_gpm_failing_with_another_code_is_explained_only_once_set_aside(clock: ManualClock) -> None:
    fake = scripted.h100_sxm(clock=clock)
    backend = NvmlBackend(fake, source="scripted", dcgm_probe=lambda: True)
    backend.open()
    tick(backend, clock)  # primed
    fake.inject("nvmlGpmSampleGet", *[scripted.NVML_ERROR_TIMEOUT] * nvml.GPM_FAILURES_TO_DROP)
    reasons = [tick(backend, clock)[0].gpm_unavailable_reason for _ in range(nvml.GPM_FAILURES_TO_DROP)]
    assert reasons[:-1] == [None] * (nvml.GPM_FAILURES_TO_DROP - 1)  # a failed tick is n/a, not a state
    assert reasons[-1] == "GPM failing while DCGM runs here (NVML: Timeout)"


def test_dcgm_probe_is_asked_rarely(clock: ManualClock) -> None:
    asked: list[float] = []
    fake = scripted.h100_sxm(clock=clock, gpm_in_use=True)
    backend = NvmlBackend(fake, source="scripted", dcgm_probe=lambda: asked.append(clock()) is None)
    backend.open()
    for _ in range(200):  # 50 s at 4 Hz
        (sample,) = tick(backend, clock)
    assert sample.gpm_unavailable_reason == "DCGM holds the profiling counters"
    assert len(asked) == 2  # every DCGM_PROBE_EVERY_S (30 s), not every tick


def test_dcgm_running_looks_for_its_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    class Proc:
        def __init__(self, name: str | None) -> None:
            self.info = {"name": name}

    monkeypatch.setattr(psutil, "process_iter", lambda attrs: iter([Proc("bash"), Proc(None)]))
    assert nvml.dcgm_running() is False
    monkeypatch.setattr(psutil, "process_iter", lambda attrs: iter([Proc("python"), Proc("nv-hostengine")]))
    assert nvml.dcgm_running() is True
