"""NDJSON recording and replay: a replay shows what was recorded, at the recorded pace times the speed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import FixedHost

from tuner.telemetry import scripted
from tuner.telemetry.recording import Recorder, RecordingError, ReplaySource, read_header
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
    with pytest.raises(RecordingError, match="no snapshots"):
        ReplaySource(path).open()


def test_a_snapshot_with_an_inference_server_comes_back_equal() -> None:
    from tuner.telemetry.model import EngineSample, Snapshot, snapshot_from_dict, to_jsonable

    engine = EngineSample(url="http://127.0.0.1:8000", time_s=5.0, engine="sglang", server_pids=(7, 8))
    snap = Snapshot(time_s=5.0, host=None, engines=(engine,))
    assert snapshot_from_dict(json.loads(json.dumps(to_jsonable(snap)))) == snap
