"""The decode-traffic estimate: model facts from config.json, safetensors headers and the server's flags; the
estimate from the server's own /metrics; and where it lands on GPU samples. The first test holds it to the real
H100's GPM reading (REFERENCE.md) within the band BENCHMARKS.md states."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuner.telemetry import modelfacts
from tuner.telemetry.bwestimate import (
    DecodeEstimate,
    ModelFacts,
    apply_estimates,
    estimate,
    facts_for,
    facts_from_argv,
)
from tuner.telemetry.model import EngineSample, GpuInfo, GpuSample

LLAMA_8B = Path(__file__).parent / "data" / "llama-3.1-8b-shape"
URL = "http://127.0.0.1:8000"

# --- the real H100 (REFERENCE.md) -----------------------------------------------------------------------------

# Llama-3.1-8B shape, FP8 weights (online) + FP8 KV, 512 in / 256 out on an H100 SXM (3,350 GB/s): out tok/s and
# tok/s per user (p50) at 64 and 128 users; GPM DRAM_BW_UTIL 47-51 % during such decode.
H100_PEAK_GBPS = 3350.0
GPM_PCT = (47.0, 51.0)
# BENCHMARKS.md §13: the estimate over GPM's reading, with either stand-in for the unrecorded step rate, and with
# the per-user decode speed (the closer one to the engine's own step count).
BAND_ANY_STAND_IN = (0.60, 1.00)
BAND_PER_USER = (0.70, 1.00)


def _reference_engine(steps_per_s: float, running: float) -> EngineSample:
    blocks, block = 50_000, 16
    tokens_in_use = running * (512 + 256 / 2 + block / 2)  # mean context, rounded up to whole blocks
    return EngineSample(
        url=URL,
        time_s=1.0,
        engine="vllm",
        server_pids=(1000,),
        requests_running=running,
        kv_cache_usage_pct=100.0 * tokens_in_use / (blocks * block),
        steps_per_s=steps_per_s,
        kv_cache_blocks=blocks,
        kv_block_size_tokens=block,
        kv_cache_dtype="fp8",
    )


@pytest.mark.parametrize(
    ("users", "out_tok_s", "tok_s_per_user", "stand_in", "table_pct"),
    [
        (64, 7710, 148, "tok/s / users", 38.7),
        (64, 7710, 148, "tok/s per user", 45.3),
        (128, 10295, 104, "tok/s / users", 32.3),
        (128, 10295, 104, "tok/s per user", 38.0),
    ],
)
def test_the_h100_fp8_runs_land_in_the_band_benchmarks_states_against_gpm(
    users: int, out_tok_s: float, tok_s_per_user: float, stand_in: str, table_pct: float
) -> None:
    facts = facts_for(str(LLAMA_8B), dtype=None, quantization="fp8", kv_cache_dtype="fp8")
    assert isinstance(facts, ModelFacts)
    assert "from config.json (no weight files)" in facts.basis and "fp8 weights (online)" in facts.basis
    steps = out_tok_s / users if stand_in == "tok/s / users" else tok_s_per_user
    gpu = GpuSample(index=0, time_s=1.0)
    info = GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-0", None, H100_PEAK_GBPS, "datasheet", True)
    engine = _reference_engine(steps, out_tok_s / steps)
    (out,) = apply_estimates((gpu,), (info,), (engine,), {URL: facts}, {1000: frozenset({0})})
    assert out.dram_bw_est_pct is not None and out.dram_bw_est_basis is not None
    low, high = BAND_PER_USER if stand_in == "tok/s per user" else BAND_ANY_STAND_IN
    assert low * GPM_PCT[0] <= out.dram_bw_est_pct <= high * GPM_PCT[1], out.dram_bw_est_basis
    # And exactly what BENCHMARKS.md §13's table says for this point (its ratios to GPM are the stated error).
    assert out.dram_bw_est_pct == pytest.approx(table_pct, abs=0.1), out.dram_bw_est_basis
    assert out.dram_bw_util_pct is None  # an estimate never fills the measured field


def test_the_8b_shape_reads_as_its_published_sizes() -> None:
    bf16 = facts_for(str(LLAMA_8B), dtype=None, quantization=None, kv_cache_dtype=None)
    fp8 = facts_for(str(LLAMA_8B), dtype="auto", quantization="fp8", kv_cache_dtype="fp8_e4m3")
    assert isinstance(bf16, ModelFacts) and isinstance(fp8, ModelFacts)
    linear = 32 * (
        2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    )  # q, o; k, v (GQA: 8 of 32 heads); MLP
    lm_head, norms = 128256 * 4096, 65 * 4096
    assert bf16.weight_bytes_per_step == 2 * (linear + lm_head + norms)  # the input embedding is not read
    assert fp8.weight_bytes_per_step == linear + 2 * (lm_head + norms)  # online FP8: Linear layers only
    assert bf16.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 2 * fp8.kv_bytes_per_token
    assert bf16.kv_heads == 8 and bf16.basis.endswith("bf16 weights; bf16 KV")
    # Batch 1 bf16: 152 tok/s against a ceiling of peak / bytes per step (REFERENCE: ~208 counting the embedding).
    ceiling = H100_PEAK_GBPS * 1e9 / (bf16.weight_bytes_per_step + 640 * bf16.kv_bytes_per_token)
    assert 215 < ceiling < 225


# --- config.json ----------------------------------------------------------------------------------------------

TINY: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
TINY_LINEAR = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
TINY_REST = 256 * 64 + 5 * 64  # lm_head and norms


def model_dir(path: Path, **config: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY, **config}))
    return path


def facts(path: Path | str, **flags: Any) -> ModelFacts:
    kwargs = {"dtype": None, "quantization": None, "kv_cache_dtype": None, **flags}
    found = facts_for(str(path), **kwargs)
    assert isinstance(found, ModelFacts), found
    return found


def reason(path: Path | str, **flags: Any) -> str:
    kwargs = {"dtype": None, "quantization": None, "kv_cache_dtype": None, **flags}
    found = facts_for(str(path), **kwargs)
    assert isinstance(found, str), found
    return found


def test_gqa_multi_head_and_an_explicit_head_dim(tmp_path: Path) -> None:
    gqa = facts(model_dir(tmp_path / "gqa"))
    assert gqa.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 and gqa.kv_heads == 2
    mha = facts(model_dir(tmp_path / "mha", num_key_value_heads=None))
    assert mha.kv_bytes_per_token == 2 * 2 * 4 * 16 * 2 and mha.kv_heads == 4
    wide = facts(model_dir(tmp_path / "wide", head_dim=32))  # Gemma-style: heads x head_dim != hidden
    assert wide.kv_bytes_per_token == 2 * 2 * 2 * 32 * 2
    assert wide.weight_bytes_per_step > gqa.weight_bytes_per_step
    assert facts(model_dir(tmp_path / "gqa"), dtype="float32").weight_bytes_per_step == 2 * (
        gqa.weight_bytes_per_step
    )
    assert facts(model_dir(tmp_path / "fp32", torch_dtype="float32")).basis.endswith("bf16 weights; bf16 KV")


def test_kv_cache_dtype_auto_is_the_model_dtype_and_fp8_one_byte(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m", torch_dtype="float16")
    assert facts(path).basis.endswith("fp16 KV")
    assert facts(path, kv_cache_dtype="fp8_e5m2").kv_bytes_per_token == 2 * 2 * 2 * 16
    assert reason(path, kv_cache_dtype="nvfp4") == "KV cache dtype nvfp4 is not estimated"
    assert reason(path, dtype="int3") == "--dtype int3 is not estimated"


def test_online_fp8_against_a_checkpoints_own_quantization(tmp_path: Path) -> None:
    plain = model_dir(tmp_path / "plain")
    assert facts(plain).weight_bytes_per_step == 2 * (TINY_LINEAR + TINY_REST)
    assert facts(plain, quantization="fp8").weight_bytes_per_step == TINY_LINEAR + 2 * TINY_REST
    assert reason(plain, quantization="gguf") == "--quantization gguf is not estimated"
    fp8_ckpt = model_dir(tmp_path / "fp8", quantization_config={"quant_method": "fp8"})
    found = facts(fp8_ckpt)
    assert found.weight_bytes_per_step == TINY_LINEAR + 2 * TINY_REST
    assert "8-bit weights (fp8 checkpoint)" in found.basis
    # The checkpoint's own quantization wins over the flag (vLLM checks they agree).
    assert facts(fp8_ckpt, quantization="fp8").basis == found.basis
    awq = model_dir(
        tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128}
    )
    assert facts(awq).weight_bytes_per_step == pytest.approx(TINY_LINEAR * (0.5 + 2 / 128) + 2 * TINY_REST)
    w4a16 = {"config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32}}}}
    ct = model_dir(tmp_path / "ct", quantization_config={"quant_method": "compressed-tensors", **w4a16})
    assert facts(ct).weight_bytes_per_step == pytest.approx(TINY_LINEAR * (0.5 + 2 / 32) + 2 * TINY_REST)
    odd = model_dir(tmp_path / "odd", quantization_config={"quant_method": "hqq"})
    assert reason(odd) == "checkpoint quantization hqq is not estimated without its weight files"


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"num_local_experts": 8}, "MoE models are not estimated (num_local_experts = 8)"),
        ({"n_routed_experts": 64}, "MoE models are not estimated (n_routed_experts = 64)"),
        ({"text_config": {"num_experts": 16}}, "MoE models are not estimated (num_experts = 16)"),
        ({"kv_lora_rank": 512}, "MLA attention (kv_lora_rank) is not estimated"),
        ({"mamba_d_state": 16}, "state-space (Mamba) layers are not estimated"),
        (
            {"layer_types": ["sliding_attention", "full_attention"]},
            "models with sliding-window or linear-attention layers are not estimated",
        ),
        ({"num_hidden_layers": -32}, "config.json num_hidden_layers is not a usable size (-32)"),
        ({"num_hidden_layers": 32.5}, "config.json num_hidden_layers is not a usable size (32.5)"),
        ({"num_hidden_layers": True}, "config.json num_hidden_layers is not a usable size (True)"),
        ({"num_hidden_layers": "32"}, "config.json num_hidden_layers is not a usable size ('32')"),
        ({"vocab_size": 10**30}, f"config.json vocab_size is not a usable size ({10**30})"),
        ({"hidden_size": None}, "config.json has no hidden_size / n_embd"),
    ],
)
def test_models_not_estimated_and_broken_sizes_give_a_reason(
    tmp_path: Path, config: dict[str, Any], why: str
) -> None:
    assert reason(model_dir(tmp_path / "m", **config)) == why


def test_dense_configs_that_merely_mention_experts_are_estimated(tmp_path: Path) -> None:
    assert facts(model_dir(tmp_path / "m", num_experts=0, layer_types=["full_attention"] * 2))


def test_hostile_config_files_give_a_reason_and_never_raise(tmp_path: Path) -> None:
    missing = tmp_path / "empty"
    missing.mkdir()
    assert reason(missing) == "model config not found (no config.json in empty)"
    bad = {
        "notjson": b"{'hidden_size': 64",
        "list": b"[1, 2, 3]",
        "deep": b"[" * 200_000 + b"]" * 200_000,
        "huge": b" " * (modelfacts.MAX_CONFIG_BYTES + 1),
        "binary": b"\xff\xfe\x00\x00garbage",
    }
    for name, data in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes(data)
        why = reason(tmp_path / name)
        assert why.startswith("model config not usable (config.json "), (name, why)
    assert reason(tmp_path / "huge") == "model config not usable (config.json is over 4 MiB)"
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")  # would block a reader that opened it
    assert reason(fifo) == "model config not usable (config.json is not a regular file)"
    (tmp_path / "dir" / "config.json").mkdir(parents=True)
    assert reason(tmp_path / "dir") == "model config not usable (config.json is not a regular file)"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    [k for names in modelfacts._ALIASES.values() for k in names]
    + ["head_dim", "quantization_config", "text_config", "num_experts", "layer_types", "torch_dtype"]
)


@given(st.dictionaries(_KEYS, _JSON | st.integers(-5, 70_000), max_size=12))
def test_any_config_gives_facts_with_finite_positive_sizes_or_a_reason(config: dict[str, Any]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        found = facts_for(tmp, dtype=None, quantization=None, kv_cache_dtype=None)
    if isinstance(found, ModelFacts):
        assert 0 < found.weight_bytes_per_step < 1e20 and 0 < found.kv_bytes_per_token < 1e15
        assert found.kv_heads >= 1
    else:
        assert isinstance(found, str) and len(found) < 400


# --- safetensors headers --------------------------------------------------------------------------------------

_ITEM = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4, "U8": 1}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A real safetensors file: 8-byte little-endian header length, the JSON header (padded to 8 bytes), data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = _ITEM[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))


def tiny_tensors(linear: str = "BF16", *, lm_head: bool = True) -> dict[str, tuple[str, list[int]]]:
    out: dict[str, tuple[str, list[int]]] = {"model.embed_tokens.weight": ("BF16", [256, 64])}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for name, shape in {
            "self_attn.q_proj": [64, 64],
            "self_attn.k_proj": [32, 64],
            "self_attn.v_proj": [32, 64],
            "self_attn.o_proj": [64, 64],
            "mlp.gate_proj": [128, 64],
            "mlp.up_proj": [128, 64],
            "mlp.down_proj": [64, 128],
        }.items():
            out[p + name + ".weight"] = (linear, shape)
            if linear == "F8_E4M3":
                out[p + name + ".weight_scale"] = ("F32", [])
        out[p + "input_layernorm.weight"] = ("BF16", [64])
        out[p + "post_attention_layernorm.weight"] = ("BF16", [64])
    out["model.norm.weight"] = ("BF16", [64])
    if lm_head:
        out["lm_head.weight"] = ("BF16", [256, 64])
    return out


def test_weights_from_safetensors_headers_match_the_config_and_count_one_output_head(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m")
    write_safetensors(path / "model.safetensors", tiny_tensors())
    found = facts(path)
    assert found.basis.startswith("config.json + safetensors headers; bf16 weights")
    assert found.weight_bytes_per_step == 2 * (TINY_LINEAR + TINY_REST)  # embedding left out, lm_head in
    assert facts(path, quantization="fp8").weight_bytes_per_step == TINY_LINEAR + 2 * TINY_REST
    # Tied: no lm_head tensor, the embedding is read as the output head.
    tied = model_dir(tmp_path / "tied", tie_word_embeddings=True)
    write_safetensors(tied / "model.safetensors", tiny_tensors(lm_head=False))
    assert facts(tied).weight_bytes_per_step == 2 * (TINY_LINEAR + TINY_REST)


def test_a_quantized_checkpoints_tensors_count_as_stored(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m", quantization_config={"quant_method": "fp8"})
    half = tiny_tensors("F8_E4M3")
    first = dict(list(half.items())[: len(half) // 2])
    write_safetensors(path / "model-00001-of-00002.safetensors", first)
    write_safetensors(path / "model-00002-of-00002.safetensors", {k: half[k] for k in half if k not in first})
    (path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    k: "model-00001-of-00002.safetensors"
                    if k in first
                    else "model-00002-of-00002.safetensors"
                    for k in half
                }
            }
        )
    )
    found = facts(path)
    scales = 14 * 2  # a float32 scalar scale per Linear weight, counted at the model dtype
    assert found.weight_bytes_per_step == TINY_LINEAR + scales + 2 * TINY_REST
    assert "weights as stored (fp8 checkpoint)" in found.basis
    # A shard missing: the estimate falls back to the config and says so.
    (path / "model-00002-of-00002.safetensors").unlink()
    found = facts(path)
    assert found.basis.startswith("from config.json (1 of 2 weight files absent)")
    assert found.weight_bytes_per_step == TINY_LINEAR + 2 * TINY_REST


def _header_of(text: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if declared is None else declared) + text


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (_header_of(b"{}", declared=2**40), "header length 1099511627776 is not believable"),
        (_header_of(b"{}", declared=100), "ends inside its header"),
        (b"\x01", "header length 1 is not believable"),
        (_header_of(b"nope"), "header is not JSON"),
        (_header_of(b"[]"), "header is not a JSON object"),
        (
            _header_of(b'{"w": {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 2]}}'),
            "a malformed tensor",
        ),
        (_header_of(b'{"w": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 0]}}'), "a malformed tensor"),
        (_header_of(b'{"w": {"dtype": "F32", "shape": [1]}}'), "a malformed tensor"),
        (None, "model.safetensors is not a regular file"),
    ],
)
def test_broken_weight_files_fall_back_to_the_config_with_the_reason(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = model_dir(tmp_path / "m")
    if content is None:
        os.mkfifo(path / "model.safetensors")  # would block a reader that opened it
    else:
        (path / "model.safetensors").write_bytes(content)
    found = facts(path)
    assert found.basis.startswith("from config.json (") and why in found.basis, found.basis
    assert found.weight_bytes_per_step == 2 * (TINY_LINEAR + TINY_REST)


def test_an_index_naming_files_outside_the_model_is_not_followed(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    assert "names unusable files" in facts(path).basis


# --- where the model is ---------------------------------------------------------------------------------------

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path, model_id: str) -> Path:
    repo = root / ("models--" + model_id.replace("/", "--"))
    model_dir(repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo


def test_a_hugging_face_id_is_found_in_the_cache_its_environment_names(tmp_path: Path) -> None:
    hf_cache(tmp_path / "hub", "acme/tiny-llama")
    found = facts_for(
        "acme/tiny-llama",
        dtype=None,
        quantization=None,
        kv_cache_dtype=None,
        env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert isinstance(found, ModelFacts) and found.model == "acme/tiny-llama"
    via_home = facts_for(
        "acme/tiny-llama", dtype=None, quantization=None, kv_cache_dtype=None, env={"HF_HOME": str(tmp_path)}
    )
    assert isinstance(via_home, ModelFacts)
    assert (
        facts_for("meta-llama/Llama-3.1-8B", dtype=None, quantization=None, kv_cache_dtype=None, env={})
        == "model config not found (meta-llama/Llama-3.1-8B not in the Hugging Face cache)"
    )
    assert reason("/models/nowhere") == "model config not found (/models/nowhere is not a directory)"


def test_without_refs_the_newest_snapshot_with_a_config_is_used(tmp_path: Path) -> None:
    repo = hf_cache(tmp_path / "hub", "acme/m")
    (repo / "refs" / "main").write_text("not a hash")
    model_dir(repo / "snapshots" / ("f" * 40), num_hidden_layers=4)
    os.utime(repo / "snapshots" / SNAPSHOT / "config.json", (1, 1))
    found = facts_for(
        "acme/m", dtype=None, quantization=None, kv_cache_dtype=None, env={"HF_HUB_CACHE": str(repo.parent)}
    )
    assert isinstance(found, ModelFacts) and found.kv_bytes_per_token == 2 * 4 * 2 * 16 * 2


# --- the server's command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "tp", "pp", "weights_1_byte", "kv_element"),
    [
        (["vllm", "serve", "{m}", "-tp", "2", "--kv-cache-dtype=fp8", "-q", "fp8"], 2, 1, True, 1),
        (
            [
                *("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model={m}"),
                *("--tensor_parallel_size", "4", "--quantization=fp8", "--kv_cache_dtype", "fp8_e4m3"),
            ],
            4,
            1,
            True,
            1,
        ),
        (["/usr/bin/vllm", "serve", "--model", "{m}", "-pp=2", "--dtype", "float16"], 1, 2, False, 2),
        (
            ["vllm", "serve", "{m}", "-tp", "2", "--port", "8000", "--tensor-parallel-size", "8"],
            8,
            1,
            False,
            2,
        ),
    ],
)
def test_argv_spellings(
    tmp_path: Path, argv: list[str], tp: int, pp: int, weights_1_byte: bool, kv_element: int
) -> None:
    path = model_dir(tmp_path / "m")
    found = facts_from_argv([a.replace("{m}", str(path)) for a in argv])
    assert isinstance(found, ModelFacts), found
    assert (found.tensor_parallel, found.pipeline_parallel) == (tp, pp)
    linear_bytes = 1 if weights_1_byte else 2
    assert found.weight_bytes_per_step == linear_bytes * TINY_LINEAR + 2 * TINY_REST
    assert found.kv_bytes_per_token == 2 * 2 * 2 * 16 * kv_element


def test_argv_relative_model_config_yaml_and_reasons(tmp_path: Path) -> None:
    model_dir(tmp_path / "models" / "m")
    found = facts_from_argv(["vllm", "serve", "models/m", "-dp", "2"], cwd=str(tmp_path))
    assert isinstance(found, ModelFacts) and found.data_parallel == 2 and found.model == "m"
    (tmp_path / "serve.yaml").write_text(
        "# exported by infertop\nmodel: models/m\ntensor-parallel-size: 2\nkv-cache-dtype: 'fp8'\n"
    )
    found = facts_from_argv(["vllm", "serve", "--config", "serve.yaml", "-tp", "4"], cwd=str(tmp_path))
    assert isinstance(found, ModelFacts)
    assert found.tensor_parallel == 4 and found.kv_bytes_per_element == 1  # the flag wins over the file
    assert facts_from_argv(["python", "app.py"]) == "not a vLLM server command line"
    assert facts_from_argv(["vllm", "serve", "--port", "8000"]) == "no model in the server's command line"
    assert (
        facts_from_argv(["vllm", "serve", "m", "-tp", "two"]) == "--tensor-parallel-size two is not a number"
    )
    assert facts_from_argv(["vllm", "serve", "--config", "/nonexistent.yaml"]).startswith(  # type: ignore[union-attr]
        "--config not read ("
    )


@pytest.mark.parametrize(
    ("flags", "engines", "api_servers"),
    [
        ([], 1, 1),
        (["-dp", "2"], 2, 2),  # vLLM's own load balancer: one API server per engine by default
        (["--data-parallel-size=4", "--api-server-count", "1"], 4, 1),
        (["-dp", "4", "-dpl", "2"], 2, 2),  # this node's share of a multi-node DP deployment
        (["-dp", "4", "--data-parallel-rank", "3"], 1, 1),  # an external load balancer: one engine per server
        (["-dp", "4", "--data_parallel_external_lb"], 1, 1),
    ],
)
def test_data_parallel_engines_and_api_servers_from_argv(
    tmp_path: Path, flags: list[str], engines: int, api_servers: int
) -> None:
    found = facts_from_argv(["vllm", "serve", str(model_dir(tmp_path / "m")), *flags])
    assert isinstance(found, ModelFacts)
    assert (found.data_parallel, found.api_servers) == (engines, api_servers)


def test_a_discovered_server_keeps_its_argv_out_of_sight(tmp_path: Path) -> None:
    from tuner.telemetry.discovery import discover_servers

    path = model_dir(tmp_path / "m")
    code = "import time; time.sleep(30)"
    argv = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--port", "18561"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--api-key", "s3cret-key", "-tp", "1"], start_new_session=True
    )
    try:
        deadline, found = time.monotonic() + 5, []
        while not found and time.monotonic() < deadline:
            found = [s for s in discover_servers() if s.url == "http://127.0.0.1:18561"]
            time.sleep(0.05)
        (server,) = found
        assert "s3cret-key" in server.argv and "s3cret-key" not in repr(server)
        assert isinstance(facts_from_argv(server.argv), ModelFacts)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- the estimate ---------------------------------------------------------------------------------------------


def model_facts(**fields: Any) -> ModelFacts:
    base: dict[str, Any] = {
        "model": "m",
        "weight_bytes_per_step": 8e9,
        "kv_bytes_per_token": 65536.0,
        "kv_heads": 8,
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "basis": "test",
        "kv_bytes_per_element": 1.0,
    }
    return ModelFacts(**{**base, **fields})


def engine(**fields: Any) -> EngineSample:
    # 10 % of 100,000 blocks of 16 tokens in use: 160,000 tokens, 10.49 GB of FP8 KV on the whole model.
    base: dict[str, Any] = {
        "url": URL,
        "time_s": 1.0,
        "engine": "vllm",
        "server_pids": (1000,),
        "requests_running": 100.0,
        "kv_cache_usage_pct": 10.0,
        "generation_tokens_per_s": 10_000.0,
        "steps_per_s": 100.0,
        "kv_cache_blocks": 100_000,
        "kv_block_size_tokens": 16,
    }
    return EngineSample(**{**base, **fields})


KV_IN_USE = 160_000 * 65536.0


def test_the_estimate_is_weights_plus_kv_in_use_times_steps() -> None:
    found = estimate(model_facts(), engine())
    assert isinstance(found, DecodeEstimate)
    assert found.weight_bytes_per_gpu == 8e9 and found.kv_bytes_per_gpu == KV_IN_USE
    assert found.bytes_per_s_per_gpu == pytest.approx((8e9 + KV_IN_USE) * 100)
    assert found.basis == "8.0 GB weights + 10.5 GB KV per step x 100 steps/s (est.)"


@pytest.mark.parametrize(
    ("tp", "pp", "kv_heads", "weights", "kv"),
    [
        (2, 1, 8, 4e9, KV_IN_USE / 2),
        (8, 1, 8, 1e9, KV_IN_USE / 8),
        (4, 1, 2, 2e9, KV_IN_USE / 2),  # 2 KV heads over 4 ranks: each rank holds a whole head (replicated)
        (1, 2, 8, 4e9, KV_IN_USE / 4),  # half the layers per stage, half the sequences per step
    ],
)
def test_tensor_and_pipeline_parallel_split(
    tp: int, pp: int, kv_heads: int, weights: float, kv: float
) -> None:
    found = estimate(model_facts(tensor_parallel=tp, pipeline_parallel=pp, kv_heads=kv_heads), engine())
    assert isinstance(found, DecodeEstimate)
    assert found.weight_bytes_per_gpu == pytest.approx(weights)
    assert found.kv_bytes_per_gpu == pytest.approx(kv)


def test_data_parallel_engines_share_the_summed_step_rate_and_the_summed_kv_cache() -> None:
    found = estimate(model_facts(data_parallel=2), engine())
    assert isinstance(found, DecodeEstimate) and found.steps_per_s == 50
    assert "50 steps/s per engine" in found.basis
    # vLLM publishes the engines' KV blocks summed (core_client.py): each engine's GPU holds half of it.
    one = estimate(model_facts(), engine())
    assert isinstance(one, DecodeEstimate)
    assert found.kv_bytes_per_gpu == pytest.approx(one.kv_bytes_per_gpu / 2)


def test_several_api_servers_take_the_step_rate_from_tokens() -> None:
    # Each API server counts the steps that carried its requests: the step count may hold a step twice.
    found = estimate(model_facts(data_parallel=2, api_servers=2), engine(steps_per_s=400.0))
    assert isinstance(found, DecodeEstimate) and found.steps_per_s == 100  # 10,000 tok/s over 100 running
    assert "(steps/s from tok/s / running requests)" in found.basis


def test_an_idle_server_carries_no_traffic_and_missing_inputs_give_reasons() -> None:
    idle = estimate(model_facts(), engine(steps_per_s=0.0, kv_cache_usage_pct=None, kv_cache_blocks=None))
    assert isinstance(idle, DecodeEstimate) and idle.bytes_per_s_per_gpu == 0
    assert idle.basis == "no decode steps: idle (est.)"
    from_tokens = estimate(model_facts(), engine(steps_per_s=None, generation_tokens_per_s=5000.0))
    assert isinstance(from_tokens, DecodeEstimate) and from_tokens.steps_per_s == 50
    assert "(steps/s from tok/s / running requests)" in from_tokens.basis
    assert estimate(model_facts(), engine(steps_per_s=None, requests_running=None)) == (
        "no step rate on the server's /metrics"
    )
    assert estimate(model_facts(), engine(kv_cache_blocks=None)) == (
        "no KV cache size on the server's /metrics (vllm:cache_config_info)"
    )
    assert (
        estimate(model_facts(), engine(kv_cache_usage_pct=None))
        == "no KV cache usage on the server's /metrics"
    )
    assert estimate(model_facts(), engine(error="timed out")) == "the server's /metrics was not read"


def test_the_servers_own_kv_cache_dtype_wins_over_the_flags() -> None:
    auto = estimate(model_facts(), engine(kv_cache_dtype="auto"))  # facts assumed FP8; the server runs 16-bit
    assert isinstance(auto, DecodeEstimate) and auto.kv_bytes_per_gpu == 2 * KV_IN_USE
    assert estimate(model_facts(), engine(kv_cache_dtype="nvfp4")) == "KV cache dtype nvfp4 is not estimated"


# --- onto the GPU samples -------------------------------------------------------------------------------------


def info(index: int, peak: float | None = 300.0) -> GpuInfo:
    return GpuInfo(index, "NVIDIA L4", f"GPU-{index}", None, peak, "datasheet", False)


def test_estimates_land_only_on_the_servers_gpus_that_nothing_measured() -> None:
    gpus = (
        GpuSample(index=0, time_s=1.0),
        GpuSample(index=1, time_s=1.0, dram_bw_util_pct=40.0, profiling_source="dcgm"),
        GpuSample(index=2, time_s=1.0),
        GpuSample(index=3, time_s=1.0, error="fell off the bus"),
    )
    tp4 = model_facts(tensor_parallel=4)
    out = apply_estimates(
        gpus,
        [info(i) for i in range(4)],
        [engine(server_pids=(1000, 1001))],
        {URL: tp4},
        {1000: frozenset({0, 1}), 1001: frozenset({3}), 7: frozenset({2})},
    )
    per_gpu = (2e9 + KV_IN_USE / 4) * 100 / 1e9
    assert out[0].dram_bw_est_gbps == pytest.approx(per_gpu)
    assert out[0].dram_bw_est_pct == pytest.approx(100 * per_gpu / 300)
    assert (
        out[0].dram_bw_est_basis
        == "2.0 GB weights + 2.6 GB KV per step x 100 steps/s (est.) [3 GPUs seen, TP x PP x DP = 4]"
    )
    assert out[1] == gpus[1] and out[2] == gpus[2] and out[3] == gpus[3]


def test_two_servers_on_one_gpu_add_up_and_one_unknown_leaves_only_the_reason() -> None:
    other = "http://127.0.0.1:8001"
    both = [engine(), engine(url=other, server_pids=(2000,), steps_per_s=50.0)]
    pids = {1000: frozenset({0}), 2000: frozenset({0})}
    a, b = model_facts(model="a"), model_facts(model="b", weight_bytes_per_step=2e9)
    (gpu,) = apply_estimates(
        (GpuSample(index=0, time_s=1.0),), [info(0, None)], both, {URL: a, other: b}, pids
    )
    assert gpu.dram_bw_est_gbps == pytest.approx(((8e9 + KV_IN_USE) * 100 + (2e9 + KV_IN_USE) * 50) / 1e9)
    assert gpu.dram_bw_est_pct is None  # no peak known for this GPU
    assert gpu.dram_bw_est_basis is not None and gpu.dram_bw_est_basis.startswith("a: 8.0 GB weights")
    assert " + b: 2.0 GB weights" in gpu.dram_bw_est_basis
    facts_or_reason = {URL: a, other: "MoE models are not estimated (num_local_experts = 8)"}
    (gpu,) = apply_estimates((GpuSample(index=0, time_s=1.0),), [info(0)], both, facts_or_reason, pids)
    assert gpu.dram_bw_est_gbps is None and gpu.dram_bw_est_pct is None
    assert (
        gpu.dram_bw_est_basis == f"no estimate: {other}: MoE models are not estimated (num_local_experts = 8)"
    )


def test_an_absurd_step_rate_gives_no_figure() -> None:
    (gpu,) = apply_estimates(
        (GpuSample(index=0, time_s=1.0),),
        [info(0)],
        [engine(steps_per_s=1e12)],
        {URL: model_facts()},
        {1000: frozenset({0})},
    )
    assert gpu.dram_bw_est_gbps is None and (gpu.dram_bw_est_basis or "").startswith(
        "no estimate: not believable"
    )


# --- a real vLLM server (the CPU build) --------------------------------------------------------------------------


@pytest.mark.vllm
def test_a_real_vllm_publishes_what_the_estimate_needs(vllm_server: Any, tiny_model_dir: Path) -> None:
    from tuner.telemetry.engines import EngineScraper

    scraper = EngineScraper(vllm_server.url, timeout_s=5.0)
    try:
        before = scraper.scrape(time.time())
        users, tokens = 8, 200  # long enough that the 8 requests overlap on this 2-core machine
        barrier = threading.Barrier(users)

        def one() -> None:
            barrier.wait()
            body = {
                "model": str(tiny_model_dir),
                "prompt": [5] * 32,
                "max_tokens": tokens,
                "ignore_eos": True,
            }
            httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=120).raise_for_status()

        threads = [threading.Thread(target=one) for _ in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.2)
        after = scraper.scrape(time.time())
    finally:
        scraper.close()
    assert after.kv_cache_blocks and after.kv_block_size_tokens and after.kv_cache_dtype == "auto"
    assert before.kv_cache_blocks == after.kv_cache_blocks
    assert after.steps_per_s is not None and after.generation_tokens_per_s is not None
    # One count per engine step, not per token: 8 overlapping requests of 200 tokens take at least 200 steps and
    # fewer than the 1,600 tokens they make (a count per token would be 1,600 exactly). How much they overlap
    # depends on this 2-core machine: one run here batched 2 a step on average (803 steps), others 4-8.
    steps = after.steps_per_s / after.generation_tokens_per_s * users * tokens
    assert tokens <= steps < 0.9 * users * tokens
    found = facts_from_argv(["vllm", "serve", str(tiny_model_dir)])
    assert isinstance(found, ModelFacts)
    assert isinstance(estimate(found, after), DecodeEstimate)
