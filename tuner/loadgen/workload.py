"""What traffic looks like: length distributions, shared prefixes and presets for the operator's workload.

A :class:`Workload` says how long each request's prompt and answer are (a distribution each: fixed, uniform,
normal, lognormal, or empirical from observed lengths) and whether prompts begin with one of a few shared
prefixes (a system prompt, a RAG template: what prefix caching feeds on). Presets describe common traffic:

- ``chat``: ~500-token prompts (lognormal), ~250-token answers; per-user speed matters (interactive SLO);
- ``rag``: 4-8k-token prompts with a shared 512-token template, ~200-token answers; prefill and TTFT matter;
- ``summarisation``: 2-4k-token documents, ~400-token summaries;
- ``code``: ~1,500-token context, ~60-token completions; TTFT matters most;
- ``batch``: 512 in / 512 out, offline: throughput, no TTFT limit.

- ``multiturn``: chat sessions of 2-8 turns whose history grows turn by turn (each turn's prompt is the whole
  conversation so far: what prefix caching across turns feeds on), up to an 8k-token context.

On the command line: ``--workload chat``, ``--workload FILE.json`` or an inline spec
``--workload "in=lognormal:500:0.6,out=normal:250:60,prefix=512x4"``. Lengths are drawn per request from a
seeded generator, clipped to [``min``, ``max``] (``max``: the distribution's bound, used to size max-model-len).

**Sessions** (``turns=uniform:2:8,think=1.5,context=8192``): every conversation has a number of turns drawn from
``turns``; ``in`` is then each turn's *new* message (the first one's includes the shared prefix), and the prompt
sent is the conversation so far (earlier messages and the server's own answers, as token ids) plus that message.
A user waits ``think`` seconds on average (exponential) after an answer before the next turn, and a conversation
ends early rather than outgrow ``context`` tokens (a chat client starting afresh). Under a closed loop each user
holds one conversation at a time; under an open loop conversations start at the rate divided by the mean turns
per conversation, so that requests arrive at about the rate asked for.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.loadgen.control import clip
from tuner.loadgen.dataset import BUILTINS as DATASETS
from tuner.loadgen.dataset import (
    Dataset,
    DatasetError,
    check_ids,
    load_dataset,
    served_max_model_len,
    tokenize_dataset,
)
from tuner.loadgen.stats import percentile
from tuner.loadgen.trace import Trace, TraceError, load_trace

KINDS = ("fixed", "uniform", "normal", "lognormal", "empirical")
DEFAULT_CONTEXT = 8192  # tokens a session may reach when its spec does not say
_Z_999 = 3.09  # the 99.9th percentile of a standard normal: where a normal or lognormal is cut
MAX_LENGTH = 10_000_000  # tokens a length may reach: past any context, yet a prompt that can be drawn
MAX_REDRAWS = 1000
"""Draws a request may take to fit the workload's context (:meth:`Workload.draw`) before the last one is cut."""
_FIT_SAMPLE = 4000  # draws that describe how fitting a context changes a distribution (fit_to_context)
_FIT_MIN_SHARE = 0.01  # below this share of draws fitting, a workload is not fitted: it is another workload


class WorkloadError(ValueError):
    """A workload that cannot be understood or used. The message is one line for people."""


