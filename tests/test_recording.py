"""NDJSON recording and replay: a replay shows what was recorded, at the recorded pace times the speed."""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
from pathlib import Path

import pytest
from helpers import FixedHost, prime, scripted_app

from tui.app import fresh_recording_path
from tuner.outputs import OutputError
from tuner.telemetry import scripted
from tuner.telemetry.foreign import MAX_TEXT
from tuner.telemetry.model import GpuState, Snapshot, SystemInfo, snapshot_from_dict
from tuner.telemetry.recording import (
    MAX_GAP_S,
    Recorder,
    RecordingError,
    ReplaySource,
    parse_snapshot,
    read_header,
)
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

CONFIG = SamplerConfig(discover_vllm=False)


def _record(path: Path, ticks: int, label: str | None = "test rig") -> list[float]:
    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(2, clock=clock)
    sampler = Sampler(
        LiveSource(scripted.scripted_backend(nvml), config=CONFIG, host=FixedHost(), clock=clock)
    )
    info = sampler.open()
    recorder = Recorder(path, info, label=label)
    sampler.add_listener(recorder)
    dram = []
    for _ in range(ticks):
        clock.advance(0.25)
        snap = sampler.tick()
        assert snap is not None
        dram.append(snap.gpus[1].dram_bw_gbps)
    recorder.close()
    sampler.stop()
    return dram  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["r.ndjson", "r.ndjson.gz"])
def test_round_trip_preserves_every_reading(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    recorded = _record(path, 12)
    source = ReplaySource(path, speed=4.0)
    info = source.open()
    assert info.source == f"replay: {name}" and info.label == "test rig"
    assert [g.name for g in info.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    replayed, delays = [], []
    while (snap := source.next_snapshot()) is not None:
        replayed.append(snap.gpus[1].dram_bw_gbps)
        delays.append(source.next_delay_s())
        assert snap.host is not None and snap.host.hostname == "gpu-node-01"
    assert replayed == recorded
    assert delays[0] == pytest.approx(0.25 / 4.0)  # recorded 0.25 s apart, played 4x faster
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert json.loads(f.readline())["format"] == "infertop-recording"


def test_loop_starts_again_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    _record(path, 3)
    source = ReplaySource(path, loop=True)
    source.open()
    assert sum(source.next_snapshot() is not None for _ in range(9)) == 9


def test_a_cut_off_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    _record(path, 5)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # a recording interrupted mid-write
    source = ReplaySource(path)
    source.open()
    count = 0
    while source.next_snapshot() is not None:
        count += 1
    assert count == 4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "not an infertop recording"),
        ("hello\n", "first line is not JSON"),
        ('{"format": "something-else"}\n', "not an infertop recording"),
        ('{"format": "infertop-recording", "version": 99}\n', "newer infertop"),
    ],
)
def test_bad_files_are_refused_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_text(content)
    with pytest.raises(RecordingError, match=message):
        read_header(path)


def test_missing_file_is_a_recording_error(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="cannot read"):
        read_header(tmp_path / "nope.ndjson")


def test_recording_without_snapshots_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "empty.ndjson"
    _record(path, 0)
    with pytest.raises(RecordingError, match="no readable snapshot"):
        ReplaySource(path).open()


def test_a_snapshot_with_an_inference_server_comes_back_equal() -> None:
    from tuner.telemetry.model import EngineSample, Snapshot, snapshot_from_dict, to_jsonable

    engine = EngineSample(url="http://127.0.0.1:8000", time_s=5.0, engine="sglang", server_pids=(7, 8))
    snap = Snapshot(time_s=5.0, host=None, engines=(engine,))
    assert snapshot_from_dict(json.loads(json.dumps(to_jsonable(snap)))) == snap


# --- the file: private, whole, never over another ------------------------------------------------------


@pytest.mark.parametrize("name", ["r.ndjson", "r.ndjson.gz"])
def test_a_recording_is_private_and_appears_whole_when_it_stops(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    recorder = Recorder(path, SystemInfo(state=GpuState.NO_GPU))
    recorder(Snapshot(time_s=1.8e9, host=None))
    assert not path.exists()  # written under a temporary name until it is whole
    (part,) = tmp_path.glob(f".{name}.*.part")
    assert stat.S_IMODE(part.stat().st_mode) == 0o600
    assert recorder.close() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]
    source = ReplaySource(path)
    source.open()
    assert source.next_snapshot() is not None
    if name.endswith(".gz"):
        with gzip.open(path) as packed:
            packed.read()
        # The gzip header names the file (less .gz), not the temporary one.
        assert path.read_bytes()[10:19] == b"r.ndjson\x00"


