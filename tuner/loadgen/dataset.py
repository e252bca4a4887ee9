"""Datasets of prompts for load tests: JSONL or ShareGPT JSON, tokenised the way the server does it.

A :class:`Dataset` is a tuple of :class:`Conversation`; each conversation is one or more :class:`Turn`. A
turn's prompt is text or token ids, with an optional output length (tokens to ask for) and optional answer
text. The history of turn k is the prompts and answers of turns < k; this module only loads and tokenises the
turns, the load generator builds the requests.

Formats (:func:`load_dataset`), told apart by their first character (``[``: a JSON array, else JSONL):

- JSONL, one object per line (blank lines ignored): ``{"prompt": "text"}`` or ``{"prompt_token_ids": [1, 2]}``
  (both: the ids are sent, the text kept for people), optional ``"output_len"`` (synonym ``"max_tokens"``) and
  ``"answer"`` (text); a multi-turn row is ``{"turns": [{...}, {...}]}`` of such objects. Other keys are
  ignored.
- ShareGPT JSON, an array of ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``
  (or ``{"messages": [{"role": "user", "content": ...}, ...]}``; such rows may also be JSONL lines). Each user
  message followed by an assistant one is a turn whose answer is the reply: its token count becomes the
  output length at tokenisation, as vLLM's ``bench serve`` counts ShareGPT. A user message with no reply
  leaves the output length to the caller's default. System messages before the first user message are kept
  as a prefix of the first prompt (joined by a blank line); later system messages are dropped, as are
  replies with no user message before them and empty user messages (with their reply). An entry with no
  user message is skipped and counted in :attr:`Dataset.skipped`.
- A built-in name: ``chat-sample`` or ``builtin:chat-sample`` (single- and multi-turn operator and user
  chat, with output lengths), ``sharegpt-sample`` (the ShareGPT format, with answers). Both files, in
  ``tuner/loadgen/data/``, were written for infertop and are under the project's licence (Apache-2.0); no
  text in them is taken from ShareGPT or any other dataset. Nothing is downloaded, at run time or ever.

:func:`tokenize_dataset` turns every text into token ids with the server's own ``POST /tokenize``, so the
prompts sent as ids have exactly the length the server would have made of the text.

A dataset is foreign data: an entry that is not JSON, lacks its prompt, or holds a value of the wrong type or
out of range (a text over ``MAX_TEXT_CHARS``, a length over ``MAX_TOKENS``, a token id that is not a 32-bit
id) is left out and counted in :attr:`Dataset.skipped`, the first reason kept for people; a file with no
entry left is one error.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tuner.loadgen.control import AskError, LoadgenError, Target, clip, get_json, pick_model

# The server helpers (tuner.loadgen.transport, .vocab) are imported where they are used: transport imports
# spec, which imports this module through workload.

BUILTIN_PREFIX = "builtin:"
BUILTINS = {"chat-sample": "chat-sample.jsonl", "sharegpt-sample": "sharegpt-sample.json"}
_USER_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})
_TOKENIZE_WORKERS = 8  # /tokenize is quick; a few requests in flight hide the round trips
MAX_TOKENS = 10_000_000
"""The longest prompt or output length an entry may give: longer than any model's context."""
MAX_TEXT_CHARS = 1 << 23
"""The longest text an entry may hold (8 Mi characters: a 1M-token context holds about half of that)."""
MAX_FILE_BYTES = 1 << 30
"""The largest dataset file read (ShareGPT's full export is about 650 MB)."""
_MAX_TOKEN_ID = 2**31 - 1


class DatasetError(ValueError):
    """A dataset that cannot be read, tokenised or used. The message is one line for people."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One prompt of a conversation: its text or token ids (or both), and what it asks for.

    ``output_len`` is the number of tokens to ask for (None: the caller's default); ``answer_text`` a recorded
    reply (ShareGPT), whose token count is the output length after :func:`tokenize_dataset`.
    """

    prompt_text: str | None
    prompt_ids: tuple[int, ...] | None
    output_len: int | None
    answer_text: str | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    """Turns sent one after another, each with the history of those before it. ``where``: its place in the
    file (``line 12``, ``entry 3``), for messages."""

    turns: tuple[Turn, ...]
    where: str = ""