@dataclass(frozen=True, slots=True)
class Lengths:
    """A distribution of token counts.

    ``fixed``: ``a``; ``uniform``: ``a`` to ``b``; ``normal``: mean ``a``, standard deviation ``b``;
    ``lognormal``: median ``a``, log-space sigma ``b``; ``empirical``: ``values`` drawn with equal weight.
    Draws are whole numbers of at least 1, normal and lognormal ones cut at their 99.9th percentile.
    """

    kind: str
    a: float = 0.0
    b: float = 0.0
    values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkloadError(f"unknown length distribution {self.kind!r}: one of {', '.join(KINDS)}")
        if self.kind == "empirical":
            if not self.values or min(self.values) < 1:
                raise WorkloadError("an empirical distribution needs lengths >= 1")
            if max(self.values) > MAX_LENGTH:
                raise WorkloadError(
                    f"an empirical length of {max(self.values)} tokens is over {MAX_LENGTH:,}"
                )
            object.__setattr__(self, "values", tuple(sorted(int(v) for v in self.values)))
            return
        if not (self.a >= 1 and math.isfinite(self.a)):
            raise WorkloadError(f"a {self.kind} length needs a first parameter >= 1, got {self.a:g}")
        if self.kind == "uniform" and not self.b >= self.a:
            raise WorkloadError(f"a uniform length needs min <= max, got {self.a:g} and {self.b:g}")
        if self.kind in ("normal", "lognormal") and not (self.b >= 0 and math.isfinite(self.b)):
            raise WorkloadError(f"a {self.kind} length needs a spread >= 0, got {self.b:g}")
        try:
            longest = float(self.max)
        except OverflowError:
            longest = math.inf
        if longest > MAX_LENGTH:
            raise WorkloadError(
                f"a {self.kind} length reaching {longest:g} tokens is longer than any context "
                f"({MAX_LENGTH:,} at most)"
            )

    @classmethod
    def fixed(cls, n: int) -> Lengths:
        return cls("fixed", float(n))

    def draw(self, rng: random.Random) -> int:
        """One length."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "empirical":
            return self.values[rng.randrange(len(self.values))]
        normal = self.kind == "normal"
        value = rng.gauss(self.a, self.b) if normal else self.a * math.exp(rng.gauss(0.0, self.b))
        return max(1, min(self.max, round(value)))

    @property
    def max(self) -> int:
        """The longest length a draw can give."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        if self.kind == "empirical":
            return self.values[-1]
        if self.kind == "normal":
            return max(1, math.ceil(self.a + _Z_999 * self.b))
        return max(1, math.ceil(self.a * math.exp(_Z_999 * self.b)))

    @property
    def mean(self) -> float:
        """The distribution's mean, before clipping (what a performance model is asked about)."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "empirical":
            return sum(self.values) / len(self.values)
        if self.kind == "normal":
            return self.a
        return self.a * math.exp(self.b**2 / 2)

    def cdf(self, x: float) -> float:
        """P(draw <= x) of the unclipped distribution (for tests of what is sent)."""
        if self.kind == "fixed":
            return 1.0 if x >= self.a else 0.0
        if self.kind == "uniform":
            lo, hi = int(self.a), int(self.b)
            return min(1.0, max(0.0, (math.floor(x) - lo + 1) / (hi - lo + 1)))
        if self.kind == "empirical":
            return bisect.bisect_right(self.values, x) / len(self.values)
        if self.kind == "normal":
            return (
                0.5 * (1 + math.erf((x + 0.5 - self.a) / (self.b * math.sqrt(2))))
                if self.b
                else float(x >= self.a)
            )
        if x <= 0:
            return 0.0
        return (
            0.5 * (1 + math.erf(math.log((x + 0.5) / self.a) / (self.b * math.sqrt(2))))
            if self.b
            else float(x >= self.a)
        )

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)}"
        if self.kind == "uniform":
            return f"{int(self.a)}-{int(self.b)} (uniform)"
        if self.kind == "normal":
            return f"~{self.a:g} ± {self.b:g} (normal)"
        if self.kind == "lognormal":
            return f"~{self.a:g} median, sigma {self.b:g} (lognormal)"
        return f"{len(self.values)} observed lengths, mean {self.mean:.0f} (empirical)"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "empirical":
            return {"kind": self.kind, "values": list(self.values)}
        return {"kind": self.kind, "a": self.a, "b": self.b}


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """Every prompt starts with one of ``count`` prefixes of ``length`` tokens (a system prompt, a template)."""

    length: int
    count: int = 1

    def __post_init__(self) -> None:
        if self.length < 1 or self.count < 1:
            raise WorkloadError(
                f"a shared prefix needs a length and a count >= 1, got {self.length}x{self.count}"
            )


@dataclass(frozen=True, slots=True)
class Sessions:
    """Conversations of several turns (see the module docstring). ``context``: tokens a conversation may reach
    (prompt plus answer) before it ends; ``think_s``: the mean pause between an answer and the next turn."""

    turns: Lengths
    context: int
    think_s: float = 0.0

    def __post_init__(self) -> None:
        if self.context < 2:
            raise WorkloadError(f"a session context needs at least 2 tokens, got {self.context}")
        if not (self.think_s >= 0 and math.isfinite(self.think_s)):
            raise WorkloadError(f"a think time must be >= 0 seconds, got {self.think_s:g}")

    def describe(self) -> str:
        think = f", {self.think_s:g} s think time" if self.think_s else ""
        return f"sessions of {self.turns.describe()} turns up to {self.context} tokens{think}"

    def to_dict(self) -> dict[str, Any]:
        return {"turns": self.turns.to_dict(), "context": self.context, "think_s": self.think_s}


@dataclass(frozen=True, slots=True)
class Draw:
    """One request's lengths: prompt and answer tokens, the shared prefix it starts with (an index into the
    workload's prefixes; None: none), and how many draws before it were too long and drawn again."""

    input_len: int
    output_len: int
    prefix: int | None
    redrawn: int = 0


