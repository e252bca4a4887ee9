"""Replay of hostile recordings: whatever a recording holds, replay and the monitor's widgets never raise.

Recordings are generated from the model's own dataclasses: every field is either a plausible value of its type
or something hostile (NaN, infinity, 2**70, a negative size, a wrong type, markup, control characters, 5,000
characters), and any field may be missing. Every snapshot that replay lets through must be finite and bounded,
and must render on the real monitor, in the process table and the kill dialog included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import NO_DISCOVERY
from hypothesis import given, settings
from hypothesis import strategies as st

from tui.app import make_app
from tui.widgets.process_table import ProcessTable
from tuner.telemetry.energy import SnapshotWindow
from tuner.telemetry.foreign import MAX_TEXT
from tuner.telemetry.model import GpuState, Snapshot, SystemInfo
from tuner.telemetry.recording import RecordingError, ReplaySource
from tuner.telemetry.sampler import History

TEXT = st.one_of(
    st.text(max_size=16),
    st.sampled_from(
        [
            "[/]",
            "[@click=app.quit]x[/]",
            "[b]bold",
            "[X=1] [$accent]",
            "a\\[/]",
            "\x1b[2J\x07",
            "\ud800",
            "NVIDIA ",
            " ",
            "",
            "x" * 5000,
            "vllm serve m --api-key sk-test-SECRET123456",
        ]
    ),
)
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 2**63, 2**70, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
REASONS = st.sampled_from(["sw_power_cap", "gpu_idle", "hw_slowdown", "hw_thermal_slowdown", "other(0x40)"])


def _plausible(name: str, hint: Any) -> st.SearchStrategy[Any]:
    """A value infertop could have recorded for this field (strings may still be hostile: they are text)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint
    if name == "time_s":
        return st.floats(1.7e9, 1.7e9 + 60)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(0, 3) if name.endswith(("index", "pid")) else st.integers(0, 10**12)
    if kind is float:
        return st.floats(0, 100)
    if kind is str:
        return TEXT
    if kind is GpuState:
        return st.sampled_from([s.value for s in GpuState])
    if dataclasses.is_dataclass(kind):
        return _records(kind)  # type: ignore[arg-type]
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if items[-1] is Ellipsis:
            item = items[0]
            if dataclasses.is_dataclass(item):
                return st.lists(_records(item), max_size=2)  # type: ignore[arg-type]
            return st.lists(REASONS if item is str else st.integers(0, 3), max_size=2)
        return st.lists(st.integers(0, 10), min_size=len(items), max_size=len(items))
    return HOSTILE


def _records(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped like ``cls``: every field plausible, then up to three of them hostile, and about one time in
    six one of its identity fields (an index, a pid, a time: a bad one costs the whole record). Drawn this way,
    not field by field, so that most records keep their identity and reach the screen. A missing field is
    drawn as null, which replay reads alike."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name != "extra"]
    identities = [f.name for f in fields if _identity(f, hints[f.name])]
    others = [f.name for f in fields if f.name not in identities]
    plausible = st.fixed_dictionaries({f.name: _plausible(f.name, hints[f.name]) for f in fields})
    damaged = st.dictionaries(st.sampled_from(others), HOSTILE, max_size=3) if others else st.just({})
    lost: st.SearchStrategy[dict[str, Any]] = st.just({})
    if identities:
        one_lost = st.dictionaries(st.sampled_from(identities), HOSTILE, min_size=1, max_size=1)
        lost = st.one_of(*[st.just({}) for _ in range(5)], one_lost)
    return st.tuples(plausible, damaged, lost).map(lambda drawn: {**drawn[0], **drawn[1], **drawn[2]})


def _identity(f: dataclasses.Field[Any], hint: Any) -> bool:
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    return not has_default and type(None) not in typing.get_args(hint)


SNAPSHOT = _records(Snapshot).map(lambda d: {"type": "snapshot", **d})
JUNK = st.one_of(st.text(max_size=20), HOSTILE.map(json.dumps))
LINES = st.tuples(
    st.lists(SNAPSHOT.map(json.dumps), min_size=1, max_size=3), st.lists(JUNK, max_size=2)
).flatmap(lambda drawn: st.permutations(drawn[0] + drawn[1]))
RECORDING = st.tuples(_records(SystemInfo), LINES)


def _write(path: Path, system: dict[str, Any], lines: list[str]) -> None:
    header = {"type": "header", "format": "infertop-recording", "version": 1, "system": system}
    text = "".join(line.replace("\n", " ") + "\n" for line in [json.dumps(header), *lines])
    path.write_text(text, encoding="utf-8", errors="surrogatepass")


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory) / "fuzzed.ndjson"


