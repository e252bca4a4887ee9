"""Where requests go (:class:`_Target`), what a transport does (:class:`_Client`), the httpx transport, and
the control call ``GET /v1/models``. The fast transport is in :mod:`tuner.loadgen.rawhttp`."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from tuner.loadgen.spec import Timeouts
from tuner.loadgen.stream import _clip, _Stream

Transport = Literal["raw", "httpx"]
"""The HTTP client on the hot path: :mod:`tuner.loadgen.rawhttp` (fast) or httpx (for comparison)."""


class LoadgenError(Exception):
    """A phase could not start (server unreachable, no model, bad URL). The message is one line for people."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where requests go, parsed once."""

    base_url: str  # normalised: scheme://host[:port][/prefix], no trailing /v1
    scheme: str
    host: str
    port: int
    path_prefix: str
    netloc: str  # host[:port] as written (brackets kept for IPv6): the Host header

    @classmethod
    def parse(cls, base_url: str) -> _Target:
        parts = urllib.parse.urlsplit(base_url.strip().rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoadgenError(f"not an http(s) URL: {base_url!r} (expected e.g. http://127.0.0.1:8000)")
        prefix = parts.path.rstrip("/")
        if prefix.endswith("/v1"):
            prefix = prefix[: -len("/v1")]
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise LoadgenError(f"bad port in {base_url!r}: {exc}") from None
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return cls(f"{parts.scheme}://{netloc}{prefix}", parts.scheme, parts.hostname, port, prefix, netloc)


class _Client(Protocol):
    async def stream(self, stream: _Stream, body: bytes) -> None:
        """Send one completion request and feed its response into ``stream`` until it settles."""
        ...

    async def aclose(self) -> None: ...


def _error_message(body: bytes) -> str:
    """The message of an OpenAI/vLLM error body, else the body's start."""
    try:
        obj = json.loads(body)
    except ValueError:
        return _clip(body) or "(empty body)"
    if isinstance(obj, dict):
        error = obj.get("error", obj)
        if isinstance(error, dict) and error.get("message"):
            return _clip(str(error["message"]), 200)
        if isinstance(obj.get("detail"), str):
            return _clip(obj["detail"], 200)
    return _clip(body)


class _HttpxClient:
    """The same requests through httpx (for comparison; the raw client is several times faster)."""

    def __init__(self, target: _Target, timeouts: Timeouts, headers: Mapping[str, str]) -> None:
        self.target = target
        # No pool limit: httpx's default (100 connections) would silently cap concurrency.
        self.client = httpx.AsyncClient(
            base_url=target.base_url,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream", **headers},
            timeout=httpx.Timeout(timeouts.read_idle_s, connect=timeouts.connect_s, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def stream(self, stream: _Stream, body: bytes) -> None:
        task = asyncio.current_task()
        if task is not None:

            def abort() -> None:
                # From the watchdog (another task): interrupt the read. From this task's own parsing, the
                # code below returns by itself, and a cancel would hit the next request instead.
                if asyncio.current_task() is not task:
                    task.cancel()

            stream.abort = abort
        try:
            async with self.client.stream("POST", "/v1/completions", content=body) as response:
                if response.status_code != 200:
                    text = await response.aread()
                    stream.fail("http_error", f"HTTP {response.status_code}: {_error_message(text)}")
                    return
                async for data in response.aiter_raw():
                    now_s = time.perf_counter()
                    stream.last_rx_s = now_s
                    if not stream.feed(data, now_s):
                        return
                stream.finish(time.perf_counter())
        except asyncio.CancelledError:
            if stream.error_kind is None:
                raise  # not our own abort: the phase itself is being cancelled
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()  # our own abort is handled; later timeouts in this task must work normally
        except httpx.ConnectError as exc:
            stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: {_clip(str(exc))}")
        except httpx.TimeoutException:
            stream.fail("timeout", "no data from the server within the read timeout")
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            stream.fail("connection_closed", f"connection closed by the server ({_clip(str(exc)) or 'EOF'})")
        except httpx.HTTPError as exc:
            stream.fail("connection_closed", f"{type(exc).__name__}: {_clip(str(exc))}")

    async def aclose(self) -> None:
        await self.client.aclose()


# --- control calls ---------------------------------------------------------------------------------------


async def discover_model(base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model a server lists at ``GET /v1/models``; :class:`LoadgenError` when there is none."""
    target = _Target.parse(base_url)
    url = f"{target.base_url}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            reply = await client.get(url, headers=headers)
    except httpx.ConnectError:
        raise LoadgenError(f"cannot reach {target.base_url}: is the server running?") from None
    except httpx.TimeoutException:
        raise LoadgenError(f"{url} did not answer within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise LoadgenError(f"{url}: {_clip(str(exc)) or type(exc).__name__}") from None
    if reply.status_code != 200:
        raise LoadgenError(f"{url} answered HTTP {reply.status_code}: {_error_message(reply.content)}")
    try:
        models = [m["id"] for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise LoadgenError(f"{url} did not answer with an OpenAI model list") from None
    if not models:
        raise LoadgenError(f"{target.base_url} serves no model")
    return str(models[0])
