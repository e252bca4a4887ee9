"""Keep the load generator and the server it measures off each other's CPU cores.

On a small host (vLLM's CPU build, or a box with a handful of cores) the benchmark client and the server
compete for the same cores: the client's measured latencies then include time the server's OpenMP threads
held its core, and the server runs slower than it would alone. :func:`plan_cpus` decides which cores each gets,
:func:`spawn_affinity` starts the server on its cores (its children inherit them), and :func:`pin_process`
keeps this process, the client, on its own::

    plan = plan_cpus("auto", cpu_build=True)           # 8 cores: server 0-6, client 7
    spec = ServerSpec(model, cpus=plan.server, env={"VLLM_CPU_OMP_THREADS_BIND": cpu_list(plan.server)})
    with pin_process(plan.client), VllmServer(spec) as server:
        run_load(server.url)

Linux only (``os.sched_setaffinity``); elsewhere nothing is pinned and the plan says so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass

# Up to this many cores the client and the server share too few to leave each its own.
SMALL_HOST_MAX_CORES = 8


@dataclass(frozen=True)
class CpuPlan:
    """Which cores the server and the client may run on (None: not pinned), and a line for people on why."""

    server: frozenset[int] | None
    client: frozenset[int] | None
    note: str


def plan_cpus(mode: str, *, cpu_build: bool, available: Collection[int] | None = None) -> CpuPlan:
    """Split the cores this process may use between the server and the client.

    ``mode`` is ``"off"``, ``"auto"`` (pin only on the CPU build of vLLM or a host of at most
    :data:`SMALL_HOST_MAX_CORES` cores: the client gets the highest core, the server the others) or
    ``"SERVER:CLIENT"`` with two cpu lists such as ``"0-2:3"``. ``available`` defaults to this process's
    affinity.

    Raises:
        ValueError: an unknown mode or a bad explicit split (one line for people).
    """
    mode = mode.strip()
    if mode == "off":
        return CpuPlan(None, None, "cores not pinned (off)")
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            if mode == "auto":
                return CpuPlan(None, None, "cores not pinned: this system cannot pin processes to cores")
            raise ValueError("cannot pin the server and the client to cores: this system does not support it")
        available = os.sched_getaffinity(0)
    cores = frozenset(available)
    if mode == "auto":
        return _auto_plan(cores, cpu_build=cpu_build)
    if ":" not in mode:
        raise ValueError(f"cpu split {mode!r}: expected off, auto or SERVER:CLIENT cpu lists such as 0-2:3")
    server_text, client_text = mode.split(":", 1)
    server = parse_cpu_list(server_text, what="server")
    client = parse_cpu_list(client_text, what="client")
    if server & client:
        raise ValueError(f"cpu split {mode!r}: server and client share cores {cpu_list(server & client)}")
    outside = (server | client) - cores
    if outside:
        raise ValueError(
            f"cpu split {mode!r}: cores {cpu_list(outside)} are not available (this process may use "
            f"{cpu_list(cores) or 'none'})"
        )
    return CpuPlan(server, client, f"server on {_cores(server)}, client on {_cores(client)} (as asked)")


def _auto_plan(cores: frozenset[int], *, cpu_build: bool) -> CpuPlan:
    count = len(cores)
    if count < 2:
        return CpuPlan(
            None, None, f"cores not pinned: {count} core{'' if count == 1 else 's'}, nothing to split"
        )
    if not cpu_build and count > SMALL_HOST_MAX_CORES:
        return CpuPlan(
            None, None, f"{count} cores: the client and the server have cores of their own (nothing pinned)"
        )
    client = frozenset({max(cores)})
    server = cores - client
    why = "the CPU build of vLLM computes on the cores" if cpu_build else f"only {count} cores"
    return CpuPlan(
        server,
        client,
        f"server on {_cores(server)}, client on {_cores(client)} ({why}: they would compete)",
    )


def parse_cpu_list(text: str, *, what: str = "cpu list") -> frozenset[int]:
    """Cores from text such as ``"0-2,5"`` (the Linux cpu-list format).

    Raises:
        ValueError: empty, malformed or a range that runs backwards; the message starts with ``what``.
    """
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError(f"{what} {text!r}: {part!r} is not a core number or a range like 0-3") from None
        if low < 0 or high < low:
            raise ValueError(f"{what} {text!r}: {part!r} is not a range of core numbers")
        cores.update(range(low, high + 1))
    if not cores:
        raise ValueError(f"{what} {text!r}: no cores given")
    return frozenset(cores)


def cpu_list(cpus: Collection[int]) -> str:
    """Cores as compact text, runs of consecutive cores as ranges: ``{0, 1, 2, 5}`` -> ``"0-2,5"``.

    The format of ``VLLM_CPU_OMP_THREADS_BIND``, ``taskset -c`` and ``/sys/devices/system/cpu/online``.
    """
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    for index, core in enumerate(ordered):
        if index + 1 < len(ordered) and ordered[index + 1] == core + 1:
            continue  # the run goes on
        first = ordered[start]
        parts.append(str(first) if first == core else f"{first}-{core}")
        start = index + 1
    return ",".join(parts)


@contextlib.contextmanager
def pin_process(cpus: Collection[int] | None) -> Iterator[None]:
    """Run every thread of this process on ``cpus`` for the duration; each thread's old cores come back after.

    Threads started meanwhile inherit the cores of the thread that started them (so those started inside
    are pinned, and stay so). ``cpus`` None pins nothing.

    Raises:
        ValueError: a core this process may not use (one line for people); nothing was changed then.
    """
    if cpus is None:
        yield
        return
    target = _checked(cpus)
    previous: dict[int, set[int]] = {}
    try:
        # A thread being started while we pin may copy its creator's old mask: go again until no new one shows.
        while True:
            new_threads = [tid for tid in _thread_ids() if tid not in previous]
            if not new_threads:
                break
            for tid in new_threads:
                try:
                    previous[tid] = os.sched_getaffinity(tid)
                    _set_exactly(tid, target)
                except ProcessLookupError:
                    previous[tid] = set()  # ended meanwhile; do not look at it again
        yield
    finally:
        for tid, cores in previous.items():
            if cores:
                with contextlib.suppress(OSError):  # the thread ended meanwhile
                    os.sched_setaffinity(tid, cores)


@contextlib.contextmanager
def spawn_affinity(cpus: Collection[int] | None) -> Iterator[None]:
    """Run the calling thread on ``cpus`` for the duration, so that a process it starts (and everything that
    one starts) inherits them; the thread's old cores come back after. Other threads are left alone.

    ``cpus`` None changes nothing.

    Raises:
        ValueError: a core this process may not use (one line for people).
    """
    if cpus is None:
        yield
        return
    target = _checked(cpus)
    previous = os.sched_getaffinity(0)
    try:
        _set_exactly(0, target)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, previous)


def _checked(cpus: Collection[int]) -> frozenset[int]:
    """``cpus`` as a set, if there is one and this system can pin."""
    target = frozenset(cpus)
    if not target:
        raise ValueError("no cores given to run on")
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cannot pin to cores: this system does not support it")
    return target


def _set_exactly(tid: int, cpus: frozenset[int]) -> None:
    """Pin thread ``tid`` (0: the calling one) to exactly ``cpus``.

    The kernel quietly drops the cores a cgroup's cpuset does not allow (and fails only where none is left), so
    the result is read back: asking for cores one may not use is an error, never a silently narrower pin.

    Raises:
        ValueError: some of ``cpus`` are not available to this process (the thread's cores are then unchanged).
        ProcessLookupError: the thread ended.
    """
    before = os.sched_getaffinity(tid)
    try:
        os.sched_setaffinity(tid, cpus)
    except ProcessLookupError:
        raise
    except OSError as error:
        raise ValueError(f"cannot run on cores {cpu_list(cpus)}: {error.strerror}") from None
    got = os.sched_getaffinity(tid)
    if got != cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, before)
        raise ValueError(
            f"cannot run on cores {cpu_list(cpus - got)}: they are not available to this process"
        )


def _thread_ids() -> list[int]:
    """Kernel ids of this process's threads (0, the calling thread, where /proc cannot say)."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _cores(cpus: Collection[int]) -> str:
    """``"core 0"`` or ``"cores 0-2"``."""
    return f"core{'s' if len(cpus) > 1 else ''} {cpu_list(cpus)}"
