"""Host facts of GPU processes: a pid NVML gives is trusted only once it holds a /dev/nvidia* device here."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import prime, scripted_app
from textual.widgets import Label

from tui.screens.confirm import ConfirmScreen
from tui.widgets.process_table import ProcessTable
from tuner.telemetry import nvml as nvml_module
from tuner.telemetry import scripted
from tuner.telemetry.host import COMMAND_MAX_CHARS, HostProcesses, holds_gpu


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def fake_roots(tmp_path: Path, fds: dict[int, list[str]], devices: bool = True) -> tuple[str, str]:
    """A /proc whose pids have the given open files, and a /dev with (or without) an NVIDIA device."""
    dev = tmp_path / "dev"
    dev.mkdir()
    if devices:
        (dev / "nvidia0").touch()
        (dev / "nvidiactl").touch()
    for pid, targets in fds.items():
        fd_dir = tmp_path / "proc" / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        for n, target in enumerate(targets):
            os.symlink(target, fd_dir / str(n))
    (tmp_path / "proc").mkdir(exist_ok=True)
    return str(tmp_path / "proc"), str(dev)


def test_holds_gpu_reads_the_open_device_files(tmp_path: Path) -> None:
    proc, dev = fake_roots(tmp_path, {10: ["/dev/null", "/dev/nvidia0"], 11: ["/dev/null", "socket:[1]"]})
    assert holds_gpu(10, proc, dev) is True
    assert holds_gpu(11, proc, dev) is False
    assert holds_gpu(12, proc, dev) is False  # no such process here


def test_holds_gpu_cannot_tell_without_nvidia_devices_or_when_fds_are_private(tmp_path: Path) -> None:
    proc, dev = fake_roots(tmp_path, {10: ["/dev/nvidia0"]}, devices=False)
    assert holds_gpu(10, proc, dev) is None
    if os.geteuid() != 0:  # root reads any directory
        locked = Path(proc) / "10" / "fd"
        (tmp_path / "dev" / "nvidia0").touch()
        locked.chmod(0)
        try:
            assert holds_gpu(10, proc, dev) is None
        finally:
            locked.chmod(0o755)


def test_a_pid_that_holds_the_gpu_gets_its_facts(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    proc, dev = fake_roots(tmp_path, {sleeper.pid: ["/dev/nvidia0"]})
    facts = HostProcesses(proc_root=proc, dev_root=dev).read([sleeper.pid])[sleeper.pid]
    assert facts["host_verified"] is True
    assert "time.sleep(60)" in facts["command"]


def test_a_pid_of_another_namespace_gets_no_facts(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """The number exists here but names a process without the GPU: nothing of it may be shown as the GPU's."""
    proc, dev = fake_roots(tmp_path, {sleeper.pid: ["/dev/null"]})
    processes = HostProcesses(proc_root=proc, dev_root=dev)
    gone = 2**22 + 7  # above any default pid_max: not a process here
    facts = processes.read([sleeper.pid, gone])
    assert facts == {sleeper.pid: {"host_verified": False}, gone: {"host_verified": False}}


def test_without_nvidia_devices_facts_are_attached_unverified(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    proc, dev = fake_roots(tmp_path, {}, devices=False)
    facts = HostProcesses(proc_root=proc, dev_root=dev).read([sleeper.pid])[sleeper.pid]
    assert facts["host_verified"] is None
    assert "time.sleep(60)" in facts["command"]


def test_user_names_are_looked_up_once_per_uid(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    calls: list[int] = []
    real = psutil.Process.username

    def counting(self: psutil.Process) -> str:
        calls.append(self.pid)
        return real(self)

    monkeypatch.setattr(psutil.Process, "username", counting)
    proc, dev = fake_roots(tmp_path, {}, devices=False)
    processes = HostProcesses(proc_root=proc, dev_root=dev)
    for _ in range(5):
        facts = processes.read([sleeper.pid, os.getpid()])
    assert facts[os.getpid()]["user"] == real(psutil.Process())
    assert len(calls) == 1  # both processes are this user's


async def test_k_refuses_a_pid_of_another_namespace(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, dev = fake_roots(tmp_path, {sleeper.pid: ["/dev/null"]})
    monkeypatch.setattr(
        nvml_module, "HostProcesses", functools.partial(HostProcesses, proc_root=proc, dev_root=dev)
    )
    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(1, clock=clock, processes=[scripted.FakeProcess(sleeper.pid, 0, 1024 * 2**20)])
    app = scripted_app(nvml, clock)
    async with app.run_test(size=(100, 30)) as pilot:
        prime(app, clock, ticks=4)
        await pilot.pause()
        table = app.monitor.query_one(ProcessTable)
        table.focus()
        selected = table.selected_process
        assert selected is not None and selected.pid == sleeper.pid and selected.host_verified is False
        assert selected.command is None  # the stranger's command line is not shown as the GPU's
        await pilot.press("k")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        assert sleeper.poll() is None


def test_a_command_line_is_masked_argument_by_argument_before_it_is_cut(tmp_path: Path) -> None:
    """Masked per argument (a value may hold spaces) and before the cut (a cut secret no longer looks like one)."""
    argv = [
        "import time; time.sleep(60)",
        "--api-key",
        "SECRET with spaces",
        "x" * 200,
        "HF_TOKEN=SECRETtoken",
    ]
    child = subprocess.Popen([sys.executable, "-c", *argv])
    try:
        proc, dev = fake_roots(tmp_path, {}, devices=False)
        command = HostProcesses(proc_root=proc, dev_root=dev).read([child.pid])[child.pid]["command"]
    finally:
        child.kill()
        child.wait()
    assert "--api-key *** xxx" in command and "SECRET" not in command
    assert len(command) == COMMAND_MAX_CHARS and command.endswith("…")


async def test_k_names_a_command_line_that_looks_like_markup_as_it_is(tmp_path: Path) -> None:
    """A command line is anyone's text: in the question it is neither markup that fails nor a click action."""
    argv0 = "[/] [@click=app.quit]x"  # what the process calls itself comes first in its command line
    child = subprocess.Popen([argv0, "-c", "import time; time.sleep(60)"], executable=sys.executable)
    try:
        clock = scripted.ManualClock()
        nvml = scripted.h100_sxm(1, clock=clock, processes=[scripted.FakeProcess(child.pid, 0, 1024 * 2**20)])
        app = scripted_app(nvml, clock)
        async with app.run_test(size=(160, 30)) as pilot:
            prime(app, clock, ticks=2)
            await pilot.pause()
            app.monitor.query_one(ProcessTable).focus()
            await pilot.press("k")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            question = str(app.screen.query_one(Label).render())
            assert f"process {child.pid} ({argv0} -c import" in question
            await pilot.press("n")
            await pilot.pause()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
