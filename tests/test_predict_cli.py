"""`infertop predict`: the table, --json, and one clear line for each bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tui.cli import main
from tuner.predict import aic, node
from tuner.predict.base import PredictError, Prediction
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.space import SearchSpace

needs_aic = pytest.mark.skipif(not aic.available(), reason=aic.INSTALL_HINT)
SMALL = {
    "max_num_seqs": (256,),
    "max_num_batched_tokens": (2048,),
    "gpu_memory_utilization": (0.9,),
    "enable_prefix_caching": (None,),
}


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-8b"), **LLAMA_3_1_8B)


@pytest.fixture
def small_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default space with one value per dimension but precision and TP: a node ranks in well under a second."""
    real = node.default_space

    def small(shape: ModelShape, hardware: Hardware, pins: Any = None) -> SearchSpace:
        space = real(shape, hardware, pins)
        return SearchSpace(shape, hardware, {**space.values, **SMALL}, space.pins)

    monkeypatch.setattr(node, "default_space", small)


@needs_aic
def test_json_names_the_best_layout_per_gpu_and_its_node_figures(
    model_8b: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", str(model_8b), "--gpu", "h100,l4", "--price", "h100=2.5", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"].startswith("prediction") and report["node_gpus"] == 1
    h100, l4 = report["gpus"]
    best = h100["best"]
    assert best["config"].get("quantization") == "fp8"  # FP8 weights win on an H100 for a bandwidth-bound 8B
    assert best["layout"] == "1 x TP 1" and h100["figures"] == "aiconfigurator SILICON"
    figures = best["node"]
    assert figures["node_capacity"] == pytest.approx(49.9, rel=0.01)
    assert figures["output_tokens_per_s"] == pytest.approx(figures["node_capacity"] * 256)
    assert figures["cost_per_million_output_tokens"] == pytest.approx(
        2.5 / (figures["output_tokens_per_s"] * 3600) * 1e6
    )
    assert figures["power_source"] == "board power (not measured)" and figures["power_w"] == 700
    assert h100["candidates_fitting"] == h100["candidates_predicted"] > 50
    # L4: no L4 data, so L4's speed of light x L40S's measured efficiency, EMPIRICAL, said so.
    assert l4["system"] == "l4" and "not checked against a real L4" in l4["note"]
    assert l4["figures"] == "aiconfigurator EMPIRICAL (speed of light x L40S's measured efficiency)"
    assert l4["best"]["server"]["ttft_s"] > 0 and l4["best"]["node"]["node_capacity"] > 0


