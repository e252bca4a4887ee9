"""FAKE: the scripted nv-hostengine behind the fake DCGM bindings in this directory (not a module DCGM ships).

CI has no GPU and no DCGM, so the fake ``dcgm_agent`` answers from the state here: which addresses a hostengine
listens on, the GPUs it supports (id, UUID), the latest value and timestamp of each profiling field per GPU,
which fields some client watches, and the calls infertop made (connections, field groups, watches), for the
tests to check. ``reset()`` puts it back to one idle hostengine on 127.0.0.1:5555 with no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeGpu:
    gpu_id: int
    uuid: str
    # fieldId -> (value, timestamp in us since the epoch); absent: DCGM has no sample
    values: dict[int, tuple[float | int, int]] = field(default_factory=dict)
    # fieldId -> DCGM_ST_* code DCGM answers instead of a value (e.g. -36 profiling not supported)
    statuses: dict[int, int] = field(default_factory=dict)


@dataclass
class FakeState:
    library_present: bool = True  # libdcgm.so.4 found by dcgm_structs._dcgmInit
    listening: set[str] = field(default_factory=lambda: {"127.0.0.1:5555"})  # host:port or unix:PATH
    gpus: list[FakeGpu] = field(default_factory=list)
    watched: set[int] = field(default_factory=set)  # field ids some client watches on every GPU
    # field ids whose watch DCGM refuses (profiling groups that need several passes, ...)
    refuse_watch: set[int] = field(default_factory=set)
    connects: list[dict[str, Any]] = field(default_factory=list)  # every dcgmConnect: address, params
    open_handles: set[int] = field(default_factory=set)
    field_groups: dict[int, tuple[str, list[int], int]] = field(
        default_factory=dict
    )  # id: (name, fields, owner)
    watches: list[dict[str, Any]] = field(default_factory=list)  # every dcgmWatchFields call
    destroyed_groups: list[int] = field(default_factory=list)
    latest_value_calls: int = 0
    drop_connection_after: int | None = None  # latest-values calls after which the connection is lost


STATE = FakeState()


def reset() -> FakeState:
    STATE.__init__()  # the same object: the fake modules hold a reference to it
    return STATE
