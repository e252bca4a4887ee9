"""Stopping a server an earlier process left running (``infertop tune --resume`` after the tuner was killed).

The trial store records each server's pid (also its process group: servers start in a session of their own)
and the process's start time. A pid is not reused while a process group of that id still has members, so
processes in that group are the server's; a live leader must also have the recorded start time, so that a
recycled pid is never taken for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

START_TIME_SLACK_S = 1.0


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes whose process group is ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def is_ours(pid: int, create_time: float | None) -> bool:
    """Whether the group ``pid`` still holds the server that was recorded."""
    members = group_members(pid)
    if not members:
        return False
    leader = next((p for p in members if p.pid == pid), None)
    if leader is None or create_time is None:
        return True  # the leader is gone but its group lives on: only the server's processes can be in it
    with contextlib.suppress(psutil.Error):
        return abs(leader.create_time() - create_time) <= START_TIME_SLACK_S
    return False


def stop_leftover(pid: int, create_time: float | None, *, timeout_s: float = 30.0) -> bool:
    """Stop the recorded server's process group: SIGTERM, then SIGKILL after ``timeout_s``. Returns whether
    there was anything to stop."""
    if not is_ours(pid, create_time):
        return False
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_members(pid):
                return True
            time.sleep(0.1)
    return True


def create_time_of(pid: int) -> float | None:
    with contextlib.suppress(psutil.Error):
        return float(psutil.Process(pid).create_time())
    return None
