"""NVIDIA GPUs through NVML (NVIDIA's nvidia-ml-py bindings, ``import pynvml``), with GPM on Hopper and newer.

Every NVML call goes through :meth:`NvmlBackend._call`, which turns "this GPU or driver cannot do that" into
None and remembers it, so an unsupported metric costs one failed call per GPU, not one per tick. A GPU that
falls off the bus gets an error on its own sample; only the whole driver going away raises
:class:`~tuner.telemetry.backend.GpuLostError`.

The module is injectable: tests, demos and benchmarks pass :mod:`tuner.telemetry.scripted`'s fake, so this
exact code runs on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from tuner.telemetry import gpus
from tuner.telemetry.backend import GpuLostError
from tuner.telemetry.host import HostProcesses
from tuner.telemetry.model import GpuInfo, GpuProcess, GpuSample, GpuState, SystemInfo

# NVML return codes and constants from nvml.h. They are ABI, identical in every pynvml release and in the
# scripted fake; tests check them against the installed pynvml.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_DEVICE_MIG_ENABLE = 1
NVML_PSTATE_UNKNOWN = 32
NVML_FI_DEV_MEMORY_TEMP = 82
NVML_FI_DEV_NVLINK_LINK_COUNT = 91
NVML_GPM_METRICS_GET_VERSION = 1

GPM_SM_UTIL = 2
GPM_SM_OCCUPANCY = 3
GPM_ANY_TENSOR_UTIL = 5
GPM_DRAM_BW_UTIL = 10
GPM_PCIE_TX_PER_SEC = 20
GPM_PCIE_RX_PER_SEC = 21
GPM_NVLINK_TOTAL_RX_PER_SEC = 60
GPM_NVLINK_TOTAL_TX_PER_SEC = 61
GPM_METRIC_IDS = (
    GPM_DRAM_BW_UTIL,
    GPM_SM_UTIL,
    GPM_SM_OCCUPANCY,
    GPM_ANY_TENSOR_UTIL,
    GPM_PCIE_TX_PER_SEC,
    GPM_PCIE_RX_PER_SEC,
    GPM_NVLINK_TOTAL_RX_PER_SEC,
    GPM_NVLINK_TOTAL_TX_PER_SEC,
)
GPM_CORE_METRIC_IDS = (GPM_DRAM_BW_UTIL, GPM_SM_UTIL, GPM_SM_OCCUPANCY, GPM_ANY_TENSOR_UTIL)
# nvml.h documents the PCIe and NVLink GPM rates in MiB/sec.
BYTES_PER_MIB = 1024 * 1024

# Clock-event reason bits (nvmlClocksEventReason*; the older nvmlClocksThrottleReason* use the same bits).
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

# The GPU or driver cannot do this, and will not be able to next tick either: stop asking.
_UNSUPPORTED = frozenset(
    {NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NOT_FOUND, NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_NO_PERMISSION}
)
# The GPU fell off the bus; it stays gone until it is reset, so it is not asked again.
_GPU_GONE = frozenset({NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED})
# NVML as a whole stopped working (driver unloaded, library shut down under us).
_LIBRARY_GONE = frozenset({NVML_ERROR_UNINITIALIZED, NVML_ERROR_DRIVER_NOT_LOADED})

# nvmlValue_t union member for each nvmlValueType_t.
_FIELD_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
_NOT_AVAILABLE_U64 = 2**64 - 1

_PROCESS_FUNCTIONS = (
    ("compute", ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2")),
    ("graphics", ("nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2")),
)


def decode_clock_event_reasons(bits: int) -> tuple[str, ...]:
    """Names of the clock-event reason bits set in ``bits``; () when the clocks run free."""
    return tuple(name for bit, name in CLOCK_EVENT_REASONS if bits & bit)


def mw_to_w(milliwatts: int | None) -> float | None:
    """NVML power (mW) to watts."""
    return None if milliwatts is None else milliwatts / 1000.0


def gpm_dram_gbps(dram_bw_util_pct: float | None, peak_dram_bw_gbps: float | None) -> float | None:
    """GPM's DRAM_BW_UTIL (% of peak) to GB/s."""
    if dram_bw_util_pct is None or peak_dram_bw_gbps is None:
        return None
    return dram_bw_util_pct / 100.0 * peak_dram_bw_gbps


