"""Predictions from NVIDIA's aiconfigurator (``pip install 'infertop[predict]'``: the ``aiconfigurator-core`` wheel).

aiconfigurator models a vLLM server from per-operation timings measured on real GPUs (its databases: H100 SXM,
H200 SXM, A100 SXM, L40S, B200 and more; none for L4, A30, H100 PCIe). For a model's ``config.json``, a GPU, a
batch of concurrent requests, tensor parallelism and FP8 weights / KV cache it estimates TTFT, TPOT, output
tokens/s and memory per GPU. Checked against a real H100 (REFERENCE.md): within 4-18 %.

Database modes: ``SILICON`` (the default) interpolates the measured timings. For GPUs it has a system description
of but no measurements (L4, H100 PCIe, A30, A100 PCIe) the figures are EMPIRICAL, and every source string says so:
aiconfigurator's own ``EMPIRICAL`` mode takes its utilisations from the GPU's own measured data (0.12 cannot run
it without), so this module makes the estimate that mode means from what 0.12 has. For each figure (TTFT, TPOT,
output tokens/s) at each batch::

    empirical(target) = SOL(target) x SILICON(reference) / SOL(reference)

``SOL`` being aiconfigurator's speed-of-light mode (it runs from the system description alone) and the reference
a GPU of the same architecture that has measured data (:data:`EMPIRICAL_REFERENCES`: L4 <- L40S, H100 PCIe <- H100
SXM, A30 and A100 PCIe <- A100 SXM): the target's roofline times how far the reference's measured kernels fall
short of its own. Tokens/s is then capped as aiconfigurator caps it (Little's law on the estimated TTFT and TPOT);
memory, OOM and the KV cache come from the target's own run (its memory). On the reference itself it gives back
its SILICON figures; on another GPU it is an estimate transferred across GPUs, checked against no real L4.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuner.predict.base import Estimate, PredictError, Prediction, Workload, ladder
from tuner.telemetry import gpus
from tuner.tuning.modelshape import Hardware, ModelShape
from tuner.tuning.space import Candidate, resolve

GiB = 2**30
PACKAGE = "aiconfigurator_core"
INSTALL_HINT = "pip install 'infertop[predict]' (NVIDIA's aiconfigurator-core)"

SILICON = "SILICON"  # interpolated from timings measured on the GPU
EMPIRICAL = "EMPIRICAL"  # speed-of-light x empirical utilisation
MODE_LABELS = {
    SILICON: "SILICON",
    EMPIRICAL: "EMPIRICAL (speed-of-light x empirical factors, no measured data)",
}

# Our GPU table's model names -> aiconfigurator's system names, for GPUs it has measured data for.
SYSTEMS = {
    "H100 SXM": "h100_sxm",
    "H200 SXM": "h200_sxm",
    "A100 80GB SXM": "a100_sxm",
    "A100 40GB SXM": "a100_sxm",
    "L40S": "l40s",
    "B200": "b200_sxm",
}
# ... and for GPUs it has a system description of but no measured data: asked in its EMPIRICAL mode.
EMPIRICAL_SYSTEMS = {
    "L4": "l4",
    "H100 PCIe": "h100_pcie",
    "A30": "a30",
    "A100 80GB PCIe": "a100_pcie",
    "A100 40GB PCIe": "a100_pcie",
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
    "l4": "l4",
    "h100_pcie": "h100_pcie",
    "a30": "a30",
    "a100_pcie": "a100_pcie",
}
_COMPUTE_CAPABILITY = {
    "h100_sxm": (9, 0),
    "h200_sxm": (9, 0),
    "b200_sxm": (10, 0),
    "l40s": (8, 9),
    "a100_sxm": (8, 0),
    "l4": (8, 9),
    "h100_pcie": (9, 0),
    "a30": (8, 0),
    "a100_pcie": (8, 0),
}
# For a system without measured data: the system of the same architecture whose measured efficiency its
# speed-of-light figures are scaled by (Ada 8.9, Hopper 9.0, Ampere 8.0).
EMPIRICAL_REFERENCES = {"l4": "l40s", "h100_pcie": "h100_sxm", "a30": "a100_sxm", "a100_pcie": "a100_sxm"}
SOL = "SOL"  # aiconfigurator's speed-of-light mode: the system description alone
# Dense architectures aiconfigurator does not list that have Llama's exact layer shapes.
_AS_LLAMA = frozenset({"MistralForCausalLM"})


def available() -> bool:
    """Whether the ``predict`` extra is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def system_for(gpu_name: str) -> str | None:
    """aiconfigurator's system name for an NVML GPU name ("NVIDIA H100 80GB HBM3" -> "h100_sxm", "NVIDIA L4" ->
    "l4") or a name as typed after ``--gpu`` ("h100", "l4"); None for a GPU it has no system for."""
    found = model_for(gpu_name)
    return found[0] if found is not None else None


