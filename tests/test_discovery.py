"""Finding vLLM servers on this machine from their command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tuner.telemetry.discovery import discover_vllm_urls, is_vllm_server, url_from_cmdline


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
