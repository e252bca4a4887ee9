"""What `infertop bench --launch` and `infertop tune` share: how vLLM is started, and how Ctrl-C stops them."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading

from tuner.serving.launcher import api_server_command


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """--vllm-cmd, --vllm-python, --startup-timeout."""
    parser.add_argument("--vllm-cmd", metavar="CMD", help='vLLM command (default "vllm serve")')
    parser.add_argument(
        "--vllm-python", metavar="PYTHON", help="launch PYTHON -m vllm.entrypoints.openai.api_server"
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0, metavar="S")


def vllm_command(args: argparse.Namespace) -> tuple[str, ...]:
    """The command that starts vLLM, from the arguments above (never a shell string)."""
    if args.vllm_python:
        return api_server_command(args.vllm_python)
    if args.vllm_cmd:
        return tuple(shlex.split(args.vllm_cmd))
    return ("vllm", "serve")


def stop_on_ctrl_c(cancel: threading.Event, message: str) -> None:
    """First Ctrl-C: set ``cancel`` (the run stops cleanly and stops its server); second: abort at once."""

    def interrupt(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        sys.stderr.write(f"\n{message}\n")

    signal.signal(signal.SIGINT, interrupt)
