"""A node's layouts ranked by what the whole node serves: replicas x TP, idle GPUs lost, per GPU over every GPU,
cost for the whole node, the EMPIRICAL figures' labels (L4, H100 PCIe, A30: speed of light x a sibling GPU's
measured efficiency), in predict and tune --dry-run, and the roofline when aiconfigurator cannot predict."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.predict import aic, node
from tuner.predict.base import PredictError, Workload
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.dryrun import plan_dry_run
from tuner.tuning.modelshape import Hardware, ModelShape, weight_bytes
from tuner.tuning.slo import parse_slo
from tuner.tuning.space import Candidate, SearchSpace, default_space
from tuner.tuning.tune import TuneConfig, Tuner

needs_aic = pytest.mark.skipif(not aic.available(), reason=aic.INSTALL_HINT)
WORKLOAD = Workload(512, 256)
SLO = parse_slo("mlperf-llama3.1-8b-server")
# One value per dimension but precision and TP: 4 x the TPs candidates, so a ranking takes well under a second.
SMALL = {
    "max_num_seqs": (256,),
    "max_num_batched_tokens": (2048,),
    "gpu_memory_utilization": (0.9,),
    "enable_prefix_caching": (None,),
}


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-8b"), **LLAMA_3_1_8B)


@pytest.fixture(scope="module")
def shape(model_8b: Path) -> ModelShape:
    return ModelShape.from_dir(model_8b)


@pytest.fixture(scope="module")
def h100_node(model_8b: Path, shape: ModelShape) -> node.NodeRanking:
    if not aic.available():
        pytest.skip(aic.INSTALL_HINT)
    return node.rank_layouts(model_8b, shape, "h100", 8, WORKLOAD, SLO, price_per_gpu_hour=2.5, values=SMALL)


@needs_aic
def test_eight_h100s_run_eight_tp1_replicas_not_one_tp8_server(h100_node: node.NodeRanking) -> None:
    best = h100_node.best
    assert best is not None and h100_node.kind == "aiconfigurator SILICON"
    assert best.layout.label() == "8 x TP 1" and best.layout.tp == 1
    assert best.figures.capacity == pytest.approx(8 * best.server_capacity)
    assert best.figures.capacity == pytest.approx(399.3, rel=0.01)  # 8 x 49.9 req/s (REFERENCE.md)
    tp8 = next(e for e in h100_node.best_per_layout() if e.layout.tp == 8)
    assert tp8.layout.replicas == 1 and tp8.figures.capacity == pytest.approx(119.0, rel=0.01)
    assert best.figures.capacity > 3 * tp8.figures.capacity
    assert [e.layout.label() for e in h100_node.best_per_layout()] == [
        "8 x TP 1",
        "4 x TP 2",
        "2 x TP 4",
        "1 x TP 8",
    ]
    # $/1M: 8 GPUs x 2.5 $/h over the node's tokens; per kW over 8 x 700 W board power, labelled so.
    f = best.figures
    assert f.output_tokens_per_s is not None
    assert f.cost_per_million_tokens == pytest.approx(8 * 2.5 * 1e6 / (f.output_tokens_per_s * 3600))
    assert f.cost_per_million_tokens == pytest.approx(0.054, abs=0.001)
    assert f.power_w == 8 * 700 and f.power_source == "board power (not measured)"


@needs_aic
def test_a_layout_that_leaves_gpus_idle_counts_them_as_lost(model_8b: Path, shape: ModelShape) -> None:
    ranking = node.rank_layouts(
        model_8b, shape, "h100", 6, WORKLOAD, SLO, price_per_gpu_hour=2.0, values=SMALL
    )
    by_tp = {e.layout.tp: e for e in ranking.best_per_layout()}
    assert sorted(by_tp) == [1, 2, 4]  # TP 3 and 6 do not divide 32 heads; TP 4 leaves 2 GPUs idle
    tp4 = by_tp[4]
    assert (tp4.layout.replicas, tp4.layout.idle_gpus) == (1, 2)
    assert tp4.layout.label() == "1 x TP 4 (2 GPUs idle)"
    tok_s = tp4.figures.output_tokens_per_s
    assert tok_s is not None and tok_s == pytest.approx(tp4.point.output_tokens_per_s)
    assert tp4.figures.per_gpu == pytest.approx(tok_s / 6)
    assert tp4.figures.cost_per_million_tokens == pytest.approx(6 * 2.0 * 1e6 / (tok_s * 3600))
    assert by_tp[1].figures.capacity == pytest.approx(6 * by_tp[1].server_capacity)
    assert ranking.best is by_tp[1]


def test_without_aiconfigurator_it_ranks_by_the_roofline_and_says_so(
    model_8b: Path, shape: ModelShape, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    ranking = node.rank_layouts(model_8b, shape, "h100", 8, WORKLOAD, SLO, values=SMALL)
    assert ranking.is_ceiling and ranking.kind == "roofline ceiling, not a prediction"
    assert "infertop[predict]" in ranking.note
    best = ranking.best
    assert best is not None and best.layout.label() == "8 x TP 1"  # a tie with TP 8 goes to the smaller TP
    assert best.prediction.source.startswith("roofline ceiling, not a prediction")
    # The ceiling at 256 requests of 512 + 128 tokens on average, fp8 weights (embeddings stay 16-bit: 9.1 GB)
    # and fp8 KV (64 KiB a token): 3.35 TB/s over what one decode step reads.
    assert weight_bytes(shape, "fp8") == pytest.approx(9.08e9, rel=0.01)
    per_step_bytes = weight_bytes(shape, "fp8") + 256 * 640 * 65536
    assert best.point.concurrency == 256
    assert best.point.output_tokens_per_s == pytest.approx(256 * 3350e9 / per_step_bytes, rel=1e-6)


def test_l4_is_asked_in_the_empirical_mode(model_8b: Path, shape: ModelShape) -> None:
    assert aic.model_for("l4") == ("l4", "EMPIRICAL")
    assert aic.model_for("NVIDIA L4") == ("l4", "EMPIRICAL")
    assert aic.model_for("NVIDIA H100 PCIe") == ("h100_pcie", "EMPIRICAL")
    assert aic.model_for("a30") == ("a30", "EMPIRICAL")
    # Each borrows the measured efficiency of a GPU of its own architecture that aiconfigurator has data for.
    for system, reference in aic.EMPIRICAL_REFERENCES.items():
        assert reference in aic.SYSTEMS.values() and system not in aic.SYSTEMS.values()
        assert (
            aic.hardware_for(system, None).compute_capability[0]
            == aic.hardware_for(reference, None).compute_capability[0]
        )


@needs_aic
def test_an_l4_node_is_predicted_empirically_and_every_label_says_so(
    model_8b: Path, shape: ModelShape
) -> None:
    """Not the roofline: L4's speed of light x L40S's measured efficiency, labelled EMPIRICAL in the ranking's
    kind, its source, every prediction's source, and a note on how far it goes."""
    ranking = node.rank_layouts(model_8b, shape, "l4", 1, WORKLOAD, SLO, values=SMALL)
    assert ranking.gpu == "L4" and ranking.system == "l4" and not ranking.is_ceiling
    assert ranking.kind == "aiconfigurator EMPIRICAL (speed of light x L40S's measured efficiency)"
    assert "EMPIRICAL: l4's speed of light x L40S's measured efficiency" in ranking.source
    assert (
        "transferred from L40S's measurements" in ranking.note
        and "not checked against a real L4" in ranking.note
    )
    assert "\n" not in ranking.note and ranking.error == ""
    assert ranking.layouts and all("EMPIRICAL" in e.prediction.source for e in ranking.layouts)
    best = ranking.best
    assert best is not None and best.candidate.quantization == "fp8"  # L4 has FP8 tensor cores (8.9)
    assert best.figures.power_w == 72 and best.figures.tokens_per_s_per_kw is not None
    assert best.point.ttft_s > 0  # a prediction has a TTFT; the roofline has none
    # Under the bandwidth ceiling the roofline would have ranked it by, for the same configuration and load.
    ceiling = node.roofline_prediction(best.candidate, shape, aic.hardware_for("l4", None), WORKLOAD)
    bound = ceiling.at(best.point.concurrency)
    assert bound is not None and best.point.output_tokens_per_s < bound.output_tokens_per_s


