"""Tuner decisions that need no server: phase sizing, labels, refusing to overwrite a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.slo import parse_slo
from tuner.space import Candidate
from tuner.tinymodel import write_tiny_model
from tuner.tune import TuneConfig, TuneError, Tuner


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
