"""SIGTERM stops bench and tune as Ctrl-C does: what was measured is written and the server's process group is
stopped.

SIGTERM is what systemd, a container runtime and a batch scheduler send. Each test runs the real ``infertop``
command in a subprocess against the stand-in vLLM (tests/fakes/fake_vllm.py, which writes its pid to a ledger),
sends SIGTERM in the middle of a measured phase, and checks the exit, the files and that no process of the
server's group is left. The TUI's tune gets the same from a Pilot test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tui.tune_app import make_tune_app
from tuner.serving.leftovers import group_members
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.events import Listener
from tuner.tuning.store import TrialStatus, load_run

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fakes" / "fake_vllm.py"
FAKE_VLLM = f"{sys.executable} {FAKE} serve"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-8b-shape"), **LLAMA_3_1_8B)


@contextlib.contextmanager
def infertop(args: list[str], log: Path, ledger: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``infertop ARGS`` in a session of its own (so a test's SIGTERM reaches it alone), output in ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", *args],
            cwd=REPO, env={**os.environ, "FAKE_VLLM_LEDGER": str(ledger)}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def servers(ledger: Path) -> list[int]:
    """The pids of every stand-in server started (each leads its own process group)."""
    if not ledger.exists():
        return []
    entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    return [e["pid"] for e in entries if e["event"] == "start"]


def assert_no_server_left(ledger: Path) -> None:
    started = servers(ledger)
    assert started, "no server was launched"
    for pgid in started:
        assert group_members(pgid) == [], f"the server's process group {pgid} outlived the SIGTERM"


def test_sigterm_mid_phase_of_a_bench_writes_its_results_and_stops_the_server(
    model: Path, tmp_path: Path
) -> None:
    out, log, ledger = tmp_path / "bench.json", tmp_path / "bench.log", tmp_path / "ledger.jsonl"
    args = [
        "bench", "--launch", str(model), "--vllm-cmd", FAKE_VLLM, "--no-gpu", "--concurrency", "2",
        "--duration", "60", "--warmup", "0", "--input-len", "16", "--output-len", "12", "--out", str(out),
    ]  # fmt: skip
    with infertop(args, log, ledger) as proc:
        wait_for(lambda: b"vLLM ready" in log.read_bytes(), "the server to be ready")
        time.sleep(1.5)  # well inside the 60 s phase
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    text = log.read_text()
    assert code == 130, text[-2000:]
    assert "Traceback" not in text and "stopping; what was measured so far is written" in text
    saved = json.loads(out.read_text())
    assert saved["interrupted"] is True
    [phase] = saved["phases"]  # the phase under way, with what it measured before the signal
    assert phase["cancelled"] is True and phase["stats"]["requests_ok"] > 0
    assert_no_server_left(ledger)


def test_sigterm_mid_phase_of_a_tune_writes_the_report_keeps_the_trial_and_stops_the_server(
    model: Path, tmp_path: Path
) -> None:
    out, store = tmp_path / "out", tmp_path / "s.sqlite"
    log, ledger = tmp_path / "tune.log", tmp_path / "ledger.jsonl"
    args = [
        "tune", str(model), "--simulate", "h100x1", "--headless", "--no-predict", "--vllm-cmd", FAKE_VLLM,
        "--store", str(store), "--out", str(out), "--slo", "ttft=1,tps=5", "--input-len", "16",
        "--output-len", "12", "--phase-seconds", "30", "--max-concurrency", "4", "--pin", "max-model-len=4096",
        "--budget", "1", "--no-prove",
    ]  # fmt: skip
    with infertop(args, log, ledger) as proc:
        wait_for(lambda: b"ready in" in log.read_bytes(), "the first trial's server to be ready")
        time.sleep(1.5)  # inside its first 30 s phase
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 130, text[-2000:]
    assert "Traceback" not in text and "SIGTERM again to abort at once" in text
    report = json.loads((out / "report.json").read_text())
    assert report["headline"].startswith("INTERRUPTED") and (out / "report.md").exists()
    _, trials = load_run(store)
    assert [t.status for t in trials] == [TrialStatus.INTERRUPTED]
    assert_no_server_left(ledger)


class HeldTuner:
    """A tuner that runs until it is cancelled, as a long phase does."""

    sampler = None

    def __init__(self) -> None:
        self.running = threading.Event()
        self.stopped_cleanly = False

    def run(self, listener: Listener, cancel: threading.Event) -> object:
        self.running.set()
        cancel.wait(timeout=30)
        self.stopped_cleanly = cancel.is_set()
        return "interrupted"


async def test_sigterm_to_the_tune_tui_stops_the_run_like_a_confirmed_q_then_leaves() -> None:
    tuner = HeldTuner()
    before = signal.getsignal(signal.SIGTERM)
    app = make_tune_app(tuner)
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(100):
            if tuner.running.is_set():
                break
            await pilot.pause(0.02)
        assert tuner.running.is_set() and app.run_active
        # Checked before sending: without a handler, SIGTERM would end the test run itself.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)
        await app.workers.wait_for_complete()
        for _ in range(20):
            await pilot.pause()
        assert app.cancel.is_set() and not app.is_running
    assert tuner.stopped_cleanly and app.result == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == before  # handed back when the app left
