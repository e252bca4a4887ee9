"""Predictions: the aiconfigurator adapter against the real H100 measurements in REFERENCE.md, its coverage
limits as one-line errors, and a prediction's capacity under an SLO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.predict import aic
from tuner.predict.base import Estimate, PredictError, Prediction, Workload, ladder
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.modelshape import ModelShape
from tuner.tuning.slo import Slo
from tuner.tuning.space import Candidate

needs_aic = pytest.mark.skipif(
    not aic.available(), reason=f"the predict extra is not installed ({aic.INSTALL_HINT})"
)
WORKLOAD = Workload(512, 256)  # REFERENCE.md's H100 runs: 512 in / 256 out
FP8 = Candidate(quantization="fp8", kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-8b"), **LLAMA_3_1_8B)


@pytest.fixture(scope="module")
def h100(model_8b: Path) -> aic.AiconfiguratorModel:
    if not aic.available():
        pytest.skip(aic.INSTALL_HINT)
    return aic.AiconfiguratorModel(model_8b, ModelShape.from_dir(model_8b), "h100_sxm")


# (candidate, concurrency, measured output tok/s on a real H100 with vLLM 0.26, REFERENCE.md; how far off
# aiconfigurator was there, as measured: its own error, the band this test allows)
MEASURED = [
    (Candidate(), 1, 151.0, 0.06),  # predicted 158
    (Candidate(), 64, 5358.0, 0.08),  # predicted 5,710
    (FP8, 64, 7710.0, 0.12),  # predicted 6,886
    (FP8, 128, 10295.0, 0.09),  # predicted 9,570 (vLLM's own bench serve measured 11,640 there)
]


@needs_aic
@pytest.mark.parametrize(("candidate", "concurrency", "measured", "band"), MEASURED)
def test_predictions_are_within_the_error_measured_on_a_real_h100(
    h100: aic.AiconfiguratorModel, candidate: Candidate, concurrency: int, measured: float, band: float
) -> None:
    prediction = h100.predict(candidate, aic.hardware_for("h100_sxm", h100), WORKLOAD)
    point = prediction.at(concurrency)
    assert prediction.fits and point is not None
    assert point.output_tokens_per_s == pytest.approx(measured, rel=band)


@needs_aic
def test_the_adapter_gives_the_command_lines_figures(h100: aic.AiconfiguratorModel) -> None:
    """`aiconfigurator cli estimate` printed these for the same shapes (REFERENCE.md): same code path."""
    hardware = aic.hardware_for("h100_sxm", h100)
    bf16 = h100.predict(Candidate(), hardware, WORKLOAD)
    fp8 = h100.predict(FP8, hardware, WORKLOAD)
    assert bf16.at(1).output_tokens_per_s == pytest.approx(158.24, abs=0.01)  # type: ignore[union-attr]
    assert bf16.at(1).tpot_s == pytest.approx(6.172e-3, abs=1e-6)  # type: ignore[union-attr]
    assert bf16.at(64).output_tokens_per_s == pytest.approx(5710.26, abs=0.01)  # type: ignore[union-attr]
    assert fp8.at(128).output_tokens_per_s == pytest.approx(9569.55, abs=0.01)  # type: ignore[union-attr]
    assert "aiconfigurator" in bf16.source and "h100_sxm" in bf16.source


@needs_aic
def test_h200_predicts_more_than_h100_for_the_same_config(model_8b: Path) -> None:
    shape = ModelShape.from_dir(model_8b)
    h200 = aic.AiconfiguratorModel(model_8b, shape, "h200_sxm")
    point = h200.predict(FP8, aic.hardware_for("h200_sxm", h200), WORKLOAD).at(128)
    assert point is not None and point.output_tokens_per_s == pytest.approx(10321.39, abs=0.01)


@needs_aic
def test_a_model_too_big_for_one_gpu_does_not_fit_and_says_by_how_much(tmp_path: Path) -> None:
    model = write_tiny_model(
        tmp_path,
        **{
            **LLAMA_3_1_8B,
            "hidden_size": 8192,
            "num_layers": 80,
            "num_heads": 64,
            "intermediate_size": 28672,
        },
    )
    shape = ModelShape.from_dir(model)
    h100 = aic.AiconfiguratorModel(model, shape, "h100_sxm")
    hardware = aic.hardware_for("h100_sxm", h100, gpu_count=8)
    alone = h100.predict(Candidate(), hardware, WORKLOAD)
    assert not alone.fits and "GiB per GPU" in alone.reason and alone.capacity(_slo(2.0, 10.0)) == 0.0
    tp4 = h100.predict(Candidate(tensor_parallel_size=4), hardware, WORKLOAD)
    assert tp4.fits and tp4.max_concurrency is not None and tp4.max_concurrency > 64


@needs_aic
def test_coverage_limits_are_one_line_errors(model_8b: Path, tmp_path: Path) -> None:
    shape = ModelShape.from_dir(model_8b)
    with pytest.raises(PredictError, match="no measured vLLM data for l4"):
        aic.AiconfiguratorModel(model_8b, shape, "l4", "SILICON")
    with pytest.raises(PredictError, match="cannot run its EMPIRICAL mode for l4") as empirical:
        aic.AiconfiguratorModel(model_8b, shape, "l4")  # its own mode: EMPIRICAL, which 0.12 cannot run there
    assert "\n" not in str(empirical.value) and "/" not in str(empirical.value)  # no paths, no traceback
    h100 = aic.AiconfiguratorModel(model_8b, shape, "h100_sxm")
    with pytest.raises(PredictError, match="cannot model") as info:
        h100.predict(Candidate(tensor_parallel_size=3), aic.hardware_for("h100_sxm", h100, 3), WORKLOAD)
    assert "\n" not in str(info.value)
    phi = tmp_path / "phi"
    phi.mkdir()
    config = json.loads((model_8b / "config.json").read_text())
    (phi / "config.json").write_text(json.dumps({**config, "architectures": ["PhiForCausalLM"]}))
    with pytest.raises(PredictError, match="PhiForCausalLM"):
        aic.AiconfiguratorModel(phi, shape, "h100_sxm").predict(
            Candidate(), aic.hardware_for("h100_sxm", None), WORKLOAD
        )


@needs_aic
def test_a_dense_mistral_is_modelled_as_llama_and_says_so(model_8b: Path, tmp_path: Path) -> None:
    config = json.loads((model_8b / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    model = aic.AiconfiguratorModel(tmp_path, ModelShape.from_dir(tmp_path), "h100_sxm")
    prediction = model.predict(Candidate(), aic.hardware_for("h100_sxm", model), WORKLOAD)
    assert "modelled as Llama" in prediction.source
    assert prediction.at(1).output_tokens_per_s == pytest.approx(158.24, abs=0.01)  # type: ignore[union-attr]


def test_without_the_extra_the_error_names_the_install(
    monkeypatch: pytest.MonkeyPatch, model_8b: Path
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    monkeypatch.setattr(aic._Sdk, "_loaded", None)
    with pytest.raises(PredictError, match=r"infertop\[predict\]"):
        aic.AiconfiguratorModel(model_8b, ModelShape.from_dir(model_8b), "h100_sxm")


def test_system_names_come_from_the_gpu_table() -> None:
    assert aic.system_for("NVIDIA H100 80GB HBM3") == "h100_sxm"
    assert aic.system_for("NVIDIA H200") == "h200_sxm"
    assert aic.system_for("NVIDIA L40S") == "l40s"
    assert aic.system_for("NVIDIA H100 PCIe") == "h100_pcie"  # a system description, no measured data
    assert aic.system_for("NVIDIA L4") == "l4"
    assert aic.model_for("NVIDIA L4") == ("l4", "EMPIRICAL")
    assert aic.model_for("NVIDIA H100 80GB HBM3") == ("h100_sxm", "SILICON")
    assert aic.system_for("NVIDIA GeForce RTX 4090") is None
    assert aic.hardware_for("l4", None).compute_capability == (8, 9)  # FP8 candidates on an L4


def _slo(ttft_s: float, tok_s_per_user: float) -> Slo:
    return Slo("test", ttft_p95_max_s=ttft_s, tok_s_per_user_min=tok_s_per_user)


def test_capacity_is_the_highest_load_inside_the_slo() -> None:
    curve = tuple(
        Estimate(
            concurrency=b,
            ttft_s=0.05 + 0.002 * b,
            tpot_s=0.005 + 0.0001 * b,
            output_tokens_per_s=b / (0.005 + 0.0001 * b),
        )
        for b in ladder(256)
    )
    prediction = Prediction("test", WORKLOAD, True, curve)
    slo = _slo(ttft_s=0.5, tok_s_per_user=50.0)  # TPOT <= 20 ms: b <= 150; TTFT <= 0.5 s: b <= 225
    best = prediction.at_capacity(slo, "users")
    assert best is not None and best.concurrency == 128
    assert prediction.capacity(slo, "users") == 128
    assert prediction.capacity(slo, "rate") == pytest.approx(best.output_tokens_per_s / 256)
    # The rate objective takes the most completed requests, not the most in flight, where they differ.
    low = [e for e in curve if e.concurrency < 128]
    bent = (*low, Estimate(128, 0.3, 0.018, curve[-4].output_tokens_per_s * 0.8))
    rate_best = Prediction("test", WORKLOAD, True, bent).at_capacity(slo, "rate")
    assert rate_best is not None and rate_best.concurrency < 128
    assert Prediction("test", WORKLOAD, True, curve).capacity(_slo(0.01, 50.0)) == 0.0  # nothing meets it


def test_ladder_ends_at_the_limit() -> None:
    assert ladder(100)[-1] == 100 and 96 in ladder(100) and 128 not in ladder(100)
    assert ladder(1) == (1,)
    with pytest.raises(PredictError):
        Workload(0, 10)
