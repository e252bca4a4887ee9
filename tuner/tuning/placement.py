"""Where a trial runs on the node: its GPUs, the CPU cores near them, and its own share of the host.

A :class:`Placement` is what one trial's server and load generator are given: a set of GPUs (the server's
``CUDA_VISIBLE_DEVICES``), the cores its server may use and the cores its load generator may use, taken from the
cores local to those GPUs (NVML's CPU affinity for each GPU, else every core). :class:`Node` hands placements out
and takes them back: trials in parallel never share a GPU, and a server of ``tp`` GPUs gets an aligned block
(GPUs 0-3 or 4-7 for TP 4, the blocks NVLink and the PCIe switches are built around) when one is free.

The CPU build of vLLM is one slot: the whole host, split between the server and the client as
:func:`tuner.serving.affinity.plan_cpus` planned.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from tuner.serving.affinity import CpuPlan, cpu_list

__all__ = ["Node", "Placement", "pack_batch"]


@dataclass(frozen=True)
class Placement:
    """One trial's share of the node."""

    gpus: tuple[int, ...]  # physical GPU indices (the server's CUDA_VISIBLE_DEVICES); () on the CPU build
    server_cpus: frozenset[int] | None = None  # None: not pinned
    client_cpus: frozenset[int] | None = None
    note: str = ""  # how the cores were chosen, for people

    def env(self) -> dict[str, str]:
        """What the server's environment gets: its GPUs, numbered as the driver numbers them."""
        if not self.gpus:
            return {}
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))}

    def label(self) -> str:
        """``"GPU 3"``, ``"GPUs 0-3"``, ``"GPUs 0,2"``, ``"CPU build"``."""
        if not self.gpus:
            return "CPU build"
        if len(self.gpus) == 1:
            return f"GPU {self.gpus[0]}"
        return f"GPUs {cpu_list(self.gpus)}"


@dataclass
class Node:
    """The GPUs (and cores) a tune may use, handed out to trials and taken back; thread-safe.

    ``local_cpus`` maps a GPU to the cores near it (its NUMA node); GPUs without an entry share ``cores``.
    ``cpu_plan`` is the CPU build's (or a small host's) split of the cores between server and client: used
    as it is when there is no GPU.
    """

    gpus: tuple[int, ...]
    cores: frozenset[int] = frozenset()
    local_cpus: Mapping[int, frozenset[int]] = field(default_factory=dict)
    cpu_plan: CpuPlan | None = None
    _free: set[int] = field(default_factory=set, init=False)
    _held_cpu_slot: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.gpus = tuple(sorted(set(self.gpus)))
        self._free = set(self.gpus)

    @property
    def is_cpu(self) -> bool:
        return not self.gpus

    @property
    def size(self) -> int:
        """GPUs on the node (0: the CPU build)."""
        return len(self.gpus)

    def free_gpus(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._free))

    def slots_for(self, tp: int) -> int:
        """How many servers of ``tp`` GPUs the whole node holds at once (1 on the CPU build)."""
        return 1 if self.is_cpu else self.size // tp

    def can_take(self, tp: int) -> bool:
        with self._lock:
            return self._can_take(tp)

    def _can_take(self, tp: int) -> bool:
        return not self._held_cpu_slot if self.is_cpu else len(self._free) >= tp

    def take(self, tp: int) -> Placement | None:
        """A placement of ``tp`` free GPUs (an aligned block when one is free), or None when too few are free."""
        with self._lock:
            if not self._can_take(tp):
                return None
            if self.is_cpu:
                self._held_cpu_slot = True
                plan = self.cpu_plan
                if plan is None:
                    return Placement((), note="cores not pinned")
                return Placement((), plan.server, plan.client, plan.note)
            chosen = self._block(tp)
            self._free -= set(chosen)
            return self._placement(chosen)

    def release(self, placement: Placement) -> None:
        """Give a placement's GPUs back (a finished, failed or interrupted trial)."""
        with self._lock:
            if self.is_cpu:
                self._held_cpu_slot = False
                return
            self._free |= set(placement.gpus) & set(self.gpus)

    def _block(self, tp: int) -> tuple[int, ...]:
        free = sorted(self._free)
        order = list(self.gpus)
        # Aligned blocks first (positions 0..tp-1, tp..2tp-1, ... of the node's GPUs), then GPUs sharing cores.
        for start in range(0, len(order) - tp + 1, tp):
            block = tuple(order[start : start + tp])
            if all(g in self._free for g in block):
                return block
        by_cores: dict[frozenset[int], list[int]] = {}
        for g in free:
            by_cores.setdefault(self.local_cpus.get(g, self.cores), []).append(g)
        for group in sorted(by_cores.values(), key=len):
            if len(group) >= tp:
                return tuple(group[:tp])
        return tuple(free[:tp])

    def _placement(self, gpus: tuple[int, ...]) -> Placement:
        """Cores for a placement: the GPUs' local cores, this placement's share of them (the node's GPUs that
        share those cores share them evenly); the load generator gets a third (at least one), the server the
        rest. Fewer than two cores to share: nothing pinned. An operator's own split (``cpu_plan``) holds for
        every trial as it is."""
        if self.cpu_plan is not None:
            plan = self.cpu_plan
            return Placement(gpus, plan.server, plan.client, plan.note)
        local = frozenset().union(*(self.local_cpus.get(g, self.cores) for g in gpus))
        if not local:
            return Placement(gpus, note="cores not pinned: the host's cores are unknown")
        sharers = [g for g in self.gpus if self.local_cpus.get(g, self.cores) & local]
        ordered = sorted(local)
        share = max(1, len(ordered) * len(gpus) // max(1, len(sharers)))
        index = sorted(sharers).index(gpus[0]) if gpus[0] in sharers else 0
        start = (index * len(ordered) // max(1, len(sharers))) % len(ordered)
        mine = [ordered[(start + i) % len(ordered)] for i in range(share)]
        if len(mine) < 2:
            return Placement(
                gpus, note=f"cores not pinned: {len(ordered)} cores near {len(sharers)} GPUs, under 2 each"
            )
        client_n = max(1, len(mine) // 3)
        client, server = frozenset(mine[:client_n]), frozenset(mine[client_n:])
        return Placement(
            gpus, server, client, f"server on cores {cpu_list(server)}, client on {cpu_list(client)}"
        )


def pack_batch(wanted: Sequence[int], free: int, node_gpus: int) -> list[int]:
    """Which of the wanted trials (their GPU counts, best first) start now on ``free`` GPUs, in order: the best
    first, then the next ones that still fit (a TP-8 trial waits for the whole node while smaller ones fill what
    is free only when it is not first). Returns their positions in ``wanted``. On the CPU build (``node_gpus``
    0) the slot holds one trial."""
    if node_gpus == 0:
        return [0] if wanted and free > 0 else []
    chosen: list[int] = []
    left = free
    for i, tp in enumerate(wanted):
        if tp <= left:
            chosen.append(i)
            left -= tp
        elif i == 0:
            return []  # the best contender waits for its GPUs rather than be overtaken forever
    return chosen


def gpus_local_cpus(infos: Sequence[object], cores: Collection[int]) -> dict[int, frozenset[int]]:
    """GPU index -> the cores near it, from telemetry's ``GpuInfo.local_cpus`` where NVML reported them, limited
    to the cores this process may use."""
    allowed = frozenset(cores)
    found: dict[int, frozenset[int]] = {}
    for info in infos:
        local = getattr(info, "local_cpus", None)
        index = getattr(info, "index", None)
        if isinstance(index, int) and local:
            near = frozenset(local) & allowed
            if near:
                found[index] = near
    return found