@dataclass(frozen=True, slots=True)
class Workload:
    """The traffic a bench or tune sends. ``input`` counts the whole prompt, the shared prefix included (with
    ``sessions``: each turn's new message, the first turn's including the prefix).

    ``fit_within``: a context no single request may outgrow (prompt plus answer): lengths are drawn from the
    distributions truncated to it (:meth:`draw`), so that a server of that context refuses none of them.
    """

    name: str
    input: Lengths
    output: Lengths
    prefix: SharedPrefix | None = None
    slo: str | None = None  # the SLO preset that fits it, if one does
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    sessions: Sessions | None = None
    trace: Trace | None = None  # replay these requests, their arrival times scaled (tuner.loadgen.trace)
    # Send these prompts (tuner.loadgen.dataset); until tokenised (:func:`with_tokens`), lengths are unknown.
    dataset: Dataset | None = None
    shared_until: tuple[int, ...] = ()  # per conversation: how many first tokens it shares with another
    fit_within: int | None = None

    @property
    def needs_tokens(self) -> bool:
        """A dataset of text not yet tokenised: its lengths are unknown until :func:`with_tokens`."""
        return self.dataset is not None and not self.dataset.tokenized

    def __post_init__(self) -> None:
        if self.prefix is not None and self.prefix.length >= self.input.max:
            raise WorkloadError(
                f"a {self.prefix.length}-token shared prefix leaves no room in prompts of at most {self.input.max}"
            )
        if self.fit_within is not None and self.fit_within < self._shortest + 1:
            raise WorkloadError(f"no request fits a {self.fit_within}-token context")
        if (
            self.sessions is not None
            and self.dataset is None  # a dataset's conversations were each checked against the context
            and self._longest_single > self.sessions.context
        ):
            raise WorkloadError(
                f"a first turn of up to {self._longest_single} tokens does not fit a session context "
                f"of {self.sessions.context}"
            )

    @property
    def _shortest(self) -> int:
        """The shortest prompt a draw can give: one token of its own after the shared prefix."""
        return self.prefix.length + 1 if self.prefix is not None else 1

    @property
    def _longest_single(self) -> int:
        single = self.input.max + self.output.max
        return single if self.fit_within is None else min(single, self.fit_within)

    @property
    def longest_sequence(self) -> int:
        """Prompt plus answer at their longest: the least max-model-len that serves every request."""
        if self.trace is not None:
            return max(r.input_len + r.output_len for r in self.trace.rows)
        if self.dataset is not None:
            return self.dataset.longest_sequence()
        if self.sessions is None:
            return self._longest_single
        return min(self.sessions.context, self.sessions.turns.max * self._longest_single)

    def draw(self, rng: random.Random, *, with_prefix: bool = True) -> Draw:
        """One request's lengths, and its shared prefix unless ``with_prefix`` is False (a later turn).

        With ``fit_within``, a draw whose prompt and answer outgrow it is drawn again: the distributions
        truncated to the context, as the server can serve them (:func:`fit_to_context` says how that changes
        them). After ``MAX_REDRAWS`` misses the last draw is cut to fit, so no request is ever longer.
        """
        limit = self.fit_within
        redrawn = 0
        while True:
            input_len, output_len, prefix = self._draw_once(rng, with_prefix)
            if limit is None or input_len + output_len <= limit:
                return Draw(input_len, output_len, prefix, redrawn)
            if redrawn == MAX_REDRAWS:
                output_len = max(1, min(output_len, limit - input_len))
                input_len = max(
                    self._shortest if prefix is not None else 1, min(input_len, limit - output_len)
                )
                return Draw(input_len, output_len, prefix, redrawn)
            redrawn += 1

    def _draw_once(self, rng: random.Random, with_prefix: bool) -> tuple[int, int, int | None]:
        input_len, output_len = self.input.draw(rng), self.output.draw(rng)
        if not with_prefix or self.prefix is None:
            return input_len, output_len, None
        prefix = rng.randrange(self.prefix.count)
        return max(input_len, self.prefix.length + 1), output_len, prefix

    @property
    def mean_prompt(self) -> float:
        """The mean prompt a request sends: with sessions, the conversation so far (context limit aside)."""
        if self.dataset is not None and self.dataset.tokenized:
            prompts = []
            for conversation in self.dataset.conversations:
                history = 0
                for turn in conversation.turns:
                    prompts.append(history + len(turn.prompt_ids or ()))
                    history = prompts[-1] + (turn.output_len or 0)
            return sum(prompts) / len(prompts)
        if self.sessions is None:
            return self.input.mean
        turns = max(1.0, self.sessions.turns.mean)
        # Turn k sends k messages and k - 1 answers: the mean over turns 1..T is (T+1)/2 messages, (T-1)/2 answers.
        mean = (turns + 1) / 2 * self.input.mean + (turns - 1) / 2 * self.output.mean
        return min(mean, self.sessions.context - self.output.mean)

    def describe(self) -> str:
        prefix = (
            f", prompts start with one of {self.prefix.count} shared {self.prefix.length}-token prefixes"
            if self.prefix
            else ""
        )
        sessions = f"; {self.sessions.describe()}" if self.sessions else ""
        fit = f", drawn to fit {self.fit_within} tokens" if self.fit_within is not None else ""
        if self.trace is not None:
            means = f"{self.input.mean:.0f} in / {self.output.mean:.0f} out on average"
            return f"{self.name}: {self.trace.describe()}, {means}"
        if self.dataset is not None:
            d = self.dataset
            what = f"dataset {d.source}: {len(d.conversations)} conversations, {d.turns} prompts"
            what += f" ({d.left_out()})" if d.skipped else ""
            if self.needs_tokens:
                return f"{self.name}: {what} (not tokenised yet)"
            turns = (
                f", up to {d.max_turns} turns each (the history sent with every turn)"
                if d.max_turns > 1
                else ""
            )
            means = f"{self.input.mean:.0f} in / {self.output.mean:.0f} out per prompt on average"
            return f"{self.name}: {what}{turns}, {means}"
        return f"{self.name}: {self.input.describe()} in, {self.output.describe()} out{prefix}{fit}{sessions}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "prefix": None
            if self.prefix is None
            else {"length": self.prefix.length, "count": self.prefix.count},
            "slo": self.slo,
            "sessions": None if self.sessions is None else self.sessions.to_dict(),
            "trace": None if self.trace is None else self.trace.to_dict(),
            "dataset": None
            if self.dataset is None
            else {
                "source": self.dataset.source,
                "conversations": len(self.dataset.conversations),
                "prompts": self.dataset.turns,
            },
            "describe": self.describe(),
            # Only when fitted: a tune stored before fitting existed resumes under the same traffic.
            **({"fit_within": self.fit_within} if self.fit_within is not None else {}),
        }