def model_for(gpu_name: str) -> tuple[str, str] | None:
    """(system, database mode) for a GPU name: ``SILICON`` where aiconfigurator has measured data for it,
    ``EMPIRICAL`` where it has only a system description; None for a GPU it has no system for."""
    alias = ALIASES.get(gpu_name.strip().lower())
    if alias is not None:
        return alias, mode_for(alias)
    known = gpus.lookup(gpu_name)
    if known is None:
        return None
    if known.model in SYSTEMS:
        return SYSTEMS[known.model], SILICON
    if known.model in EMPIRICAL_SYSTEMS:
        return EMPIRICAL_SYSTEMS[known.model], EMPIRICAL
    return None


def mode_for(system: str) -> str:
    """The database mode a system is asked in: ``SILICON`` where it has measured data, else ``EMPIRICAL``."""
    return SILICON if system in SYSTEMS.values() else EMPIRICAL


def gpu_model_for(system: str) -> str:
    """Our GPU table's name for an aiconfigurator system ("h100_sxm" -> "H100 SXM"; the first of several)."""
    every = {**EMPIRICAL_SYSTEMS, **SYSTEMS}
    return next((k for k, v in every.items() if v == system), system)


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
        self.databases: dict[tuple[str, str, str], tuple[str, Any]] = {}

    @classmethod
    def get(cls) -> _Sdk:
        with cls._lock:
            if cls._loaded is None:
                if not available():
                    raise PredictError(f"no performance model installed: {INSTALL_HINT}")
                cls._loaded = cls()
            return cls._loaded

    def database(self, system: str, mode: str = SILICON, versioned_as: str | None = None) -> tuple[str, Any]:
        """(vLLM data version, database view in ``mode``) for ``system``, loaded once per combination.
        ``versioned_as``: the system whose vLLM data version keys the view (for one without data of its own)."""
        key = (system, mode, versioned_as or system)
        with self._lock:
            if key not in self.databases:
                self.databases[key] = self._load(system, mode, versioned_as or system)
            return self.databases[key]

    def _load(self, system: str, mode: str, versioned_as: str) -> tuple[str, Any]:
        version = self.get_latest_database_version(system=versioned_as, backend="vllm")
        if version is None and mode == SILICON:
            raise PredictError(f"aiconfigurator {self.version} has no measured vLLM data for {system}")
        if version is None:
            raise PredictError(f"aiconfigurator {self.version} has no vLLM data version for {system}")
        try:
            view = self.get_database_view(
                system,
                "vllm",
                version,
                allow_missing_data=mode != SILICON,
                database_mode=mode,
                transfer_policy=None,
            )
        except Exception as exc:  # its own errors: a system or version it cannot open
            raise PredictError(
                f"aiconfigurator {self.version} cannot open {system} in {mode} mode: {_first_line(exc)}"
            ) from None
        if view is None:
            raise PredictError(f"aiconfigurator {self.version} could not load its data for {system}")
        return str(version), view


