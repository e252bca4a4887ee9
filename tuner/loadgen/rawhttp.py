"""The raw asyncio HTTP/1.1 client that carries the load: a keep-alive connection pool that never caps.

Transport (why the hot path is not httpx). An H100 serving a small model streams tens of thousands of chunks
per second (REFERENCE.md); the client must read them without its own delays leaking into TTFT. Measured by
``benchmarks/client_capacity.py`` on the 2-core dev machine: client pinned to one core, the fake emitter
(tests/fakes/sse_server.py, vLLM-shaped ~200-byte chunks) to the other, 256 streams. "Paced" = the emitter
decodes in steps like vLLM (one chunk per stream per step, first chunk 50 ms after the request arrives):

    client                                    flat out    paced: reached / target   TTFT p50 vs server's
    httpx aiter_lines + json.loads per chunk   15,600/s
    httpx aiter_raw + the cheap parser below   17,100/s    2,300 / 12,800            +4.3 s
    the same httpx, 4 processes on the core    35,500/s
    raw asyncio Protocol + cheap parser       328,000/s   47,400 / 51,200           +0.6 ms (p99 +4.9 ms)
      (the default)                                       91,900 / 102,400          +0.5 ms (p99 +1.7 ms)
                                                          108,000 / 128,000         +2.2 ms (p99 +6.3 ms)
    raw, 2 processes on the same core         183,000/s

httpx is limited by httpcore's pool bookkeeping, which scans every connection for every queued request at
each request start and end (O(connections x requests), encode/httpcore#1035): with 256 streams it burns the
core and the TTFT it reports is seconds late. The raw client is an ``asyncio.Protocol`` speaking just enough
HTTP/1.1 (keep-alive, chunked transfer decoding, Content-Length and close-delimited bodies) with SSE line
splitting on top; its pool opens a connection whenever none is idle, so it never caps concurrency. Parsing is
cheap: a chunk costs a timestamp and a few substring checks; only the first text chunk, the usage chunk and
anything unusual (errors, garbage) go through ``json.loads``. One timestamp is taken per socket read: chunks
that arrive together share it (their true arrival). "Flat out" piles chunks up between reads (13 per read for
the raw client), so it is an upper bound; the paced runs read ~1 chunk per read, as against a real server.
The paced top is the emitter's limit (its core saturates), not the client's (82 % busy). More processes on
the same core gain nothing; on a many-core GPU host :mod:`tuner.loadgen.workers` runs a phase from several, each
on cores of its own (BENCHMARKS.md §11). httpx
stays for control calls (``/v1/models``) and as ``transport="httpx"`` for comparison, without its default
100-connection limit.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Mapping

from tuner.loadgen.control import Target, clip, error_message
from tuner.loadgen.spec import Timeouts
from tuner.loadgen.stream import Stream

_HEAD, _BODY, _TRAILERS = 0, 1, 2
_MAX_HEAD_BYTES = 65536  # the response's status line and headers
_MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line, or one trailer line: a few bytes from any real server


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one streaming response at a time."""

    def __init__(self, pool: RawPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.buffer = b""
        self.status = 0
        self.chunked = False
        self.body_left = -1  # Content-Length remaining; -1 = chunked or until close
        self.chunk_left = 0
        self.crlf_pending = 0  # 2 while the CRLF after a chunk's data is still to be skipped
        self.keep_alive = True
        self.error_body: bytearray | None = None  # a non-200 answer is collected here, not parsed as SSE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        stream = self.stream
        if stream is None:
            return
        self.stream = None
        if self.state == _BODY and self.body_left < 0 and not self.chunked:
            self._body_ended(stream, time.perf_counter())  # a close-delimited body ends this way
            return
        how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
        stream.fail("connection_closed", f"connection {how} by the server")

    def send(self, stream: Stream, request: bytes) -> None:
        assert self.transport is not None
        if self.closed or self.transport.is_closing():  # closed by the server a moment ago
            stream.fail("connection_closed", "connection closed by the server")
            return
        self._reset()
        self.stream = stream
        stream.abort = self.transport.abort
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now_s = time.perf_counter()
        stream = self.stream
        if stream is None:
            if self.transport is not None:
                self.transport.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        stream.last_rx_s = now_s
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if self.state == _HEAD:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > _MAX_HEAD_BYTES:
                    stream.fail(
                        "malformed_stream", f"response headers longer than {_MAX_HEAD_BYTES >> 10} KiB"
                    )
                else:
                    self.buffer = data
                return
            if not self._parse_head(stream, data[:end]):
                return
            data = data[end + 4 :]
            self.state = _BODY
        if self.chunked:
            self._chunked_body(stream, data, now_s)
        elif self.body_left >= 0:
            piece = data[: self.body_left]
            self.body_left -= len(piece)
            if self._deliver(stream, piece, now_s) and self.body_left == 0:
                self._body_ended(stream, now_s)
        else:
            self._deliver(stream, data, now_s)

    def _parse_head(self, stream: Stream, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            return stream.fail("malformed_stream", f"not an HTTP status line: {clip(lines[0])}")
        version = lines[0][:8]
        self.keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                self.chunked = True
            elif name == "content-length" and value.isdigit():
                self.body_left = int(value)
            elif name == "connection":
                self.keep_alive = "close" not in value and (version == "HTTP/1.1" or "keep-alive" in value)
        if self.chunked:
            self.body_left = -1
        elif self.body_left < 0:
            self.keep_alive = False  # the body runs until the server closes
        if self.status != 200:
            self.error_body = bytearray()
        if self.body_left == 0:
            self._body_ended(stream, time.perf_counter())
            return False
        return True

    def _chunked_body(self, stream: Stream, data: bytes, now_s: float) -> None:
        pos, size = 0, len(data)
        pieces: list[bytes] = []
        while pos < size:
            if self.state == _TRAILERS:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:  # the empty line after the last chunk (and any trailers): response done
                    if not pieces or self._deliver(stream, b"".join(pieces), now_s):
                        self._body_ended(stream, now_s)
                    return
                pos = eol + 2
                continue
            if self.chunk_left:
                end = pos + self.chunk_left
                if end <= size:
                    pieces.append(data[pos:end])
                    self.chunk_left = 0
                    self.crlf_pending = 2
                    pos = end
                else:
                    pieces.append(data[pos:])
                    self.chunk_left -= size - pos
                    pos = size
                continue
            eol = data.find(b"\r\n", pos + self.crlf_pending)
            if eol < 0:
                break
            try:
                chunk_size = int(data[pos + self.crlf_pending : eol].split(b";", 1)[0], 16)
            except ValueError:
                stream.fail("malformed_stream", "bad chunked transfer encoding")
                return
            pos = eol + 2
            self.crlf_pending = 0
            if chunk_size == 0:
                self.state = _TRAILERS
            else:
                self.chunk_left = chunk_size
        self.buffer = data[pos:]
        if len(self.buffer) > _MAX_CHUNK_LINE_BYTES:  # the rest of an unfinished line: never this long
            self.buffer = b""
            stream.fail(
                "malformed_stream", f"a chunked-encoding line longer than {_MAX_CHUNK_LINE_BYTES} bytes"
            )
            return
        if pieces:
            self._deliver(stream, pieces[0] if len(pieces) == 1 else b"".join(pieces), now_s)

    def _deliver(self, stream: Stream, payload: bytes, now_s: float) -> bool:
        if self.error_body is not None:
            if len(self.error_body) < 8192:
                self.error_body += payload
            return True
        return stream.feed(payload, now_s)

    def _body_ended(self, stream: Stream, now_s: float) -> None:
        if self.error_body is not None:
            stream.fail("http_error", f"HTTP {self.status}: {error_message(bytes(self.error_body))}")
            return
        stream.finish(now_s)
        self.stream = None
        if stream.error_kind is None and self.keep_alive and not self.closed and not self.buffer:
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()


class RawPool:
    """Keep-alive connections to one server; opens a new one whenever none is idle (never caps)."""

    def __init__(self, target: Target, timeouts: Timeouts, headers: Mapping[str, str]) -> None:
        self.target = target
        self.timeouts = timeouts
        self.idle: list[_RawConnection] = []
        self.all: set[_RawConnection] = set()
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if target.scheme == "https" else None
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request_head = (
            f"POST {target.path_prefix}/v1/completions HTTP/1.1\r\nHost: {target.netloc}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{extra}Content-Length: "
        ).encode("latin-1")

    def release(self, conn: _RawConnection) -> None:
        self.idle.append(conn)

    async def _acquire(self, fresh: bool = False) -> tuple[_RawConnection, bool]:
        while self.idle and not fresh:
            conn = self.idle.pop()
            if not conn.closed:
                return conn, True
            self.all.discard(conn)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: _RawConnection(self), self.target.host, self.target.port, ssl=self.ssl
            ),
            timeout=self.timeouts.connect_s,
        )
        self.all.add(conn)
        return conn, False

    async def stream(self, stream: Stream, body: bytes) -> None:
        request = self.request_head + b"%d\r\n\r\n%s" % (len(body), body)
        for attempt in (1, 2):
            try:
                conn, reused = await self._acquire(fresh=attempt == 2)
            except asyncio.TimeoutError:
                stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: timed out")
                return
            except OSError as exc:
                # asyncio replaces strerror with "Connect call failed (...)": the errno says more.
                reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
                stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: {reason.lower()}")
                return
            if stream.error_kind is not None:  # timed out or cancelled while connecting
                self.release(conn)
                return
            conn.send(stream, request)
            await stream.done
            # A kept-alive connection the server had just closed fails before a single byte: try once more
            # on a fresh one, as browsers and HTTP libraries do.
            retry = (
                attempt == 1
                and reused
                and stream.error_kind == "connection_closed"
                and stream.last_rx_s == stream.start_s
            )
            if not retry:
                return
            stream.rearm()

    async def aclose(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()
        self.all.clear()
        self.idle.clear()
