"""`infertop predict`: the table, --json, and one clear line for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tui.cli import main
from tuner.predict import aic
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model

needs_aic = pytest.mark.skipif(not aic.available(), reason=aic.INSTALL_HINT)


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-8b"), **LLAMA_3_1_8B)


@needs_aic
def test_json_names_the_best_config_per_gpu_and_its_cost(
    model_8b: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", str(model_8b), "--gpu", "h100,l4", "--price", "h100=2.5", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"].startswith("prediction")
    h100, l4 = report["gpus"]
    best = h100["best"]
    assert best["config"].get("quantization") == "fp8"  # FP8 weights win on an H100 for a bandwidth-bound 8B
    assert best["requests_per_s"] > 10 and best["output_tokens_per_s"] == pytest.approx(
        best["requests_per_s"] * 256
    )
    assert best["cost_per_million_output_tokens"] == pytest.approx(
        2.5 / (best["output_tokens_per_s"] * 3600) * 1e6
    )
    assert h100["candidates_fitting"] == h100["candidates_predicted"] > 50
    assert l4["best"] is None and "no measured data for L4" in l4["error"]
    assert l4["decode_ceiling_tokens_per_s_at_1"] == pytest.approx(
        300e9 / 16.06e9, rel=0.02
    )  # 300 GB/s / 16 GB


@needs_aic
def test_the_table_says_it_is_a_prediction(model_8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(model_8b), "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Predicted (a performance model, not a measurement)")
    assert "1x h200" in out and "fp8 w" in out and "vLLM data 0.24.0" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "h900"], "unknown GPU 'h900'"),
        (["--price", "h100=cheap"], "--price takes GPU=USD"),
        (["--slo", "ttft=fast"], "ttft"),
        (["--gpus", "0"], "--gpus must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    model_8b: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["predict", str(model_8b), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_directory_without_config_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json not found" in err and err.count("\n") == 1


def test_without_the_extra_it_says_how_to_install(
    model_8b: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    assert main(["predict", str(model_8b)]) == 2
    assert "pip install 'infertop[predict]'" in capsys.readouterr().err


@needs_aic
def test_a_local_tune_report_calibrates_its_gpus_rows(
    model_8b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = {
        "format": "infertop-tune-report",
        "hardware": {"gpu_name": "NVIDIA H100 80GB HBM3"},
        "trials": [
            {"predicted": 40.0, "capacity": {"lo": 30.0}},
            {"predicted": 20.0, "capacity": {"lo": 15.0}},
            {"predicted": 20.0, "capacity": None},  # failed: no ratio
        ],
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main(["predict", str(model_8b), "--gpu", "h100,h200", "--json"]) == 0
    plain = {r["gpu"]: r["best"] for r in json.loads(capsys.readouterr().out)["gpus"]}
    assert main(["predict", str(model_8b), "--gpu", "h100,h200", "--json", "--calibrate", str(path)]) == 0
    rows = {r["gpu"]: r for r in json.loads(capsys.readouterr().out)["gpus"]}
    assert rows["h100"]["calibration"] == {"ratio": pytest.approx(0.75), "trials": 2, "report": str(path)}
    assert rows["h100"]["best"]["output_tokens_per_s"] == pytest.approx(
        0.75 * plain["h100"]["output_tokens_per_s"]
    )
    assert rows["h200"]["calibration"] is None
    assert rows["h200"]["best"]["output_tokens_per_s"] == pytest.approx(plain["h200"]["output_tokens_per_s"])
    assert main(["predict", str(model_8b), "--gpu", "h100", "--calibrate", str(path)]) == 0
    assert "x0.75, the ratio measured/predicted over 2 trials" in capsys.readouterr().out


def test_a_calibration_file_that_is_not_a_report_is_one_line(
    model_8b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.json"
    path.write_text("{}")
    assert main(["predict", str(model_8b), "--calibrate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not an infertop tune report.json" in err and err.count("\n") == 1
