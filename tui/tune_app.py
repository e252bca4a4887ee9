"""The app behind ``infertop tune``: runs a tuner in a thread worker and shows its run on the tune screen.

The tuner is anything shaped like :class:`TunerLike` (``tuner.tuning.tune`` provides the real one; tests a fake).
Its events and its sampler's snapshots are forwarded to the screen as messages; the UI thread owns every
widget. Stopping (``s``, or ``q`` while a run is active) sets the ``cancel`` event the tuner watches: it stops
the vLLM server and keeps the trials it finished. SIGTERM (or a SIGINT sent from outside: in the TUI Ctrl-C is a
key) does the same as a confirmed ``q``: the tuner stops its server and writes its report, then the app leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.types import NoActiveAppError
from textual.worker import Worker, WorkerState

from tui.messages import SnapshotTaken
from tui.screens.confirm import ConfirmScreen
from tui.screens.tune import TuneScreen
from tui.screens.tune_help import TuneHelpScreen
from tui.tune_messages import TelemetryAttached, TuneEventReceived, TuneRunEnded
from tuner.telemetry.model import Snapshot
from tuner.telemetry.sampler import Sampler
from tuner.tuning.events import Listener, TuneEvent

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers

STOP_QUESTION = "Stop the tuning run? The server is stopped, finished trials are kept."


class TunerLike(Protocol):
    """What the app needs of a tuner."""

    @property
    def sampler(self) -> Sampler | None:
        """GPU, host and candidate-server telemetry; None (or not yet started) until ``run()`` creates it.
        The same object for the whole run."""
        ...

    def run(self, listener: Listener, cancel: threading.Event) -> object:
        """Tune, blocking; call ``listener`` with each event in order on this thread; once ``cancel`` is
        set, stop within a few seconds (vLLM server included) and return."""
        ...


class TuneApp(App[None]):
    """Shows one tuning run; keeps the results on screen after it ends, until ``q``."""

    TITLE = "infertop tune"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("s", "stop_run", "Stop run"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        tuner: TunerLike,
        *,
        autostart: bool = True,
        clock: Callable[[], float] = time.monotonic,
        redraw_interval_s: float = 0.5,
    ) -> None:
        super().__init__()
        self.tuner = tuner
        self.autostart = autostart
        self.cancel = threading.Event()
        """Set to make the tuner stop; the tuner watches it."""
        self.tune_screen = TuneScreen(clock=clock, redraw_interval_s=redraw_interval_s)
        self.worker: Worker[object] | None = None
        self.result: object = None
        """What ``tuner.run()`` returned, once it has."""
        self.error: BaseException | None = None
        """What ``tuner.run()`` raised, if it did."""
        self._sampler: Sampler | None = None
        self._telemetry_announced = False
        self._exit_when_stopped = False
        self._signals_caught: dict[signal.Signals, SignalHandler | None] = {}  # -> the handler it had before

    async def on_mount(self) -> None:
        await self.push_screen(self.tune_screen)
        self._catch_stop_signals()
        if self.autostart:
            self.start_run()

    def _catch_stop_signals(self) -> None:
        """Without this a SIGTERM kills the process at once: no report, and the terminal left in raw mode."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            before = signal.getsignal(signum)
            try:
                loop.add_signal_handler(signum, self._stop_signal_received)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                continue
            self._signals_caught[signum] = before

    def _release_stop_signals(self) -> None:
        """The handlers the process had before the app, back in place."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed: its handlers went with it
            loop = asyncio.get_running_loop()
            for signum in self._signals_caught:
                loop.remove_signal_handler(signum)
        for signum, before in self._signals_caught.items():
            if before is not None:  # None: set from outside Python, nothing to restore
                signal.signal(signum, before)
        self._signals_caught.clear()

    def _stop_signal_received(self) -> None:
        """Asked to stop from outside: as a confirmed ``q``, and a second time leave at once (as a second ``q``)."""
        if self.run_active and not self.cancel.is_set():
            self._exit_when_stopped = True
            self.stop_run()
            return
        self.cancel.set()
        self.exit()

    def start_run(self) -> None:
        """Run the tuner in a thread worker (``autostart`` does this on mount)."""
        self.worker = self.run_worker(self._run_tuner, thread=True, name="tuner", exit_on_error=False)

    @property
    def run_active(self) -> bool:
        """A run is under way (the tuner has not returned, and its events have not told of its end):
        stopping now would lose the work in progress."""
        if self.worker is not None and self.worker.is_finished:
            return False
        run = self.tune_screen.run
        return run.active and (self.worker is not None or run.started is not None)

    # --- the worker and its callbacks (not on the UI thread) -----------------------------------------

    def _run_tuner(self) -> object:
        return self.tuner.run(self._event_received, self.cancel)

    def _post(self, message: Message) -> None:
        # Once the app has closed there is no one left to tell; the tuner must not see an exception for it.
        with contextlib.suppress(NoActiveAppError):
            self.tune_screen.post_message(message)

    def _event_received(self, event: TuneEvent) -> None:
        """The tuner's listener: runs on the tuner's thread, so it only posts."""
        self._listen_to_sampler()  # the tuner creates its sampler inside run(): look for it as events come
        self._post(TuneEventReceived(event))

    def _listen_to_sampler(self) -> None:
        sampler = self.tuner.sampler
        if sampler is None or sampler is self._sampler:
            return
        if self._sampler is not None:
            self._sampler.remove_listener(self._snapshot_taken)
        self._sampler = sampler
        self._telemetry_announced = False
        sampler.add_listener(self._snapshot_taken)

    def _snapshot_taken(self, snap: Snapshot) -> None:
        """The sampler's listener: runs on the sampler's thread."""
        sampler = self._sampler
        if sampler is None:
            return
        if not self._telemetry_announced:
            # By its first reading the sampler has opened its source: what it watches is known now.
            self._telemetry_announced = True
            self._post(TelemetryAttached(sampler.info, sampler.history))
        self._post(SnapshotTaken(snap))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is not self.worker or not event.worker.is_finished:
            return
        if event.state is WorkerState.SUCCESS:
            self.result = event.worker.result
            self.tune_screen.post_message(TuneRunEnded())
        elif event.state is WorkerState.ERROR:
            self.error = event.worker.error
            self.tune_screen.post_message(TuneRunEnded(error=_one_line(self.error)))
        self._stop_listening()
        self.refresh_bindings()
        if self._exit_when_stopped:
            self.exit()

    def _stop_listening(self) -> None:
        if self._sampler is not None:
            self._sampler.remove_listener(self._snapshot_taken)
            self._sampler = None

    def on_unmount(self) -> None:
        # However the app ends, the tuner must not run on unwatched (it stops its vLLM server).
        self.cancel.set()
        self._stop_listening()
        self._release_stop_signals()

    # --- actions -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # "Stop run" leaves the footer once there is no run to stop.
        return action != "stop_run" or self.run_active

    def stop_run(self) -> None:
        """Ask the tuner to stop; the screen says so until it has."""
        self.cancel.set()
        self.tune_screen.set_stopping()

    def action_stop_run(self) -> None:
        if isinstance(self.screen, ConfirmScreen):  # already asking
            return
        if not self.run_active:
            self.notify("No tuning run is active.", timeout=3)
            return
        if self.cancel.is_set():
            self.notify("Already stopping: waiting for the tuner to stop the vLLM server.", timeout=3)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.stop_run()

        self.push_screen(ConfirmScreen(STOP_QUESTION), answered)

    async def action_quit(self) -> None:
        if isinstance(self.screen, ConfirmScreen):  # already asking
            return
        if not self.run_active or self.cancel.is_set():
            # Nothing to lose, or already stopping (a second q): leave now. The process still waits for the
            # tuner's thread, which stops its server within seconds.
            self.cancel.set()
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._exit_when_stopped = True  # leave once the tuner has wound down
                self.stop_run()

        self.push_screen(ConfirmScreen(STOP_QUESTION), answered)

    def action_help(self) -> None:
        self.push_screen(TuneHelpScreen())


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def make_tune_app(
    tuner: TunerLike,
    *,
    autostart: bool = True,
    clock: Callable[[], float] = time.monotonic,
    redraw_interval_s: float = 0.5,
) -> TuneApp:
    """Build the tune app over ``tuner``; with ``autostart`` the run begins as soon as the screen is up.

    ``clock`` gives the times on screen (elapsed, server start-up): tests and screenshots pass a frozen one.
    """
    return TuneApp(tuner, autostart=autostart, clock=clock, redraw_interval_s=redraw_interval_s)
