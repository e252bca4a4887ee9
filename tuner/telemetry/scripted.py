"""A scripted stand-in for the ``pynvml`` module, so the real :class:`NvmlBackend` runs without a GPU.

:class:`ScriptedNvml` has the functions, constants, ``NVMLError_*`` classes and struct-like results that
:mod:`tuner.telemetry.nvml` uses, with the same names as nvidia-ml-py. Tests, demos, screenshots and
benchmarks pass it to ``NvmlBackend(nvml=...)``. Its readings are deterministic functions of an injectable
clock (a :data:`LoadCurve`), so a demo looks alive and a test is reproducible. Faults a real machine shows (no
driver, no permission, a GPU falling off the bus, the driver going away, an old driver lacking newer
functions) are injected through the constructor; ready-made profiles are at the bottom.
"""

from __future__ import annotations

import ctypes
import math
import os
import string
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.telemetry.nvml import NvmlBackend

# --- constants, as named and valued in pynvml ---------------------------------------------------------------

NVML_SUCCESS = 0
_ERROR_CODES = {
    "NVML_ERROR_UNINITIALIZED": (1, "Uninitialized"),
    "NVML_ERROR_INVALID_ARGUMENT": (2, "Invalid Argument"),
    "NVML_ERROR_NOT_SUPPORTED": (3, "Not Supported"),
    "NVML_ERROR_NO_PERMISSION": (4, "Insufficient Permissions"),
    "NVML_ERROR_NOT_FOUND": (6, "Not Found"),
    "NVML_ERROR_INSUFFICIENT_SIZE": (7, "Insufficient Size"),
    "NVML_ERROR_DRIVER_NOT_LOADED": (9, "Driver Not Loaded"),
    "NVML_ERROR_TIMEOUT": (10, "Timeout"),
    "NVML_ERROR_LIBRARY_NOT_FOUND": (12, "NVML Shared Library Not Found"),
    "NVML_ERROR_FUNCTION_NOT_FOUND": (13, "Function Not Found"),
    "NVML_ERROR_GPU_IS_LOST": (15, "GPU is lost"),
    "NVML_ERROR_RESET_REQUIRED": (16, "GPU requires restart"),
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": (18, "RM has detected an NVML/RM version mismatch."),
    "NVML_ERROR_IN_USE": (19, "In use by another client"),
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": (25, "Argument version mismatch"),
    "NVML_ERROR_DEPRECATED": (26, "Deprecated"),
    "NVML_ERROR_UNKNOWN": (999, "Unknown Error"),
}
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
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
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_FI_DEV_MEMORY_TEMP = 82
NVML_FI_DEV_NVLINK_LINK_COUNT = 91
NVML_FI_DEV_POWER_AVERAGE = 185
NVML_FI_DEV_POWER_INSTANT = 186
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
nvmlMemory_v2 = 0x02000028

NVML_GPM_METRIC_GRAPHICS_UTIL = 1
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
NVML_GPM_METRIC_DRAM_BW_UTIL = 10
NVML_GPM_METRIC_PCIE_TX_PER_SEC = 20
NVML_GPM_METRIC_PCIE_RX_PER_SEC = 21
NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC = 60
NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC = 61
NVML_GPM_METRIC_MAX = 477
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_SUPPORT_VERSION = 1

nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonApplicationsClocksSetting = 0x2
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSyncBoost = 0x10
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
nvmlClocksEventReasonDisplayClockSetting = 0x100

MIB = 1024 * 1024
GIB = 1024 * MIB


# --- errors: NVMLError and one subclass per code, named as pynvml names them --------------------------------


class NVMLError(Exception):
    """Base of the scripted NVML errors; ``value`` is the NVML return code, as in pynvml."""

    value: int

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")


class NVMLLibraryMismatchError(Exception):
    """pynvml raises this when an unversioned function meets a driver that lacks it."""


_ERROR_TEXT = {code: text for code, text in _ERROR_CODES.values()}
_ERROR_CLASSES: dict[int, type[NVMLError]] = {}
for _name, (_code, _text) in _ERROR_CODES.items():
    # pynvml's own rule: NVML_ERROR_GPU_IS_LOST -> NVMLError_GpuIsLost
    _class_name = "NVMLError_" + string.capwords(_name.replace("NVML_ERROR_", ""), "_").replace("_", "")
    _ERROR_CLASSES[_code] = type(_class_name, (NVMLError,), {"value": _code, "__module__": __name__})
    globals()[_class_name] = _ERROR_CLASSES[_code]
ERROR_CLASS_NAMES = tuple(cls.__name__ for cls in _ERROR_CLASSES.values())


def nvml_error(code: int) -> NVMLError:
    """The scripted error for an NVML return code (e.g. ``NVMLError_GpuIsLost`` for 15)."""
    return _ERROR_CLASSES.get(code, NVMLError)()


# --- the load the fake GPUs are under -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """What a GPU is doing at one instant, independent of its model (percentages and fractions)."""

    gpu_util_pct: float
    mem_busy_pct: float
    dram_bw_util_pct: float
    sm_active_pct: float
    sm_occupancy_pct: float
    tensor_active_pct: float
    power_frac: float  # of the board power limit
    sm_clock_frac: float  # of the maximum SM clock
    clock_event_bits: int
    pcie_tx_mib_s: float
    pcie_rx_mib_s: float
    nvlink_mib_s: float  # each direction, when the GPU has peers
    temp_offset_c: float = 0.0


LoadCurve = Callable[[float, int], Load]
"""(time in seconds on the fake's clock, GPU index) -> :class:`Load`."""

DECODE_CYCLE_S = 60.0


