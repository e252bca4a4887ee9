"""The node is the unit: a configuration and how it fills the node's GPUs, ranked by what the whole node serves.

An operator's unit is a node of one to eight GPUs and what it costs per hour. A candidate configuration with
tensor parallelism ``tp`` fills a node of ``n`` GPUs as ``n // tp`` independent replicas (for dense models, data
parallelism is replicas); the ``n % tp`` GPUs it leaves idle still cost money and count as lost, as in NVIDIA
aiconfigurator's ``tokens/s/gpu_cluster``. So one server's capacity times its replicas is the node's capacity,
and *that* is what the search, the ranker, the verdict, the report and ``predict --gpus N`` compare:

    8B model on 8 H100s: TP 1 x 8 replicas at 50 req/s each -> 400 req/s for the node
                         TP 8 x 1 replica  at 119 req/s     -> 119 req/s for the node

Beside the node's capacity, the views people compare nodes by: per GPU (over *all* the node's GPUs, idle ones
included), per kW (the GPUs' measured power, or their board power when nothing was measured: said so) and,
given a price per GPU-hour, USD per million output tokens for the whole node.

:class:`NodeCapacity` scales one server's measured :class:`~tuner.tuning.capacity.Capacity` (its bracket: the
highest load that held, the lowest that did not) by the replicas, so that :func:`~tuner.tuning.capacity.beats`
and :func:`~tuner.tuning.capacity.rank` compare layouts with the same rule as servers: one layout beats another
only when its node held a load the other's could not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.tuning.capacity import Capacity
from tuner.tuning.points import Point

__all__ = ["Layout", "NodeCapacity", "NodeFigures", "layout_for", "node_figures", "parse_gpu_list"]


@dataclass(frozen=True, slots=True)
class Layout:
    """``replicas`` servers of ``tp`` GPUs each on a node of ``node_gpus`` GPUs (0: the CPU build, one server)."""

    tp: int
    replicas: int
    node_gpus: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.replicas < 0 or self.node_gpus < 0:
            raise ValueError(f"bad layout: {self.replicas} x TP {self.tp} on {self.node_gpus} GPUs")

    @property
    def gpus_used(self) -> int:
        return self.tp * self.replicas

    @property
    def idle_gpus(self) -> int:
        """GPUs of the node this layout leaves idle (they still cost: they count as lost)."""
        return max(0, self.node_gpus - self.gpus_used)

    @property
    def fits(self) -> bool:
        """At least one replica fits the node (the CPU build always holds one server)."""
        return self.replicas >= 1

    def label(self) -> str:
        """``"8 x TP 1"``, ``"2 x TP 4 (2 GPUs idle)"``, ``"1 server (CPU build)"``."""
        if self.node_gpus == 0:
            return "1 server (CPU build)"
        idle = f" ({self.idle_gpus} GPU{'s' if self.idle_gpus != 1 else ''} idle)" if self.idle_gpus else ""
        return f"{self.replicas} x TP {self.tp}{idle}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "replicas": self.replicas,
            "node_gpus": self.node_gpus,
            "idle_gpus": self.idle_gpus,
            "label": self.label(),
        }


def layout_for(tensor_parallel_size: int | None, node_gpus: int) -> Layout:
    """How a server of ``tensor_parallel_size`` GPUs (None: vLLM's default, 1) fills a node of ``node_gpus``
    GPUs; ``node_gpus`` 0 is the CPU build (one server)."""
    tp = tensor_parallel_size or 1
    if node_gpus == 0:
        return Layout(tp, 1, 0)
    return Layout(tp, node_gpus // tp, node_gpus)


@dataclass(frozen=True)
class NodeCapacity:
    """One server's measured capacity scaled to the node: ``replicas`` such servers side by side.

    It has the parts of :class:`Capacity` that comparing needs (``lo``, ``hi``, ``upper``, ``feasible``,
    ``best``), so :func:`~tuner.tuning.capacity.beats`, ``ties_with`` and ``rank`` take it unchanged. The node's
    figure is a prediction from one replica until the node proof measures every replica loaded together.
    """

    server: Capacity
    replicas: int

    @property
    def objective(self) -> str:
        return self.server.objective

    @property
    def lo(self) -> float | None:
        return None if self.server.lo is None else self.server.lo * self.replicas

    @property
    def hi(self) -> float | None:
        return None if self.server.hi is None else self.server.hi * self.replicas

    @property
    def feasible(self) -> bool:
        return self.server.feasible and self.replicas >= 1

    @property
    def best(self) -> Point | None:
        """The server's best point (its load is per replica)."""
        return self.server.best

    @property
    def ceiling(self) -> Point | None:
        return self.server.ceiling

    def upper(self, resolution: float) -> float:
        return self.server.upper(resolution) * self.replicas

    def describe(self) -> str:
        """``"8 x 2.4 req/s = 19.2 req/s"``; one replica reads as the server's own description."""
        if self.replicas == 1 or self.server.best is None:
            return self.server.describe()
        best = self.server.best.load
        unit = "req/s" if best.open_loop else "users"
        node = best.value * self.replicas
        text = f"{node:.3g} {unit} ({self.replicas} x {best.label()})"
        if self.server.ceiling is not None:
            text += f", {self.replicas} x {self.server.ceiling.load.label()} did not hold"
        return text


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """A layout's figures for the whole node, in the units nodes are compared by."""

    layout: Layout
    capacity: float  # the objective's unit for the node: requests/s or concurrent users
    output_tokens_per_s: float | None  # the node at that capacity
    per_gpu: float | None  # output tokens/s per GPU of the node (idle ones included)
    power_w: float | None  # the GPUs' power at that load (measured, or board power: see power_source)
    power_source: str  # "measured", "board power (not measured)" or "" when unknown
    tokens_per_s_per_kw: float | None
    cost_per_million_tokens: float | None  # USD for the whole node's GPU-hours, None without a price
    price_per_gpu_hour: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.to_dict(),
            "node_capacity": self.capacity,
            "output_tokens_per_s": self.output_tokens_per_s,
            "output_tokens_per_s_per_gpu": self.per_gpu,
            "power_w": self.power_w,
            "power_source": self.power_source,
            "output_tokens_per_s_per_kw": self.tokens_per_s_per_kw,
            "cost_per_million_output_tokens": self.cost_per_million_tokens,
            "price_per_gpu_hour": self.price_per_gpu_hour,
        }


