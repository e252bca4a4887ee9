"""Other hosts, read from their `infertop exporter`: the fleet beside the local GPUs.

Each host is read by its own thread from the exporter's ``/snapshot.json`` (the same readings as its
``/metrics``, lossless and cheap to parse), so a host that hangs delays nobody. A host that stops answering
keeps its last reading, marked stale with its age; one that never answered says why.

Another host is a peer, not a trusted part of this program: each read ends within its deadline (a host that
trickles turns stale), a page over 8 MiB is refused unread (:mod:`tuner.telemetry.fetch`), and every field is
checked (:mod:`tuner.telemetry.foreign`), a bad one shown n/a with its reason. An exporter locked the Prometheus
way (TLS, client certificates, basic auth) is reached with :class:`RemoteAuth`. Hosts are named on screen and
in logs by :func:`tuner.redact.redact_url`: credentials in a URL never show.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx

from tuner.redact import redact_url
from tuner.telemetry.fetch import MAX_PAGE_BYTES, PageError, PageReader, basic_auth
from tuner.telemetry.foreign import (
    BadValue,
    Problems,
    checked_number,
    checked_snapshot,
    checked_system_info,
)
from tuner.telemetry.model import Snapshot, SystemInfo
from tuner.telemetry.ports import DEFAULT_PORT

log = logging.getLogger(__name__)

DEFAULT_EXPORTER_PORT = DEFAULT_PORT
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
    shown = redact_url(text)  # what it says of the host: never its credentials
    if scheme not in ("http", "https"):
        raise ValueError(f"--host {shown!r}: only http:// and https:// exporters")
    try:
        url = httpx.URL(text)
        port = url.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"--host {shown!r}: not a host or URL ({redact_url(str(exc))})") from None
    if not url.host:
        raise ValueError(f"--host {shown!r}: no host name")
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
class RemoteAuth:
    """How to reach exporters locked the way Prometheus exporters are (``exporter --web-config``): a CA of one's
    own for ``https://`` hosts, a client certificate for mutual TLS, and basic-auth credentials. One set for
    every host; a host's own ``user:password@`` in its URL stands where ``username`` is not given.

    The password never shows: not in a repr, a log line or on screen. Over ``http://`` basic auth crosses the
    network in clear: lock exporters with TLS too."""

    ca_file: Path | None = None  # trust only this CA (PEM) for https:// hosts, instead of the default bundle
    cert_file: Path | None = None  # a client certificate (PEM), for exporters that ask for one
    key_file: Path | None = None  # its private key (PEM, unencrypted); None: the key is in cert_file
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("a client key without its certificate")
        if self.password is not None and self.username is None:
            raise ValueError("a password without a user name")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings for https:// hosts; None: the defaults (httpx's CA bundle, no client certificate).
        Raises ValueError in words (a missing file, a file that is not PEM, a key not of its certificate)."""
        if self.ca_file is None and self.cert_file is None:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"CA file {self.ca_file}: {_tls_file_error(exc)}") from None
        if self.cert_file is not None:
            try:
                # A password callback that gives none: an encrypted key fails here, never prompts on the terminal.
                context.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ValueError(f"client certificate {self.cert_file}: {_tls_file_error(exc)}") from None
        return context

    def headers(self) -> list[tuple[str, str]]:
        if self.username is None:
            return []
        return [("Authorization", basic_auth(self.username, self.password or ""))]


def _no_passphrase() -> str:
    raise ValueError("its key is encrypted (infertop reads unencrypted keys only)")


