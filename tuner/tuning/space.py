"""What the tuner may change: candidate vLLM configurations, their defaults, and which ones can start at all.

A :class:`Candidate` is one point: FP8 weights, FP8 KV cache, max-num-seqs, max-num-batched-tokens,
max-model-len, gpu-memory-utilization, tensor-parallel-size, chunked prefill, prefix caching. ``None`` in a
field means "no flag": vLLM's own default. A :class:`SearchSpace` holds the values to try per dimension plus
the operator's pins, and judges each candidate *a priori* (:meth:`SearchSpace.check`): FP8 on a GPU without
FP8 tensor cores, a tensor-parallel size the heads do not divide, or a KV cache too small for one max-length
sequence would each waste a minutes-long server start, so they are rejected with a reason before any launch.

The model side is a :class:`~tuner.tuning.modelshape.ModelShape` read from ``config.json``, the machine a
:class:`~tuner.tuning.modelshape.Hardware`. Memory figures (:func:`estimate_memory`) are estimates meant to prune
hopeless candidates, not to replace the launch: vLLM's own profiling decides.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from tuner.tuning.modelshape import Hardware, ModelShape, SpaceError, kv_bytes_per_token, weight_bytes

__all__ = [
    "DIMENSIONS",
    "Candidate",
    "Feasibility",
    "GiB",
    "MemoryEstimate",
    "SearchSpace",
    "SpaceError",
    "default_space",
    "estimate_max_concurrency",
    "estimate_memory",
    "parse_pins",
    "resolve",
    "vllm_defaults",
]

GiB = 2**30


# --- one candidate -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """One vLLM configuration. ``None`` = leave the flag out (vLLM's default)."""

    quantization: str | None = None  # "fp8": dynamic W8A8 of an unquantized checkpoint
    kv_cache_dtype: str | None = None  # "fp8" (or fp8_e4m3 / fp8_e5m2); None = "auto" (the model's dtype)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool | None = None  # on by default in vLLM's V1 engine

    def __post_init__(self) -> None:
        if self.kv_cache_dtype == "auto":  # the same server as no flag: one key for both
            object.__setattr__(self, "kv_cache_dtype", None)
        for name in _INT_DIMENSIONS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SpaceError(f"{_flag(name)} must be a positive integer, got {value!r}")
        util = self.gpu_memory_utilization
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
                raise SpaceError(f"--gpu-memory-utilization must be in (0, 1], got {util!r}")
            object.__setattr__(self, "gpu_memory_utilization", float(util))  # 1 and 1.0: one key
        for name in _BOOL_DIMENSIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise SpaceError(f"{_flag(name)} must be true or false, got {value!r}")
        for name in ("quantization", "kv_cache_dtype"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SpaceError(f"{_flag(name)} must be a name such as fp8, got {value!r}")

    @property
    def fp8_weights(self) -> bool:
        return self.quantization == "fp8"

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype is not None and self.kv_cache_dtype.startswith("fp8")

    def config_dict(self) -> dict[str, Any]:
        """The flags this candidate sets, as ``vllm serve --config`` keys (dashed), in dimension order."""
        return {_key(name): value for name in DIMENSIONS if (value := getattr(self, name)) is not None}

    def vllm_args(self) -> tuple[str, ...]:
        """Command-line flags, e.g. ``("--quantization", "fp8", "--max-num-seqs", "256")``."""
        args: list[str] = []
        for key, value in self.config_dict().items():
            if isinstance(value, bool):
                args.append(f"--{key}" if value else f"--no-{key}")
            else:
                args.extend((f"--{key}", str(value)))
        return tuple(args)

    def key(self) -> str:
        """A stable identity for dedupe and resume: ``"max-num-seqs=256;quantization=fp8"`` (sorted keys)."""
        items = sorted(self.config_dict().items())
        if not items:
            return "vllm-defaults"
        return ";".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in items)

    def label(self) -> str:
        """A short human label: ``"fp8 w, fp8 kv, seqs 256, batch 8192, mem 0.90"``."""
        parts = []
        if self.quantization is not None:
            parts.append(f"{self.quantization} w")
        if self.kv_cache_dtype is not None:
            parts.append(f"{self.kv_cache_dtype} kv")
        if self.max_num_seqs is not None:
            parts.append(f"seqs {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None:
            parts.append(f"batch {self.max_num_batched_tokens}")
        if self.max_model_len is not None:
            parts.append(f"len {self.max_model_len}")
        if self.gpu_memory_utilization is not None:
            parts.append(f"mem {self.gpu_memory_utilization:.2f}")
        if self.tensor_parallel_size is not None:
            parts.append(f"tp {self.tensor_parallel_size}")
        if self.enable_chunked_prefill is not None:
            parts.append("chunked prefill" if self.enable_chunked_prefill else "no chunked prefill")
        if self.enable_prefix_caching is not None:
            parts.append("prefix cache" if self.enable_prefix_caching else "no prefix cache")
        return ", ".join(parts) or "vLLM defaults"

    def with_values(self, **values: Any) -> Candidate:
        """A copy with some dimensions changed."""
        return replace(self, **values)

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> Candidate:
        """The candidate a ``--config``-style dict describes; keys that are not dimensions (model, port, ...)
        are ignored. Dashed or underscored keys; ``--no-`` forms are not expected here.

        Raises:
            SpaceError: a dimension's value has the wrong type.
        """
        values: dict[str, Any] = {}
        for raw_key, value in config.items():
            name = raw_key.replace("-", "_")
            if name in DIMENSIONS and value is not None:
                values[name] = _coerce(name, value)
        return cls(**values)


DIMENSIONS: tuple[str, ...] = tuple(f.name for f in fields(Candidate))
"""The dimension names, in the order flags are written."""
_INT_DIMENSIONS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "tensor_parallel_size")
_BOOL_DIMENSIONS = ("enable_chunked_prefill", "enable_prefix_caching")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _flag(name: str) -> str:
    return "--" + _key(name)


def _coerce(name: str, value: Any) -> Any:
    """A dimension value from config or command-line text, typed as the Candidate field wants."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.lower() in ("default", "none", "null"):
        return None
    try:
        if name in _INT_DIMENSIONS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(text) if text is not None else int(value)
        if name == "gpu_memory_utilization":
            return float(text) if text is not None else float(value)
        if name in _BOOL_DIMENSIONS:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in ("true", "false"):
                return text.lower() == "true"
            raise ValueError
    except (TypeError, ValueError):
        raise SpaceError(f"{_flag(name)}: {value!r} is not a valid value") from None
    return text if text is not None else value


def parse_pins(specs: Iterable[str]) -> dict[str, Any]:
    """Operator pins from ``"max-num-seqs=256"``-style text; ``"quantization=none"`` pins vLLM's default.

    Raises:
        SpaceError: not key=value, an unknown dimension, or a bad value.
    """
    pins: dict[str, Any] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        name = key.strip().removeprefix("--").replace("-", "_")
        if not sep:
            raise SpaceError(f"pin {spec!r}: expected NAME=VALUE, e.g. max-num-seqs=256")
        if name not in DIMENSIONS:
            raise SpaceError(
                f"pin {spec!r}: unknown dimension; dimensions: {', '.join(map(_key, DIMENSIONS))}"
            )
        pins[name] = _coerce(name, value)
    Candidate(**pins)  # type checks, with the flag's name in the error
    return pins


# --- what vLLM does without flags ----------------------------------------------------------------------

# vLLM 0.32 CacheConfig.gpu_memory_utilization (vllm/config/cache.py); 0.2x releases used 0.90.
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.92


def vllm_defaults(hardware: Hardware, shape: ModelShape | None = None) -> Candidate:
    """The values vLLM's OpenAI server picks when given no flags, on ``hardware``.

    From vLLM 0.32 ``EngineArgs.get_batch_defaults``: >= 160 GiB GPUs 16384 batched tokens / 1024 sequences;
    >= 70 GiB except A100 8192 / 1024; other GPUs 2048 / 256; the CPU build 2048 / 128 per TP rank.
    max-model-len is the model's ``max_position_embeddings`` when ``shape`` is given.
    """
    if hardware.is_cpu:  # per TP rank; the tuner runs the CPU build with one
        mbt, seqs = 2048, 128
    elif hardware.vram_per_gpu_bytes >= 160 * GiB:
        mbt, seqs = 16384, 1024
    elif hardware.vram_per_gpu_bytes >= 70 * GiB and "a100" not in hardware.gpu_name.lower():
        mbt, seqs = 8192, 1024
    else:
        mbt, seqs = 2048, 256
    return Candidate(
        quantization=None,
        kv_cache_dtype=None,
        max_num_seqs=seqs,
        max_num_batched_tokens=mbt,
        max_model_len=shape.max_position_embeddings if shape is not None else None,
        gpu_memory_utilization=None if hardware.is_cpu else VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
        tensor_parallel_size=1,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
    )


def resolve(candidate: Candidate, hardware: Hardware, shape: ModelShape) -> Candidate:
    """``candidate`` with every ``None`` replaced by what vLLM would use: the numbers a server will run with."""
    defaults = vllm_defaults(hardware, shape)
    return replace(
        candidate,
        **{name: getattr(defaults, name) for name in DIMENSIONS if getattr(candidate, name) is None},
    )


# --- memory estimate -----------------------------------------------------------------------------------

# Per GPU, beyond weights and activations: CUDA context, NCCL buffers and CUDA graphs. vLLM 0.2x/0.3x logs
# ~0.5-1 GiB of CUDA graphs for 8B models on an H100; the rest is the context. An estimate, kept modest so
# that a candidate is pruned only when it clearly cannot start.
FIXED_OVERHEAD_BYTES_PER_GPU = 1 * GiB
_ACTIVATION_BYTES = 2  # activations run in 16-bit even with FP8 weights
_LOGIT_BYTES = 4  # the sampler's dummy run keeps float32 logits for max-num-seqs sequences
VLLM_BLOCK_TOKENS = 16  # KV-cache page size on GPUs


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Where one GPU's memory budget (VRAM x gpu-memory-utilization) goes, in bytes; the CPU build has only
    its KV-cache space."""

    budget_bytes: int
    weights_bytes: int  # per GPU
    overhead_bytes: int  # per GPU: activation peak of a max-num-batched-tokens step + fixed overhead
    kv_cache_bytes: int  # per GPU, what is left (may be negative)
    kv_bytes_per_token: int  # per GPU: this rank's share of the KV heads
    kv_capacity_tokens: int  # tokens the whole cache holds (0 when nothing is left)


def estimate_memory(candidate: Candidate, shape: ModelShape, hardware: Hardware) -> MemoryEstimate:
    """KV-cache capacity of ``candidate`` from the budget minus weights and the activation peak.

    KV capacity = (VRAM x util - weights / TP - activation overhead) / KV bytes per token per GPU; with more
    ranks than KV heads vLLM replicates heads, so each rank keeps at least one. On the CPU build the cache
    is exactly ``VLLM_CPU_KVCACHE_SPACE``; weights live in host memory beside it.
    """
    c = resolve(candidate, hardware, shape)
    tp = c.tensor_parallel_size or 1
    kv_heads_per_rank = max(1, shape.num_kv_heads // tp)
    per_token = kv_bytes_per_token(shape, c.kv_cache_dtype) * kv_heads_per_rank // shape.num_kv_heads
    if hardware.is_cpu:
        budget = hardware.cpu_kv_cache_bytes
        return MemoryEstimate(budget, 0, 0, budget, per_token, budget // per_token)
    weights = math.ceil(weight_bytes(shape, c.quantization) / tp)
    step_tokens = c.max_num_batched_tokens or 0
    activation = step_tokens * (2 * shape.intermediate_size // tp + 4 * shape.hidden_size) * _ACTIVATION_BYTES
    logits = (c.max_num_seqs or 0) * shape.vocab_size * _LOGIT_BYTES // tp
    overhead = FIXED_OVERHEAD_BYTES_PER_GPU + activation + logits
    budget = int(
        hardware.vram_per_gpu_bytes * (c.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION)
    )
    kv = budget - weights - overhead
    return MemoryEstimate(budget, weights, overhead, kv, per_token, max(0, kv) // per_token)


def estimate_max_concurrency(
    candidate: Candidate, shape: ModelShape, hardware: Hardware, input_len: int, output_len: int
) -> int:
    """How many requests of ``input_len + output_len`` tokens fit in the KV cache at once, capped by
    max-num-seqs: where a concurrency search can start looking. 0 when not even one fits."""
    c = resolve(candidate, hardware, shape)
    blocks_per_request = math.ceil((input_len + output_len) / VLLM_BLOCK_TOKENS)
    blocks = estimate_memory(c, shape, hardware).kv_capacity_tokens // VLLM_BLOCK_TOKENS
    return min(blocks // blocks_per_request, c.max_num_seqs or 0)


# --- validity ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Feasibility:
    """Whether a candidate can start, judged before launching; ``reasons`` say why not."""

    ok: bool
    reasons: tuple[str, ...]
    memory: MemoryEstimate | None = None


def _static_problems(candidate: Candidate, shape: ModelShape, hardware: Hardware) -> list[str]:
    """Rules that hold whatever the other dimensions are (used for pins too)."""
    problems = []
    fp8_flags = []
    if candidate.fp8_weights:
        fp8_flags.append(f"--quantization {candidate.quantization}")
    if candidate.fp8_kv_cache:
        fp8_flags.append(f"--kv-cache-dtype {candidate.kv_cache_dtype}")
    if fp8_flags and hardware.is_cpu:
        problems.append(f"{' and '.join(fp8_flags)}: the CPU build of vLLM refuses FP8")
    elif fp8_flags and not hardware.fp8_supported:
        cc = ".".join(map(str, hardware.compute_capability)) if hardware.compute_capability else "unknown"
        problems.append(
            f"{' and '.join(fp8_flags)} need compute capability >= 8.9; {hardware.gpu_name} has {cc}"
        )
    if candidate.quantization is not None and shape.quantization is not None:
        problems.append(
            f"--quantization {candidate.quantization}: the checkpoint is already quantized ({shape.quantization})"
        )
    tp = candidate.tensor_parallel_size
    if tp is not None and tp > 1:
        if hardware.is_cpu:
            problems.append("--tensor-parallel-size > 1 is not tuned on the CPU build")
        elif tp > hardware.gpu_count:
            problems.append(f"--tensor-parallel-size {tp} needs more than the {hardware.gpu_count} GPUs")
        if shape.num_heads % tp:
            problems.append(
                f"--tensor-parallel-size {tp} does not divide the {shape.num_heads} attention heads"
            )
        elif shape.num_kv_heads % tp and tp % shape.num_kv_heads:
            problems.append(
                f"--tensor-parallel-size {tp} and the {shape.num_kv_heads} KV heads do not divide"
            )
    if candidate.max_model_len is not None and candidate.max_model_len > shape.max_position_embeddings:
        problems.append(
            f"--max-model-len {candidate.max_model_len} > the model's {shape.max_position_embeddings} positions"
        )
    return problems


def feasibility(candidate: Candidate, shape: ModelShape, hardware: Hardware) -> Feasibility:
    """Every a-priori rule: FP8 support, TP divisibility, vLLM's scheduler checks, and memory."""
    problems = _static_problems(candidate, shape, hardware)
    c = resolve(candidate, hardware, shape)
    mbt, seqs, max_len = c.max_num_batched_tokens or 0, c.max_num_seqs or 0, c.max_model_len or 0
    # vLLM's SchedulerConfig.verify_max_model_len raises on both of these at start-up.
    if mbt < seqs:
        problems.append(f"--max-num-batched-tokens {mbt} < --max-num-seqs {seqs}")
    if mbt < max_len and not c.enable_chunked_prefill:
        problems.append(f"--max-num-batched-tokens {mbt} < --max-model-len {max_len} without chunked prefill")
    memory = estimate_memory(c, shape, hardware)
    if not hardware.is_cpu and memory.weights_bytes + memory.overhead_bytes > memory.budget_bytes:
        problems.append(
            f"weights {memory.weights_bytes / GiB:.1f} GiB + overhead {memory.overhead_bytes / GiB:.1f} GiB per GPU"
            f" exceed the {memory.budget_bytes / GiB:.1f} GiB budget"
        )
    elif memory.kv_capacity_tokens < max_len:
        problems.append(
            f"KV cache holds ~{memory.kv_capacity_tokens} tokens ({max(0, memory.kv_cache_bytes) / GiB:.1f} GiB),"
            f" less than one --max-model-len {max_len} sequence"
        )
    return Feasibility(ok=not problems, reasons=tuple(problems), memory=memory)


# --- the space -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """Values to try per dimension, with the operator's pins applied, for one model on one machine."""

    shape: ModelShape
    hardware: Hardware
    values: Mapping[str, tuple[Any, ...]]  # dimension -> values to try; None = vLLM's default
    pins: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = (set(self.values) | set(self.pins)) - set(DIMENSIONS)
        if unknown:
            raise SpaceError(f"unknown dimension(s): {', '.join(sorted(unknown))}")
        values = {name: tuple(self.values.get(name, (None,))) or (None,) for name in DIMENSIONS}
        values.update({name: (value,) for name, value in self.pins.items()})
        for name, options in values.items():
            for value in options:
                Candidate(**{name: value})  # type checks, with the flag's name in the error
        object.__setattr__(self, "values", values)
        pinned = Candidate(**dict(self.pins))
        problems = _static_problems(pinned, self.shape, self.hardware)
        if problems:
            raise SpaceError(f"pinned values cannot run here: {problems[0]}")

    def candidates(self) -> Iterator[Candidate]:
        """Every combination, feasible or not, in a stable order (first values first), without duplicates."""
        seen: set[str] = set()
        for combo in itertools.product(*(self.values[name] for name in DIMENSIONS)):
            candidate = Candidate(**dict(zip(DIMENSIONS, combo, strict=True)))
            if candidate.key() not in seen:
                seen.add(candidate.key())
                yield candidate

    def check(self, candidate: Candidate) -> Feasibility:
        """Whether ``candidate`` can start on this machine, judged without launching it."""
        return feasibility(candidate, self.shape, self.hardware)

    def feasible(self) -> list[Candidate]:
        """The candidates that pass :meth:`check`."""
        return [c for c in self.candidates() if self.check(c).ok]

    def baseline(self) -> Candidate:
        """vLLM with no flags but the pins: the configuration to beat."""
        return Candidate(**dict(self.pins))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored with a tuning run)."""
        return {
            "shape": asdict(self.shape),
            "hardware": self.hardware.to_dict(),
            "values": {_key(n): list(v) for n, v in self.values.items()},
            "pins": {_key(n): v for n, v in self.pins.items()},
        }


def default_space(
    shape: ModelShape, hardware: Hardware, pins: Mapping[str, Any] | None = None
) -> SearchSpace:
    """Value ladders sized for ``hardware`` and ``shape``; ``pins`` fix dimensions (None = vLLM's default).

    FP8 weights and KV cache are tried on GPUs with FP8 tensor cores (not for pre-quantized checkpoints); max-num-
    seqs 64-512 on >= 70 GiB GPUs, 32-256 on >= 40 GiB, 16-128 below, 8-32 on the CPU build; batched tokens 2048 /
    8192 / 16384; memory utilization 0.90 / 0.95; prefix caching off as well as on (GPUs); tensor parallelism over
    powers of two up to the node's GPUs (and the node itself). max-model-len stays at the model's maximum when
    one such sequence fits the leanest candidate (FP8 where tried, most memory, most ranks); otherwise the largest
    power of two that fits is used, so that a small GPU still has candidates. Pin max-model-len to the workload's
    needs to search at that length.

    Raises:
        SpaceError: a pin that cannot run on this hardware (FP8 on an A100, TP 3 on 2 GPUs, ...).
    """
    pins = dict(pins or {})
    fp8 = hardware.fp8_supported
    values: dict[str, tuple[Any, ...]] = {
        "quantization": (None, "fp8") if fp8 and shape.quantization is None else (None,),
        "kv_cache_dtype": (None, "fp8") if fp8 else (None,),
    }
    vram = hardware.vram_per_gpu_bytes
    if hardware.is_cpu:
        values["max_num_seqs"] = (8, 16, 32)
        values["max_num_batched_tokens"] = (2048,)
    else:
        if vram >= 70 * GiB:
            values["max_num_seqs"] = (64, 128, 256, 512)
        elif vram >= 40 * GiB:
            values["max_num_seqs"] = (32, 64, 128, 256)
        else:
            values["max_num_seqs"] = (16, 32, 64, 128)
        values["max_num_batched_tokens"] = (2048, 8192, 16384)
        values["gpu_memory_utilization"] = (0.90, 0.95)
        # Off only where the traffic shares nothing: the search proposes it when the defaults' cache served
        # (almost) no prompt token, so its hashing and bookkeeping bought nothing (search.propose_moves).
        values["enable_prefix_caching"] = (None, False)
        # Powers of two up to the node (what NCCL rings and NVLink blocks are built for) and the node itself; a
        # size that does not divide the node leaves GPUs idle, which the node's ranking counts as lost.
        tps = sorted({2**k for k in range(hardware.gpu_count.bit_length()) if 2**k <= hardware.gpu_count})
        tps = sorted({*tps, hardware.gpu_count})
        tps = [tp for tp in tps if not _static_problems(Candidate(tensor_parallel_size=tp), shape, hardware)]
        values["tensor_parallel_size"] = tuple(tps) if len(tps) > 1 else (None,)
    if "max_model_len" not in pins:
        pinned = {**values, **{name: (value,) for name, value in pins.items()}}
        values["max_model_len"] = (_fitting_max_model_len(shape, hardware, pinned),)
    return SearchSpace(shape=shape, hardware=hardware, values=values, pins=pins)


def _fitting_max_model_len(
    shape: ModelShape, hardware: Hardware, values: Mapping[str, tuple[Any, ...]]
) -> int | None:
    """None (the model's maximum) when a full-length sequence fits the leanest candidate of ``values``, else
    the largest power of two that does (at least 256)."""

    def most(name: str) -> Any:
        options = [v for v in values.get(name, ()) if v is not None]
        return max(options) if options else None

    def least(name: str) -> Any:
        options = [v for v in values.get(name, ()) if v is not None]
        return min(options) if options else None

    lean = Candidate(
        quantization="fp8" if "fp8" in values["quantization"] else None,
        kv_cache_dtype="fp8" if "fp8" in values["kv_cache_dtype"] else None,
        max_num_seqs=least("max_num_seqs"),
        max_num_batched_tokens=least("max_num_batched_tokens"),
        gpu_memory_utilization=most("gpu_memory_utilization"),
        tensor_parallel_size=most("tensor_parallel_size"),
    )
    capacity = estimate_memory(lean, shape, hardware).kv_capacity_tokens
    if capacity >= shape.max_position_embeddings:
        return None
    return 2 ** int(math.log2(capacity)) if capacity >= 256 else 256
