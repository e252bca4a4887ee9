"""SLO presets, spec parsing, and judging phase statistics from the real load generator's aggregation."""

from __future__ import annotations

import pytest

from tuner.loadgen import PhaseStats, RequestResult, compute_stats
from tuner.tuning.slo import JUDGED_AT, PRESETS, Slo, SloError, check, parse_slo


def _request(
    index: int, ttft_s: float, tpot_s: float, output_tokens: int = 11, error: str | None = None
) -> RequestResult:
    e2e_s = ttft_s + tpot_s * (output_tokens - 1)
    return RequestResult(
        index=index,
        start_s=0.0,
        duration_s=e2e_s,
        prompt_len=16,
        max_tokens=output_tokens,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        itl_s=(tpot_s,) * (output_tokens - 1),
        output_tokens=None if error else output_tokens,
        prompt_tokens=16,
        chunks=output_tokens,
        error_kind=error,
        error="boom" if error else None,
    )


def _stats(ttft_s: float, tpot_s: float, *, n_ok: int = 100, n_failed: int = 0) -> PhaseStats:
    """Stats computed by the load generator itself from ``n_ok`` identical requests (+ failures)."""
    results = [_request(i, ttft_s, tpot_s) for i in range(n_ok)]
    results += [_request(n_ok + i, ttft_s, tpot_s, error="connection_closed") for i in range(n_failed)]
    return compute_stats(results, wall_s=10.0)


def test_mlperf_presets_match_the_reference_table() -> None:
    server = PRESETS["mlperf-llama3.1-8b-server"]
    assert server.ttft_p95_max_s == 2.0
    assert server.tok_s_per_user_min == pytest.approx(10.0)
    interactive = PRESETS["mlperf-llama3.1-8b-interactive"]
    assert interactive.ttft_p95_max_s == 0.5
    assert interactive.tpot_p95_max_s == pytest.approx(0.030)  # exact MLPerf TPOT, i.e. 33.3 tok/s
    assert PRESETS["mlperf-llama2-70b-server"].tpot_p95_max_s == pytest.approx(0.200)
    assert PRESETS["mlperf-llama2-70b-interactive"].ttft_p95_max_s == 0.45
    assert PRESETS["mlperf-llama2-70b-interactive"].tpot_p95_max_s == pytest.approx(0.040)
    for floor in (30, 100, 300):
        tier = PRESETS[f"aa-{floor}"]
        assert tier.tok_s_per_user_min == floor
        assert tier.ttft_p95_max_s is not None
        assert "our choice" in tier.source or "infertop's choice" in tier.source
    assert all(slo.error_rate_max == 0.01 and slo.judged_at == JUDGED_AT == "p95" for slo in PRESETS.values())


def test_parse_preset_and_custom_spec() -> None:
    assert parse_slo("mlperf-llama3.1-8b-interactive") == PRESETS["mlperf-llama3.1-8b-interactive"]
    custom = parse_slo("ttft=0.5,tps=30,err=0.02")
    assert (custom.ttft_p95_max_s, custom.tok_s_per_user_min, custom.error_rate_max) == (0.5, 30.0, 0.02)
    assert parse_slo("ttft=500ms, tpot=25ms").tok_s_per_user_min == pytest.approx(40.0)
    assert parse_slo("ttft=500ms").ttft_p95_max_s == pytest.approx(0.5)
    assert parse_slo("tps=20,err=2%").error_rate_max == pytest.approx(0.02)
    overridden = parse_slo("aa-100,ttft=1")
    assert (overridden.ttft_p95_max_s, overridden.tok_s_per_user_min) == (1.0, 100.0)
    assert overridden.name.startswith("aa-100")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mlperf-llama9", "unknown SLO preset"),
        ("ttft=fast", "ttft=fast"),
        ("latency=3", "unknown SLO key"),
        ("err=0.01", "needs a latency limit"),
        ("ttft", "unknown SLO preset"),
        ("tps=-3", "> 0"),
        ("ttft=1,err=1.5", "[0, 1)"),
        ("", "empty SLO"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(SloError, match=message.replace("[", r"\[").replace(")", r"\)")) as info:
        parse_slo(spec)
    assert "\n" not in str(info.value)


def test_check_passes_with_margins() -> None:
    slo = Slo("t", ttft_p95_max_s=0.5, tok_s_per_user_min=20.0)
    verdict = check(slo, _stats(ttft_s=0.4, tpot_s=0.040))  # 25 tok/s per user
    assert verdict.passed and verdict.reasons == ()
    assert verdict.ttft_margin == pytest.approx(0.2)
    assert verdict.tok_s_margin == pytest.approx(0.25)
    assert verdict.margin == pytest.approx(0.2)


def test_check_names_each_failed_limit() -> None:
    slo = Slo("t", ttft_p95_max_s=0.5, tok_s_per_user_min=33.3)
    verdict = check(slo, _stats(ttft_s=0.82, tpot_s=0.050, n_ok=97, n_failed=3))
    assert not verdict.passed
    text = " | ".join(verdict.reasons)
    assert "TTFT p95 0.82 s > 0.50 s" in text
    assert "per-user speed 20.0 tok/s (TPOT p95 50.0 ms) < 33.3 tok/s" in text
    assert "error rate 3.0 % (3 of 100 requests failed) > 1 %" in text
    assert verdict.ttft_margin is not None and verdict.ttft_margin < 0


def test_check_judges_the_p95_not_the_median() -> None:
    # 90 fast requests and 10 slow ones: the median passes, the p95 does not.
    results = [_request(i, 0.1, 0.01) for i in range(90)] + [_request(90 + i, 3.0, 0.01) for i in range(10)]
    stats = compute_stats(results, wall_s=10.0)
    assert stats.ttft_p50_s is not None and stats.ttft_p50_s < 0.5
    assert not check(Slo("t", ttft_p95_max_s=0.5, tok_s_per_user_min=None), stats).passed


def test_check_fails_when_nothing_was_measured() -> None:
    slo = PRESETS["aa-30"]
    all_failed = _stats(0.1, 0.01, n_ok=0, n_failed=5)
    verdict = check(slo, all_failed)
    assert not verdict.passed
    assert any("no TTFT measured" in r for r in verdict.reasons)
    empty = compute_stats([], wall_s=1.0)
    assert check(slo, empty).reasons == ("no request finished in this phase",)


def test_slo_round_trips_through_a_dict() -> None:
    slo = parse_slo("mlperf-llama2-70b-server,err=0.05")
    assert Slo.from_dict(slo.to_dict()) == slo
    assert "TTFT p95 <= 2.00 s" in slo.describe() and "errors <= 5 %" in slo.describe()


def test_tokens_arriving_all_at_once_meet_the_per_user_floor() -> None:
    # A busy server can flush every token of a request in one chunk: TPOT is 0, not "unmeasured".
    from dataclasses import replace

    stats = _stats_for_burst()
    verdict = check(parse_slo("ttft=1,tps=30"), stats)
    assert verdict.passed, verdict.reasons
    assert not check(parse_slo("ttft=1,tps=30"), replace(stats, tpot_p95_s=None)).passed


def _stats_for_burst():  # type: ignore[no-untyped-def]
    from tuner.loadgen import PhaseStats

    return PhaseStats(
        requests_ok=10, requests_failed=0, requests_cancelled=0, requests_short=0, output_tokens_total=160,
        prompt_tokens_total=320, wall_s=1.0, output_tokens_per_s=160.0, requests_per_s=10.0, max_in_flight=2,
        ttft_p95_s=0.2, tpot_p95_s=0.0,
    )  # fmt: skip
