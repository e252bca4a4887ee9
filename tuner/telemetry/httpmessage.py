"""HTTP/1.1 requests and answers as the exporter's server reads and writes them, and the Host check.

A request is a head only (GET and HEAD have no body), parsed strictly: one request line, well-formed header
names, at most 100 headers, one Host and one Authorization. An answer always says its length and whether the
connection goes on. :class:`HostGuard` is the defence against DNS rebinding on a loopback address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

MAX_HEADERS = 100
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True)
class Request:
    """A parsed request head: headers by lower-case name (repeated ones joined with ', ')."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def has_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0").strip() != "0"

    @property
    def keeps_alive(self) -> bool:
        """Whether the client asks to go on after the answer (HTTP/1.1 unless it says close)."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        return "keep-alive" in tokens if self.version == "HTTP/1.0" else "close" not in tokens


def parse_request(head: bytes) -> Request | str:
    """The request of a head (without its blank line), or what is wrong with it."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]):
        return "malformed request line"
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return f"{version[:20]!r}: only HTTP/1.0 and HTTP/1.1"
    if not target.startswith("/"):
        return "the request target must be a path"
    if len(lines) - 1 > MAX_HEADERS:
        return "too many headers"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            return "malformed header"
        name = name.lower()
        if name in headers and name in ("host", "authorization", "content-length"):
            return f"more than one {name} header"
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return Request(method, target, version, headers)


@dataclass(frozen=True)
class Reply:
    """An answer: its status line, headers and body; ``encode`` adds its length and the connection's fate."""

    status: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    keep_alive: bool = False
    head_only: bool = False

    @classmethod
    def plain(
        cls,
        status: HTTPStatus,
        text: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        keep_alive: bool = False,
    ) -> Reply:
        body = f"{status.value} {status.phrase}: {text}\n".encode()
        content = ("Content-Type", "text/plain; charset=utf-8")
        return cls(f"{status.value} {status.phrase}", (*headers, content), body, keep_alive)

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status}", *(f"{name}: {value}" for name, value in self.headers)]
        lines += [
            f"Content-Length: {len(self.body)}",
            f"Connection: {'keep-alive' if self.keep_alive else 'close'}",
        ]
        return "\r\n".join([*lines, "", ""]).encode("latin-1") + (b"" if self.head_only else self.body)


def call_wsgi(app: WsgiApp, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """The status, headers and whole body ``app`` answers ``environ`` with."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started[:] = [status, headers]

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return started[0], list(started[1]), body


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, ``::ffff:127.0.0.1`` included) is this machine only."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def host_of(header: str) -> str:
    """The host of a ``Host`` header, without its port or brackets, lower case: '[::1]:9400' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":")[0]
    return header.rstrip(".")


class HostGuard:
    """Which ``Host`` headers a loopback-bound server answers: this machine's names and addresses only."""

    def __init__(self, bound: str) -> None:
        self.bound = bound.strip("[]").lower()

    def allows(self, header: str) -> bool:
        host = host_of(header)
        return host == self.bound or is_loopback(host)
