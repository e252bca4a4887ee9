"""Workloads: the lengths sent follow the description (tested as distributions), prompts share the declared
prefixes, presets and specs parse, bad ones are one line; and against the CPU build of vLLM the server counts
exactly the prompt tokens the client meant to send, and its prefix cache sees the shared prefixes."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuner.loadgen import LoadSpec
from tuner.loadgen.spec import make_conversations, make_requests
from tuner.loadgen.workload import (
    PRESETS,
    Lengths,
    Sessions,
    SharedPrefix,
    Workload,
    WorkloadError,
    parse_workload,
)


def _ks(lengths: Lengths, draws: list[int]) -> float:
    """The largest gap between the draws' empirical CDF and the distribution's, over the draws' values."""
    draws = sorted(draws)
    n = len(draws)
    return max(
        abs((i + 1) / n - lengths.cdf(x)) for i, x in enumerate(draws) if i + 1 == n or draws[i + 1] != x
    )


@pytest.mark.parametrize(
    "lengths",
    [
        Lengths.fixed(256),
        Lengths("uniform", 128, 512),
        Lengths("normal", 250, 60),
        Lengths("lognormal", 500, 0.6),
        Lengths("empirical", values=(10, 10, 20, 40, 80, 80, 80, 300)),
    ],
    ids=lambda d: d.kind,
)
def test_draws_follow_the_distribution(lengths: Lengths) -> None:
    rng = random.Random(7)
    draws = [lengths.draw(rng) for _ in range(4000)]
    assert min(draws) >= 1 and max(draws) <= lengths.max
    assert _ks(lengths, draws) < 0.03  # a 4,000-draw KS test at about the 1 % level
    assert sum(draws) / len(draws) == pytest.approx(lengths.mean, rel=0.03)


def test_presets_pair_with_slos_and_size_max_model_len() -> None:
    assert set(PRESETS) == {"chat", "rag", "summarisation", "code", "batch", "multiturn"}
    rag = PRESETS["rag"]
    assert rag.input.max == 8192 and rag.longest_sequence > 8192 and rag.prefix == SharedPrefix(512, 2)
    assert PRESETS["batch"].slo is None and PRESETS["chat"].slo == "mlperf-llama3.1-8b-interactive"
    assert "4096-8192 (uniform) in" in rag.describe()


def test_inline_specs_and_files_parse(tmp_path: Path) -> None:
    w = parse_workload("in=lognormal:500:0.6,out=256,prefix=128x4,slo=aa-50")
    assert w.input == Lengths("lognormal", 500, 0.6) and w.output == Lengths.fixed(256)
    assert w.prefix == SharedPrefix(128, 4) and w.slo == "aa-50"
    path = tmp_path / "day.json"
    path.write_text(
        json.dumps(
            {"name": "support-bot", "input": [300, 500, 700], "output": {"kind": "normal", "a": 200, "b": 50}}
        )
    )
    day = parse_workload(str(path))
    assert day.name == "support-bot" and day.input.kind == "empirical" and day.input.max == 700


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("chatty", "unknown workload 'chatty'"),
        ("in=256", "needs both in= and out="),
        ("in=gamma:3:4,out=5", "uniform:MIN:MAX"),
        ("in=100,out=10,prefix=200x2", "leaves no room"),
        ("in=uniform:500:100,out=10", "min <= max"),
        ("/no/such/file.json", "cannot read"),
        ("in=100,out=10,think=2", "give turns= too"),
        ("in=100,out=10,turns=3,context=50", "does not fit a session context of 50"),
        ("in=100,out=10,turns=3,think=-1", "think time must be >= 0"),
        ("in=100,out=10,turns=3,context=lots", "context='lots'"),
        ("in=uniform:1:1e15,out=10", "longer than any context"),
        ("in=lognormal:500:1000,out=10", "longer than any context"),
        ("in=100,out=normal:10:1e300", "longer than any context"),
    ],
)
def test_bad_workloads_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message) as info:
        parse_workload(spec)
    assert "\n" not in str(info.value)


