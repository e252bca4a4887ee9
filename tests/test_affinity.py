"""Tests of tuner.serving.affinity: how cores are split between the server and the client, the cpu-list text,
pinning this process and its threads, and a server started on chosen cores (the scripted fake server of
test_launcher stands in for vLLM)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_launcher import FAKE_SERVER, _group_members

from tuner.serving.affinity import CpuPlan, cpu_list, parse_cpu_list, pin_process, plan_cpus, spawn_affinity
from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer
from tuner.serving.launchlog import FailureKind

AVAILABLE = frozenset(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(
    len(AVAILABLE) < 2, reason="needs at least 2 cores to pin to one of them"
)

# -- plan_cpus -----------------------------------------------------------------------------------------------


def test_off_pins_nothing() -> None:
    plan = plan_cpus("off", cpu_build=True, available=range(4))
    assert (plan.server, plan.client) == (None, None)


@pytest.mark.parametrize("cpu_build", [True, False])
def test_auto_on_one_core_pins_nothing_and_says_why(cpu_build: bool) -> None:
    plan = plan_cpus("auto", cpu_build=cpu_build, available={3})
    assert (plan.server, plan.client) == (None, None)
    assert "1 core" in plan.note


@pytest.mark.parametrize(
    ("count", "cpu_build"), [(2, False), (8, False), (2, True), (64, True)], ids=["2", "8", "2-cpu", "64-cpu"]
)
def test_auto_gives_the_client_the_highest_core_on_small_hosts_and_the_cpu_build(
    count: int, cpu_build: bool
) -> None:
    plan = plan_cpus("auto", cpu_build=cpu_build, available=range(count))
    assert plan.client == frozenset({count - 1})
    assert plan.server == frozenset(range(count - 1))
    assert cpu_list(range(count - 1)) in plan.note and "\n" not in plan.note


def test_auto_on_a_large_gpu_host_pins_nothing() -> None:
    plan = plan_cpus("auto", cpu_build=False, available=range(16))
    assert (plan.server, plan.client) == (None, None)
    assert "16 cores: the client and the server have cores of their own" in plan.note


def test_auto_works_from_the_cores_this_process_may_use() -> None:
    plan = plan_cpus("auto", cpu_build=True)
    if len(AVAILABLE) < 2:
        assert plan.server is None
    else:
        assert plan.client == frozenset({max(AVAILABLE)})
        assert plan.server == AVAILABLE - {max(AVAILABLE)}


def test_auto_skips_cores_outside_the_affinity() -> None:
    plan = plan_cpus("auto", cpu_build=True, available={2, 3, 6})
    assert plan == CpuPlan(frozenset({2, 3}), frozenset({6}), plan.note)


@pytest.mark.parametrize(
    ("mode", "server", "client"),
    [("0-2:3", {0, 1, 2}, {3}), ("0,1:2,3", {0, 1}, {2, 3}), (" 0 , 2-3 : 1 ", {0, 2, 3}, {1})],
)
def test_explicit_split(mode: str, server: set[int], client: set[int]) -> None:
    plan = plan_cpus(mode, cpu_build=False, available=range(4))
    assert (plan.server, plan.client) == (frozenset(server), frozenset(client))


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("", "expected off, auto or SERVER:CLIENT"),
        ("0-2", "expected off, auto or SERVER:CLIENT"),
        ("0-2:", "client '': no cores given"),
        (":3", "server '': no cores given"),
        ("0-2:2", "share cores 2"),
        ("0:9", "cores 9 are not available"),
        ("a:1", "'a' is not a core number"),
        ("3-1:0", "'3-1' is not a range"),
        ("0:1:2", "'1:2' is not a core number"),
    ],
)
def test_bad_explicit_split_is_one_clear_line(mode: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        plan_cpus(mode, cpu_build=False, available=range(4))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# -- cpu lists -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ({0, 1, 2, 5}, "0-2,5"),
        ({3}, "3"),
        ({0, 2, 4}, "0,2,4"),
        ({1, 2}, "1-2"),
        (set(), ""),
        ({7, 8, 9, 0}, "0,7-9"),
    ],
)
def test_cpu_list_is_compact_and_parses_back(cpus: set[int], text: str) -> None:
    assert cpu_list(cpus) == text
    if cpus:
        assert parse_cpu_list(text) == frozenset(cpus)


# -- pinning this process ------------------------------------------------------------------------------------


class _IdleThread:
    """A thread that waits until told to end, so that its cores can be read and set from outside."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(5)
        assert self._thread.native_id is not None
        self.tid: int = self._thread.native_id

    def _run(self) -> None:
        self._started.set()
        self._stop.wait(30)

    def cores(self) -> set[int]:
        return os.sched_getaffinity(self.tid)

    def end(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def idle_thread() -> Iterator[_IdleThread]:
    thread = _IdleThread()
    yield thread
    thread.end()


@needs_two_cores
def test_pin_process_pins_every_thread_and_restores_each_one(idle_thread: _IdleThread) -> None:
    first, last = min(AVAILABLE), max(AVAILABLE)
    os.sched_setaffinity(idle_thread.tid, {last})  # a thread with cores of its own: it must get them back
    mine = os.sched_getaffinity(0)
    try:
        with pin_process({first}):
            assert os.sched_getaffinity(0) == {first}
            assert idle_thread.cores() == {first}
            started_inside = _IdleThread()  # inherits from its creator
            assert started_inside.cores() == {first}
            started_inside.end()
        assert os.sched_getaffinity(0) == mine
        assert idle_thread.cores() == {last}
    finally:
        os.sched_setaffinity(0, mine)


def test_pin_process_tolerates_a_thread_that_ends_inside(idle_thread: _IdleThread) -> None:
    mine = os.sched_getaffinity(0)
    with pin_process({min(AVAILABLE)}):
        idle_thread.end()
    assert os.sched_getaffinity(0) == mine


def test_pin_process_to_a_core_out_of_reach_changes_nothing(idle_thread: _IdleThread) -> None:
    mine, theirs = os.sched_getaffinity(0), idle_thread.cores()
    missing = max(AVAILABLE) + 1
    with pytest.raises(ValueError, match=f"cannot run on cores {missing}"), pin_process({missing}):
        pytest.fail("pinned to a core this process may not use")
    assert (os.sched_getaffinity(0), idle_thread.cores()) == (mine, theirs)


def test_pin_process_none_pins_nothing() -> None:
    mine = os.sched_getaffinity(0)
    with pin_process(None):
        assert os.sched_getaffinity(0) == mine


@needs_two_cores
def test_spawn_affinity_pins_only_the_calling_thread(idle_thread: _IdleThread) -> None:
    mine, theirs = os.sched_getaffinity(0), idle_thread.cores()
    with spawn_affinity({min(AVAILABLE)}):
        assert os.sched_getaffinity(0) == {min(AVAILABLE)}
        assert idle_thread.cores() == theirs
    assert os.sched_getaffinity(0) == mine


# -- a server on chosen cores --------------------------------------------------------------------------------


def test_server_spec_cores_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="cpus is empty"):
        ServerSpec(model="m", cpus=frozenset())
    with pytest.raises(ValueError, match="core numbers"):
        ServerSpec(model="m", cpus=frozenset({-1}))
    spec = ServerSpec(model="m", cpus={0, 1})  # type: ignore[arg-type]
    assert spec.cpus == frozenset({0, 1}) and hash(spec)


