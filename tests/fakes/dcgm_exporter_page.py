"""A dcgm-exporter ``/metrics`` page in its real format, for GPUs CI does not have, and a server for it.

The format is dcgm-exporter's own (NVIDIA/dcgm-exporter at 4.5.3-4.8.2):

- internal/pkg/rendermetrics/render_metrics.go ``gpuMetricsFormat``: per counter ``# HELP`` and ``# TYPE``
  lines, then one series per GPU with the labels ``gpu``, ``UUID``, ``pci_bus_id``, ``device``, ``modelName``,
  on a MIG instance ``GPU_I_PROFILE`` and ``GPU_I_ID``, ``Hostname`` (renamed ``hostname`` in May 2026, #655),
  then the label fields (``DCGM_FI_DRIVER_VERSION``) and the attributes (``err_code``/``err_msg`` on XID
  errors; ``container``, ``namespace``, ``pod`` under Kubernetes), each group in key order as Go's templates
  range over maps; no spaces after commas;
- internal/pkg/collector/gpu_collector.go ``toString``: doubles as ``%f``, integers as ``%d``; ``toMetric``:
  ``device`` is ``nvidia<gpu>``, a MIG instance's series carries its parent GPU's ``gpu`` and ``UUID``;
- internal/pkg/devicemonitoring/device_monitoring.go: in the default flex mode (``-d f``) a GPU with MIG
  instances is written per instance only, with no whole-GPU series;
- internal/pkg/transformation/kubernetes.go: with ``-k``, a GPU that pods use gets one copy of each series per
  pod (the GPU's value in each), a GPU no pod uses keeps its plain series;
- etc/default-counters.csv and etc/dcp-metrics-included.csv: the counters, their types and help texts. SM
  active and SM occupancy are commented out there; NVLink bytes are in neither file (an operator adds them).
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# (field name, Prometheus type, help text, value kind) in the order of etc/default-counters.csv.
DEFAULT_COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", "int"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", "int"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "int"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "double"),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        "int",
    ),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "int"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", "int"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", "int"),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", "int"),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", "int"),
)
DCP_COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active.", "double"),
    ("DCGM_FI_PROF_SM_ACTIVE", "gauge", "The ratio of cycles an SM has at least 1 warp assigned.", "double"),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "gauge", "The ratio of number of warps resident on an SM.", "double"),
    (
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        "double",
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        "double",
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.",
        "int",
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.",
        "int",
    ),
    # Not in the shipped CSVs: the help text is what an operator's own CSV would say.
    (
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "gauge",
        "The rate of data transmitted over NVLink in bytes per second.",
        "int",
    ),
    (
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
        "gauge",
        "The rate of data received over NVLink in bytes per second.",
        "int",
    ),
)
# The DCP set etc/default-counters.csv enables (SM active/occupancy and NVLink are commented out or absent).
SHIPPED_DCP = (
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE",
    "DCGM_FI_PROF_PCIE_TX_BYTES",
    "DCGM_FI_PROF_PCIE_RX_BYTES",
)
ALL_DCP = tuple(name for name, *_ in DCP_COUNTERS)


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str = "default"
    container: str = "vllm"


@dataclass(frozen=True)
class MigInstance:
    gpu_instance_id: int  # NVML's GPU instance id: the GPU_I_ID label
    profile: str  # "3g.40gb": the GPU_I_PROFILE label
    values: dict[str, float] = field(default_factory=dict)  # DCP counter name -> value on this instance


@dataclass(frozen=True)
class PageGpu:
    """One GPU as dcgm-exporter sees it; ``values`` maps any counter name to its value (ratios 0-1, byte rates
    in bytes/s); a DCP counter missing from it is left off the page, as dcgm-exporter skips DCGM's blanks."""

    index: int
    uuid: str
    model: str
    pci_bus_id: str
    values: dict[str, float] = field(default_factory=dict)
    mig: tuple[MigInstance, ...] = ()  # set: flex mode writes this GPU per instance only
    pods: tuple[Pod, ...] = ()  # Kubernetes: the pods using it (one copy of each series per pod)


def _uuid(n: int) -> str:
    return f"GPU-{n:08x}-5c1d-4e2f-9a3b-{0x1234567890AB + n:012x}"


def l4_gpus(n: int = 2, **values: float) -> list[PageGpu]:
    """``n`` L4s decoding: DRAM active 0.62, SM active 0.41 unless ``values`` (counter suffix -> value) says."""
    return [
        PageGpu(i, _uuid(i), "NVIDIA L4", f"00000000:{0x31 + i:02X}:00.0", _dcp(dict(values), i))
        for i in range(n)
    ]


def a100_gpu(index: int = 0, **values: float) -> PageGpu:
    return PageGpu(index, _uuid(index), "NVIDIA A100-SXM4-80GB", "00000000:07:00.0", _dcp(dict(values), 0))


def h100_gpu(index: int = 0, **values: float) -> PageGpu:
    return PageGpu(index, _uuid(index), "NVIDIA H100 80GB HBM3", "00000000:18:00.0", _dcp(dict(values), 0))


