"""Trace replay: Mooncake-format JSONL read with one-line errors, prompts built from hash-id blocks (equal ids,
equal blocks), and against the CPU build of vLLM the trace's arrival pattern replayed at the rate asked for,
its lengths counted exactly by the server and its shared blocks served by the prefix cache."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"timestamp": 0, "input_length": 10}], "t.jsonl:1: needs input_length and output_length"),
        ([{"input_length": 10, "output_length": 3}], "t.jsonl:1: no arrival time"),
        ([{"timestamp": 0, "input_length": 10, "output_length": 3}], "at least two requests"),
        ([{"timestamp": 5, "input_length": 10, "output_length": 3}] * 2, "at the same time"),
        (
            [
                {"timestamp": 0, "input_length": 100, "output_length": 3, "hash_ids": [1, 2]},
                {"timestamp": 9, "input_length": 10, "output_length": 3},
            ],
            "t.jsonl:1: 2 blocks of 512 tokens do not fit a 100-token prompt",
        ),
        ([{"timestamp": "soon", "input_length": 1, "output_length": 1}], "'timestamp' must be a number"),
    ],
)
def test_a_bad_trace_is_one_line_naming_the_line(
    tmp_path: Path, rows: list[dict[str, object]], message: str
) -> None:
    path = _write(tmp_path / "t.jsonl", rows)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert "\n" not in str(info.value)
    is_trace = "timestamp" in rows[0] or "time_s" in rows[0]  # else the file reads as a dataset of prompts
    with pytest.raises(WorkloadError, match=message if is_trace else 'needs "prompt"'):
        parse_workload(str(path))


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
