"""Record snapshots to NDJSON and replay them: a replay is just another snapshot source.

File format, one JSON object per line:
    {"type": "header", "format": "infertop-recording", "version": 1, "started_s": ..., "system": {...}}
    {"type": "snapshot", ...Snapshot fields...}

A recording is a private file (0600), written under a temporary name beside its own and renamed into place when
it stops (:mod:`tuner.outputs`); an existing file is never replaced unless the recorder is told to. A recording
cut short (a crash, a full disk) stays in that temporary file, and replay stops at its last complete line.

On replay a recording is foreign data (another machine's, an older infertop's, edited by hand), checked where it
is read exactly as another host's readings are (:mod:`tuner.telemetry.foreign`): nothing behind it meets NaN,
infinity, a wrong type or an unbounded string. A bad field is read as None (shown as n/a), a GPU, process or
server without a valid identity is left out, a snapshot without a valid time is skipped, and :class:`Damage`
counts each. A command line is masked again (:mod:`tuner.redact`): an older infertop recorded it whole.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from tuner.outputs import check_new, open_private
from tuner.redact import redact_command, redact_url
from tuner.telemetry.foreign import Problems, checked_snapshot, checked_system_info, printable
from tuner.telemetry.model import GpuState, Snapshot, SystemInfo, to_jsonable

FORMAT = "infertop-recording"
VERSION = 1
MAX_LINE_CHARS = 4 * 2**20
"""A longer line is no snapshot infertop wrote (eight GPUs with a thousand processes each are well under)."""
MAX_GAP_S = 5.0
"""A longer pause between two recorded snapshots (a paused monitor, a hand-edited time) plays as this long."""


# What reading a damaged file raises: a cut or corrupt .gz (zlib's own error is no OSError), bytes not UTF-8.
_DAMAGED_FILE = (OSError, EOFError, UnicodeDecodeError, zlib.error)


class RecordingError(ValueError):
    """The file is not an infertop recording (or is damaged before its first snapshot)."""


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


class Recorder:
    """Appends snapshots to a new NDJSON file; use as a sampler listener. Thread-safe; flushes about once a second.

    ``path`` must not exist unless ``force`` (:class:`~tuner.outputs.OutputError` otherwise, before anything is
    written). :meth:`close` renames the finished recording into place.
    """

    def __init__(
        self, path: str | Path, info: SystemInfo, *, label: str | None = None, force: bool = False
    ) -> None:
        self.path = check_new(path, force=force)
        gz = self.path.suffix == ".gz"
        self._output = open_private(self.path, force=force, binary=gz)
        self._file: IO[str] = self._output.file
        if gz:
            # The gzip header names the file, not the temporary name it is written under.
            packed = gzip.GzipFile(filename=self.path.name, mode="wb", fileobj=self._output.file)
            self._file = io.TextIOWrapper(packed, encoding="utf-8")
        self._closed = False
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
            if self._closed:
                return
            data = to_jsonable(snap)
            data["type"] = "snapshot"
            self._write(data)
            self.snapshots_written += 1
            if time.monotonic() - self._last_flush > 1.0:
                self._file.flush()
                self._last_flush = time.monotonic()

    def close(self) -> Path:
        """Finish the file and rename it into place. :class:`~tuner.outputs.OutputError` (one line, naming where
        the recording was kept) when it cannot be, for example because ``path`` appeared meanwhile."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._file is not self._output.file:
                    self._file.close()  # the gzip stream's end; the file under it stays open for commit()
                self._output.commit()
        return self.path