def _dcp(overrides: dict[str, float], i: int) -> dict[str, float]:
    values = {
        "DCGM_FI_DEV_SM_CLOCK": 2040,
        "DCGM_FI_DEV_MEM_CLOCK": 6250,
        "DCGM_FI_DEV_GPU_TEMP": 61 + i,
        "DCGM_FI_DEV_POWER_USAGE": 68.25 + i,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 912_345_678 + i,
        "DCGM_FI_DEV_GPU_UTIL": 97,
        "DCGM_FI_DEV_MEM_COPY_UTIL": 58,
        "DCGM_FI_DEV_XID_ERRORS": 0,
        "DCGM_FI_DEV_FB_FREE": 1203,
        "DCGM_FI_DEV_FB_USED": 21360,
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.97,
        "DCGM_FI_PROF_SM_ACTIVE": 0.41 + 0.01 * i,
        "DCGM_FI_PROF_SM_OCCUPANCY": 0.18,
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.23,
        "DCGM_FI_PROF_DRAM_ACTIVE": 0.62 + 0.01 * i,
        "DCGM_FI_PROF_PCIE_TX_BYTES": 41_943_040 + i,
        "DCGM_FI_PROF_PCIE_RX_BYTES": 83_886_080 + i,
        "DCGM_FI_PROF_NVLINK_TX_BYTES": 0,
        "DCGM_FI_PROF_NVLINK_RX_BYTES": 0,
    }
    for key, value in overrides.items():
        values["DCGM_FI_PROF_" + key.upper()] = value
    return values


def _number(value: float, kind: str) -> str:
    return f"{int(value)}" if kind == "int" else f"{value:f}"  # gpu_collector.go toString: %d, %f


def exporter_page(
    gpus: Sequence[PageGpu],
    *,
    dcp: Sequence[str] = ALL_DCP,
    hostname: str | None = "gpu-node-01",
    hostname_label: str = "Hostname",
    driver_version: str = "550.54.15",
    uuid_label: str = "UUID",
) -> str:
    """The page dcgm-exporter serves for ``gpus`` with the default counters plus the DCP counters ``dcp``
    (``()``: a counters CSV without the DCP set). ``hostname=None`` is ``-n`` (no hostname label);
    ``uuid_label="uuid"`` is ``-o`` (the 1.x namespace)."""
    lines: list[str] = []
    for name, prom_type, help_text, kind in DEFAULT_COUNTERS + tuple(c for c in DCP_COUNTERS if c[0] in dcp):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {prom_type}")
        for gpu in gpus:
            for labels, value in _series(gpu, name, hostname, hostname_label, driver_version, uuid_label):
                lines.append(f"{name}{{{labels}}} {_number(value, kind)}")
    return "\n".join(lines) + "\n"


def _series(
    gpu: PageGpu, name: str, hostname: str | None, hostname_label: str, driver: str, uuid_label: str
) -> Iterator[tuple[str, float]]:
    head = (
        f'gpu="{gpu.index}",{uuid_label}="{gpu.uuid}",pci_bus_id="{gpu.pci_bus_id}",device="nvidia{gpu.index}",'
        f'modelName="{gpu.model}"'
    )
    tail = f',{hostname_label}="{hostname}"' if hostname else ""
    tail += f',DCGM_FI_DRIVER_VERSION="{driver}"'
    instances: list[tuple[str, float]] = []
    if gpu.mig:
        for inst in gpu.mig:
            if name in inst.values:
                mig = f',GPU_I_PROFILE="{inst.profile}",GPU_I_ID="{inst.gpu_instance_id}"'
                instances.append((head + mig + tail, inst.values[name]))
    elif name in gpu.values:
        instances.append((head + tail, gpu.values[name]))
    for labels, value in instances:
        attrs: dict[str, str] = {}
        if name == "DCGM_FI_DEV_XID_ERRORS":
            attrs = {"err_code": str(int(value)), "err_msg": "No Error"}
        if not gpu.pods:
            yield labels + _attrs(attrs), value
        for pod in gpu.pods:
            with_pod = {**attrs, "container": pod.container, "namespace": pod.namespace, "pod": pod.name}
            yield labels + _attrs(with_pod), value


def _attrs(attrs: dict[str, str]) -> str:
    return "".join(f',{k}="{v}"' for k, v in sorted(attrs.items()))


class ExporterPageServer:
    """Serves ``page`` (changeable while it runs) at ``/metrics`` on 127.0.0.1 and an ephemeral port, as
    dcgm-exporter does on :9400; counts the requests. ``status`` answers other than 200 on demand."""

    def __init__(self, page: str = "") -> None:
        self.page = page
        self.status = 200
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests += 1
                body = server.page.encode() if self.path == "/metrics" else b"404 page not found\n"
                status = server.status if self.path == "/metrics" else 404
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-dcgm-exporter",
            daemon=True,
        )

    def start(self) -> ExporterPageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextlib.contextmanager
def serving_page(page: str) -> Iterator[ExporterPageServer]:
    server = ExporterPageServer(page).start()
    try:
        yield server
    finally:
        server.stop()
