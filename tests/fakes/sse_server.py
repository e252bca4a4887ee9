"""A fast stand-in for vLLM's streaming ``/v1/completions``, for tests and the client-capacity benchmark.

It runs in its own process (``EmitterProcess`` starts and stops it) on raw asyncio, so that it can emit far
more chunks per second than the load generator can read, on one core. The stream is shaped like vLLM's:
HTTP/1.1 chunked transfer encoding (uvicorn), one SSE event per HTTP chunk, each event
``data: {"id":...,"object":"text_completion","created":...,"model":...,"choices":[{"index":0,"text":...,
"logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}``, the last text chunk with
``"finish_reason":"length"``, then (with ``stream_options.include_usage``) a usage chunk with
``"choices":[]``, then ``data: [DONE]``.

Like vLLM's engine it decodes in steps: every ``chunk_interval_s`` (0 = as fast as clients read) each
running stream gets one chunk of ``tokens_per_chunk`` tokens. A request starts running
``first_chunk_delay_s`` after it arrived and gets its first chunk at that moment. Faults are injected by
knobs: the whole process dies after N chunks, every Nth request gets a non-JSON data line, loses its usage
chunk, stalls, or is rejected.

``GET /fake/stats`` reports counters, among them the most streams that were open at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

_READY_PREFIX = "EMITTER LISTENING "


@dataclass(frozen=True, slots=True)
class EmitterConfig:
    """How the fake server behaves. Knobs named ``*_every`` pick every Nth request (1 = all)."""

    model: str = "fake-model"
    first_chunk_delay_s: float = 0.0  # request arrival -> first chunk (a stand-in for queueing + prefill)
    chunk_interval_s: float = 0.0  # one decode step; 0 = emit as fast as the clients read
    tokens_per_chunk: int = 1  # like vLLM's --stream-interval: usage counts tokens, not chunks
    default_max_tokens: int = 16
    die_after_chunks: int | None = None  # the process exits abruptly after this many chunks in total
    garbage_every: int | None = None  # a non-JSON ``data:`` line after the request's first chunk
    omit_usage_every: int | None = None  # no usage chunk, even when asked for
    stall_every: int | None = None  # stops sending after the first chunk and never finishes
    reject_every: int | None = None  # HTTP 400 with a vLLM-style error body


def _picked(every: int | None, request_number: int) -> bool:
    return every is not None and request_number % every == 0


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Stream:
    """One streaming response in progress."""

    __slots__ = (
        "arrived_s",
        "chunks_left",
        "conn",
        "frame",
        "garbage",
        "last_frame",
        "open",
        "parked",
        "tail",
    )

    def __init__(self, conn: _Connection, chunks: int, frame: bytes, last_frame: bytes, tail: bytes) -> None:
        self.conn = conn
        self.chunks_left = chunks
        self.frame = frame  # a whole HTTP chunk carrying one SSE text event; identical for every step
        self.last_frame = last_frame
        self.tail = tail  # usage chunk (maybe), [DONE] and the terminating zero-size HTTP chunk
        self.garbage = b""  # sent before every chunk after the first one
        self.arrived_s = time.perf_counter()
        self.open = True  # counted in streams_open
        self.parked = False  # out of the decode steps until its transport drains (the client reads slowly)


class _Emitter:
    """Server state shared by all connections: the running streams and the decode-step ticker."""

    def __init__(self, config: EmitterConfig) -> None:
        self.config = config
        self.active: list[_Stream] = []
        self.wake = asyncio.Event()
        self.requests_total = 0
        self.streams_open = 0
        self.max_streams_open = 0
        self.chunks_total = 0
        self.streams_completed = 0
        # Request parsed -> first chunk written, as this process saw it: the server-side TTFT, to tell the
        # emitter's own lateness apart from the client's.
        self.server_ttft_s: list[float] = []
        self.created = int(time.time())

    def open_stream(self) -> None:
        self.streams_open += 1
        self.max_streams_open = max(self.max_streams_open, self.streams_open)

    def close_stream(self, stream: _Stream) -> None:
        if stream.open:
            stream.open = False
            self.streams_open -= 1

    def count_chunk(self) -> None:
        self.chunks_total += 1
        limit = self.config.die_after_chunks
        if limit is not None and self.chunks_total >= limit:
            # A crash, not a shutdown: no goodbye bytes, the kernel closes the sockets.
            os._exit(3)

    def activate(self, stream: _Stream) -> None:
        """The request finished its "prefill": it gets its first chunk now and joins the decode steps."""
        if len(self.server_ttft_s) < 1_000_000:
            self.server_ttft_s.append(time.perf_counter() - stream.arrived_s)
        if stream.conn.closed:
            self.close_stream(stream)
            return
        self.emit(stream)
        stream.frame = stream.garbage + stream.frame
        stream.last_frame = stream.garbage + stream.last_frame
        if _picked(self.config.stall_every, stream.conn.request_number):
            return  # kept open and silent until the client gives up
        if stream.chunks_left > 0 and not stream.conn.closed and not stream.parked:
            self.active.append(stream)
            self.wake.set()

    def emit(self, stream: _Stream) -> None:
        """One chunk of one stream; the last one also carries the usage chunk, [DONE] and the body end."""
        transport = stream.conn.transport
        stream.chunks_left -= 1
        self.count_chunk()
        if stream.chunks_left > 0:
            transport.write(stream.frame)
            return
        transport.write(stream.last_frame + stream.tail)
        self.streams_completed += 1
        self.close_stream(stream)
        stream.conn.stream = None

    def unpark(self, stream: _Stream) -> None:
        if stream.parked and stream.open:
            stream.parked = False
            self.active.append(stream)
            self.wake.set()

    def tick(self) -> int:
        """One decode step over every running stream; returns how many chunks went out."""
        emitted = 0
        still_running = []
        for stream in self.active:
            if stream.conn.closed:
                self.close_stream(stream)
            elif stream.parked:
                pass  # resume_writing puts it back
            else:
                self.emit(stream)
                emitted += 1
                if stream.chunks_left > 0 and not stream.parked:  # a parked one comes back when drained
                    still_running.append(stream)
        self.active = still_running
        return emitted

    async def run_ticks(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.config.chunk_interval_s
        next_tick_s = loop.time()
        while True:
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                next_tick_s = loop.time() + interval_s
                if interval_s > 0:
                    await asyncio.sleep(interval_s)
            emitted = self.tick()
            if interval_s > 0:
                next_tick_s += interval_s
                now_s = loop.time()
                if next_tick_s < now_s:
                    next_tick_s = now_s  # fell behind: go on at the same pace, do not burst to catch up
                await asyncio.sleep(next_tick_s - now_s)
            elif emitted:
                await asyncio.sleep(0)  # let the loop accept connections and read requests

    def stats(self) -> dict[str, float]:
        ttft = sorted(self.server_ttft_s)
        return {
            **{
                f"server_ttft_p{q}_s": ttft[min(len(ttft) - 1, len(ttft) * q // 100)]
                for q in (50, 90, 99)
                if ttft
            },
            "requests_total": self.requests_total,
            "streams_open": self.streams_open,
            "max_streams_open": self.max_streams_open,
            "streams_completed": self.streams_completed,
            "chunks_total": self.chunks_total,
        }


class _Connection(asyncio.Protocol):
    """One client connection: parses HTTP/1.1 requests (Content-Length bodies) and answers them."""

    def __init__(self, emitter: _Emitter) -> None:
        self.emitter = emitter
        self.buffer = b""
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.stream: _Stream | None = None
        self.closed = False
        self.request_number = 0  # of the request being answered, counted over the whole server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is not None:
            self.emitter.close_stream(self.stream)

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.parked = True

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.emitter.unpark(self.stream)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body_len = int(headers.get("content-length", "0"))
            if len(self.buffer) < head_end + 4 + body_len:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + body_len]
            self.buffer = self.buffer[head_end + 4 + body_len :]
            method, path, _version = request_line.split(" ", 2)
            self.handle(method, path, body)

    def respond(self, status: str, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status.encode(), len(body), body)
        )

    def handle(self, method: str, path: str, body: bytes) -> None:
        emitter = self.emitter
        config = emitter.config
        if method == "GET" and path == "/health":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif method == "GET" and path == "/v1/models":
            model = {"id": config.model, "object": "model", "created": emitter.created, "owned_by": "vllm"}
            self.respond("200 OK", {"object": "list", "data": [model]})
        elif method == "GET" and path == "/fake/stats":
            self.respond("200 OK", emitter.stats())
        elif method == "POST" and path == "/v1/completions":
            self.start_completion(json.loads(body))
        else:
            self.respond("404 Not Found", {"error": {"message": f"no route {method} {path}", "code": 404}})

    def start_completion(self, request: dict[str, Any]) -> None:
        emitter = self.emitter
        config = emitter.config
        emitter.requests_total += 1
        number = self.request_number = emitter.requests_total
        if _picked(config.reject_every, number) or not request.get("stream"):
            message = "rejected by the fake emitter" if request.get("stream") else "the fake only streams"
            error = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
            self.respond("400 Bad Request", {"error": error})
            return
        prompt = request.get("prompt", [])
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        max_tokens = int(request.get("max_tokens") or config.default_max_tokens)
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        per_chunk = max(1, config.tokens_per_chunk)
        chunks = -(-max_tokens // per_chunk)

        request_id = f"cmpl-{os.getpid():x}{number:08x}"
        head = (
            f'data: {{"id":"{request_id}","object":"text_completion","created":{emitter.created},'
            f'"model":"{config.model}","choices":[{{"index":0,"text":"'
        ).encode()
        text = b" tok" * per_chunk
        last_text = b" tok" * (max_tokens - per_chunk * (chunks - 1))
        frame = _http_chunk(
            head + text + b'","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n'
        )
        last_frame = _http_chunk(
            head
            + last_text
            + b'","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":null}'
            b"\n\n"
        )
        tail = b""
        if include_usage and not _picked(config.omit_usage_every, number):
            usage = {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + max_tokens,
                "completion_tokens": max_tokens,
            }
            usage_json = json.dumps(usage, separators=(",", ":"))
            tail += _http_chunk(
                (
                    f'data: {{"id":"{request_id}","object":"text_completion","created":{emitter.created},'
                    f'"model":"{config.model}","choices":[],"usage":{usage_json}}}\n\n'
                ).encode()
            )
        tail += _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

        # Headers go out at once, as Starlette's StreamingResponse does; the first token comes later.
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        stream = _Stream(self, chunks, frame, last_frame, tail)
        if _picked(config.garbage_every, number):
            stream.garbage = _http_chunk(b"data: <<garbage: this is not JSON>>\n\n")
        self.stream = stream
        emitter.open_stream()
        if config.first_chunk_delay_s > 0:
            asyncio.get_running_loop().call_later(config.first_chunk_delay_s, emitter.activate, stream)
        else:
            emitter.activate(stream)


async def serve(config: EmitterConfig, host: str, port: int) -> None:
    """Serve until killed; prints one line with the bound port when ready."""
    emitter = _Emitter(config)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(emitter), host, port, backlog=4096)
    bound_port = server.sockets[0].getsockname()[1]
    print(f"{_READY_PREFIX}{host} {bound_port}", flush=True)
    ticker = asyncio.create_task(emitter.run_ticks())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    ticker.cancel()
    server.close()


# --- the process, seen from tests and benchmarks ------------------------------------------------------


class EmitterProcess:
    """The emitter in a child process of its own session, so it can be killed as a group and by nobody else.

    ``cpu`` pins it to one core (``os.sched_setaffinity``) for benchmarks.
    """

    def __init__(self, config: EmitterConfig | None = None, *, cpu: int | None = None) -> None:
        self.config = config or EmitterConfig()
        self.cpu = cpu
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the emitter is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmitterProcess:
        args = [sys.executable, os.path.abspath(__file__), "--port", "0"]
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if value is not None:
                args += [f"--{f.name.replace('_', '-')}", str(value)]
        if self.cpu is not None:
            args += ["--cpu", str(self.cpu)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            if not selector.select(timeout=deadline_s - time.monotonic()):
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(_READY_PREFIX):
                self.port = int(line.split()[-1])
                selector.close()
                return self
        selector.close()
        self.kill()
        raise RuntimeError("the fake SSE emitter did not start")

    def stats(self) -> dict[str, float]:
        """Counters from the running emitter: requests, open streams and their maximum, chunks, and the
        server-side TTFT percentiles (request parsed -> first chunk written)."""
        reply = httpx.get(f"{self.base_url}/fake/stats", timeout=5.0)
        reply.raise_for_status()
        return dict(reply.json())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the emitter's process group (a crash) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        """Ask politely (SIGTERM), then kill."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def __enter__(self) -> EmitterProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_args(argv: list[str] | None) -> tuple[EmitterConfig, str, int, int | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin the emitter to this core")
    for f in dataclasses.fields(EmitterConfig):
        kind = str if f.type == "str" else float if "float" in str(f.type) else int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    ns = parser.parse_args(argv)
    config = EmitterConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EmitterConfig)})
    return config, ns.host, ns.port, ns.cpu


def main(argv: list[str] | None = None) -> None:
    config, host, port, cpu = _parse_args(argv)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    asyncio.run(serve(config, host, port))


if __name__ == "__main__":
    main()
