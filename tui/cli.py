"""The `infertop` command. Textual and the engine's heavy parts are imported only by the subcommand that needs
them, so `infertop --help` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tuner.settings import Settings, SettingsError, load_settings

SUBCOMMANDS = ("monitor", "record", "exporter", "bench", "tune", "predict")
MAX_HOSTS_FILE_BYTES = 2**20
"""A list of hosts is a few lines; a larger file is something else (and is not read whole)."""

EPILOG = """\
subcommands:
  infertop [monitor] [options]   live GPU monitor (the default)
  infertop record FILE           record telemetry to NDJSON without a UI (Ctrl-C stops)
  infertop exporter              serve the readings to Prometheus at 127.0.0.1:20400/metrics
  infertop bench ...             load-test a vLLM server: TTFT, TPOT, tokens/s, what bound it
  infertop tune MODEL ...        find the vLLM config with the most tokens/s within latency targets

Settings come from ~/.config/infertop/config.toml (or $INFERTOP_CONFIG), then INFERTOP_* environment
variables (e.g. INFERTOP_INTERVAL_S=0.5), then these flags.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, metavar="S", help="seconds between readings (default 0.25)")
    parser.add_argument(
        "--vllm",
        action="append",
        metavar="URL",
        help="a vLLM server to watch, e.g. http://127.0.0.1:8000 (repeatable)",
    )
    parser.add_argument(
        "--no-discover", action="store_true", help="do not look for vLLM servers running on this machine"
    )
    parser.add_argument(
        "--dcgm",
        metavar="SPEC",
        help="where DCGM's profiling counters are read, for DRAM bandwidth on GPUs without GPM (L4, A100): auto "
        "(default: a local nv-hostengine or dcgm-exporter), off, a dcgm-exporter URL "
        "(http://127.0.0.1:9400/metrics), or hostengine[:HOST:PORT]",
    )
    parser.add_argument(
        "--dcgm-watch",
        action="store_true",
        help="ask DCGM to watch the profiling fields it does not yet (changes its sampling for every reader)",
    )


def monitor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop",
        description="Live NVIDIA GPU and vLLM monitor for LLM inference boxes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"infertop {_version()}")
    _common(parser)
    parser.add_argument(
        "--replay", type=Path, metavar="FILE", help="play a recording instead of live telemetry"
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, metavar="X", help="replay speed (default 1 = real time)"
    )
    parser.add_argument("--loop", action="store_true", help="replay in a loop")
    parser.add_argument(
        "--record", type=Path, metavar="FILE", help="record to FILE (NDJSON) while monitoring"
    )
    parser.add_argument("--force", action="store_true", help="let --record replace an existing FILE")
    parser.add_argument(
        "--host",
        action="append",
        metavar="URL",
        help="another host's `infertop exporter` to show beside this one, e.g. gpu-node-2:20400 (repeatable)",
    )
    parser.add_argument("--hosts", type=Path, metavar="FILE", help="a file of such hosts, one per line")
    parser.add_argument(
        "--host-interval", type=float, metavar="S", help="seconds between readings of each host (default 2)"
    )
    locked = parser.add_argument_group(
        "hosts whose exporter is locked (exporter --web-config)",
        "One set for every host. The password is read from a file or INFERTOP_HOST_PASSWORD, never taken on the "
        "command line, where ps shows it to every user.",
    )
    locked.add_argument("--host-ca", type=Path, metavar="FILE", help="trust this CA (PEM) for https:// hosts")
    locked.add_argument("--host-cert", type=Path, metavar="FILE", help="a client certificate (PEM), for mTLS")
    locked.add_argument("--host-key", type=Path, metavar="FILE", help="its private key (PEM, unencrypted)")
    locked.add_argument("--host-user", metavar="USER", help="basic-auth user name")
    locked.add_argument(
        "--host-password-file", type=Path, metavar="FILE", help="basic-auth password: the file's first line"
    )
    return parser


