"""The exporter's TCP port: its default, and who holds a port that is busy."""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Any

DEFAULT_PORT = 20400
"""Where ``infertop exporter`` listens and where the remote view looks for it.

Not 9400: that is dcgm-exporter's, which NVIDIA's GPU Operator runs on every GPU node. Not in 9100-9999 at all:
Prometheus' registry of exporter ports (github.com/prometheus/prometheus/wiki/Default-port-allocations) has
given every port there away (9200, 9300 and 9312 are held back for Elasticsearch and Sphinx), and its later
grants go outside it (10001 upwards, 39100, ...), none of them 20400. Nor is 20400 in IANA's registry
(20223-20479 unassigned), the worker ports Ray is often given (10002-19999), torchrun's and torch.distributed's
(29400, 29500), Kubernetes' NodePorts (30000-32767) or Linux's ephemeral range (32768-60999).
tests/test_exporter_port.py lists the allocations it was checked against."""

LOOKUP_TIMEOUT_S = 2.0
"""The longest :func:`port_holder` looks: the socket table of a busy node can be long to read."""

_WILDCARDS = frozenset({"0.0.0.0", "::", ""})
_NAME_CHARS = 64


def port_holder(host: str, port: int, *, timeout_s: float = LOOKUP_TIMEOUT_S) -> str | None:
    """Who holds TCP ``port`` where ``host`` would listen, in words: ``'dcgm-exporter (pid 1234, user root)'``,
    or ``'another process (not visible to this user)'`` when the socket is there but its owner is hidden (another
    user's process, seen by a user who is not root). None when no socket on that port is seen, or the look took
    longer than ``timeout_s``. Never raises."""
    result: list[str | None] = []

    def look() -> None:
        try:
            result.append(_holder(host, port, time.monotonic() + timeout_s))
        except Exception:  # psutil, /proc or a name lookup failing in a way not foreseen: nobody named
            result.append(None)

    worker = threading.Thread(target=look, name="port-holder", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else None


def _holder(host: str, port: int, deadline: float) -> str | None:
    import psutil

    try:
        sockets = [(s.laddr, s.status, s.pid) for s in psutil.net_connections(kind="tcp")]
    except (
        psutil.AccessDenied,
        PermissionError,
    ):  # macOS, BSD: the table is root's; each process's is its own
        sockets = _each_process_sockets(deadline)
    on_port = [(status, pid) for laddr, status, pid in sockets if _holds(laddr, host, port)]
    # A listener first; else whatever is bound there (a socket bound and not listening, a connection's end).
    holders = [s for s in on_port if s[0] == psutil.CONN_LISTEN] or on_port
    if not holders:
        return None
    pids = sorted({pid for _, pid in holders if pid is not None})
    if not pids:
        return "another process (not visible to this user)"
    words = _describe(pids[0])
    if len(pids) > 1:
        words += f" and {len(pids) - 1} other process{'es' if len(pids) > 2 else ''}"
    return words


def _each_process_sockets(deadline: float) -> list[tuple[Any, str, int | None]]:
    """Every visible process's own TCP sockets, each with its pid (where the system-wide table is refused)."""
    import psutil

    found: list[tuple[Any, str, int | None]] = []
    for process in psutil.process_iter():
        if time.monotonic() > deadline:
            break
        try:
            found.extend((c.laddr, c.status, process.pid) for c in process.net_connections(kind="tcp"))
        except (psutil.Error, OSError):
            continue
    return found


def _holds(laddr: Any, host: str, port: int) -> bool:
    """Whether a socket bound to ``laddr`` keeps ``host:port`` from being bound."""
    return bool(laddr) and laddr.port == port and _overlaps(laddr.ip, host)


def _overlaps(bound: str, wanted: str) -> bool:
    """Whether an address bound keeps another from being bound on the same port: the same address, either one a
    wildcard (0.0.0.0 and :: take every address), or a host name (what it resolves to is not known here)."""
    if bound in _WILDCARDS or wanted in _WILDCARDS:
        return True
    a, b = _address(bound), _address(wanted)
    return a is None or b is None or a == b


def _address(text: str) -> str | None:
    """An address in one spelling ('::ffff:127.0.0.1' and '127.0.0.1' alike); None for a host name."""
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _describe(pid: int) -> str:
    """'name (pid N, user U)', with what can be read of them."""
    import psutil

    name, user = None, None
    try:
        process = psutil.Process(pid)
        name = process.name()
        user = process.username()
    except (psutil.Error, OSError, KeyError):  # gone, hidden, or a uid with no name
        pass
    facts = f"pid {pid}" + (f", user {_printable(user)}" if user else "")
    return f"{_printable(name) if name else 'a process'} ({facts})"


def _printable(text: str) -> str:
    """A process's or user's name as one short line: anyone can name a process, newlines and escapes included."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= _NAME_CHARS else clean[: _NAME_CHARS - 1] + "…"
