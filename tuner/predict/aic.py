"""Predictions from NVIDIA's aiconfigurator (``pip install 'infertop[predict]'``: the ``aiconfigurator-core`` wheel).

aiconfigurator models a vLLM server from per-operation timings measured on real GPUs (its databases: H100 SXM,
H200 SXM, A100 SXM, L40S, B200 and more; none for L4, A30, H100 PCIe). For a model's ``config.json``, a GPU, a
batch of concurrent requests, tensor parallelism and FP8 weights / KV cache it estimates TTFT, TPOT, output
tokens/s and memory per GPU. Checked against a real H100 (REFERENCE.md): within 4-18 %.

This module calls its SDK in-process, the same steps as ``aiconfigurator cli estimate --estimate-mode agg``
(bit-identical figures), with the database loaded once per GPU type (~2 s) and ~1 ms per estimate after that.
Two things it does not model are said in each prediction's ``extra``: ``max-num-batched-tokens`` beyond one
prompt per step (its prefill budget is at most the prompt), and ``max-model-len``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from tuner.predict.base import Estimate, PredictError, Prediction, Workload, ladder
from tuner.telemetry import gpus
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.space import Candidate, resolve

GiB = 2**30
PACKAGE = "aiconfigurator_core"
INSTALL_HINT = "pip install 'infertop[predict]' (NVIDIA's aiconfigurator-core)"

# Our GPU table's model names -> aiconfigurator's system names, for GPUs it has measured data for.
SYSTEMS = {
    "H100 SXM": "h100_sxm",
    "H200 SXM": "h200_sxm",
    "A100 80GB SXM": "a100_sxm",
    "A100 40GB SXM": "a100_sxm",
    "L40S": "l40s",
    "B200": "b200_sxm",
}
# What people type after --gpu.
ALIASES = {
    "h100": "h100_sxm",
    "h100_sxm": "h100_sxm",
    "h200": "h200_sxm",
    "h200_sxm": "h200_sxm",
    "a100": "a100_sxm",
    "a100_sxm": "a100_sxm",
    "l40s": "l40s",
    "b200": "b200_sxm",
    "b200_sxm": "b200_sxm",
}
_COMPUTE_CAPABILITY = {
    "h100_sxm": (9, 0),
    "h200_sxm": (9, 0),
    "b200_sxm": (10, 0),
    "l40s": (8, 9),
    "a100_sxm": (8, 0),
}
# Dense architectures aiconfigurator does not list that have Llama's exact layer shapes.
_AS_LLAMA = frozenset({"MistralForCausalLM"})


def available() -> bool:
    """Whether the ``predict`` extra is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def system_for(gpu_name: str) -> str | None:
    """aiconfigurator's system name for an NVML GPU name ("NVIDIA H100 80GB HBM3" -> "h100_sxm"); None when it
    has no measured data for that GPU."""
    known = gpus.lookup(gpu_name)
    return SYSTEMS.get(known.model) if known is not None else None