def test_requests_share_the_prefixes_and_follow_the_lengths() -> None:
    workload = Workload("t", Lengths("uniform", 64, 256), Lengths("normal", 40, 10), SharedPrefix(32, 3))
    spec = LoadSpec(concurrency=4, num_requests=10, vocab_size=1000, workload=workload, seed=3)
    requests = list(itertools.islice(make_requests(spec), 3000))
    heads = {r.prompt_token_ids[:32] for r in requests}
    assert len(heads) == 3  # every prompt starts with one of the three prefixes ...
    assert len({r.prompt_token_ids[32:40] for r in requests[:50]}) > 40  # ... and goes on with its own tokens
    lengths = [len(r.prompt_token_ids) for r in requests]
    assert (
        _ks(workload.input, lengths) < 0.04 and _ks(workload.output, [r.max_tokens for r in requests]) < 0.04
    )
    warm = list(itertools.islice(make_requests(spec, warmup=True), 100))
    assert {
        r.prompt_token_ids[:32] for r in warm
    } <= heads  # warm-up warms the same prefixes, as production would
    assert [r.prompt_token_ids for r in warm[:5]] != [r.prompt_token_ids for r in requests[:5]]


@pytest.mark.vllm
def test_the_server_counts_the_prompt_tokens_meant_and_caches_the_shared_prefixes(vllm_server) -> None:  # type: ignore[no-untyped-def]
    from tuner.measure import measure_phase

    # The CPU build caches in 128-token blocks (GPUs: 16): a shared prefix shorter than a block is never reused.
    workload = parse_workload("in=uniform:200:400,out=normal:12:3,prefix=160x2")
    spec = LoadSpec(
        concurrency=4, num_requests=24, warmup_requests=4, vocab_size=1000, workload=workload, seed=11
    )
    phase = asyncio.run(measure_phase(vllm_server.url, spec))
    meant = list(itertools.islice(make_requests(spec), 24))
    s = phase.load.stats
    assert s.requests_ok == 24
    assert s.prompt_tokens_total == sum(
        len(r.prompt_token_ids) for r in meant
    )  # the server saw these exactly
    assert s.output_tokens_total == sum(r.max_tokens for r in meant)
    assert len({len(r.prompt_token_ids) for r in meant}) > 5
    hits = phase.evidence.prefix_cache_hits
    assert hits is not None and hits >= (24 - 2) * 128  # each prompt's first block comes from the cache


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "chat", "--input-len", "64"], "give --workload or --input-len"),
        (["--workload", "in=5"], "needs both in= and out="),
    ],
)
def test_bench_cli_refuses_a_bad_or_doubled_workload_in_one_line(args: list[str], message: str) -> None:
    from tui.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--endpoint", "http://127.0.0.1:9", *args])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.vllm