def decode_load(t: float, gpu_index: int) -> Load:
    """A vLLM server under steady traffic: a 60 s cycle of idle (4 s), a prefill burst (3 s), then decode.

    Decode looks like the H100 readings in REFERENCE.md: GPM DRAM 45-50 %, SM ~35 %, memory duty cycle
    60-66 %, power 460-500 W of 700 W. The prefill burst hits the power cap for a second; once a cycle a short
    thermal slowdown shows up during decode.
    """
    p = (t + 0.9 * gpu_index) % DECODE_CYCLE_S  # tensor-parallel ranks run nearly, not exactly, in step
    w1 = math.sin(2 * math.pi * p / 7.3)
    w2 = math.sin(2 * math.pi * p / 5.1)
    if p < 4.0:
        return Load(0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.11, 0.175, nvmlClocksEventReasonGpuIdle, 0.5, 0.5, 0.0)
    if p < 7.0:
        capped = 5.5 <= p < 6.5
        return Load(
            gpu_util_pct=100.0,
            mem_busy_pct=42 + 3 * w1,
            dram_bw_util_pct=31 + 3 * w1,
            sm_active_pct=88 + 3 * w2,
            sm_occupancy_pct=38 + 2 * w1,
            tensor_active_pct=76 + 4 * w2,
            power_frac=0.97 if capped else 0.92 + 0.02 * w1,
            sm_clock_frac=0.9 if capped else 1.0,
            clock_event_bits=nvmlClocksEventReasonSwPowerCap if capped else 0,
            pcie_tx_mib_s=40.0,
            pcie_rx_mib_s=900 + 100 * w2,
            nvlink_mib_s=30_000 + 2_000 * w1,
        )
    hot = 40.0 <= p < 41.5
    return Load(
        gpu_util_pct=100.0,
        mem_busy_pct=63 + 3 * w1,
        dram_bw_util_pct=48 + 2.5 * w1,
        sm_active_pct=35 + 3 * w2,
        sm_occupancy_pct=21 + 2 * w2,
        tensor_active_pct=19 + 2 * w1,
        power_frac=0.686 + 0.03 * w1,
        sm_clock_frac=0.92 if hot else 1.0,
        clock_event_bits=nvmlClocksEventReasonSwThermalSlowdown if hot else 0,
        pcie_tx_mib_s=25 + 5 * w2,
        pcie_rx_mib_s=60 + 20 * w1,
        nvlink_mib_s=12_000 + 1_500 * w2,
        temp_offset_c=6.0 if hot else 0.0,
    )


_IDLE = decode_load(0.0, 0)


def steady_load(
    dram_bw_util_pct: float = 50.0, sm_active_pct: float = 35.0, power_frac: float = 0.7
) -> LoadCurve:
    """A load that never changes: handy where a test wants exact expected numbers."""
    load = Load(
        gpu_util_pct=100.0,
        mem_busy_pct=64.0,
        dram_bw_util_pct=dram_bw_util_pct,
        sm_active_pct=sm_active_pct,
        sm_occupancy_pct=20.0,
        tensor_active_pct=18.0,
        power_frac=power_frac,
        sm_clock_frac=1.0,
        clock_event_bits=0,
        pcie_tx_mib_s=10.0,
        pcie_rx_mib_s=20.0,
        nvlink_mib_s=1000.0,
    )
    return lambda t, gpu_index: load


class ManualClock:
    """A clock that moves only when told to: ``clock()`` reads it, ``advance(seconds)`` moves it."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s


# --- what the fake GPUs are ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeGpuSpec:
    """A GPU model as NVML describes it."""

    name: str
    vram_total_bytes: int
    compute_capability: tuple[int, int]
    power_limit_w: float
    sm_clock_max_mhz: int
    mem_clock_max_mhz: int
    bus_width_bits: int
    pcie_gen: int
    pcie_width: int
    nvlink_links: int | None  # None: the GPU has no NVLink (the field query is unsupported)
    gpm: bool
    mem_temp: bool  # HBM reports its temperature; GDDR boards usually do not
    fan: bool
    mig_capable: bool
    mig_enabled: bool = False
    # With MIG enabled: each GPU instance's share of the card's memory (GPU instance ids 1, 2, ...).
    mig_slices: tuple[float, ...] = (3 / 7, 4 / 7)
    vram_used_frac: float = 0.9  # vLLM takes --gpu-memory-utilization (0.9) of the card at start


H100_SXM = FakeGpuSpec(
    name="NVIDIA H100 80GB HBM3",
    vram_total_bytes=81_559 * MIB,
    compute_capability=(9, 0),
    power_limit_w=700.0,
    sm_clock_max_mhz=1980,
    mem_clock_max_mhz=2619,
    bus_width_bits=5120,
    pcie_gen=5,
    pcie_width=16,
    nvlink_links=18,
    gpm=True,
    mem_temp=True,
    fan=False,
    mig_capable=True,
)
L4 = FakeGpuSpec(
    name="NVIDIA L4",
    vram_total_bytes=23_034 * MIB,
    compute_capability=(8, 9),
    power_limit_w=72.0,
    sm_clock_max_mhz=2040,
    mem_clock_max_mhz=6251,
    bus_width_bits=192,
    pcie_gen=4,
    pcie_width=16,
    nvlink_links=None,
    gpm=False,
    mem_temp=False,
    fan=False,
    mig_capable=False,
)
A100_80GB = FakeGpuSpec(
    name="NVIDIA A100-SXM4-80GB",
    vram_total_bytes=81_920 * MIB,
    compute_capability=(8, 0),
    power_limit_w=400.0,
    sm_clock_max_mhz=1410,
    mem_clock_max_mhz=1593,
    bus_width_bits=5120,
    pcie_gen=4,
    pcie_width=16,
    nvlink_links=12,
    gpm=False,
    mem_temp=True,
    fan=False,
    mig_capable=True,
)


@dataclass(frozen=True, slots=True)
class FakeProcess:
    """A process the fake driver reports on a GPU."""

    pid: int
    gpu_index: int
    vram_used_bytes: int | None
    kind: str = "compute"  # or "graphics"
    gpu_instance_id: int | None = None  # on a MIG-enabled GPU: the GPU instance it runs in
    # What nvmlDeviceGetProcessUtilization reports for it: these duty cycles, or with ``follows_load`` the GPU's
    # own (util, mem busy: the process is all the GPU runs). Neither: the driver has no sample for it.
    sm_util_pct: float | None = None
    mem_util_pct: float | None = None
    follows_load: bool = False

    def utilization(self, load: Load) -> tuple[float, float] | None:
        """(SM %, memory %) the fake driver samples for this process under ``load``; None: no sample."""
        if self.follows_load:
            return load.gpu_util_pct, load.mem_busy_pct
        if self.sm_util_pct is None and self.mem_util_pct is None:
            return None
        return self.sm_util_pct or 0.0, self.mem_util_pct or 0.0


# A pid above Linux's largest pid_max (2**22) can never exist here: it stands for a process in another pid
# namespace (a container), which psutil cannot see.
INVISIBLE_PID = 2**22 + 7


def default_processes(n_gpus: int, spec: FakeGpuSpec) -> tuple[FakeProcess, ...]:
    """This process holding most of every GPU (so psutil finds a real process), plus one invisible process."""
    main = int(spec.vram_total_bytes * spec.vram_used_frac) - 512 * MIB
    procs = [FakeProcess(os.getpid(), i, main, follows_load=True) for i in range(n_gpus)]
    if n_gpus:
        procs.append(FakeProcess(INVISIBLE_PID, 0, 512 * MIB))
    return tuple(procs)


class _Struct:
    """A plain result object with attributes, like pynvml's ctypes structs and friendly objects."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"_Struct({self.__dict__})"