PRESETS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "chat",
            Lengths("lognormal", 500, 0.6),
            Lengths("normal", 250, 80),
            SharedPrefix(200, 4),
            "mlperf-llama3.1-8b-interactive",
            "conversational turns: a system prompt, a question, an answer read as it streams",
        ),
        Workload(
            "rag",
            Lengths("uniform", 4096, 8192),
            Lengths("normal", 200, 50),
            SharedPrefix(512, 2),
            "mlperf-llama3.1-8b-server",
            "retrieval-augmented answers: long retrieved context, a short answer; prefill and TTFT dominate",
        ),
        Workload(
            "summarisation",
            Lengths("uniform", 2048, 4096),
            Lengths("normal", 400, 100),
            None,
            "mlperf-llama3.1-8b-server",
            "documents in, summaries out",
        ),
        Workload(
            "code",
            Lengths("lognormal", 1500, 0.5),
            Lengths("lognormal", 60, 0.6),
            SharedPrefix(300, 1),
            "mlperf-llama3.1-8b-interactive",
            "code completion: much context, a short completion wanted at once",
        ),
        Workload(
            "multiturn",
            Lengths("lognormal", 150, 0.7),
            Lengths("normal", 250, 80),
            SharedPrefix(200, 4),
            "mlperf-llama3.1-8b-interactive",
            "chat sessions: each turn sends the conversation so far, so the prefix cache carries it turn to turn",
            sessions=Sessions(Lengths("uniform", 2, 8), 8192, 0.0),
        ),
        Workload(
            "batch",
            Lengths.fixed(512),
            Lengths.fixed(512),
            None,
            None,
            "offline batch: throughput is all, no TTFT limit (give an SLO with only tps=)",
        ),
    )
}


