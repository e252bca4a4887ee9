"""Prompt datasets: JSONL and ShareGPT files parse, a bad entry is left out and counted (a file of none fails in
one line naming the file and the first entry at fault), the built-in samples load; tokenising asks /tokenize
for each distinct text with the special tokens the server would add; and on the CPU build of vLLM the token
ids we send count exactly as the server counts the text."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tuner.loadgen.dataset import (
    BUILTINS,
    Conversation,
    Dataset,
    DatasetError,
    Turn,
    check_ids,
    load_dataset,
    tokenize_dataset,
)
from tuner.serving.launcher import VllmServer
from tuner.serving.tinymodel import BOS_TOKEN_ID

DATA_DIR = Path(__file__).resolve().parent.parent / "tuner" / "loadgen" / "data"
MAX_MODEL_LEN = 512  # the shared test server's --max-model-len (conftest.VLLM_TEST_ARGS)


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(*rows: Any) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


# --- formats ------------------------------------------------------------------------------------------------


def test_jsonl_text_ids_and_multi_turn_rows(tmp_path: Path) -> None:
    text = _jsonl(
        {"prompt": "Hello there", "output_len": 40, "category": "ignored"},
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 9},
        {"turns": [{"prompt": "first", "output_len": 3}, {"prompt": "second", "answer": "a reply"}]},
    )
    path = _write(tmp_path, "mine.jsonl", "\n" + text.replace("\n", "\n\n", 1))  # blank lines are ignored
    dataset = load_dataset(path)
    assert (dataset.name, dataset.source, dataset.turns, dataset.max_turns) == ("mine", path, 4, 2)
    first, ids, multi = dataset.conversations
    assert first == Conversation((Turn("Hello there", None, 40, None),), "line 2")
    assert ids == Conversation((Turn(None, (5, 6, 7), 9, None),), "line 4")
    assert multi.where == "line 5"
    assert multi.turns == (Turn("first", None, 3, None), Turn("second", None, None, "a reply"))
    assert not dataset.tokenized


def test_sharegpt_json(tmp_path: Path) -> None:
    entries = [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "human", "value": "Q2"},
                {"from": "human", "value": "Q3"},
                {"from": "gpt", "value": "A3"},
                {"from": "human", "value": "Q4"},
            ],
        },
        {"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Q"}]},
        {"conversations": []},  # no user message: skipped
        {
            "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "A"}]
        },  # empty: skipped
        {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "R"}]},
    ]
    dataset = load_dataset(_write(tmp_path, "chats.json", json.dumps(entries, indent=2)))
    assert dataset.skipped == 2
    assert [c.where for c in dataset.conversations] == ["entry 1", "entry 2", "entry 5"]
    assert dataset.conversations[0].turns == (
        Turn("Be brief.\n\nQ1", None, None, "A1"),
        Turn("Q2", None, None, None),
        Turn("Q3", None, None, "A3"),
        Turn("Q4", None, None, None),
    )
    assert dataset.conversations[1].turns == (Turn("Q", None, None, None),)
    assert dataset.conversations[2].turns == (Turn("U", None, None, "R"),)


def test_sharegpt_rows_may_be_jsonl_lines(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    dataset = load_dataset(_write(tmp_path, "rows.jsonl", _jsonl(row, {"prompt": "P", "output_len": 2})))
    assert [c.turns for c in dataset.conversations] == [(Turn("Q", None, None, "A"),), (Turn("P", None, 2),)]


def test_builtin_samples_load() -> None:
    chat = load_dataset("chat-sample")
    assert load_dataset("builtin:chat-sample") == chat
    assert (chat.name, chat.source) == ("chat-sample", "builtin:chat-sample")
    assert len(chat.conversations) >= 60 and chat.max_turns >= 3
    assert sum(len(c.turns) > 1 for c in chat.conversations) >= 20
    turns = [t for c in chat.conversations for t in c.turns]
    assert all(t.prompt_text and t.prompt_ids is None for t in turns)
    lengths = [t.output_len for t in turns if t.output_len is not None]
    assert len(lengths) == len(turns) and min(lengths) >= 30 and max(lengths) <= 600
    assert max(len(t.prompt_text or "") for t in turns) >= 2000  # some long documents
    sharegpt = load_dataset("sharegpt-sample")
    assert len(sharegpt.conversations) >= 20 and sharegpt.skipped == 1 and sharegpt.max_turns >= 3
    assert all(t.answer_text or t.output_len is None for c in sharegpt.conversations for t in c.turns)
    for file in BUILTINS.values():
        assert (DATA_DIR / file).stat().st_size < 150_000


def test_a_file_of_a_builtin_name_is_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat-sample").write_text(_jsonl({"prompt": "mine"}))
    assert load_dataset("chat-sample").source == "chat-sample"
    assert load_dataset("builtin:chat-sample").source == "builtin:chat-sample"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ('{"prompt": "b",', "not valid JSON"),
        ('{"output_len": 3}', 'needs "prompt" (text) or "prompt_token_ids"'),
        (
            '{"prompt": "a", "output_len": 0}',
            '"output_len" must be a whole number from 1 to 10,000,000, got 0',
        ),
        (
            '{"prompt": "a", "max_tokens": -4}',
            '"max_tokens" must be a whole number from 1 to 10,000,000, got -4',
        ),
        (
            '{"prompt": "a", "output_len": true}',
            '"output_len" must be a whole number from 1 to 10,000,000, got True',
        ),
        (
            '{"prompt": "a", "output_len": 2.5}',
            '"output_len" must be a whole number from 1 to 10,000,000, got 2.5',
        ),
        (
            '{"prompt": "a", "output_len": 1e999}',
            '"output_len" must be a whole number from 1 to 10,000,000, got inf',
        ),
        (
            '{"prompt": "a", "output_len": 10000001}',
            '"output_len" must be a whole number from 1 to 10,000,000, got 10000001',
        ),
        ('{"prompt_token_ids": [1, "2"]}', "\"prompt_token_ids\" must hold integers >= 0 (32-bit), got '2'"),
        ('{"prompt_token_ids": [1, 2.0]}', '"prompt_token_ids" must hold integers >= 0 (32-bit), got 2.0'),
        ('{"prompt_token_ids": [-1]}', '"prompt_token_ids" must hold integers >= 0 (32-bit), got -1'),
        (
            '{"prompt_token_ids": [4294967296]}',
            '"prompt_token_ids" must hold integers >= 0 (32-bit), got 4294967296',
        ),
        ('{"prompt_token_ids": []}', '"prompt_token_ids" must be a list of 1 to 10,000,000 token ids'),
        ('{"prompt": ""}', '"prompt" must be non-empty text'),
        ('{"prompt": 3}', '"prompt" must be non-empty text'),
        ('{"prompt": "a", "answer": 7}', '"answer" must be text'),
        ('"text"', "expected a JSON object, got str"),
        ('{"turns": []}', '"turns" must be a non-empty list'),
        ('{"turns": [{"prompt": "a"}, {"output_len": 5}]}', "turn 2: needs"),
        ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),  # nested past the stack
        ('{"prompt": "a", "output_len": ' + "9" * 5000 + "}", "not valid JSON"),  # past int's 4,300 digits
        ('{"conversations": [{"from": "robot", "value": "x"}]}', "message 1: unknown speaker 'robot'"),
        ('{"conversations": [{"from": "human"}]}', "message 1: needs"),
        ('{"conversations": "hi"}', '"conversations" must be a list of messages'),
        ('{"conversations": []}', "no user message"),
    ],
)
def test_a_bad_entry_is_left_out_and_counted_and_a_file_of_none_is_one_line(
    tmp_path: Path, entry: str, reason: str
) -> None:
    mixed = load_dataset(
        _write(tmp_path, "mixed.jsonl", f'{{"prompt": "fine"}}\n\n{entry}\n{{"prompt": "too"}}\n')
    )
    assert [c.where for c in mixed.conversations] == ["line 1", "line 4"]
    assert mixed.skipped == 1 and mixed.skip_reason.startswith("line 3: ") and reason in mixed.skip_reason
    assert f"1 entry left out, the first at line 3: {reason}" in mixed.left_out()
    path = _write(tmp_path, "bad.jsonl", entry + "\n")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: no prompts in it (1 entry left out, the first at line 1: ")
    assert reason in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n\n", "no prompts in it"),
        (
            '[{"conversations": []}]',
            "no prompts in it (1 entry left out, the first at entry 1: no user message)",
        ),
        ('[\n{"conversations": [\n{"from": "human", "value": "x"},\n]}]', "line 4: not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (maximum recursion depth"),
        (
            "[1, 2]\n",
            "no prompts in it (2 entries left out, the first at entry 1: expected a JSON object, got int)",
        ),
    ],
)
def test_a_file_with_nothing_to_send_is_one_line_naming_it(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, "bad.json", text)
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_long_texts_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.loadgen import dataset

    monkeypatch.setattr(dataset, "MAX_TEXT_CHARS", 10)
    rows = [
        {"prompt": "short"},
        {"prompt": "x" * 11},
        {"prompt": "short", "answer": "y" * 11},
        {"conversations": [{"from": "human", "value": "z" * 11}]},
    ]
    loaded = load_dataset(_write(tmp_path, "long.jsonl", _jsonl(*rows)))
    assert len(loaded.conversations) == 1 and loaded.skipped == 3
    assert loaded.skip_reason == "line 2: prompt longer than 10 characters"
    monkeypatch.setattr(dataset, "MAX_FILE_BYTES", 100)
    with pytest.raises(DatasetError, match="a dataset of over 0 MiB is not read"):
        load_dataset(_write(tmp_path, "big.jsonl", _jsonl(*[{"prompt": "p"}] * 20)))


def test_missing_files_and_unknown_builtins(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl: no such file \(or a built-in dataset: chat-sample"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetError, match="no built-in dataset 'nope': one of chat-sample, sharegpt-sample"):
        load_dataset("builtin:nope")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"latin1\.jsonl: cannot read it"):
        load_dataset(str(tmp_path / "latin1.jsonl"))


# --- lengths ------------------------------------------------------------------------------------------------


def test_lengths_need_tokenisation_first() -> None:
    dataset = load_dataset("chat-sample")
    for ask in (dataset.input_lengths, dataset.longest_sequence):
        with pytest.raises(
            DatasetError, match=r"builtin:chat-sample: line 1: text prompts not tokenised yet"
        ):
            ask()
    assert len(dataset.output_lengths()) == dataset.turns  # the sample gives every output length
    with pytest.raises(DatasetError, match="entry 1: a turn has no output length yet"):
        load_dataset("sharegpt-sample").output_lengths()


def test_lengths_of_id_prompts_and_the_longest_conversation(tmp_path: Path) -> None:
    text = _jsonl(
        {"prompt_token_ids": [1] * 10, "output_len": 5},
        {"turns": [{"prompt_token_ids": [2] * 4, "output_len": 3}, {"prompt_token_ids": [3] * 6}]},
    )
    dataset = load_dataset(_write(tmp_path, "ids.jsonl", text))
    assert not dataset.tokenized
    assert dataset.input_lengths() == [10, 4, 6]
    with pytest.raises(DatasetError, match="line 2: a turn has no output length"):
        dataset.longest_sequence()
    filled = dataset.with_default_output_len(20)
    assert filled.tokenized and filled.output_lengths() == [5, 3, 20]
    assert filled.longest_sequence() == 4 + 3 + 6 + 20  # the history grows: 33 > 10 + 5
    assert tokenize_dataset(filled, "http://127.0.0.1:9") is filled  # nothing to tokenise: no server asked
    with pytest.raises(DatasetError, match=">= 1"):
        dataset.with_default_output_len(0)


def test_check_ids_names_the_row() -> None:
    dataset = Dataset(
        "d",
        "d.jsonl",
        (
            Conversation((Turn(None, (1, 2), 4),), "line 1"),
            Conversation((Turn(None, (3,), 4), Turn(None, (4, 513), 4)), "line 2"),
        ),
    )
    check_ids(dataset, 514)
    with pytest.raises(DatasetError, match=r"^d\.jsonl: line 2: turn 2: token id 513 is outside .* of 513$"):
        check_ids(dataset, 513)


# --- tokenising against a stand-in server ---------------------------------------------------------------------


class _StandIn(http.server.BaseHTTPRequestHandler):
    """/v1/models and a byte-level /tokenize (id = byte + 3, BOS 1 when special tokens are asked for)."""

    bodies: list[dict[str, Any]]
    refuse: str | None = None

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "tiny", "root": "/nowhere"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        if body["prompt"] == self.refuse:
            self._send(400, {"error": {"message": "prompt is too long", "type": "BadRequestError"}})
            return
        ids = [1] * body["add_special_tokens"] + [b + 3 for b in body["prompt"].encode()]
        self._send(200, {"count": len(ids), "max_model_len": 512, "tokens": ids})

    def _send(self, status: int, document: Any) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[str, type[_StandIn]]]:
    handler = type("Handler", (_StandIn,), {"bodies": [], "refuse": None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def test_first_prompts_get_special_tokens_later_turns_and_answers_do_not(
    tmp_path: Path, stand_in: tuple[str, type[_StandIn]]
) -> None:
    url, handler = stand_in
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo!"}]},
        {"turns": [{"prompt": "hi", "output_len": 7}, {"prompt": "hi"}, {"prompt_token_ids": [9, 9]}]},
        {"prompt": "yo!", "output_len": 4},
    ]
    dataset = tokenize_dataset(load_dataset(_write(tmp_path, "t.jsonl", _jsonl(*rows))), url)
    hi, yo = (104 + 3, 105 + 3), (121 + 3, 111 + 3, 33 + 3)
    assert dataset.conversations[0].turns == (Turn("hi", (1, *hi), 3, "yo!"),)  # output_len: the answer's 3
    assert dataset.conversations[1].turns == (
        Turn("hi", (1, *hi), 7, None),
        Turn("hi", hi, None, None),
        Turn(None, (9, 9), None, None),
    )
    assert dataset.conversations[2].turns == (Turn("yo!", (1, *yo), 4, None),)
    asked = sorted((b["prompt"], b["add_special_tokens"], b["model"]) for b in handler.bodies)
    # Each distinct (text, special tokens) once: "hi" first and later, "yo!" as an answer and a first prompt.
    assert asked == [
        ("hi", False, "tiny"),
        ("hi", True, "tiny"),
        ("yo!", False, "tiny"),
        ("yo!", True, "tiny"),
    ]
    assert (
        not dataset.tokenized
        and dataset.with_default_output_len(8).longest_sequence() == 3 + 7 + 2 + 8 + 2 + 8
    )


def test_tokenising_failures_are_one_line(tmp_path: Path, stand_in: tuple[str, type[_StandIn]]) -> None:
    url, handler = stand_in
    handler.refuse = "too long"
    path = _write(tmp_path, "t.jsonl", _jsonl({"prompt": "fine"}, {"prompt": "too long"}))
    with pytest.raises(DatasetError) as caught:
        tokenize_dataset(load_dataset(path), url)
    assert str(caught.value) == (
        f"cannot tokenise {path}: line 2: {url.removesuffix('/v1')}/tokenize answered HTTP 400: prompt is too long"
    )
    with pytest.raises(DatasetError, match="does not serve 'other'"):
        tokenize_dataset(load_dataset(path), url, "other")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(
        DatasetError, match=rf"^cannot tokenise {path}: cannot reach http://127.0.0.1:{port}: "
    ):
        tokenize_dataset(load_dataset(path), f"http://127.0.0.1:{port}")
    with pytest.raises(DatasetError, match="not an http"):
        tokenize_dataset(load_dataset(path), "localhost:8000")


# --- the real server (CPU build of vLLM, the tiny byte-level model) ---------------------------------------


def _complete(server: VllmServer, prompt: str | list[int], max_tokens: int) -> dict[str, int]:
    body = {"model": server.spec.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    usage: dict[str, int] = reply.json()["usage"]
    return usage


@pytest.fixture(scope="module")
def tokenised_chat(vllm_server: VllmServer) -> tuple[Dataset, float]:
    started = time.perf_counter()
    dataset = tokenize_dataset(load_dataset("chat-sample"), vllm_server.url)
    return dataset, time.perf_counter() - started


@pytest.mark.vllm
def test_the_chat_sample_tokenises_byte_for_byte(tokenised_chat: tuple[Dataset, float]) -> None:
    dataset, seconds = tokenised_chat
    assert dataset.tokenized
    assert seconds < 10, f"tokenising {dataset.turns} turns took {seconds:.1f} s"
    for conversation in dataset.conversations:
        for k, turn in enumerate(conversation.turns):
            ids, size = turn.prompt_ids or (), len((turn.prompt_text or "").encode())
            # One token per byte; the first prompt of a conversation alone begins with the BOS.
            assert (ids[0] == BOS_TOKEN_ID, len(ids)) == ((True, size + 1) if k == 0 else (False, size))
    assert dataset.input_lengths()[0] == len(dataset.conversations[0].turns[0].prompt_text or "") + 1
    assert dataset.output_lengths() == load_dataset("chat-sample").output_lengths()
    assert dataset.longest_sequence() > MAX_MODEL_LEN  # the long documents do not fit the test server


@pytest.mark.vllm
def test_answers_become_output_lengths(vllm_server: VllmServer) -> None:
    dataset = tokenize_dataset(load_dataset("sharegpt-sample"), vllm_server.url, vllm_server.spec.model)
    turns = [t for c in dataset.conversations for t in c.turns]
    assert all(t.prompt_ids for t in turns)
    assert [t.output_len for t in turns] == [
        len(t.answer_text.encode()) if t.answer_text else None for t in turns
    ]


@pytest.mark.vllm
def test_the_server_counts_our_ids_as_it_counts_the_text(
    vllm_server: VllmServer, tokenised_chat: tuple[Dataset, float]
) -> None:
    dataset, _ = tokenised_chat
    # Single prompts that fit the test server's 512-token context with their answer; the shortest answers
    # keep the test quick on CPU.
    fitting = [
        c.turns[0]
        for c in dataset.conversations
        if len(c.turns) == 1
        and len(c.turns[0].prompt_ids or ()) + (c.turns[0].output_len or 0) <= MAX_MODEL_LEN
    ]
    chosen = sorted(fitting, key=lambda t: t.output_len or 0)[:3]
    assert len(chosen) == 3
    for turn in chosen:
        ids, output_len = list(turn.prompt_ids or ()), turn.output_len or 0
        by_ids = _complete(vllm_server, ids, output_len)
        assert (by_ids["prompt_tokens"], by_ids["completion_tokens"]) == (len(ids), output_len)
        assert _complete(vllm_server, turn.prompt_text or "", 1)["prompt_tokens"] == len(ids)
    # A second turn after the first: our ids, joined, are what the server makes of the joined text (one BOS).
    first, second = next(c for c in dataset.conversations if len(c.turns) > 1).turns[:2]
    joined = list((first.prompt_ids or ()) + (second.prompt_ids or ()))
    assert len(joined) < MAX_MODEL_LEN
    text = (first.prompt_text or "") + (second.prompt_text or "")
    assert _complete(vllm_server, joined, 1)["prompt_tokens"] == len(joined)
    assert _complete(vllm_server, text, 1)["prompt_tokens"] == len(joined)
    tokenize = {"model": vllm_server.spec.model, "prompt": text}
    assert httpx.post(f"{vllm_server.url}/tokenize", json=tokenize, timeout=30).json()["tokens"] == joined


# --- datasets as workloads: parsed, tokenised before a tune, sent with per-phase own tokens ---------------


def test_datasets_and_traces_are_told_apart_and_named_by_the_workload(tmp_path: Path) -> None:
    from tuner.loadgen.workload import WorkloadError, parse_workload

    chat = parse_workload("chat-sample")
    assert chat.dataset is not None and chat.needs_tokens and "not tokenised yet" in chat.describe()
    assert parse_workload("builtin:sharegpt-sample").dataset is not None
    rows = [
        {"prompt_token_ids": [1, 5, 6, 7], "output_len": 3},
        {"turns": [{"prompt_token_ids": [1, 5, 9]}, {"prompt_token_ids": [8, 9], "output_len": 5}]},
    ]
    ids = parse_workload(_write(tmp_path, "ids.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert not ids.needs_tokens and ids.sessions is not None  # token ids need no tokenizer; two turns at most
    assert ids.output.values == (3, 5, 256)  # a prompt without a length asks for the default 256
    assert ids.longest_sequence == 3 + 256 + 2 + 5 and ids.sessions.context == ids.longest_sequence
    trace = _write(tmp_path, "t.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 2}\n' * 2)
    with pytest.raises(WorkloadError, match="same time"):  # a trace, read as one
        parse_workload(trace)
    with pytest.raises(
        WorkloadError, match=r"bad\.jsonl: no prompts in it \(1 entry left out, the first at line 1"
    ):
        parse_workload(_write(tmp_path, "bad.jsonl", "{nope\n"))
    some = parse_workload(
        _write(tmp_path, "some.jsonl", '{"prompt_token_ids": [1, 2], "output_len": 2}\n{nope\n')
    )
    assert "(1 entry left out, the first at line 2: not valid JSON" in some.describe()


def test_each_phase_sends_its_own_part_of_every_prompt_and_keeps_what_prompts_share(tmp_path: Path) -> None:
    import itertools

    from tuner.loadgen import LoadSpec
    from tuner.loadgen.spec import UNIQUE_TOKENS, make_requests
    from tuner.loadgen.workload import parse_workload

    system = list(range(100, 140))  # a 40-token system prompt that every conversation opens with
    rows = [{"prompt_token_ids": [1, *system, *range(200 + i, 230 + i)], "output_len": 4} for i in range(6)]
    rows.append({"prompt_token_ids": [1, 7, 8, 9, 10, 11, 12], "output_len": 4})  # shares only the BOS
    w = parse_workload(_write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert w.shared_until[:6] == (41,) * 6 and w.shared_until[6] == 1
    phases = [
        list(itertools.islice(make_requests(LoadSpec(vocab_size=1000, workload=w, seed=seed)), 14))
        for seed in (1, 2)
    ]
    for sent in phases:
        assert sorted(len(r.prompt_token_ids) for r in sent[:7]) == sorted(
            len(r["prompt_token_ids"]) for r in rows
        )
        assert [len(r.prompt_token_ids) for r in sent[:7]] == [len(r.prompt_token_ids) for r in sent[7:]]
        for r in sent:
            ids = r.prompt_token_ids
            if len(ids) > 7:
                assert list(ids[:41]) == [1, *system]  # the shared system prompt is sent as it is
    one, two = ({r.prompt_token_ids for r in sent} for sent in phases)
    assert one.isdisjoint(two)  # no whole prompt of one phase is sent again in the other
    assert len(one) == 14  # nor twice within a phase (the second pass draws its own tokens too)
    changed = [
        sum(a != b for a, b in zip(x.prompt_token_ids, y.prompt_token_ids, strict=True))
        for x, y in zip(sorted(phases[0], key=lambda r: r.prompt_token_ids[41:]), phases[1], strict=False)
        if len(x.prompt_token_ids) == len(y.prompt_token_ids)
    ]
    assert max(changed) <= len(rows[0]["prompt_token_ids"])  # sanity: same-length prompts compared
    assert UNIQUE_TOKENS == 4


@pytest.mark.vllm
def test_the_local_tokenizer_agrees_with_the_servers(
    vllm_server: VllmServer, vllm_python: Path, tiny_model_dir: Path, tokenised_chat: tuple[Dataset, float]
) -> None:
    from tuner.loadgen.dataset import tokenize_dataset_locally

    local = tokenize_dataset_locally(load_dataset("chat-sample"), str(vllm_python), str(tiny_model_dir))
    served, _ = tokenised_chat
    assert [t.prompt_ids for c in local.conversations for t in c.turns] == [
        t.prompt_ids for c in served.conversations for t in c.turns
    ]
    with pytest.raises(DatasetError, match="cannot tokenise") as info:
        tokenize_dataset_locally(load_dataset("chat-sample"), str(vllm_python), "/no/such/model")
    assert "\n" not in str(info.value)


@pytest.mark.vllm
def test_bench_sends_a_dataset_tokenised_by_the_server_leaving_out_what_does_not_fit(
    vllm_server: VllmServer, tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "tui.cli", "bench", "--endpoint", vllm_server.url, "--concurrency", "2",
         "--num-requests", "10", "--workload", "chat-sample", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "tokenised 125 prompts of builtin:chat-sample with the server's /tokenize" in run.stderr
    assert f"longer than the server's {MAX_MODEL_LEN}-token context left out" in run.stderr
    phase = json.loads(out.read_text())["phases"][0]
    assert phase["stats"]["requests_ok"] == 10 and phase["stats"]["requests_failed"] == 0
    sent = phase["stats"]["prompt_tokens_total"]
    assert sent > 10 * 20  # real prompts, counted by the server as the client meant them (checked in-phase)


@pytest.mark.vllm
def test_sharegpt_answers_set_the_output_lengths_of_a_dataset_workload(vllm_server: VllmServer) -> None:
    from tuner.loadgen.workload import for_server, parse_workload

    w, notes = for_server(parse_workload("sharegpt-sample"), vllm_server.url, None, 1024)
    assert notes and notes[0].startswith("tokenised") and w.dataset is not None
    for turn in (t for c in w.dataset.conversations for t in c.turns):
        # The recorded answer's token count (one per byte here), not the 256 asked of prompts without one.
        assert turn.output_len == (len(turn.answer_text.encode()) if turn.answer_text else 256)


def test_a_logged_chat_with_timestamps_is_a_dataset_not_a_trace(tmp_path: Path) -> None:
    from tuner.loadgen.workload import parse_workload

    rows = [
        {"timestamp": 1700000000 + i, "prompt_token_ids": [1, 2, 3 + i], "output_len": 4} for i in range(3)
    ]
    w = parse_workload(_write(tmp_path, "chats.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert w.dataset is not None and w.trace is None


# --- fuzzing: any file into the loader, a dataset or one clear error ---------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-5, max_value=2**40)
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
_KEYS = st.sampled_from(
    ["prompt", "prompt_token_ids", "output_len", "max_tokens", "answer", "turns", "conversations", "messages"]
)


def _mostly(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value nine times in ten, anything at all the tenth."""
    return st.integers(0, 9).flatmap(lambda k: plausible if k else _VALUES)


