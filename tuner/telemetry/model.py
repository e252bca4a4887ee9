"""What infertop knows about the machine at one instant, as frozen dataclasses.

Every field carries its unit in its name. A metric the device, driver or server does not provide is ``None``
(shown as "n/a"), never a made-up zero. These types are the only thing the TUI, the recorder and the tuner see
of NVML, psutil and vLLM.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class GpuState(str, enum.Enum):
    """Whether the machine's GPUs can be read at all, and if not, why."""

    OK = "ok"
    NO_DRIVER = "no_driver"  # libnvidia-ml.so is missing: no NVIDIA driver on this machine
    NO_GPU = "no_gpu"  # the driver loads but sees no GPU
    PERMISSION_DENIED = "permission_denied"
    DRIVER_MISMATCH = "driver_mismatch"  # kernel module and user-space library differ (needs a reboot)
    ERROR = "error"  # any other NVML failure while starting up


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    gpu_index: int
    vram_used_bytes: int | None  # None where the driver hides it (containers, some MIG setups)
    kind: str  # "compute" or "graphics"
    user: str | None = None
    name: str | None = None
    command: str | None = None
    cpu_pct: float | None = None
    host_rss_bytes: int | None = None
    # Whether this pid, as seen from here, really holds the GPU (/dev/nvidia* open): True; False: NVML gave a
    # pid of another PID namespace (a container) that names an unrelated process here, so the host facts are
    # left out and it may not be signalled; None: not checkable (another user's process, no /proc).
    host_verified: bool | None = None
    # nvmlDeviceGetProcessUtilization, averaged over the driver's samples since the last read. Both are duty
    # cycles of this process, like the GPU's util and mem busy; None where the driver gave no sample for it
    # (it ran no kernel since, or the GPU does not support per-process use: MIG, some boards).
    sm_util_pct: float | None = None  # % of time a kernel of this process ran on the SMs
    mem_util_pct: float | None = None  # % of time this process read or wrote device memory; NOT bandwidth


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What does not change while a GPU is being watched."""

    index: int
    name: str
    uuid: str
    vram_total_bytes: int | None
    peak_dram_bw_gbps: float | None  # GB/s (1e9 bytes/s) at 100 % DRAM_BW_UTIL
    peak_dram_bw_source: str | None  # "datasheet" (known GPU) or "derived" (bus width x max memory clock)
    gpm_supported: bool  # Hopper-and-newer GPU Performance Monitoring: true DRAM bandwidth
    compute_capability: tuple[int, int] | None = None
    fp8_supported: bool | None = None  # compute capability >= 8.9
    power_limit_default_w: float | None = None
    sm_clock_max_mhz: int | None = None
    mem_clock_max_mhz: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    nvlink_links: int | None = None
    mig_enabled: bool | None = None
    local_cpus: tuple[int, ...] | None = None  # the host's cores nearest this GPU (NVML's CPU affinity)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU.

    ``error`` is set when this GPU could not be read this tick (for example it fell off the bus); the other
    fields are then None, and the GPU keeps its card with the error on it.
    """

    index: int
    time_s: float  # wall clock, seconds since the epoch
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    gpu_util_pct: float | None = None  # duty cycle: % of time a kernel was running
    mem_busy_pct: float | None = None  # duty cycle: % of time memory was read or written; NOT bandwidth
    # Measured by the GPU's profiling counters: GPM through NVML (Hopper and newer), or DCGM's profiling
    # module (DCGM_FI_PROF_*, on Ampere/Ada datacenter GPUs too). ``profiling_source`` says which.
    dram_bw_util_pct: float | None = None  # % of peak DRAM bandwidth actually used (DCGM: DRAM active)
    dram_bw_gbps: float | None = None  # DRAM bandwidth in GB/s (the share times the GPU's peak)
    sm_active_pct: float | None = None  # % of SMs busy, averaged
    sm_occupancy_pct: float | None = None  # warps resident vs maximum
    tensor_active_pct: float | None = None  # any tensor pipe active
    profiling_source: str | None = None  # "gpm" or "dcgm": where the five figures above came from
    profiling_age_s: float | None = None  # DCGM: how old its values may be, at most (it samples on its own)
    power_w: float | None = None
    power_limit_w: float | None = None
    energy_counter_j: float | None = None  # energy since the driver loaded; read at most once a second
    energy_interval_j: float | None = None  # energy between the last two counter reads
    energy_interval_s: float | None = None  # length of that interval
    gpu_temp_c: float | None = None
    mem_temp_c: float | None = None
    fan_pct: float | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    clock_event_reasons: tuple[str, ...] | None = None  # decoded throttle reasons; () = running free
    pstate: int | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    nvlink_tx_bytes_per_s: float | None = None
    nvlink_rx_bytes_per_s: float | None = None
    processes: tuple[GpuProcess, ...] | None = None
    # Why a GPM-capable GPU gives no GPM values now, for people (e.g. DCGM holds the profiling counters);
    # None while GPM works, and on GPUs without GPM (GpuInfo.gpm_supported says so).
    gpm_unavailable_reason: str | None = None
    # A model ESTIMATE of DRAM traffic, never a measurement: the bytes an inference server's decode steps must
    # read on this GPU (weights per rank + the KV cache of running sequences) times its step rate. Set only
    # while a server runs on the GPU and nothing measured the bandwidth; kept apart from the measured fields.
    dram_bw_est_gbps: float | None = None
    dram_bw_est_pct: float | None = None  # the estimate as % of the GPU's peak
    # How it was made, for people ("8.0 GB weights + 2.7 GB KV x 120 steps/s"), or why a server here has none.
    dram_bw_est_basis: str | None = None
    error: str | None = None

    @property
    def vram_used_pct(self) -> float | None:
        if self.vram_used_bytes is None or not self.vram_total_bytes:
            return None
        return 100.0 * self.vram_used_bytes / self.vram_total_bytes

    @property
    def power_pct_of_limit(self) -> float | None:
        if self.power_w is None or not self.power_limit_w:
            return None
        return 100.0 * self.power_w / self.power_limit_w

    @property
    def throttled(self) -> bool:
        """True when a reason that costs performance is active (not just idle or app clocks)."""
        return bool(self.clock_event_reasons) and any(
            r not in BENIGN_CLOCK_EVENTS for r in self.clock_event_reasons or ()
        )


