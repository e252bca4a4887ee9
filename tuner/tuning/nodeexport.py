"""The node's layout as files an operator runs: one YAML per replica and the script that starts them, or one
server with ``--data-parallel-size`` where that measured as well (tuner.tuning.verdict decides which).

Every file is written private and whole (:mod:`tuner.outputs`) into the run's own directory, where replacing the
run's earlier files is the point (``force``); a symlink planted under one of their names is replaced, never
followed. The script is its owner's to run (0700), nobody else's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tuner.outputs import open_private, write_private
from tuner.tuning.conclusion import RunView, export_text
from tuner.tuning.placement import Node, Placement
from tuner.tuning.verdict import Contender

__all__ = ["SCRIPT_MODE", "every_replica", "write_data_parallel", "write_replicas"]

SCRIPT_MODE = 0o700
"""serve-node.sh: its owner runs it; like the YAMLs beside it, nobody else reads it."""


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
    text = export_text(view, contender, status_line, data_parallel=contender.replicas)
    write_private(path, text, force=True)
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
        text = export_text(view, contender, status_line, replica=(i, placement.gpus, port))
        write_private(path, text, force=True)
        written[f"replica_{i}"] = str(path)
        devices = ",".join(map(str, placement.gpus))
        lines.append(
            f"CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES={devices} vllm serve --config {path.name} &"
            f"  # TP {tp}, port {port}"
        )
    lines.append("wait")
    script = out / "serve-node.sh"
    with open_private(script, force=True) as f:
        f.write("\n".join(lines) + "\n")
        os.fchmod(f.fileno(), SCRIPT_MODE)  # the file being written: a chmod by name would follow a symlink
    written["serve_node"] = str(script)
    return written