def test_an_existing_file_is_never_replaced_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    path.write_text("precious\n")
    with pytest.raises(OutputError, match="exists: pass --force"):
        Recorder(path, SystemInfo(state=GpuState.NO_GPU))
    assert path.read_text() == "precious\n" and list(tmp_path.iterdir()) == [path]
    Recorder(path, SystemInfo(state=GpuState.NO_GPU), force=True).close()
    assert read_header(path)[0].state is GpuState.NO_GPU


def test_a_file_that_appears_while_recording_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    recorder = Recorder(path, SystemInfo(state=GpuState.NO_GPU))
    path.write_text("made meanwhile\n")
    with pytest.raises(OutputError, match="what was written is in"):
        recorder.close()
    assert path.read_text() == "made meanwhile\n"


# --- replay: a recording is foreign data ---------------------------------------------------------------

HEADER = '{"type":"header","format":"infertop-recording","version":1,"system":{"state":"ok"}}\n'


def _replay(tmp_path: Path, *snapshots: object, raw: str = "") -> tuple[list[Snapshot], ReplaySource]:
    path = tmp_path / "hostile.ndjson"
    lines = [json.dumps({"type": "snapshot", **s}) if isinstance(s, dict) else str(s) for s in snapshots]
    path.write_text(HEADER + raw + "".join(line + "\n" for line in lines))
    source = ReplaySource(path, speed=1000.0)
    source.open()
    played = []
    while (snap := source.next_snapshot()) is not None:
        played.append(snap)
    return played, source


@pytest.mark.parametrize("time_s", [None, "1", float("nan"), float("inf"), -5.0, 1e300, True, [1]])
def test_a_snapshot_without_a_valid_time_is_skipped_and_counted(tmp_path: Path, time_s: object) -> None:
    bad = {} if time_s is None else {"time_s": time_s}
    played, source = _replay(tmp_path, bad, {"time_s": 1.8e9}, "not json", [1, 2])
    assert len(played) == 1
    assert source.damage.lines_skipped == 3
    assert source.damage.summary() == "3 lines skipped"


@pytest.mark.parametrize(
    "content", ["", '{"type":"snapshot"}\n', '{"type":"snapshot","time_s":"soon"}\n', "[[[[" * 50_000 + "\n"]
)
def test_a_recording_without_a_readable_snapshot_cannot_be_opened(tmp_path: Path, content: str) -> None:
    path = tmp_path / "r.ndjson"
    path.write_text(HEADER + content)
    with pytest.raises(RecordingError, match="holds no readable snapshot"):
        ReplaySource(path).open()


def test_hostile_fields_are_read_as_none_and_counted(tmp_path: Path) -> None:
    gpu = {
        "index": 0,
        "time_s": 1.8e9,
        "vram_used_bytes": 2**70,  # past any memory
        "vram_total_bytes": 80 * 2**30,
        "gpu_util_pct": float("nan"),
        "mem_busy_pct": -3,
        "gpu_temp_c": 1e999,  # json.dumps writes Infinity
        "power_w": "350",
        "sm_clock_mhz": 1410.5,  # an integer field
        "clock_event_reasons": ["sw_power_cap", 7],
        "processes": [
            {
                "pid": 42,
                "gpu_index": 0,
                "vram_used_bytes": 1024,
                "kind": "compute",
                "user": "[/]",
                "command": "vllm serve m --api-key sk-test-SECRET123456 " + "x" * 5000,
            },
            {"pid": 42, "gpu_index": 0, "vram_used_bytes": 1, "kind": "compute"},  # the same process again
            {"pid": -1, "gpu_index": 0, "vram_used_bytes": 1, "kind": "compute"},  # no valid identity
        ],
    }
    host = {
        "time_s": 1.8e9,
        "hostname": "n\x1b[2J" + "h" * 900,
        "cpu_pct": 20.0,
        "cpu_count": 8,
        "ram_used_bytes": 1,
        "ram_total_bytes": 2,
        "load_avg_1m": 1.0,
        "load_avg_5m": "high",
        "load_avg_15m": 1.0,
    }
    (snap,), source = _replay(
        tmp_path,
        {
            "time_s": 1.8e9,
            "host": host,
            "gpus": [gpu, {"index": 0, "time_s": 1.8e9}],
            "gpu_error": "[b]x",
            "engines": [
                {"url": "http://a", "time_s": 1.8e9, "ttft_p95_s": -1},
                {"url": "http://a", "time_s": 1},
            ],
            "extra": {"replay_position_s": "not mine"},
        },
    )
    (g,) = snap.gpus  # a second GPU 0 is left out
    assert (g.vram_used_bytes, g.gpu_util_pct, g.mem_busy_pct, g.gpu_temp_c, g.power_w) == (None,) * 5
    assert g.sm_clock_mhz is None and g.clock_event_reasons == ("sw_power_cap",)
    assert g.vram_total_bytes == 80 * 2**30 and g.index == 0
    assert g.processes is not None
    (p,) = g.processes  # the same process twice is one row; a process without a valid pid is none
    assert p.user is None and p.command is not None and len(p.command) <= MAX_TEXT + 1
    assert "SECRET" not in p.command and "--api-key ***" in p.command  # masked again on the way in
    assert snap.host is not None
    assert snap.host.hostname.startswith("n?[2J") and len(snap.host.hostname) <= MAX_TEXT + 1
    assert (snap.host.load_avg_1m, snap.host.load_avg_5m, snap.host.load_avg_15m) == (1.0, None, 1.0)
    assert snap.gpu_error == "(b)x"  # never read as markup on screen
    (engine,) = snap.engines
    assert engine.ttft_p95_s is None
    assert isinstance(snap.extra["replay_position_s"], float)
    # Five GPU figures, its clock, a reason, the second GPU 0, pid -1, process 42 again and its user, the load,
    # TTFT p95 and the second http://a: 14, the first few in words.
    assert source.damage.summary() == "14 fields or records unreadable (host.load_avg_5m: not a number, ...)"


