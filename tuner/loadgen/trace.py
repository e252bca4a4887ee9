"""Replaying a request trace: when each request arrived, how long it was, and which prompt blocks it shared.

A trace is a JSONL file of one request per line, in the format of Mooncake's published traces (also read by
AIPerf and vLLM's benchmarks)::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, 49, 50, 51]}

``timestamp`` is milliseconds from the trace's start (``time_s``: seconds, instead); ``hash_ids`` name the
prompt's blocks of ``block_tokens`` tokens (512 unless a row says otherwise): two requests with the same first
hash ids share those blocks of their prompts, which is what a prefix cache feeds on. Prompts are made of token
ids drawn from a generator seeded by each hash id, so equal ids give equal blocks; tokens past the hashed
blocks are the request's own.

Replay keeps the trace's shape (its bursts and lulls, its lengths in order, its sharing) and scales its time
axis to the load asked for: under an open loop at R req/s every gap is multiplied by (the trace's mean rate /
R), so a tune's capacity search sweeps the same traffic faster or slower. A closed loop sends the requests in
order as fast as its users allow. A phase starts at a row chosen by its seed (tune phases last seconds, a
trace hours) and wraps around; each phase's blocks are its own, so a phase never hits the cache on the
blocks of another.

A trace is foreign data: a line that is not JSON, lacks a field, or holds a number that is not finite or out of
range (a negative or non-finite time, a length of no tokens or of more than ``MAX_TOKENS``) is left out and
counted (:attr:`Trace.skipped`, the first reason kept for people); a file with no request left is one error.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOONCAKE_BLOCK_TOKENS = 512
MAX_TOKENS = 10_000_000
"""The longest prompt or answer (and block) a trace may give: longer than any model's context."""
MAX_FILE_BYTES = 1 << 30
"""The largest trace file read (published traces are a few MB)."""
_MAX_LINE_BYTES = 1 << 20  # one row: a 10M-token prompt's hash ids take about 150 KB
_MAX_HASH_ID = 2**63 - 1


class TraceError(ValueError):
    """A trace that cannot be read or used. The message is one line for people."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = MOONCAKE_BLOCK_TOKENS


@dataclass(frozen=True)
class Trace:
    source: str
    rows: tuple[TraceRow, ...]
    skipped: int = 0  # lines left out: not JSON, or a field missing or out of range
    skip_reason: str = ""  # the first of them, for people ("line 4: ...")

    @property
    def span_s(self) -> float:
        return self.rows[-1].arrival_s - self.rows[0].arrival_s

    @property
    def rate_per_s(self) -> float:
        """The trace's mean arrival rate (requests per second over its span)."""
        return (len(self.rows) - 1) / self.span_s

    @property
    def shared_blocks(self) -> int:
        """Blocks that more than one request names: what a prefix cache can reuse."""
        seen: dict[int, int] = {}
        for row in self.rows:
            for h in row.hash_ids:
                seen[h] = seen.get(h, 0) + 1
        return sum(1 for n in seen.values() if n > 1)

    def gaps(self) -> list[float]:
        """Each request's wait after the one before it; the first waits the mean gap (the trace wraps)."""
        mean = self.span_s / (len(self.rows) - 1)
        return [mean] + [b.arrival_s - a.arrival_s for a, b in zip(self.rows, self.rows[1:], strict=False)]

    def describe(self) -> str:
        skipped = f"; {_left_out(self.skipped, self.skip_reason)}" if self.skipped else ""
        return (
            f"trace {Path(self.source).name}: {len(self.rows)} requests over {self.span_s:.0f} s "
            f"({self.rate_per_s:.2f} req/s), replayed at each load's rate{skipped}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "requests": len(self.rows),
            "span_s": self.span_s,
            "rate_per_s": self.rate_per_s,
            "shared_blocks": self.shared_blocks,
        }


