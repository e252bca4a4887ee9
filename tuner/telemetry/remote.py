"""Other hosts, read from their `infertop exporter`: the fleet beside the local GPUs.

Each host is read by its own thread from the exporter's ``/snapshot.json`` (the same readings as its
``/metrics``, lossless and cheap to parse), so a host that hangs delays nobody. A host that stops answering
keeps its last reading, marked stale with its age; one that never answered says why.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tuner.telemetry.model import (
    Snapshot,
    SystemInfo,
    snapshot_from_dict,
    system_info_from_dict,
)

DEFAULT_EXPORTER_PORT = 9400
SNAPSHOT_FORMAT = 1  # tuner.telemetry.exporter.SNAPSHOT_FORMAT (not imported: it pulls prometheus_client in)
DEFAULT_INTERVAL_S = 2.0
"""How often a remote host is read: a fleet overview; the local GPUs keep their own 4 Hz (BENCHMARKS.md §10)."""
STALE_AFTER_S = 3 * DEFAULT_INTERVAL_S
"""A reading older than this is shown as stale (its host stopped answering, or answers late)."""
HISTORY_LEN = 120


def host_url(text: str) -> str:
    """'node-2', 'node-2:9400' or 'http://node-2:9400' -> 'http://node-2:9400'. Raises ValueError in words."""
    text = text.strip().rstrip("/")
    if not text:
        raise ValueError("--host: empty host")
    if "://" not in text:
        text = "http://" + text
    scheme, _, rest = text.partition("://")
    if scheme not in ("http", "https"):
        raise ValueError(f"--host {text!r}: only http:// and https:// exporters")
    try:
        url = httpx.URL(text)
        port = url.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"--host {text!r}: not a host or URL ({exc})") from None
    if not url.host:
        raise ValueError(f"--host {text!r}: no host name")
    if port is None:
        text = f"{scheme}://{rest.split('/')[0]}:{DEFAULT_EXPORTER_PORT}"
    return text.removesuffix("/metrics").removesuffix("/snapshot.json")


def read_hosts_file(path: Path) -> list[str]:
    """One host per line; blank lines and '#' comments skipped. Raises ValueError in words."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--hosts {path}: {exc.strerror or exc}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            try:
                hosts.append(host_url(entry))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return hosts


@dataclass(frozen=True, slots=True)
class RemoteHost:
    """What is known of one remote host now."""

    url: str
    info: SystemInfo | None = None  # its machine, once it answered
    snapshot: Snapshot | None = None  # its last good reading
    error: str | None = None  # why the last read failed ("" never)
    last_ok_s: float | None = None  # when (this machine's clock, epoch s) it last answered
    bw_history: tuple[float | None, ...] = ()  # mean GPM DRAM bandwidth % over its GPUs, per reading
    reading_age_s: float | None = None  # how old its reading was when it answered, by its own clock
    stale_after_s: float = STALE_AFTER_S  # older than this, the reading is shown as stale

    @property
    def name(self) -> str:
        if self.snapshot is not None and self.snapshot.host is not None:
            return self.snapshot.host.hostname
        return httpx.URL(self.url).host or self.url

    def age_s(self, now_s: float) -> float | None:
        """How old the reading shown is: since the host last answered, plus how old its reading was then."""
        if self.last_ok_s is None:
            return None
        return max(0.0, now_s - self.last_ok_s) + (self.reading_age_s or 0.0)

    def state(self, now_s: float) -> str:
        """'waiting' (never tried yet), 'down' (never answered), 'stale' (answered, not lately) or 'ok'."""
        if self.last_ok_s is None:
            return "down" if self.error else "waiting"
        if self.error or (self.age_s(now_s) or 0.0) > self.stale_after_s:
            return "stale"
        return "ok"


def parse_snapshot_page(payload: object) -> tuple[SystemInfo, Snapshot, float | None]:
    """An exporter's /snapshot.json -> (its machine, its reading, the reading's age by its clock). Raises
    ValueError in words for anything else, whatever the page holds: what reaches the screen is well typed."""
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        raise ValueError("not an infertop exporter of this version (/snapshot.json format differs)")
    if not isinstance(payload.get("info"), dict) or not isinstance(payload.get("snapshot"), dict):
        raise ValueError("the exporter has no reading yet")
    age = payload.get("age_s")
    try:
        info, snap = system_info_from_dict(payload["info"]), snapshot_from_dict(payload["snapshot"])
        for obj in (info, *info.gpus, snap, snap.host, *snap.gpus, *snap.engines):
            _check_types(obj)
        for gpu in snap.gpus:
            for process in gpu.processes or ():
                _check_types(process)
    except Exception as exc:  # a foreign or damaged page: any shape at all
        raise ValueError(f"unreadable /snapshot.json ({type(exc).__name__}: {exc})") from None
    if age is not None and not isinstance(age, (int, float)):
        raise ValueError("unreadable /snapshot.json (age_s is not a number)")
    return info, snap, float(age) if age is not None else None


_NUMBER = (int, float)


def _check_types(obj: object) -> None:
    """Each field holds what its annotation allows (numbers where numbers go, text where text goes): JSON from
    another machine is data, not a promise."""
    if obj is None:
        return
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        kind = str(f.type)
        if value is None or f.name in ("gpus", "processes", "engines", "host", "extra", "state"):
            continue
        if kind.startswith(("float", "int")) and (isinstance(value, bool) or not isinstance(value, _NUMBER)):
            raise TypeError(f"{type(obj).__name__}.{f.name} is not a number")
        if kind.startswith("str") and not isinstance(value, str):
            raise TypeError(f"{type(obj).__name__}.{f.name} is not text")
        if kind.startswith("bool") and not isinstance(value, bool):
            raise TypeError(f"{type(obj).__name__}.{f.name} is not true/false")
        if kind.startswith("tuple") and not isinstance(value, (tuple, list)):
            raise TypeError(f"{type(obj).__name__}.{f.name} is not a list")


