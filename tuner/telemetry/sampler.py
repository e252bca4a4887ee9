"""One thread, one cadence, bounded history: the only place that reads the machine.

The monitor and the tuner both run a :class:`Sampler` over a :class:`SnapshotSource` (live NVML + psutil +
vLLM, or a recording) and receive each :class:`Snapshot` through a listener callback on the sampler thread.
History is kept in fixed-size ring buffers, so memory stays flat over hours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx
import psutil

from tuner.redact import redact_text, redact_url
from tuner.telemetry.backend import GpuBackend, GpuLostError
from tuner.telemetry.bwestimate import apply_estimates
from tuner.telemetry.dcgm import DcgmReading, DcgmWatcher, apply_dcgm
from tuner.telemetry.discovery import DiscoveredServer, process_tree
from tuner.telemetry.engines import EngineScraper
from tuner.telemetry.host import HostReader
from tuner.telemetry.model import EngineSample, GpuSample, GpuState, Snapshot, SystemInfo
from tuner.telemetry.modelfacts import HF_CACHE_ENV, ModelFacts
from tuner.telemetry.throttle import THROTTLE_SERIES, throttle_flags
from tuner.telemetry.vllmargs import facts_from_argv

log = logging.getLogger(__name__)

# The per-GPU series kept for sparklines and tuner plots.
GPU_SERIES = (
    "dram_bw_util_pct",
    "dram_bw_gbps",
    "dram_bw_est_pct",  # a model's estimate, its own series: never drawn as the measured one
    "sm_active_pct",
    "gpu_util_pct",
    "mem_busy_pct",
    "tensor_active_pct",
    "power_w",
    "vram_used_pct",
    "gpu_temp_c",
    "time_s",  # when each reading was taken: how many seconds a window of readings covers
)
FACTS_RETRY_S = 30.0
"""A server whose model could not be read is read again this much later (a model still downloading)."""
ENGINE_SERIES = ("generation_tokens_per_s", "requests_running", "requests_waiting", "kv_cache_usage_pct")


@dataclass(frozen=True)
class SamplerConfig:
    """How often the machine is read. Fast metrics every tick; expensive ones (energy, processes) every
    ``slow_every`` ticks; vLLM /metrics on its own thread so a slow server never delays GPU readings."""

    interval_s: float = 0.25  # 4 Hz
    slow_every: int = 4  # energy counter and process list at 1 Hz
    engine_interval_s: float = 1.0
    discover_vllm: bool = True  # look for vLLM servers on this machine
    discover_every_s: float = 5.0
    history_len: int = 480  # 2 minutes at 4 Hz
    # DCGM's profiling counters where GPM gives no bandwidth (L4, A100; a Hopper whose counters DCGM holds):
    # "auto" finds a local nv-hostengine or dcgm-exporter, "off", a dcgm-exporter URL, or "hostengine[:HOST:PORT]".
    dcgm: str = "auto"
    # Ask DCGM to watch the fields it does not (changes its sampling for every reader).
    dcgm_watch: bool = False
    # A labelled model estimate where nothing measures the bandwidth (tuner.telemetry.bwestimate).
    estimate_bandwidth: bool = True


class SnapshotSource(Protocol):
    """Produces snapshots: live readings or a recording."""

    info: SystemInfo

    def open(self) -> SystemInfo: ...

    def next_snapshot(self) -> Snapshot | None:
        """The next snapshot, or None when a recording has ended."""
        ...

    def next_delay_s(self) -> float:
        """How long to wait before the next call."""
        ...

    def close(self) -> None: ...


class History:
    """Fixed-size ring buffers of the series above, per GPU and per engine. Thread-safe.

    Per GPU also one series per throttle reason (:data:`~tuner.telemetry.throttle.THROTTLE_SERIES`: 1.0 while it
    held), read with :meth:`gpu_series` like the others."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._lock = threading.Lock()
        self._gpu: dict[int, dict[str, deque[float | None]]] = {}
        self._engine: dict[str, dict[str, deque[float | None]]] = {}
        self._host_cpu: deque[float | None] = deque(maxlen=maxlen)

    def add(self, snap: Snapshot) -> None:
        with self._lock:
            self._host_cpu.append(snap.host.cpu_pct if snap.host else None)
            for g in snap.gpus:
                series = self._gpu.get(g.index)
                if series is None:
                    names = (*GPU_SERIES, *THROTTLE_SERIES)
                    series = self._gpu[g.index] = {n: deque(maxlen=self.maxlen) for n in names}
                for name in GPU_SERIES:
                    series[name].append(getattr(g, name))
                # Throttle reasons as one 0/1 series each: what share of a window each held (throttle.py).
                for name, flag in throttle_flags(g.clock_event_reasons).items():
                    series[name].append(flag)
            for e in snap.engines:
                eseries = self._engine.setdefault(
                    e.url, {n: deque(maxlen=self.maxlen) for n in ENGINE_SERIES}
                )
                for name, buf in eseries.items():
                    buf.append(getattr(e, name))

    def gpu_series(self, index: int, name: str, last: int | None = None) -> list[float | None]:
        """A copy of one GPU's series (only its ``last`` readings when given: what a sparkline shows)."""
        with self._lock:
            buf = self._gpu.get(index, {}).get(name, ())
            if last is not None and len(buf) > last:
                return list(itertools.islice(buf, len(buf) - last, None))
            return list(buf)

    def host_cpu_series(self) -> list[float | None]:
        with self._lock:
            return list(self._host_cpu)

    def engine_series(self, url: str, name: str) -> list[float | None]:
        with self._lock:
            return list(self._engine.get(url, {}).get(name, ()))

    def __len__(self) -> int:
        with self._lock:
            return max((len(s["power_w"]) for s in self._gpu.values()), default=0)


