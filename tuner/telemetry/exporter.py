"""A Prometheus exporter over the sampler: what the monitor shows, as OpenMetrics a fleet's Prometheus scrapes.

A scrape never calls NVML. The sampler reads the machine at its own cadence on its own thread (the one place that
reads hardware); a scrape formats its latest snapshot, so ten Prometheus servers scraping cost ten formattings,
not ten rounds of NVML calls. The exposition is ``prometheus_client``'s (text or OpenMetrics, as the scraper
asks).

Names follow Prometheus' conventions: base units (bytes, seconds, joules, hertz, watts), ratios 0-1 named
``_ratio``. GPM figures (real DRAM bandwidth, SM activity) and the duty cycles NVML also offers have different
names, so a dashboard can never show one as the other. A metric the GPU, driver or server does not report is left
out of the scrape, never exported as 0.

Nothing secret leaves on the wire: an inference server's URL is exported without its user and password
(``tuner.redact``), and neither ``/metrics`` nor ``/snapshot.json`` carries a process's command line or the
user that owns it (a process is its pid and name). Who may read the exporter at all is ``--web-config``'s
business (TLS, client certificates, basic auth: ``tuner.telemetry.webconfig``), and how a peer is kept from
holding it, ``tuner.telemetry.webserver``'s.
"""

from __future__ import annotations

import dataclasses
import html
import ipaddress
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tuner.redact import redact_text, redact_url
from tuner.telemetry.energy import EnginePower, SnapshotWindow
from tuner.telemetry.model import (
    EngineSample,
    GpuInfo,
    GpuSample,
    GpuState,
    Snapshot,
    SystemInfo,
    to_jsonable,
)
from tuner.telemetry.ports import DEFAULT_PORT
from tuner.telemetry.webconfig import WebConfig
from tuner.telemetry.webserver import MAX_CONNECTIONS, REQUEST_TIMEOUT_S, WORKERS, WebServer

if TYPE_CHECKING:
    from tuner.telemetry.sampler import Sampler

PREFIX = "infertop"
CLOCK_EVENT_NAMES = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
    "board_limit",
    "reliability",
)
"""Every reason NVML names (tuner.telemetry.nvml.CLOCK_EVENT_REASONS): each GPU exports a 0/1 series per reason,
so a reason that has not held yet is a 0, not a missing series (an alert on it can fire at once)."""
_GPU_UP_HELP = "1 while this GPU reads; 0 when it cannot (infertop_gpu_error says why)"
_GPU_ERROR_HELP = "Why a GPU cannot be read"
STALE_AFTER_S = 5.0
"""A reading older than this (or 3 sampling intervals) is not served as live: the sampler is stuck in a call."""
SNAPSHOT_FORMAT = 1
"""The version of ``/snapshot.json``'s layout (the remote view refuses another)."""
WINDOW_S = 60.0
"""The window live rates (energy per token) are taken over."""


@dataclass(frozen=True)
class _Gauge:
    """One per-GPU gauge: its name, help, and how to read it off a sample (and the GPU's fixed facts)."""

    name: str
    help: str
    read: Callable[[GpuSample, GpuInfo | None], float | None]
    sourced: bool = False  # a profiling counter: labelled with what measured it (source="gpm" or "dcgm")


def _ratio(pct: float | None) -> float | None:
    return None if pct is None else pct / 100.0


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