def node_figures(
    layout: Layout,
    server_capacity: float,
    server_tokens_per_s: float | None,
    *,
    server_power_w: float | None = None,
    board_power_w: float | None = None,
    price_per_gpu_hour: float | None = None,
) -> NodeFigures:
    """The node's figures from one server's: capacity and tokens/s times the replicas; per GPU over all the
    node's GPUs; power from the server's measured power times the replicas, else the board power of the GPUs
    used (labelled as not measured); cost from the whole node's GPU-hours.

    Cost per 1M output tokens = price per GPU-hour x the node's GPUs x 1e6 / (tokens/s x 3600), as
    Artificial Analysis computes it; idle GPUs are paid for too.
    """
    replicas = layout.replicas
    capacity = server_capacity * replicas
    tok_s = server_tokens_per_s * replicas if server_tokens_per_s is not None else None
    gpus = layout.node_gpus
    per_gpu = tok_s / gpus if tok_s is not None and gpus > 0 else None
    power: float | None
    if server_power_w is not None and server_power_w > 0:
        power, source = server_power_w * replicas, "measured"
    elif board_power_w is not None and board_power_w > 0 and gpus > 0:
        power, source = board_power_w * layout.gpus_used, "board power (not measured)"
    else:
        power, source = None, ""
    per_kw = tok_s / (power / 1000.0) if tok_s and power else None
    cost = None
    if price_per_gpu_hour is not None and tok_s and gpus > 0:
        cost = price_per_gpu_hour * gpus * 1e6 / (tok_s * 3600.0)
    return NodeFigures(layout, capacity, tok_s, per_gpu, power, source, per_kw, cost, price_per_gpu_hour)


def parse_gpu_list(text: str, visible: Sequence[int]) -> tuple[int, ...]:
    """The GPUs a tune may use from ``--gpus`` text: ``"all"``, ``"0-3"``, ``"0,2,4,6"``; each must be visible.

    Raises:
        ValueError: malformed, empty, or a GPU that is not there (one line for people).
    """
    text = text.strip()
    if text in ("", "all"):
        if not visible:
            raise ValueError("--gpus: no GPU is visible here")
        return tuple(sorted(visible))
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError(f"--gpus {text!r}: {part!r} is not a GPU index or a range like 0-3") from None
        if low < 0 or high < low:
            raise ValueError(f"--gpus {text!r}: {part!r} is not a range of GPU indices")
        chosen.update(range(low, high + 1))
    if not chosen:
        raise ValueError(f"--gpus {text!r}: no GPU given")
    missing = sorted(chosen - set(visible))
    if missing:
        have = ",".join(map(str, sorted(visible))) or "none"
        raise ValueError(f"--gpus {text!r}: GPU {missing[0]} is not visible here (visible: {have})")
    return tuple(sorted(chosen))