def mib_per_s_to_bytes(mib_per_s: float | None) -> float | None:
    """GPM's PCIe/NVLink rates (MiB/s) to bytes/s."""
    return None if mib_per_s is None else mib_per_s * BYTES_PER_MIB


class _DeviceLost(Exception):
    """One GPU stopped answering; carries the line shown on its card."""

    def __init__(self, message: str, sticky: bool) -> None:
        super().__init__(message)
        self.sticky = sticky


class _NeverRaised(Exception):
    """Stands in for exception classes an older pynvml does not define."""


@dataclass(slots=True)
class _Gpu:
    """What the backend keeps per GPU between ticks."""

    index: int
    handle: Any
    info: GpuInfo
    unsupported: set[str] = field(default_factory=set)
    lost: str | None = None  # set once the GPU fell off the bus; its samples then carry only this
    gpm_samples: list[Any] = field(default_factory=list)  # two, swapped every tick
    gpm_current: int = 0
    gpm_primed: bool = False  # a previous GPM sample exists, so metrics can be computed
    gpm_request: Any = None  # one c_nvmlGpmMetricsGet_t, reused every tick
    gpm_metric_ids: list[int] = field(default_factory=list)
    # Slow readings, repeated on fast ticks.
    energy_prev_j: float | None = None
    energy_prev_s: float | None = None
    energy_counter_j: float | None = None
    energy_interval_j: float | None = None
    energy_interval_s: float | None = None
    raw_processes: list[tuple[int, int | None, str]] | None = None  # pid, VRAM bytes, kind
    processes: tuple[GpuProcess, ...] | None = None


