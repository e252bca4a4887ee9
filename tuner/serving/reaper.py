"""A watchdog that stops this process's vLLM servers when this process dies, by SIGKILL included.

The launcher stops its servers on a normal exit, on an exception, on Ctrl-C and on SIGTERM/SIGHUP, but a
process killed with SIGKILL (the OOM killer, ``kill -9``, a crashed interpreter) runs no code at all: its vLLM
servers, each in a process group of its own, would live on and keep their GPU memory. So the first server
launched starts one small watchdog process per Python process::

    parent --(pipe: "+PGID\\n" / "-PGID\\n")--> watchdog (python -c, its own session)

The parent holds the pipe's only write end. The kernel closes it however the parent ends, so the watchdog
reads end-of-file exactly when the parent is gone (or closed the pipe); it then sends SIGTERM to every process
group still registered, SIGKILL to those left after :data:`TERM_GRACE_S`, and exits. A server stopped
normally is unregistered first, so the watchdog never signals a group the launcher already took down.

The write end is not inheritable (``os.pipe``'s default), so no vLLM process ever holds it and keeps the
watchdog waiting; a child made by ``os.fork`` (multiprocessing) does inherit it, and closes its copy right
after the fork. Such a child starts its own watchdog if it launches servers of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

# How long the watchdog lets the groups it stops run after SIGTERM before it sends SIGKILL; vLLM stops its
# engine and workers in a few seconds. Read when a watchdog starts (tests shorten it).
TERM_GRACE_S = 10.0

# The watchdog runs as ``python -I -S -c CODE GRACE_S`` and may import nothing but the standard library. It
# reads raw bytes (not sys.stdin), so no buffering or decoding can stand between a line and its effect.
_WATCHDOG_CODE = """\
import os, signal, sys, time
for name in ("SIGINT", "SIGHUP", "SIGPIPE", "SIGTSTP", "SIGTTIN", "SIGTTOU"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
TERM_GRACE_S = float(sys.argv[1])
groups = set()
pending = b""
while True:
    try:
        data = os.read(0, 4096)
    except OSError:
        data = b""
    if not data:
        break
    *lines, pending = (pending + data).split(b"\\n")
    for line in lines:
        try:
            pgid = int(line[1:])
        except ValueError:
            continue
        if line[:1] == b"+" and pgid > 1:
            groups.add(pgid)
        elif line[:1] == b"-":
            groups.discard(pgid)

def signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass

def group_alive(pgid):
    # A zombie still counts for killpg(pgid, 0) until its new parent reaps it, which some container inits
    # never do; a zombie holds no memory and no port, so only live members count, where /proc says so.
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open("/proc/" + pid + "/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False

if groups:
    for pgid in groups:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline and any(group_alive(pgid) for pgid in groups):
        time.sleep(0.1)
    for pgid in groups:
        if group_alive(pgid):
            signal_group(pgid, signal.SIGKILL)
"""


@dataclass
class _Watchdog:
    """The running watchdog process and this process's end of its pipe."""

    process: subprocess.Popen[bytes]
    write_fd: int


_lock = threading.Lock()
_watchdog: _Watchdog | None = None
_owner_pid = os.getpid()  # the process whose watchdog and groups the state below describes
_groups: set[int] = set()  # the groups registered with the watchdog, to register again should it be restarted


def watch(pgid: int) -> bool:
    """Register the process group ``pgid`` to be stopped if this process dies before :func:`forget` is called.

    Starts the watchdog on first use, or again if it died. Returns False where no watchdog could be started
    (the group is then protected only by the launcher's own exit handlers); never raises for that.
    """
    if pgid <= 1:
        raise ValueError(f"not a process group a watchdog may signal: {pgid}")
    global _watchdog
    with _lock:
        _adopt_if_forked()
        _groups.add(pgid)
        if _watchdog is not None and _send(_watchdog, f"+{pgid}\n"):
            return True
        _close(_watchdog)
        _watchdog = _start()
        if _watchdog is None:
            return False
        # A restarted watchdog knows nothing: tell it every group still registered.
        if _send(_watchdog, "".join(f"+{group}\n" for group in sorted(_groups))):
            return True
        _close(_watchdog)
        _watchdog = None
        return False


def forget(pgid: int) -> None:
    """Unregister ``pgid``: its group was stopped, and the watchdog must never signal that id again."""
    with _lock:
        _adopt_if_forked()
        _groups.discard(pgid)
        if _watchdog is not None:
            _send(_watchdog, f"-{pgid}\n")  # a watchdog that is gone has nothing to forget


def watched_groups() -> frozenset[int]:
    """The process groups this process has registered and not forgotten (for tests and diagnostics)."""
    with _lock:
        _adopt_if_forked()
        return frozenset(_groups)


def watchdog_pid() -> int | None:
    """The pid of this process's watchdog; None before the first :func:`watch` (or if it could not start)."""
    with _lock:
        _adopt_if_forked()
        return _watchdog.process.pid if _watchdog is not None else None


def _start() -> _Watchdog | None:
    if not sys.executable:
        return None  # an embedded interpreter with no python to run
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG_CODE, repr(float(TERM_GRACE_S))],
            stdin=read_fd,
            # Never hold the caller's stdout/stderr: a reader of our output would wait for the watchdog's end.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            # Its own session: a terminal's Ctrl-C or hang-up meant for us never reaches it.
            start_new_session=True,
        )
    except OSError:
        os.close(write_fd)
        return None
    finally:
        os.close(read_fd)
    return _Watchdog(process, write_fd)


def _send(watchdog: _Watchdog, text: str) -> bool:
    """Write ``text`` to the watchdog; False where it is gone (the pipe is broken)."""
    if watchdog.process.poll() is not None:
        return False
    try:
        os.write(watchdog.write_fd, text.encode("ascii"))  # short lines: one atomic write each
    except OSError:
        return False
    return True


def _close(watchdog: _Watchdog | None) -> None:
    if watchdog is not None:
        with contextlib.suppress(OSError):
            os.close(watchdog.write_fd)
        watchdog.process.poll()  # reap it if it has ended


def _adopt_if_forked() -> None:
    """In a forked child, drop the parent's watchdog and groups: they are the parent's, not ours."""
    global _owner_pid
    if os.getpid() != _owner_pid:
        _forget_parent_state()
        _owner_pid = os.getpid()


def _forget_parent_state() -> None:
    global _watchdog
    if _watchdog is not None:
        # Our copy of the write end would keep the parent's watchdog from seeing the parent die.
        with contextlib.suppress(OSError):
            os.close(_watchdog.write_fd)
    _watchdog = None
    _groups.clear()


def _after_fork_in_child() -> None:
    global _lock, _owner_pid
    _lock = threading.Lock()  # another thread may have held it at the fork
    _forget_parent_state()
    _owner_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
