"""A clear, one-line statement of why there are no GPU readings, instead of a traceback."""

from __future__ import annotations

from textual.widgets import Static

from tuner.telemetry.model import GpuState

HINTS: dict[GpuState, str] = {
    GpuState.NO_DRIVER: "Install the NVIDIA driver to see GPUs. Host telemetry below is live.",
    GpuState.NO_GPU: "The NVIDIA driver is loaded but reports no GPU (check `nvidia-smi` and MIG; NVML ignores "
    "CUDA_VISIBLE_DEVICES). Host telemetry below is live.",
    GpuState.PERMISSION_DENIED: "Run as a user allowed to open /dev/nvidia* (or root). Host telemetry below is live.",
    GpuState.DRIVER_MISMATCH: "The driver's kernel module and library differ: a reboot usually fixes it.",
    GpuState.ERROR: "Host telemetry below is live.",
}


class StateBanner(Static):
    """Shown above the GPU area when GPUs cannot be read, or stopped answering."""

    DEFAULT_CSS = """
    StateBanner {
        border: round $warning;
        color: $text;
        padding: 0 1;
        height: auto;
    }
    StateBanner.error { border: round $error; }
    """
