"""What `infertop bench --launch` and `infertop tune` share: how vLLM is started, how a stop signal stops them
cleanly, and how their output ends when the reader of stdout has gone (``| head``)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import threading

from tuner.serving.launcher import api_server_command

# Ctrl-C and kill's default (what systemd, a container runtime and a batch scheduler send) both ask for a clean
# stop: what was measured is written and the server's process group is stopped.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """--vllm-cmd, --vllm-python, --startup-timeout."""
    parser.add_argument("--vllm-cmd", metavar="CMD", help='vLLM command (default "vllm serve")')
    parser.add_argument(
        "--vllm-python", metavar="PYTHON", help="launch PYTHON -m vllm.entrypoints.openai.api_server"
    )
    parser.add_argument("--startup-timeout", type=positive_seconds, default=900.0, metavar="S")


def positive_seconds(text: str) -> float:
    """An argparse type for a duration or limit: finite and above zero (NaN would pass every ``<`` test)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def vllm_command(args: argparse.Namespace) -> tuple[str, ...]:
    """The command that starts vLLM, from the arguments above (never a shell string)."""
    if args.vllm_python:
        return api_server_command(args.vllm_python)
    if args.vllm_cmd:
        return tuple(shlex.split(args.vllm_cmd))
    return ("vllm", "serve")


def stop_on_signals(cancel: threading.Event, message: str) -> None:
    """First Ctrl-C or SIGTERM: set ``cancel`` (the run stops cleanly, writes what it has and stops its server);
    a second: abort at once (KeyboardInterrupt, which still stops the server on its way out).

    Installed before any server starts, so the launcher's own SIGTERM handler (stop the servers and die, writing
    nothing) is never put in its place."""

    def interrupt(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        name = STOP_SIGNALS.get(signal.Signals(signum), signal.Signals(signum).name)
        sys.stderr.write(f"\n{message} ({name} again to abort at once)\n")

    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)


def print_to_stdout(text: str) -> None:
    """Print ``text`` and flush; a reader that has gone (``--json | head``) ends the program quietly (exit 1).

    The standard way (Python's signal docs): stdout is pointed at /dev/null, so the interpreter's own flush at
    exit cannot fail again and print a second traceback."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None
