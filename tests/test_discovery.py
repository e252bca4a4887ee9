"""Finding inference servers (vLLM, SGLang, TGI, llama.cpp) on this machine from their command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tuner.telemetry.discovery import (
    SeenProcess,
    discover_servers,
    discover_vllm_urls,
    engine_of_cmdline,
    is_vllm_server,
    servers_from_processes,
    url_from_cmdline,
)


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/usr/bin/vllm", "serve", "m"], True),
        (["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], True),
        (["/venv/bin/python", "/venv/bin/vllm", "serve", "m", "--port", "9000"], True),
        (["python", "train.py", "--vllm"], False),
        (["bash"], False),
        ([], False),
    ],
)
def test_is_vllm_server(cmdline: list[str], expected: bool) -> None:
    assert is_vllm_server(cmdline) is expected


def test_url_from_flags_listening_ports_and_default() -> None:
    assert url_from_cmdline(["vllm", "serve", "m", "--port", "9001"]) == "http://127.0.0.1:9001"
    assert (
        url_from_cmdline(["vllm", "serve", "m", "--port=9002", "--host=0.0.0.0"]) == "http://127.0.0.1:9002"
    )
    assert url_from_cmdline(["vllm", "serve", "m", "--host", "10.1.2.3"]) == "http://10.1.2.3:8000"
    assert url_from_cmdline(["vllm", "serve", "m"], listening_ports=[8123]) == "http://127.0.0.1:8123"
    assert url_from_cmdline(["vllm", "serve", "m", "--host", "::1", "--port", "1"]) == "http://[::1]:1"


def test_discovers_a_running_process_by_its_command_line() -> None:
    # A harmless process whose argv looks like a vLLM API server on port 18555.
    code = "import time; time.sleep(30)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "vllm.entrypoints.openai.api_server", "--port", "18555"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 5
        while "http://127.0.0.1:18555" not in discover_vllm_urls() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "http://127.0.0.1:18555" in discover_vllm_urls()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    ("cmdline", "engine"),
    [
        (["vllm", "serve", "m"], "vllm"),
        (["python3", "-m", "sglang.launch_server", "--model-path", "m", "--port", "30001"], "sglang"),
        (["text-generation-launcher", "--model-id", "m"], "tgi"),
        (["/usr/local/bin/text-generation-router", "--port", "80"], "tgi"),
        (["text-generation-router-v3", "--port", "80"], "tgi"),
        (["/opt/llama.cpp/build/bin/llama-server", "-m", "model.gguf", "--metrics"], "llamacpp"),
        (["python", "-c", "import sglang"], None),
        (["llama-cli", "-m", "model.gguf"], None),
        ([], None),
    ],
)
def test_engine_of_cmdline(cmdline: list[str], engine: str | None) -> None:
    assert engine_of_cmdline(cmdline) == engine


def test_each_engine_has_its_own_default_port_flags_and_environment() -> None:
    assert (
        url_from_cmdline(["python", "-m", "sglang.launch_server"], engine="sglang")
        == "http://127.0.0.1:30000"
    )
    assert url_from_cmdline(["text-generation-launcher"], engine="tgi") == "http://127.0.0.1:3000"
    assert (
        url_from_cmdline(["text-generation-launcher", "-p", "8081"], engine="tgi") == "http://127.0.0.1:8081"
    )
    # TGI's image sets PORT=80; the router gets --hostname/--port from the launcher.
    assert url_from_cmdline(["text-generation-launcher"], engine="tgi", environ={"PORT": "80"}) == (
        "http://127.0.0.1:80"
    )
    router = [
        "text-generation-router",
        "--hostname",
        "10.0.0.5",
        "--port",
        "8080",
        "--prometheus-port",
        "9000",
    ]
    assert url_from_cmdline(router, [9000, 8080], engine="tgi") == "http://10.0.0.5:8080"
    assert url_from_cmdline(["llama-server", "-m", "x.gguf"], engine="llamacpp") == "http://127.0.0.1:8080"
    env = {"LLAMA_ARG_PORT": "9999", "LLAMA_ARG_HOST": "0.0.0.0"}
    assert url_from_cmdline(["llama-server"], engine="llamacpp", environ=env) == "http://127.0.0.1:9999"


def test_tgi_router_under_its_launcher_is_one_server_named_by_the_router() -> None:
    launcher = SeenProcess(10, 1, ("text-generation-launcher", "--model-id", "m"), "tgi")
    router = SeenProcess(12, 10, ("text-generation-router", "--port", "80"), "tgi")
    vllm_api = SeenProcess(20, 1, ("vllm", "serve", "m"), "vllm")
    vllm_fork = SeenProcess(21, 20, ("vllm", "serve", "m"), "vllm")  # a worker forked with the same argv
    servers = {
        root.pid: named_by.pid
        for root, named_by in servers_from_processes([router, launcher, vllm_fork, vllm_api])
    }
    assert servers == {10: 12, 20: 20}


def test_discovers_sglang_and_llama_server_processes_with_their_process_trees() -> None:
    # Harmless processes whose argv looks like the servers (bash's `exec -a` sets argv[0]).
    sleep = "import time; time.sleep(30)"
    sglang = subprocess.Popen(
        [sys.executable, "-c", sleep, "-m", "sglang.launch_server", "--port", "18556"], start_new_session=True
    )
    llama = subprocess.Popen(
        ["bash", "-c", f'exec -a llama-server {sys.executable} -c "{sleep}" --port 18557 --metrics'],
        start_new_session=True,
    )
    try:
        wanted = {
            "http://127.0.0.1:18556": ("sglang", sglang.pid),
            "http://127.0.0.1:18557": ("llamacpp", llama.pid),
        }
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = {s.url: s for s in discover_servers() if s.url in wanted}
            if len(found) == len(wanted):
                break
            time.sleep(0.1)
        assert {url: (s.engine, s.pid) for url, s in found.items()} == wanted
        assert all(s.pid in s.pids for s in found.values())
        assert "http://127.0.0.1:18556" not in discover_vllm_urls()
    finally:
        for proc in (sglang, llama):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_url_given_by_hand_finds_the_discovered_server_it_names() -> None:
    import socket

    from tuner.telemetry.discovery import DiscoveredServer
    from tuner.telemetry.sampler import _same_local_server

    found = [
        DiscoveredServer("http://127.0.0.1:8000", "vllm", 100, (100, 101)),
        DiscoveredServer("http://127.0.0.1:30000", "sglang", 200, (200,)),
    ]
    assert _same_local_server("http://localhost:8000", found) is found[0]
    assert _same_local_server(f"http://{socket.gethostname()}:30000", found) is found[1]
    assert _same_local_server("http://10.1.2.3:8000", found) is None  # another machine's server
    assert _same_local_server("http://localhost:9999", found) is None
