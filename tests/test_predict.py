"""Predictions: the aiconfigurator adapter against the real H100 measurements in REFERENCE.md, its coverage
limits as one-line errors, and a prediction's capacity under an SLO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.predict import aic
from tuner.predict.base import Estimate, PredictError, Prediction, Workload, ladder
from tuner.predict.roofline import decode_ceiling_tokens_per_s
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
    with pytest.raises(PredictError, match="neither for b60 nor for a GPU of its architecture") as no_ref:
        aic.AiconfiguratorModel(model_8b, shape, "b60")  # a system description, no data, no sibling with data
    assert "\n" not in str(no_ref.value) and "/" not in str(no_ref.value)  # no paths, no traceback
    a30 = aic.AiconfiguratorModel(model_8b, shape, "a30")  # Ampere: no FP8, and A100 SXM has no FP8 data
    with pytest.raises(PredictError, match="on a30: no FP8 compute") as fp8:
        a30.predict(FP8, aic.hardware_for("a30", a30), WORKLOAD)
    assert "\n" not in str(fp8.value)
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
def test_empirical_on_the_reference_itself_gives_back_its_measured_figures(
    model_8b: Path, h100: aic.AiconfiguratorModel
) -> None:
    """SOL(h100) x SILICON(h100) / SOL(h100) = SILICON(h100), figure by figure and batch by batch: the transfer
    adds nothing of its own on the GPU it borrows from."""
    check = aic.AiconfiguratorModel(model_8b, h100.shape, "h100_sxm", "EMPIRICAL", reference="h100_sxm")
    assert check.reference == "h100_sxm" and "EMPIRICAL" in check.source
    hardware = aic.hardware_for("h100_sxm", h100)
    for candidate in (Candidate(), FP8):
        silicon, empirical = (
            h100.predict(candidate, hardware, WORKLOAD),
            check.predict(candidate, hardware, WORKLOAD),
        )
        assert empirical.max_concurrency == silicon.max_concurrency and len(empirical.curve) > 10
        for s, e in zip(silicon.curve, empirical.curve, strict=True):
            assert e.concurrency == s.concurrency
            assert e.ttft_s == pytest.approx(s.ttft_s, rel=1e-6)
            assert e.tpot_s == pytest.approx(s.tpot_s, rel=1e-6)
            assert e.output_tokens_per_s == pytest.approx(s.output_tokens_per_s, rel=1e-6)
            assert e.memory_gib_per_gpu == s.memory_gib_per_gpu


@needs_aic
def test_l4_batch_one_is_below_its_bandwidth_ceiling_and_not_far_below(model_8b: Path) -> None:
    """Decoding one request of an 8B in bf16 reads ~16 GB a token: on an L4's 300 GB/s at most ~18.6 tok/s
    (the roofline). L4's speed of light x L40S's measured efficiency must stay under that ceiling (pure speed of
    light, 19.7 tok/s, does not) and above half of it (a real H100 reached 73 % of its ceiling, REFERENCE.md)."""
    shape = ModelShape.from_dir(model_8b)
    l4 = aic.AiconfiguratorModel(model_8b, shape, "l4")
    assert l4.mode == "EMPIRICAL" and l4.reference == "l40s" and l4.gpu_memory_bytes == 24 * 2**30
    assert "EMPIRICAL" in l4.kind and "L40S's measured efficiency" in l4.kind
    hardware = aic.hardware_for("l4", l4)
    prediction = l4.predict(Candidate(), hardware, WORKLOAD)
    assert (
        prediction.fits and "EMPIRICAL: l4's speed of light x L40S's measured efficiency" in prediction.source
    )
    assert "no L4 data" in prediction.source
    one = prediction.at(1)
    ceiling = decode_ceiling_tokens_per_s(Candidate(), shape, hardware, WORKLOAD, 1)
    assert one is not None and ceiling is not None and ceiling == pytest.approx(18.6, rel=0.02)
    assert 0.5 * ceiling < one.output_tokens_per_s < ceiling
    assert 0.5 * ceiling < 1 / one.tpot_s < ceiling  # per-user speed too, not only the throughput
    # 24 GiB less ~16 GiB of weights: a few dozen requests of 768 tokens in bf16 KV, not hundreds.
    assert prediction.max_concurrency is not None and 10 < prediction.max_concurrency < 60


@needs_aic
def test_h100_pcie_is_slower_than_sxm_by_about_the_bandwidth_ratio(
    model_8b: Path, h100: aic.AiconfiguratorModel
) -> None:
    """Batch-1 decoding is memory-bound: both GPUs are Hopper with the same kernels (the transfer gives them the
    same efficiency), so TPOT should scale with bandwidth, 3.35 / 2.0 TB/s = 1.675. The band, 1.5-1.8, leaves
    room for the parts that do not scale with bandwidth (launch overheads, the PCIe card's lower clocks); a
    transfer that borrowed SXM's figures unscaled would give 1.0, PCIe's pure speed of light against SXM's
    measured figures 1.22."""
    pcie = aic.AiconfiguratorModel(model_8b, h100.shape, "h100_pcie")
    assert pcie.reference == "h100_sxm" and "no H100 PCIe data" in pcie.source
    for candidate in (Candidate(), FP8):
        sxm_one = h100.predict(candidate, aic.hardware_for("h100_sxm", h100), WORKLOAD).at(1)
        pcie_one = pcie.predict(candidate, aic.hardware_for("h100_pcie", pcie), WORKLOAD).at(1)
        assert sxm_one is not None and pcie_one is not None
        assert 1.5 < pcie_one.tpot_s / sxm_one.tpot_s < 1.8
        assert 1.5 < sxm_one.output_tokens_per_s / pcie_one.output_tokens_per_s < 1.8
        assert pcie_one.ttft_s > sxm_one.ttft_s  # prefill: less compute on the PCIe card (756 vs 989 TFLOPS)


def test_the_transfer_scales_each_figure_and_caps_tokens_by_littles_law() -> None:
    """The arithmetic on its own: each figure x measured / speed of light; tokens/s no more than b requests of
    that TTFT and TPOT complete."""
    target = {"ttft": 100.0, "tpot": 40.0, "tokens/s": 50.0, "memory": 12.0}
    measured = {"ttft": 30.0, "tpot": 12.0, "tokens/s": 70.0}
    ideal = {"ttft": 20.0, "tpot": 10.0, "tokens/s": 100.0}
    out = aic.transfer(target, measured, ideal, batch=2, output_len=11)
    assert out["ttft"] == pytest.approx(150.0) and out["tpot"] == pytest.approx(48.0)
    assert out["memory"] == 12.0  # the target's own
    # 50 x 0.7 = 35 tok/s from the steps, but 2 requests of 150 + 10 x 48 ms complete only 31.7 tok/s.
    assert out["tokens/s"] == pytest.approx(2 * 10 * 1000 / (150 + 48 * 10))
    slow = aic.transfer({**target, "tokens/s": 20.0}, measured, ideal, batch=2, output_len=11)
    assert slow["tokens/s"] == pytest.approx(14.0)  # under the cap: the steps' own figure, scaled


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
