"""The exporter's HTTP server: a WSGI app served so that no peer can hold it, and locked as ``--web-config`` says.

One thread owns every socket (a selector): it accepts, completes TLS handshakes and reads each request head
without blocking. Only a complete request reaches one of a fixed pool of worker threads, which checks the Host
header and the credentials and calls the app; the answer goes back to the selector thread to be written. An
idle or trickling connection so costs a file descriptor and a few hundred bytes, never a thread:

- a client has ``request_timeout_s`` (10 s) from connecting, or from the end of its previous answer, to send a
  whole request head, TLS handshake included, and as long again to take the answer. The deadline covers the
  whole head, not each read: a byte a second does not keep a connection open;
- at most ``max_connections`` are open (512, or half the descriptors the process may open); one more closes
  the connection that has waited longest without sending a request, else the longest idle: a flood of idle
  connections cannot lock Prometheus out;
- at most ``workers`` (64) requests are answered at once; more wait their turn;
- a request is a head of at most 16 KiB, without a body (GET and HEAD).

Bound to a loopback address, it answers only requests whose ``Host`` names this machine (``localhost``, a
loopback address, or the bound one, with any port), else 403: a web page in a browser on this machine cannot
read the exporter through a DNS name rebound to 127.0.0.1 (DNS rebinding). Bound beyond loopback, any ``Host``
goes (a fleet's Prometheus names the machine as it likes): lock it with ``--web-config`` instead.

Why not ``wsgiref`` or ``prometheus_client.start_http_server``: both start a thread per connection with no
time-out, and the latter does its TLS handshakes on the accepting thread, so one silent client stops it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import re
import resource
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from tuner.telemetry.httpmessage import HostGuard, Reply, WsgiApp, call_wsgi, is_loopback, parse_request
from tuner.telemetry.webconfig import BasicAuth, WebConfig

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
WORKERS = 64
MAX_CONNECTIONS = 512
MAX_HEAD_BYTES = 16 * 1024
_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    deadline: float
    state: str = "handshake"  # handshake -> reading -> working -> writing -> reading ... (or closed)
    inbox: bytearray = field(default_factory=bytearray)
    peer_done: bool = False  # the peer shut its side: answer what it sent, then close
    outbox: memoryview | None = None
    keep_alive: bool = False
    events: int = 0


def _fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class WebServer:
    """Serves ``app`` on ``host:port`` from :meth:`start` to :meth:`close`. Raises OSError when it cannot bind.

    ``web_config`` adds TLS (and client certificates) and basic auth; without one it serves plain HTTP to
    anyone who reaches the address (the Host check above still holds on loopback).
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: WsgiApp,
        *,
        web_config: WebConfig | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self.app = app
        self.web_config = web_config or WebConfig()
        self.request_timeout_s = request_timeout_s
        # Room left under the process's descriptor limit for NVML, psutil and the inference-server scrapers.
        self.max_connections = max(8, min(max_connections, _fd_limit() // 2))
        self._tls = self.web_config.tls.context if self.web_config.tls is not None else None
        self._allowed_sans = set(self.web_config.tls.client_allowed_sans) if self.web_config.tls else set()
        self._auth = BasicAuth(self.web_config.users) if self.web_config.users else None
        self._guard = HostGuard(host) if is_loopback(host) else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):  # inherited by every connection accepted (Linux)
                self._listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._listener.bind((host, port))
            self._listener.listen(min(1024, socket.SOMAXCONN))
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infertop-exporter-worker")
        self._answers: deque[tuple[_Connection, bytes, bool]] = deque()  # from the workers to the selector
        self._open: set[_Connection] = set()
        # Connections waiting on their peer, oldest first: every wait is request_timeout_s long, so the first
        # is also the first to time out. Those that never sent a request are also in _fresh, oldest first: the
        # first of them is closed to make room (a client that has been answered goes last).
        self._waiting: dict[_Connection, None] = {}
        self._fresh: dict[_Connection, None] = {}
        self._closing = threading.Event()
        self._released = False
        self._thread: threading.Thread | None = None
        self.accepted = 0
        """Connections accepted so far."""

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def start(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="infertop-exporter-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving: every connection and the address are closed (a request being answered is dropped)."""
        self._closing.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._thread is None or not self._thread.is_alive():
            self._release()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the selector thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                timeout = None
                if self._waiting:
                    first = next(iter(self._waiting))
                    timeout = max(0.0, first.deadline - time.monotonic())
                for key, _events in self._selector.select(timeout):
                    try:
                        if key.data == "listener":
                            self._accept()
                        elif key.data == "wake":
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(4096)
                        else:
                            self._serve(key.data)
                    except Exception:  # one connection's surprise never stops the server
                        log.exception("exporter connection failed")
                        if isinstance(key.data, _Connection):
                            self._drop(key.data)
                self._take_answers()
                self._expire(time.monotonic())
        finally:
            self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        for conn in list(self._open):
            self._drop(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        with contextlib.suppress(OSError):
            self._selector.close()

    def _accept(self) -> None:
        for _ in range(256):  # then serve the others: a flood of connections never starves them
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self._waiting:
                    self._make_room()  # out of descriptors
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self.accepted += 1
            if len(self._open) >= self.max_connections and not self._make_room():
                sock.close()
                continue
            sock.setblocking(False)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except OSError:  # gone already
                    sock.close()
                    continue
            peer = str(address[0]) if isinstance(address, tuple) else str(address)
            conn = _Connection(sock, peer, deadline=0.0, state="handshake" if self._tls else "reading")
            self._open.add(conn)
            self._fresh[conn] = None
            self._wait_on_peer(conn)
            if conn.state == "handshake":
                self._handshake(conn)
            else:
                self._watch(conn, selectors.EVENT_READ)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest without a request (else the longest waiting)."""
        victim = next(iter(self._fresh), None) or next(iter(self._waiting), None)
        if victim is None:
            return False
        self._drop(victim)
        return True

    def _serve(self, conn: _Connection) -> None:
        if conn.state == "handshake":
            self._handshake(conn)
        elif conn.state == "reading":
            self._read(conn)
        elif conn.state == "writing":
            self._write(conn)

    def _wait_on_peer(self, conn: _Connection) -> None:
        conn.deadline = time.monotonic() + self.request_timeout_s
        self._waiting.pop(conn, None)
        self._waiting[conn] = None

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.events == events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _unwatch(self, conn: _Connection) -> None:
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0

    def _drop(self, conn: _Connection) -> None:
        self._unwatch(conn)
        self._waiting.pop(conn, None)
        self._fresh.pop(conn, None)
        self._open.discard(conn)
        conn.state = "closed"
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _expire(self, now: float) -> None:
        while self._waiting:
            first = next(iter(self._waiting))
            if first.deadline > now:
                return
            self._drop(first)

    def _handshake(self, conn: _Connection) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError, ValueError):  # no certificate, a bad one, not TLS at all
            self._drop(conn)
            return
        if self._allowed_sans and not self._san_allowed(conn.sock):
            self._drop(conn)
            return
        conn.state = "reading"
        self._watch(conn, selectors.EVENT_READ)
        self._read(conn)

    def _san_allowed(self, sock: ssl.SSLSocket) -> bool:
        cert: dict[str, Any] = dict(sock.getpeercert() or {})
        # (("DNS", "scraper.example.org"), ("IP Address", "10.0.0.5"), ...)
        names = {str(entry[1]) for entry in cert.get("subjectAltName", ())}
        return bool(names & self._allowed_sans)

    def _read(self, conn: _Connection) -> None:
        while len(conn.inbox) <= MAX_HEAD_BYTES:
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (OSError, ssl.SSLError):
                self._drop(conn)
                return
            if not chunk:
                conn.peer_done = True
                break
            conn.inbox += chunk
        while conn.inbox[:1] in (b"\r", b"\n"):  # blank lines before a request line are ignored
            del conn.inbox[:1]
        end = _HEAD_END.search(conn.inbox, 0, MAX_HEAD_BYTES + 4)
        if end is None:
            if conn.peer_done:
                self._drop(conn)
            elif len(conn.inbox) > MAX_HEAD_BYTES:
                too_large = Reply.plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
                self._send(conn, too_large.encode())
            return
        head = bytes(conn.inbox[: end.start()])
        del conn.inbox[: end.end()]
        self._unwatch(conn)
        self._waiting.pop(conn, None)
        self._fresh.pop(conn, None)
        conn.state = "working"
        self._pool.submit(self._work, conn, head)

    def _take_answers(self) -> None:
        while self._answers:
            conn, answer, keep_alive = self._answers.popleft()
            if conn.state == "working":
                self._send(conn, answer, keep_alive=keep_alive)

    def _send(self, conn: _Connection, answer: bytes, *, keep_alive: bool = False) -> None:
        conn.state = "writing"
        conn.outbox = memoryview(answer)
        conn.keep_alive = keep_alive and not self._closing.is_set()
        self._wait_on_peer(conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        while conn.outbox is not None and len(conn.outbox):
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                return
            except (OSError, ssl.SSLError):
                self._drop(conn)
                return
            conn.outbox = conn.outbox[sent:]
        conn.outbox = None
        if not conn.keep_alive:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._drop(conn)
            return
        conn.state = "reading"
        self._wait_on_peer(conn)
        self._watch(conn, selectors.EVENT_READ)
        self._read(conn)  # a request already read (pipelined), or held decrypted by TLS

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: the selector is awake anyway
            self._wake_w.send(b"\0")

    # --- the workers ------------------------------------------------------------------------------------------

    def _work(self, conn: _Connection, head: bytes) -> None:
        try:
            reply = self._answer(conn, head)
        except Exception:
            log.exception("exporter request failed")
            reply = Reply.plain(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        self._answers.append((conn, reply.encode(), reply.keep_alive))
        self._wake()

    def _answer(self, conn: _Connection, head: bytes) -> Reply:
        request = parse_request(head)
        if isinstance(request, str):
            return Reply.plain(HTTPStatus.BAD_REQUEST, request)
        method, target, version, headers = request.method, request.target, request.version, request.headers
        # A body is never read: after one, the connection cannot go on.
        keep_alive = request.keeps_alive and not request.has_body
        extra = self.web_config.headers
        if version == "HTTP/1.1" and "host" not in headers:
            return Reply.plain(HTTPStatus.BAD_REQUEST, "no Host header", extra)
        if self._guard is not None and "host" in headers and not self._guard.allows(headers["host"]):
            text = (
                f"Host {headers['host']!r} is not this machine: the exporter listens on {self.host} only and "
                "answers requests for localhost or its address (DNS rebinding)"
            )
            return Reply.plain(HTTPStatus.FORBIDDEN, text, extra, keep_alive=keep_alive)
        if self._auth is not None and not self._auth.check(headers.get("authorization")):
            challenge = (*extra, ("WWW-Authenticate", self._auth.challenge))
            return Reply.plain(HTTPStatus.UNAUTHORIZED, "unauthorized", challenge, keep_alive=keep_alive)
        if method not in ("GET", "HEAD"):
            allow = (*extra, ("Allow", "GET, HEAD"))
            text = f"{method}: only GET and HEAD"
            return Reply.plain(HTTPStatus.METHOD_NOT_ALLOWED, text, allow, keep_alive=keep_alive)
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": version,
            "REMOTE_ADDR": conn.peer,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": self.scheme,
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in headers.items():
            if name not in ("content-length", "content-type", "authorization"):
                environ["HTTP_" + name.upper().replace("-", "_")] = value
        status, app_headers, body = call_wsgi(self.app, environ)
        kept = [(k, v) for k, v in app_headers if k.lower() not in ("content-length", "connection")]
        return Reply(status, (*kept, *extra), body, keep_alive, head_only=method == "HEAD")
