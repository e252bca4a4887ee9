"""Model shapes, memory arithmetic, candidate flags and the validity rules of the search space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.serving.tinymodel import LLAMA_3_1_8B, LLAMA_3_2_1B, write_tiny_model
from tuner.telemetry.model import GpuInfo
from tuner.tuning.modelshape import Hardware, ModelShape, kv_bytes_per_token, weight_bytes
from tuner.tuning.space import (
    DIMENSIONS,
    Candidate,
    GiB,
    SpaceError,
    default_space,
    estimate_max_concurrency,
    estimate_memory,
    parse_pins,
    resolve,
    vllm_defaults,
)

H100_VRAM = 81559 * 2**20  # what NVML reports for an H100 80GB HBM3
L4_VRAM = 23034 * 2**20
A100_VRAM = 81920 * 2**20


def _gpu(name: str, vram: int, cc: tuple[int, int], index: int = 0) -> GpuInfo:
    return GpuInfo(index, name, f"GPU-{index}", vram, None, None, False, compute_capability=cc)


H100 = Hardware.from_gpus([_gpu("NVIDIA H100 80GB HBM3", H100_VRAM, (9, 0))])
L4 = Hardware.from_gpus([_gpu("NVIDIA L4", L4_VRAM, (8, 9))])
A100 = Hardware.from_gpus([_gpu("NVIDIA A100-SXM4-80GB", A100_VRAM, (8, 0))])
CPU = Hardware.cpu(1 * GiB)


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    return ModelShape.from_dir(write_tiny_model(tmp_path_factory.mktemp("8b"), **LLAMA_3_1_8B))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    return ModelShape.from_dir(write_tiny_model(tmp_path_factory.mktemp("tiny")))


# --- model shape ---------------------------------------------------------------------------------------


def test_llama_8b_shape_and_sizes(llama8b: ModelShape) -> None:
    assert (llama8b.num_layers, llama8b.num_kv_heads, llama8b.head_dim) == (32, 8, 128)
    assert llama8b.max_position_embeddings == 131072
    assert kv_bytes_per_token(llama8b) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_bytes_per_token(llama8b, "auto") == 131072
    assert kv_bytes_per_token(llama8b, "fp8") == 131072 // 2
    assert llama8b.param_count == pytest.approx(8.03e9, rel=0.005)  # Meta's model card: 8.03B
    assert weight_bytes(llama8b) == 2 * llama8b.param_count
    # FP8 turns the projections (32 layers x 218,103,808 params) to 1 byte; embeddings and head stay 16-bit.
    assert llama8b.linear_params == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert weight_bytes(llama8b, "fp8") == 6_979_321_856 + 2 * (llama8b.param_count - 6_979_321_856)


def test_tied_embeddings_count_once(tmp_path: Path) -> None:
    shape = ModelShape.from_dir(write_tiny_model(tmp_path, **LLAMA_3_2_1B))
    assert shape.tie_word_embeddings
    assert shape.param_count == pytest.approx(1.236e9, rel=0.005)  # Llama-3.2-1B: 1.24B


def test_config_variants_and_errors(tmp_path: Path) -> None:
    gpt2 = ModelShape.from_config(
        {
            "model_type": "gpt2",
            "n_layer": 12,
            "n_embd": 768,
            "n_head": 12,
            "vocab_size": 50257,
            "n_positions": 1024,
        }
    )
    assert (gpt2.num_kv_heads, gpt2.head_dim, gpt2.intermediate_size) == (12, 64, 4 * 768)
    nested = ModelShape.from_config(
        {"model_type": "mm", "text_config": {**_llama_config(), "vocab_size": 1000}}
    )
    assert nested.vocab_size == 1000
    awq = ModelShape.from_config(
        {**_llama_config(), "quantization_config": {"quant_method": "awq", "bits": 4}}
    )
    assert awq.quantization == "awq"
    assert weight_bytes(awq) == awq.linear_params // 2 + 2 * (awq.param_count - awq.linear_params)  # 4-bit
    with pytest.raises(SpaceError, match="num_hidden_layers"):
        ModelShape.from_config({"hidden_size": 64})
    with pytest.raises(SpaceError, match="not found"):
        ModelShape.from_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpaceError, match="cannot read"):
        ModelShape.from_dir(tmp_path)


def _llama_config() -> dict[str, object]:
    return {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    }


# --- hardware and vLLM's defaults ----------------------------------------------------------------------


def test_hardware_from_telemetry() -> None:
    two = Hardware.from_gpus(
        [_gpu("NVIDIA L4", L4_VRAM, (8, 9), 0), _gpu("NVIDIA L4", L4_VRAM - 2**20, (8, 9), 1)]
    )
    assert (two.gpu_count, two.vram_per_gpu_bytes, two.fp8_supported) == (2, L4_VRAM - 2**20, True)
    assert not A100.fp8_supported and H100.fp8_supported and not CPU.fp8_supported
    unknown_cc = Hardware("NVIDIA H100 80GB HBM3", 1, H100_VRAM, None)
    assert unknown_cc.fp8_supported  # the datasheet table knows
    assert Hardware.from_dict(json.loads(json.dumps(H100.to_dict()))) == H100
    with pytest.raises(SpaceError, match="no GPU"):
        Hardware.from_gpus([])
    with pytest.raises(SpaceError, match="memory size is unknown"):
        Hardware.from_gpus([GpuInfo(0, "x", "u", None, None, None, False)])


def test_vllm_defaults_follow_its_source() -> None:
    assert (vllm_defaults(H100).max_num_seqs, vllm_defaults(H100).max_num_batched_tokens) == (1024, 8192)
    assert (vllm_defaults(L4).max_num_seqs, vllm_defaults(L4).max_num_batched_tokens) == (256, 2048)
    assert vllm_defaults(A100).max_num_seqs == 256  # vLLM excludes A100 from the large defaults
    b200 = Hardware("NVIDIA B200", 1, 183 * GiB, (10, 0))
    assert vllm_defaults(b200).max_num_batched_tokens == 16384
    assert vllm_defaults(CPU).max_num_seqs == 128
    assert vllm_defaults(H100).gpu_memory_utilization == 0.92


# --- candidates ----------------------------------------------------------------------------------------


def test_candidate_flags_key_and_label() -> None:
    c = Candidate(quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=256, gpu_memory_utilization=0.9)
    assert c.vllm_args() == (
        "--quantization",
        "fp8",
        "--kv-cache-dtype",
        "fp8",
        "--max-num-seqs",
        "256",
        "--gpu-memory-utilization",
        "0.9",
    )
    assert c.config_dict() == {
        "quantization": "fp8",
        "kv-cache-dtype": "fp8",
        "max-num-seqs": 256,
        "gpu-memory-utilization": 0.9,
    }
    assert c.key() == "gpu-memory-utilization=0.9;kv-cache-dtype=fp8;max-num-seqs=256;quantization=fp8"
    assert c.label() == "fp8 w, fp8 kv, seqs 256, mem 0.90"
    assert Candidate().key() == "vllm-defaults" and Candidate().label() == "vLLM defaults"
    assert Candidate(kv_cache_dtype="auto") == Candidate()
    assert Candidate(enable_chunked_prefill=False).vllm_args() == ("--no-enable-chunked-prefill",)
    off = Candidate(enable_prefix_caching=False)
    assert off.vllm_args() == ("--no-enable-prefix-caching",) and off.label() == "no prefix cache"
    assert off.key() == "enable-prefix-caching=false"
    assert Candidate.from_config_dict({"model": "m", **c.config_dict()}) == c
    assert Candidate.from_config_dict({"max_num_seqs": "64"}).max_num_seqs == 64


@pytest.mark.parametrize(
    "bad",
    [
        {"max_num_seqs": 0},
        {"max_num_seqs": True},
        {"gpu_memory_utilization": 1.5},
        {"quantization": ""},
        {"enable_prefix_caching": "no"},
    ],
)
def test_candidate_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(SpaceError):
        Candidate(**bad)  # type: ignore[arg-type]


def test_parse_pins() -> None:
    pins = parse_pins(
        [
            "max-num-seqs=128",
            "--quantization=none",
            "enable_chunked_prefill=false",
            "enable-prefix-caching=true",
        ]
    )
    assert pins == {
        "max_num_seqs": 128, "quantization": None, "enable_chunked_prefill": False, "enable_prefix_caching": True,
    }  # fmt: skip
    for bad, message in (
        ("max-num-seqs", "NAME=VALUE"),
        ("speed=3", "unknown dimension"),
        ("max-num-seqs=x", "x"),
    ):
        with pytest.raises(SpaceError, match=message):
            parse_pins([bad])


# --- the space and its rules ---------------------------------------------------------------------------


def test_h100_space_tries_fp8_and_every_candidate_fits(llama8b: ModelShape) -> None:
    space = default_space(llama8b, H100)
    assert space.values["quantization"] == (None, "fp8") and space.values["kv_cache_dtype"] == (None, "fp8")
    assert space.values["max_num_seqs"] == (64, 128, 256, 512)
    candidates = list(space.candidates())
    assert space.values["enable_prefix_caching"] == (
        None,
        False,
    )  # off tried on GPUs, where evidence argues for it
    assert len(candidates) == 2 * 2 * 4 * 3 * 2 * 2 == len({c.key() for c in candidates})
    assert space.feasible() == candidates  # an 8B model fits an H100 at its full context
    assert set(DIMENSIONS) == set(space.values)


@pytest.mark.parametrize("hardware", [A100, CPU], ids=["A100 (cc 8.0)", "CPU build"])
def test_fp8_dimensions_vanish_without_fp8_hardware(hardware: Hardware, tiny: ModelShape) -> None:
    space = default_space(tiny, hardware)
    assert space.values["quantization"] == (None,) and space.values["kv_cache_dtype"] == (None,)
    assert not any(c.fp8_weights or c.fp8_kv_cache for c in space.candidates())
    verdict = space.check(Candidate(kv_cache_dtype="fp8"))
    assert not verdict.ok
    assert ("8.9" in verdict.reasons[0]) if hardware is A100 else ("CPU build" in verdict.reasons[0])
    with pytest.raises(SpaceError, match="pinned values cannot run here"):
        default_space(tiny, hardware, {"quantization": "fp8"})


def test_pins_are_respected(llama8b: ModelShape) -> None:
    space = default_space(llama8b, H100, {"max_num_seqs": 96, "quantization": None, "max_model_len": 8192})
    candidates = list(space.candidates())
    assert {c.max_num_seqs for c in candidates} == {96}
    assert {c.quantization for c in candidates} == {None}
    assert {c.max_model_len for c in candidates} == {8192}
    assert {c.kv_cache_dtype for c in candidates} == {None, "fp8"}  # not pinned: still searched
    assert space.baseline() == Candidate(max_num_seqs=96, max_model_len=8192)


def test_memory_rules(llama8b: ModelShape) -> None:
    # bf16 Llama-3.1-8B on a 24 GB L4: 15 GiB of weights leave ~4 GiB of KV cache, not one 131072-token sequence.
    verdict = default_space(llama8b, L4).check(Candidate())
    assert not verdict.ok
    assert "less than one --max-model-len 131072 sequence" in verdict.reasons[0]
    assert verdict.memory is not None and 0 < verdict.memory.kv_capacity_tokens < 131072
    assert default_space(llama8b, L4).check(Candidate(max_model_len=8192)).ok
    assert default_space(llama8b, L4).check(Candidate(quantization="fp8", kv_cache_dtype="fp8")).ok
    tiny_gpu = Hardware("NVIDIA T4", 1, 16 * GiB, (7, 5))
    assert "exceed the" in default_space(llama8b, tiny_gpu).check(Candidate()).reasons[0]
    # On the H100 the estimate lands where vLLM logs it for this model: ~56 GiB of KV cache at 0.92.
    memory = estimate_memory(Candidate(), llama8b, H100)
    assert 52 * GiB < memory.kv_cache_bytes < 60 * GiB
    assert estimate_memory(
        Candidate(kv_cache_dtype="fp8"), llama8b, H100
    ).kv_capacity_tokens == pytest.approx(2 * memory.kv_capacity_tokens, rel=0.001)


def test_scheduler_rules(llama8b: ModelShape) -> None:
    space = default_space(llama8b, H100)
    assert (
        "< --max-num-seqs 512"
        in space.check(Candidate(max_num_seqs=512, max_num_batched_tokens=256)).reasons[0]
    )
    no_chunking = Candidate(max_model_len=8192, max_num_batched_tokens=2048, enable_chunked_prefill=False)
    assert "without chunked prefill" in space.check(no_chunking).reasons[0]
    assert space.check(no_chunking.with_values(enable_chunked_prefill=None)).ok
    assert "positions" in space.check(Candidate(max_model_len=200_000)).reasons[0]


def test_tensor_parallel_sizes(llama8b: ModelShape) -> None:
    eight = Hardware.from_gpus([_gpu("NVIDIA H100 80GB HBM3", H100_VRAM, (9, 0), i) for i in range(8)])
    assert default_space(llama8b, eight).values["tensor_parallel_size"] == (1, 2, 4, 8)
    assert (
        "does not divide the 32 attention heads"
        in default_space(llama8b, eight).check(Candidate(tensor_parallel_size=3)).reasons[0]
    )
    assert (
        "needs more than the 8 GPUs"
        in default_space(llama8b, eight).check(Candidate(tensor_parallel_size=16)).reasons[0]
    )
    three = Hardware.from_gpus([_gpu("NVIDIA L4", L4_VRAM, (8, 9), i) for i in range(3)])
    odd_heads = ModelShape.from_config(
        {**_llama_config(), "num_attention_heads": 9, "num_key_value_heads": 3}
    )
    assert default_space(odd_heads, three).values["tensor_parallel_size"] == (1, 3)
    # 32 heads: 3 does not divide them; TP 2 runs one replica and leaves a GPU idle (the node's ranking counts it)
    assert default_space(llama8b, three).values["tensor_parallel_size"] == (1, 2)
    with pytest.raises(SpaceError, match="does not divide"):
        default_space(llama8b, three, {"tensor_parallel_size": 3})
    # TP 2 halves the weights and the KV heads each GPU holds: more than twice the cache.
    one_rank = estimate_memory(Candidate(), llama8b, eight).kv_capacity_tokens
    two_ranks = estimate_memory(Candidate(tensor_parallel_size=2), llama8b, eight).kv_capacity_tokens
    assert two_ranks > 2 * one_rank


def test_small_gpu_shortens_max_model_len(llama8b: ModelShape) -> None:
    a10 = Hardware("NVIDIA A10", 1, 24 * GiB, (8, 6))  # no FP8: bf16 weights leave ~4 GiB
    space = default_space(llama8b, a10)
    (max_len,) = space.values["max_model_len"]
    assert max_len is not None and max_len < 131072 and max_len & (max_len - 1) == 0
    assert space.feasible()


def test_estimate_max_concurrency(llama8b: ModelShape, tiny: ModelShape) -> None:
    capped = estimate_max_concurrency(Candidate(max_num_seqs=64), llama8b, H100, 512, 256)
    assert capped == 64
    by_memory = estimate_max_concurrency(Candidate(), llama8b, H100, 512, 256)
    assert 400 < by_memory < 1024  # ~56 GiB / (768 tokens x 128 KiB)
    assert estimate_max_concurrency(Candidate(), llama8b, L4, 512, 256) < 100
    # CPU build: 1 GiB of cache for the tiny model's 2 layers x 2 KV heads x 32 x 2 bytes x 2 = 512 B/token.
    assert kv_bytes_per_token(tiny) == 512
    assert resolve(Candidate(), CPU, tiny).max_num_seqs == 128
    assert estimate_max_concurrency(Candidate(), tiny, CPU, 100, 28) == 128
