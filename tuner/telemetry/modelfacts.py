"""What one decode step of a model server reads: :class:`ModelFacts` from the model's ``config.json`` (and its
safetensors headers where the weight files are present) and the server's flags, for the decode-traffic
estimate of :mod:`tuner.telemetry.bwestimate`. :mod:`tuner.telemetry.vllmargs` reads those flags from a server's
command line.

Weights are counted at their runtime dtypes: 16-bit for vLLM's ``--dtype auto`` (it runs float32 checkpoints
in 16 bits too), Linear weights at 1 byte under online ``--quantization fp8`` (embedding and output head stay
16-bit), a pre-quantized checkpoint's tensors as stored. The input embedding is left out (a step reads only
its batch's rows); the output head is read whole, also when it is the tied embedding. KV bytes per token are
2 (K and V) x layers x KV heads x head dim x the KV cache dtype's bytes ("auto" = the model's dtype).

Model files are foreign data: every read is capped, a file that is not a regular file is not opened, and a
broken or hostile file gives a reason in words (or, for weight files, the estimate from config.json with that
reason in its basis), never an exception.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.telemetry.foreign import printable

MAX_CONFIG_BYTES = 4 * 2**20
"""The largest config.json (or model.safetensors.index.json, or --config YAML) read; real ones are a few KiB."""
MAX_HEADER_BYTES = 64 * 2**20
"""The largest safetensors header read (the JSON after the 8-byte length); an 8B model's is about 30 KiB."""
MAX_WEIGHT_FILES = 512
MAX_TENSORS = 500_000
HF_CACHE_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
"""The environment variables that place the Hugging Face cache: all a caller needs from a server's environment."""

_DTYPE_BYTES = {"auto": 2, "half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4}
_SHORT = {"half": "fp16", "float16": "fp16", "bfloat16": "bf16", "float": "fp32", "float32": "fp32"}
# vllm/utils/torch_utils.py STR_DTYPE_TO_TORCH_DTYPE; "auto" is the model's dtype. Scales of the per-token-head
# variants (a few % more) are left out.
_KV_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "int8": 1,
    "fp8_per_token_head": 1,
    "int8_per_token_head": 1,
}
# Online quantization of 16-bit checkpoints that makes Linear weights 1 byte (vLLM's Fp8Config quantizes
# LinearBase layers only: the embedding and ParallelLMHead stay in the model dtype).
_ONLINE_FP8 = frozenset({"fp8", "ptpc_fp8"})
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_SSM_KEYS = ("ssm_state_size", "mamba_d_state", "mamba_expand", "ssm_cfg")
_NON_GATED_MLP = frozenset(
    {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "gpt_bigcode", "starcoder2", "phi"}
)
_ALIASES: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"),
    "vocab": ("vocab_size", "padded_vocab_size"),
}
_LIMITS = {"layers": 10_000, "hidden": 1_000_000, "heads": 100_000, "kv_heads": 100_000, "head_dim": 65_536}
_LIMITS |= {"intermediate": 10_000_000, "vocab": 100_000_000}
# safetensors: https://github.com/huggingface/safetensors (format). Floating tensors run in the model dtype.
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)\.weight$")
_LM_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$|^output\.weight$")
# Read for some tokens only (position tables: the batch's rows) or never while decoding text.
_NOT_READ = re.compile(
    r"wpe\.weight$|position_embeddings|embed_positions|rotary_emb|vision|visual|audio|mm_proj"
)
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?")


