"""NVIDIA GPUs through NVML (NVIDIA's nvidia-ml-py bindings, ``import pynvml``), with GPM on Hopper and newer.

Every NVML call goes through :meth:`NvmlBackend._call`, which turns "this GPU or driver cannot do that" into
None and remembers it, so an unsupported metric costs one failed call per GPU, not one per tick. Any other
failure (a timeout, NVML's catch-all "Unknown Error") is "no value this tick" for that one call. A GPU that
falls off the bus (GPU_IS_LOST, RESET_REQUIRED) gets an error on its own sample; only the whole driver going
away raises :class:`~tuner.telemetry.backend.GpuLostError`.

Per tick and GPU the fast set is memory, utilisation, clock-event reasons, instantaneous power, temperature,
SM clock, P-state and two GPM calls; limits, memory clock, memory temperature, energy and processes (with
each one's SM and memory duty cycles, ``nvmlDeviceGetProcessUtilization``) change slowly and are read on slow
ticks. GPM samples are taken at least 0.2 s apart (NVML's GPM notes ask for more than ~100 ms), re-primed after
a pause, and a metric or GPM itself is dropped only after several failures in a row and asked for again a
minute later; a GPU whose GPM stays silent says why on its sample (another client such as DCGM holding the
counters, where the evidence says so). On MIG-enabled GPUs memory and processes come from the MIG device
handles where the parent's need privileges, and GPM from ``nvmlGpmMigSampleGet`` per GPU instance.

The module is injectable: tests, demos and benchmarks pass :mod:`tuner.telemetry.scripted`'s fake, so this
exact code runs on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from tuner.telemetry import gpus
from tuner.telemetry.backend import GpuLostError
from tuner.telemetry.host import HostProcesses
from tuner.telemetry.model import GpuInfo, GpuProcess, GpuSample, GpuState, SystemInfo

# NVML return codes and constants from nvml.h. They are ABI, identical in every pynvml release and in the
# scripted fake; tests check them against the installed pynvml.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_DEVICE_MIG_ENABLE = 1
NVML_PSTATE_UNKNOWN = 32
NVML_FI_DEV_MEMORY_TEMP = 82
NVML_FI_DEV_NVLINK_LINK_COUNT = 91
# "Current GPU power" (nvml.h gives no unit; mW like its neighbours 187-190 and in practice). Power usage and
# field 185 are one-second averages on Ampere and newer (except GA100).
NVML_FI_DEV_POWER_INSTANT = 186
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
GPM_RATE_METRIC_IDS = frozenset(GPM_METRIC_IDS) - frozenset(
    GPM_CORE_METRIC_IDS
)  # MiB/s: add up over instances
GPM_MIN_INTERVAL_S = 0.2  # NVML's GPM notes: intervals below ~100 ms are not meaningful; a margin kept
GPM_PAUSE_FACTOR = 3.0  # a gap this many times the last interval (and over 1 s) is a pause: re-prime
GPM_FAILURES_TO_DROP = 3  # failures in a row before a metric (or GPM) is set aside ...
GPM_REPROBE_S = 60.0  # ... and asked for again after this long
# nvml.h documents the PCIe and NVLink GPM rates in MiB/sec.
BYTES_PER_MIB = 1024 * 1024
# Processes whose presence means DCGM runs here (standalone host engine, or dcgm-exporter's embedded one).
DCGM_PROCESS_NAMES = frozenset({"nv-hostengine", "dcgm-exporter"})
DCGM_PROBE_EVERY_S = (
    30.0  # listing processes costs milliseconds: asked only while GPM fails, at most this often
)
# The first per-process utilization read asks for the driver's samples of the last second (as nvitop does);
# later reads for those newer than the newest seen.
PROCESS_UTIL_FIRST_WINDOW_S = 1.0

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
    (0x200, "board_limit"),  # pynvml: nvmlClocksThrottleReasonBoardLimit
    (0x400, "reliability"),  # pynvml: nvmlClocksThrottleReasonReliability
)
_KNOWN_CLOCK_EVENT_BITS = sum(bit for bit, _ in CLOCK_EVENT_REASONS)

# The GPU or driver cannot do this, and will not be able to next tick either: stop asking (a DEPRECATED
# function sends the caller to its successor).
_UNSUPPORTED = frozenset(
    {
        NVML_ERROR_NOT_SUPPORTED,
        NVML_ERROR_NOT_FOUND,
        NVML_ERROR_FUNCTION_NOT_FOUND,
        NVML_ERROR_NO_PERMISSION,
        NVML_ERROR_DEPRECATED,
        NVML_ERROR_INVALID_ARGUMENT,  # e.g. a field id the driver does not know
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH,  # a struct version the driver does not take
    }
)
# The GPU fell off the bus; it stays gone until it is reset, so it is not asked again.
_GPU_GONE = frozenset({NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED})
# NVML as a whole stopped working (driver unloaded, library shut down under us).
_LIBRARY_GONE = frozenset({NVML_ERROR_UNINITIALIZED, NVML_ERROR_DRIVER_NOT_LOADED})

# nvmlValue_t union member for each nvmlValueType_t.
_FIELD_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
_NOT_AVAILABLE_U64 = 2**64 - 1

_PROCESS_KINDS = (
    ("compute", "nvmlDeviceGetComputeRunningProcesses"),
    ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
)


class _ProcessInfo16(ctypes.Structure):
    """nvmlProcessInfo_v1_t: drivers without the _v2 functions."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class _ProcessInfo24(ctypes.Structure):
    """nvmlProcessInfo_v2_t, which pynvml also uses for the _v3 functions."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _ProcessInfo32(ctypes.Structure):
    """The _v3 entry some 535 drivers fill: v2 plus the confidential-computing protected memory."""

    _fields_ = [*_ProcessInfo24._fields_, ("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]


@functools.lru_cache(maxsize=1024)  # a GPU shows few distinct bit sets; this runs per GPU per tick
def decode_clock_event_reasons(bits: int) -> tuple[str, ...]:
    """Names of the clock-event reason bits set in ``bits``; () when the clocks run free. A bit this table does
    not know (a newer driver's) is named ``other(0x...)`` rather than dropped: it counts as throttling."""
    names = [name for bit, name in CLOCK_EVENT_REASONS if bits & bit]
    unknown = bits & ~_KNOWN_CLOCK_EVENT_BITS
    bit = 1
    while unknown:
        if unknown & bit:
            names.append(f"other({bit:#x})")
            unknown &= ~bit
        bit <<= 1
    return tuple(names)


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
class _GpmStream:
    """GPM samples of one GPU, or of one GPU instance of a MIG-enabled GPU, and what they gave last."""

    gpu_instance_id: int | None  # None: the whole GPU (nvmlGpmSampleGet); else nvmlGpmMigSampleGet
    weight: float  # its share of the card when instances are combined (MIG: of the memory)
    samples: list[Any]  # two, swapped every sample
    request: Any  # one c_nvmlGpmMetricsGet_t, cleared before every use
    metric_ids: list[int] = field(default_factory=lambda: list(GPM_METRIC_IDS))
    requested: list[int] = field(default_factory=list)  # the ids the request holds now ...
    entries: list[Any] = field(default_factory=list)  # ... and its entries for them
    current: int = 0
    primed: bool = False  # a previous sample exists, so metrics can be computed
    last_s: float | None = None  # when the previous sample was taken
    pause_after_s: float = float("inf")  # a gap longer than this since it is a pause (from the last interval)
    values: dict[int, float] | None = None  # the last interval's metrics, repeated until the next sample
    failures: dict[str, int] = field(default_factory=dict)  # per GPM call ("sample", "metrics"), in a row
    metric_failures: dict[int, int] = field(default_factory=dict)  # per metric, in a row
    paused_until_s: float | None = None  # GPM set aside after failures: asked again then
    reprobe_at_s: float | None = None  # metrics set aside are asked for again then
    last_error: tuple[int | None, str] | None = None  # NVML code and text of the last failed GPM call


@dataclass(slots=True)
class _Gpu:
    """What the backend keeps per GPU between ticks."""

    index: int
    handle: Any
    info: GpuInfo
    unsupported: set[str] = field(default_factory=set)
    lost: str | None = None  # set once the GPU fell off the bus; its samples then carry only this
    unknown: str | None = None  # the last "Unknown Error" of this tick's calls
    # MIG devices (one per compute instance): handle, GPU instance id, memory total bytes.
    mig_devices: list[tuple[Any, int, int | None]] = field(default_factory=list)
    gpm_capable: bool = False  # the GPU and bindings can do GPM (whether or not streams run now)
    gpm: list[_GpmStream] = field(default_factory=list)
    # Slow readings, repeated on fast ticks.
    slow_values: dict[str, Any] = field(default_factory=dict)
    energy_prev_j: float | None = None
    energy_prev_s: float | None = None
    energy_counter_j: float | None = None
    energy_interval_j: float | None = None
    energy_interval_s: float | None = None
    raw_processes: list[tuple[int, int | None, str]] | None = None  # pid, VRAM bytes, kind
    processes: tuple[GpuProcess, ...] | None = None
    # Per-process SM and memory duty cycles (pid -> %), and the newest driver sample seen (µs since the epoch).
    process_util: dict[int, tuple[float, float]] | None = None
    process_util_seen_us: int | None = None
    gpm_unavailable_reason: str | None = None  # why GPM gives nothing now (see _gpm_unavailable_reason)


@dataclass(frozen=True, slots=True)
class _Memory:
    """Memory of a MIG-enabled GPU's instances, added up (shaped like NVML's memory struct)."""

    total: int
    used: int


class NvmlBackend:
    """Reads NVIDIA GPUs through NVML. Implements :class:`~tuner.telemetry.backend.GpuBackend`.

    ``nvml`` is the pynvml module to use; by default the real one is imported on :meth:`open`. ``source`` and
    ``label`` end up in :class:`SystemInfo` (the scripted fake passes "scripted").

    Not thread-safe: one thread opens, reads and closes it (the sampler's, see
    :meth:`~tuner.telemetry.sampler.Sampler.stop`). Freeing GPM samples while another thread's
    ``nvmlGpmSampleGet`` still runs is a use-after-free inside libnvidia-ml.
    """

    def __init__(
        self,
        nvml: Any = None,
        *,
        source: str = "nvml",
        label: str | None = None,
        energy_interval_s: float = 5.0,
        dcgm_probe: Callable[[], bool] | None = None,
    ) -> None:
        self._nvml = nvml
        # Whether DCGM runs on this machine: asked only to explain GPM failures (tests pass their own).
        self._dcgm_probe = dcgm_probe or dcgm_running
        self._dcgm_seen: tuple[float, bool] | None = None  # when last asked, and the answer
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
        # How process lists are read: (function suffix, entry struct), chosen once per driver; None: pynvml's.
        self._process_layout: tuple[str, type[ctypes.Structure]] | None = None
        self._process_buffer: Any = None  # entries, kept between reads (grown when a list does not fit)
        self._raw_functions: dict[str, Any] = {}  # the driver's entry points, looked up once

    @property
    def process_layout(self) -> str:
        """Which process-list entry layout this driver was found to use (for inventories and tests)."""
        if self._process_layout is None:
            return "pynvml"
        suffix, entry = self._process_layout
        return f"{suffix or 'v1'}:{ctypes.sizeof(entry)}B"

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

        ``slow`` also reads the slowly changing values (energy, processes, limits, memory clock and
        temperature); other ticks repeat the last slow values. The first read is always slow so that every
        sample is complete.
        """
        if not self._gpus:
            return ()
        slow = slow or not self._slow_done
        readings: list[dict[str, Any] | str] = []  # per GPU: fast values, or the error on its card
        for gpu in self._gpus:
            if gpu.lost is not None:
                readings.append(gpu.lost)
                continue
            gpu.unknown = None
            try:
                fast = self._read_fast(gpu, now_s)
                if slow:
                    self._read_slow(gpu, now_s)
            except _DeviceLost as exc:
                if exc.sticky:
                    gpu.lost = str(exc)
                self._unprime(gpu)
                gpu.raw_processes = gpu.process_util = None
                readings.append(str(exc))
                continue
            if gpu.unknown is not None and all(v is None for v in fast.values()):
                # Every call failed, with NVML's catch-all among the reasons: the GPU did not answer this tick.
                self._unprime(gpu)
                readings.append(f"GPU not answering this tick (NVML: {gpu.unknown})")
                continue
            readings.append(fast)
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
                    gpm_unavailable_reason=gpu.gpm_unavailable_reason,
                    **gpu.slow_values,
                    **values,
                )
            )
        return tuple(samples)

    def close(self) -> None:
        """Free GPM samples and shut NVML down. Safe to call twice, and after the driver went away."""
        for gpu in self._gpus:
            self._free_gpm(gpu)
        self._gpus = []
        if self._initialized:
            self._initialized = False
            self._quietly("nvmlShutdown")
        self._info = None
        self._slow_done = False
        self._raw_functions.clear()
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
            self._process_layout = self._choose_process_layout()
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
            gpu.unsupported.update({"memory_v2", "mig_memory_v2"})
        try:
            gpu.info = self._read_info(gpu)
            gpu.gpm_capable = gpu.info.gpm_supported
            if gpu.info.gpm_supported and not self._start_gpm(gpu):
                gpu.info = dataclasses.replace(gpu.info, gpm_supported=False)
        except _DeviceLost as exc:
            gpu.lost = str(exc)
        return gpu

    def _read_info(self, gpu: _Gpu) -> GpuInfo:
        h = gpu.handle
        name = _text(self._call(gpu, "name", "nvmlDeviceGetName", h)) or "NVIDIA GPU"
        mig = self._call(gpu, "mig_mode", "nvmlDeviceGetMigMode", h)
        mig_enabled = None if mig is None else mig[0] == NVML_DEVICE_MIG_ENABLE
        if mig_enabled:
            self._find_mig_devices(gpu)
        memory = self._read_memory(gpu)
        cc = self._call(gpu, "compute_capability", "nvmlDeviceGetCudaComputeCapability", h)
        cc = (int(cc[0]), int(cc[1])) if cc is not None else None
        mem_clock_max = self._call(gpu, "mem_clock_max", "nvmlDeviceGetMaxClockInfo", h, NVML_CLOCK_MEM)
        bus_width = self._call(gpu, "bus_width", "nvmlDeviceGetMemoryBusWidth", h)
        peak_gbps, peak_source = gpus.peak_dram_bw(name, bus_width, mem_clock_max)
        known = gpus.lookup(name)
        support = self._call(gpu, "gpm_support", "nvmlGpmQueryDeviceSupport", h)
        gpm = bool(support is not None and support.isSupportedDevice)
        if mig_enabled and getattr(self._nvml, "nvmlGpmMigSampleGet", None) is None:
            gpm = False  # bindings too old for per-instance GPM
        nvlinks = self._field_values(gpu, {"nvlink_count": NVML_FI_DEV_NVLINK_LINK_COUNT})["nvlink_count"]
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
            local_cpus=_cpu_set(
                self._call(gpu, "cpu_affinity", "nvmlDeviceGetCpuAffinity", h, _CPU_SET_WORDS)
            ),
        )

    # --- MIG -----------------------------------------------------------------------------------------------

    def _find_mig_devices(self, gpu: _Gpu) -> bool:
        """The MIG devices of a MIG-enabled GPU (one per compute instance; several may share a GPU instance and
        its memory); True when their GPU instances changed since last time. A failed count keeps the last."""
        count = self._call(gpu, "mig_count", "nvmlDeviceGetMaxMigDeviceCount", gpu.handle)
        if count is None:
            return False
        found: list[tuple[Any, int, int | None]] = []
        for slot in range(int(count)):
            # Not cached: an empty slot answers NOT_FOUND, and the next slot may hold an instance.
            handle = self._call(gpu, None, "nvmlDeviceGetMigDeviceHandleByIndex", gpu.handle, slot)
            if handle is None:
                continue
            gi = self._call(gpu, None, "nvmlDeviceGetGpuInstanceId", handle)
            if gi is None:
                continue
            memory = self._call(gpu, None, "nvmlDeviceGetMemoryInfo", handle)
            found.append((handle, int(gi), None if memory is None else int(memory.total)))
        changed = _instances(found) != _instances(gpu.mig_devices)
        gpu.mig_devices = found
        return changed

    # --- GPM -----------------------------------------------------------------------------------------------

    def _start_gpm(self, gpu: _Gpu) -> bool:
        """One GPM stream for the GPU, or one per GPU instance in MIG mode; False where that fails."""
        request_type = getattr(self._nvml, "c_nvmlGpmMetricsGet_t", None)
        if request_type is None:
            return False
        parts: list[tuple[int | None, float]]
        if gpu.info.mig_enabled:
            instances = _instances(gpu.mig_devices)  # GPU instance id -> its memory
            memory = [m or 0 for m in instances.values()]
            total = sum(memory)
            parts = [
                (gi, m / total if total else 1 / len(memory)) for gi, m in zip(instances, memory, strict=True)
            ]
        else:
            parts = [(None, 1.0)]
        for gi, weight in parts:
            samples: list[Any] = []
            for _ in range(2):
                sample = self._call(gpu, None, "nvmlGpmSampleAlloc")
                if sample is None:
                    for allocated in samples:
                        self._quietly("nvmlGpmSampleFree", allocated)
                    self._free_gpm(gpu)
                    return False
                samples.append(sample)
            request = request_type()
            request.version = NVML_GPM_METRICS_GET_VERSION
            gpu.gpm.append(_GpmStream(gi, weight, samples, request))
        return bool(gpu.gpm) or not gpu.info.mig_enabled

    def _free_gpm(self, gpu: _Gpu) -> None:
        for stream in gpu.gpm:
            for sample in stream.samples:
                self._quietly("nvmlGpmSampleFree", sample)
        gpu.gpm = []

    @staticmethod
    def _unprime(gpu: _Gpu) -> None:
        for stream in gpu.gpm:
            stream.primed, stream.values = False, None

    def _read_gpm(self, gpu: _Gpu, now_s: float) -> dict[int, float] | None:
        """GPM metrics of the last interval, the GPU's instances combined; None until two samples exist."""
        if len(gpu.gpm) == 1:
            return self._read_gpm_stream(gpu, gpu.gpm[0], now_s)
        parts = [(s.weight, v) for s in gpu.gpm if (v := self._read_gpm_stream(gpu, s, now_s)) is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0][1]
        combined: dict[int, float] = {}
        for metric in {m for _, values in parts for m in values}:
            known = [(w, values[metric]) for w, values in parts if metric in values]
            if metric in GPM_RATE_METRIC_IDS:  # traffic adds up over instances
                combined[metric] = sum(v for _, v in known)
            else:  # percentages of each instance's share of the GPU (assumed; see the module's notes)
                weights = sum(w for w, _ in known)
                combined[metric] = sum(w * v for w, v in known) / weights if weights else 0.0
        return combined

    def _read_gpm_stream(self, gpu: _Gpu, st: _GpmStream, now_s: float) -> dict[int, float] | None:
        if st.paused_until_s is not None:
            if now_s < st.paused_until_s:
                return None
            st.paused_until_s, st.primed, st.metric_ids = None, False, list(GPM_METRIC_IDS)
        if st.primed:
            elapsed = now_s - st.last_s  # type: ignore[operator]  # set whenever primed
            if elapsed < 0:  # the wall clock stepped back: a fresh interval
                st.primed, st.values = False, None
            elif (
                elapsed < GPM_MIN_INTERVAL_S - 0.005
            ):  # (a tick's jitter is not a reason to wait a tick more)
                return st.values  # too soon for a new interval: the last one stands
            elif elapsed > st.pause_after_s:  # after a pause: a fresh interval, not one across the pause
                st.primed, st.values = False, None
        if st.reprobe_at_s is not None and now_s >= st.reprobe_at_s:
            st.reprobe_at_s, st.metric_ids, st.metric_failures = None, list(GPM_METRIC_IDS), {}
        current = st.current
        sample = st.samples[current]
        if st.gpu_instance_id is None:
            got = self._gpm_call(gpu, st, "nvmlGpmSampleGet", gpu.handle, sample)
        else:
            got = self._gpm_call(gpu, st, "nvmlGpmMigSampleGet", gpu.handle, st.gpu_instance_id, sample)
        if got is None or st.failures:
            self._gpm_outcome(st, "sample", got is not None, now_s)
        if got is None:
            st.primed, st.values = False, None
            return None
        previous = st.samples[1 - current]
        st.current = 1 - current
        if not st.primed:
            st.primed, st.last_s, st.values = True, now_s, None
            return None
        interval_s = now_s - st.last_s  # type: ignore[operator]
        st.last_s, st.pause_after_s = now_s, max(1.0, GPM_PAUSE_FACTOR * interval_s)
        request = st.request
        request.sample1, request.sample2 = previous, sample
        ids = st.metric_ids
        if st.requested != ids:
            request.numMetrics = len(ids)
            metrics = request.metrics
            st.entries = [metrics[i] for i in range(len(ids))]  # views into the request, kept
            for entry, metric_id in zip(st.entries, ids, strict=True):
                entry.metricId = metric_id
            st.requested = list(ids)
        entries = st.entries
        for entry in entries:
            # Cleared every time: an entry the driver skips must not repeat the last interval's value.
            entry.nvmlReturn = NVML_ERROR_UNKNOWN
        got = self._gpm_call(gpu, st, "nvmlGpmMetricsGet", request)
        if got is None or st.failures:
            self._gpm_outcome(st, "metrics", got is not None, now_s)
        if got is None:
            st.values = None
            return None
        values: dict[int, float] = {}
        failed: list[int] = []
        for entry, metric_id in zip(entries, ids, strict=True):
            if entry.nvmlReturn == NVML_SUCCESS:
                values[metric_id] = float(entry.value)
            else:
                failed.append(metric_id)
        if failed or st.metric_failures:
            self._count_metric_failures(st, failed, now_s)
        st.values, st.last_error = values, None
        return values

    def _gpm_call(self, gpu: _Gpu, st: _GpmStream, function: str, *args: Any) -> Any:
        """A GPM call through :meth:`_call`, keeping the NVML code of a failure on the stream: it tells why GPM
        gives nothing (another client holding the counters answers IN_USE)."""
        fn = getattr(self._nvml, function, None)
        if fn is None:
            return None

        def call(*call_args: Any) -> Any:
            try:
                return fn(*call_args)
            except self._nvml_error as exc:
                st.last_error = (getattr(exc, "value", None), str(exc))
                raise

        return self._call(gpu, None, call, *args)

    def _gpm_unavailable_reason(self, gpu: _Gpu, now_s: float) -> str | None:
        """Why this GPM-capable GPU gives no GPM values now, for its card; None while GPM works, and after a
        single failed tick (that is n/a for a tick, not a state worth explaining).

        nvml.h documents no error code for GPM's counters being taken, and DCGM's developers say GPM on Hopper
        does not share the perfmon lock that DCGM and Nsight contend for (NVIDIA/DCGM#62), while nvtop's GPM
        pull request saw DCGM and GPM disturb each other. So the reason names DCGM only on evidence: an IN_USE
        answer, or GPM failing while a DCGM process runs on this machine.
        """
        if any(st.values is not None for st in gpu.gpm):
            return None
        errors = [st.last_error for st in gpu.gpm if st.last_error is not None]
        if not errors:
            return None
        in_use = any(code == NVML_ERROR_IN_USE for code, _ in errors)
        set_aside = any(st.paused_until_s is not None for st in gpu.gpm)
        if not in_use and not set_aside:
            return None
        dcgm = self._dcgm_running(now_s)
        if in_use:
            return (
                "DCGM holds the profiling counters" if dcgm else "another client holds the profiling counters"
            )
        text = errors[0][1]
        if dcgm:
            return f"GPM failing while DCGM runs here (NVML: {text})"
        return f"GPM failing (NVML: {text}); asked again each minute"

    def _dcgm_running(self, now_s: float) -> bool:
        seen = self._dcgm_seen
        if seen is None or not 0 <= now_s - seen[0] < DCGM_PROBE_EVERY_S:
            seen = self._dcgm_seen = (now_s, self._dcgm_probe())
        return seen[1]

    @staticmethod
    def _count_metric_failures(st: _GpmStream, failed: list[int], now_s: float) -> None:
        """A metric failing several times in a row is set aside (e.g. NVLink on a GPU without NVLink)."""
        counts = {m: st.metric_failures.get(m, 0) + 1 for m in failed}
        st.metric_failures = counts
        dropped = [m for m, n in counts.items() if n >= GPM_FAILURES_TO_DROP]
        if dropped:
            st.metric_ids = [m for m in st.metric_ids if m not in dropped]
            st.reprobe_at_s = now_s + GPM_REPROBE_S

    @staticmethod
    def _gpm_outcome(st: _GpmStream, call: str, ok: bool, now_s: float) -> None:
        """GPM failures are counted rather than cached: a few in a row set GPM aside for a while (after first
        retrying the metrics call with only the percentages every GPM-capable GPU has)."""
        if ok:
            st.failures.pop(call, None)
            return
        st.failures[call] = st.failures.get(call, 0) + 1
        if st.failures[call] >= GPM_FAILURES_TO_DROP:
            st.failures.pop(call)
            if call == "metrics" and len(st.metric_ids) > len(GPM_CORE_METRIC_IDS):
                # Whether one unsupported metric fails the whole call is not documented: before setting
                # GPM aside, try the percentages alone.
                st.metric_ids = [m for m in st.metric_ids if m in GPM_CORE_METRIC_IDS]
                st.reprobe_at_s = now_s + GPM_REPROBE_S
            else:
                st.paused_until_s = now_s + GPM_REPROBE_S

    # --- every tick ----------------------------------------------------------------------------------------

    def _read_fast(self, gpu: _Gpu, now_s: float) -> dict[str, Any]:
        h = gpu.handle
        call = self._call
        memory = self._read_memory(gpu)
        util = call(gpu, "utilization", "nvmlDeviceGetUtilizationRates", h)
        reasons = call(gpu, "clock_events", "nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is None and "clock_events" in gpu.unsupported:  # drivers before 535 use the old name
            reasons = call(gpu, "throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons", h)
        values: dict[str, Any] = {
            "vram_used_bytes": None if memory is None else int(memory.used),
            "vram_total_bytes": None if memory is None else int(memory.total),
            "gpu_util_pct": None if util is None else float(util.gpu),
            "mem_busy_pct": None if util is None else float(util.memory),
            "power_w": mw_to_w(self._read_power_mw(gpu)),
            "gpu_temp_c": _float(self._read_gpu_temp(gpu)),
            "fan_pct": _float(call(gpu, "fan", "nvmlDeviceGetFanSpeed", h)),
            "sm_clock_mhz": call(gpu, "sm_clock", "nvmlDeviceGetClockInfo", h, NVML_CLOCK_SM),
            "pstate": _pstate(call(gpu, "pstate", "nvmlDeviceGetPerformanceState", h)),
            "clock_event_reasons": None if reasons is None else decode_clock_event_reasons(reasons),
        }
        gpu.gpm_unavailable_reason = None
        if gpu.gpm:
            gpm = self._read_gpm(gpu, now_s)
            if gpm is None:
                gpu.gpm_unavailable_reason = self._gpm_unavailable_reason(gpu, now_s)
            else:
                dram_pct = gpm.get(GPM_DRAM_BW_UTIL)
                values["profiling_source"] = "gpm"
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

    def _read_power_mw(self, gpu: _Gpu) -> Any:
        """Power now: the instantaneous field where the driver has it, else nvmlDeviceGetPowerUsage (which is a
        one-second average on Ampere and newer: a live value that lags; energy comes from the counter)."""
        instant = self._field_value(gpu, "power_instant", NVML_FI_DEV_POWER_INSTANT)
        if instant is not None:
            return instant
        return self._call(gpu, "power", "nvmlDeviceGetPowerUsage", gpu.handle)

    def _read_memory(self, gpu: _Gpu) -> Any:
        """An object with ``total`` and ``used`` bytes, or None."""
        memory = self._read_memory_of(gpu, gpu.handle, "")
        if memory is None and gpu.mig_devices:
            # MIG mode: the parent handle's memory needs privileges; the GPU instances' add up to what is in
            # use (one MIG device per GPU instance: its compute instances share that memory).
            handles = {gi: h for h, gi, _ in reversed(gpu.mig_devices)}
            parts = [self._read_memory_of(gpu, h, "mig_") for h in handles.values()]
            if all(m is not None for m in parts):  # a part alone would pass for the whole GPU
                return _Memory(sum(int(m.total) for m in parts), sum(int(m.used) for m in parts))
        return memory

    def _read_memory_of(self, gpu: _Gpu, handle: Any, prefix: str) -> Any:
        # v2 counts driver-reserved memory apart from "used", as nvidia-smi does; v1 lumps it into "used".
        memory = None
        if f"{prefix}memory_v2" not in gpu.unsupported:
            memory = self._call(
                gpu, f"{prefix}memory_v2", "nvmlDeviceGetMemoryInfo", handle, self._nvml.nvmlMemory_v2
            )
            if memory is None and f"{prefix}memory_v2" not in gpu.unsupported:
                return None  # failed this tick only
        if memory is None:
            memory = self._call(gpu, f"{prefix}memory", "nvmlDeviceGetMemoryInfo", handle)
        return memory

    def _read_gpu_temp(self, gpu: _Gpu) -> Any:
        # The versioned call first: the old one is deprecated (NVML_ERROR_DEPRECATED on newer drivers).
        temp = self._call(gpu, "gpu_temp_v", "nvmlDeviceGetTemperatureV", gpu.handle, NVML_TEMPERATURE_GPU)
        if temp is None and "gpu_temp_v" in gpu.unsupported:  # drivers and bindings before the V call
            temp = self._call(gpu, "gpu_temp", "nvmlDeviceGetTemperature", gpu.handle, NVML_TEMPERATURE_GPU)
        return temp

    def _field_value(self, gpu: _Gpu, key: str, field_id: int) -> Any:
        """One field value (the per-tick path of :meth:`_field_values`)."""
        if key in gpu.unsupported:
            return None
        if "field_values" in gpu.unsupported:  # no field values at all: nor this one
            gpu.unsupported.add(key)
            return None
        values = self._call(gpu, "field_values", "nvmlDeviceGetFieldValues", gpu.handle, [field_id])
        if values is None:
            return None
        value = values[0]
        if value.nvmlReturn == NVML_SUCCESS:
            return getattr(value.value, _FIELD_VALUE_MEMBER.get(value.valueType, "ullVal"))
        if value.nvmlReturn in _UNSUPPORTED:
            gpu.unsupported.add(key)
        return None

    def _field_values(self, gpu: _Gpu, fields: dict[str, int]) -> dict[str, Any]:
        """Several field values in one call; each None where unsupported (then remembered) or failed."""
        wanted = {key: fid for key, fid in fields.items() if key not in gpu.unsupported}
        result: dict[str, Any] = dict.fromkeys(fields)
        if not wanted:
            return result
        values = self._call(
            gpu, "field_values", "nvmlDeviceGetFieldValues", gpu.handle, list(wanted.values())
        )
        if values is None:
            return result
        for key, value in zip(wanted, values, strict=False):
            if value.nvmlReturn == NVML_SUCCESS:
                result[key] = getattr(value.value, _FIELD_VALUE_MEMBER.get(value.valueType, "ullVal"))
            elif value.nvmlReturn in _UNSUPPORTED:
                gpu.unsupported.add(key)
        return result

    # --- slow ticks ----------------------------------------------------------------------------------------

    def _read_slow(self, gpu: _Gpu, now_s: float) -> None:
        h = gpu.handle
        if gpu.info.mig_enabled and self._find_mig_devices(gpu) and gpu.gpm_capable:
            self._free_gpm(gpu)  # GPU instances were created or destroyed: new streams for the new set
            self._start_gpm(gpu)
        mem_temp = self._field_values(gpu, {"mem_temp": NVML_FI_DEV_MEMORY_TEMP})["mem_temp"]
        gpu.slow_values = {
            "power_limit_w": mw_to_w(self._call(gpu, "power_limit", "nvmlDeviceGetEnforcedPowerLimit", h)),
            "mem_clock_mhz": self._call(gpu, "mem_clock", "nvmlDeviceGetClockInfo", h, NVML_CLOCK_MEM),
            "mem_temp_c": _float(mem_temp),
        }
        gpu.raw_processes = self._read_processes(gpu)
        gpu.process_util = self._read_process_utilization(gpu, now_s) if gpu.raw_processes else None
        if gpu.energy_prev_s is not None and now_s - gpu.energy_prev_s < self._energy_interval_s:
            return  # keep the last energy reading: see energy_interval_s
        energy_mj = self._call(gpu, "energy", "nvmlDeviceGetTotalEnergyConsumption", h)
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
        found = self._processes_of(gpu, gpu.handle, "")
        if found is None and gpu.mig_devices:
            # MIG mode: the parent handle's lists need privileges; each MIG device lists its own.
            parts = [self._processes_of(gpu, handle, "mig_") for handle, _, _ in gpu.mig_devices]
            if any(p is not None for p in parts):
                unique = {(pid, kind): (pid, used, kind) for p in parts for pid, used, kind in p or ()}
                found = list(unique.values())
        return found

    def _read_process_utilization(self, gpu: _Gpu, now_s: float) -> dict[int, tuple[float, float]] | None:
        """pid -> (SM %, memory %) averaged over the driver's samples since the last read; a pid without a
        sample is left out. None where the GPU cannot tell (NOT_SUPPORTED, e.g. MIG: set aside like any
        unsupported call) or the call failed this tick.

        ``nvmlDeviceGetProcessUtilization(handle, lastSeenTimeStamp)`` returns the samples newer than that
        timestamp (µs, CPU clock) and NOT_FOUND when there is none: then nothing ran, which is not a failure.
        pynvml's wrapper raises with code SUCCESS when the driver answers an empty list outright: the same.
        """
        since_us = gpu.process_util_seen_us
        now_us = int(now_s * 1e6)
        if since_us is None or since_us > now_us:  # first read, or the wall clock stepped back
            since_us = max(0, now_us - int(PROCESS_UTIL_FIRST_WINDOW_S * 1e6))
        fn = getattr(self._nvml, "nvmlDeviceGetProcessUtilization", None)
        if fn is None:
            gpu.unsupported.add("process_util")
            return None

        def ask(handle: Any, since: int) -> Any:
            try:
                return fn(handle, since)
            except self._nvml_error as exc:
                if getattr(exc, "value", None) in (NVML_SUCCESS, NVML_ERROR_NOT_FOUND):
                    return []
                raise

        samples = self._call(gpu, "process_util", ask, gpu.handle, since_us)
        if samples is None:
            return None
        sums: dict[int, list[float]] = {}
        newest = since_us
        for sample in samples:
            newest = max(newest, int(sample.timeStamp))
            acc = sums.setdefault(int(sample.pid), [0.0, 0.0, 0.0])
            acc[0] += float(sample.smUtil)
            acc[1] += float(sample.memUtil)
            acc[2] += 1.0
        gpu.process_util_seen_us = newest
        return {pid: (sm / n, mem / n) for pid, (sm, mem, n) in sums.items()}

    def _processes_of(self, gpu: _Gpu, handle: Any, prefix: str) -> list[tuple[int, int | None, str]] | None:
        found: list[tuple[int, int | None, str]] | None = None
        for kind, function in _PROCESS_KINDS:
            if self._process_layout is not None:
                suffix, entry = self._process_layout
                procs = self._call(
                    gpu,
                    f"{prefix}{kind}_processes",
                    self._running_processes,
                    handle,
                    function + suffix,
                    entry,
                )
            else:  # bindings without the raw entry points: pynvml's own wrappers, newest first
                for suffix in ("_v3", "_v2"):
                    key = f"{prefix}{kind}_processes{suffix}"
                    procs = self._call(gpu, key, function + suffix, handle)
                    if procs is not None or key not in gpu.unsupported:
                        break
                if procs is not None:
                    procs = [(int(p.pid), p.usedGpuMemory) for p in procs]
            if procs is None:
                continue
            found = found or []
            for pid, used in procs:
                found.append((pid, None if used in (None, _NOT_AVAILABLE_U64) else int(used), kind))
        return found

    def _running_processes(
        self, handle: Any, function: str, entry: type[ctypes.Structure]
    ) -> list[tuple[int, int | None]]:
        """One process list, read from the driver's entry point into entries of the layout this driver fills
        (pynvml's wrappers assume 24 bytes, so on 535 drivers with 32-byte entries all but the first are
        garbage)."""
        fn = self._raw_functions.get(function)
        if fn is None:
            fn = self._raw_functions[function] = self._nvml._nvmlGetFunctionPointer(function)
        buffer = self._process_buffer
        if buffer is None or not isinstance(buffer, ctypes.Array) or buffer._type_ is not entry:
            buffer = self._process_buffer = (entry * 16)()
        count = ctypes.c_uint(len(buffer))
        ret = fn(handle, ctypes.byref(count), buffer)  # one call while the list fits the buffer kept
        for _ in range(3):  # processes may start between the calls: grow and ask again
            if ret != NVML_ERROR_INSUFFICIENT_SIZE:
                break
            buffer = self._process_buffer = (entry * (count.value * 2 + 5))()
            count = ctypes.c_uint(len(buffer))
            ret = fn(handle, ctypes.byref(count), buffer)
        self._nvml._nvmlCheckReturn(ret)
        return [(int(e.pid), int(e.usedGpuMemory)) for e in buffer[: count.value]]

    def _choose_process_layout(self) -> tuple[str, type[ctypes.Structure]] | None:
        """How this driver fills process lists, told by the symbols it exports (nvitop's rule): _v3 with 32-byte
        entries where it has confidential computing but not the process-detail list (535), else 24 bytes;
        _v2 (24) or v1 (16) on older drivers. None: the bindings do not expose the raw entry points."""
        lookup = getattr(self._nvml, "_nvmlGetFunctionPointer", None)
        if lookup is None or getattr(self._nvml, "_nvmlCheckReturn", None) is None:
            return None

        def has(symbol: str) -> bool:
            try:
                lookup(symbol)
            except self._nvml_error as exc:
                if getattr(exc, "value", None) == NVML_ERROR_FUNCTION_NOT_FOUND:
                    return False
                raise
            return True

        if has("nvmlDeviceGetComputeRunningProcesses_v3"):
            if has("nvmlDeviceGetConfComputeMemSizeInfo") and not has(
                "nvmlDeviceGetRunningProcessDetailList"
            ):
                return "_v3", _ProcessInfo32
            return "_v3", _ProcessInfo24
        if has("nvmlDeviceGetComputeRunningProcesses_v2"):
            return "_v2", _ProcessInfo24
        return "", _ProcessInfo16

    def _enrich_processes(self) -> None:
        """Add host facts (user, command, CPU, RSS) to every GPU's process list, reading each pid once."""
        pids = {pid for gpu in self._gpus for pid, _, _ in gpu.raw_processes or ()}
        host = self._host_processes.read(pids)
        for gpu in self._gpus:
            if gpu.raw_processes is None:
                gpu.processes = None
                continue
            util = gpu.process_util or {}
            gpu.processes = tuple(
                GpuProcess(
                    pid=pid,
                    gpu_index=gpu.index,
                    vram_used_bytes=used,
                    kind=kind,
                    sm_util_pct=util[pid][0] if pid in util else None,
                    mem_util_pct=util[pid][1] if pid in util else None,
                    **host[pid],
                )
                for pid, used, kind in gpu.raw_processes
            )

    # --- the one wrapper around NVML -----------------------------------------------------------------------

    def _call(self, gpu: _Gpu | None, key: str | None, function: str | Any, *args: Any) -> Any:
        """Call an NVML function (its name, or a callable); None when it is unsupported (remembered under
        ``key``; never when ``key`` is None) or failed this tick.

        Raises :class:`_DeviceLost` when this GPU fell off the bus and :class:`GpuLostError` when NVML as a whole
        stopped answering. NVML's catch-all UNKNOWN is "no value this tick", noted on the GPU.
        """
        unsupported = self._system_unsupported if gpu is None else gpu.unsupported
        if key in unsupported:  # (None is never in it)
            return None
        fn: Any = getattr(self._nvml, function, None) if function.__class__ is str else function
        if fn is None:  # bindings older than this function
            if key is not None:
                unsupported.add(key)
            return None
        try:
            return fn(*args)
        except self._mismatch_error:
            if key is not None:
                unsupported.add(key)
            return None
        except self._nvml_error as exc:
            code = getattr(exc, "value", None)
            if code in _UNSUPPORTED:
                if key is not None:
                    unsupported.add(key)
                return None
            if code in _LIBRARY_GONE:
                raise GpuLostError(f"The NVIDIA driver stopped answering (NVML: {exc})") from None
            if gpu is not None and code in _GPU_GONE:
                raise _DeviceLost(f"GPU lost: {exc}", sticky=True) from None
            if gpu is not None and code == NVML_ERROR_UNKNOWN:
                gpu.unknown = str(exc)
            return None  # timeouts, UNKNOWN and the like: no value this tick, ask again next tick

    def _quietly(self, function: str, *args: Any) -> None:
        """Best-effort clean-up call: the driver may already be gone."""
        fn = getattr(self._nvml, function, None)
        if fn is None:
            return
        with contextlib.suppress(self._nvml_error):
            fn(*args)


def dcgm_running() -> bool:
    """Whether a DCGM host engine (or dcgm-exporter with its embedded one) runs on this machine, as far as this
    user can see (another pid namespace's, e.g. a Kubernetes exporter's from inside a container, is not seen)."""
    try:
        return any(p.info.get("name") in DCGM_PROCESS_NAMES for p in psutil.process_iter(["name"]))
    except psutil.Error:
        return False


def _instances(mig_devices: list[tuple[Any, int, int | None]]) -> dict[int, int | None]:
    """GPU instance id -> its memory, from MIG devices (compute instances) that may share an instance."""
    return {gi: memory for _, gi, memory in reversed(mig_devices)}


_CPU_SET_WORDS = 64  # nvmlDeviceGetCpuAffinity's mask in 64-bit words: room for 4096 cores


def _cpu_set(words: Any) -> tuple[int, ...] | None:
    """Core numbers from NVML's CPU-affinity mask (a list of 64-bit words, lowest cores first)."""
    if not words:
        return None
    try:
        cores = tuple(
            64 * i + bit for i, word in enumerate(words) for bit in range(64) if int(word) >> bit & 1
        )
    except (TypeError, ValueError):
        return None
    return cores or None


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