def parse_workload(spec: str) -> Workload:
    """A preset name, a JSON file, or an inline spec such as ``in=lognormal:500:0.6,out=256,prefix=512x4``.

    Raises:
        WorkloadError: one line saying what is wrong.
    """
    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.startswith("builtin:") or (spec in DATASETS and not Path(spec).exists()):
        return _from_dataset(spec)
    if spec.endswith(".jsonl"):
        return _from_trace(Path(spec)) if _is_trace(Path(spec)) else _from_dataset(spec)
    if spec.endswith(".json") and _first_char(Path(spec)) == "[":
        return _from_dataset(spec)  # a JSON array: ShareGPT conversations
    if spec.endswith(".json") or Path(spec).is_file():
        return _from_file(Path(spec))
    if "=" not in spec:
        raise WorkloadError(
            f"unknown workload {spec!r}: a preset ({', '.join(PRESETS)}), a dataset ({', '.join(DATASETS)}), "
            "a .json/.jsonl file or in=...,out=..."
        )
    fields: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or key not in ("in", "out", "prefix", "slo", "turns", "think", "context"):
            raise WorkloadError(
                f"workload part {part!r}: use in=, out=, prefix=LENxCOUNT, slo=, turns=, think= or context="
            )
        fields[key] = value
    if "in" not in fields or "out" not in fields:
        raise WorkloadError("a workload spec needs both in= and out=")
    prefix = _prefix(fields["prefix"]) if "prefix" in fields else None
    sessions = None
    if "turns" in fields:
        sessions = Sessions(
            _lengths(fields["turns"]),
            _int(fields.get("context", str(DEFAULT_CONTEXT)), "context"),
            _float(fields.get("think", "0"), "think"),
        )
    elif "think" in fields or "context" in fields:
        raise WorkloadError("think= and context= describe sessions: give turns= too")
    return Workload(
        "custom",
        _lengths(fields["in"]),
        _lengths(fields["out"]),
        prefix,
        fields.get("slo"),
        sessions=sessions,
    )


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise WorkloadError(f"{what}={text!r}: a whole number of tokens") from None


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise WorkloadError(f"{what}={text!r}: a number of seconds") from None


