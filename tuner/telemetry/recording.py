"""Record snapshots to NDJSON and replay them: a replay is just another snapshot source.

File format, one JSON object per line:
    {"type": "header", "format": "infertop-recording", "version": 1, "started_s": ..., "system": {...}}
    {"type": "snapshot", ...Snapshot fields...}
A recording may be cut short (Ctrl-C, full disk); replay stops at the last complete line.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from tuner.telemetry.model import (
    GpuState,
    Snapshot,
    SystemInfo,
    snapshot_from_dict,
    system_info_from_dict,
    to_jsonable,
)

FORMAT = "infertop-recording"
VERSION = 1


class RecordingError(ValueError):
    """The file is not an infertop recording (or is damaged before its first snapshot)."""


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


class Recorder:
    """Appends snapshots to an NDJSON file; use as a sampler listener. Thread-safe; flushes about once a second."""

    def __init__(self, path: str | Path, info: SystemInfo, *, label: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open_text(self.path, "w")
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.snapshots_written = 0
        header: dict[str, Any] = {
            "type": "header",
            "format": FORMAT,
            "version": VERSION,
            "started_s": time.time(),
            "system": to_jsonable(info),
        }
        if label:
            header["label"] = label
        self._write(header)

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def __call__(self, snap: Snapshot) -> None:
        with self._lock:
            if self._file.closed:
                return
            data = to_jsonable(snap)
            data["type"] = "snapshot"
            self._write(data)
            self.snapshots_written += 1
            if time.monotonic() - self._last_flush > 1.0:
                self._file.flush()
                self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def read_header(path: str | Path) -> tuple[SystemInfo, dict[str, Any]]:
    """The system info and raw header of a recording. Raises RecordingError for anything else."""
    path = Path(path)
    try:
        with _open_text(path, "r") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise RecordingError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(first)
    except json.JSONDecodeError as exc:
        raise RecordingError(f"{path} is not an infertop recording (first line is not JSON)") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RecordingError(f"{path} is not an infertop recording")
    if header.get("version", 0) > VERSION:
        raise RecordingError(f"{path} was written by a newer infertop (format {header['version']})")
    info = system_info_from_dict(header.get("system", {}))
    label = header.get("label") or info.label
    info = SystemInfo(
        state=info.state,
        message=info.message,
        driver_version=info.driver_version,
        cuda_driver_version=info.cuda_driver_version,
        nvml_version=info.nvml_version,
        gpus=info.gpus,
        source=f"replay: {path.name}",
        label=label,
    )
    return info, header


class ReplaySource:
    """Plays a recording back at ``speed`` x real time, optionally looping. Timestamps are shifted to now."""

    def __init__(self, path: str | Path, *, speed: float = 1.0, loop: bool = False) -> None:
        if speed <= 0:
            raise ValueError("replay speed must be > 0")
        self.path = Path(path)
        self.speed = speed
        self.loop = loop
        self.info, self.header = read_header(self.path)
        self._file: IO[str] | None = None
        self._pending: Snapshot | None = None
        self._delay_s = 0.25
        self._offset_s = 0.0
        self.position_s = 0.0  # seconds into the recording
        self._first_time_s: float | None = None

    def open(self) -> SystemInfo:
        self._rewind()
        if self._pending is None:
            raise RecordingError(f"{self.path} holds no snapshots")
        return self.info

    def _rewind(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = _open_text(self.path, "r")
        self._file.readline()  # header
        self._pending = self._read_next()
        if self._pending is not None:
            self._first_time_s = self._pending.time_s
            self._offset_s = time.time() - self._pending.time_s

    def _read_next(self) -> Snapshot | None:
        assert self._file is not None
        while True:
            try:
                line = self._file.readline()
            except (OSError, EOFError):  # a truncated .gz
                return None
            if not line:
                return None
            if not line.endswith("\n"):
                return None  # cut-off last line of an interrupted recording
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if data.get("type") == "snapshot":
                return snapshot_from_dict(data)

    def next_snapshot(self) -> Snapshot | None:
        current = self._pending
        if current is None:
            if not self.loop:
                return None
            self._rewind()
            current = self._pending
            if current is None:
                return None
        self._pending = self._read_next()
        if self._pending is not None:
            self._delay_s = max(0.0, (self._pending.time_s - current.time_s) / self.speed)
        self.position_s = current.time_s - (self._first_time_s or current.time_s)
        return _shift(current, self._offset_s, self.position_s)

    def next_delay_s(self) -> float:
        return self._delay_s

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _shift(snap: Snapshot, offset_s: float, position_s: float) -> Snapshot:
    """Recorded times moved to the present, so "age" and sparklines read naturally during playback."""
    return replace(
        snap,
        time_s=snap.time_s + offset_s,
        extra={**snap.extra, "replay_position_s": position_s},
        gpus=tuple(replace(g, time_s=g.time_s + offset_s) for g in snap.gpus),
    )


def is_gpu_recording(info: SystemInfo) -> bool:
    return info.state is GpuState.OK and bool(info.gpus)
