"""What the monitor looks like: SVG snapshots of the real app over the scripted NVML, clocks frozen.

Update after an intended change with `pytest tests/test_snapshots.py --snapshot-update` and review the diff.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import prime, scripted_app

from tuner.telemetry import scripted

# Processes in another pid namespace: psutil cannot see them, so nothing about this machine leaks in. The
# driver samples the even ones' SM and memory use (they follow their GPU's load); the odd ones show n/a.
CONTAINER_PROCS = [
    scripted.FakeProcess(scripted.INVISIBLE_PID + i, i % 8, (18 + i) * 2**30, follows_load=i % 2 == 0)
    for i in range(8)
]


def _app(nvml_factory: Any, n_gpus: int) -> tuple[Any, scripted.ManualClock]:
    clock = scripted.ManualClock()
    kwargs: dict[str, Any] = {"clock": clock}
    if n_gpus:
        kwargs["processes"] = [p for p in CONTAINER_PROCS if p.gpu_index < n_gpus]
    return scripted_app(nvml_factory(n_gpus, **kwargs), clock), clock


@pytest.mark.parametrize(
    ("name", "factory", "n_gpus", "size"),
    [
        ("h100x1_100x30", scripted.h100_sxm, 1, (100, 30)),
        ("h100x1_80x24", scripted.h100_sxm, 1, (80, 24)),
        ("h100x8_80x24", scripted.h100_sxm, 8, (80, 24)),
        ("l4x2_100x30", scripted.l4, 2, (100, 30)),
    ],
)
def test_monitor_snapshot(
    snap_compare: Any, name: str, factory: Any, n_gpus: int, size: tuple[int, int]
) -> None:
    app, clock = _app(factory, n_gpus)

    async def run_before(pilot: Any) -> None:
        prime(app, clock, ticks=240)  # a minute of history at 4 Hz
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_no_driver_snapshot(snap_compare: Any) -> None:
    clock = scripted.ManualClock()
    app = scripted_app(scripted.no_library(), clock)

    async def run_before(pilot: Any) -> None:
        prime(app, clock, ticks=4)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_gpu_lost_snapshot(snap_compare: Any) -> None:
    clock = scripted.ManualClock()
    app = scripted_app(
        scripted.gpu_lost_after(20, gpu_index=1, n_gpus=2, clock=clock, processes=CONTAINER_PROCS[:2]), clock
    )

    async def run_before(pilot: Any) -> None:
        prime(app, clock, ticks=40)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


def test_help_snapshot(snap_compare: Any) -> None:
    app, clock = _app(scripted.h100_sxm, 1)

    async def run_before(pilot: Any) -> None:
        prime(app, clock, ticks=8)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