def record_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop record", description="Record GPU, host and vLLM telemetry to NDJSON, without a UI."
    )
    parser.add_argument(
        "file", type=Path, help="output file (.ndjson, or .ndjson.gz to compress), private to you (0600)"
    )
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    parser.add_argument("--label", help="a note stored in the recording and shown on replay")
    _common(parser)
    return parser


def _version() -> str:
    from tuner import __version__

    return __version__


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        {
            "interval_s": args.interval,
            "redraw_interval_s": getattr(args, "redraw", None),
            "vllm_urls": tuple(args.vllm) if args.vllm else None,
            "discover_vllm": False if args.no_discover else None,
            "dcgm": args.dcgm,
            "dcgm_watch": True if args.dcgm_watch else None,
        }
    )


def _sampler_config(settings: Settings):  # type: ignore[no-untyped-def]
    from tuner.telemetry.sampler import SamplerConfig

    return SamplerConfig(
        interval_s=settings.interval_s,
        slow_every=settings.slow_every,
        history_len=settings.history_len,
        discover_vllm=settings.discover_vllm,
        dcgm=settings.dcgm,
        dcgm_watch=settings.dcgm_watch,
    )


def run_monitor(argv: Sequence[str]) -> int:
    args = monitor_parser().parse_args(argv)
    settings = _settings(args)
    if not _positive(args.speed):
        return _fail("--speed must be a number greater than 0")
    if args.host_interval is not None and not _positive(args.host_interval):
        return _fail("--host-interval must be a number greater than 0")
    from tuner.outputs import OutputError, check_new
    from tuner.telemetry.recording import RecordingError
    from tuner.telemetry.remote import host_url

    try:
        if args.replay is not None:
            _check_replay(args.replay)
        if args.record is not None:
            check_new(args.record, force=args.force)
        remote_urls = [host_url(h) for h in args.host or ()]
        if args.hosts is not None:
            remote_urls += _hosts_file(args.hosts)
        remote_auth = _remote_auth(args, remote_urls)
    except (RecordingError, OutputError, ValueError) as exc:
        return _fail(str(exc))
    from tui.app import make_app

    app = make_app(
        remote_urls=remote_urls,
        remote_interval_s=args.host_interval,
        remote_auth=remote_auth,
        config=_sampler_config(settings),
        vllm_urls=settings.vllm_urls,
        replay=args.replay,
        replay_speed=args.speed,
        replay_loop=args.loop,
        record_path=args.record,
        record_dir=Path(settings.record_dir),
        redraw_interval_s=settings.redraw_interval_s,
    )
    app.run()
    if app.recording_error:
        return _fail(app.recording_error)
    return 0


def _remote_auth(args: argparse.Namespace, urls: Sequence[str]):  # type: ignore[no-untyped-def]
    """The TLS files and credentials for locked hosts, checked now (ValueError in one line): a CA that is not
    PEM or a key not of its certificate is said before the screen opens, not as every host failing."""
    from tuner.telemetry.remote import RemoteAuth

    password = os.environ.get("INFERTOP_HOST_PASSWORD")
    if args.host_password_file is not None:
        try:
            password = args.host_password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            why = "empty" if isinstance(exc, IndexError) else getattr(exc, "strerror", None) or "not text"
            raise ValueError(f"--host-password-file {args.host_password_file}: {why}") from None
    given = (args.host_ca, args.host_cert, args.host_key, args.host_user)
    if all(v is None for v in given) and password is None:
        return None
    if not urls:
        raise ValueError(
            "--host-ca, --host-cert, --host-key and --host-user apply to --host or --hosts: give one"
        )
    if password is not None and args.host_user is None:
        raise ValueError("a host password without --host-user")
    if args.host_key is not None and args.host_cert is None:
        raise ValueError("--host-key without --host-cert")
    auth = RemoteAuth(args.host_ca, args.host_cert, args.host_key, args.host_user, password)
    auth.ssl_context()  # ValueError naming the file
    if args.host_user is not None and any(u.startswith("http://") for u in urls):
        print("infertop: warning: --host-user over http:// sends the password in clear", file=sys.stderr)
    return auth


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _check_replay(path: Path) -> None:
    """RecordingError, in one line, unless ``path`` is a recording with a snapshot that can be shown: found
    here, before Textual starts, so that a bad file is an error message and never a traceback on screen."""
    from tuner.telemetry.recording import ReplaySource

    source = ReplaySource(path)
    try:
        source.open()
    finally:
        source.close()