def load_trace(path: Path) -> Trace:
    """Read a JSONL trace; bad lines are left out and counted (see the module docstring).

    Raises:
        TraceError: the file cannot be read, or fewer than two requests with distinct times are left; one
            line naming the file (and the first line left out).
    """
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TraceError(f"{path}: a trace of over {MAX_FILE_BYTES >> 20} MiB is not read")
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc})") from None
    rows = []
    skipped, skip_reason = 0, ""
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(_row(line, f"line {number}"))
        except TraceError as exc:
            skipped, skip_reason = skipped + 1, skip_reason or str(exc)
    why = f" ({_left_out(skipped, skip_reason)})" if skipped else ""
    if len(rows) < 2:
        raise TraceError(f"{path}: a trace needs at least two requests to have a rate{why}")
    rows.sort(key=lambda r: r.arrival_s)
    if rows[-1].arrival_s <= rows[0].arrival_s:
        raise TraceError(f"{path}: every request arrives at the same time: no rate to replay{why}")
    return Trace(str(path), tuple(rows), skipped, skip_reason)


def _left_out(count: int, first_reason: str) -> str:
    return f"{count} line{'' if count == 1 else 's'} left out, the first at {first_reason}"


def _row(line: bytes, where: str) -> TraceRow:
    """One line's request. Raises :class:`TraceError` saying why it is left out."""
    if len(line) > _MAX_LINE_BYTES:
        raise TraceError(f"{where}: longer than {_MAX_LINE_BYTES >> 20} MiB")
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise TraceError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TraceError(f"{where}: a trace line is one JSON object")

    def number(*keys: str) -> float | None:
        for key in keys:
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TraceError(f"{where}: {key!r} must be a number, got {type(value).__name__}")
            try:
                finite = float(value)
            except OverflowError:  # a whole number past any float
                finite = math.inf
            if not math.isfinite(finite) or finite < 0:
                raise TraceError(f"{where}: {key!r} must be a finite number >= 0, got {finite:g}")
            return finite
        return None

    def tokens(*keys: str) -> int | None:
        value = number(*keys)
        if value is not None and not (value == int(value) and 1 <= value <= MAX_TOKENS):
            raise TraceError(
                f"{where}: {keys[0]!r} must be a whole number of tokens from 1 to {MAX_TOKENS:,}"
            )
        return None if value is None else int(value)

    ms, seconds = number("timestamp"), number("time_s")
    if ms is None and seconds is None:
        raise TraceError(f"{where}: no arrival time ('timestamp' in ms or 'time_s')")
    arrival = seconds if seconds is not None else (ms or 0.0) / 1000.0
    input_len, output_len = tokens("input_length", "input_len"), tokens("output_length", "output_len")
    if input_len is None or output_len is None:
        raise TraceError(f"{where}: needs input_length and output_length >= 1")
    block = tokens("block_tokens") or MOONCAKE_BLOCK_TOKENS
    hashes = data.get("hash_ids") or []
    if not isinstance(hashes, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and abs(h) <= _MAX_HASH_ID for h in hashes
    ):
        raise TraceError(f"{where}: 'hash_ids' must be a list of whole numbers (64-bit)")
    if (len(hashes) - 1) * block >= input_len:
        raise TraceError(
            f"{where}: {len(hashes)} blocks of {block} tokens do not fit a {input_len}-token prompt"
        )
    return TraceRow(arrival, input_len, output_len, tuple(hashes), block)


def trace_prompts(
    trace: Trace, seed: int, low_id: int, high_id: int, *, warmup: bool = False
) -> Iterator[tuple[tuple[int, ...], int, float]]:
    """(prompt token ids, max tokens, gap before it in the trace's seconds) in trace order from a row chosen by
    ``seed``, wrapping around; infinite. Blocks named by the same hash id are equal within a phase."""
    salt = f"{seed}:{'warmup' if warmup else 'measure'}"
    start = random.Random(f"trace-start:{salt}").randrange(len(trace.rows))
    gaps = trace.gaps()
    blocks: dict[int, tuple[int, ...]] = {}
    count = 0
    ids = range(low_id, high_id)
    while True:
        i = (start + count) % len(trace.rows)
        row = trace.rows[i]
        prompt: list[int] = []
        for h in row.hash_ids:
            block = blocks.get(h)
            if block is None:
                block = blocks[h] = tuple(random.Random(f"block:{h}:{salt}").choices(ids, k=row.block_tokens))
            prompt.extend(block[: row.input_len - len(prompt)])
        own = random.Random(f"row:{count}:{salt}")
        prompt.extend(own.choices(ids, k=row.input_len - len(prompt)))
        yield tuple(prompt), row.output_len, gaps[i]
        count += 1