BENIGN_CLOCK_EVENTS = frozenset({"gpu_idle", "applications_clocks_setting", "sync_boost"})


@dataclass(frozen=True, slots=True)
class HostSample:
    """The host the GPUs sit in."""

    time_s: float
    hostname: str
    cpu_pct: float | None  # all cores, 0-100
    cpu_count: int | None
    ram_used_bytes: int | None
    ram_total_bytes: int | None
    load_avg_1m: float | None = None
    load_avg_5m: float | None = None
    load_avg_15m: float | None = None
    swap_used_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class EngineSample:
    """What an inference server's /metrics says, with counters turned into rates over the last interval and
    latency histograms into quantiles over a window (``latency_window_s``)."""

    url: str
    time_s: float
    error: str | None = None  # set when the endpoint could not be read this tick
    engine: str | None = None  # "vllm", "sglang", "tgi", "llamacpp"; None in older recordings (vLLM)
    # The server's process and its descendants (its GPU workers) when discovery found it; None: not known.
    server_pids: tuple[int, ...] | None = None
    model_name: str | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_pct: float | None = None  # 0-100
    generation_tokens_total: float | None = None
    prompt_tokens_total: float | None = None
    preemptions_total: float | None = None
    requests_success_total: float | None = None
    generation_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    # Latency of the requests observed over the window, estimated from histogram buckets.
    ttft_mean_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    ttft_p99_s: float | None = None
    itl_mean_s: float | None = None  # time per output token, mean
    tpot_p50_s: float | None = None  # time per output token (inter-token latency where the engine has it)
    tpot_p95_s: float | None = None
    tpot_p99_s: float | None = None
    latency_window_s: float | None = None  # what the latency figures cover, seconds up to time_s
    # What a decode-traffic estimate needs from the server itself (vLLM: vllm:iteration_tokens_total's count
    # rate, vllm:cache_config_info's labels). None where the engine does not publish them.
    steps_per_s: float | None = None  # engine steps (forward passes) per second over the last interval
    # KV cache blocks: summed over a server's data-parallel engines (as vLLM sums them); each TP rank holds that
    # many blocks of its own KV heads.
    kv_cache_blocks: int | None = None
    kv_block_size_tokens: int | None = None  # tokens per KV cache block
    kv_cache_dtype: str | None = None  # the engine's KV cache dtype as it names it ("auto", "fp8", ...)


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """The GPU side of the machine as found at start-up."""

    state: GpuState
    message: str = ""  # one line for people when state is not OK
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml_version: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    source: str = "nvml"  # "nvml", "scripted", or "replay: <file>"
    label: str | None = None  # shown in the header, e.g. "recording of an H100 80GB HBM3, 2026-11-22"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read in one sampler tick."""

    time_s: float
    host: HostSample | None
    gpus: tuple[GpuSample, ...] = ()
    engines: tuple[EngineSample, ...] = ()
    gpu_error: str | None = None  # NVML failed for the whole machine this tick (driver gone)
    # DCGM as this tick saw it, one line for people: where its profiling values come from and how often DCGM
    # samples them, or why it gives none ("DCGM runs but watches no DRAM active"); None: no DCGM looked for.
    dcgm_status: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- (de)serialisation for recordings -----------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Dataclasses to plain dicts, dropping None fields to keep recordings small."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            out[f.name] = to_jsonable(value)
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj


def _build(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def gpu_info_from_dict(d: dict[str, Any]) -> GpuInfo:
    d = dict(d)
    if d.get("compute_capability") is not None:
        d["compute_capability"] = tuple(d["compute_capability"])
    return _build(GpuInfo, d)


def system_info_from_dict(d: dict[str, Any]) -> SystemInfo:
    d = dict(d)
    d["state"] = GpuState(d.get("state", "ok"))
    d["gpus"] = tuple(gpu_info_from_dict(g) for g in d.get("gpus", ()))
    return _build(SystemInfo, d)


def gpu_sample_from_dict(d: dict[str, Any]) -> GpuSample:
    d = dict(d)
    if d.get("clock_event_reasons") is not None:
        d["clock_event_reasons"] = tuple(d["clock_event_reasons"])
    if d.get("processes") is not None:
        d["processes"] = tuple(_build(GpuProcess, p) for p in d["processes"])
    return _build(GpuSample, d)


def engine_sample_from_dict(d: dict[str, Any]) -> EngineSample:
    d = dict(d)
    if d.get("server_pids") is not None:
        d["server_pids"] = tuple(d["server_pids"])
    return _build(EngineSample, d)


def snapshot_from_dict(d: dict[str, Any]) -> Snapshot:
    host = _build(HostSample, d["host"]) if d.get("host") else None
    return Snapshot(
        time_s=d["time_s"],
        host=host,
        gpus=tuple(gpu_sample_from_dict(g) for g in d.get("gpus", ())),
        engines=tuple(engine_sample_from_dict(e) for e in d.get("engines", ())),
        gpu_error=d.get("gpu_error"),
        dcgm_status=d.get("dcgm_status"),
        extra=d.get("extra", {}),
    )
