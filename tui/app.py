"""The one app factory, used by the CLI, the tests and the screenshot script."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import psutil
from textual.app import App
from textual.binding import Binding

from tui.messages import GpusFound, ReplayEnded, SnapshotTaken
from tui.screens.confirm import ConfirmScreen
from tui.screens.help import HelpScreen
from tui.screens.monitor import MonitorScreen
from tui.widgets.process_table import ProcessTable
from tui.widgets.status_bar import StatusBar
from tuner.outputs import OutputError
from tuner.telemetry.model import Snapshot
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.recording import Recorder, ReplaySource
from tuner.telemetry.remote import RemoteAuth, RemoteWatcher
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig, SnapshotSource


class InfertopApp(App[None]):
    """The monitor. Telemetry arrives from the sampler thread as messages; the UI thread owns every widget."""

    TITLE = "infertop"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("p,space", "toggle_pause", "Pause"),
        Binding("R", "toggle_record", "Record"),
        Binding("k", "terminate_process", "Kill", show=False),
    ]

    def __init__(
        self,
        sampler: Sampler,
        *,
        rate_hz: float = 4.0,
        record_dir: Path | None = None,
        record_path: Path | None = None,
        autostart: bool = True,
        redraw_interval_s: float = 0.5,
        remote: RemoteWatcher | None = None,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.rate_hz = rate_hz
        self.record_dir = record_dir or Path.cwd()
        self.initial_record_path = record_path
        self.autostart = autostart
        self.recorder: Recorder | None = None
        self.remote = remote
        self.monitor = MonitorScreen(sampler.history, redraw_interval_s=redraw_interval_s, remote=remote)
        self._quits_on_sigterm = False
        self.recording_error: str | None = None  # why the last recording could not be put in place

    async def on_mount(self) -> None:
        await self.push_screen(self.monitor)
        self.monitor.query_one(StatusBar).rate_hz = self.rate_hz
        self._quit_on_sigterm()
        if self.autostart and self.remote is not None:
            self.remote.start()
        if self.autostart:
            # nvmlInit and device discovery can take tens of ms per GPU: keep them off the UI thread.
            self.run_worker(self._open_and_start, thread=True, name="sampler-open")

    def _open_and_start(self) -> None:
        info = self.sampler.open()
        self.monitor.post_message(GpusFound(info))
        if self.initial_record_path is not None:
            self.call_from_thread(self.start_recording, self.initial_record_path)
        self.sampler.add_listener(self._snapshot_taken)
        self.sampler.on_ended = self._replay_ended
        self.sampler.start()

    def _quit_on_sigterm(self) -> None:
        """SIGTERM quits as ``q`` does: a recording in progress is finished and renamed into place, and the
        terminal is given back. Textual leaves SIGTERM to its default, which does neither."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.exit)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not a Unix
            return
        self._quits_on_sigterm = True

    def _replay_ended(self) -> None:
        self.monitor.post_message(ReplayEnded())
        source = self.sampler.source
        damage = source.damage.summary() if isinstance(source, ReplaySource) else None
        if damage:
            message = f"Parts of this recording could not be read: {damage}"
            self.notify(message, severity="warning", timeout=10, markup=False)

    def _snapshot_taken(self, snap: Snapshot) -> None:
        self.monitor.post_message(SnapshotTaken(snap))  # thread-safe

    def on_unmount(self) -> None:
        if self._quits_on_sigterm:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        if self.remote is not None:
            self.remote.stop()
        self.stop_recording()
        self.sampler.stop()

    # --- actions -------------------------------------------------------------------------------------

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_pause(self) -> None:
        paused = not self.sampler.paused
        self.sampler.set_paused(paused)
        self.monitor.query_one(StatusBar).paused = paused

    def action_toggle_record(self) -> None:
        if self.recorder is not None:
            path = self.stop_recording()
            if path is not None:
                self.notify(f"Recording saved to {path}", markup=False)
            return
        try:
            self.record_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.notify(
                f"Cannot record to {self.record_dir}: {exc.strerror or exc}", severity="error", markup=False
            )
            return
        self.start_recording(fresh_recording_path(self.record_dir))

    def start_recording(self, path: Path) -> None:
        """Record to ``path``, a file that must not exist yet (a recording never replaces one)."""
        try:
            self.recorder = Recorder(path, self.sampler.info)
        except OutputError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.sampler.add_listener(self.recorder)
        self.monitor.query_one(StatusBar).recording_to = path.name

    def stop_recording(self) -> Path | None:
        """Stop recording and rename the file into place; its path, or None if there was none or it failed."""
        if self.recorder is None:
            return None
        recorder, self.recorder = self.recorder, None
        self.sampler.remove_listener(recorder)
        for bar in self.monitor.query(StatusBar):  # none when the app is quitting: its widgets are gone
            bar.recording_to = None
        try:
            return recorder.close()
        except OutputError as exc:
            self.recording_error = str(exc)  # also said on the terminal if this was at quitting time
            self.notify(self.recording_error, severity="error", markup=False)
            return None

    def action_terminate_process(self) -> None:
        proc = self.monitor.query_one(ProcessTable).selected_process
        if proc is None:
            self.notify("No process selected", severity="warning")
            return
        if proc.host_verified is False:
            self.notify(
                f"Process {proc.pid} is the driver's pid of another PID namespace (a container): here that number "
                "names a different process, so infertop will not signal it",
                severity="warning",
            )
            return
        # The command line as the table shows it (secrets masked), never read as markup: it is anyone's text.
        label = f"{proc.pid} ({(proc.command or proc.name or '?')[:50]})"

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                psutil.Process(proc.pid).terminate()
                self.notify(f"Sent SIGTERM to {label}", markup=False)
            except psutil.NoSuchProcess:
                self.notify(f"Process {proc.pid} already ended")
            except psutil.AccessDenied:
                self.notify(f"Not allowed to signal {proc.pid} (run as its user or root)", severity="error")

        self.push_screen(ConfirmScreen(f"Send SIGTERM to process {as_plain_markup(label)}?"), answered)


