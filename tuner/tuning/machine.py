"""The machine a tune runs on: the GPUs NVML sees (or the CPU build of vLLM), and the node it hands out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.telemetry import gpus as gpu_table
from tuner.telemetry.model import GpuState
from tuner.telemetry.nvml import NvmlBackend
from tuner.tuning.modelshape import Hardware, SpaceError
from tuner.tuning.placement import Node, gpus_local_cpus

__all__ = ["NodeInfo", "detect_hardware", "detect_node"]

GiB = 2**30


@dataclass(frozen=True)
class NodeInfo:
    """What the tune runs on: the hardware it sizes candidates for, and the GPUs and cores it hands out."""

    hardware: Hardware
    label: str
    node: Node
    board_power_w: float | None  # one GPU's default power limit (NVML) or datasheet TDP; None: unknown


def detect_node(
    use_gpus: bool,
    env: Mapping[str, str],
    *,
    gpu_ids: tuple[int, ...] | None = None,
    nvml: Any = None,
    cpu_plan: Any = None,
) -> NodeInfo:
    """The GPUs NVML sees (those of ``gpu_ids`` only, when given), or the CPU build of vLLM sized by
    VLLM_CPU_KVCACHE_SPACE (GiB).

    Raises:
        SpaceError: ``gpu_ids`` names a GPU that is not there, or mixes GPU types.
    """
    if use_gpus:
        backend = NvmlBackend(nvml=nvml) if nvml is not None else NvmlBackend()
        info = backend.open()
        backend.close()
        if info.state is GpuState.OK and info.gpus:
            visible = {g.index: g for g in info.gpus}
            chosen = sorted(visible) if gpu_ids is None else list(gpu_ids)
            missing = [i for i in chosen if i not in visible]
            if missing:
                have = ",".join(map(str, sorted(visible)))
                raise SpaceError(f"--gpus: GPU {missing[0]} is not visible here (visible: {have})")
            picked = [visible[i] for i in chosen]
            names = {g.name for g in picked}
            if len(names) > 1:
                raise SpaceError(
                    f"--gpus: the GPUs differ ({', '.join(sorted(names))}): tune one GPU type at a time"
                )
            hw = Hardware.from_gpus(picked)
            cores = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
            node = Node(tuple(chosen), cores, gpus_local_cpus(picked, cores))
            known = gpu_table.lookup(hw.gpu_name)
            power = picked[0].power_limit_default_w or (known.tdp_w if known else None)
            which = "" if gpu_ids is None else f" (GPUs {','.join(map(str, chosen))})"
            return NodeInfo(hw, f"{hw.gpu_count}x {hw.gpu_name}{which}", node, power)
    kv_gib = float(env.get("VLLM_CPU_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4)
    hw = Hardware.cpu(int(kv_gib * GiB))
    return NodeInfo(hw, f"CPU (vLLM CPU build, {kv_gib:g} GiB KV cache)", Node((), cpu_plan=cpu_plan), None)


def detect_hardware(use_gpus: bool, env: Mapping[str, str]) -> tuple[Hardware, str]:
    """The GPUs NVML sees, or the CPU build of vLLM sized by VLLM_CPU_KVCACHE_SPACE (GiB)."""
    info = detect_node(use_gpus, env)
    return info.hardware, info.label