@dataclass(frozen=True)
class Dataset:
    """Conversations from one file or built-in set. ``tokenized``: every turn has prompt ids and an output
    length, so lengths can be asked for (computed, not given)."""

    name: str
    source: str  # the file's path, or "builtin:NAME"
    conversations: tuple[Conversation, ...]
    skipped: int = 0  # entries left out: bad ones, and ShareGPT entries with no user message
    skip_reason: str = ""  # why the first was, for people ("line 4: ...")
    tokenized: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.conversations:
            raise DatasetError(f"{self.source}: the dataset has no prompts")
        done = all(t.prompt_ids is not None and t.output_len is not None for t in self._all_turns())
        object.__setattr__(self, "tokenized", done)

    def _all_turns(self) -> Iterator[Turn]:
        for conversation in self.conversations:
            yield from conversation.turns

    @property
    def turns(self) -> int:
        """How many turns (requests) the dataset holds."""
        return sum(len(c.turns) for c in self.conversations)

    @property
    def max_turns(self) -> int:
        """The most turns of any conversation."""
        return max(len(c.turns) for c in self.conversations)

    def input_lengths(self) -> list[int]:
        """Each turn's own prompt tokens (its history not counted), in order.

        Raises:
            DatasetError: a text prompt is not tokenised yet.
        """
        self._need_ids()
        return [len(t.prompt_ids or ()) for t in self._all_turns()]

    def output_lengths(self) -> list[int]:
        """Each turn's output length, in order.

        Raises:
            DatasetError: a turn has no output length yet (tokenise, or give a default).
        """
        self._need_output_lens()
        return [t.output_len or 0 for t in self._all_turns()]

    def longest_sequence(self) -> int:
        """The longest conversation's prompts and answers together, to its last answer (the history grows
        with each turn): the least max-model-len that serves every request of the dataset.

        Raises:
            DatasetError: not tokenised yet.
        """
        self._need_ids()
        self._need_output_lens()
        return max(
            sum(len(t.prompt_ids or ()) + (t.output_len or 0) for t in c.turns) for c in self.conversations
        )

    def fitting(self, max_len: int) -> tuple[Dataset, int]:
        """The conversations that fit ``max_len`` tokens to their last answer, and how many did not.

        Raises:
            DatasetError: none fits, or the dataset is not tokenised.
        """
        self._need_ids()
        self._need_output_lens()
        kept = tuple(
            c
            for c in self.conversations
            if sum(len(t.prompt_ids or ()) + (t.output_len or 0) for t in c.turns) <= max_len
        )
        if not kept:
            raise DatasetError(f"{self.source}: no conversation fits the server's {max_len}-token context")
        return dataclasses.replace(self, conversations=kept), len(self.conversations) - len(kept)

    def with_default_output_len(self, output_len: int) -> Dataset:
        """A copy where turns without an output length ask for ``output_len`` tokens; a turn with a recorded
        answer keeps waiting for tokenisation, which makes the answer's token count its length."""
        if output_len < 1:
            raise DatasetError(f"a default output length must be >= 1, got {output_len}")
        return self._map_turns(
            lambda c, k, t: (
                t
                if t.output_len is not None or t.answer_text is not None
                else dataclasses.replace(t, output_len=output_len)
            )
        )

    def _map_turns(self, change: Callable[[Conversation, int, Turn], Turn]) -> Dataset:
        conversations = tuple(
            dataclasses.replace(c, turns=tuple(change(c, k, t) for k, t in enumerate(c.turns)))
            for c in self.conversations
        )
        return dataclasses.replace(self, conversations=conversations)

    def left_out(self) -> str:
        """How many entries were left out and why the first was, for people ("" when none was)."""
        return _left_out(self.skipped, self.skip_reason) if self.skipped else ""

    def _need_ids(self) -> None:
        for conversation in self.conversations:
            if any(t.prompt_ids is None for t in conversation.turns):
                raise DatasetError(
                    f"{self.source}: {conversation.where}: text prompts not tokenised yet (tokenize_dataset)"
                )

    def _need_output_lens(self) -> None:
        for conversation in self.conversations:
            if any(t.output_len is None for t in conversation.turns):
                raise DatasetError(
                    f"{self.source}: {conversation.where}: a turn has no output length yet "
                    "(tokenize_dataset counts answers; with_default_output_len fills the rest)"
                )


# --- loading -----------------------------------------------------------------------------------------------


