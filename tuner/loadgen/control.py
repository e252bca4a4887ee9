"""Talking to a server off the hot path: where it is (:class:`Target`), the model it serves, JSON calls, and
what it says when it refuses, in one line for people.

The bottom of :mod:`tuner.loadgen`: it imports nothing else of the package, so that the load's shape
(spec, workload, dataset) and its transports can all use it without importing each other.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx


class LoadgenError(Exception):
    """A phase could not start (server unreachable, no model, bad URL). The message is one line for people."""


class AskError(Exception):
    """A server call that gave no usable answer; the message is one line for people."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go, parsed once."""

    base_url: str  # normalised: scheme://host[:port][/prefix], no trailing /v1
    scheme: str
    host: str
    port: int
    path_prefix: str
    netloc: str  # host[:port] as written (brackets kept for IPv6): the Host header

    @classmethod
    def parse(cls, base_url: str) -> Target:
        """Parse ``base_url`` (``http://host:port``, maybe with a path prefix or a trailing ``/v1``).

        Raises:
            LoadgenError: not an http(s) URL, or a bad port.
        """
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


def clip(data: bytes | str, limit: int = 80) -> str:
    """``data`` as one line of at most ``limit`` characters (whitespace runs folded, "..." when cut)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_message(body: bytes) -> str:
    """The message of an OpenAI/vLLM error body, else the body's start."""
    try:
        obj = json.loads(body)
    except ValueError:
        return clip(body) or "(empty body)"
    if isinstance(obj, dict):
        error = obj.get("error", obj)
        if isinstance(error, dict) and error.get("message"):
            return clip(str(error["message"]), 200)
        if isinstance(obj.get("detail"), str):
            return clip(obj["detail"], 200)
    return clip(body)


def get_json(client: httpx.Client, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` to) ``path``; the decoded JSON, or :class:`AskError` with why not."""
    where = str(client.base_url).rstrip("/") + path
    try:
        reply = client.get(path) if body is None else client.post(path, json=body)
    except httpx.ConnectError:
        raise AskError(f"cannot reach {str(client.base_url).rstrip('/')}: is the server running?") from None
    except httpx.TimeoutException:
        raise AskError(f"{where} did not answer in time") from None
    except httpx.HTTPError as exc:
        raise AskError(f"{where}: {clip(str(exc)) or type(exc).__name__}") from None
    if reply.status_code != 200:
        raise AskError(f"{where} answered HTTP {reply.status_code}: {error_message(reply.content)}")
    try:
        return reply.json()
    except ValueError:
        raise AskError(f"{where} did not answer JSON") from None


def pick_model(listed: Any, model: str | None) -> tuple[str | None, str | None]:
    """The served name and ``root`` of ``model`` (or of the first model) in a ``/v1/models`` answer."""
    data = listed.get("data") if isinstance(listed, dict) else None
    entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if data else []
    if not entries:
        raise AskError("the server lists no model at /v1/models")
    chosen = next((m for m in entries if m["id"] == model), None) if model else entries[0]
    if chosen is None:
        raise AskError(f"the server does not serve {model!r} (it lists {entries[0]['id']!r})")
    root = chosen.get("root")
    return chosen["id"], root if isinstance(root, str) and root else None


async def discover_model(base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model a server lists at ``GET /v1/models``; :class:`LoadgenError` when there is none."""
    target = Target.parse(base_url)
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
        raise LoadgenError(f"{url}: {clip(str(exc)) or type(exc).__name__}") from None
    if reply.status_code != 200:
        raise LoadgenError(f"{url} answered HTTP {reply.status_code}: {error_message(reply.content)}")
    try:
        models = [m["id"] for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise LoadgenError(f"{url} did not answer with an OpenAI model list") from None
    if not models:
        raise LoadgenError(f"{target.base_url} serves no model")
    return str(models[0])