def _lengths(text: str) -> Lengths:
    """``256``, ``uniform:128:512``, ``normal:250:60``, ``lognormal:500:0.6``."""
    kind, _, rest = text.partition(":")
    try:
        if not rest:
            return Lengths.fixed(int(kind))
        numbers = [float(x) for x in rest.split(":")]
    except ValueError:
        raise WorkloadError(f"length {text!r}: a number, or kind:a:b such as lognormal:500:0.6") from None
    if kind == "fixed" and len(numbers) == 1:
        return Lengths.fixed(int(numbers[0]))
    if kind not in ("uniform", "normal", "lognormal") or len(numbers) != 2:
        raise WorkloadError(f"length {text!r}: uniform:MIN:MAX, normal:MEAN:SD or lognormal:MEDIAN:SIGMA")
    return Lengths(kind, numbers[0], numbers[1])


def _prefix(text: str) -> SharedPrefix:
    length, _, count = text.partition("x")
    try:
        return SharedPrefix(int(length), int(count or 1))
    except ValueError:
        raise WorkloadError(f"prefix {text!r}: LENGTHxCOUNT, e.g. 512x4") from None


DATASET_OUTPUT_LEN = 256
"""Tokens asked for by a dataset prompt that gives no output length and no recorded answer."""
_UNIQUE_TOKENS = 4
"""Token ids of each conversation's own part that every phase draws afresh (see :func:`with_tokens`)."""


