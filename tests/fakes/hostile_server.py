"""A broken or hostile OpenAI-style completions server on 127.0.0.1, for the load generator's injected faults.

Each behaviour is one way a server can hold a client forever or make it buffer without limit; a real vLLM does
none of them, which is why they are faked. ``HostileServer(behaviour)`` serves, in a thread of the test's own
process (its connections in threads of their own):

- ``ping``: a 200 response that sends an SSE comment (``: ping``) every 50 ms and never a token;
- ``endless``: a 200 response that streams text chunks as fast as the client reads, past any ``max_tokens``;
- ``long_line``: a 200 response of one SSE line that never ends (64 KiB writes, up to 60 MB);
- ``context``: a well-behaved server of a ``context``-token context (listed at ``/v1/models`` as vLLM does),
  refusing with HTTP 400 any request whose prompt and ``max_tokens`` outgrow it; with ``close_each=1`` it
  closes every connection after its response without saying so (no ``Connection: close``).

It counts what it was sent and what it sent (``prompts``, ``refused``, ``bytes_sent``), for the tests to check.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable
from typing import Any

_PING_EVERY_S = 0.05
_LONG_LINE_BYTES = 60_000_000


def _text_chunk(index: int) -> bytes:
    choice = {"index": 0, "text": f" t{index}", "logprobs": None, "finish_reason": None}
    return b"data: " + json.dumps({"object": "text_completion", "choices": [choice]}).encode() + b"\n\n"


class HostileServer:
    """One behaviour (see the module docstring) on an ephemeral port; ``stop()`` ends it and its connections."""

    def __init__(self, behaviour: str, *, context: int = 1024, close_each: int = 0) -> None:
        self.behaviour = behaviour
        self.context = context
        self.close_each = bool(close_each)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.prompts: list[tuple[int, int]] = []  # (prompt tokens, max_tokens) of every completion asked for
        self.refused = 0
        self.bytes_sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self._answer(404, {"error": {"message": "not found"}})
                    return
                model = {"id": "hostile", "object": "model", "max_model_len": server.context}
                self._answer(200, {"object": "list", "data": [model]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt, max_tokens = len(body["prompt"]), int(body["max_tokens"])
                with server.lock:
                    server.prompts.append((prompt, max_tokens))
                if server.behaviour == "context" and prompt + max_tokens > server.context:
                    with server.lock:
                        server.refused += 1
                    message = f"This model's maximum context length is {server.context} tokens"
                    self._answer(400, {"object": "error", "message": message, "code": 400})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up on us
                    getattr(self, f"_{server.behaviour}")(prompt, max_tokens)
                self.close_connection = server.close_each

            def _answer(self, status: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send(self, payload: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                self.wfile.flush()
                with server.lock:
                    server.bytes_sent += len(payload)

            def _ping(self, prompt: int, max_tokens: int) -> None:
                while not server.stopping.wait(_PING_EVERY_S):
                    self._send(b": ping\n\n")

            def _endless(self, prompt: int, max_tokens: int) -> None:
                index = 0
                while not server.stopping.is_set():
                    self._send(b"".join(_text_chunk(index + k) for k in range(8)))
                    index += 8

            def _long_line(self, prompt: int, max_tokens: int) -> None:
                self._send(b'data: {"choices": [{"text": "')
                piece = b"a" * 65536
                for _ in range(_LONG_LINE_BYTES // len(piece)):
                    if server.stopping.is_set():
                        return
                    self._send(piece)
                server.stopping.wait()  # and never end the line

            def _context(self, prompt: int, max_tokens: int) -> None:
                for index in range(max_tokens):
                    self._send(_text_chunk(index))
                usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens}
                self._send(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
                self._send(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name=f"hostile-{behaviour}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> HostileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        time.sleep(0.05)  # let the connection threads see the stop and return


StartHostile = Callable[..., HostileServer]  # the start_hostile fixture of conftest.py
