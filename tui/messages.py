"""Messages the monitor receives, named as the past events they report. Posted from worker threads."""

from __future__ import annotations

from textual.message import Message

from tuner.telemetry.model import Snapshot, SystemInfo


class GpusFound(Message):
    """The telemetry source opened: these GPUs (or this reason there are none)."""

    def __init__(self, info: SystemInfo) -> None:
        super().__init__()
        self.info = info


class SnapshotTaken(Message):
    """The sampler read the machine."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class ReplayEnded(Message):
    """A replayed recording ran out."""