def _tls_file_error(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not usable ({exc.reason or exc})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


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
    bad_fields: int = 0  # fields of its last reading that could not be read (shown n/a)
    bad_field_reasons: tuple[str, ...] = ()  # the first few of them, each with its reason

    @property
    def name(self) -> str:
        """Its host name as it reports it, else the host of its URL (never the URL's credentials)."""
        if (
            self.snapshot is not None
            and self.snapshot.host is not None
            and self.snapshot.host.hostname.strip()
        ):
            return self.snapshot.host.hostname
        return httpx.URL(self.url).host or redact_url(self.url)

    @property
    def shown_url(self) -> str:
        """Its URL as it may be shown or logged: without credentials."""
        return redact_url(self.url)

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


class SnapshotPage(NamedTuple):
    """An exporter's /snapshot.json, checked: its machine, its reading, and what of it could not be read."""

    info: SystemInfo
    snapshot: Snapshot
    age_s: float | None  # how old the reading was when served, by the exporter's own clock
    problems: Problems  # fields left out (shown n/a), each with its reason


def parse_snapshot_page(payload: object) -> SnapshotPage:
    """An exporter's /snapshot.json, field by field (:mod:`tuner.telemetry.foreign`): a bad field is n/a with
    its reason. Raises ValueError in words only for a page that is no exporter's or holds no reading."""
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        raise ValueError("not an infertop exporter of this version (/snapshot.json format differs)")
    if not isinstance(payload.get("info"), dict) or not isinstance(payload.get("snapshot"), dict):
        raise ValueError("the exporter has no reading yet")
    problems = Problems()
    info = checked_system_info(payload["info"], problems)
    snap = checked_snapshot(payload["snapshot"], problems)
    age = None
    if payload.get("age_s") is not None:
        try:
            age = checked_number(payload["age_s"], "age_s")
        except BadValue as bad:
            problems.add("age_s", str(bad))
    return SnapshotPage(info, snap, age, problems)


def decode_json(body: bytes) -> object:
    """A page's JSON, or ValueError in words (deep nesting and giant integers included)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("not an infertop exporter (its /snapshot.json is not JSON)") from None


def mean_dram_pct(snap: Snapshot) -> float | None:
    values = [g.dram_bw_util_pct for g in snap.gpus if g.dram_bw_util_pct is not None]
    return sum(values) / len(values) if values else None


def describe_page_error(exc: PageError) -> str:
    """Why an exporter could not be read, for its line on screen."""
    if exc.status == 401:
        return "unauthorized (401): wrong or missing user and password"
    if exc.status == 403:
        return "forbidden (403)"
    if exc.status == 404:
        return (
            "HTTP 404: no infertop exporter there (no /snapshot.json; an older exporter, or another server?)"
        )
    if exc.status is not None:
        return f"HTTP {exc.status} from its exporter"
    return str(exc)


class _HostReader:
    """Reads one host on its own thread."""

    def __init__(self, url: str, interval_s: float, reader: PageReader, clock: Callable[[], float]) -> None:
        self.url = url
        self._interval_s = interval_s
        self._stale_after_s = max(STALE_AFTER_S, 3 * interval_s)
        self._clock = clock
        self._reader = reader
        self._lock = threading.Lock()
        self._state = RemoteHost(url, stale_after_s=self._stale_after_s)
        self._bw: deque[float | None] = deque(maxlen=HISTORY_LEN)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"infertop-remote-{redact_url(url)}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def latest(self) -> RemoteHost:
        with self._lock:
            return self._state

    def read_once(self) -> RemoteHost:
        """One read now (the thread's loop, and tests): within the reader's deadline, whatever the host does."""
        now = self._clock()
        try:
            page = parse_snapshot_page(decode_json(self._reader.get(self.url + "/snapshot.json")))
        except PageError as exc:
            return self._failed(describe_page_error(exc))
        except ValueError as exc:
            return self._failed(str(exc) or "unreadable answer")
        self._bw.append(mean_dram_pct(page.snapshot))
        with self._lock:
            self._state = RemoteHost(
                self.url,
                page.info,
                page.snapshot,
                None,
                now,
                tuple(self._bw),
                page.age_s,
                stale_after_s=self._stale_after_s,
                bad_fields=page.problems.count,
                bad_field_reasons=tuple(page.problems.first),
            )
            return self._state

    def _failed(self, why: str) -> RemoteHost:
        with self._lock:
            self._state = dataclasses.replace(self._state, error=why)
            return self._state

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.read_once()
                except Exception as exc:  # a failure no reader foresaw: the host says so, the reader lives on
                    log.exception("reading %s failed", redact_url(self.url))
                    self._failed(f"unexpected {type(exc).__name__}")
                self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started)))
        finally:
            self._reader.close()

    def stop(self, timeout_s: float) -> None:
        """Stop reading; wait up to ``timeout_s`` for a read in progress (its deadline ends it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        elif self._thread.ident is None:  # never started: nothing else will close the connection
            self._reader.close()


class RemoteWatcher:
    """Reads every remote host at ``interval_s``, each on its own thread; :meth:`latest` never waits."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        auth: RemoteAuth | None = None,
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> None:
        """``timeout_s`` bounds each read whole (connect, TLS, answer); ``auth`` reaches locked exporters.
        Raises ValueError in words when ``auth``'s files cannot be used."""
        self.urls = list(dict.fromkeys(urls))
        self.interval_s = interval_s
        self.clock = clock
        auth = auth or RemoteAuth()
        context = auth.ssl_context()
        self._readers = [
            _HostReader(
                u,
                interval_s,
                PageReader(
                    deadline_s=timeout_s, max_bytes=max_bytes, ssl_context=context, headers=auth.headers()
                ),
                clock,
            )
            for u in self.urls
        ]

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


def short_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100 80GB HBM3'; '?' for a name that says nothing ("", "NVIDIA ")."""
    return name.replace("NVIDIA", "").strip() or "?"


def _whole(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None


def summarise_host(info: SystemInfo | None, snap: Snapshot) -> HostSummary:
    """The line of one host, from its reading."""
    gpus = [g for g in snap.gpus if not g.error]
    names = {short_gpu_name(g.name) for g in (info.gpus if info else ())}
    return HostSummary(
        gpus=len(snap.gpus),
        gpu_name=names.pop() if len(names) == 1 else ("mixed" if names else "?"),
        lost=len(snap.gpus) - len(gpus),
        dram_pct=_mean([g.dram_bw_util_pct for g in gpus]),
        sm_pct=_mean([g.sm_active_pct for g in gpus]),
        duty_pct=_mean([g.gpu_util_pct for g in gpus]),
        vram_used_bytes=_whole(_sum([g.vram_used_bytes for g in gpus])),
        vram_total_bytes=_whole(_sum([g.vram_total_bytes for g in gpus])),
        power_w=_sum([g.power_w for g in gpus]),
        power_limit_w=_sum([g.power_limit_w for g in gpus]),
        max_temp_c=max((g.gpu_temp_c for g in gpus if g.gpu_temp_c is not None), default=None),
        throttled=sum(1 for g in gpus if g.throttled),
        tokens_per_s=_sum([e.generation_tokens_per_s for e in snap.engines if not e.error]),
        engines=sum(1 for e in snap.engines if not e.error),
    )
