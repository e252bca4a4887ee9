"""Messages the tune screen receives, named as the past events they report. Posted from worker threads.

Snapshots of the candidate's telemetry arrive as the monitor's :class:`tui.messages.SnapshotTaken`.
"""

from __future__ import annotations

from textual.message import Message

from tuner.telemetry.model import SystemInfo
from tuner.telemetry.sampler import History
from tuner.tuning.events import TuneEvent


class TuneEventReceived(Message):
    """The tuner reported progress (one event of :mod:`tuner.tuning.events`, in the order it was emitted)."""

    def __init__(self, event: TuneEvent) -> None:
        super().__init__()
        self.event = event


class TelemetryAttached(Message):
    """The tuner's sampler delivered its first reading: what it watches, and where its history is kept."""

    def __init__(self, info: SystemInfo, history: History) -> None:
        super().__init__()
        self.info = info
        self.history = history


class TuneRunEnded(Message):
    """The tuner's ``run()`` returned (``error`` None) or raised (``error`` says what, in one line)."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__()
        self.error = error
