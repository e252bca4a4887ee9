"""One page from another server, read within a whole-request deadline and a size cap.

httpx's timeouts bound each socket operation, not the request: a server that trickles a byte a second never
times out, and a page of any size is read whole (50 MB held in memory, then parsed). Here every connect, TLS
handshake, send and receive is given only the time left until the request's deadline, so a read ends on time
whatever the server does; and a body is refused as soon as it passes the cap, at once when its Content-Length
says so, without reading the rest. Exporters' ``/snapshot.json`` (:mod:`tuner.telemetry.remote`) and
inference servers' ``/metrics`` (:mod:`tuner.telemetry.engines`) are read through it.

It speaks through httpcore (httpx's own transport) because httpx offers no hook for a per-request deadline on
the socket; nothing here reaches into either library's private parts.
"""

from __future__ import annotations

import base64
import math
import ssl
import time
from collections.abc import Iterable, Sequence

import httpcore
import httpx

MAX_PAGE_BYTES = 8 * 2**20
"""The largest page read: an 8-GPU host's /snapshot.json is ~30 kB, a busy vLLM's /metrics ~100 kB."""


class PageError(Exception):
    """Why a page could not be read, in words for people; ``status`` is the HTTP status when one came."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class _Deadline:
    """When the request in progress must be over (monotonic seconds); infinity between requests."""

    def __init__(self) -> None:
        self.at = math.inf

    def left(self, timeout: float | None, expired: type[Exception]) -> float:
        """The time one socket operation may take: its own timeout, never past the deadline."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise expired("the request's deadline passed")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = self._deadline.left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left), self._deadline)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own sockets, each operation cut short at the request's deadline."""

    def __init__(self, deadline: _Deadline) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline.left(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline.left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, left, socket_options), self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def basic_auth(username: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.0f} MiB" if n_bytes >= 2**20 else f"{n_bytes:,} bytes"


class PageReader:
    """Reads pages, one at a time, each within ``deadline_s`` and ``max_bytes``; keeps the connection between
    reads. Not for several threads at once: each watched server has its own."""

    def __init__(
        self,
        *,
        deadline_s: float,
        max_bytes: int = MAX_PAGE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self._headers = list(headers)
        self._deadline = _Deadline()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,  # None: httpcore's default, httpx's CA bundle
            network_backend=_DeadlineBackend(self._deadline),
            max_connections=1,
            keepalive_expiry=30.0,
        )

    def get(self, url: str) -> bytes:
        """The body of a 2xx answer to GET ``url``. Raises :class:`PageError` in words for anything else.

        Credentials in the URL (``http://user:pass@host``) are sent as basic auth, unless the reader was given
        an ``Authorization`` header of its own."""
        self._deadline.at = time.monotonic() + self.deadline_s
        try:
            return self._get(url)
        except httpcore.TimeoutException:
            raise PageError(f"timed out (no complete answer within {self.deadline_s:g} s)") from None
        except httpcore.NetworkError as exc:
            raise PageError(_network_failure(exc)) from None
        except httpcore.ProtocolError:
            raise PageError("not an HTTP answer (an https:// server read as http://?)") from None
        except (httpcore.UnsupportedProtocol, httpx.InvalidURL, ValueError) as exc:
            raise PageError(f"not a URL it can read ({type(exc).__name__})") from None
        finally:
            self._deadline.at = math.inf

    def _get(self, url: str) -> bytes:
        parsed = httpx.URL(url)
        headers = [("Host", parsed.netloc.decode("ascii")), *self._headers]
        if parsed.username and not any(name.lower() == "authorization" for name, _ in headers):
            headers.append(("Authorization", basic_auth(parsed.username, parsed.password)))
        target = parsed.raw_path or b"/"
        request_url = httpcore.URL(scheme=parsed.scheme, host=parsed.host, port=parsed.port, target=target)
        with self._pool.stream("GET", request_url, headers=headers) as response:
            if not 200 <= response.status < 300:
                raise PageError(f"HTTP {response.status}", response.status)
            declared = _content_length(response.headers)
            if declared is not None and declared > self.max_bytes:
                raise PageError(
                    f"page too large ({_size(declared)}; at most {_size(self.max_bytes)} is read)"
                )
            body = bytearray()
            for chunk in response.iter_stream():
                body += chunk
                if len(body) > self.max_bytes:
                    raise PageError(f"page too large (over {_size(self.max_bytes)}; the rest was not read)")
            return bytes(body)

    def close(self) -> None:
        self._pool.close()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def _network_failure(exc: httpcore.NetworkError) -> str:
    """A failed connection for people: TLS problems told apart from an absent host or a dropped line."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS: its certificate is not trusted here (give the CA that signed it)"
    if "CERTIFICATE_REQUIRED" in text:
        return "TLS: it asks for a client certificate"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return "TLS: it does not speak https (an http:// server?)"
    if "SSL" in text or "TLS" in text:
        return "TLS handshake failed (its certificate, or ours, refused)"
    if isinstance(exc, httpcore.ConnectError):
        return "not reachable (connection refused or no route)"
    return "connection lost mid-answer"