GPU_GAUGES: tuple[_Gauge, ...] = (
    _Gauge(
        "gpu_dram_bandwidth_ratio",
        "DRAM bandwidth used, share of the GPU's peak (0-1), measured by the profiling counters (source: gpm = "
        "NVML GPM, dcgm = DCGM's DRAM active); real bandwidth, not a duty cycle",
        lambda s, i: _ratio(s.dram_bw_util_pct),
        sourced=True,
    ),
    _Gauge(
        "gpu_dram_bandwidth_bytes_per_second",
        "DRAM bandwidth used, bytes/s (the measured share times the GPU's peak; source as above)",
        lambda s, i: _times(s.dram_bw_gbps, 1e9),
        sourced=True,
    ),
    _Gauge(
        "gpu_dram_bandwidth_estimate_bytes_per_second",
        "ESTIMATE, not a measurement: the bytes/s an inference server's decode steps must read on this GPU "
        "(weights per rank + KV cache of running sequences, times its step rate); only where nothing measured it",
        lambda s, i: _times(s.dram_bw_est_gbps, 1e9),
    ),
    _Gauge(
        "gpu_dram_bandwidth_estimate_ratio",
        "ESTIMATE, not a measurement: the decode-traffic estimate as a share of the GPU's peak (0-1)",
        lambda s, i: _ratio(s.dram_bw_est_pct),
    ),
    _Gauge(
        "gpu_dram_peak_bandwidth_bytes_per_second",
        "The GPU's peak DRAM bandwidth, bytes/s (datasheet, or bus width x memory clock where unknown)",
        lambda s, i: _times(i.peak_dram_bw_gbps, 1e9) if i is not None else None,
    ),
    _Gauge(
        "gpu_sm_active_ratio",
        "Share of SMs busy, averaged (0-1), measured by the profiling counters (source: gpm or dcgm)",
        lambda s, i: _ratio(s.sm_active_pct),
        sourced=True,
    ),
    _Gauge(
        "gpu_sm_occupancy_ratio",
        "Warps resident over the maximum (0-1), measured by the profiling counters (source: gpm or dcgm)",
        lambda s, i: _ratio(s.sm_occupancy_pct),
        sourced=True,
    ),
    _Gauge(
        "gpu_tensor_active_ratio",
        "Share of time any tensor pipe was active (0-1), measured by the profiling counters (source: gpm or dcgm)",
        lambda s, i: _ratio(s.tensor_active_pct),
        sourced=True,
    ),
    _Gauge(
        "gpu_kernel_duty_cycle_ratio",
        "Duty cycle: share of time a kernel ran (NVML 'GPU utilization'); 1 while one small kernel runs",
        lambda s, i: _ratio(s.gpu_util_pct),
    ),
    _Gauge(
        "gpu_memory_duty_cycle_ratio",
        "Duty cycle: share of time device memory was read or written (NVML 'memory utilization'); NOT bandwidth",
        lambda s, i: _ratio(s.mem_busy_pct),
    ),
    _Gauge("gpu_power_watts", "Power draw, W", lambda s, i: s.power_w),
    _Gauge("gpu_power_limit_watts", "Enforced power limit, W", lambda s, i: s.power_limit_w),
    _Gauge("gpu_memory_used_bytes", "Device memory (VRAM) in use, bytes", lambda s, i: s.vram_used_bytes),
    _Gauge("gpu_memory_total_bytes", "Device memory (VRAM), bytes", lambda s, i: s.vram_total_bytes),
    _Gauge("gpu_fan_ratio", "Fan speed, share of its maximum (0-1)", lambda s, i: _ratio(s.fan_pct)),
    _Gauge("gpu_pstate", "Performance state (0 = fastest, 15 = slowest)", lambda s, i: s.pstate),
)


def _filled(
    family: GaugeMetricFamily | CounterMetricFamily, rows: Iterable[tuple[list[str], float | int | None]]
) -> Iterator[Metric]:
    """``family`` with a sample per row whose value is known; nothing when none is (never a made-up 0)."""
    for labels, value in rows:
        if value is not None:
            family.add_metric(labels, float(value))
    if family.samples:
        yield family


def _source(s: GpuSample) -> str:
    """What measured a GPU's profiling figures: 'gpm' or 'dcgm' (readings from before infertop said: GPM's)."""
    return s.profiling_source or "gpm"


def _labels(*pairs: tuple[str, str]) -> tuple[list[str], list[str]]:
    return [k for k, _ in pairs], [v for _, v in pairs]


