"""Tests of tuner.serving.launcher: argv units, process-group handling against a scripted fake server (for faults a
real vLLM cannot show on demand), and real launches of vLLM's CPU build."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import stat
import sys
import textwrap
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tuner.serving.launcher import (
    API_SERVER_MODULE,
    LaunchError,
    ServerSpec,
    StartCancelled,
    VllmServer,
    api_server_command,
    free_port,
)
from tuner.serving.launchlog import FailureKind
from tuner.serving.tinymodel import (
    LLAMA_3_1_8B,
    LLAMA_3_2_1B,
    MIN_VOCAB_SIZE,
    tokenizer_json,
    write_tiny_model,
)

SpecFactory = Callable[..., ServerSpec]  # the vllm_spec fixture of conftest.py

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
    if mode == "leaky-crash":  # vLLM logs its non-default arguments, an --api-key among them
        print("INFO non-default args: {'api_key': 'sk-test-0123456789SECRET', 'port': 8000}", flush=True)
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


# A shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
# SIGINT: a suite run as `./.ci/run &` would hand that to these owners, and Ctrl-C would never reach them.
_SIGINT_NOTE = "Ctrl-C raises KeyboardInterrupt, whatever this process inherited"


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


def test_what_infertop_shows_of_the_server_log_is_masked_and_the_log_is_private(
    fake_server: Callable[..., VllmServer],
) -> None:
    lines: list[str] = []
    server = fake_server("leaky-crash", on_log_line=lines.append)
    with pytest.raises(LaunchError) as caught:
        server.start()
    secret = "sk-test-0123456789SECRET"
    assert "'api_key': '***'" in caught.value.log_tail
    assert secret not in caught.value.summary + caught.value.log_tail + server.log_tail() + "\n".join(lines)
    assert any("api_key" in line for line in lines)
    assert server.log_path is not None and stat.S_IMODE(server.log_path.stat().st_mode) == 0o600


def test_a_cancelled_start_stops_the_group_at_once(fake_server: Callable[..., VllmServer]) -> None:
    """A SIGTERM'd tune must not wait out a long start-up: the wait for health watches ``cancelled``."""
    asked_at = time.monotonic() + 1.0
    server = fake_server("silent", startup_timeout_s=120.0, cancelled=lambda: time.monotonic() > asked_at)
    with pytest.raises(StartCancelled, match="cancelled"):
        server.start()
    assert time.monotonic() - asked_at < 10.0
    assert server.pid is not None and not _group_members(server.pid)


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
        from tuner.serving.launcher import ServerSpec, VllmServer
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
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # {_SIGINT_NOTE}
        from tuner.serving.launcher import ServerSpec, VllmServer
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


def test_ctrl_c_between_the_spawn_and_its_registration_still_stops_the_server(tmp_path: Path) -> None:
    # The Ctrl-C lands at the worst moment, while the new server is being registered for clean-up (here: by
    # the registration itself): start() must still raise KeyboardInterrupt and leave no server behind.
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    owner_code = textwrap.dedent(
        f"""\
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # {_SIGINT_NOTE}
        from tuner.serving import launcher, reaper
        from tuner.serving.launcher import ServerSpec, VllmServer
        watch = reaper.watch
        def watch_then_ctrl_c(pgid):
            print(pgid, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            return watch(pgid)
        launcher.reaper.watch = watch_then_ctrl_c
        server = VllmServer(ServerSpec(model="silent", command=(sys.executable, {str(script)!r}), startup_timeout_s=60))
        try:
            server.start()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    )
    owner = psutil.Popen([sys.executable, "-c", owner_code], stdout=-1, text=True)
    try:
        out, _ = owner.communicate(timeout=60)
        server_pid = int(out.split()[0])
        assert owner.returncode == 3 and "interrupted" in out
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
