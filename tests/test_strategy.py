"""The predict-then-measure strategy as the tuner's search loop asks it (one proposal started at a time, others
running): vLLM's defaults calibrate their own family, trials side by side explore families rather than repeat
one, and GPUs otherwise idle measure the incumbent's neighbours in what the model does not see."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.space import Candidate, SearchSpace
from tuner.tuning.strategy import HIDDEN_WHY, PredictedStrategy, family

H100X8 = Hardware("NVIDIA H100 80GB HBM3", 8, 80 * 2**30, (9, 0))


@dataclass
class Trial:
    candidate: Candidate
    node: float  # the node's measured capacity


@dataclass
class View:
    """The tuner as a strategy sees it: predictions of the node's capacity, measured trials."""

    space: SearchSpace
    predicted: dict[str, float]
    parallel: int = 8

    def predicted_node(self, candidate: Candidate) -> float | None:
        return self.predicted.get(candidate.key())

    def node_measured(self, outcome: Trial) -> float:
        return outcome.node

    def argued_for(self, base: Any, tried: set[str]) -> dict[str, str]:
        return {}

    def next_moves(self, base: Any, tried: set[str]) -> list[tuple[Candidate, str]]:
        return []

    def defaults_that_fit(self, defaults: Candidate) -> list[tuple[Candidate, str]]:
        return []

    def note_refusal(self, outcome: Any) -> None:
        return None


@pytest.fixture
def space(tmp_path: Path) -> SearchSpace:
    shape = ModelShape.from_dir(write_tiny_model(tmp_path / "llama-8b", **LLAMA_3_1_8B))
    values = {
        "quantization": (None, "fp8"),
        "kv_cache_dtype": (None,),
        "max_num_seqs": (128, 256),
        "max_num_batched_tokens": (2048, 8192),
        "max_model_len": (4096,),
        "gpu_memory_utilization": (0.9, 0.95),
        "tensor_parallel_size": (1, 2),
        "enable_chunked_prefill": (None,),
        "enable_prefix_caching": (None,),
    }
    return SearchSpace(shape, H100X8, values)


def _predicted(space: SearchSpace) -> dict[str, float]:
    """FP8 weights predicted best, TP 2 worst; batched tokens and memory fraction invisible to the model."""
    return {
        c.key(): (10.0 if c.quantization == "fp8" else 8.0) * (0.5 if c.tensor_parallel_size == 2 else 1.0)
        for c in space.feasible()
    }


def test_the_defaults_belong_to_the_one_gpu_family() -> None:
    assert family(Candidate()) == family(Candidate(tensor_parallel_size=1, max_num_seqs=64))
    assert family(Candidate()) != family(Candidate(tensor_parallel_size=2))


def test_beside_a_running_trial_the_next_proposal_explores_another_family(space: SearchSpace) -> None:
    view = View(space, _predicted(space))
    strategy = PredictedStrategy(view, {}, Candidate(max_model_len=4096))
    defaults = Candidate(max_model_len=4096).key()
    first = strategy.propose(set(), None)
    assert first[0][0].key() == defaults  # the configuration to beat goes first
    # The tuner starts the first proposal, then asks again: with the defaults (one GPU, bf16) running, the best
    # prediction (FP8 weights) comes next, from a family of its own.
    second = strategy.propose({defaults}, None)
    top = second[0][0]
    assert top.quantization == "fp8" and (top.tensor_parallel_size or 1) == 1
    # With FP8 on one GPU running too, the next starts a family nobody runs (TP 2), not FP8's runner-up.
    third = strategy.propose({defaults, top.key()}, None)
    assert [family(c) for c, _ in third][:2] == [("fp8", None, 2), (None, None, 2)]
    # Serially (nothing running) the ranker's own choice goes first, as before.
    strategy.record(Trial(Candidate(max_model_len=4096), 8.0))
    strategy.record(Trial(top, 10.0))
    serial = strategy.propose({defaults, top.key()}, None)
    assert serial[0][0].key() == strategy.ranker.next({defaults, top.key()})


def test_idle_gpus_measure_the_incumbents_hidden_neighbours_while_trials_run(space: SearchSpace) -> None:
    predicted = _predicted(space)
    view = View(space, predicted)
    defaults = Candidate(max_model_len=4096)
    strategy = PredictedStrategy(view, {}, defaults)
    best = next(
        c
        for c in space.feasible()
        if c.quantization == "fp8" and c.tensor_parallel_size == 1 and c.max_num_batched_tokens == 2048
        and c.gpu_memory_utilization == 0.9 and c.max_num_seqs == 256
    )  # fmt: skip
    # Every family measured below the best, its own family's smaller batches too: no untried configuration
    # could win by the model's error.
    strategy.record(Trial(defaults, 4.0))
    strategy.record(Trial(best, 20.0))
    others = [c for c in space.feasible() if family(c) != family(best) or c.max_num_seqs == 128]
    for c in others:
        strategy.record(Trial(c, 10.0 if family(c) == family(best) else 2.0))
    tried = {defaults.key(), best.key(), *(c.key() for c in others)}
    assert strategy.expected_left() == 0
    incumbent = Trial(best, 20.0)
    # Nothing running: the search ends.
    assert strategy.propose(tried, incumbent) == []
    # A trial still running elsewhere: the free GPUs go to the incumbent's neighbours in batched tokens and
    # memory fraction, which the model cannot tell apart.
    running = best.with_values(max_num_batched_tokens=8192, gpu_memory_utilization=0.95)
    proposals = strategy.propose(tried | {running.key()}, incumbent)
    assert proposals and all(why == HIDDEN_WHY for _, why in proposals)
    for candidate, _ in proposals:
        changed = {k for k, v in candidate.config_dict().items() if best.config_dict().get(k) != v} | {
            k for k in best.config_dict() if k not in candidate.config_dict()
        }
        assert len(changed) == 1 and changed <= {"max-num-batched-tokens", "gpu-memory-utilization"}
    assert {c.key() for c, _ in proposals} == {
        best.with_values(max_num_batched_tokens=8192).key(),
        best.with_values(gpu_memory_utilization=0.95).key(),
    }
