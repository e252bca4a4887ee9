"""The host the GPUs sit in: CPU, RAM, load, and the host side of GPU processes (psutil)."""

from __future__ import annotations

import os
import socket
from collections.abc import Collection
from typing import Any

import psutil

from tuner.telemetry.model import HostSample

COMMAND_MAX_CHARS = 300


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


class HostProcesses:
    """Host facts of the processes NVML lists on the GPUs: user, name, command line, CPU %, RSS.

    One ``psutil.Process`` is kept per pid between reads, because ``cpu_percent()`` measures since the previous
    call on the same object; a pid no longer asked for is forgotten.
    """

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def read(self, pids: Collection[int]) -> dict[int, dict[str, Any]]:
        """Per pid, the :class:`~tuner.telemetry.model.GpuProcess` fields psutil can fill (``{}`` for a pid not
        visible from here); each field is None where psutil may not read it."""
        facts = {pid: self._read_one(pid) for pid in pids}
        for stale in self._processes.keys() - set(pids):
            del self._processes[stale]
        return facts

    def clear(self) -> None:
        """Forget every process (the next read of each is a first one)."""
        self._processes.clear()

    def _read_one(self, pid: int) -> dict[str, Any]:
        proc = self._processes.get(pid)
        fresh = proc is None or not proc.is_running()  # is_running() also catches a reused pid
        if fresh:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:  # not visible from here (other pid namespace) or already gone
                self._processes.pop(pid, None)
                return {}
            self._processes[pid] = proc
        assert proc is not None
        with proc.oneshot():
            cmdline = _psutil_value(proc.cmdline)
            rss = _psutil_value(proc.memory_info)
            # cpu_percent() compares with the previous call on the same object: the first answer is noise.
            cpu = _psutil_value(proc.cpu_percent)
            return {
                "user": _psutil_value(proc.username),
                "name": _psutil_value(proc.name),
                "command": _command_line(cmdline),
                "cpu_pct": None if fresh else cpu,
                "host_rss_bytes": None if rss is None else rss.rss,
            }


def _command_line(cmdline: list[str] | None) -> str | None:
    if not cmdline:
        return None
    command = " ".join(cmdline)
    return command if len(command) <= COMMAND_MAX_CHARS else command[: COMMAND_MAX_CHARS - 1] + "…"


def _psutil_value(getter: Any) -> Any:
    try:
        return getter()
    except psutil.Error:  # AccessDenied for other users' processes, NoSuchProcess when it just exited
        return None