@needs_aic
@pytest.mark.usefixtures("small_space")
def test_eight_gpus_rank_the_node_not_one_server(model_8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", str(model_8b), "--gpu", "h100", "--gpus", "8", "--price", "h100=2.5"]
    assert main([*argv, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["gpus"][0]
    assert row["best"]["layout"] == "8 x TP 1" and row["best"]["config"]["tensor-parallel-size"] == 1
    assert row["best"]["node"]["node_capacity"] == pytest.approx(8 * row["best"]["server"]["capacity"])
    assert row["best"]["node"]["cost_per_million_output_tokens"] == pytest.approx(0.054, abs=0.001)
    layouts = {e["layout"]: e["node"]["node_capacity"] for e in row["layouts"]}
    assert list(layouts) == ["8 x TP 1", "4 x TP 2", "2 x TP 4", "1 x TP 8"]
    assert layouts["8 x TP 1"] > 3 * layouts["1 x TP 8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "8x h100    8 x TP 1" in out and "aic SILICON" in out
    assert "other layouts: 4 x TP 2" in out and "1 x TP 8 119.0 req/s $0.182" in out
    assert "board power (not measured)" in out


@needs_aic
@pytest.mark.usefixtures("small_space")
def test_empirical_rows_say_empirical_in_the_table_and_the_json(
    model_8b: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """L4 and H100 PCIe have no measured data: their rows are predicted (not the roofline) and every place a row's
    figures appear says EMPIRICAL and whose measurements they borrow; H100 SXM's row stays SILICON."""
    gpus = "h100,l4,h100_pcie"
    assert main(["predict", str(model_8b), "--gpu", gpus, "--gpus", "8", "--json"]) == 0
    h100, l4, pcie = json.loads(capsys.readouterr().out)["gpus"]
    assert h100["figures"] == "aiconfigurator SILICON" and "EMPIRICAL" not in h100["source"]
    for row, reference in ((l4, "L40S"), (pcie, "H100 SXM")):
        assert (
            row["figures"] == f"aiconfigurator EMPIRICAL (speed of light x {reference}'s measured efficiency)"
        )
        assert (
            f"EMPIRICAL: {row['system']}'s speed of light x {reference}'s measured efficiency"
            in row["source"]
        )
        assert f"transferred from {reference}'s measurements" in row["note"]
        assert (
            "EMPIRICAL" in row["best"]["server"]["source"]
            and "EMPIRICAL" in row["best"]["prediction"]["source"]
        )
        assert all("EMPIRICAL" in e["server"]["source"] for e in row["layouts"])
    # A PCIe H100 serves less than an SXM one (2.0 vs 3.35 TB/s, no NVLink), an L4 far less (300 GB/s, 24 GiB).
    capacity = {r["gpu"]: r["best"]["node"]["node_capacity"] for r in (h100, l4, pcie)}
    assert capacity["h100"] > capacity["h100_pcie"] > 5 * capacity["l4"]
    assert main(["predict", str(model_8b), "--gpu", gpus, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("8x ")}
    assert rows["h100"].endswith("aic SILICON")
    assert rows["l4"].endswith("aic EMPIRICAL") and rows["h100_pcie"].endswith("aic EMPIRICAL")
    assert "roofline" not in rows["l4"] and "CEILING" not in out
    header = next(line for line in out.splitlines() if line.startswith("GPU "))
    assert rows["h100_pcie"].index("8 x TP") == header.index("best layout")  # the long name keeps the columns
    assert (
        f"  l4: aiconfigurator {aic.package_version()}, l4, EMPIRICAL: l4's speed of light x L40S's measured"
        in out
    )
    assert "  l4: EMPIRICAL: an estimate transferred from L40S's measurements to the L4" in out


@pytest.mark.usefixtures("small_space")
def test_without_the_extra_it_ranks_by_the_roofline_and_says_how_to_install(
    model_8b: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    assert main(["predict", str(model_8b), "--gpu", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 x TP 1" in out and "roofline CEILING" in out
    assert "roofline ceiling, not a prediction" in out and "pip install 'infertop[predict]'" in out


@needs_aic
@pytest.mark.usefixtures("small_space")
def test_the_table_says_it_is_a_prediction(model_8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(model_8b), "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Predicted (a performance model, not a measurement)")
    assert "h200       1 x TP 1" in out and "fp8 w" in out and "vLLM data 0.24.0" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "h900"], "unknown GPU 'h900'"),
        (["--price", "h100=cheap"], "--price takes GPU=USD"),
        (["--slo", "ttft=fast"], "ttft"),
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--gpus", "-2", "--gpu", "l4"], "--gpus must be >= 1"),
        (["--gpu", "h100,quadro"], "unknown GPU 'quadro'"),
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


@needs_aic
@pytest.mark.usefixtures("small_space")
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
    plain = {r["gpu"]: r["best"]["node"] for r in json.loads(capsys.readouterr().out)["gpus"]}
    assert main(["predict", str(model_8b), "--gpu", "h100,h200", "--json", "--calibrate", str(path)]) == 0
    rows = {r["gpu"]: r for r in json.loads(capsys.readouterr().out)["gpus"]}
    assert rows["h100"]["calibration"] == {"ratio": pytest.approx(0.75), "trials": 2, "report": str(path)}
    assert rows["h100"]["best"]["node"]["output_tokens_per_s"] == pytest.approx(
        0.75 * plain["h100"]["output_tokens_per_s"]
    )
    assert rows["h100"]["best"]["node"]["node_capacity"] == pytest.approx(
        0.75 * plain["h100"]["node_capacity"]
    )
    assert rows["h200"]["calibration"] is None
    assert rows["h200"]["best"]["node"]["output_tokens_per_s"] == pytest.approx(
        plain["h200"]["output_tokens_per_s"]
    )
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


# --- when there is no best layout: what happened, not "fits in memory" where nothing said so ---------------


@pytest.mark.usefixtures("small_space")
def test_nothing_predicted_says_so_and_why(
    model_8b: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(candidate: Any, shape: Any, hardware: Any, workload: Any) -> Prediction:
        raise PredictError("no datasheet bandwidth for H100 SXM: no roofline")

    monkeypatch.setattr(aic, "available", lambda: False)
    monkeypatch.setattr(node, "roofline_prediction", never)
    assert main(["predict", str(model_8b), "--gpu", "h100"]) == 1
    out = capsys.readouterr().out
    assert "h100       nothing could be predicted: no datasheet bandwidth for H100 SXM: no roofline" in out
    assert main(["predict", str(model_8b), "--gpu", "h100", "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["gpus"]
    assert row["error"] == "nothing could be predicted: no datasheet bandwidth for H100 SXM: no roofline"


@pytest.mark.usefixtures("small_space")
def test_candidates_that_could_not_be_predicted_are_not_counted_as_not_fitting(
    model_8b: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 16-bit candidates are predicted not to fit; the FP8 ones, which would, cannot be predicted at all."""

    def half(candidate: Any, shape: Any, hardware: Any, workload: Any) -> Prediction:
        if candidate.quantization == "fp8":
            raise PredictError("the roofline has no FP8 figures for this GPU")
        return Prediction("roofline", workload, fits=False, reason="no request fits in the KV cache")

    monkeypatch.setattr(aic, "available", lambda: False)
    monkeypatch.setattr(node, "roofline_prediction", half)
    assert main(["predict", str(model_8b), "--gpu", "h100", "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["gpus"]
    predicted = row["candidates_predicted"]
    assert predicted > 0 and row["candidates_fitting"] == 0
    assert row["error"] == (
        f"none of the {predicted} configurations predicted fits in memory; the others could not be predicted: "
        "the roofline has no FP8 figures for this GPU"
    )
