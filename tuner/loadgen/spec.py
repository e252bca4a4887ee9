"""What a phase sends: the load's shape (:class:`LoadSpec`), per-request limits and the seeded requests."""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.loadgen.trace import trace_prompts
from tuner.loadgen.workload import Workload, prefix_token_ids


class LoadMode(str, enum.Enum):
    """How requests are issued."""

    CONCURRENCY = "concurrency"  # closed loop: keep N streams in flight, a new request as soon as one ends
    RATE = "rate"  # open loop: Poisson arrivals at request_rate_per_s, optionally capped at N in flight


@dataclass(frozen=True, slots=True)
class ArrivalShare:
    """One share of an open loop's arrivals, for phases run side by side (:mod:`tuner.loadgen.workers`).

    Every share draws the whole phase's Poisson arrivals at ``rate_per_s`` from ``seed`` alike, and each arrival
    is dealt to one share at random, as a random router would: this share takes those whose draw falls in
    ``[low, high)``. Each share alone is a Poisson stream at ``rate_per_s * (high - low)``; the shares together
    are exactly the phase one process would have sent with ``seed`` (same arrival times), however many there
    are, and they all end together: shares with a fixed count each would leave the phase's tail at a fraction
    of the rate while the last of them finishes.
    """

    seed: int
    rate_per_s: float
    low: float
    high: float

    def _router(self) -> random.Random:
        return random.Random(f"{self.seed}:router")

    def deal(self, gaps: Iterator[float]) -> Iterator[float]:
        """This share's gaps from the whole phase's: those of the arrivals dealt elsewhere are added on."""
        router = self._router()
        pending_s = 0.0
        for gap_s in gaps:
            pending_s += gap_s
            if self.low <= router.random() < self.high:
                yield pending_s
                pending_s = 0.0

    def count(self, arrivals: int) -> int:
        """How many of the phase's first ``arrivals`` arrivals are dealt to this share."""
        router = self._router()
        return sum(1 for _ in range(arrivals) if self.low <= router.random() < self.high)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One phase of load. Give ``num_requests`` or ``duration_s`` (both: whichever ends first).

    Lengths are exact unless ``len_range_ratio`` > 0: then each request's input and output lengths are drawn
    uniformly from ``[L * (1 - r), L * (1 + r)]`` (vLLM bench's ``--random-range-ratio``). A ``workload``
    (:mod:`tuner.loadgen.workload`) replaces both: lengths drawn from its distributions, prompts starting with
    one of its shared prefixes. Prompt token ids
    are drawn from the middle 80 % of ``vocab_size``, away from the special tokens most vocabularies keep at
    either end. ``extra_body`` is merged into every request body (e.g. ``{"temperature": 0}``).
    """

    mode: LoadMode = LoadMode.CONCURRENCY
    concurrency: int | None = 1  # closed loop: streams in flight; rate mode: cap (None = no cap)
    request_rate_per_s: float | None = None  # rate mode only
    num_requests: int | None = 100
    duration_s: float | None = None  # stop issuing after this long; requests in flight still finish
    warmup_requests: int = 0
    input_len: int = 128
    output_len: int = 128
    len_range_ratio: float = 0.0
    vocab_size: int = 32000
    seed: int = 0
    extra_body: Mapping[str, Any] = field(default_factory=dict, hash=False)
    workload: Workload | None = field(default=None, hash=False)
    # Open loop run side by side: this phase's share of the arrivals (request_rate_per_s is then its share's rate).
    arrival_share: ArrivalShare | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.mode is LoadMode.CONCURRENCY and (self.concurrency is None or self.concurrency < 1):
            problems.append("concurrency mode needs concurrency >= 1")
        if self.mode is LoadMode.RATE and not (self.request_rate_per_s and self.request_rate_per_s > 0):
            problems.append("rate mode needs request_rate_per_s > 0")
        if self.mode is LoadMode.RATE and self.concurrency is not None and self.concurrency < 1:
            problems.append("a concurrency cap must be >= 1 (or None for no cap)")
        if self.num_requests is None and self.duration_s is None:
            problems.append("give num_requests or duration_s")
        if self.num_requests is not None and self.num_requests < 1:
            problems.append("num_requests must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            problems.append("duration_s must be > 0")
        if self.warmup_requests < 0:
            problems.append("warmup_requests must be >= 0")
        if self.input_len < 1 or self.output_len < 1:
            problems.append("input_len and output_len must be >= 1")
        if not 0.0 <= self.len_range_ratio < 1.0:
            problems.append("len_range_ratio must be in [0, 1)")
        if self.vocab_size < 10:
            problems.append("vocab_size must be >= 10")
        share = self.arrival_share
        if share is not None and (self.mode is not LoadMode.RATE or not 0.0 <= share.low < share.high <= 1.0):
            problems.append("an arrival share is an open loop's, with 0 <= low < high <= 1")
        if {"prompt", "max_tokens", "stream"} & set(self.extra_body):
            problems.append("extra_body must not set prompt, max_tokens or stream (the load generator does)")
        if problems:
            raise ValueError("LoadSpec: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request as sent: its prompt (token ids) and how many tokens it asks for."""

    index: int  # 0-based within its phase; warm-up requests have their own numbering
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    redrawn: int = 0  # draws longer than the workload's context drawn again before this one (Workload.draw)


DEADLINE_MARGIN = 3.0
"""How many times the slowest time the SLO allows a request gets before it is cut off (see
:meth:`Timeouts.deadline_s`): an SLO bounds a percentile, and a request in its tail may be slower."""
FLOOR_TTFT_S = 60.0
"""Without a TTFT limit: the longest wait for a first token taken as a server still working."""
FLOOR_TOKENS_PER_S = 1.0
"""Without a TPOT limit: the slowest per-user speed taken as a server still working (a CPU build at high
concurrency streams several tokens a second; a GPU, tens)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request limits. A request that hits the idle limit fails with ``error_kind == "timeout"``, one
    still open at its deadline with ``"deadline"`` (whatever bytes keep arriving: SSE comments, endless
    tokens)."""

    connect_s: float = 10.0
    read_idle_s: float = 120.0  # no byte at all for this long (before the first token, too)
    total_s: float | None = None  # every request's deadline; None = each its own, from its length and the SLO

    def deadline_s(
        self, max_tokens: int, *, ttft_max_s: float | None = None, tpot_max_s: float | None = None
    ) -> float:
        """The whole-request deadline of a request asking for ``max_tokens``, in seconds from its start:
        ``total_s`` when given, else::

            DEADLINE_MARGIN * (TTFT allowance + max_tokens * per-token allowance)

        The allowances are the SLO's limits (``ttft_max_s``, ``tpot_max_s``: what a phase is judged by), or
        without them the floors ``FLOOR_TTFT_S`` and 1 / ``FLOOR_TOKENS_PER_S``. A request asking for 128
        tokens under a 2 s TTFT, 50 ms TPOT SLO has 3 x (2 + 6.4) = 25.2 s; with no SLO, 3 x (60 + 128) =
        564 s.
        """
        if self.total_s is not None:
            return self.total_s
        ttft_s = ttft_max_s if ttft_max_s is not None else FLOOR_TTFT_S
        per_token_s = tpot_max_s if tpot_max_s is not None else 1.0 / FLOOR_TOKENS_PER_S
        return DEADLINE_MARGIN * (ttft_s + max_tokens * per_token_s)


def make_requests(spec: LoadSpec, *, warmup: bool = False) -> Iterator[RequestSpec]:
    """The requests of a phase (or of its warm-up), deterministic for a given ``spec.seed``.

    Infinite: the caller takes what it needs. Warm-up prompts come from a different stream than measured
    ones, so a warm-up never puts a measured prompt in the server's prefix cache.
    """
    rng = random.Random(f"{spec.seed}:{'warmup' if warmup else 'measure'}")
    low_id, high_id = spec.vocab_size // 10, spec.vocab_size - spec.vocab_size // 10
    workload = spec.workload
    if workload is not None and workload.dataset is not None:
        for index, conversation in enumerate(_dataset_conversations(spec, workload, warmup)):
            first = conversation.turns[0]
            yield RequestSpec(index=index, prompt_token_ids=first.message_ids, max_tokens=first.max_tokens)
        return
    if workload is not None and workload.trace is not None:
        for index, (ids, max_tokens, _gap) in enumerate(
            trace_prompts(workload.trace, spec.seed, low_id, high_id, warmup=warmup)
        ):
            yield RequestSpec(index=index, prompt_token_ids=ids, max_tokens=max_tokens)
        return
    prefixes = (
        prefix_token_ids(workload.prefix, low_id, high_id)
        if workload is not None and workload.prefix is not None
        else []
    )
    index = 0
    while True:
        input_len, output_len, redrawn = spec.input_len, spec.output_len, 0
        head: tuple[int, ...] = ()
        if workload is not None:
            drawn = workload.draw(rng)  # every prompt has a part of its own, after its shared prefix
            input_len, output_len, redrawn = drawn.input_len, drawn.output_len, drawn.redrawn
            if drawn.prefix is not None:
                head = prefixes[drawn.prefix]
        elif spec.len_range_ratio > 0:
            r = spec.len_range_ratio
            input_len = _draw_len(rng, input_len, r)
            output_len = _draw_len(rng, output_len, r)
        ids = head + tuple(rng.choices(range(low_id, high_id), k=input_len - len(head)))
        yield RequestSpec(index=index, prompt_token_ids=ids, max_tokens=output_len, redrawn=redrawn)
        index += 1


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a conversation: the new message (token ids) and how many tokens it asks for; the user
    pauses ``think_s`` after the previous answer before sending it."""

    message_ids: tuple[int, ...]
    max_tokens: int
    think_s: float = 0.0
    redrawn: int = 0  # draws longer than the workload's context drawn again before this one (Workload.draw)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A planned conversation: its turns, and the context it must stay within (prompt plus answer)."""

    turns: tuple[Turn, ...]
    context: int


def make_conversations(spec: LoadSpec, *, warmup: bool = False) -> Iterator[Conversation]:
    """The conversations of a phase whose workload has sessions, deterministic for a given ``spec.seed``.

    Infinite, like :func:`make_requests`. The first turn's message starts with one of the shared prefixes.
    """
    workload = spec.workload
    assert workload is not None and workload.sessions is not None
    if workload.dataset is not None:
        yield from _dataset_conversations(spec, workload, warmup)
        return
    sessions = workload.sessions
    rng = random.Random(f"{spec.seed}:{'warmup' if warmup else 'measure'}:sessions")
    low_id, high_id = spec.vocab_size // 10, spec.vocab_size - spec.vocab_size // 10
    prefixes = prefix_token_ids(workload.prefix, low_id, high_id) if workload.prefix is not None else []
    while True:
        turns = []
        for k in range(max(1, sessions.turns.draw(rng))):
            drawn = workload.draw(rng, with_prefix=k == 0)
            head = prefixes[drawn.prefix] if drawn.prefix is not None else ()
            ids = head + tuple(rng.choices(range(low_id, high_id), k=drawn.input_len - len(head)))
            think = rng.expovariate(1.0 / sessions.think_s) if k and sessions.think_s > 0 else 0.0
            turns.append(Turn(ids, drawn.output_len, think, drawn.redrawn))
        yield Conversation(tuple(turns), sessions.context)


UNIQUE_TOKENS = 4
"""Token ids of a dataset conversation's own part drawn afresh for each phase (see workload.with_tokens)."""


def _dataset_conversations(spec: LoadSpec, workload: Workload, warmup: bool) -> Iterator[Conversation]:
    """A tokenised dataset's conversations in order from a row chosen by the seed, wrapping around; each first
    prompt with ``UNIQUE_TOKENS`` of its own part (after what it shares with others) drawn for this phase."""
    dataset = workload.dataset
    assert dataset is not None and dataset.tokenized
    rng = random.Random(f"{spec.seed}:{'warmup' if warmup else 'measure'}:dataset")
    low_id, high_id = spec.vocab_size // 10, spec.vocab_size - spec.vocab_size // 10
    context = workload.sessions.context if workload.sessions is not None else workload.longest_sequence
    conversations = dataset.conversations
    i = rng.randrange(len(conversations))
    while True:
        source = conversations[i]
        turns = []
        for k, turn in enumerate(source.turns):
            ids = turn.prompt_ids or ()
            if k == 0 and len(ids) > 1:
                n = min(UNIQUE_TOKENS, len(ids) - 1)
                shared = workload.shared_until[i] if i < len(workload.shared_until) else 0
                at = max(
                    1, min(shared, len(ids) - n)
                )  # past the shared part, and never the first (BOS) token
                ids = ids[:at] + tuple(rng.choices(range(low_id, high_id), k=n)) + ids[at + n :]
            turns.append(Turn(ids, turn.output_len or 1))
        yield Conversation(tuple(turns), context)
        i = (i + 1) % len(conversations)


def stand_in_answer(length: int, vocab_size: int, seed: int) -> tuple[int, ...]:
    """Token ids standing in for an answer the server did not return as ids (older vLLM): of its length, so
    the next turn's prompt is as long as a real client's, though the prefix cache cannot reuse them."""
    rng = random.Random(f"answer:{seed}")
    low_id, high_id = vocab_size // 10, vocab_size - vocab_size // 10
    return tuple(rng.choices(range(low_id, high_id), k=length))


def _draw_len(rng: random.Random, length: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio))))
