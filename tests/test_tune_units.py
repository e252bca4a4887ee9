"""Tuner decisions that need no server: phase sizing, labels, refusing to overwrite a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tuner.serving.tinymodel import write_tiny_model
from tuner.tuning.slo import parse_slo
from tuner.tuning.space import Candidate
from tuner.tuning.tune import TuneConfig, TuneError, Tuner


@pytest.fixture
def tuner(tmp_path: Path) -> Tuner:
    model = write_tiny_model(tmp_path / "m")
    config = TuneConfig(
        model=str(model),
        slo=parse_slo("ttft=1,tps=10"),
        pins={"max_model_len": 512},
        min_requests=16,
        requests_per_stream=4,
        min_phase_s=10.0,
        store_path=tmp_path / "t.sqlite",
        out_dir=tmp_path / "out",
        gpus=False,
    )
    return Tuner(config)


def test_phases_last_at_least_min_phase_s_at_the_pace_last_seen(tuner: Tuner) -> None:
    assert tuner.phase_requests(8) == 32  # nothing measured yet: the floor
    tuner._last_rate = (8, 20.0)  # 20 requests/s at 8 users
    assert tuner.phase_requests(8) == 200  # 10 s at 20 req/s
    assert tuner.phase_requests(16) == 400  # twice the users: up to twice the pace
    tuner._last_rate = (8, 0.5)
    assert tuner.phase_requests(8) == 32  # slow server: the floor still holds


def test_the_baseline_is_labelled_as_vllm_defaults(tuner: Tuner) -> None:
    assert tuner.label(Candidate(max_model_len=512)) == "vLLM defaults (len 512)"
    assert tuner.label(Candidate(max_model_len=512, max_num_seqs=8)) == "seqs 8, len 512"


def test_no_gpu_means_the_cpu_build(tuner: Tuner) -> None:
    assert tuner.hardware.is_cpu and "CPU" in tuner.hardware_label


def test_an_existing_store_is_not_overwritten_without_resume(tuner: Tuner) -> None:
    tuner.config.store_path.write_text("")
    with pytest.raises(TuneError, match="--resume"):
        tuner.run()


def test_a_value_vllm_refuses_is_not_tried_again_with_other_settings(tuner: Tuner, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tuner.tuning.search import PointResult
    from tuner.tuning.store import TrialStatus
    from tuner.tuning.tune import TrialOutcome

    tuner.space.values["quantization"] = (None, "fp8")  # type: ignore[index]
    tuner.space.values["max_num_seqs"] = (8, 32)  # type: ignore[index]
    tuner.explicit = {"quantization", "max_num_seqs"}
    launched: list[Candidate] = []

    def fake_trial(store, candidate, why):  # type: ignore[no-untyped-def]
        launched.append(candidate)
        if candidate.quantization == "fp8":
            reason = "vLLM failed to start (unsupported option): fp8 is not supported here"
            return TrialOutcome(candidate, TrialStatus.FAILED, reason, failure_kind="unsupported_option")
        summary = {"evidence": {}, "bound": {"kind": "engine"}}
        tok_s = 10_000.0 / (candidate.max_num_seqs or 128)  # smaller batches win: the incumbent moves
        return TrialOutcome(candidate, TrialStatus.FEASIBLE, "ok", [PointResult(16, True, tok_s, summary)])

    monkeypatch.setattr(tuner, "_trial", fake_trial)
    monkeypatch.setattr(tuner, "_finish", lambda *a, **k: {})
    tuner.config = dataclasses.replace(tuner.config, launch_budget=5)
    tuner.run()
    fp8 = [c for c in launched if c.quantization == "fp8"]
    assert len(fp8) == 1  # refused once, never combined with another setting afterwards
    assert len(launched) >= 3
