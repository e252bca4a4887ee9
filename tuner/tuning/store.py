"""Trials on disk: one SQLite file per tuning run, written as each trial starts and ends, for ``--resume``.

A tuning run takes hours and dies in the ways long jobs die (Ctrl-C, an OOM-killed tuner, a reboot). Every
write commits at once (WAL journal, full sync), so a crash loses at most the trial under way. Reopening the
file for the same model, hardware, SLO and workload continues the run: :meth:`TrialStore.done_keys` lists the
trials with a result, and a trial a crash left ``running`` becomes ``interrupted`` and is tried again.
Reopening it for anything else is refused: results measured under other conditions must not mix.

One process writes a file at a time (an advisory lock on the file says so); within it, one lock serialises
calls from any thread. A new file is created 0600 (SQLite gives its journal the same mode): trials hold vLLM's
log tails, which are nobody else's to read.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tuner.tuning.space import Candidate, SpaceError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one tuner per file is then the operator's care
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BestPoint",
    "RunMeta",
    "ServerRecord",
    "StoreError",
    "TrialRecord",
    "TrialStatus",
    "TrialStore",
    "load_run",
]

SCHEMA_VERSION = 2  # 2: capacity per trial (open or closed loop), running servers
INTERRUPTED_REASON = "left running when the tuner stopped (crash or Ctrl-C); tried again on resume"


class StoreError(Exception):
    """The trial file cannot be used (another run's file, in use, not a trial store). One line for people."""


class TrialStatus(str, enum.Enum):
    """Where a trial is. FEASIBLE / INFEASIBLE / FAILED are results; the rest are retried on resume."""

    PENDING = "pending"  # planned, not started
    RUNNING = "running"
    FEASIBLE = "feasible"  # the server ran and some load met the SLO
    INFEASIBLE = "infeasible"  # rejected before launch, or no load met the SLO
    FAILED = "failed"  # the server did not start or died (OOM, engine error)
    INTERRUPTED = "interrupted"  # the tuner stopped during the trial


FINISHED = frozenset({TrialStatus.FEASIBLE, TrialStatus.INFEASIBLE, TrialStatus.FAILED})


@dataclass(frozen=True, slots=True)
class BestPoint:
    """A trial's best load that met the SLO: ``kind`` "rate" (requests/s) or "users" (concurrent)."""

    load: float
    output_tokens_per_s: float
    kind: str = "users"


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """A vLLM server a tuner started and had not stopped yet (its process group is ``pid``)."""

    pid: int
    port: int
    key: str
    create_time: float | None  # the process's start time, so a recycled pid is never taken for it
    started_s: float


@dataclass(frozen=True, slots=True)
class RunMeta:
    """What a run is about. ``model``, ``hardware``, ``slo`` and ``workload`` must match to resume; ``space``
    may change (a resumed run can widen its search)."""

    model: str
    hardware: Mapping[str, Any]
    slo: Mapping[str, Any]
    space: Mapping[str, Any] = field(default_factory=dict)
    workload: Mapping[str, Any] = field(default_factory=dict)  # input/output lengths, phase lengths, ...
    created_s: float | None = None  # set by the store


@dataclass(frozen=True, slots=True)
class TrialRecord:
    """One trial as stored. ``capacity`` is the JSON-able capacity search (points with their phases)."""

    key: str
    candidate: Candidate
    status: TrialStatus
    reason: str | None
    log_tail: str | None
    best: BestPoint | None
    capacity: Mapping[str, Any] | None
    startup_s: float | None
    attempts: int  # times the trial was started
    started_s: float | None
    finished_s: float | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    model TEXT NOT NULL,
    hardware TEXT NOT NULL,
    slo TEXT NOT NULL,
    space TEXT NOT NULL,
    workload TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    candidate TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    log_tail TEXT,
    best_load REAL,
    best_load_kind TEXT,
    best_output_tok_s REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS servers (
    pid INTEGER PRIMARY KEY,
    port INTEGER NOT NULL,
    key TEXT NOT NULL,
    create_time REAL,
    started REAL NOT NULL
);
"""
_COLUMN_NAMES = (
    "key",
    "candidate",
    "status",
    "reason",
    "log_tail",
    "best_load",
    "best_load_kind",
    "best_output_tok_s",
    "metrics",
    "attempts",
    "started",
    "finished",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.OperationalError as error:  # unreadable directory, no permission, disk full
        raise StoreError(f"cannot open {path}: {error}") from None
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is not an infertop trial store ({error})") from None
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if tables and not {"run", "trials"} <= tables:
        conn.close()
        raise StoreError(f"{path} is not an infertop trial store")
    if tables and version != SCHEMA_VERSION:
        conn.close()
        raise StoreError(
            f"{path} was written by another version of infertop (store version {version}, this one reads "
            f"{SCHEMA_VERSION}): tune into a new file with --store"
        )
    return conn


def _read_meta(conn: sqlite3.Connection) -> RunMeta | None:
    row = conn.execute("SELECT model, hardware, slo, space, workload, created FROM run").fetchone()
    if row is None:
        return None
    model, hardware, slo, space, workload, created = row
    return RunMeta(
        model, json.loads(hardware), json.loads(slo), json.loads(space), json.loads(workload), created
    )


def _record(row: tuple[Any, ...]) -> TrialRecord:
    (
        key,
        candidate,
        status,
        reason,
        log_tail,
        best_load,
        best_kind,
        best_tok_s,
        metrics,
        attempts,
        started,
        finished,
    ) = row
    try:
        parsed = Candidate.from_config_dict(json.loads(candidate))
    except SpaceError as error:
        raise StoreError(f"trial {key}: stored candidate is unreadable ({error})") from None
    best = (
        BestPoint(float(best_load), float(best_tok_s), str(best_kind or "users"))
        if best_load is not None and best_tok_s is not None
        else None
    )
    stored = json.loads(metrics)
    return TrialRecord(
        key,
        parsed,
        TrialStatus(status),
        reason,
        log_tail,
        best,
        stored.get("capacity"),
        stored.get("startup_s"),
        attempts,
        started,
        finished,
    )


class TrialStore:
    """The trials of one tuning run in one SQLite file. Open with :meth:`open`; close (or use ``with``)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None, clock: Callable[[], float]):
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self._clock = clock
        self._mutex = threading.Lock()
        self.interrupted_on_open = 0  # trials a previous tuner left running, now marked interrupted

    @classmethod
    def open(
        cls, path: str | Path, *, run_meta: RunMeta, clock: Callable[[], float] = time.time
    ) -> TrialStore:
        """Create the file for a new run, or reopen it to resume the same run.

        Raises:
            StoreError: the file belongs to a run of another model, hardware, SLO or workload; another
                process is writing it; or it is not a trial store.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create {path.parent}: {error.strerror}") from None
        _create_private(path)
        conn = _connect(path)
        lock_fd = _lock(path, conn)
        store = cls(path, conn, lock_fd, clock)
        try:
            store._start_run(run_meta)
        except BaseException:
            store.close()
            raise
        return store

    def _start_run(self, meta: RunMeta) -> None:
        with self._mutex, self._conn:  # one transaction: schema, run row, interrupted trials
            self._conn.execute("BEGIN IMMEDIATE")
            # Not executescript: it would commit the transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            stored = _read_meta(self._conn)
            if stored is None:
                row = (
                    meta.model,
                    *map(_json, (meta.hardware, meta.slo, meta.space, meta.workload)),
                    self._clock(),
                )
                self._conn.execute(
                    "INSERT INTO run (id, model, hardware, slo, space, workload, created) VALUES (1, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            else:
                _check_same_run(self.path, stored, meta)
                self._conn.execute("UPDATE run SET space = ?", (_json(meta.space),))
            cursor = self._conn.execute(
                "UPDATE trials SET status = ?, reason = ? WHERE status = ?",
                (TrialStatus.INTERRUPTED.value, INTERRUPTED_REASON, TrialStatus.RUNNING.value),
            )
            self.interrupted_on_open = cursor.rowcount

    # --- writes (each commits at once) ---------------------------------------------------------------

    def record_planned(self, candidates: Iterable[Candidate]) -> None:
        """Add trials as ``pending`` (those already known keep their state)."""
        rows = [(c.key(), _json(c.config_dict()), TrialStatus.PENDING.value) for c in candidates]
        with self._mutex, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT OR IGNORE INTO trials (key, candidate, status) VALUES (?, ?, ?)", rows
            )

    def record_start(self, candidate: Candidate) -> None:
        """Mark ``candidate``'s trial ``running`` (a rerun clears its previous result)."""
        self._upsert(
            candidate,
            status=TrialStatus.RUNNING,
            reason=None,
            log_tail=None,
            best=None,
            capacity=None,
            startup_s=None,
            started=self._clock(),
            finished=None,
            attempt=1,
        )

    def record_result(
        self,
        candidate: Candidate,
        status: TrialStatus | str,
        reason: str | None = None,
        capacity: Mapping[str, Any] | None = None,
        best: BestPoint | None = None,
        *,
        log_tail: str | None = None,
        startup_s: float | None = None,
    ) -> None:
        """Store how ``candidate``'s trial ended. A candidate never started (rejected before launch) is
        recorded directly. ``capacity`` (the capacity search, :meth:`Capacity.to_dict`) must be JSON-able.

        Raises:
            ValueError: ``status`` is not a result (feasible, infeasible, failed) or ``interrupted``.
        """
        status = TrialStatus(status)
        if status not in FINISHED and status is not TrialStatus.INTERRUPTED:
            raise ValueError(f"record_result takes a result status, not {status.value!r}")
        self._upsert(
            candidate,
            status=status,
            reason=reason,
            log_tail=log_tail,
            best=best,
            capacity=capacity,
            startup_s=startup_s,
            started=None,
            finished=self._clock(),
            attempt=0,
        )

    def _upsert(
        self,
        candidate: Candidate,
        *,
        status: TrialStatus,
        reason: str | None,
        log_tail: str | None,
        best: BestPoint | None,
        capacity: Mapping[str, Any] | None,
        startup_s: float | None,
        started: float | None,
        finished: float | None,
        attempt: int,
    ) -> None:
        metrics = json.dumps({"capacity": capacity, "startup_s": startup_s})
        best_load = best.load if best else None
        best_kind = best.kind if best else None
        best_tok_s = best.output_tokens_per_s if best else None
        with self._mutex:
            self._conn.execute(
                f"""INSERT INTO trials ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(key) DO UPDATE SET status = excluded.status, reason = excluded.reason,
                    log_tail = excluded.log_tail, best_load = excluded.best_load,
                    best_load_kind = excluded.best_load_kind,
                    best_output_tok_s = excluded.best_output_tok_s, metrics = excluded.metrics,
                    attempts = attempts + excluded.attempts,
                    started = coalesce(excluded.started, started), finished = excluded.finished""",
                (
                    *(candidate.key(), _json(candidate.config_dict()), status.value, reason, log_tail),
                    *(best_load, best_kind, best_tok_s, metrics, attempt, started, finished),
                ),
            )

    # --- reads ---------------------------------------------------------------------------------------

    @property
    def run_meta(self) -> RunMeta:
        with self._mutex:
            meta = _read_meta(self._conn)
        assert meta is not None  # written by open()
        return meta

    def trials(self) -> list[TrialRecord]:
        """Every trial, in the order they were first recorded."""
        with self._mutex:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM trials ORDER BY id").fetchall()
        return [_record(row) for row in rows]

    def done_keys(self) -> set[str]:
        """Keys of trials with a result: what ``--resume`` skips. Pending, running and interrupted are not."""
        marks = ",".join("?" * len(FINISHED))
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT key FROM trials WHERE status IN ({marks})", [s.value for s in FINISHED]
            ).fetchall()
        return {row[0] for row in rows}

    # --- running servers -----------------------------------------------------------------------------

    def record_server(self, key: str, pid: int, port: int, create_time: float | None) -> None:
        """A server of this run started: if the tuner dies without stopping it, ``--resume`` will."""
        with self._mutex:
            self._conn.execute(
                "INSERT OR REPLACE INTO servers (pid, port, key, create_time, started) VALUES (?, ?, ?, ?, ?)",
                (pid, port, key, create_time, self._clock()),
            )

    def forget_server(self, pid: int) -> None:
        """The server was stopped (its whole process group is gone)."""
        with self._mutex:
            self._conn.execute("DELETE FROM servers WHERE pid = ?", (pid,))

    def servers(self) -> list[ServerRecord]:
        """Servers recorded as running: on a fresh open, the ones an earlier tuner left behind."""
        with self._mutex:
            rows = self._conn.execute("SELECT pid, port, key, create_time, started FROM servers").fetchall()
        return [ServerRecord(int(pid), int(port), str(key), ct, float(st)) for pid, port, key, ct, st in rows]

    # --- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database and release the file for another tuner."""
        with self._mutex:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def load_run(path: str | Path) -> tuple[RunMeta, list[TrialRecord]]:
    """Read a run without opening it for writing (reports, a second terminal); nothing is changed.

    Raises:
        StoreError: no such file, or not a trial store.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such trial store")
    with contextlib.closing(_connect(path)) as conn:
        meta = _read_meta(conn)
        if meta is None:
            raise StoreError(f"{path} holds no tuning run")
        rows = conn.execute(f"SELECT {_COLUMNS} FROM trials ORDER BY id").fetchall()
    return meta, [_record(row) for row in rows]


def _check_same_run(path: Path, stored: RunMeta, meta: RunMeta) -> None:
    if stored.model != meta.model:
        raise StoreError(
            f"{path} holds a run for model {stored.model!r}, not {meta.model!r}: use another file"
        )
    for name in ("hardware", "slo", "workload"):
        if _json(getattr(stored, name)) != _json(getattr(meta, name)):
            raise StoreError(
                f"{path} holds a run with another {name} ({_describe(getattr(stored, name))}): "
                "use another file to tune under new conditions"
            )


def _describe(value: Mapping[str, Any]) -> str:
    return str(value.get("name") or value.get("gpu_name") or _json(value))[:80]


def _create_private(path: Path) -> None:
    """Create the file 0600 before SQLite opens it (SQLite would create it 0644 under the usual umask); an
    existing file, a resumed run's, is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as error:
        raise StoreError(f"cannot create {path}: {error.strerror}") from None
    os.close(fd)


def _lock(path: Path, conn: sqlite3.Connection) -> int | None:
    """Take the file's advisory write lock; flock is separate from SQLite's own (POSIX) locks."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        conn.close()
        raise StoreError(
            f"{path} is in use by another infertop tune; wait for it or use another file"
        ) from None
    return fd