@pytest.fixture
def fake_script(tmp_path: Path) -> Path:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    return script


@needs_two_cores
def test_server_started_on_core_0_runs_there_with_its_children(fake_script: Path, tmp_path: Path) -> None:
    spec = ServerSpec(
        model="healthy",
        command=(sys.executable, str(fake_script)),
        startup_timeout_s=30,
        log_path=tmp_path / "server.log",
        cpus=frozenset({0}),
    )
    mine = os.sched_getaffinity(0)
    server = VllmServer(spec)
    try:
        server.start()
        assert server.pid is not None
        members = _group_members(server.pid)
        assert len(members) == 2  # the server and the worker it started
        assert {pid: psutil.Process(pid).cpu_affinity() for pid in members} == {pid: [0] for pid in members}
        assert os.sched_getaffinity(0) == mine  # the launching thread got its cores back
    finally:
        server.stop()


def test_server_on_a_core_out_of_reach_is_not_started(fake_script: Path, tmp_path: Path) -> None:
    missing = max(AVAILABLE) + 1
    spec = ServerSpec(
        model="healthy",
        command=(sys.executable, str(fake_script)),
        log_path=tmp_path / "server.log",
        cpus=frozenset({missing}),
    )
    server = VllmServer(spec)
    with pytest.raises(LaunchError) as caught:
        server.start()
    assert caught.value.kind is FailureKind.CANNOT_START
    assert f"cores {missing}" in caught.value.summary and "\n" not in caught.value.summary
    assert server.pid is None
