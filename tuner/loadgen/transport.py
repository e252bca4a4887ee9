"""What a transport does (:class:`Client`) and the httpx transport. The fast transport is in
:mod:`tuner.loadgen.rawhttp`; where requests go and the control calls are in :mod:`tuner.loadgen.control`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Literal, Protocol

import httpx

from tuner.loadgen.control import Target, clip, error_message
from tuner.loadgen.spec import Timeouts
from tuner.loadgen.stream import Stream

Transport = Literal["raw", "httpx"]
"""The HTTP client on the hot path: :mod:`tuner.loadgen.rawhttp` (fast) or httpx (for comparison)."""


class Client(Protocol):
    """A transport: carries completion requests to one server and feeds each response into its stream."""

    async def stream(self, stream: Stream, body: bytes) -> None:
        """Send one completion request and feed its response into ``stream`` until it settles."""
        ...

    async def aclose(self) -> None: ...


class HttpxClient:
    """The same requests through httpx (for comparison; the raw client is several times faster)."""

    def __init__(self, target: Target, timeouts: Timeouts, headers: Mapping[str, str]) -> None:
        self.target = target
        # No pool limit: httpx's default (100 connections) would silently cap concurrency.
        self.client = httpx.AsyncClient(
            base_url=target.base_url,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream", **headers},
            timeout=httpx.Timeout(timeouts.read_idle_s, connect=timeouts.connect_s, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def stream(self, stream: Stream, body: bytes) -> None:
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
                    stream.fail("http_error", f"HTTP {response.status_code}: {error_message(text)}")
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
            stream.fail("connect_failed", f"cannot connect to {self.target.base_url}: {clip(str(exc))}")
        except httpx.TimeoutException:
            stream.fail("timeout", "no data from the server within the read timeout")
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            stream.fail("connection_closed", f"connection closed by the server ({clip(str(exc)) or 'EOF'})")
        except httpx.HTTPError as exc:
            stream.fail("connection_closed", f"{type(exc).__name__}: {clip(str(exc))}")

    async def aclose(self) -> None:
        await self.client.aclose()
