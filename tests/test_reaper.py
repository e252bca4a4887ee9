"""Tests of tuner.serving.reaper: a process killed with SIGKILL takes its servers with it.

Each test runs an owner process (what a tuner or bench would be) that starts a server through the launcher,
then kills the owner with SIGKILL, which runs none of its exit handlers, and checks that the watchdog took the
server's whole process group down. The scripted fake server of test_launcher stands in for vLLM in the fast
tests; the ``vllm``-marked one does it with the real CPU build.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_launcher import FAKE_SERVER, _group_members

from tuner.serving import reaper

REPO_ROOT = Path(__file__).resolve().parent.parent
SpecFactory = Callable[..., Any]  # the vllm_spec fixture of conftest.py

# The owner: starts a server from the spec in argv[1] (JSON) and reports its pid and its watchdog's pid as soon
# as the group is registered; with "healthy", once the server answers /health. Then it waits to be killed. The
# server starts on a thread, so that the owner can report while start() still waits for health.
OWNER = textwrap.dedent(
    """\
    import json, os, sys, threading, time, traceback
    from pathlib import Path
    from tuner.serving import reaper
    from tuner.serving.launcher import ServerSpec, VllmServer

    options = json.loads(sys.argv[1])
    reaper.TERM_GRACE_S = options["term_grace_s"]
    spec = ServerSpec(
        model=options["model"],
        args=tuple(options["args"]),
        command=tuple(options["command"]),
        env=options["env"],
        startup_timeout_s=options["startup_timeout_s"],
        log_path=Path(options["log_path"]),
    )
    server = VllmServer(spec)

    def start():
        try:
            server.start()
        except BaseException:
            traceback.print_exc()
            os._exit(1)

    threading.Thread(target=start, daemon=True).start()
    while server.pid is None or server.pid not in reaper.watched_groups():
        time.sleep(0.01)
    if options["wait"] == "healthy":
        while server.startup_s is None:
            if not server.is_running():
                sys.exit("the server died: " + server.log_tail())
            time.sleep(0.05)
    print(server.pid, reaper.watchdog_pid(), flush=True)
    if options["stop"]:
        result = server.stop()
        print(json.dumps({"leftover": result.leftover_pids, "watched": sorted(reaper.watched_groups())}), flush=True)
    if options["fork"]:
        # A forked child (multiprocessing) holds a copy of every fd, the watchdog's pipe included.
        if os.fork() == 0:
            print(json.dumps({"child_watched": sorted(reaper.watched_groups())}), flush=True)
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
    """
)


@dataclass
class Owner:
    """A running owner process and what it reported."""

    process: subprocess.Popen[str]
    server_pid: int  # also the server's process-group id
    watchdog_pid: int
    log_path: Path  # the server's log

    def read_json(self) -> Any:
        assert self.process.stdout is not None
        return json.loads(self.process.stdout.readline())


@pytest.fixture
def start_owner(tmp_path: Path) -> Iterator[Callable[..., Owner]]:
    """Starts owner processes; whatever they started is killed at the end, pass or fail."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    started: list[subprocess.Popen[str]] = []
    reported: list[Owner] = []

    def start(
        model: str = "healthy",
        *,
        command: tuple[str, ...] = (sys.executable, str(script)),
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 60.0,
        wait: str = "healthy",
        stop: bool = False,
        fork: bool = False,
        term_grace_s: float = 2.0,
        report_timeout_s: float = 30.0,
    ) -> Owner:
        options = {
            "model": model,
            "command": list(command),
            "args": list(args),
            "env": env or {},
            "startup_timeout_s": startup_timeout_s,
            "log_path": str(tmp_path / f"server-{len(started)}.log"),
            "wait": wait,
            "stop": stop,
            "fork": fork,
            "term_grace_s": term_grace_s,
        }
        # Its own session, so that cleanup can take the owner and anything it forked down by group.
        process = subprocess.Popen(
            [sys.executable, "-c", OWNER, json.dumps(options)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        line = _read_line(process, report_timeout_s)
        server_pid, watchdog_pid = (int(word) for word in line.split())
        owner = Owner(process, server_pid, watchdog_pid, Path(str(options["log_path"])))
        reported.append(owner)
        return owner

    yield start
    for process in started:
        _kill_group(process.pid)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    for owner in reported:
        _kill_group(owner.server_pid)
        with contextlib.suppress(psutil.Error):
            watchdog = psutil.Process(owner.watchdog_pid)
            if "-c" in watchdog.cmdline():  # still ours, not a recycled pid
                watchdog.kill()


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The owner's first line of output, failing the test if it does not come in time or the owner died."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)  # the owner writes whole lines
    line = process.stdout.readline() if ready else ""
    if not line:
        state = (
            f"exited with {process.poll()}" if process.poll() is not None else f"silent for {timeout_s:.0f} s"
        )
        pytest.fail(f"the owner reported nothing ({state})")
    return line


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True for a live process; a zombie (dead, waiting for a parent to reap it) is not alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _sigkill_and_expect_group_gone(owner: Owner, members: list[int], timeout_s: float) -> None:
    owner.process.kill()  # SIGKILL: no atexit, no signal handler, no finally runs in the owner
    assert owner.process.wait(timeout=10) == -signal.SIGKILL
    assert _wait_until(lambda: not _group_members(owner.server_pid), timeout_s), (
        f"processes of the server's group still alive {timeout_s:.0f} s after the owner's SIGKILL: "
        f"{_group_members(owner.server_pid)}"
    )
    assert not [pid for pid in members if _alive(pid)]
    assert _wait_until(lambda: not _alive(owner.watchdog_pid), 5.0), "the watchdog did not exit"


# -- the fake server -----------------------------------------------------------------------------------------


def test_sigkill_of_the_owner_stops_a_healthy_server(start_owner: Callable[..., Owner]) -> None:
    # A grace period longer than the wait below: the group must go on SIGTERM, as vLLM does, not on SIGKILL.
    owner = start_owner("healthy", term_grace_s=60.0)
    members = _group_members(owner.server_pid)
    assert len(members) == 2  # the server and its worker
    assert _alive(owner.watchdog_pid)
    _sigkill_and_expect_group_gone(owner, members, timeout_s=15.0)


def test_sigkill_of_the_owner_while_the_server_starts_stops_it(start_owner: Callable[..., Owner]) -> None:
    owner = start_owner("silent", wait="registered")  # never healthy: start() is still waiting
    assert _wait_until(lambda: len(_group_members(owner.server_pid)) == 2, 10.0)  # its worker is up too
    _sigkill_and_expect_group_gone(owner, _group_members(owner.server_pid), timeout_s=15.0)


def test_a_group_that_ignores_sigterm_gets_sigkill(start_owner: Callable[..., Owner]) -> None:
    owner = start_owner("stubborn", term_grace_s=1.0)
    members = _group_members(owner.server_pid)
    assert len(members) == 2
    _sigkill_and_expect_group_gone(owner, members, timeout_s=15.0)


def test_a_forked_child_does_not_keep_the_watchdog_waiting(start_owner: Callable[..., Owner]) -> None:
    owner = start_owner("healthy", fork=True)
    assert owner.read_json() == {"child_watched": []}  # the child took nothing of the parent's state
    members = _group_members(owner.server_pid)
    _sigkill_and_expect_group_gone(owner, members, timeout_s=15.0)
    # The forked child lives on (in the owner's group) and did not hold the watchdog's pipe open.
    assert [pid for pid in _group_members(owner.process.pid) if pid != owner.process.pid]


def test_a_normal_stop_unregisters_and_the_watchdog_ends_with_its_owner(
    start_owner: Callable[..., Owner],
) -> None:
    owner = start_owner("healthy", stop=True)
    assert owner.read_json() == {"leftover": [], "watched": []}
    assert _group_members(owner.server_pid) == []
    assert _alive(owner.watchdog_pid)  # one per process: it stays for the next server
    owner.process.kill()
    assert _wait_until(lambda: not _alive(owner.watchdog_pid), 3.0)


def test_a_forgotten_group_is_never_signalled() -> None:
    """forget() takes a group off the list even while it lives: the watchdog must leave it alone."""
    code = textwrap.dedent(
        """\
        import subprocess
        from tuner.serving import reaper
        sleeper = subprocess.Popen(
            ["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        reaper.watch(sleeper.pid)
        reaper.forget(sleeper.pid)
        print(sleeper.pid, reaper.watchdog_pid(), flush=True)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    sleeper_pid: int | None = None
    try:
        sleeper_pid, watchdog_pid = (int(word) for word in _read_line(owner, 30.0).split())
        assert owner.wait(timeout=30) == 0
        assert _wait_until(lambda: not _alive(watchdog_pid), 3.0), "the watchdog outlived its owner"
        assert _alive(sleeper_pid)
    finally:
        _kill_group(owner.pid)
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        if sleeper_pid is not None:
            _kill_group(sleeper_pid)


def test_watch_rejects_group_ids_that_would_signal_everything() -> None:
    for pgid in (0, 1, -5):
        with pytest.raises(ValueError, match="process group"):
            reaper.watch(pgid)


# -- the real vLLM (CPU build) -------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("wait", ["starting", "healthy"])
def test_sigkill_of_the_owner_stops_a_real_vllm(
    wait: str, start_owner: Callable[..., Owner], vllm_spec: SpecFactory, tiny_model_dir: Path
) -> None:
    spec = vllm_spec(tiny_model_dir)
    owner = start_owner(
        spec.model,
        command=spec.command,
        args=spec.args,
        env=dict(spec.env),
        startup_timeout_s=spec.startup_timeout_s,
        wait="healthy" if wait == "healthy" else "registered",
        term_grace_s=reaper.TERM_GRACE_S,  # the real grace period against the real server
        report_timeout_s=spec.startup_timeout_s,
    )
    if wait == "starting":
        # Killed mid start-up, once the API server has started its engine process: several processes to stop.
        assert _wait_until(lambda: len(_group_members(owner.server_pid)) >= 3, 120.0)
        assert "Application startup complete" not in owner.log_path.read_text(errors="replace")
    members = _group_members(owner.server_pid)
    assert len(members) >= 3  # API server, engine core, resource tracker
    _sigkill_and_expect_group_gone(owner, members, timeout_s=reaper.TERM_GRACE_S + 15.0)
