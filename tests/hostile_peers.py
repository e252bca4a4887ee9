"""Peers that misbehave on purpose, for the readers of other machines' pages: a server that trickles, one that
sends 50 MB, a TLS server with its own CA that wants a client certificate and a password; and the page a real
exporter serves, to spoil one field at a time."""

from __future__ import annotations

import base64
import contextlib
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import FixedHost

from tuner.telemetry import scripted
from tuner.telemetry.model import to_jsonable
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

Serve = Callable[[socket.socket, threading.Event], None]


def snapshot_document(n_gpus: int = 2) -> dict[str, Any]:
    """What an exporter's /snapshot.json holds for a scripted H100 host (built as the exporter builds it)."""
    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(n_gpus, clock=clock, processes=[])
    source = LiveSource(
        scripted.scripted_backend(nvml),
        config=SamplerConfig(discover_vllm=False),
        host=FixedHost(),  # type: ignore[arg-type]
        clock=clock,
    )
    sampler = Sampler(source, history_len=4)
    info = sampler.open()
    for _ in range(4):
        clock.advance(0.25)
        snap = sampler.tick()
    sampler.stop()
    return {"format": 1, "info": to_jsonable(info), "snapshot": to_jsonable(snap), "age_s": 0.1}


class RawServer:
    """A TCP server on the loopback that hands each connection, once its request has arrived, to ``serve`` on
    a thread of its own: whatever bytes at whatever pace, which no HTTP server library will do."""

    def __init__(self, serve: Serve) -> None:
        self._serve = serve
        self.stopping = threading.Event()
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                self._serve(conn, self.stopping)
            except OSError:  # the reader hung up: what it should do
                pass

    def close(self) -> None:
        self.stopping.set()
        self._sock.close()


@contextlib.contextmanager
def raw_server(serve: Serve) -> Iterator[RawServer]:
    server = RawServer(serve)
    try:
        yield server
    finally:
        server.close()


def trickle(sent_at_once: bytes, trickled: bytes, every_s: float) -> Serve:
    """Sends ``sent_at_once``, then ``trickled`` a byte every ``every_s``: well inside any per-read timeout."""

    def serve(conn: socket.socket, stopping: threading.Event) -> None:
        conn.sendall(sent_at_once)
        for byte in trickled:
            if stopping.wait(every_s):
                return
            conn.sendall(bytes([byte]))

    return serve


@dataclass
class Flood:
    """Sends ``total`` bytes of body as fast as the reader takes them, counting what left."""

    total: int
    declare_length: bool
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)  # set once it stopped sending

    def __call__(self, conn: socket.socket, stopping: threading.Event) -> None:
        head = b"HTTP/1.1 200 OK\r\n"
        head += (
            f"Content-Length: {self.total}\r\n".encode() if self.declare_length else b"Connection: close\r\n"
        )
        try:
            conn.sendall(head + b"\r\n")
            chunk = b"7" * 65536
            while self.sent < self.total and not stopping.is_set():
                conn.sendall(chunk)
                self.sent += len(chunk)
        finally:
            self.done.set()


class _Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client refused at the TLS handshake is what some tests want


@contextlib.contextmanager
def page_server(
    pages: Callable[[http.server.BaseHTTPRequestHandler], tuple[int, bytes]],
    tls: ssl.SSLContext | None = None,
) -> Iterator[str]:
    """An HTTP server on the loopback whose every answer is ``pages(request) -> (status, body)``; https with
    ``tls`` (each connection's handshake on its own thread)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = pages(self)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = _Quiet(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- TLS ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A private CA, a server certificate it signed for 127.0.0.1, and a client certificate it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles | None:
    """Certificates made with the openssl command (None without it): EC keys, a few ms each."""
    if shutil.which("openssl") is None:
        return None

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=infertop test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (folder / f"{name}.ext").write_text(
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
            f"extendedKeyUsage={usage}\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
        )
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=infertop {name}")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return TlsFiles(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )


@contextlib.contextmanager
def locked_server(tls: TlsFiles, body: bytes, user: str, password: str) -> Iterator[str]:
    """An https server that wants a client certificate from ``tls.ca`` and basic auth: 401 without it."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def pages(request: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes]:
        if request.headers.get("Authorization") != expected:
            return 401, b"unauthorized"
        return 200, body

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(tls.server_cert, tls.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    with page_server(pages, context) as url:
        yield url
