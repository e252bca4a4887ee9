"""What the tuner knows of the model and the machine: a :class:`ModelShape` read from ``config.json``, the bytes
it takes (:func:`kv_bytes_per_token`, :func:`weight_bytes`), and the :class:`Hardware` it runs on.

:class:`SpaceError` lives here because a model or a machine the tuner cannot use fails the same way as a bad
pin or dimension value in :mod:`tuner.tuning.space`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tuner.telemetry import gpus

__all__ = ["Hardware", "ModelShape", "SpaceError", "kv_bytes_per_token", "weight_bytes"]


class SpaceError(ValueError):
    """A model config, pin or dimension value the tuner cannot use. The message is one line for people."""


# --- the model -----------------------------------------------------------------------------------------

# config.json spells the same thing differently across architectures (Llama, GPT-2, OPT, Falcon, ...).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}
# vLLM's dtype "auto" runs float32 checkpoints in 16 bits (ModelConfig._get_and_verify_dtype), so every
# dtype below is 2 bytes per weight and per KV element unless quantized.
_KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the tuner needs from a model's ``config.json``: sizes for memory estimates and validity rules."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width, or each expert's width in a mixture-of-experts model
    vocab_size: int
    max_position_embeddings: int
    dtype: str = "bfloat16"
    tie_word_embeddings: bool = False
    num_experts: int | None = None  # mixture of experts: experts per layer (all held in memory)
    quantization: str | None = None  # the checkpoint's own quant_method ("fp8", "awq", ...), if any
    quant_bits: int | None = None  # bits per linear weight of a pre-quantized checkpoint, when stated

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a parsed ``config.json``; multimodal configs are read from their ``text_config``.

        Raises:
            SpaceError: a size the tuner needs is missing or not a positive integer.
        """
        text = config.get("text_config")
        if isinstance(text, Mapping) and not _lookup(config, "num_layers"):
            config = {**config, **text}

        def need(name: str) -> int:
            value = _lookup(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                keys = " / ".join(_ALIASES[name])
                raise SpaceError(f"config.json has no usable {keys} (got {value!r})")
            return value

        layers, hidden, heads = need("num_layers"), need("hidden_size"), need("num_heads")
        kv_heads = _lookup(config, "num_kv_heads") or heads
        experts = _lookup(config, "num_experts")
        inter = config.get("moe_intermediate_size") if experts else None
        inter = inter or _lookup(config, "intermediate_size") or 4 * hidden
        quant = config.get("quantization_config")
        quant_method = str(quant.get("quant_method", "unknown")) if isinstance(quant, Mapping) else None
        bits = quant.get("bits") if isinstance(quant, Mapping) else None
        if quant_method == "fp8" and bits is None:
            bits = 8
        return cls(
            model_type=str(config.get("model_type", "unknown")),
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(inter),
            vocab_size=need("vocab_size"),
            max_position_embeddings=need("max_position_embeddings"),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_experts=int(experts) if experts else None,
            quantization=quant_method,
            quant_bits=int(bits) if isinstance(bits, int) else None,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        """Read ``MODEL_DIR/config.json``.

        Raises:
            SpaceError: no such file, not JSON, or missing sizes.
        """
        path = Path(model_dir) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpaceError(f"{path} not found: give a model directory with a config.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SpaceError(f"cannot read {path}: {error}") from None
        if not isinstance(config, dict):
            raise SpaceError(f"{path} is not a JSON object")
        return cls.from_config(config)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head (once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def linear_params(self) -> int:
        """Attention and MLP projection weights of all layers: what ``--quantization fp8`` turns to 8 bits."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down (SwiGLU)
        if self.num_experts:
            mlp = mlp * self.num_experts + self.hidden_size * self.num_experts  # + router
        return self.num_layers * (q_and_o + k_and_v + mlp)

    @property
    def param_count(self) -> int:
        """Estimated parameters: embeddings, projections and norms (biases ignored)."""
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.embedding_params + self.linear_params + norms


def _lookup(config: Mapping[str, Any], name: str) -> Any:
    for key in _ALIASES[name]:
        if config.get(key) is not None:
            return config[key]
    return None


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str | None = None) -> int:
    """KV-cache bytes one token takes on the whole model: 2 (K and V) x layers x KV heads x head dim x bytes.

    ``kv_cache_dtype`` None or "auto" = the model's dtype (16 bits); "fp8*" = 1 byte.
    """
    dtype = kv_cache_dtype if kv_cache_dtype not in (None, "auto") else shape.dtype
    bytes_per_element = _KV_DTYPE_BYTES.get(str(dtype), 2)
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * bytes_per_element


def weight_bytes(shape: ModelShape, quantization: str | None = None) -> int:
    """Bytes of weights the server loads for ``shape`` with ``--quantization`` (None = none).

    FP8 (vLLM's dynamic W8A8) stores the projection weights in 1 byte; embeddings, the output head and norms
    stay 16-bit. A pre-quantized checkpoint with stated bits uses those for its projections.
    """
    rest = shape.param_count - shape.linear_params
    if quantization == "fp8":
        return shape.linear_params + 2 * rest
    if shape.quant_bits is not None:
        return math.ceil(shape.linear_params * shape.quant_bits / 8) + 2 * rest
    return 2 * shape.param_count


# --- the machine ---------------------------------------------------------------------------------------


class _GpuLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def vram_total_bytes(self) -> int | None: ...
    @property
    def compute_capability(self) -> tuple[int, int] | None: ...


@dataclass(frozen=True, slots=True)
class Hardware:
    """The accelerators a server may use: ``gpu_count`` identical GPUs, or the CPU build of vLLM."""

    gpu_name: str
    gpu_count: int
    vram_per_gpu_bytes: int  # on the CPU build: 0
    compute_capability: tuple[int, int] | None
    cpu_kv_cache_bytes: int = 0  # CPU build only: VLLM_CPU_KVCACHE_SPACE

    @property
    def is_cpu(self) -> bool:
        return self.gpu_count == 0

    @property
    def fp8_supported(self) -> bool:
        """FP8 tensor cores: compute capability >= 8.9 (Ada, Hopper, newer); never on the CPU build."""
        if self.is_cpu:
            return False
        if self.compute_capability is not None:
            return gpus.fp8_supported(self.compute_capability)
        known = gpus.lookup(self.gpu_name)  # NVML did not say: the datasheet table may know
        return known is not None and known.fp8

    @classmethod
    def from_gpus(cls, gpus: Sequence[_GpuLike]) -> Hardware:
        """From telemetry's ``GpuInfo`` list. Mixed GPUs are sized by the smallest memory and oldest
        architecture: a tensor-parallel server runs at its weakest rank's pace.

        Raises:
            SpaceError: no GPU, or a GPU whose memory size NVML did not report.
        """
        if not gpus:
            raise SpaceError("no GPU to tune on (use Hardware.cpu for the CPU build of vLLM)")
        vram = [g.vram_total_bytes for g in gpus]
        if any(v is None or v <= 0 for v in vram):
            raise SpaceError("a GPU's memory size is unknown; cannot size the KV cache")
        ccs = [g.compute_capability for g in gpus]
        return cls(
            gpu_name=gpus[0].name,
            gpu_count=len(gpus),
            vram_per_gpu_bytes=min(v for v in vram if v is not None),
            compute_capability=None if None in ccs else min(c for c in ccs if c is not None),
        )

    @classmethod
    def cpu(cls, kv_cache_bytes: int) -> Hardware:
        """The CPU build of vLLM with ``VLLM_CPU_KVCACHE_SPACE`` = ``kv_cache_bytes`` (GiB there)."""
        if kv_cache_bytes <= 0:
            raise SpaceError("the CPU build needs a KV-cache size (VLLM_CPU_KVCACHE_SPACE, GiB)")
        return cls(
            "CPU",
            gpu_count=0,
            vram_per_gpu_bytes=0,
            compute_capability=None,
            cpu_kv_cache_bytes=kv_cache_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with a tuning run; a resume on other hardware is refused)."""
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hardware:
        """Inverse of :meth:`to_dict`."""
        cc = data.get("compute_capability")
        return cls(**{**data, "compute_capability": tuple(cc) if cc else None})
