"""The host the GPUs sit in: CPU, RAM, load, and the host side of GPU processes (psutil)."""

from __future__ import annotations

import glob
import os
import socket
from collections.abc import Collection
from typing import Any

import psutil

from tuner.redact import redact_argv
from tuner.telemetry.foreign import MAX_TEXT
from tuner.telemetry.model import HostSample

COMMAND_MAX_CHARS = MAX_TEXT
"""As long as a replay or another host's view keeps text, so a recording replays as it was recorded."""


class HostReader:
    """Reads host telemetry. ``cpu_percent`` is measured between calls, so the first reading primes it."""

    def __init__(self, hostname: str | None = None) -> None:
        self._hostname = hostname or socket.gethostname()
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
    """Host facts of the processes NVML lists on the GPUs: user, name, command line (secrets masked), CPU %,
    RSS.

    NVML gives pids as the driver sees them, in the host's PID namespace. Inside a container the same number
    can name an unrelated process (or none), so a pid's facts are attached only once it is verified to hold
    the GPU here: one of its open files is a ``/dev/nvidia*`` device (checked once per process). A pid that
    does not is marked ``host_verified=False`` and gets no facts; one whose files may not be read (another
    user's) keeps its facts with ``host_verified=None``.

    One ``psutil.Process`` is kept per pid between reads, because ``cpu_percent()`` measures since the previous
    call on the same object; a pid no longer asked for is forgotten. User names are cached by uid.
    """

    def __init__(self, proc_root: str = "/proc", dev_root: str = "/dev") -> None:
        self._proc_root = proc_root
        self._dev_root = dev_root
        # Without NVIDIA device files (a scripted driver, a replay) no pid can be verified, nor refuted.
        self._can_verify = bool(glob.glob(os.path.join(dev_root, "nvidia[0-9]*")))
        self._processes: dict[int, psutil.Process] = {}
        self._verified: dict[int, bool | None] = {}
        self._users: dict[int, str | None] = {}

    def read(self, pids: Collection[int]) -> dict[int, dict[str, Any]]:
        """Per pid, the :class:`~tuner.telemetry.model.GpuProcess` fields psutil can fill (``{}`` for a pid not
        visible from here); each field is None where psutil may not read it."""
        facts = {pid: self._read_one(pid) for pid in pids}
        for stale in self._processes.keys() - set(pids):
            del self._processes[stale]
            self._verified.pop(stale, None)
        return facts

    def clear(self) -> None:
        """Forget every process (the next read of each is a first one)."""
        self._processes.clear()
        self._verified.clear()

    def _read_one(self, pid: int) -> dict[str, Any]:
        proc = self._processes.get(pid)
        fresh = proc is None or not proc.is_running()  # is_running() also catches a reused pid
        if fresh:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:  # not visible from here (other pid namespace) or already gone
                self._processes.pop(pid, None)
                return {"host_verified": False} if self._can_verify else {}
            self._processes[pid] = proc
            self._verified[pid] = (
                holds_gpu(pid, self._proc_root, self._dev_root) if self._can_verify else None
            )
        assert proc is not None
        verified = self._verified.get(pid)
        if verified is False:  # a pid of another namespace: this process is not the GPU's
            return {"host_verified": False}
        with proc.oneshot():
            cmdline = _psutil_value(proc.cmdline)
            rss = _psutil_value(proc.memory_info)
            # cpu_percent() compares with the previous call on the same object: the first answer is noise.
            cpu = _psutil_value(proc.cpu_percent)
            uids = _psutil_value(proc.uids)
            return {
                "user": self._user(proc, uids.real if uids is not None else None),
                "name": _psutil_value(proc.name),
                "command": _command_line(cmdline),
                "cpu_pct": None if fresh else cpu,
                "host_rss_bytes": None if rss is None else rss.rss,
                "host_verified": verified,
            }

    def _user(self, proc: psutil.Process, uid: int | None) -> str | None:
        if uid is None:
            return _psutil_value(proc.username)
        if uid not in self._users:
            self._users[uid] = _psutil_value(proc.username)  # a passwd lookup: once per uid, not per read
        return self._users[uid]


def holds_gpu(pid: int, proc_root: str = "/proc", dev_root: str = "/dev") -> bool | None:
    """Whether process ``pid`` has a ``/dev/nvidia*`` device open; None when that cannot be told: its files may
    not be read, or this machine has no NVIDIA device files at all (a scripted driver, a replay)."""
    if not glob.glob(os.path.join(dev_root, "nvidia[0-9]*")):
        return None
    fd_dir = os.path.join(proc_root, str(pid), "fd")
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        return None
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fd_dir, name)).startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def _command_line(cmdline: list[str] | None) -> str | None:
    """The command line with its secrets masked, cut to :data:`COMMAND_MAX_CHARS`.

    Masked here, at the source, so that no snapshot (nor anything made of one: a recording, the exporter, the
    screen) ever holds an ``--api-key`` value. Masked per argument, before joining (an argument may hold
    spaces) and before cutting (a cut secret would no longer look like one).
    """
    if not cmdline:
        return None
    command = " ".join(redact_argv(cmdline))
    return command if len(command) <= COMMAND_MAX_CHARS else command[: COMMAND_MAX_CHARS - 1] + "…"


def _psutil_value(getter: Any) -> Any:
    try:
        return getter()
    except psutil.Error:  # AccessDenied for other users' processes, NoSuchProcess when it just exited
        return None
