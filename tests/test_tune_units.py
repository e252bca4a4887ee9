"""Tuner decisions that need no server: phase sizing, labels, the vocabulary, ties, refusing to overwrite a run."""

from __future__ import annotations

import dataclasses
import random
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
        min_phase_s=10.0,
        store_path=tmp_path / "t.sqlite",
        out_dir=tmp_path / "out",
        gpus=False,
    )
    return Tuner(config)


class _Server:
    pid = None
    url = "http://127.0.0.1:1"
    startup_s = 1.0


def test_phases_last_at_least_min_phase_s_at_the_pace_last_seen(tuner: Tuner) -> None:
    from tuner.tuning.points import Load
    from tuner.tuning.runner import Session

    session = Session(tuner.runner(), _Server(), "k")  # type: ignore[arg-type]
    floor = tuner.runner().plan.min_requests  # enough for a p95 to be bounded, with room for the ramp
    assert session.requests_for(Load.users(8), "judged") == floor  # nothing measured yet: the floor
    assert session.requests_for(Load.users(8), "scout") == 32  # a scout: four requests per user
    assert session.requests_for(Load.rate(20.0), "judged") == 200  # 10 s at 20 req/s
    session._pace = (Load.users(8), 20.0)  # 20 requests/s at 8 users
    assert session.requests_for(Load.users(16), "judged") == 400  # twice the users: up to twice the pace
    assert session.requests_for(Load.rate(3.0), "production") == 3 * 59  # 3 x 30 s = 90 < three p95s' worth
    session._pace = (Load.users(8), 0.5)
    assert session.requests_for(Load.users(8), "judged") == floor  # a slow server: the floor still holds
    session._e2e_s = 8.0  # long requests: a phase must cover three request times to have a steady part
    assert session.requests_for(Load.rate(14.5), "judged") == 348  # 14.5 req/s x 24 s, not x 10 s
    assert session.requests_for(Load.rate(14.5), "production") == 435  # 30 s already covers three


def test_prompt_token_ids_stay_inside_the_models_vocabulary(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "small-vocab", vocab_size=513)
    config = TuneConfig(model=str(model), slo=parse_slo("ttft=1"), store_path=tmp_path / "s", gpus=False)
    assert Tuner(config).runner().plan.vocab_size == 513
    assert Tuner(dataclasses.replace(config, vocab_size=300)).runner().plan.vocab_size == 300


def test_the_baseline_is_labelled_as_vllm_defaults(tuner: Tuner) -> None:
    assert tuner.label(Candidate(max_model_len=512)) == "vLLM defaults (len 512)"
    assert tuner.label(Candidate(max_model_len=512, max_num_seqs=8)) == "seqs 8, len 512"


def test_no_gpu_means_the_cpu_build(tuner: Tuner) -> None:
    assert tuner.hardware.is_cpu and "CPU" in tuner.hardware_label


def test_an_existing_store_is_not_overwritten_without_resume(tuner: Tuner) -> None:
    tuner.config.store_path.write_text("")
    with pytest.raises(TuneError, match="--resume"):
        tuner.run()


def _capacity(rate: float, hi: float | None = None):  # type: ignore[no-untyped-def]
    import dataclasses as dc

    from tuner.tuning.capacity import summarise
    from tuner.tuning.points import RATE, Load, Point, empty_steady

    phase = {"evidence": {"requests_running_mean": 4.0}, "bound": {"kind": "engine"}}  # 4 in the batch
    steady = dc.replace(empty_steady(), output_tokens_per_s=rate * 32, requests_per_s=rate)
    points = [Point(Load.rate(rate), "judged", "pass", steady, phases=(phase,))]
    if hi is not None:
        points.append(
            Point(Load.rate(hi), "judged", "fail", steady, ("TTFT p95 2 s > 1 s",), phases=(phase,))
        )
    return summarise(RATE, points)


