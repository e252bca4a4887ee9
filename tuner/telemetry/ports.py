"""The exporter's TCP port: its default, and who holds a port that is busy."""

from __future__ import annotations

DEFAULT_PORT = 9400
"""Where ``infertop exporter`` listens and where the remote view looks for it."""