class _GpmMetric:
    __slots__ = ("metricId", "metricInfo", "nvmlReturn", "value")

    def __init__(self) -> None:
        self.metricId = 0
        self.nvmlReturn = 0
        self.value = 0.0
        self.metricInfo = None


class _GpmMetricsGet:
    """The request/response of ``nvmlGpmMetricsGet``, shaped like pynvml's ctypes struct."""

    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: _GpmSample | None = None
        self.sample2: _GpmSample | None = None
        self.metrics = [_GpmMetric() for _ in range(NVML_GPM_METRIC_MAX)]


class _GpmSample:
    __slots__ = ("device", "freed", "gpu_instance_id", "t")

    def __init__(self) -> None:
        self.device: FakeDevice | None = None
        self.gpu_instance_id: int | None = None
        self.t = 0.0
        self.freed = False


class FakeDevice:
    """One scripted GPU: its spec, its fault schedule, and the state a real one accumulates (energy)."""

    def __init__(self, index: int, spec: FakeGpuSpec, lost_after_reads: int | None) -> None:
        self.index = index
        self.spec = spec
        self.uuid = f"GPU-{index:08x}-5c1d-4e2f-9a3b-{0x1234567890AB + index:012x}"
        self.lost_after_reads = lost_after_reads
        self.reads = 0  # nvmlDeviceGetUtilizationRates calls: the backend makes one per tick
        self.lost = False
        self.energy_mj = 250_000_000.0 + 10_000_000.0 * index  # since the (fake) driver loaded
        self.energy_t: float | None = None
        self.load_t: float | None = None
        self.load = _IDLE


class FakeMigDevice:
    """The handle of one MIG device (a GPU instance) of a MIG-enabled :class:`FakeDevice`."""

    def __init__(self, parent: FakeDevice, gpu_instance_id: int, memory_frac: float) -> None:
        self.parent = parent
        self.gpu_instance_id = gpu_instance_id
        self.memory_frac = memory_frac

    @property
    def lost(self) -> bool:
        return self.parent.lost

    @property
    def index(self) -> int:
        return self.parent.index


# The process-info entry as drivers fill it: pid, pad, usedGpuMemory, gpuInstanceId, computeInstanceId (24
# bytes, the layout pynvml's c_nvmlProcessInfo_v3_t has); some 535 drivers append usedGpuCcProtectedMemory (32).
_PROCESS_ENTRY_24 = struct.Struct("<I4xQII")
_PROCESS_ENTRY_32 = struct.Struct("<I4xQIIQ")


