"""Find inference servers (vLLM, SGLang, TGI, llama.cpp) running on this machine, so the monitor can attach
without being told a URL, and know which processes (hence which GPUs) each one uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil

DEFAULT_VLLM_PORT = 8000
# sglang python/sglang/srt/server_args.py (port 30000); text-generation-inference launcher/src/main.rs and
# backends/v3/src/main.rs (port 3000, `-p`, env PORT: the official image sets PORT=80); llama.cpp
# common/arg.cpp (port 8080, env LLAMA_ARG_PORT / LLAMA_ARG_HOST).
DEFAULT_PORTS = {"vllm": DEFAULT_VLLM_PORT, "sglang": 30000, "tgi": 3000, "llamacpp": 8080}
_PORT_FLAGS = {"vllm": ("--port",), "sglang": ("--port",), "tgi": ("--port", "-p"), "llamacpp": ("--port",)}
_HOST_FLAGS = {"vllm": ("--host",), "sglang": ("--host",), "tgi": ("--hostname",), "llamacpp": ("--host",)}
_PORT_ENV = {"tgi": "PORT", "llamacpp": "LLAMA_ARG_PORT"}
_HOST_ENV = {"llamacpp": "LLAMA_ARG_HOST"}
_TGI_ROUTER = "text-generation-router"  # also text-generation-router-v3 and other backends' routers
MAX_ARGV = 512
"""The most command-line arguments kept of a server (a real one has a few dozen)."""
MAX_ARG_CHARS = 4096
"""The longest argument kept; a longer one becomes "" (a cut path or value would mislead, and dropping it would
pair the flags around it with the wrong values)."""


@dataclass(frozen=True)
class DiscoveredServer:
    """An inference server found by its command line."""

    url: str
    engine: str  # "vllm", "sglang", "tgi", "llamacpp"
    pid: int  # the server's topmost process: TGI's launcher, vLLM's and SGLang's API server
    pids: tuple[int, ...]  # pid and all its descendants when found: the processes that hold its GPUs
    # The topmost process's command line, for reading the model and its flags (the decode-traffic estimate).
    # In memory only: it may hold secrets (--api-key), so it is never exported, recorded or shown, and kept
    # out of repr().
    argv: tuple[str, ...] = field(default=(), repr=False)


def _program(arg: str) -> str:
    return arg.rsplit("/", 1)[-1]


def is_vllm_server(cmdline: Sequence[str]) -> bool:
    """True for `vllm serve ...` and `python -m vllm.entrypoints.openai.api_server ...` (the API process)."""
    joined = " ".join(cmdline)
    if "vllm.entrypoints.openai.api_server" in joined:
        return True
    for i, arg in enumerate(cmdline[:-1]):
        if _program(arg) == "vllm" and cmdline[i + 1] == "serve":
            return True
    # `vllm serve` via `python .../bin/vllm serve`
    return any(a.endswith("/vllm") for a in cmdline) and "serve" in cmdline


def engine_of_cmdline(cmdline: Sequence[str]) -> str | None:
    """Which inference server a command line starts, or None."""
    if not cmdline:
        return None
    if is_vllm_server(cmdline):
        return "vllm"
    if "sglang.launch_server" in cmdline:  # python -m sglang.launch_server
        return "sglang"
    program = _program(cmdline[0])
    if program == "text-generation-launcher" or program.startswith(_TGI_ROUTER):
        return "tgi"
    if program == "llama-server":
        return "llamacpp"
    return None


def _flag_value(cmdline: Sequence[str], flags: Iterable[str]) -> str | None:
    for flag in flags:
        for i, arg in enumerate(cmdline):
            if arg == flag and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def url_from_cmdline(
    cmdline: Sequence[str],
    listening_ports: Iterable[int] = (),
    *,
    engine: str = "vllm",
    environ: Mapping[str, str] | None = None,
) -> str:
    """The base URL a server started with this command line answers on.

    The port and host flags win, then the engine's environment variables, then a port the process is seen
    listening on, then the engine's default port. A wildcard bind (0.0.0.0, ::, or none) is reached on loopback.
    """
    env = environ or {}
    port_text = _flag_value(cmdline, _PORT_FLAGS.get(engine, ("--port",)))
    if port_text is None and engine in _PORT_ENV:
        port_text = env.get(_PORT_ENV[engine])
    ports = sorted(listening_ports)
    if port_text and port_text.isdigit():
        port = int(port_text)
    elif ports:
        port = ports[0]
    else:
        port = DEFAULT_PORTS.get(engine, DEFAULT_VLLM_PORT)
    host = _flag_value(cmdline, _HOST_FLAGS.get(engine, ("--host",)))
    if host is None and engine in _HOST_ENV:
        host = env.get(_HOST_ENV[engine])
    if not host or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class SeenProcess:
    """A process whose command line starts an inference server."""

    pid: int
    ppid: int
    cmdline: tuple[str, ...]
    engine: str


def _listening_ports(pid: int) -> list[int]:
    try:
        return [
            c.laddr.port
            for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr
        ]
    except (psutil.Error, OSError):
        return []


def _environ(pid: int, engine: str) -> dict[str, str]:
    if engine not in _PORT_ENV and engine not in _HOST_ENV:
        return {}
    try:
        return psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return {}


def process_tree(pid: int) -> tuple[int, ...]:
    """A process and its descendants (a server's GPU workers are its children); just ``pid`` when gone."""
    try:
        return (pid, *(c.pid for c in psutil.Process(pid).children(recursive=True)))
    except psutil.Error:
        return (pid,)


def servers_from_processes(seen: Iterable[SeenProcess]) -> list[tuple[SeenProcess, SeenProcess]]:
    """Group recognised processes into servers: (topmost process, the process whose flags give the URL).

    A process whose parent runs the same engine belongs to the parent's server (vLLM and SGLang workers forked
    with the same command line, TGI's router under its launcher). TGI's router carries the port the launcher
    was given, so it names the URL; elsewhere the topmost process does.
    """
    by_pid = {s.pid: s for s in seen}
    groups: dict[int, list[SeenProcess]] = {}
    for s in by_pid.values():
        root = s
        while root.ppid in by_pid and by_pid[root.ppid].engine == s.engine and root.ppid != root.pid:
            root = by_pid[root.ppid]
        groups.setdefault(root.pid, []).append(s)
    servers = []
    for root_pid, members in groups.items():
        root = by_pid[root_pid]
        routers = [m for m in members if _program(m.cmdline[0]).startswith(_TGI_ROUTER)]
        servers.append((root, routers[0] if routers else root))
    return servers


def discover_servers() -> list[DiscoveredServer]:
    """Inference servers on this machine (may be empty), one per URL. Never raises."""
    seen: list[SeenProcess] = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            cmdline = tuple(proc.info.get("cmdline") or ())
            engine = engine_of_cmdline(cmdline)
            if engine is not None:
                seen.append(SeenProcess(proc.info["pid"], proc.info.get("ppid") or 0, cmdline, engine))
        except (psutil.Error, OSError):
            continue
    found: dict[str, DiscoveredServer] = {}
    for root, named_by in servers_from_processes(seen):
        url = url_from_cmdline(
            named_by.cmdline,
            _listening_ports(named_by.pid),
            engine=root.engine,
            environ=_environ(named_by.pid, root.engine),
        )
        if url not in found:
            argv = tuple(a if len(a) <= MAX_ARG_CHARS else "" for a in root.cmdline[:MAX_ARGV])
            found[url] = DiscoveredServer(
                url=url, engine=root.engine, pid=root.pid, pids=process_tree(root.pid), argv=argv
            )
    return list(found.values())


def discover_vllm_urls() -> list[str]:
    """Base URLs of vLLM API servers on this machine (may be empty). Never raises."""
    return [s.url for s in discover_servers() if s.engine == "vllm"]