def test_without_aiconfigurator_l4_falls_back_to_the_roofline_in_one_line(
    model_8b: Path, shape: ModelShape, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    ranking = node.rank_layouts(model_8b, shape, "l4", 1, WORKLOAD, SLO, values=SMALL)
    assert ranking.is_ceiling and "infertop[predict]" in ranking.note and "\n" not in ranking.note
    best = ranking.best
    assert best is not None and best.prediction.source.startswith("roofline ceiling, not a prediction")


@needs_aic
def test_tune_dry_run_on_an_l4_ranks_by_the_empirical_estimate_and_says_so(tmp_path: Path) -> None:
    """`infertop tune --dry-run` asks aic.AiconfiguratorModel(model, shape, "l4") through Tuner._predict."""
    model = write_tiny_model(tmp_path / "llama-8b", **LLAMA_3_1_8B)
    config = TuneConfig(
        model=str(model), slo=SLO, store_path=tmp_path / "t.sqlite", out_dir=tmp_path / "out", gpus=False,
        prove=False,
    )  # fmt: skip
    tuner = Tuner(config)
    l4 = Hardware("NVIDIA L4", 1, 24 * 2**30, (8, 9))  # the GPU CI does not have
    tuner.hardware = l4
    space = default_space(tuner.shape, l4, {"max_model_len": 4096})
    tuner.space = SearchSpace(tuner.shape, l4, {**space.values, **SMALL}, {"max_model_len": 4096})
    plan = plan_dry_run(tuner)
    assert plan.source.startswith("ranked by aiconfigurator")
    assert "l4, EMPIRICAL: l4's speed of light x L40S's measured efficiency" in plan.source
    assert "no L4 data" in plan.source and "roofline" not in plan.source
    assert plan.ranking and plan.ranking[0][3] == "requests/s" and plan.ranking[0][2]
    assert "EMPIRICAL" in plan.text()


@needs_aic
def test_an_empirical_model_says_so_in_every_prediction(model_8b: Path, shape: ModelShape) -> None:
    """aiconfigurator 0.12 runs EMPIRICAL only where it has data (H100 SXM): the labels carry the mode."""
    model = aic.AiconfiguratorModel(model_8b, shape, "h100_sxm", "EMPIRICAL")
    assert model.kind.startswith("aiconfigurator EMPIRICAL (speed-of-light x empirical factors")
    prediction = model.predict(Candidate(), aic.hardware_for("h100_sxm", model), WORKLOAD)
    assert "EMPIRICAL" in prediction.source and prediction.fits
    silicon = aic.AiconfiguratorModel(model_8b, shape, "h100_sxm")
    assert silicon.mode == "SILICON" and "EMPIRICAL" not in silicon.source
    at_64 = prediction.at(64)
    assert at_64 is not None and at_64.output_tokens_per_s == pytest.approx(5801.3, abs=0.5)  # SILICON: 5,710


def test_bad_input_is_a_one_line_error(model_8b: Path, shape: ModelShape) -> None:
    with pytest.raises(PredictError, match="at least one GPU"):
        node.rank_layouts(model_8b, shape, "h100", 0, WORKLOAD, SLO)
    with pytest.raises(PredictError, match="unknown GPU 'h900'"):
        node.rank_layouts(model_8b, shape, "h900", 1, WORKLOAD, SLO)
    with pytest.raises(PredictError, match="objective"):
        node.rank_layouts(model_8b, shape, "h100", 1, WORKLOAD, SLO, objective="speed")
