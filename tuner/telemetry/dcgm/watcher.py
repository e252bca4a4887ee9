""":class:`DcgmWatcher`: reads DCGM in its own daemon thread, from the source ``--dcgm`` names or, by default,
the first it finds on this machine, and looks again while it has found nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import httpx

from tuner.redact import redact_url
from tuner.telemetry.dcgm.exporter_page import ExporterSource
from tuner.telemetry.dcgm.hostengine import WATCH_INTERVAL_S, HostengineSource, load_bindings
from tuner.telemetry.dcgm.model import HOSTENGINE_PORT, DcgmReading, DcgmSpec, parse_dcgm_spec
from tuner.telemetry.dcgm.processes import (
    DcgmProcess,
    exporter_settings,
    find_dcgm_processes,
    hostengine_endpoint,
)
from tuner.telemetry.foreign import printable

REDISCOVER_S = 30.0  # how often "auto" looks again while it has found nothing (or lost what it found)

Source = ExporterSource | HostengineSource


def _via(spec: DcgmSpec) -> str:
    if spec.kind == "exporter":
        return f"dcgm-exporter at {redact_url(spec.url or '')}"
    return f"nv-hostengine at {spec.address or f'unix:{spec.unix_socket}'}"


class DcgmWatcher:
    """Reads DCGM in its own daemon thread every ``poll_s``: a slow or hung DCGM never delays GPU readings.
    ``latest()`` is the newest reading; None when ``spec`` is "off", or "auto" found no DCGM on this machine.

    "auto" tries, in order: an nv-hostengine (the one a process's flags name, else 127.0.0.1:5555) through
    DCGM's bindings, then a dcgm-exporter process's page (its address and interval from its flags or
    environment). A hostengine that watches none of the fields gives way to a dcgm-exporter that exports them.
    While nothing is found, or what was found fails, it looks again every ``rediscover_s``."""

    def __init__(
        self,
        spec: DcgmSpec | str = "auto",
        *,
        watch: bool = False,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        bindings_path: str | None = None,
        watch_interval_s: float = WATCH_INTERVAL_S,
        rediscover_s: float = REDISCOVER_S,
        connect_timeout_s: float = 1.0,
        page_deadline_s: float = 2.0,
        processes: Callable[[], Sequence[DcgmProcess]] = find_dcgm_processes,
    ) -> None:
        self.spec = parse_dcgm_spec(spec) if isinstance(spec, str) else spec
        self.watch = watch
        self.poll_s = poll_s
        self._clock = clock
        self._bindings_path = bindings_path
        self._watch_interval_s = watch_interval_s
        self._rediscover_s = rediscover_s
        self._connect_timeout_s = connect_timeout_s
        self._page_deadline_s = page_deadline_s
        self._processes = processes
        self._source: Source | None = None
        self._looked_at_s: float | None = None
        self._failing_since_s: float | None = None
        self._latest: DcgmReading | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.spec.kind == "off" or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="infertop-dcgm", daemon=True)
        self._thread.start()

    def latest(self) -> DcgmReading | None:
        with self._lock:
            return self._latest

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._connect_timeout_s + self._page_deadline_s + 1.0)
        if thread is None or not thread.is_alive():
            self._close_source()  # else the thread closes it as it ends

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.poll_once()
                except (
                    Exception
                ) as exc:  # a bug here must not end DCGM's readings for good, nor show a traceback
                    why = f"reading DCGM failed ({type(exc).__name__}: {printable(str(exc), 120)})"
                    with self._lock:
                        self._latest = DcgmReading(self._clock(), "DCGM", None, (), why, error=why)
                self._stop.wait(self.poll_s)
        finally:
            self._close_source()

    def poll_once(self) -> DcgmReading | None:
        """One read (or discovery) now; what ``latest()`` then returns. For tests and for the thread."""
        now_s = self._clock()
        reading = self._read(now_s)
        with self._lock:
            self._latest = reading
        return reading

    def _read(self, now_s: float) -> DcgmReading | None:
        if self.spec.kind == "off":
            return None
        if self._source is not None:
            current = self._source.read(now_s)
            if self.spec.kind == "auto":
                self._forget_if_failing(now_s, current)
            return current
        if self.spec.kind != "auto":
            made = self._make(self.spec)
            if isinstance(made, str):
                return DcgmReading(now_s, _via(self.spec), None, (), f"{_via(self.spec)}: {made}", error=made)
            self._source = made
            return made.read(now_s)
        if self._looked_at_s is not None and 0 <= now_s - self._looked_at_s < self._rediscover_s:
            latest = self._latest  # between looks: why the last look found nothing readable, if it said
            return latest if latest is not None and latest.error is not None else None
        self._looked_at_s = now_s
        self._failing_since_s = None
        self._source, found = self._discover(now_s)
        return found

    def _forget_if_failing(self, now_s: float, reading: DcgmReading) -> None:
        """Look again after ``rediscover_s`` of errors, or of readings with no values (a hostengine that watches
        nothing, an exporter without the DCP set): a dcgm-exporter started since may give them."""
        if reading.error is None and any(g.has_values() for g in reading.gpus):
            self._failing_since_s = None
        elif self._failing_since_s is None:
            self._failing_since_s = now_s
        elif now_s - self._failing_since_s >= self._rediscover_s:
            self._close_source()
            self._looked_at_s = None

    def _make(self, spec: DcgmSpec, interval: tuple[float | None, str] | None = None) -> Source | str:
        if spec.kind == "exporter":
            assert spec.url is not None
            interval_s, note = interval if interval is not None else self._interval_for(spec.url)
            return ExporterSource(
                spec.url,
                interval_s=interval_s,
                interval_note=note,
                deadline_s=self._page_deadline_s,
                min_period_s=max(self.poll_s, min(5.0, (interval_s or 0.0) / 6)),
            )
        bindings = load_bindings(self._bindings_path)
        if isinstance(bindings, str):
            return bindings
        return HostengineSource(
            bindings,
            address=spec.address,
            unix_socket=spec.unix_socket,
            watch=self.watch,
            watch_interval_s=self._watch_interval_s,
            connect_timeout_s=self._connect_timeout_s,
        )

    def _interval_for(self, url: str) -> tuple[float | None, str]:
        """A local dcgm-exporter's interval when ``url`` is its page; else unknown."""
        for proc in self._processes():
            if proc.name == "dcgm-exporter":
                own_url, interval_s, note = exporter_settings(proc)
                try:  # its -a may name an address no URL can hold ('[zz]:9400'): that exporter is not this one
                    same = httpx.URL(own_url).port == httpx.URL(url).port
                except httpx.InvalidURL:
                    continue
                if same:
                    return interval_s, note
        return None, ""

    def _discover(self, now_s: float) -> tuple[Source | None, DcgmReading | None]:
        """The first DCGM here that gives values (a hostengine first); else the first that answers, whose
        reading says why it gives none; else None and, when a DCGM process runs, a reading saying why it
        cannot be read."""
        procs = list(self._processes())
        engines = [p for p in procs if p.name == "nv-hostengine"]
        candidates: list[tuple[DcgmSpec, tuple[float | None, str] | None]] = [
            (hostengine_endpoint(p), None) for p in engines
        ] or [(DcgmSpec("hostengine", address=f"127.0.0.1:{HOSTENGINE_PORT}"), None)]
        for proc in procs:
            if proc.name == "dcgm-exporter":
                url, interval_s, note = exporter_settings(proc)
                candidates.append((DcgmSpec("exporter", url=url), (interval_s, note)))
        answered: tuple[Source, DcgmReading] | None = None
        failed: DcgmReading | None = None
        for spec, interval in candidates:
            try:
                made = self._make(spec, interval)
            except (httpx.InvalidURL, ValueError) as exc:  # an address from another process's flags
                if answered is None and failed is None:
                    failed = DcgmReading(now_s, _via(spec), None, (), f"{_via(spec)}: {exc}", str(exc))
                continue
            if isinstance(made, str):
                if engines and failed is None:  # a hostengine runs, but infertop cannot speak to it
                    failed = DcgmReading(
                        now_s, _via(spec), None, (), f"nv-hostengine runs here, but {made}", made
                    )
                continue
            reading = made.read(now_s)
            if isinstance(made, HostengineSource) and not made.connected and not engines:
                made.close()  # nothing at the default address and no such process: no DCGM, nothing to say
                continue
            takes_it = reading.error is None and (
                any(g.has_values() for g in reading.gpus)
                or (self.watch and isinstance(made, HostengineSource))
            )
            if takes_it:
                if answered is not None:
                    answered[0].close()
                return made, reading
            if reading.error is None and answered is None:
                answered = (made, reading)
                continue
            if reading.error is not None and failed is None:
                failed = reading
            made.close()
        return answered if answered is not None else (None, failed)

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.close()
