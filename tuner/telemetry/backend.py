"""The small protocol every GPU telemetry source speaks: real NVML, the scripted NVML, or a recording."""

from __future__ import annotations

from typing import Protocol

from tuner.telemetry.model import GpuSample, SystemInfo


class GpuLostError(RuntimeError):
    """NVML stopped answering for the whole machine (driver unloaded, NVML uninitialised)."""


class GpuBackend(Protocol):
    """Reads GPUs. Cheap calls every tick; expensive ones (energy counter, process list) on ``slow`` ticks.

    A backend caches the last expensive readings and repeats them on fast ticks, so every sample is complete.
    A metric the device does not support is None. A single GPU failing sets ``GpuSample.error`` for that GPU;
    only a failure of the whole library raises :class:`GpuLostError`.
    """

    def open(self) -> SystemInfo:
        """Initialise, discover GPUs. Never raises: a machine without GPUs is a state, not an error."""
        ...

    def read(self, now_s: float, *, slow: bool) -> tuple[GpuSample, ...]:
        """One reading of every GPU found by :meth:`open`."""
        ...

    def close(self) -> None:
        """Release the library. Safe to call twice."""
        ...
