"""nv-hostengine through DCGM's own Python bindings, which ship with DCGM, not PyPI:
/usr/share/datacenter-gpu-manager-4/bindings/python3 (DCGM 4), /usr/local/dcgm/bindings/python3 (DCGM 3), or
``$INFERTOP_DCGM_BINDINGS``; imported when first needed (:func:`load_bindings`), never with infertop.

:class:`HostengineSource` reads only the latest values of fields DCGM already watches
(``dcgmEntitiesGetLatestValues``: a field nobody watches answers DCGM_ST_NOT_WATCHED and gains no watch,
DcgmCacheManager::GetLatestSample). Another tool's watches and sampling interval are its own; only
``watch=True`` (``--dcgm-watch``) makes infertop watch the fields, every second, which sets DCGM's sampling for
every client of those fields while infertop stays connected. Its values carry DCGM's own sample times. It asks
for whole GPUs only, never MIG instances.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import socket
import stat
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tuner.telemetry.dcgm.model import (
    DRAM_ACTIVE,
    FIELD_IDS,
    FIELDS,
    MAX_ENTRIES,
    DcgmField,
    DcgmGpuValues,
    DcgmReading,
    checked_value,
    every_words,
    gpu_values,
    host_port,
)
from tuner.telemetry.foreign import printable

BINDINGS_ENV = "INFERTOP_DCGM_BINDINGS"
BINDINGS_DIRS = ("/usr/share/datacenter-gpu-manager-4/bindings/python3", "/usr/local/dcgm/bindings/python3")
WATCH_INTERVAL_S = 1.0  # how often DCGM samples the fields infertop watches with --dcgm-watch
RECONNECT_S = 10.0  # how often a lost hostengine is tried again

_BY_ID = {f.field_id: f for f in FIELDS}
_RATIO_FIELDS = tuple(f for f in FIELDS if f.ratio)

# DCGM's status codes and blank values (testing/python3/dcgm_structs.py, dcgmvalue.py): stable C ABI.
DCGM_ST_OK = 0
DCGM_ST_NOT_SUPPORTED = -6
DCGM_ST_NO_DATA = -14
DCGM_ST_NOT_WATCHED = -16
DCGM_ST_NO_PERMISSION = -17
DCGM_ST_CONNECTION_NOT_VALID = -21
DCGM_ST_LIBRARY_NOT_FOUND = -25
DCGM_ST_MODULE_NOT_LOADED = -33
DCGM_ST_PROFILING_NOT_SUPPORTED = -36
DCGM_ST_PROFILING_MULTI_PASS = -38
DCGM_FP64_BLANK = 140737488355328.0
DCGM_INT64_BLANK = 0x7FFFFFFFFFFFFFF0
_STATUS_WORDS = {
    DCGM_ST_NOT_SUPPORTED: "not supported on this GPU",
    DCGM_ST_NO_DATA: "no sample yet",
    DCGM_ST_NO_PERMISSION: "not permitted",
    DCGM_ST_MODULE_NOT_LOADED: "DCGM's profiling module is not loaded",
    DCGM_ST_PROFILING_NOT_SUPPORTED: "profiling not supported on this GPU",
    DCGM_ST_PROFILING_MULTI_PASS: "these fields cannot be sampled together",
}


@dataclass(frozen=True)
class DcgmBindings:
    """DCGM's Python modules, imported from one install directory."""

    path: str
    structs: ModuleType  # dcgm_structs
    agent: ModuleType  # dcgm_agent
    fields: ModuleType  # dcgm_fields
    pydcgm: ModuleType  # pydcgm (for DcgmHandle, which connects the same way in DCGM 2, 3 and 4)


_BINDINGS_LOCK = threading.Lock()
_GROUP_NUMBERS = itertools.count(1)
_BINDINGS_MODULES = ("dcgmvalue", "dcgm_structs", "dcgm_fields", "dcgm_agent", "pydcgm")