def test_bench_with_a_workload_records_it_and_reports_the_prefix_cache(vllm_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "tui.cli", "bench", "--endpoint", vllm_server.url, "--concurrency", "2",
         "--num-requests", "8", "--workload", "in=uniform:200:400,out=8,prefix=160x2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "workload custom: 200-400 (uniform) in, 8 out" in run.stderr
    assert "of the prompt tokens came from vLLM's prefix cache" in run.stdout
    phase = json.loads(out.read_text())["phases"][0]
    assert phase["spec"]["workload"]["prefix"] == {"length": 160, "count": 2}
    assert phase["stats"]["output_tokens_total"] == 8 * 8


def test_every_presets_slo_is_a_known_preset() -> None:
    from tuner.tuning.slo import parse_slo

    for workload in PRESETS.values():
        if workload.slo is not None:
            assert parse_slo(workload.slo).name == workload.slo


def test_sessions_parse_and_size_max_model_len_by_their_context() -> None:
    w = parse_workload("in=lognormal:150:0.5,out=normal:200:40,turns=uniform:2:6,think=1.5,context=4096")
    assert w.sessions == Sessions(Lengths("uniform", 2, 6), 4096, 1.5)
    assert w.longest_sequence == 4096  # six turns of the longest messages and answers would need more
    assert "sessions of 2-6 (uniform) turns up to 4096 tokens, 1.5 s think time" in w.describe()
    short = parse_workload("in=50,out=20,turns=2")
    assert short.longest_sequence == 2 * 70  # two turns fit well inside the default context
    # The mean prompt of a turn: (T+1)/2 messages and (T-1)/2 answers of the history, for T = 4 turns on average.
    assert w.mean_prompt == pytest.approx(2.5 * w.input.mean + 1.5 * 200)
    assert PRESETS["multiturn"].sessions is not None


def test_conversations_follow_the_turn_and_length_distributions_and_open_with_a_prefix() -> None:
    workload = parse_workload("in=uniform:40:80,out=normal:30:5,prefix=16x2,turns=uniform:1:5,think=2")
    spec = LoadSpec(concurrency=2, num_requests=10, vocab_size=1000, workload=workload, seed=5)
    conversations = list(itertools.islice(make_conversations(spec), 2000))
    turns = [len(c.turns) for c in conversations]
    assert _ks(Lengths("uniform", 1, 5), turns) < 0.04
    messages = [len(t.message_ids) for c in conversations for t in c.turns]
    assert _ks(workload.input, messages) < 0.04
    assert {c.turns[0].message_ids[:16] for c in conversations} == {
        r.prompt_token_ids[:16] for r in itertools.islice(make_requests(spec), 200)
    }  # first turns open with the same two prefixes as single requests
    thinks = [t.think_s for c in conversations for t in c.turns[1:]]
    assert all(c.turns[0].think_s == 0 for c in conversations)
    assert sum(thinks) / len(thinks) == pytest.approx(2.0, rel=0.1)
    again = list(itertools.islice(make_conversations(spec), 5))
    assert again == conversations[:5]  # seeded


@pytest.mark.vllm
def test_sessions_send_the_conversation_so_far_with_the_servers_own_answers(vllm_server) -> None:  # type: ignore[no-untyped-def]
    """Each turn's prompt is the previous prompt, the server's answer (its own token ids) and the new message:
    the server counts exactly that, and its prefix cache serves the history (128-token blocks on the CPU build)."""
    from tuner.measure import measure_phase

    workload = parse_workload("in=uniform:100:160,out=normal:40:8,turns=3,context=500")
    # One user: the conversations run one after another, so requests follow the plan in order.
    spec = LoadSpec(concurrency=1, num_requests=9, vocab_size=1000, workload=workload, seed=2)
    phase = asyncio.run(measure_phase(vllm_server.url, spec))
    result = phase.load
    assert result.stand_in_answers == 0  # this vLLM returns the answer's token ids
    requests = sorted(result.requests, key=lambda r: r.index)
    assert len(requests) == 9 and all(r.ok for r in requests), [r.error for r in requests if not r.ok]
    assert all(r.prompt_tokens == r.prompt_len for r in requests)  # the server counted what was sent
    sent = iter(requests)
    for conversation in itertools.islice(make_conversations(spec), 3):
        history = 0
        for turn in conversation.turns:
            r = next(sent)
            assert r.prompt_len == history + len(turn.message_ids)  # the history, then the new message
            assert r.output_tokens == turn.max_tokens
            history = r.prompt_len + (r.output_tokens or 0)
    hits = phase.evidence.prefix_cache_hits
    assert hits is not None and hits >= 6 * 128  # every later turn's first block came from the cache


@pytest.mark.vllm
def test_sessions_under_open_loop_arrivals_keep_the_rate_and_the_counts(vllm_server) -> None:  # type: ignore[no-untyped-def]
    from tuner.loadgen import LoadMode
    from tuner.measure import measure_phase

    workload = parse_workload("in=uniform:40:80,out=8,turns=uniform:1:3,context=400")
    spec = LoadSpec(
        mode=LoadMode.RATE, request_rate_per_s=8.0, concurrency=None, num_requests=None, duration_s=4.0,
        vocab_size=1000, workload=workload, seed=4,
    )  # fmt: skip
    result = asyncio.run(measure_phase(vllm_server.url, spec)).load
    requests = result.requests
    assert requests and all(r.ok for r in requests)
    assert all(r.prompt_tokens == r.prompt_len for r in requests)
    assert max(r.prompt_len for r in requests) > 80  # some conversations went past their first turn
    assert 8.0 * 4.0 * 0.4 < len(requests) < 8.0 * 4.0 * 1.8  # conversations start at rate / mean turns


@pytest.mark.vllm
def test_sessions_under_a_concurrency_cap_send_exactly_the_requests_asked_for(vllm_server) -> None:  # type: ignore[no-untyped-def]
    """The cap holds turns at a gate; the phase's last request being issued must not drop the ones waiting
    there (they were counted), nor keep a user thinking past the phase's end."""
    import time as clock

    from tuner.loadgen import LoadMode
    from tuner.measure import measure_phase

    workload = parse_workload("in=uniform:40:80,out=8,turns=3,context=400")
    spec = LoadSpec(
        mode=LoadMode.RATE, request_rate_per_s=300.0, concurrency=1, num_requests=12, vocab_size=1000,
        workload=workload, seed=6,
    )  # fmt: skip
    result = asyncio.run(measure_phase(vllm_server.url, spec)).load
    assert len(result.requests) == 12 and all(r.ok for r in result.requests)
    assert sorted(r.index for r in result.requests) == list(range(12))
    thinking = parse_workload("in=uniform:40:80,out=8,turns=3,think=60,context=400")
    spec = LoadSpec(
        concurrency=2, num_requests=None, duration_s=2.0, vocab_size=1000, workload=thinking, seed=1
    )
    started = clock.monotonic()
    asyncio.run(measure_phase(vllm_server.url, spec))
    assert clock.monotonic() - started < 20  # not the 60 s a user thinks: the phase ended at its 2 s


def test_a_workload_is_kept_within_the_servers_context(tmp_path: Path) -> None:
    from tuner.loadgen.workload import fit_to_context

    sessions = parse_workload("in=100,out=20,turns=uniform:2:8,context=8192")
    fitted, note = fit_to_context(sessions, 512)
    assert fitted.sessions is not None and fitted.sessions.context == 512 and "end within" in note
    assert fit_to_context(sessions, 100_000) == (sessions, "")
    with pytest.raises(WorkloadError, match="512-token context"):
        fit_to_context(parse_workload("in=600,out=20,turns=2"), 512)
    rows = [{"time_s": i, "input_length": 100 if i % 3 else 900, "output_length": 10} for i in range(9)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    trace, note = fit_to_context(parse_workload(str(path)), 512)
    assert trace.trace is not None and len(trace.trace.rows) == 6 and trace.longest_sequence == 110
    assert note.startswith("3 trace requests longer than")
    drawn, note = fit_to_context(parse_workload("in=uniform:100:900,out=10"), 512)
    assert drawn.fit_within == 512 and drawn.longest_sequence == 512
    # Uniform 100-900 within 512 - 10: 403 of 801 values fit, so about half the draws are drawn again (the line
    # says so from a seeded sample), and the prompts' mean falls from 500 to 301.
    assert note.startswith(
        "requests longer than the server's 512-token context are drawn again (about 48.5 %"
    )
    assert "prompts mean 494 -> 300 tokens, p99 892 -> 499; answers mean 10 -> 10" in note
    first_turns, note = fit_to_context(parse_workload("in=uniform:100:900,out=10,turns=2,context=2048"), 512)
    assert first_turns.sessions is not None and first_turns.sessions.context == 512
    assert note.startswith("conversations end within the server's 512-token context; first turns longer than")


def test_draws_truncated_to_a_context_are_the_draws_that_fit_in_order() -> None:
    """Drawn within a context, a workload's requests are exactly those of its unfitted draws that fit, in the
    same order (the same seed, the same generator): a truncated distribution, deterministic by seed."""
    chat = PRESETS["chat"]
    fitted = dataclasses.replace(chat, fit_within=1024)
    raw = random.Random(5)
    fitting = []
    while len(fitting) < 500:
        d = chat.draw(raw)
        assert d.redrawn == 0  # nothing is redrawn without a context
        if d.input_len + d.output_len <= 1024:
            fitting.append((d.input_len, d.output_len, d.prefix))
    rng = random.Random(5)
    draws = [fitted.draw(rng) for _ in range(500)]
    assert [(d.input_len, d.output_len, d.prefix) for d in draws] == fitting
    assert (
        sum(d.redrawn for d in draws) > 50
    )  # chat's lognormal prompts often outgrow 1024 with their answers
    spec = LoadSpec(concurrency=4, num_requests=10, vocab_size=1000, workload=fitted, seed=2)
    sent = list(itertools.islice(make_requests(spec), 400))
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 1024 for r in sent)
    assert sent == list(itertools.islice(make_requests(spec), 400))  # deterministic by seed
    assert sum(r.redrawn for r in sent) > 0


def test_a_workload_without_a_context_draws_as_it_always_did() -> None:
    """The draw order (input, output, then the prefix) is unchanged: a seed gives the prompts it gave before."""
    chat = PRESETS["chat"]
    assert chat.prefix is not None
    rng, same = random.Random(9), random.Random(9)
    for _ in range(200):
        d = chat.draw(rng)
        input_len, output_len = chat.input.draw(same), chat.output.draw(same)
        prefix = same.randrange(chat.prefix.count)
        assert (d.input_len, d.output_len, d.prefix) == (
            max(input_len, chat.prefix.length + 1),
            output_len,
            prefix,
        )


def test_a_draw_that_keeps_missing_is_cut_to_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.loadgen import workload as module

    monkeypatch.setattr(module, "MAX_REDRAWS", 0)
    fitted = dataclasses.replace(
        parse_workload("in=uniform:100:900,out=uniform:10:300,prefix=50x2"), fit_within=300
    )
    rng = random.Random(1)
    draws = [fitted.draw(rng) for _ in range(300)]
    assert all(d.input_len + d.output_len <= 300 and d.input_len > 50 and d.output_len >= 1 for d in draws)
    assert any(d.redrawn == 0 and d.input_len + d.output_len == 300 for d in draws)  # the cut ones


def test_a_context_that_almost_nothing_fits_is_refused() -> None:
    from tuner.loadgen.workload import fit_to_context

    with pytest.raises(
        WorkloadError, match=r"only 0\.\d % of the workload's requests fit the server's 300-token"
    ):
        fit_to_context(parse_workload("in=uniform:100:30000,out=10"), 300)
    with pytest.raises(WorkloadError, match="no request fits a 40-token context"):
        dataclasses.replace(parse_workload("in=100,out=10,prefix=50x1"), fit_within=40)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    ["input", "output", "prefix", "turns", "context", "think_s", "name", "slo", "kind", "a", "b"]
)


@given(document=st.dictionaries(_FIELDS, _JSON, max_size=6) | _JSON)
def test_any_workload_file_is_a_workload_or_one_line(
    tmp_path_factory: pytest.TempPathFactory, document: object
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.json"
    path.write_text(json.dumps(document), encoding="utf-8", errors="surrogatepass")
    try:
        workload = parse_workload(str(path))
    except WorkloadError as exc:
        assert "\n" not in str(exc)
    else:
        assert workload.longest_sequence >= 1