class NvmlBackend:
    """Reads NVIDIA GPUs through NVML. Implements :class:`~tuner.telemetry.backend.GpuBackend`.

    ``nvml`` is the pynvml module to use; by default the real one is imported on :meth:`open`. ``source`` and
    ``label`` end up in :class:`SystemInfo` (the scripted fake passes "scripted").
    """

    def __init__(
        self,
        nvml: Any = None,
        *,
        source: str = "nvml",
        label: str | None = None,
        energy_interval_s: float = 5.0,
    ) -> None:
        self._nvml = nvml
        # The energy counter costs ~4 ms of CPU per read (the driver spins, REFERENCE.md): on 8 GPUs once a
        # second that alone is 3 % of a core. Every 5 s keeps it at 0.6 % and still gives joules per phase.
        self._energy_interval_s = energy_interval_s
        self._source = source
        self._label = label
        self._gpus: list[_Gpu] = []
        self._system_unsupported: set[str] = set()
        self._initialized = False
        self._info: SystemInfo | None = None
        self._slow_done = False
        self._nvml_error: type[BaseException] = _NeverRaised
        self._mismatch_error: type[BaseException] = _NeverRaised
        self._host_processes = HostProcesses()

    # --- the protocol --------------------------------------------------------------------------------------

    def open(self) -> SystemInfo:
        """Initialise NVML and read what does not change. Never raises: a failure is a :class:`GpuState`."""
        if self._info is not None:
            return self._info
        info = self._open()
        if info.state is GpuState.OK:
            self._info = info
        else:
            self.close()  # not cached: a later open() tries again (the driver may have been loaded since)
        return info

    def read(self, now_s: float, *, slow: bool) -> tuple[GpuSample, ...]:
        """One sample per GPU found by :meth:`open`; () when there are none.

        ``slow`` also reads the energy counter and the process list (costly); other ticks repeat the last
        slow values. The first read is always slow so that every sample is complete.
        """
        if not self._gpus:
            return ()
        slow = slow or not self._slow_done
        readings: list[dict[str, Any] | str] = []  # per GPU: fast values, or the error on its card
        for gpu in self._gpus:
            if gpu.lost is not None:
                readings.append(gpu.lost)
                continue
            try:
                fast = self._read_fast(gpu)
                if slow:
                    self._read_slow(gpu, now_s)
                readings.append(fast)
            except _DeviceLost as exc:
                if exc.sticky:
                    gpu.lost = str(exc)
                gpu.gpm_primed = False
                gpu.raw_processes = None
                readings.append(str(exc))
        if slow:
            self._enrich_processes()
            self._slow_done = True
        samples = []
        for gpu, values in zip(self._gpus, readings, strict=True):
            if isinstance(values, str):
                samples.append(GpuSample(index=gpu.index, time_s=now_s, error=values))
                continue
            samples.append(
                GpuSample(
                    index=gpu.index,
                    time_s=now_s,
                    energy_counter_j=gpu.energy_counter_j,
                    energy_interval_j=gpu.energy_interval_j,
                    energy_interval_s=gpu.energy_interval_s,
                    processes=gpu.processes,
                    **values,
                )
            )
        return tuple(samples)

    def close(self) -> None:
        """Free GPM samples and shut NVML down. Safe to call twice, and after the driver went away."""
        for gpu in self._gpus:
            for sample in gpu.gpm_samples:
                self._quietly("nvmlGpmSampleFree", sample)
            gpu.gpm_samples = []
        self._gpus = []
        if self._initialized:
            self._initialized = False
            self._quietly("nvmlShutdown")
        self._info = None
        self._slow_done = False
        self._host_processes.clear()

    # --- start-up ------------------------------------------------------------------------------------------

    def _open(self) -> SystemInfo:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                return self._state(
                    GpuState.NO_DRIVER,
                    "NVIDIA's Python bindings are missing: pip install nvidia-ml-py",
                )
        nvml = self._nvml
        self._nvml_error = getattr(nvml, "NVMLError", _NeverRaised)
        # pynvml raises this (not an NVMLError) when an unversioned call meets an older driver.
        self._mismatch_error = getattr(nvml, "NVMLLibraryMismatchError", _NeverRaised)
        try:
            nvml.nvmlInit()
        except OSError:
            return self._state(GpuState.NO_DRIVER, "No NVIDIA driver found (libnvidia-ml.so not loadable)")
        except self._nvml_error as exc:
            return self._startup_failure(exc)
        self._initialized = True
        try:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                return self._state(GpuState.NO_GPU, "The NVIDIA driver is loaded but sees no GPU")
            driver = _text(self._call(None, "driver_version", "nvmlSystemGetDriverVersion"))
            cuda = self._call(None, "cuda_version", "nvmlSystemGetCudaDriverVersion")
            nvml_version = _text(self._call(None, "nvml_version", "nvmlSystemGetNVMLVersion"))
            first_error: BaseException | None = None
            for index in range(count):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                except self._nvml_error as exc:
                    first_error = first_error or exc
                    gpu = _Gpu(index, None, _placeholder_info(index), lost=f"GPU {index} unreadable: {exc}")
                else:
                    gpu = self._open_gpu(index, handle)
                self._gpus.append(gpu)
            if first_error is not None and all(gpu.handle is None for gpu in self._gpus):
                return self._startup_failure(first_error)
        except self._nvml_error as exc:
            return self._startup_failure(exc)
        except GpuLostError as exc:
            return self._state(GpuState.ERROR, str(exc))
        return SystemInfo(
            state=GpuState.OK,
            driver_version=driver,
            cuda_driver_version=_cuda_version_text(cuda),
            nvml_version=nvml_version,
            gpus=tuple(gpu.info for gpu in self._gpus),
            source=self._source,
            label=self._label,
        )

    def _state(self, state: GpuState, message: str) -> SystemInfo:
        return SystemInfo(state=state, message=message, source=self._source, label=self._label)

    def _startup_failure(self, exc: BaseException) -> SystemInfo:
        code = getattr(exc, "value", None)
        if code == NVML_ERROR_LIBRARY_NOT_FOUND:
            return self._state(GpuState.NO_DRIVER, "No NVIDIA driver found (libnvidia-ml.so not loadable)")
        if code == NVML_ERROR_DRIVER_NOT_LOADED:
            return self._state(
                GpuState.NO_DRIVER, "The NVIDIA kernel driver is not loaded (NVML: Driver Not Loaded)"
            )
        if code == NVML_ERROR_NO_PERMISSION:
            return self._state(
                GpuState.PERMISSION_DENIED,
                f"No permission to read the GPUs (NVML: {exc}); check access to /dev/nvidia*",
            )
        if code == NVML_ERROR_LIB_RM_VERSION_MISMATCH:
            return self._state(
                GpuState.DRIVER_MISMATCH,
                f"NVIDIA driver and library versions differ (NVML: {exc}); reboot or reload the driver",
            )
        return self._state(GpuState.ERROR, f"NVML failed to start: {exc}")

    def _open_gpu(self, index: int, handle: Any) -> _Gpu:
        gpu = _Gpu(index, handle, _placeholder_info(index))
        if getattr(self._nvml, "nvmlMemory_v2", None) is None:  # bindings too old for the v2 memory struct
            gpu.unsupported.add("memory_v2")
        try:
            gpu.info = self._read_info(gpu)
            if gpu.info.gpm_supported and not self._start_gpm(gpu):
                gpu.info = _replace_gpm(gpu.info, False)
        except _DeviceLost as exc:
            gpu.lost = str(exc)
        return gpu

    def _read_info(self, gpu: _Gpu) -> GpuInfo:
        h = gpu.handle
        name = _text(self._call(gpu, "name", "nvmlDeviceGetName", h)) or "NVIDIA GPU"
        memory = self._read_memory(gpu)
        cc = self._call(gpu, "compute_capability", "nvmlDeviceGetCudaComputeCapability", h)
        cc = (int(cc[0]), int(cc[1])) if cc is not None else None
        mem_clock_max = self._call(gpu, "mem_clock_max", "nvmlDeviceGetMaxClockInfo", h, NVML_CLOCK_MEM)
        bus_width = self._call(gpu, "bus_width", "nvmlDeviceGetMemoryBusWidth", h)
        peak_gbps, peak_source = gpus.peak_dram_bw(name, bus_width, mem_clock_max)
        known = gpus.lookup(name)
        mig = self._call(gpu, "mig_mode", "nvmlDeviceGetMigMode", h)
        mig_enabled = None if mig is None else mig[0] == NVML_DEVICE_MIG_ENABLE
        support = self._call(gpu, "gpm_support", "nvmlGpmQueryDeviceSupport", h)
        # In MIG mode GPM samples are per GPU instance (nvmlGpmMigSampleGet); a card-level sample would need
        # every instance enumerated and combined, so GPM is reported as unsupported there for now.
        gpm = bool(support is not None and support.isSupportedDevice) and not mig_enabled
        nvlinks = self._field_value(gpu, "nvlink_count", NVML_FI_DEV_NVLINK_LINK_COUNT)
        return GpuInfo(
            index=gpu.index,
            name=name,
            uuid=_text(self._call(gpu, "uuid", "nvmlDeviceGetUUID", h)) or "",
            vram_total_bytes=None if memory is None else int(memory.total),
            peak_dram_bw_gbps=peak_gbps,
            peak_dram_bw_source=peak_source,
            gpm_supported=gpm,
            compute_capability=cc,
            fp8_supported=gpus.fp8_supported(cc) if cc else (known.fp8 if known else None),
            power_limit_default_w=mw_to_w(
                self._call(gpu, "power_default", "nvmlDeviceGetPowerManagementDefaultLimit", h)
            ),
            sm_clock_max_mhz=self._call(gpu, "sm_clock_max", "nvmlDeviceGetMaxClockInfo", h, NVML_CLOCK_SM),
            mem_clock_max_mhz=mem_clock_max,
            pcie_gen_max=self._call(gpu, "pcie_gen", "nvmlDeviceGetMaxPcieLinkGeneration", h),
            pcie_width_max=self._call(gpu, "pcie_width", "nvmlDeviceGetMaxPcieLinkWidth", h),
            nvlink_links=None if nvlinks is None else int(nvlinks),
            mig_enabled=mig_enabled,
        )

    def _start_gpm(self, gpu: _Gpu) -> bool:
        """Allocate the two GPM samples and the reusable metrics request; False where that fails."""
        for _ in range(2):
            sample = self._call(gpu, "gpm_alloc", "nvmlGpmSampleAlloc")
            if sample is None:
                for allocated in gpu.gpm_samples:
                    self._quietly("nvmlGpmSampleFree", allocated)
                gpu.gpm_samples = []
                return False
            gpu.gpm_samples.append(sample)
        request_type = getattr(self._nvml, "c_nvmlGpmMetricsGet_t", None)
        if request_type is None:
            return False
        gpu.gpm_request = request_type()
        gpu.gpm_request.version = NVML_GPM_METRICS_GET_VERSION
        self._set_gpm_metrics(gpu, list(GPM_METRIC_IDS))
        return True

    @staticmethod
    def _set_gpm_metrics(gpu: _Gpu, metric_ids: list[int]) -> None:
        gpu.gpm_metric_ids = metric_ids
        gpu.gpm_request.numMetrics = len(metric_ids)
        for i, metric_id in enumerate(metric_ids):
            gpu.gpm_request.metrics[i].metricId = metric_id

    # --- every tick ----------------------------------------------------------------------------------------

    def _read_fast(self, gpu: _Gpu) -> dict[str, Any]:
        h = gpu.handle
        call = self._call
        memory = self._read_memory(gpu)
        util = call(gpu, "utilization", "nvmlDeviceGetUtilizationRates", h)
        reasons = call(gpu, "clock_events", "nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is None and "clock_events" in gpu.unsupported:  # drivers before 535 use the old name
            reasons = call(gpu, "throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons", h)
        mem_temp = self._field_value(gpu, "mem_temp", NVML_FI_DEV_MEMORY_TEMP)
        values: dict[str, Any] = {
            "vram_used_bytes": None if memory is None else int(memory.used),
            "vram_total_bytes": None if memory is None else int(memory.total),
            "gpu_util_pct": None if util is None else float(util.gpu),
            "mem_busy_pct": None if util is None else float(util.memory),
            "power_w": mw_to_w(call(gpu, "power", "nvmlDeviceGetPowerUsage", h)),
            "power_limit_w": mw_to_w(call(gpu, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", h)),
            "gpu_temp_c": _float(self._read_gpu_temp(gpu)),
            "mem_temp_c": _float(mem_temp),
            "fan_pct": _float(call(gpu, "fan", "nvmlDeviceGetFanSpeed", h)),
            "sm_clock_mhz": call(gpu, "sm_clock", "nvmlDeviceGetClockInfo", h, NVML_CLOCK_SM),
            "mem_clock_mhz": call(gpu, "mem_clock", "nvmlDeviceGetClockInfo", h, NVML_CLOCK_MEM),
            "pstate": _pstate(call(gpu, "pstate", "nvmlDeviceGetPerformanceState", h)),
            "clock_event_reasons": None if reasons is None else decode_clock_event_reasons(reasons),
        }
        if gpu.gpm_request is not None:
            gpm = self._read_gpm(gpu)
            if gpm is not None:
                dram_pct = gpm.get(GPM_DRAM_BW_UTIL)
                values["dram_bw_util_pct"] = dram_pct
                values["dram_bw_gbps"] = gpm_dram_gbps(dram_pct, gpu.info.peak_dram_bw_gbps)
                values["sm_active_pct"] = gpm.get(GPM_SM_UTIL)
                values["sm_occupancy_pct"] = gpm.get(GPM_SM_OCCUPANCY)
                values["tensor_active_pct"] = gpm.get(GPM_ANY_TENSOR_UTIL)
                values["pcie_tx_bytes_per_s"] = mib_per_s_to_bytes(gpm.get(GPM_PCIE_TX_PER_SEC))
                values["pcie_rx_bytes_per_s"] = mib_per_s_to_bytes(gpm.get(GPM_PCIE_RX_PER_SEC))
                values["nvlink_tx_bytes_per_s"] = mib_per_s_to_bytes(gpm.get(GPM_NVLINK_TOTAL_TX_PER_SEC))
                values["nvlink_rx_bytes_per_s"] = mib_per_s_to_bytes(gpm.get(GPM_NVLINK_TOTAL_RX_PER_SEC))
        return values

    def _read_memory(self, gpu: _Gpu) -> Any:
        # v2 counts driver-reserved memory apart from "used", as nvidia-smi does; v1 lumps it into "used".
        if "memory_v2" not in gpu.unsupported:
            memory = self._call(
                gpu, "memory_v2", "nvmlDeviceGetMemoryInfo", gpu.handle, self._nvml.nvmlMemory_v2
            )
            if memory is not None or "memory_v2" not in gpu.unsupported:
                return memory
        return self._call(gpu, "memory", "nvmlDeviceGetMemoryInfo", gpu.handle)

    def _read_gpu_temp(self, gpu: _Gpu) -> Any:
        temp = self._call(gpu, "gpu_temp", "nvmlDeviceGetTemperature", gpu.handle, NVML_TEMPERATURE_GPU)
        if temp is None and "gpu_temp" in gpu.unsupported:  # deprecated name, dropped from newer bindings
            temp = self._call(
                gpu, "gpu_temp_v", "nvmlDeviceGetTemperatureV", gpu.handle, NVML_TEMPERATURE_GPU
            )
        return temp

    def _read_gpm(self, gpu: _Gpu) -> dict[int, float] | None:
        """Take this tick's GPM sample; metrics between it and the previous one (None on the first tick)."""
        sample = gpu.gpm_samples[gpu.gpm_current]
        if self._call(gpu, "gpm_sample", "nvmlGpmSampleGet", gpu.handle, sample) is None:
            gpu.gpm_primed = False
            return None
        previous = gpu.gpm_samples[1 - gpu.gpm_current]
        gpu.gpm_current = 1 - gpu.gpm_current
        if not gpu.gpm_primed:
            gpu.gpm_primed = True
            return None
        request = gpu.gpm_request
        request.sample1 = previous
        request.sample2 = sample
        if self._call(gpu, "gpm_metrics", "nvmlGpmMetricsGet", request) is None:
            if "gpm_metrics" in gpu.unsupported and len(gpu.gpm_metric_ids) > len(GPM_CORE_METRIC_IDS):
                # Whether one unsupported metric fails the whole call is not documented: before giving up
                # on GPM, retry with only the percentages every GPM-capable GPU has.
                gpu.unsupported.discard("gpm_metrics")
                self._set_gpm_metrics(gpu, list(GPM_CORE_METRIC_IDS))
            return None
        values: dict[int, float] = {}
        dropped = []
        for i in range(len(gpu.gpm_metric_ids)):
            metric = request.metrics[i]
            if metric.nvmlReturn == NVML_SUCCESS:
                values[metric.metricId] = float(metric.value)
            elif metric.nvmlReturn in _UNSUPPORTED:
                dropped.append(metric.metricId)
        if dropped:  # e.g. NVLink metrics on a GPU without NVLink: stop asking for them
            self._set_gpm_metrics(gpu, [m for m in gpu.gpm_metric_ids if m not in dropped])
        return values

    def _field_value(self, gpu: _Gpu, key: str, field_id: int) -> Any:
        values = self._call(gpu, key, "nvmlDeviceGetFieldValues", gpu.handle, [field_id])
        if values is None:
            return None
        value = values[0]
        if value.nvmlReturn != NVML_SUCCESS:
            if value.nvmlReturn in _UNSUPPORTED:
                gpu.unsupported.add(key)
            return None
        return getattr(value.value, _FIELD_VALUE_MEMBER.get(value.valueType, "ullVal"))

    # --- slow ticks ----------------------------------------------------------------------------------------

    def _read_slow(self, gpu: _Gpu, now_s: float) -> None:
        gpu.raw_processes = self._read_processes(gpu)
        if gpu.energy_prev_s is not None and now_s - gpu.energy_prev_s < self._energy_interval_s:
            return  # keep the last energy reading: see energy_interval_s
        energy_mj = self._call(gpu, "energy", "nvmlDeviceGetTotalEnergyConsumption", gpu.handle)
        if energy_mj is None:
            gpu.energy_counter_j = gpu.energy_interval_j = gpu.energy_interval_s = None
        else:
            energy_j = energy_mj / 1000.0
            prev_j, prev_s = gpu.energy_prev_j, gpu.energy_prev_s
            # A counter that went backwards (driver reloaded) or a clock that stood still: no interval.
            if prev_j is not None and prev_s is not None and energy_j >= prev_j and now_s > prev_s:
                gpu.energy_interval_j = energy_j - prev_j
                gpu.energy_interval_s = now_s - prev_s
            else:
                gpu.energy_interval_j = gpu.energy_interval_s = None
            gpu.energy_counter_j = energy_j
            gpu.energy_prev_j, gpu.energy_prev_s = energy_j, now_s

    def _read_processes(self, gpu: _Gpu) -> list[tuple[int, int | None, str]] | None:
        found: list[tuple[int, int | None, str]] | None = None
        for kind, names in _PROCESS_FUNCTIONS:
            for name in names:  # newest struct first; older drivers lack the _v3 symbols
                procs = self._call(gpu, name, name, gpu.handle)
                if procs is not None or name not in gpu.unsupported:
                    break
            if procs is None:
                continue
            found = found or []
            for proc in procs:
                used = proc.usedGpuMemory
                found.append((int(proc.pid), None if used in (None, _NOT_AVAILABLE_U64) else int(used), kind))
        return found

    def _enrich_processes(self) -> None:
        """Add host facts (user, command, CPU, RSS) to every GPU's process list, reading each pid once."""
        pids = {pid for gpu in self._gpus for pid, _, _ in gpu.raw_processes or ()}
        host = self._host_processes.read(pids)
        for gpu in self._gpus:
            if gpu.raw_processes is None:
                gpu.processes = None
                continue
            gpu.processes = tuple(
                GpuProcess(pid=pid, gpu_index=gpu.index, vram_used_bytes=used, kind=kind, **host[pid])
                for pid, used, kind in gpu.raw_processes
            )

    # --- the one wrapper around NVML -----------------------------------------------------------------------

    def _call(self, gpu: _Gpu | None, key: str, function: str, *args: Any) -> Any:
        """Call an NVML function; None when it is unsupported (remembered under ``key``) or failed this tick.

        Raises :class:`_DeviceLost` when this GPU stopped answering and :class:`GpuLostError` when NVML as a
        whole did.
        """
        unsupported = self._system_unsupported if gpu is None else gpu.unsupported
        if key in unsupported:
            return None
        fn = getattr(self._nvml, function, None)
        if fn is None:  # bindings older than this function
            unsupported.add(key)
            return None
        try:
            return fn(*args)
        except self._mismatch_error:
            unsupported.add(key)
            return None
        except self._nvml_error as exc:
            code = getattr(exc, "value", None)
            if code in _UNSUPPORTED:
                unsupported.add(key)
                return None
            if code in _LIBRARY_GONE:
                raise GpuLostError(f"The NVIDIA driver stopped answering (NVML: {exc})") from None
            if gpu is not None and (code in _GPU_GONE or code == NVML_ERROR_UNKNOWN):
                raise _DeviceLost(f"GPU lost: {exc}", sticky=code in _GPU_GONE) from None
            return None  # timeouts and the like: no value this tick, ask again next tick

    def _quietly(self, function: str, *args: Any) -> None:
        """Best-effort clean-up call: the driver may already be gone."""
        fn = getattr(self._nvml, function, None)
        if fn is None:
            return
        with contextlib.suppress(self._nvml_error):
            fn(*args)


def _placeholder_info(index: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        name="NVIDIA GPU (unreadable)",
        uuid="",
        vram_total_bytes=None,
        peak_dram_bw_gbps=None,
        peak_dram_bw_source=None,
        gpm_supported=False,
    )


def _replace_gpm(info: GpuInfo, supported: bool) -> GpuInfo:
    return dataclasses.replace(info, gpm_supported=supported)


def _pstate(value: int | None) -> int | None:
    return None if value is None or value == NVML_PSTATE_UNKNOWN else value


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _cuda_version_text(version: int | None) -> str | None:
    """NVML's CUDA driver version integer (12080) as people write it ("12.8")."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"