def _hosts_file(path: Path) -> list[str]:
    """The hosts ``path`` lists; ValueError naming it when it is not a readable text file of hosts. A FIFO or a
    device (``/dev/zero``) is refused before it is read: reading it could block or never end."""
    from tuner.telemetry.remote import read_hosts_file

    try:
        mode = path.stat()
    except OSError as exc:
        raise ValueError(f"--hosts {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode.st_mode):
        raise ValueError(f"--hosts {path}: a directory, not a file of hosts")
    if not stat.S_ISREG(mode.st_mode):
        raise ValueError(f"--hosts {path}: not a regular file")
    if mode.st_size > MAX_HOSTS_FILE_BYTES:
        raise ValueError(f"--hosts {path}: {mode.st_size} bytes is no list of hosts (one per line)")
    try:
        return read_hosts_file(path)
    except UnicodeDecodeError:
        raise ValueError(f"--hosts {path}: not a text file (one host per line)") from None


def run_record(argv: Sequence[str]) -> int:
    args = record_parser().parse_args(argv)
    settings = _settings(args)
    if args.duration is not None and not _positive(args.duration):
        return _fail("--duration must be a number of seconds greater than 0")
    from tuner.outputs import OutputError, check_new
    from tuner.telemetry.nvml import NvmlBackend
    from tuner.telemetry.recording import Recorder
    from tuner.telemetry.sampler import LiveSource, Sampler

    try:
        check_new(args.file, force=args.force)  # before the GPUs are even opened: a refusal costs nothing
    except OutputError as exc:
        return _fail(str(exc))
    config = _sampler_config(settings)
    sampler = Sampler(LiveSource(NvmlBackend(), config=config, vllm_urls=settings.vllm_urls), history_len=16)
    info = sampler.open()
    try:
        recorder = Recorder(args.file, info, label=args.label, force=args.force)
    except OutputError as exc:
        sampler.stop()
        return _fail(str(exc))
    what = ", ".join(g.name for g in info.gpus) or f"no GPUs ({info.message})"
    print(
        f"infertop: recording {what} to {args.file} every {config.interval_s:g} s; Ctrl-C stops",
        file=sys.stderr,
    )
    sampler.add_listener(recorder)
    with _stop_requested() as stop:
        sampler.start()
        started = time.monotonic()
        try:
            while not stop.is_set():
                if args.duration is not None and time.monotonic() - started >= args.duration:
                    break
                time.sleep(0.05)
        finally:
            sampler.stop()
    try:
        recorder.close()
    except OutputError as exc:
        return _fail(str(exc))
    print(f"infertop: wrote {recorder.snapshots_written} snapshots to {args.file}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """An event SIGINT (Ctrl-C) and SIGTERM (a service manager) set instead of ending infertop, so that the
    recording is finished and put in place whichever stops it; the previous handlers come back after."""
    stop = threading.Event()

    def _interrupt(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(message: str) -> int:
    print(f"infertop: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "monitor"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    try:
        if command == "record":
            return run_record(argv)
        if command == "exporter":
            from tui.exporter_cli import run_exporter_cli

            return run_exporter_cli(argv)
        if command == "tune":
            from tui.tune_cli import run_tune_cli

            return run_tune_cli(argv)
        if command == "bench":
            from tui.bench_cli import run_bench_cli

            return run_bench_cli(argv)
        if command == "predict":
            from tui.predict_cli import run_predict_cli

            return run_predict_cli(argv)
        return run_monitor(argv)
    except SettingsError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
