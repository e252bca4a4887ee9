"""Finding DCGM on this machine: its nv-hostengine and dcgm-exporter processes, and where each one listens,
read from its flags and environment as the program itself reads them (dcgm-exporter: ``-a``/``--address`` or
``DCGM_EXPORTER_LISTEN``, ``-c``/``--collect-interval`` in ms or ``DCGM_EXPORTER_INTERVAL``, NVIDIA/dcgm-exporter
pkg/cmd/app.go; nv-hostengine: ``-d``, ``-b``, ``-p``, hostengine/src/HostEngineCommandLine.cpp).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

from tuner.telemetry.dcgm.model import HOSTENGINE_PORT, DcgmSpec, host_port
from tuner.telemetry.foreign import printable

EXPORTER_PORT = 9400  # dcgm-exporter pkg/cmd/app.go: --address ":9400"
EXPORTER_INTERVAL_S = 30.0  # dcgm-exporter pkg/cmd/app.go: --collect-interval 30000 (ms)
HOSTENGINE_SOCKET = (
    "/tmp/nv-hostengine"  # nv-hostengine -d without a path (hostengine/src/HostEngineCommandLine.cpp)
)


@dataclass(frozen=True)
class DcgmProcess:
    """A DCGM process seen on this machine: its command line and, where readable, its environment."""

    pid: int
    name: str  # "nv-hostengine" or "dcgm-exporter"
    cmdline: tuple[str, ...]
    environ: Mapping[str, str] | None  # None: not readable (another user's process)


_PROCESS_NAMES = ("nv-hostengine", "dcgm-exporter")


def find_dcgm_processes() -> list[DcgmProcess]:
    """nv-hostengine and dcgm-exporter processes here (may be empty). Never raises."""
    found = []
    try:
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            name = proc.info.get("name") or ""
            cmdline = tuple(proc.info.get("cmdline") or ())
            program = cmdline[0].rsplit("/", 1)[-1] if cmdline else name
            kind = name if name in _PROCESS_NAMES else program if program in _PROCESS_NAMES else None
            if kind is None:
                continue
            try:
                environ: Mapping[str, str] | None = proc.environ()
            except (psutil.Error, OSError):
                environ = None
            found.append(DcgmProcess(proc.info["pid"], kind, cmdline, environ))
    except (psutil.Error, OSError):
        pass
    return found


def _flag(cmdline: Sequence[str], names: Sequence[str], *, optional_value: str | None = None) -> str | None:
    """A flag's value: ``-a X``, ``-a=X``, ``--address X``, ``--address=X`` (Go's flag package, which
    dcgm-exporter's urfave/cli uses, takes one or two dashes alike; TCLAP, nv-hostengine's, the same here).
    ``optional_value``: what a flag given without a value means."""
    for i, arg in enumerate(cmdline[1:], start=1):
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, sep, value = arg.lstrip("-").partition("=")
        if name not in names:
            continue
        if sep:
            return value
        nxt = cmdline[i + 1] if i + 1 < len(cmdline) else None
        if nxt is not None and not nxt.startswith("-"):
            return nxt
        return optional_value
    return None


def _loopback(host: str) -> str:
    """Where a server bound to ``host`` is reached from here: wildcards on loopback."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::", "ALL") else host


def exporter_settings(proc: DcgmProcess) -> tuple[str, float | None, str]:
    """(URL of its /metrics, its collect interval in s or None, a note on where the interval came from) of a
    dcgm-exporter process. Flags win over the environment, as urfave/cli does."""
    env = proc.environ
    listen = _flag(proc.cmdline, ("a", "address"))
    if listen is None and env is not None:
        listen = env.get("DCGM_EXPORTER_LISTEN")
    host, port = host_port(listen or f":{EXPORTER_PORT}")
    url = f"http://{_loopback(host or '')}:{port or EXPORTER_PORT}/metrics"
    interval_text = _flag(proc.cmdline, ("c", "collect-interval"))
    if interval_text is None and env is not None:
        interval_text = env.get("DCGM_EXPORTER_INTERVAL")
    if interval_text is None:
        if env is None:
            return url, None, f" (its environment is not readable; {EXPORTER_INTERVAL_S:g} s by default)"
        return url, EXPORTER_INTERVAL_S, " (its default)"
    ms = interval_text.strip()
    if not (ms.isascii() and ms.isdigit()) or not 0 < int(ms) <= 86_400_000:
        return url, None, f" (its collect interval {printable(ms, 24)!r} is not a number of ms)"
    return url, int(ms) / 1000.0, ""


def hostengine_endpoint(proc: DcgmProcess) -> DcgmSpec:
    """Where an nv-hostengine process listens: ``-d``/``--domain-socket`` (no TCP then), else ``-b``/
    ``--bind-interface`` (127.0.0.1 by default) and ``-p``/``--port`` (5555)."""
    sock = _flag(proc.cmdline, ("d", "domain-socket"), optional_value=HOSTENGINE_SOCKET)
    if sock is not None:
        return DcgmSpec("hostengine", unix_socket=sock)
    port_text = _flag(proc.cmdline, ("p", "port")) or str(HOSTENGINE_PORT)
    port_ok = port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536
    port = int(port_text) if port_ok else HOSTENGINE_PORT
    host = _loopback(_flag(proc.cmdline, ("b", "bind-interface")) or "127.0.0.1")
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return DcgmSpec("hostengine", address=f"{host}:{port}")