class SnapshotCollector(Collector):
    """Turns the sampler's latest snapshot into metric families at each scrape.

    ``latest`` returns the snapshot to export (None before the first reading); ``info`` the GPUs found at
    start-up. Snapshots handed to :meth:`take` (a sampler listener) are kept for ``WINDOW_S`` for the rates
    that need a window.
    """

    def __init__(
        self,
        latest: Callable[[], Snapshot | None],
        info: Callable[[], SystemInfo],
        *,
        version: str = "",
        window_s: float = WINDOW_S,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._latest = latest
        self._info = info
        self._version = version
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._window = SnapshotWindow(window_s)
        self._lock = threading.Lock()  # the sampler thread adds, scrapes read

    def take(self, snap: Snapshot) -> None:
        """A sampler listener: keep the snapshots of the last window."""
        with self._lock:
            self._window.add(snap)

    def power(self, url: str) -> EnginePower:
        """An inference server's energy per token over the window."""
        with self._lock:
            return self._window.power(url)

    def describe(self) -> Iterable[Metric]:
        return ()  # families vary with the machine: nothing to check at registration

    def age_s(self, snap: Snapshot) -> float:
        return max(0.0, self._clock() - snap.time_s)

    def stale_s(self, snap: Snapshot | None) -> float | None:
        """How old ``snap`` is when older than it may be (the sampler is stuck in a call); else None."""
        if snap is None:
            return None
        age = self._clock() - snap.time_s
        return age if age > self.stale_after_s else None

    def collect(self) -> Iterator[Metric]:
        info = self._info()
        snap = self._latest()
        stale = self.stale_s(snap)
        yield from self._exporter_families(info, snap, stale)
        if snap is None:
            return
        if stale is not None:
            # The last reading is old: the sampler is stuck (a sick GPU hangs NVML calls). Never serve it as
            # live: every GPU is down, with the reason, and no values.
            yield from self._gpus_down(info, f"no reading for {stale:.0f} s (telemetry stuck)")
            return
        yield from self._host_families(snap)
        yield from self._gpu_families(info, snap)
        yield from self._engine_families(snap)

    # --- families ------------------------------------------------------------------------------------------

    def _exporter_families(
        self, info: SystemInfo, snap: Snapshot | None, stale_s: float | None
    ) -> Iterator[Metric]:
        about = InfoMetricFamily(f"{PREFIX}_exporter", "What this exporter reads")
        about.add_metric(
            [],
            {
                "version": self._version,
                "source": info.source,
                "gpu_state": info.state.value,
                "driver_version": info.driver_version or "",
                "cuda_driver_version": info.cuda_driver_version or "",
            },
        )
        yield about
        if snap is not None:
            age = GaugeMetricFamily(
                f"{PREFIX}_snapshot_timestamp_seconds",
                "When the exported readings were taken (epoch seconds): a scrape repeats the latest reading",
            )
            age.add_metric([], snap.time_s)
            yield age
        up = GaugeMetricFamily(
            f"{PREFIX}_gpu_telemetry_up",
            "1 while NVML answers with fresh readings; 0 when it cannot be read (see infertop_gpu_telemetry_error)",
        )
        reason = None
        if info.state is not GpuState.OK or (snap is not None and snap.gpu_error):
            reason = (snap.gpu_error if snap is not None else None) or info.message or info.state.value
        elif stale_s is not None:
            reason = f"no reading for {stale_s:.0f} s (telemetry stuck)"
        up.add_metric([], 0.0 if reason else 1.0)
        yield up
        if snap is not None and snap.dcgm_status:
            dcgm = InfoMetricFamily(
                f"{PREFIX}_dcgm",
                'DCGM as this exporter finds it: where profiling figures labelled source="dcgm" come from, how '
                "often DCGM samples them, or why it gives none",
            )
            dcgm.add_metric([], {"status": snap.dcgm_status})
            yield dcgm
        if reason:
            why = InfoMetricFamily(f"{PREFIX}_gpu_telemetry_error", "Why GPU telemetry is down")
            why.add_metric([], {"reason": reason})
            yield why

    def _gpus_down(self, info: SystemInfo, reason: str) -> Iterator[Metric]:
        """Every GPU found at start-up as down (the driver went away, or the readings stopped coming)."""
        up = GaugeMetricFamily(f"{PREFIX}_gpu_up", _GPU_UP_HELP, labels=["gpu", "uuid", "name"])
        error = InfoMetricFamily(f"{PREFIX}_gpu_error", _GPU_ERROR_HELP, labels=["gpu", "uuid", "name"])
        for g in info.gpus:
            up.add_metric([str(g.index), g.uuid, g.name], 0.0)
            error.add_metric([str(g.index), g.uuid, g.name], {"error": reason})
        if up.samples:
            yield up
            yield error

    def _host_families(self, snap: Snapshot) -> Iterator[Metric]:
        host = snap.host
        if host is None:
            return
        names, values = _labels(("hostname", host.hostname))
        gauges = (
            ("host_cpu_ratio", "Host CPU busy, all cores (0-1)", _ratio(host.cpu_pct)),
            ("host_cpu_cores", "Host logical CPUs", host.cpu_count),
            ("host_memory_used_bytes", "Host RAM in use, bytes", host.ram_used_bytes),
            ("host_memory_total_bytes", "Host RAM, bytes", host.ram_total_bytes),
            ("host_load1", "Host load average over 1 minute", host.load_avg_1m),
        )
        for name, text, value in gauges:
            yield from _filled(GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=names), [(values, value)])

    def _gpu_families(self, info: SystemInfo, snap: Snapshot) -> Iterator[Metric]:
        by_index = {g.index: g for g in info.gpus}
        base = ["gpu", "uuid", "name"]

        def key(s: GpuSample) -> list[str]:
            g = by_index.get(s.index)
            return [str(s.index), g.uuid if g else "", g.name if g else ""]

        if not snap.gpus and snap.gpu_error:
            yield from self._gpus_down(info, snap.gpu_error)
            return
        up = GaugeMetricFamily(f"{PREFIX}_gpu_up", _GPU_UP_HELP, labels=base)
        error = InfoMetricFamily(f"{PREFIX}_gpu_error", _GPU_ERROR_HELP, labels=base)
        for s in snap.gpus:
            up.add_metric(key(s), 0.0 if s.error else 1.0)
            if s.error:
                error.add_metric(key(s), {"error": s.error})
        yield up
        if error.samples:
            yield error
        readable = [s for s in snap.gpus if not s.error]
        for gauge in GPU_GAUGES:
            if gauge.sourced:
                family = GaugeMetricFamily(f"{PREFIX}_{gauge.name}", gauge.help, labels=[*base, "source"])
                rows = [([*key(s), _source(s)], gauge.read(s, by_index.get(s.index))) for s in readable]
            else:
                family = GaugeMetricFamily(f"{PREFIX}_{gauge.name}", gauge.help, labels=base)
                rows = [(key(s), gauge.read(s, by_index.get(s.index))) for s in readable]
            yield from _filled(family, rows)
        yield from self._gpu_labelled(readable, key, base)
        yield from self._processes(readable, key, base)

    def _gpu_labelled(
        self, samples: list[GpuSample], key: Callable[[GpuSample], list[str]], base: list[str]
    ) -> Iterator[Metric]:
        energy = CounterMetricFamily(
            f"{PREFIX}_gpu_energy_joules",
            "Energy the GPU used since the driver loaded, J (NVML's counter, read about once a second)",
            labels=base,
        )
        temps = GaugeMetricFamily(
            f"{PREFIX}_gpu_temperature_celsius", "Temperature, degrees C", labels=[*base, "sensor"]
        )
        clocks = GaugeMetricFamily(f"{PREFIX}_gpu_clock_hertz", "Clock, Hz", labels=[*base, "clock"])
        reasons = GaugeMetricFamily(
            f"{PREFIX}_gpu_clock_event_active",
            "1 while this clock-event (throttle) reason holds; gpu_idle and applications_clocks_setting cost "
            "nothing, the others lower the clocks",
            labels=[*base, "reason"],
        )
        links = GaugeMetricFamily(
            f"{PREFIX}_gpu_link_bytes_per_second",
            "PCIe or NVLink traffic, bytes/s",
            labels=[*base, "link", "direction"],
        )
        for s in samples:
            k = key(s)
            if s.energy_counter_j is not None:
                energy.add_metric(k, s.energy_counter_j)
            for sensor, celsius in (("gpu", s.gpu_temp_c), ("memory", s.mem_temp_c)):
                if celsius is not None:
                    temps.add_metric([*k, sensor], celsius)
            for clock, mhz in (("sm", s.sm_clock_mhz), ("memory", s.mem_clock_mhz)):
                if mhz is not None:
                    clocks.add_metric([*k, clock], mhz * 1e6)
            if s.clock_event_reasons is not None:
                held = set(s.clock_event_reasons)
                for reason in (*CLOCK_EVENT_NAMES, *sorted(held - set(CLOCK_EVENT_NAMES))):
                    reasons.add_metric([*k, reason], 1.0 if reason in held else 0.0)
            for link, direction, rate in (
                ("pcie", "tx", s.pcie_tx_bytes_per_s),
                ("pcie", "rx", s.pcie_rx_bytes_per_s),
                ("nvlink", "tx", s.nvlink_tx_bytes_per_s),
                ("nvlink", "rx", s.nvlink_rx_bytes_per_s),
            ):
                if rate is not None:
                    links.add_metric([*k, link, direction], rate)
        for family in (energy, temps, clocks, reasons, links):
            if family.samples:
                yield family

    def _processes(
        self, samples: list[GpuSample], key: Callable[[GpuSample], list[str]], base: list[str]
    ) -> Iterator[Metric]:
        labels = [*base, "pid", "process"]
        vram = GaugeMetricFamily(
            f"{PREFIX}_gpu_process_memory_used_bytes", "Device memory a process holds, bytes", labels=labels
        )
        sm = GaugeMetricFamily(
            f"{PREFIX}_gpu_process_sm_ratio",
            "Share of the GPU's SM time this process used over the last second (0-1), where the driver says",
            labels=labels,
        )
        for s in samples:
            for p in s.processes or ():
                k = [*key(s), str(p.pid), p.name or ""]
                if p.vram_used_bytes is not None:
                    vram.add_metric(k, float(p.vram_used_bytes))
                sm_pct = getattr(p, "sm_util_pct", None)
                if sm_pct is not None:
                    sm.add_metric(k, sm_pct / 100.0)
        for family in (vram, sm):
            if family.samples:
                yield family

    def _engine_families(self, snap: Snapshot) -> Iterator[Metric]:
        labels = ["url", "engine", "model"]
        power = {e.url: self.power(e.url) for e in snap.engines if not e.error}

        def key(e: EngineSample) -> list[str]:
            return [redact_url(e.url), e.engine or "unknown", e.model_name or ""]

        up = GaugeMetricFamily(
            f"{PREFIX}_engine_up",
            "1 while the inference server's /metrics answers; 0 when not (infertop_engine_error says why)",
            labels=labels,
        )
        about = InfoMetricFamily(
            f"{PREFIX}_engine",
            'An inference server and the GPUs holding its processes (gpus="" while they are not known)',
            labels=labels,
        )
        error = InfoMetricFamily(
            f"{PREFIX}_engine_error", "Why an inference server cannot be read", labels=labels
        )
        for e in snap.engines:
            up.add_metric(key(e), 0.0 if e.error else 1.0)
            p = power.get(e.url)
            gpus = ",".join(map(str, p.gpu_indices)) if p is not None and p.attributed else ""
            about.add_metric(key(e), {"gpus": gpus})
            if e.error:
                error.add_metric(key(e), {"error": redact_text(e.error)})
        for family in (up, about, error):
            if family.samples:
                yield family
        live = [e for e in snap.engines if not e.error]
        gauges: tuple[tuple[str, str, Callable[[EngineSample], float | None]], ...] = (
            ("engine_requests_running", "Requests the server is running", lambda e: e.requests_running),
            ("engine_requests_waiting", "Requests queued in the server", lambda e: e.requests_waiting),
            ("engine_kv_cache_usage_ratio", "KV cache in use (0-1)", lambda e: _ratio(e.kv_cache_usage_pct)),
            (
                "engine_generation_tokens_per_second",
                "Output tokens per second over the last scrape interval",
                lambda e: e.generation_tokens_per_s,
            ),
            (
                "engine_energy_joules_per_token",
                "GPU energy per generated token over the last minute, J (the energy counters of the server's "
                "GPUs in infertop_engine_info's gpus label, over its generated-tokens counter)",
                lambda e: power[e.url].joules_per_token,
            ),
            (
                "engine_tokens_per_second_per_watt",
                "Generated tokens per second per watt of the server's GPUs over the last minute",
                lambda e: power[e.url].tokens_per_s_per_watt,
            ),
        )
        for name, text, read in gauges:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=labels)
            yield from _filled(family, [(key(e), read(e)) for e in live])
        quantiles = GaugeMetricFamily(
            f"{PREFIX}_engine_latency_seconds",
            "TTFT and TPOT quantiles over the server's last minute (from its histograms' bucket deltas), s",
            labels=[*labels, "latency", "quantile"],
        )
        for e in live:
            for latency, q, value in (
                ("ttft", "0.5", e.ttft_p50_s),
                ("ttft", "0.95", e.ttft_p95_s),
                ("ttft", "0.99", e.ttft_p99_s),
                ("tpot", "0.5", e.tpot_p50_s),
                ("tpot", "0.95", e.tpot_p95_s),
                ("tpot", "0.99", e.tpot_p99_s),
            ):
                if value is not None:
                    quantiles.add_metric([*key(e), latency, q], value)
        if quantiles.samples:
            yield quantiles
        counters = (
            ("engine_generation_tokens", "Output tokens generated", lambda e: e.generation_tokens_total),
            ("engine_prompt_tokens", "Prompt tokens processed", lambda e: e.prompt_tokens_total),
            ("engine_preemptions", "Requests preempted", lambda e: e.preemptions_total),
        )
        for name, text, read in counters:
            counter = CounterMetricFamily(f"{PREFIX}_{name}", text, labels=labels)
            yield from _filled(counter, [(key(e), read(e)) for e in live])