@dataclass(frozen=True)
class ModelFacts:
    """What a decode step of one model server reads, from its model files and flags."""

    model: str  # name shown
    weight_bytes_per_step: float  # whole model, at runtime dtypes: lm_head included, embedding rows not
    kv_bytes_per_token: float  # whole model: all layers, K and V, at the KV cache dtype
    kv_heads: int  # how KV splits over TP ranks (replicated when kv_heads < TP)
    tensor_parallel: int
    pipeline_parallel: int
    basis: str  # short, for people: "config.json + safetensors headers; fp8 weights (online); fp8 KV"
    data_parallel: int = 1  # engines behind this server's /metrics; each runs TP x PP GPUs
    # API server processes: above 1, each counts the engine steps that carried its requests, so vLLM's step count
    # may count a step more than once, and the estimate takes its step rate from tokens instead.
    api_servers: int = 1
    dtype_bytes: int = 2  # the model's runtime dtype: what a KV cache dtype of "auto" means
    kv_bytes_per_element: float = 2.0  # the KV dtype kv_bytes_per_token was worked out for

    def kv_bytes_per_token_as(self, kv_cache_dtype: str | None) -> float | None:
        """KV bytes per token at the dtype the server itself reports (None: as assumed); None: unknown dtype."""
        if kv_cache_dtype is None:
            return self.kv_bytes_per_token
        size = self.dtype_bytes if kv_cache_dtype == "auto" else _KV_BYTES.get(kv_cache_dtype)
        return None if size is None else self.kv_bytes_per_token * size / self.kv_bytes_per_element


# --- reading files -------------------------------------------------------------------------------------------


def read_capped(path: Path, cap: int) -> bytes | str:
    """A regular file's bytes, or why not (missing, not a regular file, over ``cap``)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return f"{path.name} is not a regular file"
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        return f"cannot read {path.name} ({exc.strerror or type(exc).__name__})"
    return data if len(data) <= cap else f"{path.name} is over {cap // 2**20} MiB"


def _read_json(path: Path, cap: int = MAX_CONFIG_BYTES) -> dict[str, Any] | str:
    data = read_capped(path, cap)
    if isinstance(data, str):
        return data
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return f"{path.name} is not JSON"
    return parsed if isinstance(parsed, dict) else f"{path.name} is not a JSON object"


def _count(config: Mapping[str, Any], name: str) -> int | str | None:
    """A positive whole number under one of ``name``'s spellings: None when absent, a reason when bad."""
    for key in _ALIASES.get(name, (name,)):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _LIMITS[name]:
            return f"config.json {key} is not a usable size ({printable(repr(value), 40)})"
        return value
    return None


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    config_dtype: str | None
    quant: Mapping[str, Any] | None  # the checkpoint's quantization_config