class _Sdk:
    """The SDK's functions, imported on first use, with logging quieted (its warnings go to stderr)."""

    _lock = threading.Lock()
    _loaded: _Sdk | None = None

    def __init__(self) -> None:
        for name in ("aiconfigurator_core", "aiconfigurator"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.version = package_version()
        factory = importlib.import_module(f"{PACKAGE}.sdk.backends.factory")
        config = importlib.import_module(f"{PACKAGE}.sdk.config")
        builders = importlib.import_module(f"{PACKAGE}.sdk.config_builders")
        models = importlib.import_module(f"{PACKAGE}.sdk.models")
        database = importlib.import_module(f"{PACKAGE}.sdk.perf_database")
        self.get_backend = factory.get_backend
        self.RuntimeConfig = config.RuntimeConfig
        self.build_model_config = builders.build_model_config
        self.apply_nextn = builders.apply_nextn
        self.get_model = models.get_model
        self.resolve_context_fmha_by_data = models.resolve_context_fmha_by_data
        self.get_latest_database_version = database.get_latest_database_version
        self.get_database_view = database.get_database_view
        self.databases: dict[str, tuple[str, Any]] = {}

    @classmethod
    def get(cls) -> _Sdk:
        with cls._lock:
            if cls._loaded is None:
                if not available():
                    raise PredictError(f"no performance model installed: {INSTALL_HINT}")
                cls._loaded = cls()
            return cls._loaded

    def database(self, system: str) -> tuple[str, Any]:
        """(vLLM data version, database) for ``system``, loaded once."""
        with self._lock:
            if system not in self.databases:
                version = self.get_latest_database_version(system=system, backend="vllm")
                if version is None:
                    raise PredictError(
                        f"aiconfigurator {self.version} has no measured vLLM data for {system}"
                    )
                view = self.get_database_view(
                    system,
                    "vllm",
                    version,
                    allow_missing_data=False,
                    database_mode="SILICON",
                    transfer_policy=None,
                )
                if view is None:
                    raise PredictError(f"aiconfigurator {self.version} could not load its data for {system}")
                self.databases[system] = (version, view)
            return self.databases[system]


class AiconfiguratorModel:
    """Predicts candidates for one model (a directory with its ``config.json``) on one GPU type.

    Raises :class:`PredictError` (one line) for a model, GPU or option outside aiconfigurator's coverage.
    """

    def __init__(self, model_dir: str | Path, shape: ModelShape, system: str) -> None:
        self._sdk = _Sdk.get()
        self.shape = shape
        self.system = system
        self.data_version, self._db = self._sdk.database(system)
        self._model_dir, self._note = _usable_model_dir(Path(model_dir))
        self.source = (
            f"aiconfigurator {self._sdk.version}, {system}, vLLM data {self.data_version}{self._note}"
        )

    @property
    def gpu_memory_bytes(self) -> int:
        """One GPU's memory as aiconfigurator's system description has it."""
        return int(self._db.system_spec["gpu"]["mem_capacity"])

    def predict(self, candidate: Candidate, hardware: Hardware, workload: Workload) -> Prediction:
        """The candidate's curve from one request to the most its KV cache and ``max-num-seqs`` admit."""
        c = resolve(candidate, hardware, self.shape)
        first = self._estimate(c, workload, 1)
        extra = {
            "prefill_budget_modelled": min(workload.input_len, c.max_num_batched_tokens or workload.input_len)
        }
        if first["oom"]:
            need = first["memory_gib"]
            return Prediction(
                self.source,
                workload,
                fits=False,
                reason=f"needs {need:.1f} GiB per GPU for one request; the GPU has {self.gpu_memory_bytes / GiB:.1f}",
                extra=extra,
            )
        by_kv = first["max_batch_by_kv"]
        limit = min(by_kv, c.max_num_seqs or by_kv)
        if limit < 1:
            return Prediction(
                self.source,
                workload,
                fits=False,
                reason=f"no room for one {workload.input_len + workload.output_len}-token request in the KV cache",
                max_concurrency=0,
                extra=extra,
            )
        curve = [first["estimate"]]
        curve += [self._estimate(c, workload, b)["estimate"] for b in ladder(limit) if b > 1]
        reason = (
            f"the KV cache admits {by_kv} requests" if by_kv < (c.max_num_seqs or by_kv) else "max-num-seqs"
        )
        return Prediction(self.source, workload, True, tuple(curve), reason, limit, extra)

    def _estimate(self, c: Candidate, workload: Workload, batch: int) -> dict[str, Any]:
        sdk = self._sdk
        tp = c.tensor_parallel_size or 1
        gemm = "fp8" if c.fp8_weights else "bfloat16"
        kv = "fp8" if c.fp8_kv_cache else "bfloat16"
        try:
            config = sdk.build_model_config(
                tp,
                1,
                1,
                None,
                None,
                gemm,
                kv,
                None,
                None,
                None,
                forward_model=None,
                enable_encoder_dp=True,
                attention_backend=None,
            )
            sdk.apply_nextn(config, 0)
            path = str(self._model_dir)
            sdk.resolve_context_fmha_by_data(config, path, self._db, "vllm", is_context_role=True)
            runtime = sdk.RuntimeConfig(
                isl=workload.input_len,
                osl=workload.output_len,
                batch_size=batch,
                image_height=0,
                image_width=0,
                num_images_per_request=1,
                prefix=0,
                engine_step_backend=None,
            )
            model = sdk.get_model(path, config, "vllm")
            # A fresh backend each time: its result cache is keyed without the model, TP or quantization.
            summary = sdk.get_backend("vllm").run_agg(
                model,
                self._db,
                runtime,
                ctx_tokens=min(workload.input_len, c.max_num_batched_tokens or workload.input_len),
                max_seq_len=None,
                free_gpu_memory_fraction=c.gpu_memory_utilization,
                decode_tokens_per_iteration=1.0,
            )
        except PredictError:
            raise
        except AssertionError as exc:  # e.g. "num_heads 32 should be divisible by tp_size 3"
            raise PredictError(f"aiconfigurator cannot model {c.label()}: {exc}") from None
        except Exception as exc:  # its own errors: no data for an option, an unsupported architecture
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PredictError(
                f"aiconfigurator cannot model {c.label()} on {self.system}: {first_line}"
            ) from None
        result = summary.get_result_dict() or {}
        memory = summary.get_memory()
        capacity_gib = self.gpu_memory_bytes / GiB
        fraction = c.gpu_memory_utilization or 0.92
        kv_gib = float(memory.get("kvcache", 0.0))
        non_kv = float(memory["total"]) - kv_gib
        budget = capacity_gib * fraction * 0.98 - non_kv  # aiconfigurator's own KV-budget rule
        per_request = kv_gib / batch if batch else 0.0
        return {
            "estimate": Estimate(
                concurrency=batch,
                ttft_s=float(result["ttft"]) / 1000.0,
                tpot_s=float(result["tpot"]) / 1000.0,
                output_tokens_per_s=float(result["tokens/s"]),
                memory_gib_per_gpu=float(result["memory"]),
            ),
            "oom": bool(summary.check_oom()),
            "memory_gib": float(memory["total"]),
            "max_batch_by_kv": int(budget // per_request) if per_request > 0 and budget > 0 else 0,
        }


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aiconfigurator-core")
    except PackageNotFoundError:
        return "?"


_converted: dict[Path, Path] = {}


def _usable_model_dir(model_dir: Path) -> tuple[Path, str]:
    """The model directory, or a copy of its config.json presented as Llama for a dense architecture with the
    same shapes that aiconfigurator does not list (Mistral); the note says so."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PredictError(f"{model_dir / 'config.json'} cannot be read") from None
    arch = (config.get("architectures") or [""])[0]
    if arch not in _AS_LLAMA:
        return model_dir, ""
    if model_dir not in _converted:
        folder = Path(tempfile.mkdtemp(prefix="infertop-aic-"))
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
        _converted[model_dir] = folder
    return _converted[model_dir], f" ({arch} modelled as Llama: the same dense layers)"


def hardware_for(system: str, model: AiconfiguratorModel | None, gpu_count: int = 1) -> Hardware:
    """A :class:`Hardware` for one of aiconfigurator's GPU types (memory from its system description)."""
    name = next((k for k, v in SYSTEMS.items() if v == system), system)  # the first: A100 80GB for a100_sxm
    known = gpus.lookup(name)
    if model is not None:
        memory = model.gpu_memory_bytes
    else:
        memory = int((known.memory_gb if known and known.memory_gb else 80) * 1e9)
    cc = _COMPUTE_CAPABILITY.get(system, (8, 0))
    return Hardware(gpu_name=name, gpu_count=gpu_count, vram_per_gpu_bytes=memory, compute_capability=cc)
