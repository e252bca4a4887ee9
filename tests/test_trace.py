"""Trace replay: Mooncake-format JSONL read with bad lines left out and counted (a file of none is one line),
prompts built from hash-id blocks (equal ids, equal blocks), and against the CPU build of vLLM the trace's
arrival pattern replayed at the rate asked for, its lengths counted exactly by the server and its shared
blocks served by the prefix cache."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tuner.loadgen import LoadMode, LoadSpec
from tuner.loadgen.spec import make_requests
from tuner.loadgen.trace import Trace, TraceError, load_trace, trace_prompts
from tuner.loadgen.workload import WorkloadError, parse_workload


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _bursty(path: Path, bursts: int = 4, per_burst: int = 6, every_ms: int = 2000) -> Path:
    """Bursts of requests at the same instant, ``every_ms`` apart; the first two blocks shared by all."""
    rows = []
    for b in range(bursts):
        for i in range(per_burst):
            rows.append(
                {"timestamp": b * every_ms + i, "input_length": 300, "output_length": 8,
                 "hash_ids": [1, 2, 100 + b * per_burst + i], "block_tokens": 128}
            )  # fmt: skip
    return _write(path, rows)


def test_a_mooncake_trace_reads_with_its_rate_and_shared_blocks(tmp_path: Path) -> None:
    trace = load_trace(_bursty(tmp_path / "t.jsonl"))
    assert len(trace.rows) == 24 and trace.span_s == pytest.approx(6.005)
    assert trace.rate_per_s == pytest.approx(23 / 6.005)
    assert trace.shared_blocks == 2
    gaps = trace.gaps()
    assert gaps[1] == pytest.approx(0.001) and gaps[6] == pytest.approx(1.995)
    w = parse_workload(str(tmp_path / "t.jsonl"))
    assert w.trace == trace and w.longest_sequence == 308 and w.input.mean == 300
    assert "24 requests over 6 s" in w.describe()


def test_prompts_share_the_blocks_their_hash_ids_name_and_keep_their_lengths(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"time_s": 0.0, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"time_s": 0.5, "input_length": 700, "output_length": 6, "hash_ids": [7, 3]},
        {"time_s": 1.0, "input_length": 40, "output_length": 7},
    ]
    trace: Trace = load_trace(_write(tmp_path / "t.jsonl", rows))
    a, b, c = itertools.islice(trace_prompts(trace, seed=0, low_id=100, high_id=900), 3)
    by_len = {len(p[0]): p for p in (a, b, c)}
    first, second = by_len[1100][0], by_len[700][0]
    assert first[:512] == second[:512]  # hash 7: the same block
    assert first[512:700] != second[512:700]  # hashes 8 and 3 differ
    assert {len(p[0]) for p in (a, b, c)} == {1100, 700, 40} and {p[1] for p in (a, b, c)} == {5, 6, 7}
    other = list(itertools.islice(trace_prompts(trace, seed=1, low_id=100, high_id=900), 3))
    assert {p[0][:512] for p in other}.isdisjoint({first[:512]})  # another phase: its own blocks


GOOD = [
    {"timestamp": 0, "input_length": 10, "output_length": 3},
    {"timestamp": 9, "input_length": 20, "output_length": 4},
]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"timestamp": 0, "input_length": 10}', "needs input_length and output_length >= 1"),
        ('{"input_length": 10, "output_length": 3}', "no arrival time"),
        (
            '{"timestamp": 0, "input_length": 100, "output_length": 3, "hash_ids": [1, 2]}',
            "2 blocks of 512 tokens do not fit a 100-token prompt",
        ),
        (
            '{"timestamp": "soon", "input_length": 1, "output_length": 1}',
            "'timestamp' must be a number, got str",
        ),
        (
            '{"timestamp": NaN, "input_length": 1, "output_length": 1}',
            "'timestamp' must be a finite number >= 0, got nan",
        ),
        (
            '{"time_s": Infinity, "input_length": 1, "output_length": 1}',
            "'time_s' must be a finite number >= 0, got inf",
        ),
        (
            '{"time_s": 1e999, "input_length": 1, "output_length": 1}',
            "'time_s' must be a finite number >= 0, got inf",
        ),
        (
            '{"time_s": -1, "input_length": 1, "output_length": 1}',
            "'time_s' must be a finite number >= 0, got -1",
        ),
        (
            '{"time_s": 1' + "0" * 400 + ', "input_length": 1, "output_length": 1}',
            "must be a finite number >= 0",
        ),
        ('{"time_s": 1, "input_length": NaN, "output_length": 1}', "must be a finite number >= 0, got nan"),
        (
            '{"time_s": 1, "input_length": 2.5, "output_length": 1}',
            "'input_length' must be a whole number of tokens",
        ),
        (
            '{"time_s": 1, "input_length": 0, "output_length": 1}',
            "'input_length' must be a whole number of tokens",
        ),
        ('{"time_s": 1, "input_length": 1e12, "output_length": 1}', "from 1 to 10,000,000"),
        (
            '{"time_s": 1, "input_len": 5, "output_len": 1, "block_tokens": 0.5}',
            "'block_tokens' must be a whole",
        ),
        (
            '{"time_s": 1, "input_length": 5, "output_length": 1, "hash_ids": [true]}',
            "'hash_ids' must be a list",
        ),
        (
            '{"time_s": 1, "input_length": 5, "output_length": 1, "hash_ids": [1e99]}',
            "'hash_ids' must be a list",
        ),
        (
            '{"time_s": 1, "input_length": 5, "output_length": 1, "hash_ids": "12"}',
            "'hash_ids' must be a list",
        ),
        ("[1, 2]", "a trace line is one JSON object"),
        ("{nope", "not JSON"),
        ("[" * 100_000, "not JSON"),  # nested past the stack
        ('{"time_s": 1, "input_length": 5, "output_length": ' + "9" * 5000 + "}", "not JSON"),
    ],
)
def test_a_bad_trace_line_is_left_out_and_counted(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "t.jsonl"
    good = [json.dumps(r) for r in GOOD]
    path.write_text("\n".join([good[0], line, good[1]]))
    trace = load_trace(path)
    assert len(trace.rows) == 2 and trace.skipped == 1
    assert trace.skip_reason.startswith("line 2: ") and reason in trace.skip_reason
    assert "; 1 line left out, the first at line 2: " in trace.describe() and reason in trace.describe()
    assert parse_workload(str(path)).trace == trace
    path.write_text(line + "\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: a trace needs at least two requests to have a rate (1 line left out, "
    )
    assert reason in message and "\n" not in message and len(message) < 400


def test_a_line_not_in_utf8_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    good = [json.dumps(r).encode() for r in GOOD]
    path.write_bytes(
        b"\n".join([good[0], b'{"time_s": 1, "input_length": 5, "output_length": 1, "x": "\xff"}', good[1]])
    )
    trace = load_trace(path)
    assert trace.skipped == 1 and trace.skip_reason.startswith("line 2: not JSON ('utf-8' codec can't decode")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"timestamp": 0, "input_length": 10, "output_length": 3}], "at least two requests"),
        ([{"timestamp": 5, "input_length": 10, "output_length": 3}] * 2, "at the same time"),
    ],
)
def test_a_trace_without_a_rate_is_one_line(
    tmp_path: Path, rows: list[dict[str, object]], message: str
) -> None:
    path = _write(tmp_path / "t.jsonl", rows)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert "\n" not in str(info.value)
    with pytest.raises(WorkloadError, match=message):
        parse_workload(str(path))


def test_a_trace_file_too_large_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.loadgen import trace

    monkeypatch.setattr(trace, "MAX_FILE_BYTES", 100)
    with pytest.raises(TraceError, match="is not read"):
        load_trace(_write(tmp_path / "t.jsonl", GOOD * 10))


def test_requests_follow_the_trace_in_order_from_a_seeded_row(tmp_path: Path) -> None:
    w = parse_workload(str(_bursty(tmp_path / "t.jsonl")))
    spec = LoadSpec(concurrency=2, num_requests=10, vocab_size=1000, workload=w, seed=3)
    sent = list(itertools.islice(make_requests(spec), 48))
    assert all(len(r.prompt_token_ids) == 300 and r.max_tokens == 8 for r in sent)
    assert len({r.prompt_token_ids[:256] for r in sent}) == 1  # hash ids 1 and 2 open every prompt
    assert len({r.prompt_token_ids[256:] for r in sent[:24]}) == 24  # the third block is each request's own


@pytest.mark.vllm
def test_the_trace_replays_its_bursts_at_the_rate_asked_for(vllm_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tuner.measure import measure_phase

    w = parse_workload(str(_bursty(tmp_path / "t.jsonl", bursts=4, per_burst=6, every_ms=2000)))
    rate = 2 * w.trace.rate_per_s  # type: ignore[union-attr]
    spec = LoadSpec(
        mode=LoadMode.RATE, request_rate_per_s=rate, concurrency=None, num_requests=18, vocab_size=1000,
        workload=w, seed=0,
    )  # fmt: skip
    phase = asyncio.run(measure_phase(vllm_server.url, spec))
    requests = sorted(phase.load.requests, key=lambda r: r.start_s)
    assert len(requests) == 18 and all(r.ok for r in requests)
    assert all(r.prompt_tokens == 300 and r.output_tokens == 8 for r in requests)
    # Twice the trace's rate: bursts 1 s apart instead of 2, requests within a burst together (18 requests from
    # a seeded row of 24: two or three bursts' edges fall inside).
    gaps = [b.start_s - a.start_s for a, b in itertools.pairwise(requests)]
    long_gaps = [g for g in gaps if g > 0.3]
    assert len(long_gaps) in (2, 3) and all(0.8 < g < 1.3 for g in long_gaps), gaps
    assert sum(g for g in gaps if g <= 0.3) < 0.3
    hits = phase.evidence.prefix_cache_hits
    assert hits is not None and hits >= (18 - 1) * 256  # the two shared blocks came from the cache


# --- fuzzing: any file into the loader, a trace of finite, in-range rows or one clear error ------------------

_NUMBERS = (
    st.integers(min_value=-3, max_value=3000)
    | st.integers()
    | st.floats()
    | st.booleans()
    | st.none()
    | st.text(max_size=4)
    | st.lists(st.integers(min_value=-3, max_value=3000) | st.booleans() | st.floats(), max_size=4)
)
_FIELDS = st.sampled_from(
    [
        "timestamp",
        "time_s",
        "input_length",
        "input_len",
        "output_length",
        "output_len",
        "hash_ids",
        "block_tokens",
    ]
)


def _mostly(plausible: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """A plausible value nine times in ten, anything at all the tenth."""
    return st.integers(0, 9).flatmap(lambda k: plausible if k else _NUMBERS)


_ROWS = st.fixed_dictionaries(
    {
        "time_s": _mostly(st.floats(min_value=0, max_value=1000)),
        "input_length": _mostly(st.integers(min_value=1, max_value=3000)),
        "output_length": _mostly(st.integers(min_value=1, max_value=50)),
    },
    optional={
        "hash_ids": _mostly(st.lists(st.integers(min_value=0, max_value=20), max_size=3)),
        "block_tokens": _mostly(st.integers(min_value=1, max_value=600)),
    },
) | st.dictionaries(_FIELDS, _NUMBERS, max_size=6)
_LINES = (
    _ROWS.map(json.dumps) | st.text(max_size=30) | st.binary(max_size=30).map(lambda b: b.decode("latin-1"))
)


@given(lines=st.lists(_LINES, max_size=8))
def test_any_trace_file_loads_or_fails_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str]
) -> None:
    from tuner.loadgen.trace import MAX_TOKENS

    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        trace = load_trace(path)
    except TraceError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
    else:
        event("a trace")
        assert len(trace.rows) >= 2 and trace.span_s > 0 and math.isfinite(trace.rate_per_s)
        for row in trace.rows:
            assert math.isfinite(row.arrival_s) and row.arrival_s >= 0
            assert (
                1 <= row.input_len <= MAX_TOKENS
                and 1 <= row.output_len <= MAX_TOKENS
                and row.block_tokens >= 1
            )
        if max(r.input_len for r in trace.rows) < 100_000:
            for prompt, max_tokens, gap_s in itertools.islice(
                trace_prompts(trace, 0, 100, 900), len(trace.rows)
            ):
                assert 1 <= len(prompt) <= MAX_TOKENS and max_tokens >= 1 and math.isfinite(gap_s)
    try:
        parse_workload(str(path))
    except WorkloadError as exc:
        assert "\n" not in str(exc)
