"""The executor: runs trials side by side on the node's free GPUs and tells the search as each one ends.

The search asks two things of it: "start this candidate now, if its GPUs are free" (:meth:`Executor.submit`)
and "tell me when one ends" (:meth:`Executor.wait`). Each trial runs on a thread of its own with a
:class:`~tuner.tuning.placement.Placement` taken from the :class:`~tuner.tuning.placement.Node`; whatever becomes
of it (a result, a launch that failed, a crash of the trial code, an interrupt) its GPUs go back to the node and
the search hears of it, so one failing trial never holds GPUs or stops the others.

Ctrl-C reaches only the main thread, which is the one waiting here: :meth:`Executor.wait` then sets the cancel
event (every running phase stops within a fraction of a second and every server is stopped by its trial) and
:meth:`Executor.drain` waits for the trials to end.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tuner.tuning.placement import Node, Placement

__all__ = ["Done", "Executor", "Job"]

R = TypeVar("R")


@dataclass(frozen=True)
class Job:
    """A trial to run: its key, the GPUs its server needs, and why the search picked it."""

    key: str
    gpus_needed: int  # tensor parallelism; the CPU build's one slot takes any value
    why: str = ""


@dataclass(frozen=True)
class Done(Generic[R]):
    """A trial that ended: its result (None: interrupted), or the error its code raised."""

    job: Job
    placement: Placement
    result: R | None
    error: BaseException | None = None
    wall_s: float = 0.0


@dataclass
class Executor(Generic[R]):
    """Runs ``run(job, placement)`` for each submitted job on a thread of its own, at most ``parallel`` at once."""

    node: Node
    run: Callable[[Job, Placement], R | None]
    cancel: threading.Event
    parallel: int = 1
    _done: queue.Queue[Done[R]] = field(default_factory=queue.Queue, init=False)
    _running: dict[str, tuple[Job, Placement, threading.Thread]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.parallel = max(1, self.parallel)

    @property
    def running(self) -> list[Job]:
        return [job for job, _, _ in self._running.values()]

    def placements(self) -> dict[str, Placement]:
        """Running trial key -> its placement."""
        return {key: placement for key, (_, placement, _) in self._running.items()}

    def has_room(self, gpus_needed: int) -> bool:
        """Whether a trial of ``gpus_needed`` GPUs could start now."""
        return len(self._running) < self.parallel and self.node.can_take(gpus_needed)

    def submit(self, job: Job) -> Placement | None:
        """Start ``job`` on free GPUs; None (nothing started) when there is no room for it now."""
        if job.key in self._running or len(self._running) >= self.parallel:
            return None
        placement = self.node.take(job.gpus_needed)
        if placement is None:
            return None
        thread = threading.Thread(
            target=self._work, args=(job, placement), name=f"trial {job.key[:40]}", daemon=True
        )
        self._running[job.key] = (job, placement, thread)
        thread.start()
        return placement

    def _work(self, job: Job, placement: Placement) -> None:
        started = time.monotonic()
        result: R | None = None
        error: BaseException | None = None
        try:
            with _thread_on(placement.client_cpus):
                result = self.run(job, placement)
        except BaseException as exc:
            error = exc
        finally:
            self.node.release(placement)
            self._done.put(Done(job, placement, result, error, time.monotonic() - started))

    def wait(self, timeout_s: float | None = None) -> Done[R] | None:
        """The next trial to end (None: none running, or none ended within ``timeout_s``). A Ctrl-C while waiting
        sets the cancel event and is raised again at once (the second Ctrl-C aborts: a server still starting is
        not waited for; every server is stopped on the way out by the launcher's exit handlers and watchdog)."""
        if not self._running and self._done.empty():
            return None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                if left <= 0:
                    return None
                with contextlib.suppress(queue.Empty):
                    done = self._done.get(timeout=left)
                    self._finish(done)
                    return done
        except KeyboardInterrupt:
            self.cancel.set()
            raise

    def _finish(self, done: Done[R]) -> None:
        entry = self._running.pop(done.job.key, None)
        if entry is not None:
            entry[2].join(timeout=5.0)

    def drain(self) -> list[Done[R]]:
        """Wait for every running trial to end (after a cancel they stop within seconds); what ended."""
        ended: list[Done[R]] = []
        while self._running:
            try:
                done = self._done.get(timeout=0.5)
            except queue.Empty:
                continue
            self._finish(done)
            ended.append(done)
        return ended


@contextlib.contextmanager
def _thread_on(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the calling thread (a trial's load generator) on ``cpus``; Linux pins threads one by one."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