class _ProcessInfo24(ctypes.Structure):
    """pynvml's c_nvmlProcessInfo_v2_t / _v3_t."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


# Symbols a driver exports beyond the functions the fake implements; nvitop tells the 535 process layout by them.
_EXTRA_SYMBOLS = frozenset({"nvmlDeviceGetConfComputeMemSizeInfo", "nvmlDeviceGetRunningProcessDetailList"})


class ScriptedNvml:
    """The ``pynvml`` module surface, scripted. Pass it as ``NvmlBackend(nvml=...)``.

    As strict as the real library where a mistake would hurt: GPM samples used after ``nvmlGpmSampleFree`` are
    counted in ``use_after_free``, GPM intervals under 0.1 s (NVML asks for more) get no values and are counted
    in ``gpm_short_intervals``, and a process buffer too small for the driver's entries is counted in
    ``buffer_overflows``. ``nvmlDeviceGetPowerUsage`` answers a one-second average, as on Ampere and newer;
    ``NVML_FI_DEV_POWER_INSTANT`` the instantaneous power.

    A "read" is one ``nvmlDeviceGetUtilizationRates`` call on a GPU, which NvmlBackend makes once per tick.
    ``lost_after_reads={1: 3}``: GPU 1 answers 3 reads, then every call on it raises ``NVMLError_GpuIsLost``.
    ``driver_gone_after_reads=N``: after GPU 0 answered N reads, every call raises ``driver_gone_error``.
    ``missing_functions``: symbols the (old) driver lacks -> ``NVMLError_FunctionNotFound`` (use
    "nvmlDeviceGetMemoryInfo_v2" for the v2 memory struct). ``absent_functions``: functions the (old) Python
    bindings do not define at all. ``deprecated_functions`` answer ``NVMLError_Deprecated``.
    ``missing_fields``: field ids the driver does not know. ``driver_535``: the process lists' entries are 32
    bytes (a 535 driver's layout) while pynvml reads 24. ``privileged=False``: on a MIG-enabled GPU the parent
    handle's memory and process lists answer ``NoPermission`` (only MIG device handles answer).
    ``process_utilization=False``: ``nvmlDeviceGetProcessUtilization`` answers ``NotSupported`` (as on MIG-enabled
    GPUs always). ``gpm_in_use``: another client (DCGM) holds the GPM counters, so GPM samples answer
    ``NVMLError_InUse``; ``dcgm_running`` is what :func:`scripted_backend`'s DCGM probe sees. Faults for one
    call at a time: :meth:`inject`, :meth:`inject_gpm_metric`, :meth:`hang`. ``calls`` counts every call by
    function name.
    """

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError
    c_nvmlGpmMetricsGet_t = _GpmMetricsGet  # pynvml's name for the struct

    def __init__(
        self,
        gpus: Sequence[FakeGpuSpec],
        *,
        clock: Callable[[], float] | None = None,
        load: LoadCurve = decode_load,
        processes: Sequence[FakeProcess] | None = None,
        init_error: int | None = None,
        lost_after_reads: Mapping[int, int] | None = None,
        driver_gone_after_reads: int | None = None,
        driver_gone_error: int = NVML_ERROR_UNINITIALIZED,
        missing_functions: Collection[str] = (),
        absent_functions: Collection[str] = (),
        deprecated_functions: Collection[str] = (),
        missing_fields: Collection[int] = (),
        driver_535: bool = False,
        privileged: bool = True,
        process_utilization: bool = True,
        gpm_in_use: bool = False,
        dcgm_running: bool = False,
        label: str | None = None,
    ) -> None:
        self.clock = clock or time.time
        self.load = load
        lost = lost_after_reads or {}
        self.devices = [FakeDevice(i, spec, lost.get(i)) for i, spec in enumerate(gpus)]
        self.processes = tuple(processes) if processes is not None else self._default_processes(gpus)
        self.init_error = init_error
        self.driver_gone_after_reads = driver_gone_after_reads
        self.driver_gone_error = driver_gone_error
        self.missing_functions = frozenset(missing_functions)
        self.deprecated_functions = frozenset(deprecated_functions)
        self.missing_fields = frozenset(missing_fields)
        self.driver_535 = driver_535
        self.privileged = privileged
        self.process_utilization = process_utilization
        self.gpm_in_use = gpm_in_use  # may be changed while running: DCGM started or stopped
        self.dcgm_running = dcgm_running
        self.label = label or self._default_label(gpus)
        self.calls: Counter[str] = Counter()
        self.initialized = False
        self.driver_gone = False
        self.gpm_samples_live = 0
        self.use_after_free = 0
        self.gpm_short_intervals = 0
        self.buffer_overflows = 0
        self._faults: dict[tuple[str, int | None], deque[int]] = {}
        self._gpm_metric_faults: dict[int, deque[int | None]] = {}
        self._hangs: dict[str, threading.Event] = {}
        self.hanging = threading.Event()  # set while a call hangs in :meth:`hang`
        for name in absent_functions:
            setattr(self, name, None)  # an instance attribute of None hides the method: getattr(...) is None

    @staticmethod
    def _default_processes(gpus: Sequence[FakeGpuSpec]) -> tuple[FakeProcess, ...]:
        return default_processes(len(gpus), gpus[0]) if gpus else ()

    @staticmethod
    def _default_label(gpus: Sequence[FakeGpuSpec]) -> str:
        if not gpus:
            return "scripted: no GPU"
        return f"scripted {len(gpus)}x {gpus[0].name}, decode-like load"

    # --- faults for one call at a time ---------------------------------------------------------------------

    def inject(self, function: str, *codes: int, gpu: int | None = None) -> None:
        """The next calls of ``function`` (on GPU ``gpu``; any GPU when None) fail with these NVML codes in
        turn (0: that call succeeds), then it answers normally again."""
        self._faults.setdefault((function, gpu), deque()).extend(codes)

    def inject_gpm_metric(self, metric_id: int, *outcomes: int | None) -> None:
        """The next ``nvmlGpmMetricsGet`` calls answer ``metric_id`` with these return codes in turn; None: the
        driver leaves that metric's entry unwritten (what the request held before stays)."""
        self._gpm_metric_faults.setdefault(metric_id, deque()).extend(outcomes)

    def hang(self, function: str, release: threading.Event) -> None:
        """The next call of ``function`` blocks until ``release`` is set (a sick GPU's call taking seconds)."""
        self._hangs[function] = release

    def _take_fault(self, function: str, gpu: int | None) -> None:
        queue = self._faults.get((function, gpu))
        if queue:
            code = queue.popleft()
            if code:
                raise nvml_error(code)

    # --- plumbing shared by every call ---------------------------------------------------------------------

    def _enter(self, function: str) -> None:
        self.calls[function] += 1
        if self.driver_gone:
            raise nvml_error(self.driver_gone_error)
        if not self.initialized:
            raise nvml_error(NVML_ERROR_UNINITIALIZED)
        if function in self.missing_functions:
            raise nvml_error(NVML_ERROR_FUNCTION_NOT_FOUND)
        if function in self.deprecated_functions:
            raise nvml_error(NVML_ERROR_DEPRECATED)
        self._take_fault(function, None)
        release = self._hangs.pop(function, None)
        if release is not None:  # inside the driver now: what happens meanwhile happens under this call
            self.hanging.set()
            release.wait(timeout=60)
            self.hanging.clear()

    def _device(self, function: str, handle: FakeDevice) -> FakeDevice:
        self._enter(function)
        if handle.lost:
            raise nvml_error(NVML_ERROR_GPU_IS_LOST)
        if isinstance(handle, FakeMigDevice):  # only a few functions take a MIG device handle
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        self._take_fault(function, handle.index)
        return handle

    def _mig_parent_denied(self, device: FakeDevice) -> bool:
        """On a MIG-enabled GPU, parent-handle memory and process queries need privileges."""
        return device.spec.mig_enabled and not self.privileged

    def _load(self, device: FakeDevice) -> Load:
        now = self.clock()
        if now != device.load_t:  # a tick reads several metrics at one instant of a manual clock
            device.load_t, device.load = now, self.load(now, device.index)
        return device.load

    # --- library and system --------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        if self.driver_gone:
            raise nvml_error(NVML_ERROR_DRIVER_NOT_LOADED)
        self.initialized = True
        now = self.clock()
        for device in self.devices:
            if device.energy_t is None:
                device.energy_t = now

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "580.95.05"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        return 13000

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return "13.580.95.05"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        return self.devices[index]

    # --- static device facts -------------------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        return self._device("nvmlDeviceGetName", handle).spec.name

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeDevice) -> tuple[int, int]:
        return self._device("nvmlDeviceGetCudaComputeCapability", handle).spec.compute_capability

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeDevice) -> int:
        return int(self._device("nvmlDeviceGetPowerManagementDefaultLimit", handle).spec.power_limit_w * 1000)

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeDevice, clock_type: int) -> int:
        spec = self._device("nvmlDeviceGetMaxClockInfo", handle).spec
        return spec.mem_clock_max_mhz if clock_type == NVML_CLOCK_MEM else spec.sm_clock_max_mhz

    def nvmlDeviceGetMemoryBusWidth(self, handle: FakeDevice) -> int:
        return self._device("nvmlDeviceGetMemoryBusWidth", handle).spec.bus_width_bits

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeDevice) -> int:
        return self._device("nvmlDeviceGetMaxPcieLinkGeneration", handle).spec.pcie_gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeDevice) -> int:
        return self._device("nvmlDeviceGetMaxPcieLinkWidth", handle).spec.pcie_width

    def nvmlDeviceGetCpuAffinity(self, handle: FakeDevice, cpu_set_size: int) -> list[int]:
        """As on a two-socket box: the first half of the GPUs near the first half of this host's cores, the
        second half near the rest (one socket when there is one GPU or one core)."""
        device = self._device("nvmlDeviceGetCpuAffinity", handle)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        n = len(self.devices)
        if n > 1 and len(cores) > 1:
            half = len(cores) // 2
            cores = cores[:half] if device.index < n // 2 else cores[half:]
        words = [0] * cpu_set_size
        for core in cores:
            if core // 64 < cpu_set_size:
                words[core // 64] |= 1 << (core % 64)
        return words

    def nvmlDeviceGetMigMode(self, handle: FakeDevice) -> list[int]:
        spec = self._device("nvmlDeviceGetMigMode", handle).spec
        if not spec.mig_capable:
            raise nvml_error(NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if spec.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeDevice) -> int:
        spec = self._device("nvmlDeviceGetMaxMigDeviceCount", handle).spec
        return 7 if spec.mig_capable else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeDevice, index: int) -> FakeMigDevice:
        device = self._device("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        slices = device.spec.mig_slices if device.spec.mig_enabled else ()
        if not 0 <= index < len(slices):
            raise nvml_error(NVML_ERROR_NOT_FOUND)  # an empty slot
        return FakeMigDevice(device, index + 1, slices[index])

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeMigDevice) -> int:
        self._enter("nvmlDeviceGetGpuInstanceId")
        if not isinstance(handle, FakeMigDevice):
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        return handle.gpu_instance_id

    def nvmlGpmQueryDeviceSupport(self, handle: FakeDevice) -> _Struct:
        device = self._device("nvmlGpmQueryDeviceSupport", handle)
        return _Struct(version=NVML_GPM_SUPPORT_VERSION, isSupportedDevice=int(device.spec.gpm))

    def nvmlDeviceGetFieldValues(self, handle: FakeDevice, field_ids: Sequence[int]) -> list[_Struct]:
        device = self._device("nvmlDeviceGetFieldValues", handle)
        return [self._field_value(device, field_id) for field_id in field_ids]

    def _field_value(self, device: FakeDevice, field_id: int) -> _Struct:
        value: float | None = None
        if field_id in self.missing_fields:
            pass
        elif field_id == NVML_FI_DEV_MEMORY_TEMP and device.spec.mem_temp:
            value = round(self._gpu_temp_c(device) + 7)
        elif field_id == NVML_FI_DEV_NVLINK_LINK_COUNT and device.spec.nvlink_links is not None:
            value = device.spec.nvlink_links
        elif field_id == NVML_FI_DEV_POWER_INSTANT:
            value = round(self._power_w(device, self.clock()) * 1000)  # mW, as nvmlDeviceGetPowerUsage
        elif field_id == NVML_FI_DEV_POWER_AVERAGE:
            value = round(self._average_power_w(device) * 1000)
        ret = NVML_ERROR_NOT_SUPPORTED if value is None else NVML_SUCCESS
        return _Struct(
            fieldId=field_id,
            scopeId=0,
            timestamp=int(self.clock() * 1e6),
            latencyUsec=0,
            valueType=NVML_VALUE_TYPE_UNSIGNED_INT,
            nvmlReturn=ret,
            value=_Struct(uiVal=int(value or 0), dVal=float(value or 0)),
        )

    # --- every tick ----------------------------------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(
        self, handle: FakeDevice | FakeMigDevice, version: int | None = None
    ) -> _Struct:
        function = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        if isinstance(handle, FakeMigDevice):
            self._enter(function)
            if handle.lost:
                raise nvml_error(NVML_ERROR_GPU_IS_LOST)
            spec, frac = handle.parent.spec, handle.memory_frac
        else:
            device = self._device(function, handle)
            if self._mig_parent_denied(device):
                raise nvml_error(NVML_ERROR_NO_PERMISSION)
            spec, frac = device.spec, 1.0
        total = int(spec.vram_total_bytes * frac)
        used = int(total * spec.vram_used_frac)
        reserved = 543 * MIB  # what the driver keeps for itself; v1 counts it as used
        if version:
            return _Struct(
                version=version, total=total, reserved=reserved, free=total - used - reserved, used=used
            )
        return _Struct(total=total, free=total - used - reserved, used=used + reserved)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> _Struct:
        device = self._device("nvmlDeviceGetUtilizationRates", handle)
        if device.lost_after_reads is not None and device.reads >= device.lost_after_reads:
            device.lost = True
            raise nvml_error(NVML_ERROR_GPU_IS_LOST)
        if (
            self.driver_gone_after_reads is not None
            and device.index == 0
            and device.reads >= self.driver_gone_after_reads
        ):
            self.driver_gone = True
            raise nvml_error(self.driver_gone_error)
        device.reads += 1
        if device.spec.mig_enabled:  # NVML: utilisation is not supported on MIG-enabled GPUs
            raise nvml_error(NVML_ERROR_NOT_SUPPORTED)
        load = self._load(device)
        return _Struct(gpu=round(load.gpu_util_pct), memory=round(load.mem_busy_pct))

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> int:
        """Ampere and newer: "power averaged over 1 sec interval" (NVML's documentation)."""
        device = self._device("nvmlDeviceGetPowerUsage", handle)
        return round(self._average_power_w(device) * 1000)

    def _power_w(self, device: FakeDevice, t: float) -> float:
        return self.load(t, device.index).power_frac * device.spec.power_limit_w

    def _average_power_w(self, device: FakeDevice) -> float:
        now = self.clock()
        return sum(self._power_w(device, now - 1.0 + (i + 0.5) / 8) for i in range(8)) / 8

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeDevice) -> int:
        return round(self._device("nvmlDeviceGetEnforcedPowerLimit", handle).spec.power_limit_w * 1000)

    def _gpu_temp_c(self, device: FakeDevice) -> float:
        load = self._load(device)
        return 30.0 + 38.0 * load.power_frac + load.temp_offset_c

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> int:
        return round(self._gpu_temp_c(self._device("nvmlDeviceGetTemperature", handle)))

    def nvmlDeviceGetTemperatureV(self, handle: FakeDevice, sensor: int, version: int = 0x100000C) -> int:
        return round(self._gpu_temp_c(self._device("nvmlDeviceGetTemperatureV", handle)))

    def nvmlDeviceGetFanSpeed(self, handle: FakeDevice) -> int:
        device = self._device("nvmlDeviceGetFanSpeed", handle)
        if not device.spec.fan:
            raise nvml_error(NVML_ERROR_NOT_SUPPORTED)
        return round(30 + 40 * self._load(device).power_frac)

    def nvmlDeviceGetClockInfo(self, handle: FakeDevice, clock_type: int) -> int:
        device = self._device("nvmlDeviceGetClockInfo", handle)
        if clock_type == NVML_CLOCK_MEM:
            return device.spec.mem_clock_max_mhz
        return round(self._load(device).sm_clock_frac * device.spec.sm_clock_max_mhz)

    def nvmlDeviceGetPerformanceState(self, handle: FakeDevice) -> int:
        self._device("nvmlDeviceGetPerformanceState", handle)
        return 0

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeDevice) -> int:
        return self._load(self._device("nvmlDeviceGetCurrentClocksEventReasons", handle)).clock_event_bits

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeDevice) -> int:
        return self._load(self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle)).clock_event_bits

    # --- GPM -----------------------------------------------------------------------------------------------

    def nvmlGpmSampleAlloc(self) -> _GpmSample:
        self._enter("nvmlGpmSampleAlloc")
        self.gpm_samples_live += 1
        return _GpmSample()

    def nvmlGpmSampleFree(self, sample: _GpmSample) -> None:
        self._enter("nvmlGpmSampleFree")
        if sample.freed:
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        sample.freed = True
        self.gpm_samples_live -= 1

    def nvmlGpmSampleGet(self, handle: FakeDevice, sample: _GpmSample) -> _GpmSample:
        device = self._device("nvmlGpmSampleGet", handle)  # may hang: see hang()
        if sample.freed:  # inside libnvidia-ml this writes freed memory
            self.use_after_free += 1
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        if not device.spec.gpm or device.spec.mig_enabled:
            raise nvml_error(NVML_ERROR_NOT_SUPPORTED)
        if self.gpm_in_use:
            raise nvml_error(NVML_ERROR_IN_USE)
        sample.device, sample.gpu_instance_id = device, None
        sample.t = self.clock()
        return sample

    def nvmlGpmMigSampleGet(self, handle: FakeDevice, gpu_instance_id: int, sample: _GpmSample) -> _GpmSample:
        device = self._device("nvmlGpmMigSampleGet", handle)
        if sample.freed:
            self.use_after_free += 1
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        if not device.spec.gpm or not device.spec.mig_enabled:
            raise nvml_error(NVML_ERROR_NOT_SUPPORTED)
        if not 1 <= gpu_instance_id <= len(device.spec.mig_slices):
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        if self.gpm_in_use:
            raise nvml_error(NVML_ERROR_IN_USE)
        sample.device, sample.gpu_instance_id = device, gpu_instance_id
        sample.t = self.clock()
        return sample

    def nvmlGpmMetricsGet(self, request: _GpmMetricsGet) -> _GpmMetricsGet:
        self._enter("nvmlGpmMetricsGet")
        if request.version != NVML_GPM_METRICS_GET_VERSION:
            raise nvml_error(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first, second = request.sample1, request.sample2
        if first is None or second is None or first.freed or second.freed:
            self.use_after_free += first is not None and second is not None
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        if (
            first.device is None
            or first.device is not second.device
            or first.gpu_instance_id != second.gpu_instance_id
        ):
            raise nvml_error(NVML_ERROR_INVALID_ARGUMENT)
        device = first.device
        if device.lost:
            raise nvml_error(NVML_ERROR_GPU_IS_LOST)
        short = abs(second.t - first.t) < 0.1  # NVML's GPM notes ask for intervals above ~100 ms
        self.gpm_short_intervals += short
        load = self.load((first.t + second.t) / 2, device.index)  # the interval's average, roughly
        has_peers = bool(device.spec.nvlink_links) and len(self.devices) > 1
        by_id = {
            NVML_GPM_METRIC_GRAPHICS_UTIL: load.gpu_util_pct,
            NVML_GPM_METRIC_SM_UTIL: load.sm_active_pct,
            NVML_GPM_METRIC_SM_OCCUPANCY: load.sm_occupancy_pct,
            NVML_GPM_METRIC_ANY_TENSOR_UTIL: load.tensor_active_pct,
            NVML_GPM_METRIC_DRAM_BW_UTIL: load.dram_bw_util_pct,
            NVML_GPM_METRIC_PCIE_TX_PER_SEC: load.pcie_tx_mib_s,
            NVML_GPM_METRIC_PCIE_RX_PER_SEC: load.pcie_rx_mib_s,
        }
        if device.spec.nvlink_links:
            nvlink = load.nvlink_mib_s if has_peers else 0.0
            by_id[NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC] = nvlink
            by_id[NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC] = nvlink
        for metric in request.metrics[: request.numMetrics]:
            value = by_id.get(metric.metricId)
            faults = self._gpm_metric_faults.get(metric.metricId)
            if faults:
                outcome = faults.popleft()
                if outcome is None:
                    continue  # left unwritten
                metric.nvmlReturn, metric.value = outcome, 0.0
                continue
            if short:  # the fake's stance on intervals NVML does not promise to measure: no value
                metric.nvmlReturn, metric.value = NVML_ERROR_INVALID_ARGUMENT, 0.0
                continue
            metric.nvmlReturn = NVML_ERROR_NOT_SUPPORTED if value is None else NVML_SUCCESS
            metric.value = 0.0 if value is None else value
        return request

    # --- slow ticks ----------------------------------------------------------------------------------------

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeDevice) -> int:
        device = self._device("nvmlDeviceGetTotalEnergyConsumption", handle)
        now = self.clock()
        start = now if device.energy_t is None else device.energy_t
        # Integrate the scripted power in steps of at most 0.25 s: the counter agrees with the power readings.
        steps = max(1, math.ceil((now - start) / 0.25)) if now > start else 0
        for i in range(steps):
            t0 = start + (now - start) * i / steps
            t1 = start + (now - start) * (i + 1) / steps
            power_w = self.load((t0 + t1) / 2, device.index).power_frac * device.spec.power_limit_w
            device.energy_mj += power_w * (t1 - t0) * 1000
        device.energy_t = max(start, now)
        return int(device.energy_mj)

    def nvmlDeviceGetProcessUtilization(self, handle: FakeDevice, timeStamp: int) -> list[_Struct]:
        """One sample per process that has one, stamped now (µs); NOT_FOUND when none is newer than
        ``timeStamp``, as the driver answers."""
        device = self._device("nvmlDeviceGetProcessUtilization", handle)
        if device.spec.mig_enabled or not self.process_utilization:
            raise nvml_error(NVML_ERROR_NOT_SUPPORTED)
        now_us = int(self.clock() * 1e6)
        load = self._load(device)
        samples = []
        if now_us > timeStamp:
            for p in self.processes:
                util = p.utilization(load) if p.gpu_index == device.index else None
                if util is not None:
                    sm, mem = util
                    samples.append(
                        _Struct(
                            pid=p.pid,
                            timeStamp=now_us,
                            smUtil=round(sm),
                            memUtil=round(mem),
                            encUtil=0,
                            decUtil=0,
                        )
                    )
        if not samples:
            raise nvml_error(NVML_ERROR_NOT_FOUND)
        return samples

    # The driver's C entry points, as pynvml reaches them: its friendly functions below decode what these write
    # the way pynvml does, so a 535 driver's 32-byte entries come out garbled there, as on a real machine.

    def _nvmlGetFunctionPointer(self, name: str) -> Callable[..., int]:
        if name in self.missing_functions or (
            name == "nvmlDeviceGetRunningProcessDetailList" and self.driver_535
        ):
            raise nvml_error(NVML_ERROR_FUNCTION_NOT_FOUND)
        if name.startswith(("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")):
            kind = "compute" if "Compute" in name else "graphics"
            return lambda handle, count, buffer: self._process_entries(name, handle, kind, count, buffer)
        if name in _EXTRA_SYMBOLS or callable(getattr(self, name, None)):
            return lambda *args: NVML_ERROR_NOT_SUPPORTED  # present; the backend only asks whether it exists
        raise nvml_error(NVML_ERROR_FUNCTION_NOT_FOUND)

    @staticmethod
    def _nvmlCheckReturn(ret: int) -> int:
        if ret != NVML_SUCCESS:
            raise nvml_error(ret)
        return ret

    def _process_list(
        self, function: str, handle: FakeDevice | FakeMigDevice, kind: str
    ) -> list[FakeProcess]:
        if isinstance(handle, FakeMigDevice):
            self._enter(function)
            if handle.lost:
                raise nvml_error(NVML_ERROR_GPU_IS_LOST)
            gi = handle.gpu_instance_id
            return [
                p
                for p in self.processes
                if p.gpu_index == handle.parent.index and p.kind == kind and p.gpu_instance_id == gi
            ]
        device = self._device(function, handle)
        if self._mig_parent_denied(device):
            raise nvml_error(NVML_ERROR_NO_PERMISSION)
        return [p for p in self.processes if p.gpu_index == device.index and p.kind == kind]

    def _process_entries(
        self, function: str, handle: FakeDevice | FakeMigDevice, kind: str, count: Any, buffer: Any
    ) -> int:
        """``nvmlDevice*RunningProcesses_v*(device, unsigned int *count, nvmlProcessInfo_t *infos)``."""
        procs = self._process_list(function, handle, kind)
        counter = count._obj  # what ctypes.byref() wraps
        if buffer is None or counter.value < len(procs):
            counter.value = len(procs)
            return NVML_SUCCESS if not procs else NVML_ERROR_INSUFFICIENT_SIZE
        layout = _PROCESS_ENTRY_32 if self.driver_535 and function.endswith("_v3") else _PROCESS_ENTRY_24
        base, room = ctypes.addressof(buffer), ctypes.sizeof(buffer)
        for i, p in enumerate(procs):
            if (i + 1) * layout.size > room:
                self.buffer_overflows += 1
                break
            gi = 0xFFFFFFFF if p.gpu_instance_id is None else p.gpu_instance_id
            used = 2**64 - 1 if p.vram_used_bytes is None else p.vram_used_bytes
            fields = [p.pid, used, gi, 0xFFFFFFFF if p.gpu_instance_id is None else 0]
            if layout is _PROCESS_ENTRY_32:
                fields.append(0)  # usedGpuCcProtectedMemory
            entry = layout.pack(*fields)
            ctypes.memmove(base + i * layout.size, entry, layout.size)
        counter.value = len(procs)
        return NVML_SUCCESS

    def _processes(self, function: str, handle: FakeDevice | FakeMigDevice) -> list[_Struct]:
        """pynvml's wrapper: size query, a buffer of 24-byte entries, decode each."""
        fn = self._nvmlGetFunctionPointer(function)
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        if ret == NVML_SUCCESS:
            return []
        if ret != NVML_ERROR_INSUFFICIENT_SIZE:
            raise nvml_error(ret)
        count.value = count.value * 2 + 5
        buffer = (_ProcessInfo24 * count.value)()
        self._nvmlCheckReturn(fn(handle, ctypes.byref(count), buffer))
        return [
            _Struct(
                pid=e.pid,
                usedGpuMemory=None if e.usedGpuMemory == 2**64 - 1 else e.usedGpuMemory,
                gpuInstanceId=e.gpuInstanceId,
                computeInstanceId=e.computeInstanceId,
            )
            for e in buffer[: count.value]
        ]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: FakeDevice) -> list[_Struct]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeDevice) -> list[_Struct]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle)

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: FakeDevice) -> list[_Struct]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses_v3", handle)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: FakeDevice) -> list[_Struct]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses_v2", handle)


