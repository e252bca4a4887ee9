"""The node's layout as files an operator runs: one YAML per replica and the script that starts them, or one
server with ``--data-parallel-size`` where that measured as well (tuner.tuning.verdict decides which)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tuner.tuning.conclusion import RunView, export_text
from tuner.tuning.placement import Node, Placement
from tuner.tuning.verdict import Contender

__all__ = ["every_replica", "write_data_parallel", "write_replicas"]


def every_replica(node: Node, tp: int, replicas: int) -> list[Placement]:
    """Every replica's placement on an idle node (the proof runs alone)."""
    taken: list[Placement] = []
    for _ in range(replicas):
        placement = node.take(tp)
        if placement is None:
            break
        taken.append(placement)
    for placement in taken:
        node.release(placement)  # handed back at once: the proof is the node's only user
    return taken


def write_data_parallel(view: RunView, contender: Contender, status_line: str, out: Path) -> Path:
    """The layout as one server with --data-parallel-size (its replicas as data-parallel ranks)."""
    path = out / "best-dp.yaml"
    path.write_text(export_text(view, contender, status_line, data_parallel=contender.replicas))
    return path


def write_replicas(
    view: RunView, contender: Contender, status_line: str, out: Path, placements: Sequence[Placement]
) -> dict[str, str]:
    """For a layout of several replicas: one file per replica (its port; its GPUs in the header) and the script
    that starts them all. One replica: nothing more than best.yaml. Files an earlier contender left (the winner,
    before the runner-up was proven) go first: none may start a configuration not exported."""
    for stale in [*out.glob("best-replica-*.yaml"), out / "serve-node.sh"]:
        stale.unlink(missing_ok=True)
    if contender.replicas <= 1:
        return {}
    written: dict[str, str] = {}
    lines = ["#!/bin/sh", f"# {status_line}", "# One vLLM server per replica, each on its own GPUs and port."]
    tp = contender.candidate.tensor_parallel_size or 1
    for i, placement in enumerate(placements):
        port = 8000 + i
        path = out / f"best-replica-{i}.yaml"
        path.write_text(export_text(view, contender, status_line, replica=(i, placement.gpus, port)))
        written[f"replica_{i}"] = str(path)
        devices = ",".join(map(str, placement.gpus))
        lines.append(
            f"CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES={devices} vllm serve --config {path.name} &"
            f"  # TP {tp}, port {port}"
        )
    lines.append("wait")
    script = out / "serve-node.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    written["serve_node"] = str(script)
    return written