def load_bindings(path: str | None = None) -> DcgmBindings | str:
    """DCGM's Python bindings from ``path``, else ``$INFERTOP_DCGM_BINDINGS``, else DCGM 4's then DCGM 3's
    install directory; or why not, in one line. Never raises.

    The bindings import each other by their bare names (``import dcgm_structs``), so their directory is on
    ``sys.path`` while they are imported, and only then."""
    chosen = path or os.environ.get(BINDINGS_ENV) or None
    candidates = (chosen,) if chosen else BINDINGS_DIRS
    found = next((d for d in candidates if os.path.isfile(os.path.join(d, "dcgm_agent.py"))), None)
    if found is None:
        where = " or ".join(candidates)
        hint = "" if chosen else f"; {BINDINGS_ENV} names another place"
        return f"DCGM's Python bindings are not installed (no dcgm_agent.py in {where}{hint})"
    found = os.path.abspath(found)
    with _BINDINGS_LOCK:
        loaded = sys.modules.get("dcgm_agent")
        if loaded is not None and os.path.dirname(os.path.abspath(loaded.__file__ or "")) != found:
            return f"other DCGM bindings are loaded already ({os.path.dirname(loaded.__file__ or '?')})"
        added = found not in sys.path
        if added:
            sys.path.insert(0, found)
        try:
            modules = [importlib.import_module(name) for name in _BINDINGS_MODULES]
        except (Exception, SystemExit) as exc:  # a broken install is a reason, never a traceback
            return f"DCGM's Python bindings in {found} do not load ({type(exc).__name__}: {printable(str(exc), 120)})"
        finally:
            if added:
                sys.path.remove(found)
    _, structs, fields, agent, pydcgm = modules
    return DcgmBindings(found, structs, agent, fields, pydcgm)


def _dcgm_code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)  # dcgm_structs.DCGMError keeps the DCGM_ST_* code here
    return value if isinstance(value, int) else None


def _dcgm_failure(exc: BaseException) -> str:
    code = _dcgm_code(exc)
    words = _STATUS_WORDS.get(code) if code is not None else None
    text = printable(str(exc) or type(exc).__name__, 160)
    return f"{words} ({text})" if words else text


def _probe_tcp(address: str, timeout_s: float) -> str | None:
    """Why nothing answers on ``address`` (HOST:PORT), or None when something does. DCGM's own connect
    retries for its whole timeout (5 s by default) when refused; this fails fast."""
    host, port = host_port(address)
    if host is None or port is None:
        return f"not a HOST:PORT ({address})"
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers there ({exc.strerror or type(exc).__name__})"


def _probe_unix(path: str) -> str | None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return None
        return "not a socket"
    except OSError as exc:
        return f"no socket there ({exc.strerror or type(exc).__name__})"