def mean_dram_pct(snap: Snapshot) -> float | None:
    values = [g.dram_bw_util_pct for g in snap.gpus if g.dram_bw_util_pct is not None]
    return sum(values) / len(values) if values else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "not reachable (connection refused or no route)"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.HTTPStatusError):
        if exc.response.status_code == 404:
            return "HTTP 404: no infertop exporter there (no /snapshot.json; an older exporter, or another server?)"
        return f"HTTP {exc.response.status_code} from its exporter"
    if isinstance(exc, ValueError):
        return str(exc) or "unreadable answer"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}"


class _HostReader:
    """Reads one host on its own thread."""

    def __init__(self, url: str, interval_s: float, timeout_s: float, clock: Callable[[], float]) -> None:
        self.url = url
        self._interval_s = interval_s
        self._stale_after_s = max(STALE_AFTER_S, 3 * interval_s)
        self._clock = clock
        self._client = httpx.Client(timeout=timeout_s)
        self._lock = threading.Lock()
        self._state = RemoteHost(url, stale_after_s=self._stale_after_s)
        self._bw: deque[float | None] = deque(maxlen=HISTORY_LEN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"infertop-remote-{url}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def latest(self) -> RemoteHost:
        with self._lock:
            return self._state

    def read_once(self) -> RemoteHost:
        """One read now (the thread's loop, and tests)."""
        now = self._clock()
        try:
            response = self._client.get(self.url + "/snapshot.json")
            response.raise_for_status()
            try:
                payload = response.json()
            except ValueError:
                raise ValueError("not an infertop exporter (its /snapshot.json is not JSON)") from None
            info, snap, age = parse_snapshot_page(payload)
        except Exception as exc:  # whatever the host does, its reader lives on and says why
            with self._lock:
                self._state = dataclasses.replace(self._state, error=_describe(exc))
                return self._state
        self._bw.append(mean_dram_pct(snap))
        with self._lock:
            self._state = RemoteHost(
                self.url, info, snap, None, now, tuple(self._bw), age, stale_after_s=self._stale_after_s
            )
            return self._state

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self.read_once()
                self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started)))
        finally:
            self._client.close()

    def stop(self, timeout_s: float) -> None:
        """Stop reading; wait up to ``timeout_s`` for a read in progress (a hung host: its timeout ends it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        elif self._thread.ident is None:  # never started: nothing else will close the client
            self._client.close()


class RemoteWatcher:
    """Reads every remote host at ``interval_s``, each on its own thread; :meth:`latest` never waits."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.urls = list(dict.fromkeys(urls))
        self.interval_s = interval_s
        self.clock = clock
        self._readers = [_HostReader(u, interval_s, timeout_s, clock) for u in self.urls]

    def start(self) -> None:
        for reader in self._readers:
            reader.start()

    def read_all_once(self) -> None:
        """Read every host once on the caller's thread (tests, benchmarks)."""
        for reader in self._readers:
            reader.read_once()

    def latest(self) -> tuple[RemoteHost, ...]:
        return tuple(reader.latest() for reader in self._readers)

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop every reader (all told at once, then each waited for, up to ``timeout_s`` in all)."""
        for reader in self._readers:
            reader._stop.set()
        deadline = time.monotonic() + timeout_s
        for reader in self._readers:
            reader.stop(max(0.0, deadline - time.monotonic()))


@dataclass(frozen=True, slots=True)
class HostSummary:
    """One remote host in a line: what an operator scans 32 of."""

    gpus: int
    gpu_name: str  # the GPUs' model ("H100 80GB HBM3"), "mixed" when they differ
    lost: int  # GPUs that did not read
    dram_pct: float | None  # mean GPM DRAM bandwidth % (None without GPM)
    sm_pct: float | None  # mean GPM SM active %
    duty_pct: float | None  # mean kernel duty cycle % (where GPM is absent)
    vram_used_bytes: int | None
    vram_total_bytes: int | None
    power_w: float | None
    power_limit_w: float | None
    max_temp_c: float | None
    throttled: int  # GPUs with a costly clock-event reason now
    tokens_per_s: float | None  # generated tokens/s over its inference servers
    engines: int


def _sum(values: Sequence[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarise_host(info: SystemInfo | None, snap: Snapshot) -> HostSummary:
    """The line of one host, from its reading."""
    gpus = [g for g in snap.gpus if not g.error]
    names = {g.name.replace("NVIDIA ", "") for g in (info.gpus if info else ())}
    used = _sum([g.vram_used_bytes for g in gpus])
    total = _sum([g.vram_total_bytes for g in gpus])
    return HostSummary(
        gpus=len(snap.gpus),
        gpu_name=names.pop() if len(names) == 1 else ("mixed" if names else "?"),
        lost=len(snap.gpus) - len(gpus),
        dram_pct=_mean([g.dram_bw_util_pct for g in gpus]),
        sm_pct=_mean([g.sm_active_pct for g in gpus]),
        duty_pct=_mean([g.gpu_util_pct for g in gpus]),
        vram_used_bytes=int(used) if used is not None else None,
        vram_total_bytes=int(total) if total is not None else None,
        power_w=_sum([g.power_w for g in gpus]),
        power_limit_w=_sum([g.power_limit_w for g in gpus]),
        max_temp_c=max((g.gpu_temp_c for g in gpus if g.gpu_temp_c is not None), default=None),
        throttled=sum(1 for g in gpus if g.throttled),
        tokens_per_s=_sum([e.generation_tokens_per_s for e in snap.engines if not e.error]),
        engines=sum(1 for e in snap.engines if not e.error),
    )