def _first_char(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as f:
            return f.read(64).lstrip()[:1]
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot read it ({exc})") from None


def _is_trace(path: Path) -> bool:
    """A JSONL file whose first row has an arrival time is a trace; any other JSONL, a dataset of prompts."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            first = next((line for line in iter(lambda: f.readline(1 << 20), "") if line.strip()), "")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read it ({exc})") from None
    try:
        row = json.loads(first)
    except (ValueError, RecursionError):
        return False  # the dataset reader names the line
    if not isinstance(row, dict) or any(
        k in row for k in ("prompt", "prompt_token_ids", "turns", "messages")
    ):
        return False  # prompts (logged chats may carry a timestamp too)
    timed = "timestamp" in row or "time_s" in row
    return timed and ("input_length" in row or "input_len" in row)


def _from_dataset(spec: str) -> Workload:
    try:
        dataset = load_dataset(spec).with_default_output_len(DATASET_OUTPUT_LEN)
    except DatasetError as exc:
        raise WorkloadError(str(exc)) from None
    workload = Workload(
        dataset.name, Lengths.fixed(1), Lengths.fixed(1), description=dataset.source, dataset=dataset
    )
    return with_tokens(workload, dataset) if dataset.tokenized else workload


def with_tokens(workload: Workload, dataset: Dataset) -> Workload:
    """The workload of ``dataset`` once tokenised: its lengths (each prompt's own, its history aside), and
    sessions when a conversation has several turns (their context: the longest conversation).

    Each conversation's first prompt keeps the tokens it shares with another (a system prompt, a template:
    the prefix cache should serve those, as in production) and then has ``_UNIQUE_TOKENS`` of its own part
    replaced by ids drawn per phase: a small dataset is sent many times over a tune, and the server's prefix
    cache would otherwise answer a whole prompt from an earlier phase. Lengths stay exact.

    Raises:
        WorkloadError: the dataset is not tokenised.
    """
    if not dataset.tokenized:
        raise WorkloadError(f"{dataset.source}: not tokenised yet")
    firsts = [c.turns[0].prompt_ids or () for c in dataset.conversations]
    order = sorted(range(len(firsts)), key=lambda i: firsts[i])
    shared = [0] * len(firsts)
    for a, b in itertools.pairwise(order):
        common = 0
        for x, y in zip(firsts[a], firsts[b], strict=False):
            if x != y:
                break
            common += 1
        shared[a], shared[b] = max(shared[a], common), max(shared[b], common)
    turns = [len(c.turns) for c in dataset.conversations]
    sessions = (
        Sessions(Lengths("empirical", values=tuple(turns)), dataset.longest_sequence())
        if max(turns) > 1
        else None
    )
    return Workload(
        workload.name,
        Lengths("empirical", values=tuple(max(1, n) for n in dataset.input_lengths())),
        Lengths("empirical", values=tuple(max(1, n) for n in dataset.output_lengths())),
        None,
        workload.slo,
        workload.description,
        sessions=sessions,
        dataset=dataset,
        shared_until=tuple(shared),
    )


def for_server(
    workload: Workload, base_url: str, model: str | None, vocab_size: int
) -> tuple[Workload, list[str]]:
    """The workload as a running server can take it, and one line for people per change: a dataset tokenised
    by the server's ``/tokenize``; conversations, sessions and trace requests kept within the context it serves.

    Raises:
        WorkloadError: the server cannot tokenise it, an id is outside the vocabulary, or nothing fits.
    """
    notes = []
    if workload.dataset is not None and workload.needs_tokens:
        try:
            dataset = tokenize_dataset(workload.dataset, base_url, model)
            dataset = dataset.with_default_output_len(DATASET_OUTPUT_LEN)
            check_ids(dataset, vocab_size)
        except DatasetError as exc:
            raise WorkloadError(str(exc)) from None
        notes.append(f"tokenised {dataset.turns} prompts of {dataset.source} with the server's /tokenize")
        workload = with_tokens(workload, dataset)
    context = served_max_model_len(base_url, model)
    if context is not None:
        workload, note = fit_to_context(workload, context)
        notes += [note] if note else []
    return workload, notes


def fit_to_context(workload: Workload, context: int, where: str = "") -> tuple[Workload, str]:
    """``workload`` kept within ``context`` tokens (prompt plus answer), and what that changed ("" if nothing):
    a dataset's longer conversations and a trace's longer requests are left out, sessions end sooner, and
    lengths drawn from distributions are drawn truncated to the context (:meth:`Workload.draw`), the line then
    saying how often a draw is drawn again and how the prompt and answer lengths change. A server refuses
    nothing it is sent, so its error rate counts only what it got wrong. ``where`` names the limit in that
    line (default: the server's context).

    Raises:
        WorkloadError: nothing fits, or so little of a distribution that it would be another workload.
    """
    if workload.longest_sequence <= context:
        return workload, ""
    where = where or f"the server's {context}-token context"
    if workload.dataset is not None:
        try:
            dataset, dropped = workload.dataset.fitting(context)
        except DatasetError as exc:
            raise WorkloadError(str(exc)) from None
        return with_tokens(workload, dataset), f"{dropped} conversations longer than {where} left out"
    if workload.trace is not None:
        rows = tuple(r for r in workload.trace.rows if r.input_len + r.output_len <= context)
        if len(rows) < 2 or rows[-1].arrival_s <= rows[0].arrival_s:
            raise WorkloadError(f"{workload.trace.source}: too few requests fit {where} to replay")
        fitted = dataclasses.replace(
            workload,
            input=Lengths("empirical", values=tuple(r.input_len for r in rows)),
            output=Lengths("empirical", values=tuple(r.output_len for r in rows)),
            trace=dataclasses.replace(workload.trace, rows=rows),
        )
        return fitted, f"{len(workload.trace.rows) - len(rows)} trace requests longer than {where} left out"
    if workload.sessions is not None:
        try:
            sessions = dataclasses.replace(workload.sessions, context=context)
        except WorkloadError as exc:
            raise WorkloadError(f"{where}: {exc}") from None
        if workload.input.max + workload.output.max <= context:
            return dataclasses.replace(workload, sessions=sessions), f"conversations end within {where}"
        fitted, note = _truncated(workload, context, where, "first turns")
        return fitted, f"conversations end within {where}; {note}"
    return _truncated(workload, context, where, "requests")


def _truncated(workload: Workload, context: int, where: str, what: str) -> tuple[Workload, str]:
    """``workload`` drawn truncated to ``context`` tokens, and one line on how that changes its draws,
    estimated from a seeded sample: the draws that fit are a sample of the truncated distribution."""
    rng = random.Random("fit")
    draws = [workload._draw_once(rng, True) for _ in range(_FIT_SAMPLE)]
    kept = [d for d in draws if d[0] + d[1] <= context]
    share_redrawn = 1.0 - len(kept) / len(draws)
    if len(kept) < _FIT_MIN_SHARE * len(draws):
        raise WorkloadError(
            f"only {100 * (1 - share_redrawn):.1f} % of the workload's {what} fit {where}: give shorter lengths"
        )
    sessions = workload.sessions and dataclasses.replace(workload.sessions, context=context)
    fitted = dataclasses.replace(workload, fit_within=context, sessions=sessions)

    before_in, after_in = sorted(float(d[0]) for d in draws), sorted(float(d[0]) for d in kept)
    before_out, after_out = [float(d[1]) for d in draws], [float(d[1]) for d in kept]
    return fitted, (
        f"{what} longer than {where} are drawn again (about {100 * share_redrawn:.1f} % of draws; the server "
        f"would refuse them): prompts mean {_mean(before_in):,.0f} -> {_mean(after_in):,.0f} tokens, p99 "
        f"{percentile(before_in, 99) or 0:,.0f} -> {percentile(after_in, 99) or 0:,.0f}; answers mean "
        f"{_mean(before_out):,.0f} -> {_mean(after_out):,.0f}"
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _from_trace(path: Path) -> Workload:
    """A trace to replay (tuner.loadgen.trace): its lengths, in order, and its arrival times."""
    try:
        trace = load_trace(path)
    except TraceError as exc:
        raise WorkloadError(str(exc)) from None
    return Workload(
        path.stem,
        Lengths("empirical", values=tuple(r.input_len for r in trace.rows)),
        Lengths("empirical", values=tuple(r.output_len for r in trace.rows)),
        description=f"replayed from {path}",
        trace=trace,
    )


def _from_file(path: Path) -> Workload:
    """A JSON workload: ``{"name", "input": {...} | [lengths], "output": ..., "prefix": {...}, "slo"}``; a list
    of numbers is an empirical distribution (e.g. the lengths of a day's requests)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise WorkloadError(f"{path}: cannot read a JSON workload ({clip(str(exc), 200)})") from None
    if not isinstance(data, dict):
        raise WorkloadError(f"{path}: a workload file holds one JSON object")
    try:
        return _workload_of(data, path)
    except WorkloadError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise WorkloadError(f"{path}: not a workload ({type(exc).__name__}: {clip(str(exc))})") from None


def _workload_of(data: dict[str, Any], path: Path) -> Workload:
    """The workload a JSON workload file's object describes."""

    def lengths(key: str) -> Lengths:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return Lengths.fixed(int(value))
        if isinstance(value, list):
            return Lengths("empirical", values=tuple(int(v) for v in value))
        if isinstance(value, dict):
            return Lengths(str(value.get("kind", "")), float(value.get("a", 0)), float(value.get("b", 0)))
        raise WorkloadError(f"{path}: {key!r} must be a length, a list of lengths or {{kind, a, b}}")

    prefix = data.get("prefix")
    sessions = None
    if data.get("turns") is not None:
        turns = lengths("turns")
        try:
            context = int(data.get("context", DEFAULT_CONTEXT))
            think = float(data.get("think_s", 0.0))
        except (TypeError, ValueError):
            raise WorkloadError(f"{path}: 'context' is a number of tokens, 'think_s' of seconds") from None
        sessions = Sessions(turns, context, think)
    return Workload(
        str(data.get("name") or path.stem),
        lengths("input"),
        lengths("output"),
        SharedPrefix(int(prefix["length"]), int(prefix.get("count", 1)))
        if isinstance(prefix, dict)
        else None,
        data.get("slo"),
        str(data.get("description") or ""),
        sessions=sessions,
    )


def prefix_token_ids(prefix: SharedPrefix, low_id: int, high_id: int) -> list[tuple[int, ...]]:
    """The shared prefixes' token ids: the same in every phase (whatever its seed), so that the server's prefix
    cache sees them again across phases and trials, as it would a system prompt in production."""
    rng = random.Random(f"prefix:{prefix.length}x{prefix.count}")
    return [tuple(rng.choices(range(low_id, high_id), k=prefix.length)) for _ in range(prefix.count)]