_TURN = st.fixed_dictionaries(
    {"prompt": _mostly(st.text(min_size=1, max_size=20))},
    optional={
        "output_len": _mostly(st.integers(min_value=1, max_value=500)),
        "answer": _mostly(st.text(max_size=20)),
        "prompt_token_ids": _mostly(st.lists(st.integers(min_value=0, max_value=1000), max_size=5)),
    },
)
_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "from": st.sampled_from(["human", "gpt", "system", "user", "robot", 3]),
            "value": _mostly(st.text(max_size=20)),
        }
    ),
    max_size=4,
)
_ROWS = (
    _TURN
    | st.fixed_dictionaries({"conversations": _MESSAGES})
    | st.fixed_dictionaries({"turns": st.lists(_TURN, max_size=3)})
    | st.dictionaries(_KEYS, _VALUES, max_size=4)
    | _VALUES
)
_LINES = _ROWS.map(json.dumps) | st.text(max_size=40)


@given(lines=st.lists(_LINES, max_size=8), as_array=st.booleans())
def test_any_dataset_file_loads_or_fails_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str], as_array: bool
) -> None:
    from tuner.loadgen.dataset import MAX_TOKENS
    from tuner.loadgen.workload import WorkloadError, parse_workload

    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    text = "[" + ",".join(lines) + "]" if as_array else "\n".join(lines)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        dataset = load_dataset(str(path))
    except DatasetError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
    else:
        event("a dataset")
        assert dataset.conversations and dataset.skipped >= 0
        for turn in (t for c in dataset.conversations for t in c.turns):
            assert turn.prompt_text is not None or turn.prompt_ids is not None
            assert all(isinstance(i, int) and 0 <= i < 2**31 for i in turn.prompt_ids or ())
            assert turn.output_len is None or (
                isinstance(turn.output_len, int) and 1 <= turn.output_len <= MAX_TOKENS
            )
    try:
        parse_workload(str(path))
    except WorkloadError as exc:
        assert "\n" not in str(exc)
