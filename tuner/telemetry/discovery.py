"""Find vLLM servers running on this machine, so the monitor can attach without being told a URL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import psutil

DEFAULT_VLLM_PORT = 8000


def is_vllm_server(cmdline: Sequence[str]) -> bool:
    """True for `vllm serve ...` and `python -m vllm.entrypoints.openai.api_server ...` (the API process)."""
    joined = " ".join(cmdline)
    if "vllm.entrypoints.openai.api_server" in joined:
        return True
    for i, arg in enumerate(cmdline[:-1]):
        if arg.rsplit("/", 1)[-1] == "vllm" and cmdline[i + 1] == "serve":
            return True
    # `vllm serve` via `python .../bin/vllm serve`
    return any(a.endswith("/vllm") for a in cmdline) and "serve" in cmdline


def _flag_value(cmdline: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == flag and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def url_from_cmdline(cmdline: Sequence[str], listening_ports: Iterable[int] = ()) -> str:
    """The base URL a vLLM server started with this command line answers on.

    ``--port``/``--host`` win; otherwise a port the process is seen listening on; otherwise vLLM's default 8000.
    A wildcard bind (0.0.0.0, ::, or none) is reached on loopback.
    """
    port_text = _flag_value(cmdline, "--port")
    ports = sorted(listening_ports)
    if port_text and port_text.isdigit():
        port = int(port_text)
    elif ports:
        port = ports[0]
    else:
        port = DEFAULT_VLLM_PORT
    host = _flag_value(cmdline, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def discover_vllm_urls() -> list[str]:
    """Base URLs of vLLM API servers on this machine (may be empty). Never raises."""
    urls: list[str] = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info.get("cmdline") or []
            if not is_vllm_server(cmdline):
                continue
            try:
                ports = [
                    c.laddr.port
                    for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr
                ]
            except (psutil.AccessDenied, psutil.NoSuchProcess, OSError):
                ports = []
            url = url_from_cmdline(cmdline, ports)
            if url not in urls:
                urls.append(url)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return urls
