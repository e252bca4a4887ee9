"""vLLM server lifecycle: build the command line, start it in its own process group, wait until it is healthy,
classify why it failed, and stop it with every child gone.

A server is described by a frozen :class:`ServerSpec` and run by :class:`VllmServer`::

    spec = ServerSpec(model="/models/llama", args=("--max-num-seqs", "64"))
    with VllmServer(spec) as server:       # start(): returns once GET /health answers 200
        run_load(server.url)
    # stop(): SIGTERM, then SIGKILL, to the whole group; no child left behind

A server that cannot start raises :class:`LaunchError`, whose ``kind`` says why (read from the server's log
by :mod:`tuner.serving.launchlog`) and whose ``summary`` is one line for people. Nothing here imports vLLM: the server
may live in another environment (``command=("/opt/vllm-env/bin/python", "-m", "vllm.entrypoints.openai.api_server")``).

No server outlives this process: a normal exit, an exception or Ctrl-C stops it through :meth:`VllmServer.stop`
or the context manager, SIGTERM and SIGHUP through handlers installed on the first start, and a death that runs
no code at all (SIGKILL, the OOM killer) through the watchdog of :mod:`tuner.serving.reaper`, with which each
server's process group is registered from the moment it is spawned until it is gone.

``ServerSpec.cpus`` starts a server on chosen cores (:mod:`tuner.serving.affinity` plans them), so that on a
small host the load generator and the server do not compete for the same ones.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import BinaryIO

import psutil

from tuner.redact import redact_text
from tuner.serving import reaper
from tuner.serving.affinity import spawn_affinity
from tuner.serving.launchlog import FailureKind, classify_log, is_fatal, strip_log_prefix

DEFAULT_COMMAND: tuple[str, ...] = ("vllm", "serve")
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# vLLM on a GPU takes 2-3 minutes to start (torch.compile, CUDA graphs); a large model loading real weights
# from a slow disk can take much longer.
DEFAULT_STARTUP_TIMEOUT_S = 900.0
# After a failure signature shows in the log, how long the process may take to exit on its own (so that the
# log is complete and its exit code known) before it is stopped: an engine that failed can leave the API
# process alive but never healthy.
FAILURE_GRACE_S = 10.0
_POLL_INTERVAL_S = 0.5
_HEALTH_TIMEOUT_S = 2.0
_LOG_TAIL_LINES = 40
# A group that ignores SIGTERM this long gets SIGKILL; vLLM stops its engine and workers in a few seconds.
DEFAULT_STOP_TIMEOUT_S = 30.0
# How long the caller's VRAM probe may take to see the memory of the stopped processes come back.
DEFAULT_VRAM_RELEASE_TIMEOUT_S = 30.0

VramUsedByPids = Callable[[Collection[int]], int]
"""Bytes of GPU memory still held by any of the given pids (for example from NVML's process list)."""


# How a LaunchError's summary names each kind.
_KIND_TEXT = {
    FailureKind.CUDA_OOM: "CUDA out of memory",
    FailureKind.GPU_MEMORY_BUSY: "not enough free GPU memory at start-up (other processes hold it)",
    FailureKind.KV_CACHE_TOO_SMALL: "not enough memory for the KV cache",
    FailureKind.UNSUPPORTED_OPTION: "unsupported option",
    FailureKind.PORT_IN_USE: "port already in use",
    FailureKind.MODEL_NOT_FOUND: "model not found",
    FailureKind.VLLM_NOT_INSTALLED: "vLLM is not installed",
    FailureKind.CANNOT_START: "cannot start the process",
    FailureKind.ENGINE_INIT_FAILED: "engine initialisation failed",
    FailureKind.TIMEOUT: "not healthy before the start-up timeout",
    FailureKind.EXITED: "server exited",
}


@dataclass(frozen=True)
class ServerSpec:
    """How to run one vLLM server: the model, its flags and the command that runs vLLM.

    ``command`` is either ``("vllm", "serve")``-style (ends in ``serve``: the model is positional) or a Python
    module runner such as ``(python, "-m", "vllm.entrypoints.openai.api_server")`` (the model goes in
    ``--model``). ``args`` are vLLM flags as a list, never a shell string; they must not set the host or port,
    which come from ``host`` and ``port`` (None: a free port is picked). ``env`` is added to this process's
    environment. ``log_path`` None puts the server's log in a new temporary directory.

    ``cpus`` None runs the server wherever this process may run; a set of cores starts it (and every process
    it starts) on those only. The CPU build of vLLM binds its OpenMP threads by ``VLLM_CPU_OMP_THREADS_BIND``
    ("auto": every core of a NUMA node, whatever the server's affinity), so give it the same cores in ``env``:
    ``env={"VLLM_CPU_OMP_THREADS_BIND": affinity.cpu_list(cpus)}``. That is the caller's choice, not made here.
    """

    model: str
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = DEFAULT_COMMAND
    host: str = "127.0.0.1"
    port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    log_path: Path | None = None
    cpus: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("the vLLM command is empty")
        if isinstance(self.args, str):
            raise TypeError("ServerSpec.args must be a sequence of arguments, not a shell string")
        for arg in self.args:
            name = arg.split("=", 1)[0]
            if name in ("--host", "--port"):
                raise ValueError(f"set the {name[2:]} with ServerSpec.{name[2:]}, not in args ({arg})")
            if name == "--model":
                raise ValueError("the model is given as ServerSpec.model, not as --model in args")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")
        if self.cpus is not None:
            # A set given where a frozenset is due would make the spec unhashable: keep a frozen copy.
            object.__setattr__(self, "cpus", frozenset(self.cpus))
            if not self.cpus:
                raise ValueError("ServerSpec.cpus is empty: give at least one core, or None to run anywhere")
            if any(isinstance(core, bool) or not isinstance(core, int) or core < 0 for core in self.cpus):
                raise ValueError(
                    f"ServerSpec.cpus must hold core numbers (0, 1, ...), got {sorted(self.cpus)}"
                )

    @property
    def model_is_positional(self) -> bool:
        """True for ``vllm serve MODEL``; False for the API-server module, which takes ``--model MODEL``."""
        return self.command[-1] == "serve"

    def argv(self, port: int) -> list[str]:
        """The full command line for a server on ``port``."""
        model = [self.model] if self.model_is_positional else ["--model", self.model]
        return [*self.command, *model, *self.args, "--host", self.host, "--port", str(port)]


def api_server_command(python: str | os.PathLike[str]) -> tuple[str, ...]:
    """The command that runs vLLM's OpenAI API server with ``python`` (for an environment of its own)."""
    return (os.fspath(python), "-m", API_SERVER_MODULE)


def python_of(command: Sequence[str]) -> str | None:
    """The python that runs a vLLM command: ``PYTHON -m MODULE``'s own, or the interpreter named by the
    ``#!`` line of an executable such as ``vllm`` (found on PATH), including pip's ``#!/bin/sh`` launcher for
    long or spaced paths (whose second line execs the python). None when neither tells."""
    if len(command) >= 2 and command[1] == "-m":
        return command[0]
    path = shutil.which(command[0]) if command else None
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            first, second = f.readline(512), f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if words and Path(words[0]).name == "env" and len(words) > 1:  # #!/usr/bin/env python3
        words = [shutil.which(words[1]) or ""]
    if words and Path(words[0]).name.startswith("python") and Path(words[0]).is_file():
        return words[0]
    launcher = second.decode("utf-8", "replace")
    if launcher.startswith(_SH_LAUNCHER):  # then "/long path/python" "$0" "$@"
        quoted = launcher[len(_SH_LAUNCHER) :].split('"')
        if len(quoted) > 1 and Path(quoted[1]).name.startswith("python") and Path(quoted[1]).is_file():
            return quoted[1]
    return None


_SH_LAUNCHER = "'''exec' "  # pip/distlib's second line under #!/bin/sh


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class StartCancelled(KeyboardInterrupt):
    """The run was asked to stop while vLLM started: handled like Ctrl-C (the server group is stopped)."""


class LaunchError(Exception):
    """A vLLM server did not become healthy. ``str(error)`` is the one-line ``summary`` for people."""

    def __init__(
        self,
        kind: FailureKind,
        summary: str,
        *,
        log_tail: str = "",
        log_path: Path | None = None,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(summary)
        self.kind = kind
        self.summary = summary
        self.log_tail = log_tail
        self.log_path = log_path
        self.exit_code = exit_code


@dataclass(frozen=True)
class StopResult:
    """What stopping a server took and whether everything it started is gone."""

    stop_s: float  # from the first signal until no process of the group was left
    killed: bool  # SIGTERM was not enough: SIGKILL was sent
    leftover_pids: tuple[int, ...]  # processes still alive after SIGKILL (should always be empty)
    vram_held_bytes: int | None  # GPU memory the stopped processes still held at the end; None: not checked


class VllmServer:
    """One vLLM server process group: start, health, log, stop; a context manager (start, then stop on exit).

    ``vram_used_by_pids``, where given, lets :meth:`stop` confirm that the GPU memory of the stopped processes
    came back (plug NVML in there; without a GPU leave it None). ``on_log_line`` is called from the thread
    that waits in :meth:`start` with each new log line, for progress displays. ``on_spawned(pid, port)`` is
    called as soon as the process exists, before the wait for health: the tuner records the server there, so
    that a later ``--resume`` can stop it if this process is killed while it starts. ``cancelled``, polled
    while waiting for health, ends a start that is no longer wanted (a SIGTERM'd tune during a 10-minute load)
    with :class:`StartCancelled`, the server group stopped.
    """

    def __init__(
        self,
        spec: ServerSpec,
        *,
        vram_used_by_pids: VramUsedByPids | None = None,
        on_log_line: Callable[[str], None] | None = None,
        on_spawned: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        vram_release_timeout_s: float = DEFAULT_VRAM_RELEASE_TIMEOUT_S,
        failure_grace_s: float = FAILURE_GRACE_S,
    ) -> None:
        self.spec = spec
        self._argv: list[str] = []  # the command line it was started with, once started
        self._vram_used_by_pids = vram_used_by_pids
        self._on_log_line = on_log_line
        self._on_spawned = on_spawned
        self._cancelled = cancelled or (lambda: False)
        self._stop_timeout_s = stop_timeout_s
        self._vram_release_timeout_s = vram_release_timeout_s
        self._failure_grace_s = failure_grace_s
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_path: Path | None = None
        self._startup_s: float | None = None
        self._seen_pids: set[int] = set()
        self._stop_result: StopResult | None = None

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (known once :meth:`start` was called)."""
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (append ``/v1/completions``, ``/metrics``, ...)."""
        host = f"[{self.spec.host}]" if ":" in self.spec.host else self.spec.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the server's main process (also its process-group id); None before start."""
        return self._process.pid if self._process is not None else None

    @property
    def argv(self) -> tuple[str, ...]:
        """The command line the server was started with (empty before :meth:`start`); in memory only: it may
        hold secrets."""
        return tuple(self._argv)

    @property
    def startup_s(self) -> float | None:
        """Seconds from spawning the process until /health answered 200; None until then."""
        return self._startup_s

    @property
    def log_path(self) -> Path | None:
        """The file that holds the server's stdout and stderr; None before start."""
        return self._log_path

    def is_running(self) -> bool:
        """True while the server's main process lives."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, n_lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``n_lines`` lines of the server's log ("" before start)."""
        if self._log_path is None:
            return ""
        return _tail(self._log_path, n_lines)

    # -- start ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it is healthy.

        Raises:
            LaunchError: it exited, its log shows a fatal error (the process group is then stopped, even where
                the API process would have lived on), or it was not healthy within the start-up timeout.
            RuntimeError: this server was already started.
        """
        if self._process is not None:
            raise RuntimeError("this VllmServer was already started; make a new one")
        if _looks_like_path(self.spec.model) and not Path(self.spec.model).expanduser().exists():
            # vLLM would take a missing directory for a model-hub id and fail with a confusing message.
            raise LaunchError(
                FailureKind.MODEL_NOT_FOUND,
                f"vLLM not started (model not found): no such directory: {self.spec.model}",
            )
        self._port = self.spec.port if self.spec.port is not None else free_port(self.spec.host)
        argv = self._argv = self.spec.argv(self._port)
        env = {**os.environ, **self.spec.env}
        try:
            self._log_path = (
                self.spec.log_path or Path(tempfile.mkdtemp(prefix="infertop-vllm-")) / "server.log"
            )
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = _open_private_log(self._log_path)
        except OSError as error:
            raise LaunchError(
                FailureKind.CANNOT_START, f"vLLM not started: cannot write its log file: {error}"
            ) from None
        started_at = time.monotonic()
        with log_file, contextlib.ExitStack() as on_its_cores, _ctrl_c_held() as ctrl_c:
            try:
                # On its cores from the start, so that everything it forks inherits them.
                on_its_cores.enter_context(spawn_affinity(self.spec.cpus))
            except ValueError as error:
                raise LaunchError(
                    FailureKind.CANNOT_START, f"vLLM not started: {error}", log_path=self._log_path
                ) from None
            try:
                # Its own session, so its process group holds vLLM and every worker it forks, and signals
                # meant for us (Ctrl-C in a terminal) do not reach it behind our back.
                self._process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as error:
                raise self._spawn_error(argv, error) from None
            # At once, before the long wait for health: from here a SIGKILL of this process must take it down
            # too. A Ctrl-C is held until it is registered: one between the spawn and the registration would
            # leave a server nobody stops.
            reaper.watch(self._process.pid)
            _live_servers.add(self)
            _install_cleanup()
        try:
            if ctrl_c:
                raise KeyboardInterrupt
            if self._on_spawned is not None:
                self._on_spawned(self._process.pid, self._port)
            self._wait_until_healthy(started_at)
        except BaseException:
            # Covers LaunchError and a Ctrl-C while waiting: never leave a half-started server behind.
            self._stop_group()
            raise
        self._startup_s = time.monotonic() - started_at

    def _spawn_error(self, argv: list[str], error: OSError) -> LaunchError:
        if error.errno in (errno.ENOENT, errno.EACCES):
            kind, what = FailureKind.VLLM_NOT_INSTALLED, f"cannot run {argv[0]!r}: {error.strerror}"
        else:
            kind, what = FailureKind.CANNOT_START, f"cannot start {argv[0]!r}: {error}"
        return LaunchError(kind, f"vLLM did not start: {what}", log_path=self._log_path)

    def _wait_until_healthy(self, started_at: float) -> None:
        assert self._process is not None and self._log_path is not None
        reader = _LogReader(self._log_path)
        deadline = started_at + self.spec.startup_timeout_s
        failure_seen_at: float | None = None
        while True:
            exit_code = self._process.poll()  # before reading, so the lines read include its last words
            new_lines = reader.read_new_lines()
            self._remember_children()
            if self._on_log_line is not None:
                for line in new_lines:
                    self._on_log_line(redact_text(line))
            if failure_seen_at is None and any(is_fatal(line) for line in new_lines):
                failure_seen_at = time.monotonic()
            if exit_code is not None:
                raise self._failure(exit_code, FailureKind.EXITED)
            if self._healthy():
                return
            if self._cancelled():
                raise StartCancelled(
                    f"vLLM's start-up was cancelled after {time.monotonic() - started_at:.0f} s"
                )
            now = time.monotonic()
            if failure_seen_at is not None and now - failure_seen_at > self._failure_grace_s:
                raise self._failure(None, FailureKind.ENGINE_INIT_FAILED)
            if now > deadline:
                raise self._failure(None, FailureKind.TIMEOUT)
            time.sleep(_POLL_INTERVAL_S)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=_HEALTH_TIMEOUT_S) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _failure(self, exit_code: int | None, fallback: FailureKind) -> LaunchError:
        assert self._log_path is not None
        log_text = redact_text_lines(self._log_path.read_text(encoding="utf-8", errors="replace"))
        tail = _last_lines(log_text, _LOG_TAIL_LINES)
        found = classify_log(log_text)
        if fallback is FailureKind.TIMEOUT:
            kind = FailureKind.TIMEOUT
            detail = f"no answer from /health after {self.spec.startup_timeout_s:.0f} s"
            if found is not None:
                detail += f"; the log says: {found[1]}"
        elif found is not None:
            kind, detail = found
        else:
            kind = fallback
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            detail = f"exit code {exit_code}" if exit_code is not None else "no cause found in its log"
            if last:
                detail += f"; last log line: {strip_log_prefix(last)}"
        state = f"exited with code {exit_code}" if exit_code is not None else "stopped"
        summary = (
            f"vLLM failed to start ({_KIND_TEXT[kind]}): {_shorten(detail)} [{state}; log: {self._log_path}]"
        )
        return LaunchError(kind, summary, log_tail=tail, log_path=self._log_path, exit_code=exit_code)

    def _remember_children(self) -> None:
        """Note every descendant seen, so that stop() can check each one is gone even if it left the group."""
        if self._process is None:
            return
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self._process.pid)
            self._seen_pids.update(child.pid for child in parent.children(recursive=True))

    # -- stop ----------------------------------------------------------------------------------------------

    def stop(self) -> StopResult:
        """Stop the server: SIGTERM to its process group, SIGKILL after ``stop_timeout_s``.

        Returns once every process of the group is gone (and, with ``vram_used_by_pids``, once their GPU
        memory is released or the release timeout passed). Safe to call more than once and after a failure.
        """
        if self._process is None:
            return StopResult(stop_s=0.0, killed=False, leftover_pids=(), vram_held_bytes=None)
        if self._stop_result is not None:
            return self._stop_result
        result = self._stop_group()
        if self._vram_used_by_pids is not None:
            pids = {self._process.pid, *self._seen_pids}
            deadline = time.monotonic() + self._vram_release_timeout_s
            held_bytes = self._vram_used_by_pids(pids)
            while held_bytes > 0 and time.monotonic() < deadline:
                time.sleep(_POLL_INTERVAL_S)
                held_bytes = self._vram_used_by_pids(pids)
            result = StopResult(result.stop_s, result.killed, result.leftover_pids, held_bytes)
        self._stop_result = result
        return result

    def _stop_group(self) -> StopResult:
        process = self._process
        assert process is not None
        _live_servers.discard(self)
        self._remember_children()
        started_at = time.monotonic()
        pgid = process.pid  # start_new_session made it the group leader
        survivors = self._group_processes()
        killed = False
        if survivors or process.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            survivors = _wait_gone(process, survivors, self._stop_timeout_s)
        if survivors or process.poll() is None:
            killed = True
            _signal_group(pgid, signal.SIGKILL)
            for survivor in survivors:  # a child that left the group is not reached by killpg
                with contextlib.suppress(psutil.Error):
                    survivor.kill()
            survivors = _wait_gone(process, survivors, 5.0)
        leftover = tuple(sorted(p.pid for p in survivors))
        if process.poll() is None and process.pid not in leftover:
            leftover = (process.pid, *leftover)
        if not leftover:
            reaper.forget(pgid)  # gone: the watchdog must never signal this group id, which may be reused
        return StopResult(time.monotonic() - started_at, killed, leftover, None)

    def _group_processes(self) -> list[psutil.Process]:
        """Live processes started by this server: recorded descendants plus anything still in its group."""
        assert self._process is not None
        pgid = self._process.pid
        found: dict[int, psutil.Process] = {}
        for pid in {pgid, *self._seen_pids}:
            with contextlib.suppress(psutil.Error):
                found[pid] = psutil.Process(pid)
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.getpgid(proc.pid) == pgid:
                    found[proc.pid] = proc
        # Our own pid can never be in the server's group, but a recycled pid could: keep only the group's.
        return [p for pid, p in found.items() if pid != os.getpid() and _alive(p)]

    # -- context manager -----------------------------------------------------------------------------------

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _looks_like_path(model: str) -> bool:
    """True for a local path ("/models/x", "./x", "~/x"); False for a model-hub id ("org/name")."""
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..")


def _wait_gone(
    process: subprocess.Popen[bytes], procs: list[psutil.Process], timeout_s: float
) -> list[psutil.Process]:
    """Wait until ``process`` is reaped and none of ``procs`` lives; return those still alive at the timeout.

    A zombie counts as gone: it holds no memory and no port, and reaping orphans is init's job, which can be
    slow (psutil.wait_procs would wait for it).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        process.poll()  # reap our own child, so it does not stay a zombie
        alive = [p for p in procs if _alive(p)]
        if (not alive and process.returncode is not None) or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _LogReader:
    """Reads the complete lines appended to a log file since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def read_new_lines(self) -> list[str]:
        try:
            with open(self._path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except OSError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in complete]


def _tail(path: Path, n_lines: int) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 256 * 1024))  # enough for 40 lines even of long tracebacks
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return redact_text_lines(_last_lines(text, n_lines))


def redact_text_lines(text: str) -> str:
    """vLLM logs its non-default arguments, an ``--api-key`` among them: what infertop shows is masked."""
    return "\n".join(redact_text(line) for line in text.split("\n"))


def _open_private_log(path: Path) -> BinaryIO:
    """The server's log, readable by its owner only (it may hold what vLLM prints of its arguments); a
    symlink planted at its name is refused rather than followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _last_lines(text: str, n_lines: int) -> str:
    return "\n".join(text.splitlines()[-n_lines:])


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- cleanup when the Python process ends -------------------------------------------------------------------

_live_servers: set[VllmServer] = set()
_cleanup_lock = threading.Lock()
_cleanup_installed = False


def _stop_all_servers() -> None:
    """Stop every server still running: at interpreter exit and on SIGTERM/SIGHUP."""
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server._stop_group()


def _on_termination_signal(signum: int, frame: FrameType | None) -> None:
    _stop_all_servers()
    # Then die of the same signal, as the default handler would have made us.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[list[int]]:
    """Hold Ctrl-C (SIGINT) over steps that must not be cut in two; the list says whether one came, for the
    caller to raise KeyboardInterrupt once they are done. Only where Python's own handler is in place, from the
    main thread (elsewhere no handler can be set, and an application's own handler is left alone)."""
    held: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield held
        return
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _install_cleanup() -> None:
    """Make sure no server outlives this process: atexit, and SIGTERM/SIGHUP where nobody else handles them.

    Ctrl-C (SIGINT) raises KeyboardInterrupt, which unwinds through start() and the context manager, both of
    which stop the server. Handlers are installed only from the main thread and only over the default action,
    so an application's own handlers are left alone.
    """
    global _cleanup_installed
    with _cleanup_lock:
        if _cleanup_installed:
            return
        _cleanup_installed = True
        atexit.register(_stop_all_servers)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _on_termination_signal)