class AiconfiguratorModel:
    """Predicts candidates for one model (a directory with its ``config.json``) on one GPU type.

    Raises :class:`PredictError` (one line) for a model, GPU or option outside aiconfigurator's coverage.
    """

    def __init__(
        self,
        model_dir: str | Path,
        shape: ModelShape,
        system: str,
        mode: str | None = None,
        *,
        reference: str | None = None,
    ) -> None:
        """``mode``: the database mode, ``SILICON`` or ``EMPIRICAL``; None: the system's own (:func:`mode_for`).
        ``reference`` (EMPIRICAL only): the system with measured data whose efficiency scales this system's
        speed of light; by default the one :data:`EMPIRICAL_REFERENCES` names for a system without data, none
        for a system with data (aiconfigurator's own EMPIRICAL mode runs there). ``reference=system`` gives back
        its SILICON figures (a check).

        Raises:
            PredictError: no model installed, no data for ``system`` in ``mode`` nor a reference for it, or a
                mode this version cannot run for the system (one line).
        """
        self._sdk = _Sdk.get()
        self.shape = shape
        self.system = system
        self.mode = mode or mode_for(system)
        if self.mode not in MODE_LABELS:
            raise PredictError(f"unknown aiconfigurator database mode {self.mode!r}")
        if self.mode == EMPIRICAL and reference is None and system not in SYSTEMS.values():
            reference = EMPIRICAL_REFERENCES.get(system)
            if reference is None:
                raise PredictError(
                    f"aiconfigurator {self._sdk.version} has measured data neither for {system} nor for a GPU "
                    "of its architecture"
                )
        if reference is not None and self.mode != EMPIRICAL:
            raise PredictError(f"a reference GPU is for the EMPIRICAL mode, not {self.mode}")
        self.reference = reference
        self._model_dir, self._note = _usable_model_dir(Path(model_dir))
        self._reference_dbs: tuple[Any, Any] | None = None
        # aiconfigurator's answers by what reaches it: candidates that differ only in max-num-seqs (or share a
        # reference run) ask the same question many times over.
        self._runs: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any], bool]] = {}
        if reference is None:
            self.data_version, self._db = self._sdk.database(system, self.mode)
            if self.mode == SILICON:
                described = f"vLLM data {self.data_version}"
            else:
                described = (
                    f"EMPIRICAL: speed-of-light x empirical factors from its vLLM data {self.data_version}"
                )
        else:
            self.data_version, measured = self._sdk.database(reference, SILICON)
            _, self._db = self._sdk.database(system, SOL, versioned_as=reference)
            self._reference_dbs = (measured, self._sdk.database(reference, SOL)[1])
            whose = "its own" if reference == system else f"no {gpu_model_for(system)} data"
            described = (
                f"EMPIRICAL: {system}'s speed of light x {gpu_model_for(reference)}'s measured efficiency "
                f"({reference} vLLM data {self.data_version}; {whose})"
            )
        self.source = f"aiconfigurator {self._sdk.version}, {system}, {described}{self._note}"
        if self.mode != SILICON:
            self._probe()

    @property
    def kind(self) -> str:
        """What kind of figures these are: ``"aiconfigurator SILICON"`` or ``"aiconfigurator EMPIRICAL (...)"``."""
        if self.reference is not None:
            return f"aiconfigurator EMPIRICAL (speed of light x {gpu_model_for(self.reference)}'s measured efficiency)"
        if self.mode == EMPIRICAL:
            return "aiconfigurator EMPIRICAL (speed-of-light x empirical factors from measured data)"
        return f"aiconfigurator {MODE_LABELS[self.mode]}"

    def _probe(self) -> None:
        """One estimate, so that a mode this version cannot run for the system fails here, in one line."""
        try:
            self._estimate(Candidate(gpu_memory_utilization=0.9), Workload(128, 16), 1)
        except PredictError as exc:
            why = str(exc).rsplit(f" on {self.system}: ", 1)[-1]
            raise PredictError(
                f"aiconfigurator {self._sdk.version} cannot run its {self.mode} mode for {self.system}: {why}"
            ) from None

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
        figures, memory, oom = self._run(self._db, self.system, c, workload, batch)
        if self._reference_dbs is not None:
            figures = self._transferred(figures, c, workload, batch)
        capacity_gib = self.gpu_memory_bytes / GiB
        fraction = c.gpu_memory_utilization or 0.92
        kv_gib = float(memory.get("kvcache", 0.0))
        non_kv = float(memory["total"]) - kv_gib
        budget = capacity_gib * fraction * 0.98 - non_kv  # aiconfigurator's own KV-budget rule
        per_request = kv_gib / batch if batch else 0.0
        return {
            "estimate": Estimate(
                concurrency=batch,
                ttft_s=float(figures["ttft"]) / 1000.0,
                tpot_s=float(figures["tpot"]) / 1000.0,
                output_tokens_per_s=float(figures["tokens/s"]),
                memory_gib_per_gpu=float(figures["memory"]),
            ),
            "oom": oom,
            "memory_gib": float(memory["total"]),
            "max_batch_by_kv": int(budget // per_request) if per_request > 0 and budget > 0 else 0,
        }

    def _transferred(
        self, target: dict[str, Any], c: Candidate, workload: Workload, batch: int
    ) -> dict[str, Any]:
        """The target's speed-of-light figures scaled by the reference's measured/speed-of-light ratio."""
        assert self._reference_dbs is not None and self.reference is not None
        measured_db, speed_of_light_db = self._reference_dbs
        try:
            measured = self._run(measured_db, self.reference, c, workload, batch)[0]
            speed_of_light = self._run(speed_of_light_db, self.reference, c, workload, batch)[0]
        except PredictError as exc:
            why = str(exc).rsplit(f" on {self.reference}: ", 1)[-1]
            raise PredictError(
                f"aiconfigurator cannot model {c.label()} on {self.system}: {gpu_model_for(self.reference)}, "
                f"whose measured efficiency it borrows, cannot: {why}"
            ) from None
        return transfer(target, measured, speed_of_light, batch, workload.output_len)

    def _run(
        self, db: Any, system: str, c: Candidate, workload: Workload, batch: int
    ) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """aiconfigurator's figures (its result dict: ms, tokens/s, GiB), memory (GiB) and whether it runs out
        of memory, for one database; asked once per question."""
        sdk = self._sdk
        tp = c.tensor_parallel_size or 1
        gemm = "fp8" if c.fp8_weights else "bfloat16"
        kv = "fp8" if c.fp8_kv_cache else "bfloat16"
        ctx_tokens = min(workload.input_len, c.max_num_batched_tokens or workload.input_len)
        key = (id(db), tp, gemm, kv, workload, batch, ctx_tokens, c.gpu_memory_utilization)
        if key in self._runs:
            return self._runs[key]
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
            sdk.resolve_context_fmha_by_data(config, path, db, "vllm", is_context_role=True)
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
                db,
                runtime,
                ctx_tokens=ctx_tokens,
                max_seq_len=None,
                free_gpu_memory_fraction=c.gpu_memory_utilization,
                decode_tokens_per_iteration=1.0,
            )
        except PredictError:
            raise
        except AssertionError as exc:  # e.g. "num_heads 32 should be divisible by tp_size 3"
            raise PredictError(f"aiconfigurator cannot model {c.label()}: {exc}") from None
        except Exception as exc:  # its own errors: no data for an option, an unsupported architecture
            why = _first_line(exc)
            if "fp8_tc_flops" in why:
                why = "no FP8 compute (aiconfigurator's description of this GPU lists none)"
            raise PredictError(f"aiconfigurator cannot model {c.label()} on {system}: {why}") from None
        answer = (
            dict(summary.get_result_dict() or {}),
            dict(summary.get_memory()),
            bool(summary.check_oom()),
        )
        self._runs[key] = answer
        return answer


