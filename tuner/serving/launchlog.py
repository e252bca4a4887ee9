"""Why a vLLM server did not start, read from its log: :class:`FailureKind` and :func:`classify_log`.

:mod:`tuner.serving.launcher` uses them to name the cause of a failed start in one line for people, and to give up
early on a server that can no longer become healthy (:func:`is_fatal`).
"""

from __future__ import annotations

import enum
import re

__all__ = ["FailureKind", "classify_log", "is_fatal", "strip_log_prefix"]


class FailureKind(str, enum.Enum):
    """Why a vLLM server did not start or did not stay up."""

    CUDA_OOM = "cuda_oom"  # the GPU ran out of memory while loading weights or profiling
    GPU_MEMORY_BUSY = (
        "gpu_memory_busy"  # less free GPU memory than --gpu-memory-utilization asks: other processes
    )
    KV_CACHE_TOO_SMALL = "kv_cache_too_small"  # weights fit, but not the KV cache for one max-length request
    UNSUPPORTED_OPTION = "unsupported_option"  # a flag or value this vLLM or this hardware does not accept
    PORT_IN_USE = "port_in_use"
    MODEL_NOT_FOUND = "model_not_found"  # no such local directory, and not a reachable model-hub id
    VLLM_NOT_INSTALLED = "vllm_not_installed"  # the command or the vllm module does not exist
    CANNOT_START = "cannot_start"  # the process could not be spawned or its log file not written
    ENGINE_INIT_FAILED = "engine_init_failed"  # the engine died during start-up for a reason not listed above
    TIMEOUT = "timeout"  # not healthy within the start-up timeout
    EXITED = "exited"  # the process ended with nothing in its log that says why


# Most specific first: a failed start logs its root cause, then the generic
# "Engine core initialization failed".
# Messages as vLLM 0.2x-0.3x, PyTorch, uvicorn, argparse and huggingface_hub write them.
_SIGNATURES: tuple[tuple[FailureKind, re.Pattern[str]], ...] = (
    (
        FailureKind.VLLM_NOT_INSTALLED,
        re.compile(r"No module named '?vllm|PackageNotFoundError: No package metadata was found for vllm"),
    ),
    (
        FailureKind.CUDA_OOM,
        re.compile(
            r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|cudaErrorMemoryAllocation"
        ),
    ),
    (FailureKind.GPU_MEMORY_BUSY, re.compile(r"is less than desired GPU memory utilization")),
    (
        FailureKind.KV_CACHE_TOO_SMALL,
        re.compile(
            r"No available memory for the cache blocks"
            r"|KV cache is needed, which is larger than the available KV cache memory"
            r"|not enough KV cache"
            r"|insufficient memory for (the )?KV cache",
            re.IGNORECASE,
        ),
    ),
    (
        FailureKind.PORT_IN_USE,
        re.compile(r"\[Errno 98\]|Address already in use|address already in use", re.IGNORECASE),
    ),
    (
        FailureKind.MODEL_NOT_FOUND,
        re.compile(
            r"Invalid repository ID or local directory"
            r"|is not a local folder and is not a valid model identifier"
            r"|Repo id must (be in the form|use alphanumeric)"
            r"|RepositoryNotFoundError|LocalEntryNotFoundError|GatedRepoError"
            r"|(Can't|Cannot) find (a )?(model|config)"
            r"|No such file or directory: '[^']*config\.json'"
        ),
    ),
    (
        FailureKind.UNSUPPORTED_OPTION,
        re.compile(
            r"error: unrecognized arguments"
            r"|error: argument [^:]+: invalid"
            r"|error: ambiguous option"
            r"|Unknown quantization method"
            r"|quantization is currently not supported"
            r"|is not supported (on|for|by|in) (this|the current|CPU|cpu)"
            r"|not supported on (the )?CPU"
            r"|NotImplementedError"
            # An operator this build of vLLM was compiled without (fp8 kernels in the CPU build).
            r"|Declaration: _C::\w+\(\) -> \(\)"
            r"|no kernel image is available for execution on the device"
        ),
    ),
    (
        FailureKind.ENGINE_INIT_FAILED,
        re.compile(
            r"Engine core initialization failed"
            r"|Frontend process failed during engine core initialization"
            r"|EngineDeadError|EngineCore failed to start|Engine process failed to start"
        ),
    ),
)

# Lines that mean the server can no longer become healthy even if its API process lives on. Only these make
# VllmServer.start() give up early: a root-cause pattern above can also show in a harmless warning.
_FATAL = re.compile(
    r"Engine core initialization failed"
    r"|Frontend process failed during engine core initialization"
    r"|EngineDeadError"
)

# vLLM prefixes lines with "(APIServer pid=1234) ERROR 11-22 12:21:13 [file.py:63] "; people need the message.
_LOG_PREFIX = re.compile(
    r"^(\([\w-]+ pid=\d+\)\s*)?((INFO|WARNING|ERROR|DEBUG|CRITICAL)\s+\d\d-\d\d \S+ \[[^\]]*\]\s*)?"
)


# "ValueError: ...", "torch.OutOfMemoryError: ...", "huggingface_hub.errors.LocalEntryNotFoundError: ..."
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]*\.)?(?:\w*(?:Error|Exit)|\w*Exception): ")


def classify_log(text: str) -> tuple[FailureKind, str] | None:
    """Find why a vLLM start failed in its log: ``(kind, the line that says so)``, or None if nothing does.

    The most specific cause wins over the generic "engine initialisation failed" that follows it in the log.
    The line is returned without vLLM's process/level/file prefix.
    """
    lines = [strip_log_prefix(line) for line in text.splitlines()]
    for kind, pattern in _SIGNATURES:
        matches = [line for line in lines if pattern.search(line)]
        if matches:
            # A traceback names the exception in its source lines ("raise LocalEntryNotFoundError(") before
            # the line that carries its message: report the message.
            messages = [line for line in matches if _EXCEPTION_LINE.match(line)]
            not_code = [line for line in matches if not line.startswith(("raise ", "File "))]
            line = (messages or not_code or matches)[0]
            if kind is FailureKind.ENGINE_INIT_FAILED:
                # "Engine core initialization failed. See root cause above.": the first exception is it.
                line = next((x for x in lines if _EXCEPTION_LINE.match(x) and not _FATAL.search(x)), line)
            return kind, line
    return None


def is_fatal(line: str) -> bool:
    """True for a log line after which the server cannot become healthy, even if its API process lives on."""
    return _FATAL.search(line) is not None


def strip_log_prefix(line: str) -> str:
    """A log line without vLLM's ``(APIServer pid=1234) ERROR 11-22 12:21:13 [file.py:63]`` prefix."""
    return _LOG_PREFIX.sub("", line.strip(), count=1).strip()