def _shape(config: Mapping[str, Any]) -> _Shape | str:
    text = config.get("text_config")
    if isinstance(text, Mapping):  # multimodal: the language model's sizes
        config = {**config, **text}
    for key in _MOE_KEYS:
        experts = config.get(key)
        if isinstance(experts, int) and not isinstance(experts, bool) and experts > 1:
            return f"MoE models are not estimated ({key} = {experts})"
    if config.get("kv_lora_rank") is not None:
        return "MLA attention (kv_lora_rank) is not estimated"
    if any(config.get(key) is not None for key in _SSM_KEYS):
        return "state-space (Mamba) layers are not estimated"
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and any(t not in ("full_attention", "attention") for t in layer_types):
        return "models with sliding-window or linear-attention layers are not estimated"
    sizes: dict[str, int] = {}
    for name in ("layers", "hidden", "heads", "vocab", "kv_heads", "intermediate", "head_dim"):
        value = _count(config, name)
        if isinstance(value, str):
            return value
        if value is not None:
            sizes[name] = value
    missing = [name for name in ("layers", "hidden", "heads", "vocab") if name not in sizes]
    if missing:
        return f"config.json has no {' / '.join(_ALIASES[missing[0]][:2])}"
    model_type = str(config.get("model_type", ""))
    quant = config.get("quantization_config")
    dtype = config.get("torch_dtype") or config.get("dtype")
    return _Shape(
        layers=sizes["layers"],
        hidden=sizes["hidden"],
        heads=sizes["heads"],
        kv_heads=sizes.get("kv_heads", 1 if config.get("multi_query") is True else sizes["heads"]),
        head_dim=sizes.get("head_dim", max(1, sizes["hidden"] // sizes["heads"])),
        intermediate=sizes.get("intermediate", 4 * sizes["hidden"]),
        vocab=sizes["vocab"],
        gated_mlp=model_type not in _NON_GATED_MLP,
        config_dtype=dtype if isinstance(dtype, str) else None,
        quant=quant if isinstance(quant, Mapping) else None,
    )


def _linear_params(s: _Shape) -> int:
    q_and_o = 2 * s.hidden * s.heads * s.head_dim
    k_and_v = 2 * s.hidden * s.kv_heads * s.head_dim
    mlp = (3 if s.gated_mlp else 2) * s.hidden * s.intermediate
    return s.layers * (q_and_o + k_and_v + mlp)


def _checkpoint_bytes_per_weight(quant: Mapping[str, Any]) -> tuple[float, str] | str:
    """Bytes per linear weight of a pre-quantized checkpoint (group scales included), from its
    quantization_config alone: what the config-only estimate needs."""
    method = str(quant.get("quant_method", "")).lower()
    bits: Any = None
    group: Any = None
    if method == "fp8":
        bits = 8
    elif method == "compressed-tensors":
        groups = quant.get("config_groups")
        first = next(iter(groups.values()), None) if isinstance(groups, Mapping) and groups else None
        weights = first.get("weights") if isinstance(first, Mapping) else None
        if isinstance(weights, Mapping):
            bits, group = weights.get("num_bits"), weights.get("group_size")
    elif method in ("gptq", "awq", "gptq_marlin", "awq_marlin"):
        bits = quant.get("bits", quant.get("w_bit"))
        group = quant.get("group_size", quant.get("q_group_size"))
    elif method == "modelopt":
        algo = str(quant.get("quant_algo", "")).upper()
        bits, group = {"FP8": (8, None), "NVFP4": (4, 16)}.get(algo, (None, None))
    elif method == "bitsandbytes":
        bits = 4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None
        group = 64 if bits == 4 else None
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        return f"checkpoint quantization {printable(method or '?', 40)} is not estimated without its weight files"
    scale = 2 / group if isinstance(group, int) and not isinstance(group, bool) and group > 0 else 0.0
    return bits / 8 + scale, f"{bits}-bit weights ({printable(method, 40)} checkpoint)"


def _weight_files(directory: Path) -> list[Path] | str | None:
    """The safetensors files vLLM loads: the index's files where there is one, else every *.safetensors (a
    consolidated.safetensors beside shards is Mistral's other format, not loaded twice). None: no weight files;
    a reason: some are missing or unreadable."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        parsed = _read_json(index)
        if isinstance(parsed, str):
            return parsed
        weight_map = parsed.get("weight_map")
        if not isinstance(weight_map, Mapping):
            return f"{index.name} has no weight_map"
        names = {v for v in list(weight_map.values())[:MAX_TENSORS] if isinstance(v, str)}
        if len(names) > MAX_WEIGHT_FILES or any("/" in n or n.startswith(".") for n in names):
            return f"{index.name} names unusable files"
        files = [directory / n for n in sorted(names)]
        missing = [f for f in files if not f.exists()]
        return files if not missing else f"{len(missing)} of {len(files)} weight files absent"
    try:
        found = sorted(itertools.islice(directory.glob("*.safetensors"), MAX_WEIGHT_FILES + 1))
    except OSError:
        return None
    if len(found) > MAX_WEIGHT_FILES:
        return "too many weight files"
    shards = [p for p in found if not p.name.startswith("consolidated")]
    return (shards or found) or None


def _header(path: Path) -> dict[str, Any] | str:
    """A safetensors file's JSON header: the first 8 bytes (little-endian) give its length."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return f"{path.name} is not a regular file"
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                return f"{path.name}: header length {size} is not believable"
            raw = f.read(size)
    except OSError as exc:
        return f"cannot read {path.name} ({exc.strerror or type(exc).__name__})"
    if len(raw) != size:
        return f"{path.name} ends inside its header"
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        return f"{path.name}: header is not JSON"
    return header if isinstance(header, dict) else f"{path.name}: header is not a JSON object"


def _tensor_size(entry: Any) -> tuple[str, int, int, int] | None:
    """(dtype, elements, stored bytes, dimensions) of one header entry; None if malformed."""
    if not isinstance(entry, Mapping):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or len(shape) > 8:
        return None
    if not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**50 for v in (*shape, *offsets)
    ):
        return None
    elements = math.prod(shape)
    if offsets[1] < offsets[0] or elements > 2**50:
        return None
    return dtype, elements, offsets[1] - offsets[0], len(shape)


def _weights_from_headers(files: Sequence[Path], dtype_bytes: int, online_fp8: bool) -> float | str:
    """Bytes of weights a decode step reads, from the tensors' dtypes and shapes: floating tensors at the model
    dtype (Linear weights at 1 byte under online FP8), quantized ones as stored; the input embedding left out
    (only the batch's rows are read) unless it is also the output head (tied)."""
    total, lm_head, embedding, tensors = 0.0, 0.0, 0.0, 0
    for path in files:
        header = _header(path)
        if isinstance(header, str):
            return header
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            tensors += 1
            if tensors > MAX_TENSORS:
                return "too many tensors in the weight files"
            size = _tensor_size(entry)
            if size is None:
                return f"{path.name}: a malformed tensor entry"
            dtype, elements, stored, dims = size
            if _NOT_READ.search(name):
                continue
            is_float = dtype in _FLOAT_DTYPES
            if _EMBEDDING.search(name):
                embedding += elements * dtype_bytes if is_float else stored
            elif _LM_HEAD.search(name):
                lm_head += elements * dtype_bytes if is_float else stored
            elif is_float:
                linear = online_fp8 and dims == 2 and name.endswith(".weight")
                total += elements * (1 if linear else dtype_bytes)
            else:
                total += stored
    if total <= 0:
        return "the weight files hold no decoder weights"
    return total + (lm_head or embedding)


# --- the model and its flags ---------------------------------------------------------------------------------


def hf_cache_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where the Hugging Face hub cache may be, most specific first (huggingface_hub's constants)."""
    env = os.environ if env is None else env
    dirs = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE")]
    if env.get("HF_HOME"):
        dirs.append(os.path.join(env["HF_HOME"], "hub"))
    if env.get("XDG_CACHE_HOME"):
        dirs.append(os.path.join(env["XDG_CACHE_HOME"], "huggingface", "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return [Path(d) for d in dirs if d]


def _snapshot(model_id: str, env: Mapping[str, str] | None) -> Path | None:
    """The cached snapshot of ``org/name`` holding a config.json: the one refs/main names, else the newest."""
    for cache in hf_cache_dirs(env):
        repo = cache / ("models--" + model_id.replace("/", "--"))
        ref = read_capped(repo / "refs" / "main", 256)
        if isinstance(ref, bytes) and re.fullmatch(rb"[0-9a-f]{40}\s*", ref):
            chosen = repo / "snapshots" / ref.decode().strip()
            if (chosen / "config.json").is_file():
                return chosen
        try:
            snaps = list(itertools.islice((repo / "snapshots").iterdir(), 64))
            dated = [((p / "config.json").stat().st_mtime, p) for p in snaps if (p / "config.json").is_file()]
        except OSError:
            continue
        if dated:
            return max(dated)[1]
    return None


def _model_dir(model: str, env: Mapping[str, str] | None, cwd: str | None) -> tuple[Path, str] | str:
    local = Path(os.path.expanduser(model))
    if not local.is_absolute() and cwd:
        local = Path(cwd) / local
    if local.is_dir():
        return local, printable(local.name or model, 80)
    if _HF_ID.fullmatch(model) and ".." not in model:
        snapshot = _snapshot(model, env)
        if snapshot is not None:
            return snapshot, model
        return f"model config not found ({model} not in the Hugging Face cache)"
    return f"model config not found ({printable(model, 80)} is not a directory)"


def _short_dtype(dtype: str, config_dtype: str | None) -> str:
    """How people write the runtime dtype; vLLM's "auto" runs a float32 checkpoint in bf16 on GPUs that have
    it (config/model.py _resolve_auto_dtype), so "auto" is the checkpoint's 16-bit dtype or "bf16"."""
    if dtype != "auto":
        return _SHORT.get(dtype, dtype)
    return "fp16" if config_dtype in ("float16", "half") else "bf16"


def _short_kv(kv_dtype: str, model_dtype: str) -> str:
    if kv_dtype == "auto":
        return model_dtype
    if kv_dtype.startswith(("fp8", "int8")):
        return kv_dtype[:4]
    return _SHORT.get(kv_dtype, kv_dtype)


def _weights(
    directory: Path, shape: _Shape, dtype_bytes: int, dtype_shown: str, online_fp8: bool
) -> tuple[float, str] | str:
    """Bytes of weights per step and where they came from ("config.json + safetensors headers; bf16 weights"):
    from the weight files' headers where they are all there and readable, else from config.json's shapes (the
    basis then says why); a reason when neither can tell."""
    files = _weight_files(directory)
    from_headers = _weights_from_headers(files, dtype_bytes, online_fp8) if isinstance(files, list) else None
    quant = shape.quant
    method = printable(str(quant.get("quant_method", "?")), 40) if quant is not None else ""
    if isinstance(from_headers, float):
        desc = f"weights as stored ({method} checkpoint)" if quant is not None else f"{dtype_shown} weights"
        if online_fp8:
            desc = "fp8 weights (online)"
        return from_headers, f"config.json + safetensors headers; {desc}"
    why = from_headers or files or "no weight files"
    per_weight: float = dtype_bytes
    desc = f"{dtype_shown} weights"
    if quant is not None:
        checkpoint = _checkpoint_bytes_per_weight(quant)
        if isinstance(checkpoint, str):
            return checkpoint
        per_weight, desc = checkpoint
    elif online_fp8:
        per_weight, desc = 1, "fp8 weights (online)"
    rest = (shape.vocab + 2 * shape.layers + 1) * shape.hidden * dtype_bytes  # output head and norms
    return _linear_params(shape) * per_weight + rest, f"from config.json ({why}); {desc}"


def facts_for(
    model_dir_or_id: str,
    *,
    dtype: str | None,
    quantization: str | None,
    kv_cache_dtype: str | None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    data_parallel: int = 1,
    api_servers: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ModelFacts | str:
    """What a decode step of ``model_dir_or_id`` served with these flags reads, or why that is not known.

    ``model_dir_or_id`` is a local directory (relative ones from ``cwd``, the server's working directory) or a
    Hugging Face id looked up in the cache ``env`` places (the server's environment; ours when None).
    """
    sizes = (
        (tensor_parallel, "TP size"),
        (pipeline_parallel, "PP size"),
        (data_parallel, "DP size"),
        (api_servers, "API server count"),
    )
    for value, name in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 4096:
            return f"{name} {printable(repr(value), 20)} is not usable"
    if not model_dir_or_id:
        return "no model named"
    found = _model_dir(model_dir_or_id, env, cwd)
    if isinstance(found, str):
        return found
    directory, shown = found
    if not (directory / "config.json").exists():
        return f"model config not found (no config.json in {shown})"
    config = _read_json(directory / "config.json")
    if isinstance(config, str):
        return f"model config not usable ({config})"
    shape = _shape(config)
    if isinstance(shape, str):
        return shape
    dtype_name = (dtype or "auto").lower()
    if dtype_name not in _DTYPE_BYTES:
        return f"--dtype {printable(dtype_name, 20)} is not estimated"
    dtype_bytes = _DTYPE_BYTES[dtype_name]
    dtype_shown = _short_dtype(dtype_name, shape.config_dtype)
    kv_name = (kv_cache_dtype or "auto").lower()
    kv_element = dtype_bytes if kv_name == "auto" else _KV_BYTES.get(kv_name)
    if kv_element is None:
        return f"KV cache dtype {printable(kv_name, 30)} is not estimated"
    online = (quantization or "").lower()
    if shape.quant is None and online and online not in _ONLINE_FP8:
        return f"--quantization {printable(online, 30)} is not estimated"
    online_fp8 = shape.quant is None and online in _ONLINE_FP8

    found_weights = _weights(directory, shape, dtype_bytes, dtype_shown, online_fp8)
    if isinstance(found_weights, str):
        return found_weights
    weights, source_and_weights = found_weights
    return ModelFacts(
        model=shown,
        weight_bytes_per_step=weights,
        kv_bytes_per_token=2.0 * shape.layers * shape.kv_heads * shape.head_dim * kv_element,
        kv_heads=shape.kv_heads,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        basis=f"{source_and_weights}; {_short_kv(kv_name, dtype_shown)} KV",
        data_parallel=data_parallel,
        api_servers=api_servers,
        dtype_bytes=dtype_bytes,
        kv_bytes_per_element=float(kv_element),
    )