def load_dataset(path_or_name: str) -> Dataset:
    """A JSONL or ShareGPT JSON file, or a built-in dataset (``chat-sample``, ``builtin:sharegpt-sample``).

    Raises:
        DatasetError: one line naming the file and the line or entry at fault.
    """
    spec = path_or_name.strip()
    name = spec[len(BUILTIN_PREFIX) :] if spec.startswith(BUILTIN_PREFIX) else spec
    path = Path(spec)
    if spec.startswith(BUILTIN_PREFIX) or (name in BUILTINS and not path.exists()):
        if name not in BUILTINS:
            raise DatasetError(f"no built-in dataset {name!r}: one of {', '.join(BUILTINS)}")
        resource = importlib.resources.files("tuner.loadgen").joinpath("data", BUILTINS[name])
        return _parse(resource.read_text(encoding="utf-8"), name, BUILTIN_PREFIX + name)
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise DatasetError(f"{spec}: a dataset of over {MAX_FILE_BYTES >> 20} MiB is not read")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{spec}: no such file (or a built-in dataset: {', '.join(BUILTINS)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{spec}: cannot read it ({clip(str(exc), 200)})") from None
    return _parse(text, path.stem, spec)


def _parse(text: str, name: str, source: str) -> Dataset:
    conversations: list[Conversation] = []
    skipped, skip_reason = 0, ""
    for where, obj in _entries(text, source):
        try:
            conversation = _conversation(obj, where)
        except DatasetError as exc:
            skipped, skip_reason = skipped + 1, skip_reason or str(exc)
            continue
        if conversation is None:
            skipped, skip_reason = skipped + 1, skip_reason or f"{where}: no user message"
        else:
            conversations.append(dataclasses.replace(conversation, where=where))
    if not conversations:
        raise DatasetError(
            f"{source}: no prompts in it" + (f" ({_left_out(skipped, skip_reason)})" if skipped else "")
        )
    return Dataset(name, source, tuple(conversations), skipped, skip_reason)


def _left_out(count: int, first_reason: str) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'} left out, the first at {first_reason}"


def _entries(text: str, source: str) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` of each JSONL line or JSON array entry; a line that is not JSON, as its reason (a
    :class:`DatasetError`) in place of the object."""
    if text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{source}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:
            raise DatasetError(f"{source}: not valid JSON ({clip(str(exc), 200)})") from None
        for number, obj in enumerate(document, 1):
            yield f"entry {number}", obj
        return
    # Not splitlines(): it also splits at U+2028 and friends, which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = DatasetError(f"line {number}: not valid JSON ({exc.msg}, column {exc.colno})")
        except (ValueError, RecursionError) as exc:  # a number of over 4,300 digits; nesting past the stack
            obj = DatasetError(f"line {number}: not valid JSON ({clip(str(exc))})")
        yield f"line {number}", obj


def _conversation(obj: Any, where: str) -> Conversation | None:
    """The conversation of one entry; None when it has no user message. Raises :class:`DatasetError`
    saying why the entry is left out."""
    if isinstance(obj, DatasetError):
        raise obj
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj or "messages" in obj:
        return _sharegpt(obj, where)
    if "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise DatasetError(f'{where}: "turns" must be a non-empty list of prompt objects')
        return Conversation(tuple(_turn(t, f"{where}: turn {k}") for k, t in enumerate(turns, 1)))
    return Conversation((_turn(obj, where),))


def _turn(obj: Any, where: str) -> Turn:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text, ids = obj.get("prompt"), obj.get("prompt_token_ids")
    if text is None and ids is None:
        raise DatasetError(f'{where}: needs "prompt" (text) or "prompt_token_ids" (a list of token ids)')
    if text is not None and not (isinstance(text, str) and text):
        raise DatasetError(f'{where}: "prompt" must be non-empty text')
    _check_text(text, "prompt", where)
    if ids is not None:
        if not isinstance(ids, list) or not ids or len(ids) > MAX_TOKENS:
            raise DatasetError(f'{where}: "prompt_token_ids" must be a list of 1 to {MAX_TOKENS:,} token ids')
        bad = [i for i in ids if not _is_int(i) or not 0 <= i <= _MAX_TOKEN_ID]
        if bad:
            raise DatasetError(
                f'{where}: "prompt_token_ids" must hold integers >= 0 (32-bit), got {clip(repr(bad[0]))}'
            )
    key = "output_len" if "output_len" in obj else "max_tokens"
    output_len = obj.get(key)
    if output_len is not None and not (_is_int(output_len) and 1 <= output_len <= MAX_TOKENS):
        raise DatasetError(
            f'{where}: "{key}" must be a whole number from 1 to {MAX_TOKENS:,}, got {clip(repr(output_len))}'
        )
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DatasetError(f'{where}: "answer" must be text')
    _check_text(answer, "answer", where)
    return Turn(text, tuple(ids) if ids is not None else None, output_len, answer or None)


def _check_text(text: str | None, what: str, where: str) -> None:
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise DatasetError(f"{where}: {what} longer than {MAX_TEXT_CHARS:,} characters")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `true` is not a number of tokens


def _sharegpt(obj: dict[str, Any], where: str) -> Conversation | None:
    key = "conversations" if "conversations" in obj else "messages"
    messages = obj[key]
    if not isinstance(messages, list):
        raise DatasetError(f'{where}: "{key}" must be a list of messages')
    system: list[str] = []
    turns: list[Turn] = []
    pending: str | None = None  # a user message waiting for its reply ("" : an empty one, dropped)
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: message {number}: expected a JSON object")
        role = message.get("from", message.get("role"))
        value = message.get("value", message.get("content"))
        if not isinstance(role, str) or not isinstance(value, str):
            raise DatasetError(f'{where}: message {number}: needs "from"/"role" and a text "value"/"content"')
        _check_text(value, "the text", f"{where}: message {number}")
        role = role.lower()
        if role == "system":
            if not turns and pending is None:
                system.append(value)
        elif role in _USER_ROLES:
            if pending:
                turns.append(Turn(pending, None, None))
            pending = value if value.strip() else ""
        elif role in _ASSISTANT_ROLES:
            if pending:
                turns.append(Turn(pending, None, None, value or None))
            pending = None
        else:
            raise DatasetError(
                f"{where}: message {number}: unknown speaker {clip(repr(role))} (human, gpt, system...)"
            )
    if pending:
        turns.append(Turn(pending, None, None))
    if not turns:
        return None
    prefix = "\n\n".join(s for s in system if s.strip())
    if prefix and turns[0].prompt_text is not None:
        turns[0] = dataclasses.replace(turns[0], prompt_text=f"{prefix}\n\n{turns[0].prompt_text}")
    return Conversation(tuple(turns))


# --- tokenising --------------------------------------------------------------------------------------------


def tokenize_dataset(
    dataset: Dataset, base_url: str, model: str | None = None, *, timeout_s: float = 30.0
) -> Dataset:
    """``dataset`` with every text prompt and answer turned into token ids by the server's ``POST /tokenize``.

    ``model``: the served model's name (default: the first that ``GET /v1/models`` lists). Special tokens:
    the first prompt of a conversation is tokenised with them (``add_special_tokens: true``, as
    ``/v1/completions`` treats a text prompt: a BOS, for most models), since a token-id prompt is sent as
    is and gets none from the server. Later prompts and every answer are tokenised without them: they are
    sent after the history, inside a sequence that already begins with the first prompt's BOS, so the
    conversation holds one BOS as a single text would. (Tokenising the pieces apart can differ from
    tokenising their concatenation by a token at a seam; each turn's own length is exact.) An answer's
    token count becomes its turn's output length unless the file gave one. Prompts given as ids are kept
    as they are. Each distinct text is asked for once.

    Raises:
        DatasetError: the server cannot be reached or refuses a text; one line naming the entry.
    """

    jobs = _jobs(dataset)
    if not jobs:
        return dataset
    try:
        target = Target.parse(base_url)
    except LoadgenError as exc:
        raise DatasetError(str(exc)) from None
    with httpx.Client(base_url=target.base_url, timeout=timeout_s) as client:
        try:
            served, _root = pick_model(get_json(client, "/v1/models"), model)
        except AskError as exc:
            raise DatasetError(f"cannot tokenise {dataset.source}: {exc}") from None
        ids = _tokenize_all(client, served, jobs, dataset.source)
    return _with_ids(dataset, ids)


# Run by the vLLM environment's python: the tokenizer vLLM itself loads for the model (Hugging Face's
# AutoTokenizer), encoding as its /tokenize does for a completion prompt.
_LOCAL_TOKENIZER = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
jobs = json.load(sys.stdin)
json.dump([tokenizer(text, add_special_tokens=special)["input_ids"] for text, special in jobs], sys.stdout)
"""


def tokenize_dataset_locally(
    dataset: Dataset, python: str, model: str, *, trust_remote_code: bool = False, timeout_s: float = 300.0
) -> Dataset:
    """As :func:`tokenize_dataset`, with the model's tokenizer loaded by ``python`` (the vLLM environment's,
    which has Hugging Face ``transformers``), before any server runs: a tune needs the lengths to size
    max-model-len before its first launch. The same special-token rules apply.

    Raises:
        DatasetError: the tokenizer cannot be loaded or run; one line.
    """
    jobs = _jobs(dataset)
    if not jobs:
        return dataset
    keys = list(jobs)
    try:
        done = subprocess.run(
            [python, "-c", _LOCAL_TOKENIZER, model, "1" if trust_remote_code else "0"],
            input=json.dumps([[text, special] for text, special in keys]),
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatasetError(f"cannot tokenise {dataset.source} with {python}: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise DatasetError(f"cannot tokenise {dataset.source} with the tokenizer of {model}: {last}")
    try:
        answers = json.loads(done.stdout)
    except ValueError:
        raise DatasetError(f"cannot tokenise {dataset.source}: the tokenizer printed no JSON") from None
    if not isinstance(answers, list) or len(answers) != len(keys):
        raise DatasetError(
            f"cannot tokenise {dataset.source}: the tokenizer answered {len(answers)} of {len(keys)}"
        )
    return _with_ids(dataset, {key: tuple(ids) for key, ids in zip(keys, answers, strict=True)})


def _jobs(dataset: Dataset) -> dict[tuple[str, bool], str]:
    """(text, add_special_tokens) -> the first entry that has it: first prompts with special tokens, later
    prompts and answers without (see :func:`tokenize_dataset`)."""
    jobs: dict[tuple[str, bool], str] = {}
    for conversation in dataset.conversations:
        for k, turn in enumerate(conversation.turns):
            if turn.prompt_ids is None and turn.prompt_text is not None:
                jobs.setdefault((turn.prompt_text, k == 0), conversation.where)
            if turn.output_len is None and turn.answer_text is not None:
                jobs.setdefault((turn.answer_text, False), conversation.where)
    return jobs


def _with_ids(dataset: Dataset, ids: dict[tuple[str, bool], tuple[int, ...]]) -> Dataset:
    def tokenised(conversation: Conversation, k: int, turn: Turn) -> Turn:
        prompt_ids = turn.prompt_ids
        if prompt_ids is None and turn.prompt_text is not None:
            prompt_ids = ids[(turn.prompt_text, k == 0)]
        output_len = turn.output_len
        if output_len is None and turn.answer_text is not None:
            output_len = len(ids[(turn.answer_text, False)]) or None
        return dataclasses.replace(turn, prompt_ids=prompt_ids, output_len=output_len)

    return dataset._map_turns(tokenised)


def _tokenize_all(
    client: httpx.Client, model: str | None, jobs: dict[tuple[str, bool], str], source: str
) -> dict[tuple[str, bool], tuple[int, ...]]:

    pool = ThreadPoolExecutor(max_workers=_TOKENIZE_WORKERS)
    futures: dict[tuple[str, bool], Future[tuple[int, ...]]] = {
        job: pool.submit(_tokenize, client, model, *job) for job in jobs
    }
    ids: dict[tuple[str, bool], tuple[int, ...]] = {}
    try:
        for job, future in futures.items():
            try:
                ids[job] = future.result()
            except AskError as exc:
                raise DatasetError(f"cannot tokenise {source}: {jobs[job]}: {exc}") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, texts not yet sent never are
    return ids


def _tokenize(
    client: httpx.Client, model: str | None, text: str, add_special_tokens: bool
) -> tuple[int, ...]:

    body: dict[str, Any] = {"prompt": text, "add_special_tokens": add_special_tokens}
    if model:
        body["model"] = model
    answer = get_json(client, "/tokenize", body)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise AskError("the server's /tokenize answered no token ids")
    return tuple(tokens)


def served_max_model_len(base_url: str, model: str | None = None, *, timeout_s: float = 10.0) -> int | None:
    """The context the server serves ``model`` with (vLLM lists ``max_model_len`` at ``/v1/models``), or None."""

    try:
        target = Target.parse(base_url)
        with httpx.Client(base_url=target.base_url, timeout=timeout_s) as client:
            listed = get_json(client, "/v1/models")
            served, _root = pick_model(listed, model)
    except (LoadgenError, AskError):
        return None
    for entry in listed.get("data") or ():
        if isinstance(entry, dict) and entry.get("id") == served:
            value = entry.get("max_model_len")
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    return None


def check_ids(dataset: Dataset, vocab_size: int) -> None:
    """Every prompt id is below ``vocab_size`` (the server refuses others: "out of vocabulary").

    Raises:
        DatasetError: naming the first entry and turn with an id out of range.
    """
    for conversation in dataset.conversations:
        for k, turn in enumerate(conversation.turns, 1):
            bad = next((i for i in turn.prompt_ids or () if not 0 <= i < vocab_size), None)
            if bad is not None:
                turn_part = f" turn {k}:" if len(conversation.turns) > 1 else ""
                raise DatasetError(
                    f"{dataset.source}: {conversation.where}:{turn_part} token id {bad} is outside the "
                    f"model's vocabulary of {vocab_size}"
                )