# pynvml is a module: its constants and error classes are attributes next to its functions. Same here.
for _class in _ERROR_CLASSES.values():
    setattr(ScriptedNvml, _class.__name__, _class)
for _name, _value in list(globals().items()):
    if _name.startswith(("NVML_", "nvmlMemory_", "nvmlClocksEventReason")):
        setattr(ScriptedNvml, _name, _value)


# --- ready-made machines ------------------------------------------------------------------------------------


def h100_sxm(n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """``n_gpus`` (1-8) H100 80GB SXM: GPM, HBM3 with memory temperature, 700 W, 18 NVLinks."""
    return ScriptedNvml([H100_SXM] * n_gpus, **options)


def l4(n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """L4 (Ada, 24 GB GDDR6, 72 W): no GPM, no memory temperature, no NVLink, no MIG."""
    return ScriptedNvml([L4] * n_gpus, **options)


def a100_80gb(n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """A100 80GB SXM (Ampere): no GPM, no FP8."""
    return ScriptedNvml([A100_80GB] * n_gpus, **options)


def no_library() -> ScriptedNvml:
    """No NVIDIA driver installed: nvmlInit cannot load libnvidia-ml.so."""
    return ScriptedNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)


def driver_not_loaded() -> ScriptedNvml:
    """The driver is installed but its kernel module is not loaded."""
    return ScriptedNvml([], init_error=NVML_ERROR_DRIVER_NOT_LOADED)


def no_permission() -> ScriptedNvml:
    """The user may not open /dev/nvidia*."""
    return ScriptedNvml([H100_SXM], init_error=NVML_ERROR_NO_PERMISSION)


def zero_gpus() -> ScriptedNvml:
    """The driver loads but sees no GPU."""
    return ScriptedNvml([])


def driver_mismatch() -> ScriptedNvml:
    """Kernel module and libnvidia-ml.so differ in version (after a driver upgrade, before a reboot)."""
    return ScriptedNvml([H100_SXM], init_error=NVML_ERROR_LIB_RM_VERSION_MISMATCH)


def gpu_lost_after(reads: int, *, gpu_index: int = 0, n_gpus: int = 2, **options: Any) -> ScriptedNvml:
    """H100s of which one falls off the bus after ``reads`` reads."""
    return h100_sxm(n_gpus, lost_after_reads={gpu_index: reads}, **options)


def driver_gone_after(reads: int, *, n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """H100s whose driver goes away after ``reads`` reads (NVML then answers Uninitialized)."""
    return h100_sxm(n_gpus, driver_gone_after_reads=reads, **options)


OLD_DRIVER_MISSING = (
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlGpmQueryDeviceSupport",
)


def old_driver(n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """A100s on an old driver (R470-like): no v2 memory struct, no ClocksEvent names, no v3 process lists, no
    power fields."""
    options.setdefault("missing_fields", (NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_POWER_AVERAGE))
    return a100_80gb(n_gpus, missing_functions=OLD_DRIVER_MISSING, **options)


def driver_535(n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """H100s on a 535 driver whose process lists have 32-byte entries (pynvml reads 24)."""
    return h100_sxm(n_gpus, driver_535=True, **options)


def mig_h100(n_gpus: int = 1, *, privileged: bool = False, **options: Any) -> ScriptedNvml:
    """H100s in MIG mode with two GPU instances (3/7 and 4/7 of the memory), watched by an unprivileged user."""
    spec = FakeGpuSpec(
        **{**{f: getattr(H100_SXM, f) for f in FakeGpuSpec.__dataclass_fields__}, "mig_enabled": True}
    )
    return ScriptedNvml([spec] * n_gpus, privileged=privileged, **options)


def dcgm_beside(n_gpus: int = 1, **options: Any) -> ScriptedNvml:
    """H100s on a machine where DCGM (nv-hostengine, dcgm-exporter) holds the GPM counters: GPM answers InUse."""
    return h100_sxm(n_gpus, gpm_in_use=True, dcgm_running=True, **options)


def scripted_backend(nvml: ScriptedNvml) -> NvmlBackend:
    """The real NVML backend running on a scripted module (whose DCGM processes are scripted too)."""
    return NvmlBackend(nvml, source="scripted", label=nvml.label, dcgm_probe=lambda: nvml.dcgm_running)


def read_cpu_s_per_tick(n_gpus: int = 1, *, ticks: int = 2000, slow_every: int | None = 4) -> float:
    """CPU seconds one ``NvmlBackend.read()`` costs on ``n_gpus`` scripted H100s, averaged over ``ticks``.

    Ticks are 0.25 s apart on a manual clock; every ``slow_every``-th is slow (None: only the first). This
    includes the fake's own Python work, which a real driver replaces with its C calls (REFERENCE.md gives
    their costs), so it bounds the backend's overhead from above.
    """
    clock = ManualClock()
    backend = scripted_backend(h100_sxm(n_gpus, clock=clock))
    backend.open()
    try:
        backend.read(clock(), slow=True)  # the first (slow) tick primes GPM and the process cache
        start = time.process_time()
        for tick in range(1, ticks + 1):
            slow = slow_every is not None and tick % slow_every == 0
            backend.read(clock.advance(0.25), slow=slow)
        return (time.process_time() - start) / ticks
    finally:
        backend.close()