def test_a_damaged_header_is_one_line(tmp_path: Path) -> None:
    for header in (
        '{"format":"infertop-recording","version":"1"}',
        '{"format":"infertop-recording","system":[]}',
    ):
        path = tmp_path / "r.ndjson"
        path.write_text(header + "\n")
        with pytest.raises(RecordingError, match="header is damaged"):
            read_header(path)


def test_a_line_past_the_limit_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuner.telemetry.recording.MAX_LINE_CHARS", 1000)
    long = {"time_s": 1.8e9, "gpu_error": "x" * 5000}
    played, source = _replay(tmp_path, long, {"time_s": 1.8e9 + 1})
    assert len(played) == 1 and source.damage.lines_skipped == 1


def test_a_long_pause_in_a_recording_plays_as_a_short_one(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    path.write_text(
        HEADER + "".join(json.dumps({"type": "snapshot", "time_s": t}) + "\n" for t in (1e9, 9e9))
    )
    source = ReplaySource(path)
    source.open()
    source.next_snapshot()
    assert source.next_delay_s() == MAX_GAP_S


def test_every_field_of_a_real_recording_survives_validation(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    _record(path, 6)
    lines = path.read_text().splitlines()[1:]
    for line in lines:
        data = json.loads(line)
        assert parse_snapshot(data) == snapshot_from_dict(data)


# --- the monitor's R key and SIGTERM -------------------------------------------------------------------


async def test_the_r_key_never_overwrites_and_sigterm_finishes_its_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tui.app.time.strftime", lambda pattern: "infertop-20261122-101500")  # one second
    clock = scripted.ManualClock()
    app = scripted_app(scripted.h100_sxm(1, clock=clock), clock)
    app.record_dir = tmp_path
    taken = fresh_recording_path(tmp_path)
    taken.write_text("an older recording\n")
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=1)
        await pilot.press("R")
        assert app.recorder is not None and app.recorder.path != taken
        assert app.recorder.path.name.endswith("-2.ndjson")
        for _ in range(3):
            clock.advance(0.25)
            app.sampler.tick()
        # Textual leaves SIGTERM to its default (death): the app must have taken it over before it is sent.
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(50):
            await pilot.pause(0.02)
            if app.return_code is not None:  # exit() was called
                break
    assert taken.read_text() == "an older recording\n"
    (recorded,) = set(tmp_path.glob("infertop-*.ndjson")) - {taken}
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert len(recorded.read_text().splitlines()) == 1 + 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back with the terminal


def test_a_corrupt_gz_recording_plays_up_to_the_damage(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson.gz"
    recorder = Recorder(path, SystemInfo(state=GpuState.NO_GPU))
    for i in range(400):
        recorder(Snapshot(time_s=1.8e9 + i, host=None, gpu_error=f"reading {i}"))
    recorder.close()
    packed = bytearray(path.read_bytes())
    middle = len(packed) // 2
    packed[middle : middle + 16] = b"\xff" * 16  # zlib's own error (not an OSError): invalid distance
    path.write_bytes(bytes(packed))
    source = ReplaySource(path, speed=1000.0)
    source.open()
    played = 0
    while source.next_snapshot() is not None:
        played += 1
    assert 0 < played < 400