def _fields(obj: object, name: str = "") -> Iterator[tuple[str, object]]:
    """Every (field name, value) in a dataclass, through nested dataclasses and tuples."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name != "extra":
                yield from _fields(getattr(obj, f.name), f.name)
    elif isinstance(obj, tuple):
        for item in obj:
            yield from _fields(item, name)
    else:
        yield name, obj


# Text the screen reads as Textual markup (the banner, a cell of the process table): brackets would be markup.
MARKUP_SINKS = {"user", "message", "gpu_error"}


def _assert_checked(checked: Snapshot | SystemInfo) -> None:
    """What replay promises of every snapshot it passes on, and of the machine its header describes."""
    for name, value in _fields(checked):
        if isinstance(value, float):
            assert math.isfinite(value), name
        if isinstance(value, int) and not isinstance(value, bool):
            assert 0 <= value < 2**63, name
        if isinstance(value, str):
            assert len(value) <= MAX_TEXT + 1 and value.isprintable(), name  # "…" when cut
            assert not (name == "command" and "SECRET" in value), name  # masked again, whoever recorded it
            assert not (name in MARKUP_SINKS and "[" in value), name
            value.encode("utf-8")  # no lone surrogate: the terminal could not print it
    if isinstance(checked, SystemInfo):
        assert len({g.index for g in checked.gpus}) == len(checked.gpus)  # one card each
        return
    assert len({g.index for g in checked.gpus}) == len(checked.gpus)
    pairs = [(p.gpu_index, p.pid) for g in checked.gpus for p in g.processes or ()]
    assert len(set(pairs)) == len(pairs)  # one table row each


@given(RECORDING)
def test_replay_passes_on_only_checked_snapshots(
    scratch: Path, recording: tuple[dict[str, Any], list[str]]
) -> None:
    _write(scratch, *recording)
    try:
        source = ReplaySource(scratch, speed=1000.0)
        source.open()
    except RecordingError:
        return  # one line at the command line (test_cli.py)
    _assert_checked(source.info)
    history, window = History(8), SnapshotWindow()
    while (snap := source.next_snapshot()) is not None:
        _assert_checked(snap)
        history.add(snap)
        window.add(snap)
        for engine in snap.engines:
            window.power(engine.url)
        assert 0 <= source.next_delay_s() < 1
    source.close()


async def _show(path: Path) -> None:
    """The real monitor over the recording: every snapshot shown and drawn, then the process keys pressed."""
    try:
        app = make_app(config=NO_DISCOVERY, replay=path, replay_speed=1000.0, autostart=False)
        info: SystemInfo = app.sampler.open()
    except RecordingError:
        return
    async with app.run_test(size=(100, 30)) as pilot:
        app.monitor.show_system(info)
        await pilot.pause()
        while (snap := app.sampler.tick()) is not None:
            app.monitor.energy_window.add(snap)
            app.monitor.show_snapshot(snap)
            await pilot.pause()
            app.export_screenshot()  # every widget drawn
        app.monitor.query_one(ProcessTable).focus()
        await pilot.press("s", "c", "k")
        app.export_screenshot()  # the kill dialog, naming the process
        await pilot.press("n")


@settings(max_examples=10)  # each example starts the real app
@given(RECORDING)
def test_the_monitor_draws_every_replayed_snapshot(
    scratch: Path, recording: tuple[dict[str, Any], list[str]]
) -> None:
    _write(scratch, *recording)
    asyncio.run(_show(scratch))
