"""No secret leaves the process: a GPU process started with credentials in its argv, seen through the scripted
NVML and the real psutil, never shows them in anything infertop writes, serves or draws."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import prime, scripted_app, scripted_exporter

from tui.cli import main
from tui.widgets.process_table import ProcessTable
from tuner.telemetry import scripted

# Each marker stands for one kind of secret; none of them may appear anywhere.
SECRET_ARGS = (
    "--api-key",
    "sk-test-SECRET123456",
    "HF_TOKEN=hf_SECRETabcdef123456",
    "--db-password=SECRETpassword",
    "--hf-token",
    "SECRETtoken123",
    "http://admin:SECRETurlpass@127.0.0.1:8000/v1",
)
MARKER = "SECRET"


@pytest.fixture
def gpu_process() -> Iterator[subprocess.Popen[bytes]]:
    """A real process with secrets in its argv (``python -c CODE ARGS...`` keeps ARGS in its command line)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *SECRET_ARGS])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _nvml_with(pid: int, clock: scripted.ManualClock | None = None) -> scripted.ScriptedNvml:
    """One H100 whose driver lists ``pid`` as holding 1 GiB of it."""
    return scripted.h100_sxm(1, clock=clock, processes=[scripted.FakeProcess(pid, 0, 2**30)])


def test_a_recording_by_infertop_record_holds_no_secret(
    tmp_path: Path,
    gpu_process: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = scripted.scripted_backend(_nvml_with(gpu_process.pid))
    monkeypatch.setattr("tuner.telemetry.nvml.NvmlBackend", lambda: backend)
    out = tmp_path / "rec.ndjson"
    caplog.set_level("DEBUG")
    argv = ["record", str(out), "--duration", "0.4", "--interval", "0.05", "--no-discover", "--label", "ci"]
    assert main(argv) == 0
    recording = out.read_text()
    assert f'"pid":{gpu_process.pid}' in recording  # the process was seen, with its command line
    assert "--api-key ***" in recording and "HF_TOKEN=***" in recording
    assert MARKER not in recording
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    said = capsys.readouterr()
    assert MARKER not in said.out + said.err + caplog.text


def test_the_exporter_serves_no_secret(gpu_process: subprocess.Popen[bytes]) -> None:
    clock = scripted.ManualClock()
    exporter = scripted_exporter(_nvml_with(gpu_process.pid, clock), clock)
    try:
        latest = exporter.sampler.latest
        assert latest is not None and latest.gpus[0].processes
        assert any(p.pid == gpu_process.pid for p in latest.gpus[0].processes)
        metrics = httpx.get(exporter.url, timeout=5)
        snapshot = httpx.get(exporter.url.removesuffix("/metrics") + "/snapshot.json", timeout=5)
        assert metrics.status_code == 200 and snapshot.status_code == 200
        assert str(gpu_process.pid) in metrics.text  # its series are there
        assert MARKER not in metrics.text and MARKER not in snapshot.text
    finally:
        exporter.stop()


async def test_the_screen_shows_the_masked_command_line(gpu_process: subprocess.Popen[bytes]) -> None:
    """The monitor's own user sees the masked line too: a screenshot or a shared terminal leaks nothing."""
    clock = scripted.ManualClock()
    app = scripted_app(_nvml_with(gpu_process.pid, clock), clock)
    async with app.run_test(size=(250, 30)) as pilot:
        prime(app, clock, ticks=2)
        await pilot.pause()
        table = app.monitor.query_one(ProcessTable)
        process = table.selected_process
        assert process is not None and process.pid == gpu_process.pid
        shown = str(table.get_row_at(0)[-1])  # the COMMAND cell
        assert "--api-key ***" in shown and "HF_TOKEN=***" in shown and MARKER not in shown
        assert MARKER not in app.export_screenshot()