def _same_local_server(url: str, servers: Iterable[DiscoveredServer]) -> DiscoveredServer | None:
    """The discovered server a URL given by hand names in other words (localhost for 127.0.0.1, a host name of
    this machine): same port, a local host. Its processes then tell which GPUs it uses."""
    import socket

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
    if parsed.host not in local and not parsed.host.startswith("127."):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return next((s for s in servers if httpx.URL(s.url).port == port), None)


@dataclass(frozen=True)
class LaunchedServer:
    """A server this process started (the tuner's candidates): what discovery would otherwise find out."""

    pid: int  # its topmost process; its descendants hold the GPUs
    argv: tuple[str, ...]  # how it was started: the model and dtypes a bandwidth estimate needs
    engine: str = "vllm"
    gpus: tuple[
        int, ...
    ] = ()  # the GPUs it was given (CUDA_VISIBLE_DEVICES), when NVML cannot show its processes


class EngineWatcher:
    """Scrapes inference servers on its own thread; the sampler takes the latest readings each tick.

    Discovered servers keep their engine and process tree: each reading carries the server's pids, which is how
    energy per token finds the GPUs a server uses. Their command lines, kept in memory only, tell what model
    they serve: the facts a decode-traffic estimate needs (:func:`facts`).
    """

    def __init__(self, urls: Iterable[str], config: SamplerConfig) -> None:
        self._fixed = [u.rstrip("/") for u in urls]
        self._config = config
        self._scrapers: dict[str, EngineScraper] = {}
        self._latest: dict[str, EngineSample] = {}
        self._launched: dict[str, LaunchedServer] = {}
        # A launched server's URL -> its process and descendants (written on this watcher's thread, under _lock).
        self._trees: dict[str, tuple[int, ...]] = {}
        # A server's URL -> (its argv, its model's facts or why not, when they were read: a failed read is tried
        # again, as a model still downloading appears later).
        self._facts: dict[str, tuple[tuple[str, ...], ModelFacts | str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infertop-engines", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def set_urls(self, urls: Iterable[str], launched: Mapping[str, LaunchedServer] | None = None) -> None:
        """Watch these servers from now on (besides discovered ones); readings of others are dropped.
        ``launched`` names the processes of servers this process started, by URL."""
        with self._lock:
            self._fixed = [u.rstrip("/") for u in urls]
            self._latest = {u: s for u, s in self._latest.items() if u in self._fixed}
            self._launched = {u.rstrip("/"): s for u, s in (launched or {}).items()}
        self.start()

    def latest(self) -> tuple[EngineSample, ...]:
        with self._lock:
            return tuple(self._latest.values())

    def launched_gpus(self) -> dict[int, frozenset[int]]:
        """The GPUs each launched server was given, by its pid (its process and descendants, as last seen)."""
        with self._lock:
            launched, trees = dict(self._launched), dict(self._trees)
        return {
            pid: frozenset(server.gpus)
            for url, server in launched.items()
            if server.gpus
            for pid in trees.get(url, (server.pid,))
        }

    def facts(self) -> dict[str, ModelFacts | str]:
        """What each watched server serves, by URL, where its command line and model files tell; else why not
        (a reason the card shows in place of an estimate)."""
        with self._lock:
            return {
                redact_url(url): facts for url, (_, facts, _) in self._facts.items()
            }  # as samples name it

    def _learn(self, url: str, argv: tuple[str, ...], pid: int) -> None:
        """Read the model's facts once per command line (config.json and safetensors headers: file reads, on
        this thread, never the sampler's). The server's working directory resolves a relative model path and
        its Hugging Face cache variables a model id; nothing else of its environment is read."""
        if not self._config.estimate_bandwidth or not argv:
            return
        known = self._facts.get(url)
        read_again = (
            known is not None and isinstance(known[1], str) and time.monotonic() - known[2] >= FACTS_RETRY_S
        )
        if known is not None and known[0] == argv and not read_again:
            return
        cwd, env = _cwd_and_cache_env(pid)
        try:
            facts = facts_from_argv(argv, env, cwd)
        except Exception as exc:  # a model directory nobody foresaw costs the estimate, never the monitor
            log.exception("reading the model of %s failed", redact_url(url))
            facts = f"model facts unreadable ({exc})"
        with self._lock:
            self._facts[url] = (argv, facts, time.monotonic())

    def _servers(self, last_discovery: list[float], discovered: dict[str, DiscoveredServer]) -> list[str]:
        """The URLs to read this round. ``discovered`` is refreshed every ``discover_every_s``: servers found on
        this machine (when discovery is on) and the process trees of those this process launched (whose
        workers appear after they start)."""
        now = time.monotonic()
        with self._lock:
            fixed = list(self._fixed)
            launched = dict(self._launched)
        due = now - last_discovery[0] >= self._config.discover_every_s
        if due:
            discovered.clear()
            if self._config.discover_vllm:
                from tuner.telemetry.discovery import discover_servers

                discovered.update((s.url, s) for s in discover_servers())
            last_discovery[0] = now
        with self._lock:
            trees = dict(self._trees)
        trees = {u: pids for u, pids in trees.items() if u in launched}  # the tuner stopped the others
        for url, server in launched.items():
            if due or url not in trees:
                trees[url] = process_tree(server.pid)
        with self._lock:
            self._trees = trees
        return fixed + [u for u in discovered if u not in fixed]

    def _run(self) -> None:
        last_discovery, discovered = [-1e9], dict[str, DiscoveredServer]()
        while not self._stop.is_set():
            urls = self._servers(last_discovery, discovered)
            with self._lock:
                launched = dict(self._launched)
            for url in urls:
                server = discovered.get(url) or _same_local_server(url, discovered.values())
                scraper = self._scrapers.get(url)
                if scraper is None:
                    engine = server.engine if server else None
                    scraper = self._scrapers[url] = EngineScraper(url, engine=engine)
                try:
                    sample = scraper.scrape(time.time())
                except Exception as exc:  # a page no parser foresaw: that server says so, the others go on
                    shown = redact_url(url)  # a URL's credentials reach neither the log nor the screen
                    log.exception("reading %s failed", shown)
                    sample = EngineSample(
                        url=shown, time_s=time.time(), error=redact_text(f"unreadable /metrics ({exc})")
                    )
                if url in launched:
                    with self._lock:
                        tree = self._trees.get(url)
                    sample = dataclasses.replace(sample, server_pids=tree)
                    self._learn(url, launched[url].argv, launched[url].pid)
                elif server is not None:
                    sample = dataclasses.replace(sample, server_pids=server.pids)
                    self._learn(url, server.argv, server.pid)
                with self._lock:
                    self._latest[url] = sample
            with self._lock:  # a discovered server that went away disappears from the screen
                for gone in set(self._latest) - set(urls):
                    del self._latest[gone]
                for gone in set(self._facts) - set(urls):
                    del self._facts[gone]
            self._stop.wait(self._config.engine_interval_s)
        for scraper in self._scrapers.values():
            scraper.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)


def _cwd_and_cache_env(pid: int) -> tuple[str | None, dict[str, str]]:
    """A server's working directory and the Hugging Face cache variables of its environment (only those: the
    environment may hold HF_TOKEN); (None, {}) where they cannot be read (another user's process)."""
    try:
        process = psutil.Process(pid)
        cwd = process.cwd()
        environ = process.environ()
    except (psutil.Error, OSError):
        return None, {}
    return cwd, {key: environ[key] for key in HF_CACHE_ENV if key in environ}


class LiveSource:
    """Reads the machine now: GPUs through a :class:`GpuBackend`, the host through psutil, vLLM via /metrics."""

    def __init__(
        self,
        backend: GpuBackend | None,
        *,
        config: SamplerConfig | None = None,
        vllm_urls: Iterable[str] = (),
        host: HostReader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._config = config or SamplerConfig()
        self._host = host
        self._clock = clock
        self._tick = 0
        self._gpu_error: str | None = None
        self._engines = EngineWatcher(vllm_urls, self._config)
        self._watch_engines = bool(vllm_urls) or self._config.discover_vllm
        self._dcgm: DcgmWatcher | None = None
        self._gpus_of_pid: dict[int, frozenset[int]] = {}  # from the last process lists (read once a second)
        self.info = SystemInfo(state=GpuState.NO_GPU, message="not opened")

    def open(self) -> SystemInfo:
        if self._host is None:
            self._host = HostReader()
        if self._backend is not None:
            self.info = self._backend.open()
        else:
            self.info = SystemInfo(state=GpuState.NO_GPU, message="GPU telemetry disabled", source="none")
        if self._watch_engines:
            self._engines.start()
        # DCGM reads real GPUs: a scripted or replayed machine meets it only when told where (tests' fake pages).
        explicit = self._config.dcgm not in ("auto", "", "off")
        if self.info.state is GpuState.OK and (
            explicit or (self._config.dcgm == "auto" and self.info.source == "nvml")
        ):
            self._dcgm = DcgmWatcher(self._config.dcgm, watch=self._config.dcgm_watch, clock=self._clock)
            self._dcgm.start()
        return self.info

    def next_snapshot(self) -> Snapshot:
        now = self._clock()
        slow = self._tick % self._config.slow_every == 0
        self._tick += 1
        gpus: tuple[GpuSample, ...] = ()
        if self._backend is not None and self.info.state is GpuState.OK and self._gpu_error is None:
            try:
                gpus = self._backend.read(now, slow=slow)
            except GpuLostError as exc:
                # The whole driver went away: say so once and stop calling it.
                self._gpu_error = str(exc) or "NVIDIA driver stopped answering"
                log.warning("GPU telemetry stopped: %s", self._gpu_error)
        host = self._host.read(now) if self._host is not None else None
        engines = self._engines.latest()
        dcgm = self._dcgm.latest() if self._dcgm is not None else None
        if gpus:
            gpus = self._fill_bandwidth(gpus, engines, dcgm, now)
        return Snapshot(
            time_s=now,
            host=host,
            gpus=gpus,
            engines=engines,
            gpu_error=self._gpu_error,
            dcgm_status=dcgm.status if dcgm is not None else None,
        )

    def _fill_bandwidth(
        self,
        gpus: tuple[GpuSample, ...],
        engines: tuple[EngineSample, ...],
        dcgm: DcgmReading | None,
        now: float,
    ) -> tuple[GpuSample, ...]:
        """Bandwidth where GPM measured none: DCGM's measurement, else (while a server runs there) the model's
        estimate, kept in its own fields."""
        if dcgm is not None:
            gpus = apply_dcgm(gpus, self.info.gpus, dcgm, now)
        if not self._config.estimate_bandwidth or not engines:
            return gpus
        if any(g.processes is not None for g in gpus):
            holders: dict[int, set[int]] = {}
            for g in gpus:
                for p in g.processes or ():
                    holders.setdefault(p.pid, set()).add(g.index)
            self._gpus_of_pid = {pid: frozenset(held) for pid, held in holders.items()}
        if all(g.dram_bw_util_pct is not None for g in gpus):
            return gpus
        facts = self._engines.facts()
        if not facts:
            return gpus
        # A reading the engine thread has not renewed for a while (a slow model directory, a stuck server) is
        # no step rate of now. Engine readings carry wall-clock times, whatever clock the sampler keeps.
        fresh_s, wall_s = max(3 * self._config.engine_interval_s, 5.0), time.time()
        engines = tuple(e for e in engines if wall_s - e.time_s <= fresh_s)
        held = {
            **self._gpus_of_pid,
            **self._engines.launched_gpus(),
        }  # what the tuner gave wins over NVML's view
        return apply_estimates(gpus, self.info.gpus, engines, facts, held)

    def next_delay_s(self) -> float:
        return self._config.interval_s

    def set_engine_urls(
        self, urls: Iterable[str], launched: Mapping[str, LaunchedServer] | None = None
    ) -> None:
        """Change which vLLM servers are scraped (the tuner points it at each candidate in turn); ``launched``:
        the processes of those this process started, by URL."""
        self._engines.set_urls(urls, launched)

    def close(self) -> None:
        self._engines.stop()
        if self._dcgm is not None:
            self._dcgm.stop()
        if self._backend is not None:
            self._backend.close()


Listener = Callable[[Snapshot], None]


class Sampler:
    """Runs a source on one background thread at its cadence, keeps history, and calls listeners.

    The thread that reads the source also closes it: NVML's GPM samples must not be freed while a call on
    another thread still uses them (a use-after-free inside libnvidia-ml when a sick GPU makes a call hang).
    """

    def __init__(self, source: SnapshotSource, *, history_len: int = 480) -> None:
        self.source = source
        self.history = History(history_len)
        self.latest: Snapshot | None = None
        self.ended = False  # a recording ran out
        self.ticks = 0
        self.on_ended: Callable[[], None] | None = None  # called on the sampler thread when a replay ends
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._lifecycle = threading.Lock()  # open, start and stop's hand-over of the source
        self.info = source.info

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def open(self) -> SystemInfo:
        """Open the source (discovers GPUs). Separate from :meth:`start` so callers can show state first."""
        with self._lifecycle:  # a stop() meanwhile waits: it must not close what is being opened
            self.info = self.source.open()
        return self.info

    def start(self) -> None:
        """Read on the background thread from now on; after :meth:`stop` (a quit during start-up) it only
        closes the source."""
        with self._lifecycle:
            if not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="infertop-sampler", daemon=True)
                self._thread.start()
                return
        self._close_source()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def set_paused(self, paused: bool) -> None:
        """Pause stops reading the machine altogether (and a replay stops advancing)."""
        if paused:
            self._resume.clear()
        else:
            self._resume.set()

    def tick(self) -> Snapshot | None:
        """Take one snapshot now, on the caller's thread (tests, benchmarks, the background loop)."""
        snap = self.source.next_snapshot()
        if snap is None:
            self.ended = True
            return None
        self.latest = snap
        self.ticks += 1
        self.history.add(snap)
        for listener in list(self._listeners):
            try:
                listener(snap)
            except Exception:  # a broken listener must not stop telemetry
                log.exception("sampler listener failed")
        return snap

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close_source()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._resume.wait()
            if self._stop.is_set():
                break
            try:
                self.tick()
            except Exception:
                log.exception("sampler tick failed")
            if self.ended:
                if self.on_ended is not None:
                    self.on_ended()
                break
            # Fixed cadence: a slow tick shortens the next wait instead of drifting.
            next_at += self.source.next_delay_s()
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            if self._stop.wait(delay):
                break

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop reading and close the source. The sampler thread closes it once its current call returns; if
        that call is stuck past ``timeout_s``, this returns and the thread closes the source whenever the call
        comes back (never under its feet). A sampler that was never started is closed here."""
        self._stop.set()
        self._resume.set()
        with self._lifecycle:
            thread = self._thread
        if thread is None:
            self._close_source()
            return
        thread.join(timeout=timeout_s)
        if thread.is_alive():
            log.warning("telemetry is stuck in a call for %.1f s: it closes when the call returns", timeout_s)

    def _close_source(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.source.close()