def read_header(path: str | Path, damage: Damage | None = None) -> tuple[SystemInfo, dict[str, Any]]:
    """The system info and raw header of a recording. Raises RecordingError for anything else."""
    path = Path(path)
    try:
        with _open_text(path, "r") as f:
            first = f.readline(MAX_LINE_CHARS)
    except _DAMAGED_FILE as exc:
        raise RecordingError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    header = _json(first)
    if header is None:
        raise RecordingError(f"{path} is not an infertop recording (first line is not JSON)")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RecordingError(f"{path} is not an infertop recording")
    version = header.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordingError(f"{path}: its header is damaged (its version is not a number)")
    if version > VERSION:
        raise RecordingError(f"{path} was written by a newer infertop (format {version})")
    system = header.get("system", {})
    info = _system_info({"state": "ok", **system} if isinstance(system, dict) else None, damage or Damage())
    if info is None:
        raise RecordingError(f"{path}: its header is damaged (the machine's description cannot be read)")
    label = header.get("label")
    label = printable(label) if isinstance(label, str) and label else info.label
    return replace(info, source=f"replay: {path.name}", label=label), header


class ReplaySource:
    """Plays a recording back at ``speed`` x real time, optionally looping. Timestamps are shifted to now.

    ``damage`` counts what the current pass over the file left out or read as n/a.
    """

    def __init__(self, path: str | Path, *, speed: float = 1.0, loop: bool = False) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError("replay speed must be a number > 0")
        self.path = Path(path)
        self.speed = speed
        self.loop = loop
        self._header_damage = Damage()
        self.info, self.header = read_header(self.path, self._header_damage)
        self.damage = self._header_damage
        self._file: IO[str] | None = None
        self._pending: Snapshot | None = None
        self._delay_s = 0.25
        self._offset_s = 0.0
        self.position_s = 0.0  # seconds into the recording
        self._first_time_s: float | None = None

    def open(self) -> SystemInfo:
        self._rewind()
        if self._pending is None:
            why = f" ({self.damage.summary()})" if self.damage.summary() else ""
            raise RecordingError(f"{self.path} holds no readable snapshot{why}")
        return self.info

    def _rewind(self) -> None:
        if self._file is not None:
            self._file.close()
        self.damage = copy.deepcopy(self._header_damage)  # this pass's count starts from the header's
        try:
            self._file = _open_text(self.path, "r")
        except OSError as exc:  # gone or locked since its header was read
            raise RecordingError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self._read_line()  # header
        self._pending = self._read_next()
        if self._pending is not None:
            self._first_time_s = self._pending.time_s
            self._offset_s = time.time() - self._pending.time_s

    def _read_line(self) -> str | None:
        """The next whole line; None at the end or at a cut-off last line. A line over the limit is skipped."""
        assert self._file is not None
        try:
            line = self._file.readline(MAX_LINE_CHARS)
            while _cut(line):
                self.damage.lines_skipped += 1
                while _cut(line):  # the rest of the long line
                    line = self._file.readline(MAX_LINE_CHARS)
                line = self._file.readline(MAX_LINE_CHARS)
        except _DAMAGED_FILE:
            return None
        if not line.endswith("\n"):
            return None  # the end, or the cut-off last line of an interrupted recording
        return line

    def _read_next(self) -> Snapshot | None:
        while (line := self._read_line()) is not None:
            data = _json(line)
            if not isinstance(data, dict):
                self.damage.lines_skipped += 1
                continue
            if data.get("type") != "snapshot":
                continue  # a header again (recordings joined with cat), or a kind of line a later infertop adds
            snap = parse_snapshot(data, self.damage)
            if snap is not None:
                return snap
            self.damage.lines_skipped += 1
        return None

    def next_snapshot(self) -> Snapshot | None:
        current = self._pending
        if current is None:
            if not self.loop:
                return None
            try:
                self._rewind()
            except RecordingError:  # the file went away: the replay ends
                return None
            current = self._pending
            if current is None:
                return None
        self._pending = self._read_next()
        if self._pending is not None:
            gap_s = min(MAX_GAP_S, max(0.0, self._pending.time_s - current.time_s))
            self._delay_s = gap_s / self.speed
        first_s = current.time_s if self._first_time_s is None else self._first_time_s
        self.position_s = current.time_s - first_s
        return _shift(current, self._offset_s, self.position_s)

    def next_delay_s(self) -> float:
        return self._delay_s

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _cut(line: str) -> bool:
    """Whether a line read with the limit stopped at the limit, not at its end."""
    return len(line) == MAX_LINE_CHARS and not line.endswith("\n")


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


