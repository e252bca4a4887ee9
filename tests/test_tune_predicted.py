"""The tuner with a performance model: vLLM's defaults, then the best calibrated prediction, each trial
correcting the model, stopping when nothing left could win; predicted beside measured in every trial's
events. The GPU is the one thing faked (an H100's Hardware; trials answer from a scripted landscape)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from test_tune_units import _capacity

from tui.tune_cli import HeadlessProgress, predicted_beside_measured
from tuner.predict import aic
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning import events as ev
from tuner.tuning.modelshape import Hardware
from tuner.tuning.slo import parse_slo
from tuner.tuning.space import Candidate, SearchSpace, default_space
from tuner.tuning.store import TrialStatus
from tuner.tuning.tune import TrialOutcome, TuneConfig, Tuner

pytestmark = pytest.mark.skipif(not aic.available(), reason=aic.INSTALL_HINT)
H100 = Hardware("NVIDIA H100 80GB HBM3", 1, 80 * 2**30, (9, 0))


def _tuner(tmp_path: Path, **config: Any) -> Tuner:
    model = write_tiny_model(tmp_path / "llama-8b", **LLAMA_3_1_8B)
    tuner = Tuner(
        TuneConfig(
            model=str(model), slo=parse_slo("mlperf-llama3.1-8b-interactive"), store_path=tmp_path / "t.sqlite",
            out_dir=tmp_path / "out", gpus=False, prove=False, **config,
        )
    )  # fmt: skip
    tuner.hardware = H100  # the GPU CI does not have
    space = default_space(tuner.shape, H100, {"max_model_len": 4096})
    tuner.space = SearchSpace(
        tuner.shape, H100, {**space.values, "max_num_batched_tokens": (8192,)}, {"max_model_len": 4096}
    )
    return tuner


def _run(
    tuner: Tuner, monkeypatch: pytest.MonkeyPatch, truth: Any
) -> tuple[list[Candidate], list[ev.TuneEvent]]:
    launched: list[Candidate] = []

    def fake_trial(store, candidate, why, incumbent, placement=None):  # type: ignore[no-untyped-def]
        if not tuner.space.check(candidate).ok:  # as the real trial: judged without a launch
            store.record_result(candidate, TrialStatus.INFEASIBLE, "not launched")
            return TrialOutcome(candidate, TrialStatus.INFEASIBLE, "not launched")
        launched.append(candidate)
        tuner.launches += 1
        tuner._emit(
            ev.TrialStarted(
                candidate.key(),
                tuner.label(candidate),
                {},
                tuner.launches,
                why,
                tuner.predicted_capacity(candidate),
            )
        )
        rate = truth(candidate)
        outcome = TrialOutcome(candidate, TrialStatus.FEASIBLE, "ok", _capacity(rate, rate * 1.1))
        store.record_result(candidate, outcome.status, outcome.reason)
        tuner._emit(tuner._finished_event(candidate.key(), outcome))
        return outcome

    monkeypatch.setattr(tuner, "_trial", fake_trial)
    seen: list[ev.TuneEvent] = []
    tuner.result = tuner.run(seen.append)  # type: ignore[attr-defined]
    return launched, seen


def test_defaults_first_then_the_predicted_best_then_it_stops_before_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tuner = _tuner(tmp_path, launch_budget=20)
    launched, seen = _run(tuner, monkeypatch, lambda c: 0.9 * (tuner.predicted_capacity(c) or 1.0))
    started = next(e for e in seen if isinstance(e, ev.TuneStarted))
    assert started.prediction.startswith("ranked by aiconfigurator") and "h100_sxm" in started.prediction
    assert launched[0] == tuner.space.baseline()
    best_predicted = max(tuner.space.feasible(), key=lambda c: tuner.predicted_capacity(c) or 0)
    assert launched[1].key() == best_predicted.key() and launched[1].fp8_weights
    assert len(launched) < 20 and "could beat" in (tuner.note or "")
    trials = [e for e in seen if isinstance(e, ev.TrialStarted)]
    assert trials[1].predicted is not None and "predicted" in trials[1].why and "expect" in trials[1].why
    report = tuner.result.report  # type: ignore[attr-defined]
    assert report["prediction"].startswith("ranked by aiconfigurator")
    row = next(t for t in report["trials"] if t["key"] == launched[1].key())
    assert row["predicted"] == pytest.approx(tuner.predicted_capacity(launched[1]))
    assert row["prediction"]["source"].startswith("aiconfigurator") and row["prediction"]["concurrency"] > 1
    roofline = row["roofline"]  # 4 requests in flight in these scripted trials
    assert roofline["concurrency"] == 4 and 0 < roofline["pct_of_ceiling"] < 100
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| vs model |" in markdown and "0.90x (" in markdown and "Search order: ranked by" in markdown
    svg = (tmp_path / "out" / "measured_vs_predicted.svg").read_text()
    assert "measured = predicted" in svg and "0.90x" in svg and "measured_vs_predicted.svg" in markdown


def test_a_family_the_model_overrates_hands_the_lead_to_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tuner = _tuner(tmp_path, launch_budget=12)

    def truth(c: Candidate) -> float:  # FP8 weights measure at half the prediction here (a slow FP8 kernel)
        return (tuner.predicted_capacity(c) or 1.0) * (0.5 if c.fp8_weights else 1.0)

    launched, seen = _run(tuner, monkeypatch, truth)
    assert launched[1].fp8_weights  # the model's favourite first ...
    families = [(c.quantization, c.kv_cache_dtype) for c in launched]
    assert families[2] not in families[:2]  # ... then one trial in each family that could still win ...
    winner = tuner.result.winner  # type: ignore[attr-defined]
    assert winner is not None and not winner.fp8_weights  # ... and, corrected, the other precision wins
    finished = [e for e in seen if isinstance(e, ev.TrialFinished) and e.predicted]
    fp8 = next(e for e in finished if e.key == launched[1].key())
    assert fp8.measured == pytest.approx(0.5 * fp8.predicted, rel=0.01)  # type: ignore[operator]  # loads are rounded
    line = HeadlessProgress.describe(fp8)
    assert line is not None and "measured 0.50x the prediction" in line


def test_without_the_extra_the_tune_follows_the_evidence_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    tuner = _tuner(tmp_path, launch_budget=2)
    launched, seen = _run(tuner, monkeypatch, lambda c: 2.0)
    started = next(e for e in seen if isinstance(e, ev.TuneStarted))
    assert "infertop[predict]" in started.prediction and "follows the evidence" in started.prediction
    assert not tuner.predictions and launched[0] == tuner.space.baseline()
    assert not (tmp_path / "out" / "measured_vs_predicted.svg").exists()


def test_no_predict_keeps_the_evidence_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = _tuner(tmp_path, launch_budget=3, predict=False)
    launched, seen = _run(tuner, monkeypatch, lambda c: 2.0)
    started = next(e for e in seen if isinstance(e, ev.TuneStarted))
    assert "--no-predict" in started.prediction and not tuner.predictions
    assert launched[0] == tuner.space.baseline()


def test_predicted_beside_measured_reads_for_people() -> None:
    finished = ev.TrialFinished("k", "fp8 w", "feasible", "ok", predicted=40.0, measured=22.0)
    assert predicted_beside_measured(finished) == "; measured 0.55x the prediction (40)"
    assert predicted_beside_measured(dataclasses.replace(finished, predicted=None)) == ""


def test_a_model_too_big_for_one_gpu_starts_the_evidence_search_at_the_smallest_tp_that_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = {**LLAMA_3_1_8B, "hidden_size": 8192, "num_layers": 80, "num_heads": 64, "intermediate_size": 28672}
    model = write_tiny_model(tmp_path / "llama-70b", **big)
    tuner = Tuner(
        TuneConfig(
            model=str(model), slo=parse_slo("ttft=2,tps=20"), store_path=tmp_path / "t.sqlite",
            out_dir=tmp_path / "out", gpus=False, prove=False, predict=False, launch_budget=2,
        )
    )  # fmt: skip
    eight = Hardware("NVIDIA H100 80GB HBM3", 8, 80 * 2**30, (9, 0))
    tuner.hardware = eight
    tuner.space = default_space(tuner.shape, eight, {"max_model_len": 4096})
    launched, seen = _run(tuner, monkeypatch, lambda c: 2.0)
    assert not tuner.space.check(tuner.space.baseline()).ok  # 140 GB of weights on one 80 GB GPU
    first = launched[0]
    assert (
        first.tensor_parallel_size == 2
        and first.with_values(tensor_parallel_size=None) == tuner.space.baseline()
    )
    started = [e for e in seen if isinstance(e, ev.TrialStarted)]
    assert "do not fit one GPU" in started[0].why


def test_a_workload_sizes_the_run_and_is_named_in_the_yaml_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuner.loadgen.workload import PRESETS

    rag = PRESETS["rag"]
    model = write_tiny_model(tmp_path / "llama-8b", **LLAMA_3_1_8B)
    tuner = Tuner(
        TuneConfig(
            model=str(model), slo=parse_slo("mlperf-llama3.1-8b-server"), store_path=tmp_path / "t.sqlite",
            out_dir=tmp_path / "out", gpus=False, prove=False, workload=rag, launch_budget=2,
        )
    )  # fmt: skip
    assert tuner.config.input_len == 6144 and tuner.config.output_len == 200  # the means: for predictions
    assert tuner.config.pins["max_model_len"] == rag.longest_sequence  # every request of the workload fits
    assert tuner.runner().plan.workload is rag  # each phase draws its requests from it
    assert tuner._meta().workload["traffic"]["name"] == "rag"  # a resume under other traffic is refused
    plain = _tuner(tmp_path / "plain")
    assert "traffic" not in plain._meta().workload  # runs stored before workloads existed still resume
    _run(tuner, monkeypatch, lambda c: 2.0)
    yaml = next((tmp_path / "out").glob("*.yaml")).read_text()
    assert "# Workload: rag: 4096-8192 (uniform) in" in yaml
    assert "Traffic: rag: 4096-8192 (uniform) in" in (tmp_path / "out" / "report.md").read_text()


def test_tune_cli_takes_a_workload_and_its_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tui.tune_cli import build_config, run_tune_cli, tune_parser

    model = write_tiny_model(tmp_path / "m")
    config = build_config(tune_parser().parse_args([str(model), "--workload", "chat", "--cpu"]))
    assert config.workload is not None and config.workload.name == "chat"
    assert config.slo.name == "mlperf-llama3.1-8b-interactive"  # the preset's pairing
    config = build_config(tune_parser().parse_args([str(model), "--workload", "chat", "--slo", "aa-100"]))
    assert config.slo.name == "aa-100"  # an explicit SLO wins
    assert run_tune_cli([str(model), "--workload", "chat", "--input-len", "64", "--cpu"]) == 2
    err = capsys.readouterr().err
    assert "give --workload or --input-len/--output-len, not both" in err and err.count("\n") == 1


def test_a_workload_longer_than_the_models_context_is_drawn_within_it_or_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """vLLM refuses what outgrows its context: a distribution with a tail past it is drawn again within it
    (and the run says so); fixed lengths that cannot fit are refused in one line."""
    from tuner.loadgen.workload import PRESETS, parse_workload
    from tuner.tuning.tune import TuneError

    model = write_tiny_model(tmp_path / "m")  # a 2,048-token context; chat prompts reach ~3,200 tokens
    tuner = Tuner(TuneConfig(model=str(model), slo=parse_slo("aa-100"), gpus=False, workload=PRESETS["chat"]))
    assert tuner.config.workload is not None and tuner.config.workload.longest_sequence <= 2048
    assert "drawn again" in tuner.workload_note and "the model's 2048-token context" in tuner.workload_note
    fixed = parse_workload("in=3000,out=200")
    with pytest.raises(TuneError) as info:
        Tuner(TuneConfig(model=str(model), slo=parse_slo("aa-100"), gpus=False, workload=fixed))
    assert "2048" in str(info.value) and "\n" not in str(info.value)