def _fake_search(tuner: Tuner, monkeypatch, capacities):  # type: ignore[no-untyped-def]
    from tuner.tuning.store import TrialStatus
    from tuner.tuning.tune import TrialOutcome

    launched: list[Candidate] = []

    def fake_trial(store, candidate, why, incumbent, placement=None):  # type: ignore[no-untyped-def]
        launched.append(candidate)
        if candidate.quantization == "fp8":
            reason = "vLLM failed to start (unsupported option): fp8 is not supported here"
            return TrialOutcome(candidate, TrialStatus.FAILED, reason, failure_kind="unsupported_option")
        return TrialOutcome(candidate, TrialStatus.FEASIBLE, "ok", capacities(candidate))

    monkeypatch.setattr(tuner, "_trial", fake_trial)
    return launched


def test_a_value_vllm_refuses_is_not_tried_again_with_other_settings(tuner: Tuner, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tuner.space.values["quantization"] = (None, "fp8")  # type: ignore[index]
    tuner.space.values["max_num_seqs"] = (8, 32)  # type: ignore[index]
    tuner.explicit = {"quantization", "max_num_seqs"}
    # Smaller batches win clearly (each one held what the larger failed at): the incumbent moves.
    launched = _fake_search(
        tuner,
        monkeypatch,
        lambda c: _capacity(100.0 / (c.max_num_seqs or 128), 110.0 / (c.max_num_seqs or 128)),
    )
    tuner.config = dataclasses.replace(tuner.config, launch_budget=5, prove=False)
    tuner.run()
    fp8 = [c for c in launched if c.quantization == "fp8"]
    assert len(fp8) == 1  # refused once, never combined with another setting afterwards
    assert len(launched) >= 3


def test_a_tie_keeps_the_configuration_closer_to_the_defaults(tuner: Tuner, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tuner.tuning import events as ev

    tuner.space.values["max_num_seqs"] = (8, 32)  # type: ignore[index]
    tuner.explicit = {"max_num_seqs"}
    # The defaults hold 2.5 req/s (2.8 failed); seqs 8 holds 2.7 (3.0 failed): within each other's bracket.
    _fake_search(
        tuner, monkeypatch, lambda c: _capacity(2.7, 3.0) if c.max_num_seqs == 8 else _capacity(2.5, 2.8)
    )
    tuner.config = dataclasses.replace(tuner.config, launch_budget=3, prove=False)
    seen: list[ev.TuneEvent] = []
    result = tuner.run(seen.append)
    assert result.winner == tuner.space.baseline()  # not seqs 8, despite its higher point estimate
    assert result.report["ties"] and "tie" in result.report["ties"][0]
    assert result.headline.startswith("UNVERIFIED (--no-prove): vLLM defaults")
    assert result.exit_code == 0


@pytest.mark.vllm
def test_a_dataset_is_tokenised_before_any_launch_and_sizes_max_model_len(
    tmp_path: Path, vllm_python: Path
) -> None:
    """With the tokenizer vLLM loads (run by the vLLM environment's python), before any server starts: the
    longest conversation that fits the model sets max-model-len; longer ones are left out, and the run says so."""
    from tuner.loadgen.workload import parse_workload
    from tuner.serving.launcher import api_server_command

    model = write_tiny_model(tmp_path / "m")  # 2,048 positions: the sample's longest conversations do not fit
    base = TuneConfig(
        model=str(model), slo=parse_slo("ttft=2"), workload=parse_workload("chat-sample"),
        command=api_server_command(vllm_python), store_path=tmp_path / "t.sqlite", out_dir=tmp_path / "o",
        gpus=False,
    )  # fmt: skip
    tuner = Tuner(base)
    workload = tuner.config.workload
    assert workload is not None and not workload.needs_tokens and workload.sessions is not None
    longest = workload.longest_sequence
    assert longest <= 2048 and tuner.config.pins["max_model_len"] == longest
    assert "conversations longer than the model's 2048-token context left out" in tuner.workload_note
    assert tuner.config.input_len == round(workload.mean_prompt) > workload.input.mean  # the history counts
    pinned = Tuner(dataclasses.replace(base, pins={"max_model_len": 600}, store_path=tmp_path / "p.sqlite"))
    assert pinned.config.workload is not None and pinned.config.workload.longest_sequence <= 600
    with pytest.raises(TuneError, match="cannot find the python of no-such-vllm"):
        Tuner(dataclasses.replace(base, command=("no-such-vllm", "serve")))


def test_a_workload_with_max_model_len_pinned_to_vllms_default_sizes_from_the_models_context(
    tmp_path: Path,
) -> None:
    from tuner.loadgen.workload import parse_workload

    model = write_tiny_model(tmp_path / "m")  # 2,048 positions
    config = TuneConfig(
        model=str(model), slo=parse_slo("ttft=2"), pins={"max_model_len": None}, gpus=False,
        workload=parse_workload("in=400,out=100,turns=uniform:2:8,context=8192"),  # up to 4,000 tokens
        store_path=tmp_path / "t.sqlite", out_dir=tmp_path / "o",
    )  # fmt: skip
    tuner = Tuner(config)
    assert tuner.config.pins["max_model_len"] is None  # the flag stays out: vLLM's default
    assert tuner.config.workload is not None and tuner.config.workload.sessions is not None
    assert tuner.config.workload.sessions.context == 2048  # conversations end within the model's context


def test_the_python_behind_a_vllm_executable_is_found_from_its_launcher(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    from tuner.serving.launcher import python_of

    pythons = {}
    for venv in ("venv", "a venv"):  # a path with a space cannot be a #! line: pip writes its sh launcher
        (tmp_path / venv / "bin").mkdir(parents=True)
        pythons[venv] = tmp_path / venv / "bin" / "python3.11"
        pythons[venv].symlink_to(sys.executable)
    plain, sh = tmp_path / "plain", tmp_path / "sh"
    plain.mkdir(), sh.mkdir()
    (plain / "vllm").write_text(f"#!{pythons['venv']}\nimport sys\n")
    spaced = pythons["a venv"]
    (sh / "vllm").write_text(f"#!/bin/sh\n'''exec' \"{spaced}\" \"$0\" \"$@\"\n' '''\nimport sys\n")
    for folder, python in ((plain, pythons["venv"]), (sh, spaced)):
        (folder / "vllm").chmod(0o755)
        monkeypatch.setenv("PATH", str(folder))
        assert python_of(("vllm", "serve")) == str(python), folder
    assert (
        python_of(("/opt/py/bin/python", "-m", "vllm.entrypoints.openai.api_server")) == "/opt/py/bin/python"
    )
    (sh / "vllm").write_text("#!/bin/sh\nexec something-else\n")
    monkeypatch.setenv("PATH", str(sh))
    assert python_of(("vllm", "serve")) is None  # a shell script that names no python: not /bin/sh


def test_a_length_distribution_longer_than_a_pinned_max_model_len_is_drawn_within_it(tmp_path: Path) -> None:
    """vLLM refuses a request longer than its max-model-len, and a refusal would count against the server:
    the tuner draws the workload's lengths again within it, and says how often and what that changed."""
    from tuner.loadgen.workload import parse_workload

    model = write_tiny_model(tmp_path / "m")
    config = TuneConfig(
        model=str(model), slo=parse_slo("ttft=2"), pins={"max_model_len": 512}, gpus=False,
        workload=parse_workload("in=lognormal:300:0.8,out=uniform:50:200"),  # a long tail past 512 tokens
        store_path=tmp_path / "t.sqlite", out_dir=tmp_path / "o",
    )  # fmt: skip
    tuner = Tuner(config)
    workload = tuner.config.workload
    assert workload is not None and tuner.config.pins["max_model_len"] == 512
    assert "drawn again" in tuner.workload_note and "max-model-len 512" in tuner.workload_note
    rng = random.Random(1)
    draws = [workload.draw(rng) for _ in range(400)]
    assert all(d.input_len + d.output_len <= 512 for d in draws)
    assert sum(d.redrawn for d in draws) > 0  # the tail was there, and was drawn again