# --- reading a recorded snapshot: hostile until checked ------------------------------------------------


class Damage:
    """What replay could not use, counted so that a damaged recording says so instead of looking quiet: lines
    skipped (not JSON, too long, a snapshot without a valid time), and fields read as n/a or records left out
    (:class:`~tuner.telemetry.foreign.Problems`, with the first reasons in words)."""

    def __init__(self) -> None:
        self.lines_skipped = 0
        self.problems = Problems()

    def summary(self) -> str | None:
        """'2 lines skipped, 5 fields or records unreadable (gpus[0].power_w: not finite (inf), ...)', or None."""
        parts = []
        if self.lines_skipped:
            parts.append(f"{self.lines_skipped} lines skipped")
        if self.problems.count:
            parts.append(
                f"{self.problems.count} fields or records unreadable ({self.problems.first[0]}, ...)"
            )
        return ", ".join(parts) or None


# Text that reaches Textual markup on screen (the banner's message and GPU error, a user name in a cell of the
# process table): square brackets there are read as markup, which can fail or even bind a click to an action.
_NO_BRACKETS = str.maketrans("[]", "()")


def parse_snapshot(raw: object, damage: Damage | None = None) -> Snapshot | None:
    """A recorded snapshot, every field checked as a foreign host's are (:mod:`tuner.telemetry.foreign`), then
    made safe to show and to record again (:func:`_as_shown`); None when it has no valid time."""
    problems = damage.problems if damage is not None else Problems()
    try:
        snap = checked_snapshot(raw, problems)
    except ValueError:
        return None
    return _as_shown(snap, problems)


def _as_shown(snap: Snapshot, problems: Problems) -> Snapshot:
    """What a recording may hold that a foreign host's page may not: command lines (masked again: an older
    infertop kept their secrets), the same process twice, and text the screen would read as markup."""
    seen: set[tuple[int, int]] = set()
    gpus = []
    for i, gpu in enumerate(snap.gpus):
        processes = []
        for p in gpu.processes or ():
            if (p.gpu_index, p.pid) in seen:  # the process table has one row per GPU and pid
                problems.add(f"gpus[{i}].processes", f"process {p.pid} a second time: left out")
                continue
            seen.add((p.gpu_index, p.pid))
            if p.user is not None and any(c in p.user for c in " []"):  # no system's user name has them
                problems.add(f"gpus[{i}].processes", f"process {p.pid}'s user is no user name")
                p = replace(p, user=None)
            processes.append(replace(p, command=redact_command(p.command)) if p.command else p)
        gpus.append(replace(gpu, processes=tuple(processes)) if gpu.processes is not None else gpu)
    engines = tuple(replace(e, url=redact_url(e.url)) for e in snap.engines)
    gpu_error = snap.gpu_error.translate(_NO_BRACKETS) if snap.gpu_error is not None else None
    dcgm_status = snap.dcgm_status.translate(_NO_BRACKETS) if snap.dcgm_status is not None else None
    return replace(snap, gpus=tuple(gpus), engines=engines, gpu_error=gpu_error, dcgm_status=dcgm_status)


def _system_info(raw: object, damage: Damage) -> SystemInfo | None:
    """The machine a recording's header describes, checked as a foreign host's is; None when not described."""
    try:
        info = checked_system_info(raw, damage.problems)
    except ValueError:
        return None
    return replace(info, message=info.message.translate(_NO_BRACKETS))


def _json(line: str) -> Any:
    """The JSON value of a line; None for anything that is not one (too deep a nesting included)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None