def make_registry(collector: SnapshotCollector, *, process_metrics: bool = True) -> CollectorRegistry:
    """A registry with the snapshot collector, and this process's own CPU and memory (what exporting costs)."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(namespace=PREFIX + "_exporter", registry=registry)
    return registry


def parse_listen(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'127.0.0.1:9400', ':9400', '9400' (this machine only), '[::1]:9400', '::1' or a bare host -> (host, port).
    Raises ValueError in words."""
    text = text.strip()
    host, port_text = text, ""
    if text.isdigit():  # a port alone: on the loopback address, like the default
        host, port_text = "", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"--listen {text!r}: an IPv6 address needs its closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"--listen {text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text and not _bare_ipv6(text):
        raise ValueError(f"--listen {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    host = host or "127.0.0.1"
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"--listen {text!r}: the port must be a number from 0 (any free one) to 65535")
    return host, int(port_text)


def _bare_ipv6(text: str) -> bool:
    """An IPv6 address written without brackets and without a port, where it cannot be read as ADDRESS:PORT
    ('::ffff:127.0.0.1', '::1', 'fe80::1'; not '::1:9400', which is both)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    address, _, last = text.rpartition(":")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return True
    return not last.isdigit()


def dashboard_json() -> str:
    """The Grafana dashboard shipped beside the exporter (every panel a query of the series above)."""
    from importlib.resources import files

    return files("tuner.telemetry").joinpath("grafana/infertop-dashboard.json").read_text()


def alert_rules() -> str:
    """The Prometheus alerting rules shipped beside the exporter (promtool-tested)."""
    from importlib.resources import files

    return files("tuner.telemetry").joinpath("prometheus/infertop-alerts.yml").read_text()


class Exporter:
    """The sampler, the collector and the HTTP server together: ``start`` opens the machine and serves
    ``/metrics``, ``/snapshot.json`` and an index at ``/`` (404 elsewhere); ``stop`` ends both. Raises OSError
    from ``start`` when the address cannot be bound, ValueError from here for an interval that is not a
    positive number of seconds.

    ``web_config`` locks it (TLS, client certificates, basic auth); ``request_timeout_s``, ``workers`` and
    ``max_connections`` bound what a peer can hold (:mod:`tuner.telemetry.webserver`)."""

    def __init__(
        self,
        sampler: Sampler,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        version: str = "",
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        web_config: WebConfig | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"the sampling interval must be a positive number of seconds, not {interval_s}")
        self.sampler = sampler
        self.host, self.port = host, port
        self.version = version
        self.web_config = web_config or WebConfig()
        self.request_timeout_s = request_timeout_s
        self.workers = workers
        self.max_connections = max_connections
        self.collector = SnapshotCollector(
            lambda: sampler.latest,
            lambda: sampler.info,
            version=version,
            # Finite whatever the interval: a sampler that died turns every GPU down within it.
            stale_after_s=max(STALE_AFTER_S, 3 * interval_s),
            clock=clock,
        )
        self.registry = make_registry(self.collector)
        self.server: WebServer | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.web_config.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def snapshot_json(self) -> bytes:
        """The latest reading and the machine, as the remote view reads them (``/snapshot.json``): the same
        readings as ``/metrics``, lossless and about 30 times cheaper to parse. What can be secret stays out:
        command lines and the users owning processes (process names and pids stay, as on ``/metrics``), and
        the credentials of inference-server URLs."""
        snap = self.sampler.latest
        if snap is not None:
            gpus = tuple(
                dataclasses.replace(
                    g,
                    processes=tuple(
                        dataclasses.replace(p, command=None, user=None) for p in g.processes or ()
                    ),
                )
                if g.processes
                else g
                for g in snap.gpus
            )
            engines = tuple(
                dataclasses.replace(
                    e, url=redact_url(e.url), error=redact_text(e.error) if e.error is not None else None
                )
                for e in snap.engines
            )
            snap = dataclasses.replace(snap, gpus=gpus, engines=engines, extra={})
        body = {
            "format": SNAPSHOT_FORMAT,
            "info": to_jsonable(self.sampler.info),
            "snapshot": to_jsonable(snap),
            # How old the reading is by the exporter's own clock: the reader's clock may differ.
            "age_s": None if snap is None else round(self.collector.age_s(snap), 3),
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def index_html(self) -> bytes:
        """``/``: what this is and where the readings are."""
        version = html.escape(self.version or "")
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>infertop exporter</title></head>\n'
            f"<body><h1>infertop exporter {version}</h1>\n<ul>\n"
            '<li><a href="metrics">/metrics</a>: GPU, host and inference-server readings for Prometheus</li>\n'
            '<li><a href="snapshot.json">/snapshot.json</a>: the same readings for infertop --host</li>\n'
            "</ul></body></html>\n"
        ).encode()

    def _app(self) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
        from prometheus_client import make_wsgi_app

        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/snapshot.json":
                body, kind = self.snapshot_json(), "application/json"
                status = "200 OK"
            elif path == "/":
                body, kind = self.index_html(), "text/html; charset=utf-8"
                status = "200 OK"
            else:
                body, kind = (
                    b"404 Not Found: this exporter serves /metrics and /snapshot.json\n",
                    "text/plain",
                )
                status = "404 Not Found"
            start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
            return [body]

        return app

    def start(self, *, sampling: bool = True) -> SystemInfo:
        """Open the machine and serve. ``sampling=False`` leaves the ticks to the caller (tests)."""
        # The address first (a port in use fails before anything starts), then the machine, then serving: the
        # first scrape never sees an unopened machine.
        self.server = WebServer(
            self.host,
            self.port,
            self._app(),
            web_config=self.web_config,
            request_timeout_s=self.request_timeout_s,
            workers=self.workers,
            max_connections=self.max_connections,
        )
        self.port = self.server.port  # port 0: the one the system chose
        try:
            info = self.sampler.open()
            self.sampler.add_listener(self.collector.take)
            if sampling:
                self.sampler.start()
        except BaseException:
            self.stop()
            raise
        self.server.start()
        return info

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.sampler.stop()