class HostengineSource:
    """Reads DCGM's latest profiling values from an nv-hostengine. Used from one thread only.

    Read-only unless ``watch``: then, once connected, it watches the fields on all GPUs every
    ``watch_interval_s`` (DCGM samples a field at the fastest interval any client asked for, so this changes
    the sampling for everyone reading those fields); the watch ends when infertop disconnects (connections are
    made without ``persistAfterDisconnect``)."""

    def __init__(
        self,
        bindings: DcgmBindings,
        *,
        address: str | None = None,
        unix_socket: str | None = None,
        watch: bool = False,
        watch_interval_s: float = WATCH_INTERVAL_S,
        connect_timeout_s: float = 1.0,
        reconnect_s: float = RECONNECT_S,
    ) -> None:
        self._b = bindings
        self._address = address
        self._unix_socket = unix_socket
        self.where = address if address else f"unix:{unix_socket}"
        self.via = f"nv-hostengine at {self.where}"
        self._watch = watch
        self._watch_interval_s = watch_interval_s
        self._connect_timeout_s = connect_timeout_s
        self._reconnect_s = reconnect_s
        self._handle: Any = None  # pydcgm.DcgmHandle
        self._tried_at_s: float | None = None
        self._connect_error: str | None = None
        self._uuids: dict[int, str | None] = {}
        self._field_group: Any = None
        self._watching: tuple[int, ...] = ()
        self._watch_error: str | None = None
        self._last_ts: dict[int, int] = {}  # gpuId -> DCGM's last DRAM-active timestamp (us)
        self._step_s: float | None = None  # the smallest step between two of them: DCGM's interval, at most

    @property
    def connected(self) -> bool:
        return self._handle is not None

    @property
    def interval_s(self) -> float | None:
        if self._watching:
            return self._watch_interval_s
        return self._step_s

    def read(self, now_s: float) -> DcgmReading:
        if self._handle is None:
            due = self._tried_at_s is None or not 0 <= now_s - self._tried_at_s < self._reconnect_s
            if due:
                self._tried_at_s = now_s
                self._connect_error = self._connect()
            if self._handle is None:
                why = self._connect_error or "not connected"
                return DcgmReading(now_s, self.via, None, (), f"DCGM at {self.where}: {why}", error=why)
        try:
            return self._read(now_s)
        except Exception as exc:  # whatever DCGM raises becomes the reading's error, not the thread's end
            why = _dcgm_failure(exc)
            if _dcgm_code(exc) == DCGM_ST_CONNECTION_NOT_VALID or not isinstance(
                exc, self._b.structs.DCGMError
            ):
                self._disconnect()
            return DcgmReading(now_s, self.via, None, (), f"DCGM at {self.where}: {why}", error=why)

    def _connect(self) -> str | None:
        if self._unix_socket is not None:
            refused = _probe_unix(self._unix_socket)
        else:
            refused = _probe_tcp(self._address or "", self._connect_timeout_s)
        if refused is not None:
            return refused
        timeout_ms = max(1, int(self._connect_timeout_s * 1000))
        try:
            if self._unix_socket is not None:
                handle = self._b.pydcgm.DcgmHandle(unixSocketPath=self._unix_socket, timeoutMs=timeout_ms)
            else:
                handle = self._b.pydcgm.DcgmHandle(ipAddress=self._address, timeoutMs=timeout_ms)
        except Exception as exc:
            if _dcgm_code(exc) == DCGM_ST_LIBRARY_NOT_FOUND:
                return f"DCGM's bindings ({self._b.path}) load, but its library libdcgm.so is not found"
            return f"DCGM refused the connection: {_dcgm_failure(exc)}"
        self._handle = handle
        self._uuids = {}
        if self._watch:
            self._watch_error = self._add_watch()
        return None

    def _add_watch(self) -> str | None:
        """Watch the fields on all GPUs; when DCGM cannot sample them all together (GPUs without NVLink, or
        metric groups that need several passes), the core ratios alone."""
        agent, structs = self._b.agent, self._b.structs
        core = tuple(f.field_id for f in _RATIO_FIELDS)
        why = "DCGM refused the watch"
        for field_ids in (FIELD_IDS, core):
            group = None
            try:
                name = f"infertop-{os.getpid()}-{next(_GROUP_NUMBERS)}"  # unique: a lost one may linger
                group = agent.dcgmFieldGroupCreate(self._handle.handle, list(field_ids), name)
                every_us = int(self._watch_interval_s * 1_000_000)
                keep_s = max(60.0, 10 * self._watch_interval_s)
                agent.dcgmWatchFields(
                    self._handle.handle, structs.DCGM_GROUP_ALL_GPUS, group, every_us, keep_s, 0
                )
            except Exception as exc:
                why = f"DCGM refused to watch fields {_ids(field_ids)}: {_dcgm_failure(exc)}"
                if group is not None:
                    self._destroy_group(group)
                continue
            self._field_group, self._watching = group, field_ids
            return None
        return why

    def _destroy_group(self, group: Any) -> None:
        with contextlib.suppress(Exception):  # gone with the connection already
            self._b.agent.dcgmFieldGroupDestroy(self._handle.handle, group)

    def _read(self, now_s: float) -> DcgmReading:
        agent, structs, fields = self._b.agent, self._b.structs, self._b.fields
        gpu_ids = [int(g) for g in agent.dcgmGetAllSupportedDevices(self._handle.handle)][:MAX_ENTRIES]
        for gpu_id in gpu_ids:
            if self._uuids.get(gpu_id) is None:
                self._uuids[gpu_id] = self._uuid(gpu_id)
        entities = [structs.c_dcgmGroupEntityPair_t(fields.DCGM_FE_GPU, g) for g in gpu_ids]
        fvs = (
            agent.dcgmEntitiesGetLatestValues(self._handle.handle, entities, list(FIELD_IDS), 0)
            if entities
            else []
        )
        entries: dict[int, dict[str, Any]] = {g: {"uuid": self._uuids.get(g), "index": g} for g in gpu_ids}
        stamps: dict[int, int] = {}
        statuses: dict[int, dict[int, int]] = {g: {} for g in gpu_ids}  # gpuId -> fieldId -> DCGM_ST_*
        for fv in fvs:
            gpu_id, field = int(fv.entityId), _BY_ID.get(int(fv.fieldId))
            if gpu_id not in entries or field is None:
                continue
            statuses[gpu_id][field.field_id] = int(fv.status)
            value = _fv_value(fv, field) if int(fv.status) == DCGM_ST_OK else None
            if value is None:
                continue
            entries[gpu_id][field.attr] = value
            ts = int(fv.ts)
            if 0 < ts < 10**17:  # microseconds since the epoch, before year 5000
                stamps[gpu_id] = max(stamps.get(gpu_id, 0), ts)
                if field.field_id == DRAM_ACTIVE.field_id:
                    self._note_step(gpu_id, ts)
        gpus = tuple(gpu_values(e, stamps[g] / 1e6 if g in stamps else None) for g, e in entries.items())
        return DcgmReading(now_s, self.via, self.interval_s, gpus, self._status(gpus, statuses))

    def _uuid(self, gpu_id: int) -> str | None:
        """The GPU's UUID from its attributes: DCGM reads those live, without a watch (DcgmApi.cpp)."""
        try:
            raw = self._b.agent.dcgmGetDeviceAttributes(self._handle.handle, gpu_id).identifiers.uuid
        except Exception:
            return None
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return printable(text.strip(), 96) or None

    def _note_step(self, gpu_id: int, ts_us: int) -> None:
        last = self._last_ts.get(gpu_id)
        self._last_ts[gpu_id] = ts_us
        if last is not None and ts_us > last:
            step_s = (ts_us - last) / 1e6
            self._step_s = step_s if self._step_s is None else min(self._step_s, step_s)

    def _status(self, gpus: Sequence[DcgmGpuValues], statuses: Mapping[int, Mapping[int, int]]) -> str:
        if not gpus:
            return f"DCGM at {self.where} sees no GPU it supports"
        dram = [s.get(DRAM_ACTIVE.field_id) for s in statuses.values()]
        if self._watch_error is not None and not any(g.has_values() for g in gpus):
            return f"DCGM at {self.where}: {self._watch_error}"
        if all(code == DCGM_ST_NOT_WATCHED for code in dram):
            return (
                f"DCGM at {self.where} watches no DRAM active (field {DRAM_ACTIVE.field_id}); "
                "--dcgm-watch asks it to"
            )
        if not any(g.has_values() for g in gpus):
            codes = sorted({c for c in dram if c is not None and c != DCGM_ST_OK})
            why = ", ".join(_STATUS_WORDS.get(c, f"DCGM status {c}") for c in codes) or "no values"
            return f"DCGM at {self.where} gives no DRAM active ({why})"
        if self._watching:
            every = (
                f"watching fields {_ids(self._watching)} every {every_words(self._watch_interval_s)} at infertop's "
                "request (this sets DCGM's sampling for every client of these fields)"
            )
        elif self._step_s is not None:
            every = f"sampled every {every_words(self._step_s)} or faster"
        else:
            every = "sampling interval not known yet"
        refused = f"; {self._watch_error}" if self._watch_error is not None else ""
        return f"DCGM via {self.via}, {every}{refused}"

    def _disconnect(self) -> None:
        if self._handle is not None and self._field_group is not None:
            self._destroy_group(self._field_group)  # DCGM drops the watch with our connection too
        handle, self._handle, self._field_group = self._handle, None, None
        self._watching, self._last_ts, self._step_s = (), {}, None
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.Shutdown()

    def close(self) -> None:
        self._disconnect()


def _fv_value(fv: Any, field: DcgmField) -> float | None:
    """One dcgmFieldValue_v2's value, None when DCGM left it blank (dcgmvalue.py: >= the blank base)."""
    code = fv.fieldType  # a c_short holding the type's letter (dcgm_fields.DCGM_FT_DOUBLE is "d")
    kind = chr(code) if isinstance(code, int) and 0 <= code < 128 else str(code)
    if kind == "d":
        raw: float = float(fv.value.dbl)
        if raw >= DCGM_FP64_BLANK:
            return None
    elif kind == "i":
        raw_int = int(fv.value.i64)
        if raw_int >= DCGM_INT64_BLANK:
            return None
        raw = float(raw_int)
    else:
        return None
    return checked_value(field, raw)


def _ids(field_ids: Sequence[int]) -> str:
    """1002-1005, 1009-1012: field ids in runs."""
    runs: list[list[int]] = []
    for i in sorted(field_ids):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
