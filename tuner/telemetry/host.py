"""The host the GPUs sit in: CPU, RAM, load (psutil)."""

from __future__ import annotations

import os
import socket

import psutil

from tuner.telemetry.model import HostSample


class HostReader:
    """Reads host telemetry. ``cpu_percent`` is measured between calls, so the first reading primes it."""

    def __init__(self) -> None:
        self._hostname = socket.gethostname()
        self._cpu_count = psutil.cpu_count(logical=True)
        psutil.cpu_percent(interval=None)  # prime: the next call reports usage since now

    def read(self, now_s: float) -> HostSample:
        vm = psutil.virtual_memory()
        try:
            load_1m, load_5m, load_15m = os.getloadavg()
        except OSError:  # not on every platform
            load_1m = load_5m = load_15m = None  # type: ignore[assignment]
        try:
            swap_used: int | None = psutil.swap_memory().used
        except (OSError, RuntimeError):
            swap_used = None
        return HostSample(
            time_s=now_s,
            hostname=self._hostname,
            cpu_pct=psutil.cpu_percent(interval=None),
            cpu_count=self._cpu_count,
            ram_used_bytes=vm.total - vm.available,
            ram_total_bytes=vm.total,
            load_avg_1m=load_1m,
            load_avg_5m=load_5m,
            load_avg_15m=load_15m,
            swap_used_bytes=swap_used,
        )