def as_plain_markup(text: str) -> str:
    """``text`` as Textual markup that shows it as it is: every ``[`` escaped. (``textual.markup.escape`` leaves
    ``[X=1]``, ``[$var]`` and ``[ b]`` to be read as markup, and a command line is anyone's text.)"""
    return text.replace("[", "\\[")


def fresh_recording_path(directory: Path) -> Path:
    """A recording's name in ``directory`` that no file has: infertop-DATE-TIME.ndjson, with -2, -3… after it
    when a recording of the same second is already there."""
    stem = time.strftime("infertop-%Y%m%d-%H%M%S")
    path = directory / f"{stem}.ndjson"
    n = 1
    while path.exists() or path.is_symlink():
        n += 1
        path = directory / f"{stem}-{n}.ndjson"
    return path


def make_live_sampler(
    config: SamplerConfig | None = None,
    *,
    vllm_urls: Iterable[str] = (),
    nvml_module: ModuleType | None = None,
    source: SnapshotSource | None = None,
) -> Sampler:
    """A sampler over the real machine (NVML, psutil, vLLM), or over ``source`` when given."""
    config = config or SamplerConfig()
    if source is None:
        source = LiveSource(NvmlBackend(nvml_module), config=config, vllm_urls=vllm_urls)
    return Sampler(source, history_len=config.history_len)


def _remote(urls: Iterable[str], interval_s: float | None, auth: RemoteAuth | None) -> RemoteWatcher | None:
    urls = list(urls)
    if not urls:
        return None
    if interval_s is None:
        return RemoteWatcher(urls, auth=auth)
    return RemoteWatcher(urls, interval_s=interval_s, auth=auth)


def make_app(
    *,
    config: SamplerConfig | None = None,
    vllm_urls: Iterable[str] = (),
    replay: Path | None = None,
    replay_speed: float = 1.0,
    replay_loop: bool = False,
    nvml_module: ModuleType | None = None,
    source: SnapshotSource | None = None,
    record_path: Path | None = None,
    record_dir: Path | None = None,
    autostart: bool = True,
    redraw_interval_s: float = 0.5,
    remote_urls: Iterable[str] = (),
    remote_interval_s: float | None = None,
    remote_auth: RemoteAuth | None = None,
    remote: RemoteWatcher | None = None,
) -> InfertopApp:
    """Build the monitor app: live by default, over a recording with ``replay``, or over any ``source``."""
    config = config or SamplerConfig()
    if replay is not None:
        source = ReplaySource(replay, speed=replay_speed, loop=replay_loop)
    sampler = make_live_sampler(config, vllm_urls=vllm_urls, nvml_module=nvml_module, source=source)
    rate_hz = 1.0 / config.interval_s if replay is None else 0.0
    return InfertopApp(
        sampler,
        rate_hz=rate_hz,
        record_path=record_path,
        record_dir=record_dir,
        autostart=autostart,
        redraw_interval_s=redraw_interval_s,
        remote=remote if remote is not None else _remote(remote_urls, remote_interval_s, remote_auth),
    )
