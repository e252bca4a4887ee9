"""`infertop exporter`: the monitor's readings as a Prometheus endpoint, without a UI."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

DEMO_MACHINES = ("h100x8", "h100x4", "h100x1", "l4x2")


def exporter_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop exporter",
        description=(
            "Serve this machine's GPU, host and inference-server readings at /metrics for Prometheus "
            "(OpenMetrics or text, as the scraper asks). A scrape never calls NVML: it formats the latest reading."
        ),
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:9400",
        metavar="ADDR:PORT",
        help="where to serve (default 127.0.0.1:9400, this machine only; 0.0.0.0:9400 for a fleet's Prometheus)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between readings (default 1)"
    )
    parser.add_argument(
        "--vllm", action="append", metavar="URL", help="an inference server to watch besides those discovered"
    )
    parser.add_argument("--no-discover", action="store_true", help="do not look for inference servers here")
    parser.add_argument(
        "--simulate",
        choices=DEMO_MACHINES,
        metavar="MACHINE",
        help=f"serve a simulated machine instead of this one ({', '.join(DEMO_MACHINES)}): for demos and tests; "
        "its readings are labelled as simulated",
    )
    parser.add_argument("--hostname", help="the host name to report (default: this machine's)")
    parser.add_argument(
        "--grafana-dashboard",
        action="store_true",
        help="print a Grafana dashboard (JSON) of these metrics and exit: import it in Grafana",
    )
    parser.add_argument(
        "--prometheus-alerts",
        action="store_true",
        help="print Prometheus alerting rules (YAML) for these metrics and exit: add them to rule_files",
    )
    return parser


def simulated_backend(machine: str):  # type: ignore[no-untyped-def]
    """The scripted NVML of a demo machine (a simulation, and labelled so in what it serves)."""
    from tuner.telemetry import scripted

    kind, _, count = machine.partition("x")
    presets = {"h100": scripted.h100_sxm, "l4": scripted.l4}
    nvml = presets[kind](int(count))
    return scripted.scripted_backend(nvml)


def run_exporter_cli(argv: Sequence[str]) -> int:
    args = exporter_parser().parse_args(argv)
    from tuner.telemetry.exporter import Exporter, alert_rules, dashboard_json, is_loopback, parse_listen

    if args.grafana_dashboard:
        sys.stdout.write(dashboard_json())
        return 0
    if args.prometheus_alerts:
        sys.stdout.write(alert_rules())
        return 0
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        return _fail(str(exc))
    if not args.interval or args.interval <= 0:
        return _fail("--interval must be greater than 0")
    from tuner import __version__
    from tuner.telemetry.host import HostReader
    from tuner.telemetry.nvml import NvmlBackend
    from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

    config = SamplerConfig(
        interval_s=args.interval,
        slow_every=max(1, round(1.0 / args.interval)),  # energy and processes about once a second
        discover_vllm=not args.no_discover and args.simulate is None,
        history_len=8,
    )
    backend = simulated_backend(args.simulate) if args.simulate else NvmlBackend()
    reader = HostReader(hostname=args.hostname) if args.hostname else None
    source = LiveSource(backend, config=config, vllm_urls=args.vllm or (), host=reader)
    exporter = Exporter(
        Sampler(source, history_len=8), host=host, port=port, version=__version__, interval_s=args.interval
    )
    try:
        info = exporter.start()
    except OSError as exc:
        exporter.sampler.stop()
        return _fail(f"cannot listen on {args.listen}: {exc.strerror or exc}", code=1)
    what = f"{len(info.gpus)} GPU(s)" if info.gpus else f"no GPUs: {info.message}"
    if args.simulate:
        what += f", SIMULATED {args.simulate}"
    print(f"infertop exporter: serving {exporter.url} ({what}); Ctrl-C stops", file=sys.stderr)
    if not is_loopback(host):
        print(
            "infertop exporter: ! listening beyond this machine, without authentication: anyone who reaches "
            f"{host}:{exporter.port} reads GPU, process and server names",
            file=sys.stderr,
        )
    stop = threading.Event()

    def _interrupt(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stop.wait()
    finally:
        exporter.stop()
    return 0


def _fail(message: str, code: int = 2) -> int:
    print(f"infertop exporter: {message}", file=sys.stderr)
    return code