def transfer(
    target: Mapping[str, Any],
    measured: Mapping[str, Any],
    speed_of_light: Mapping[str, Any],
    batch: int,
    output_len: int,
) -> dict[str, Any]:
    """The EMPIRICAL estimate from aiconfigurator's result dicts: each of the target's speed-of-light TTFT, TPOT
    and tokens/s times the reference's measured/speed-of-light ratio of the same figure, then tokens/s capped at
    what ``batch`` requests of that TTFT and TPOT can complete (Little's law), as aiconfigurator caps its own.
    On the reference itself (target = speed_of_light) it gives back the measured figures."""

    def scaled(key: str) -> float:
        ideal = float(speed_of_light[key])
        return float(target[key]) * (float(measured[key]) / ideal if ideal > 0 else 1.0)

    ttft_ms, tpot_ms, tokens_per_s = scaled("ttft"), scaled("tpot"), scaled("tokens/s")
    decode_steps = max(output_len - 1, 0)
    latency_ms = ttft_ms + tpot_ms * decode_steps
    if decode_steps and latency_ms > 0:
        tokens_per_s = min(tokens_per_s, batch * decode_steps * 1000.0 / latency_ms)
    return {**target, "ttft": ttft_ms, "tpot": tpot_ms, "tokens/s": tokens_per_s}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    name = gpu_model_for(system)  # the first: A100 80GB for a100_sxm
    known = gpus.lookup(name)
    if model is not None:
        memory = model.gpu_memory_bytes
    else:
        memory = int((known.memory_gb if known and known.memory_gb else 80) * 1e9)
    cc = _COMPUTE_CAPABILITY.get(system, (8, 0))
    return Hardware(gpu_name=name, gpu_count=gpu_count, vram_per_gpu_bytes=memory, compute_capability=cc)
