"""One request in flight: SSE parsing of its response body and the timestamps of its chunks."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable

from tuner.loadgen.control import clip
from tuner.loadgen.spec import RequestSpec
from tuner.loadgen.stats import RequestResult

MAX_LINE_BYTES = 1 << 20
"""The longest SSE line taken (vLLM's are a few hundred bytes, a few KiB with logprobs): a server sending a
longer one fails its request, instead of the client buffering it without limit."""
SPARE_CHUNKS = 16
"""Text chunks a stream may carry beyond ``max_tokens`` (one token each at least; a server may add a few
empty ones) before the server is taken to ignore ``max_tokens`` and the request fails."""


class Stream:
    """The state of one request in flight, fed with decoded response body bytes by a transport.

    Hot path: a chunk that looks like vLLM's (``data: {...``, a non-empty ``"choices":[{``, no usage object)
    costs a timestamp append and a few substring searches. Everything else takes the careful path.

    A stream asking for ``max_tokens`` fails once more text chunks than that (and ``SPARE_CHUNKS``) arrive, or
    its usage counts more tokens: the server ignored ``max_tokens``. ``deadline_s`` is the whole request's
    limit in seconds from ``start_s``, enforced by the phase's watchdog (:mod:`tuner.loadgen.runner`).
    """

    __slots__ = (
        "abort",
        "chunk_times",
        "deadline_s",
        "done",
        "done_seen",
        "end_s",
        "error",
        "error_kind",
        "last_rx_s",
        "max_chunks",
        "max_tokens",
        "output_tokens",
        "pending",
        "prompt_tokens",
        "start_s",
        "token_ids",
        "want_ids",
    )

    def __init__(
        self,
        start_s: float,
        *,
        want_ids: bool = False,
        max_tokens: int | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.start_s = start_s
        self.want_ids = (
            want_ids  # collect the answer's token ids (``return_token_ids``): every chunk is parsed
        )
        self.max_tokens = max_tokens
        self.max_chunks = max_tokens + SPARE_CHUNKS if max_tokens is not None else None
        self.deadline_s = deadline_s
        self.rearm()

    def rearm(self) -> None:
        """Forget everything received: the request is sent again (on a fresh connection)."""
        self.last_rx_s = self.start_s
        self.end_s: float | None = None
        self.chunk_times: list[float] = []
        self.pending = b""  # an incomplete SSE line
        self.done_seen = False
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.token_ids: list[int] | None = [] if self.want_ids else None
        self.error_kind: str | None = None
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.abort: Callable[[], None] | None = None  # set by the transport: drop the connection now

    def feed(self, data: bytes, now_s: float) -> bool:
        """Take body bytes received at ``now_s``. False once the stream has failed (stop feeding)."""
        if self.pending:
            data = self.pending + data  # at most MAX_LINE_BYTES carried over: no re-joining without end
        lines = data.split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_LINE_BYTES:
            self.pending = b""
            return self.fail("line_too_long", f"an SSE line longer than {MAX_LINE_BYTES >> 20} MiB")
        times = self.chunk_times
        for line in lines:
            if not line:
                continue
            if (
                times
                and not self.want_ids
                and line.startswith(b'data: {"')
                and line.endswith(b"}")
                and b'"choices":[{' in line
                and b'"usage":{' not in line
            ):
                times.append(now_s)
            elif not self._careful_line(line, now_s):
                return False
        if self.max_chunks is not None and len(times) > self.max_chunks:
            return self.fail(
                "too_many_tokens",
                f"{len(times)} text chunks for max_tokens {self.max_tokens}: the server ignores max_tokens",
            )
        return True

    def _careful_line(self, line: bytes, now_s: float) -> bool:
        if line.endswith(b"\r"):
            line = line[:-1]
            if not line:
                return True
        if line.startswith(b":"):
            return True  # SSE comment (keep-alive ping)
        name, colon, value = line.partition(b":")
        if not colon or name != b"data":
            if colon and name in (b"event", b"id", b"retry"):
                return True
            return self.fail("malformed_stream", f"not an SSE line: {clip(line)}")
        if value.startswith(b" "):
            value = value[1:]
        if value == b"[DONE]":
            self.done_seen = True
            return True
        try:
            obj = json.loads(value)
        except ValueError:
            return self.fail("malformed_stream", f"data line is not JSON: {clip(value)}")
        if not isinstance(obj, dict):
            return self.fail("malformed_stream", f"data line is not a JSON object: {clip(value)}")
        error = obj.get("error") or (obj if obj.get("object") == "error" else None)
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            return self.fail("server_error", f"server error in the stream: {clip(str(message))}")
        choices, usage = obj.get("choices"), obj.get("usage")
        if choices:
            self.chunk_times.append(now_s)
            if self.token_ids is not None and isinstance(choices, list):
                for choice in choices:
                    ids = choice.get("token_ids") if isinstance(choice, dict) else None
                    if isinstance(ids, list) and all(_is_count(i) for i in ids):
                        self.token_ids.extend(ids)
        if isinstance(usage, dict):
            output_tokens, prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
            if not _is_count(output_tokens) or not (prompt_tokens is None or _is_count(prompt_tokens)):
                return self.fail("malformed_stream", f"usage holds no token counts: {clip(value)}")
            self.output_tokens, self.prompt_tokens = output_tokens, prompt_tokens
        elif choices is None:
            return self.fail("malformed_stream", f"data line has neither choices nor usage: {clip(value)}")
        return True

    def finish(self, now_s: float) -> None:
        """The response body ended normally: check that the stream was complete."""
        if self.error_kind is not None:
            return
        if self.pending.strip() and not self.feed(b"\n", now_s):
            return  # a last line without its newline, and it was bad
        if not self.done_seen:
            self.fail("malformed_stream", "the stream ended without data: [DONE]")
        elif self.output_tokens is None:
            self.fail("missing_usage", "no usage chunk: the server ignored stream_options.include_usage")
        elif not self.chunk_times:
            self.fail("malformed_stream", "the stream carried no text chunk")
        elif self.max_tokens is not None and self.output_tokens > self.max_tokens:
            self.fail(
                "too_many_tokens",
                f"{self.output_tokens} tokens for max_tokens {self.max_tokens}: the server ignores max_tokens",
            )
        else:
            self._settle(now_s)

    def fail(self, kind: str, message: str) -> bool:
        """Record the first failure, drop the connection, wake the waiter. Returns False for ``feed``."""
        if self.error_kind is None and not self.done.done():
            self.error_kind = kind
            chunks = len(self.chunk_times)
            if kind in ("connect_failed", "http_error"):
                self.error = message  # nothing was streamed: a chunk count would only be noise
            else:
                self.error = f"{message} (after {chunks} chunk{'' if chunks == 1 else 's'})"
            if self.abort is not None:
                self.abort()
            self._settle(time.perf_counter())
        return False

    def _settle(self, now_s: float) -> None:
        if not self.done.done():
            self.end_s = now_s
            self.done.set_result(None)

    def result(self, spec: RequestSpec, window_start_s: float) -> RequestResult:
        times = self.chunk_times
        start_s = self.start_s
        end_s = self.end_s if self.end_s is not None else time.perf_counter()
        return RequestResult(
            index=spec.index,
            start_s=start_s - window_start_s,
            duration_s=end_s - start_s,
            prompt_len=len(spec.prompt_token_ids),
            max_tokens=spec.max_tokens,
            ttft_s=times[0] - start_s if times else None,
            e2e_s=times[-1] - start_s if times else None,
            itl_s=tuple(b - a for a, b in itertools.pairwise(times)) if self.error_kind is None else (),
            output_tokens=self.output_tokens if self.error_kind is None else None,
            prompt_tokens=self.prompt_tokens if self.error_kind is None else None,
            chunks=len(times),
            error_kind=self.error_kind,
            error=self.error,
        )


def _is_count(value: object) -> bool:
    """A count of tokens (or a token id) as a server's JSON may hold it: a whole number >= 0, not ``true``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
