"""The `infertop` command. Textual and the engine's heavy parts are imported only by the subcommand that needs
them, so `infertop --help` answers at once."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tuner.settings import Settings, SettingsError, load_settings

SUBCOMMANDS = ("monitor", "record", "exporter", "bench", "tune", "predict")

EPILOG = """\
subcommands:
  infertop [monitor] [options]   live GPU monitor (the default)
  infertop record FILE           record telemetry to NDJSON without a UI (Ctrl-C stops)
  infertop exporter              serve the readings to Prometheus at 127.0.0.1:9400/metrics
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
    parser.add_argument(
        "--host",
        action="append",
        metavar="URL",
        help="another host's `infertop exporter` to show beside this one, e.g. gpu-node-2:9400 (repeatable)",
    )
    parser.add_argument("--hosts", type=Path, metavar="FILE", help="a file of such hosts, one per line")
    parser.add_argument(
        "--host-interval", type=float, metavar="S", help="seconds between readings of each host (default 2)"
    )
    return parser


def record_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop record", description="Record GPU, host and vLLM telemetry to NDJSON, without a UI."
    )
    parser.add_argument("file", type=Path, help="output file (.ndjson, or .ndjson.gz to compress)")
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
        }
    )


def _sampler_config(settings: Settings):  # type: ignore[no-untyped-def]
    from tuner.telemetry.sampler import SamplerConfig

    return SamplerConfig(
        interval_s=settings.interval_s,
        slow_every=settings.slow_every,
        history_len=settings.history_len,
        discover_vllm=settings.discover_vllm,
    )


def run_monitor(argv: Sequence[str]) -> int:
    args = monitor_parser().parse_args(argv)
    settings = _settings(args)
    if args.replay is not None:
        from tuner.telemetry.recording import RecordingError, read_header

        if args.speed <= 0:
            return _fail("--speed must be greater than 0")
        try:
            read_header(args.replay)
        except RecordingError as exc:
            return _fail(str(exc))
    from tuner.telemetry.remote import host_url, read_hosts_file

    try:
        remote_urls = [host_url(h) for h in args.host or ()]
        if args.hosts is not None:
            remote_urls += read_hosts_file(args.hosts)
    except ValueError as exc:
        return _fail(str(exc))
    if args.host_interval is not None and args.host_interval <= 0:
        return _fail("--host-interval must be greater than 0")
    from tui.app import make_app

    app = make_app(
        remote_urls=remote_urls,
        remote_interval_s=args.host_interval,
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
    return 0


def run_record(argv: Sequence[str]) -> int:
    args = record_parser().parse_args(argv)
    settings = _settings(args)
    from tuner.telemetry.nvml import NvmlBackend
    from tuner.telemetry.recording import Recorder
    from tuner.telemetry.sampler import LiveSource, Sampler

    config = _sampler_config(settings)
    sampler = Sampler(LiveSource(NvmlBackend(), config=config, vllm_urls=settings.vllm_urls), history_len=16)
    info = sampler.open()
    try:
        recorder = Recorder(args.file, info, label=args.label)
    except OSError as exc:
        sampler.stop()
        return _fail(f"cannot write {args.file}: {exc.strerror or exc}")
    what = ", ".join(g.name for g in info.gpus) or f"no GPUs ({info.message})"
    print(
        f"infertop: recording {what} to {args.file} every {config.interval_s:g} s; Ctrl-C stops",
        file=sys.stderr,
    )
    sampler.add_listener(recorder)
    stop = {"now": False}

    def _interrupt(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    sampler.start()
    started = time.monotonic()
    try:
        while not stop["now"]:
            if args.duration is not None and time.monotonic() - started >= args.duration:
                break
            time.sleep(0.05)
    finally:
        sampler.stop()
        recorder.close()
    print(f"infertop: wrote {recorder.snapshots_written} snapshots to {args.file}", file=sys.stderr)
    return 0


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
