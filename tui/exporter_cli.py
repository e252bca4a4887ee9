"""`infertop exporter`: the monitor's readings as a Prometheus endpoint, without a UI."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tuner.telemetry.ports import DEFAULT_PORT, port_holder

DEMO_MACHINES = ("h100x8", "h100x4", "h100x1", "l4x2")
WEB_CONFIG_HELP = """\
--web-config FILE locks the exporter the way Prometheus exporters are locked: the format of Prometheus'
exporter-toolkit (node_exporter's --web.config.file), file names relative to the file's folder:

  tls_server_config:
    cert_file: server.pem
    key_file: server-key.pem
    client_auth_type: RequireAndVerifyClientCert   # mTLS; or VerifyClientCertIfGiven, NoClientCert (default)
    client_ca_file: clients-ca.pem                 # the CA that signs the clients' certificates
    client_allowed_sans: [prometheus.example.org]  # optional: a client certificate must name one of them
    min_version: TLS12                             # TLS10 .. TLS13 (max_version likewise)
  http_server_config:
    headers: {X-Content-Type-Options: nosniff}
  basic_auth_users:
    prometheus: $2b$12$...                         # a bcrypt hash: infertop exporter --hash-password

Unknown fields are errors. Not supported, and refused: RequestClientCert and RequireAnyClientCert, inline cert
and key, cipher_suites, curve_preferences, rate_limit. The file is read at start.

Always, with or without it: only /metrics, /snapshot.json and / are served (404 elsewhere); a client has 10 s
to send its request and 10 s to take the answer; at most 64 requests are answered at once and 512 connections
held (one more closes the longest idle). On a loopback address, only requests for localhost or a loopback
address are answered (a browser's page cannot reach it by a rebound DNS name). Credentials in --vllm URLs,
command lines and the users owning processes are never published."""


def exporter_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infertop exporter",
        description=(
            "Serve this machine's GPU, host and inference-server readings at /metrics for Prometheus\n"
            "(OpenMetrics or text, as the scraper asks). A scrape never calls NVML: it formats the latest reading."
        ),
        epilog=WEB_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="ADDR:PORT",
        help=f"where to serve (default 127.0.0.1:{DEFAULT_PORT}, this machine only; a port alone is on 127.0.0.1; "
        f"0.0.0.0:{DEFAULT_PORT} for a fleet's Prometheus, with --web-config; not 9400, which is dcgm-exporter's)",
    )
    parser.add_argument(
        "--web-config",
        type=Path,
        metavar="FILE",
        help="TLS, client certificates and basic-auth users, in exporter-toolkit's format (below)",
    )
    parser.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password (from the terminal, or one line of stdin) and print its bcrypt hash for "
        "basic_auth_users, then exit",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between readings (default 1; from 0.01 to 60)",
    )
    parser.add_argument(
        "--vllm", action="append", metavar="URL", help="an inference server to watch besides those discovered"
    )
    parser.add_argument("--no-discover", action="store_true", help="do not look for inference servers here")
    parser.add_argument(
        "--dcgm",
        default="auto",
        metavar="SPEC",
        help="where DCGM's profiling counters are read (DRAM bandwidth where GPM gives none: L4, A100): auto "
        "(default), off, a dcgm-exporter URL (http://127.0.0.1:9400/metrics), or hostengine[:HOST:PORT]",
    )
    parser.add_argument(
        "--dcgm-watch",
        action="store_true",
        help="ask DCGM to watch the profiling fields it does not yet (changes its sampling for every reader)",
    )
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
    if args.hash_password:
        return _hash_password()
    from tuner.settings import Settings, SettingsError
    from tuner.telemetry.exporter import Exporter, alert_rules, dashboard_json, parse_listen
    from tuner.telemetry.httpmessage import is_loopback
    from tuner.telemetry.webconfig import WebConfig, WebConfigError, load_web_config

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
    try:  # the monitor's and record's bounds (NaN, infinity and a spinning core refused alike)
        Settings(interval_s=args.interval).validate()
    except SettingsError as exc:
        return _fail(f"--interval: {exc}")
    try:
        Settings(dcgm=args.dcgm).validate()
    except SettingsError as exc:
        return _fail(str(exc))
    web_config = WebConfig()
    if args.web_config is not None:
        try:
            web_config = load_web_config(args.web_config)
        except WebConfigError as exc:
            return _fail(f"--web-config {exc}")
    from tuner import __version__
    from tuner.telemetry.host import HostReader
    from tuner.telemetry.nvml import NvmlBackend
    from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

    config = SamplerConfig(
        interval_s=args.interval,
        slow_every=max(1, round(1.0 / args.interval)),  # energy and processes about once a second
        discover_vllm=not args.no_discover and args.simulate is None,
        history_len=8,
        dcgm="off" if args.simulate else args.dcgm,  # a simulated GPU has no DCGM
        dcgm_watch=args.dcgm_watch,
    )
    backend = simulated_backend(args.simulate) if args.simulate else NvmlBackend()
    reader = HostReader(hostname=args.hostname) if args.hostname else None
    source = LiveSource(backend, config=config, vllm_urls=args.vllm or (), host=reader)
    exporter = Exporter(
        Sampler(source, history_len=8),
        host=host,
        port=port,
        version=__version__,
        interval_s=args.interval,
        web_config=web_config,
    )
    stop = threading.Event()

    def _interrupt(signum: int, frame: object) -> None:
        stop.set()

    # Before starting: a SIGTERM during start-up stops it as cleanly as one later.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        info = exporter.start()
    except OSError as exc:
        exporter.sampler.stop()
        return _fail(_cannot_listen(host, port, exc), code=1)
    what = f"{len(info.gpus)} GPU(s)" if info.gpus else f"no GPUs: {info.message}"
    if args.simulate:
        what += f", SIMULATED {args.simulate}"
    print(f"infertop exporter: serving {exporter.url} ({what}); Ctrl-C stops", file=sys.stderr)
    if not is_loopback(host):
        if not web_config.authenticates:
            print(
                "infertop exporter: ! listening beyond this machine, without authentication: anyone who reaches "
                f"{host}:{exporter.port} reads GPU, process and server names (--web-config locks it)",
                file=sys.stderr,
            )
        elif web_config.users and web_config.tls is None:
            print(
                "infertop exporter: ! basic auth without TLS: passwords cross the network in clear "
                "(add tls_server_config to --web-config)",
                file=sys.stderr,
            )
    try:
        stop.wait()
    finally:
        exporter.stop()
    return 0


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why the address cannot be had, in one line: for a port in use, who holds it and what to do."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno != errno.EADDRINUSE:
        return f"cannot listen on {address}: {exc.strerror or exc}"
    holder = port_holder(host, port)
    held = f"in use by {holder}" if holder else "the port is in use"
    return f"cannot listen on {address}: {held}; choose another port with --listen HOST:PORT"


def _hash_password() -> int:
    """A bcrypt hash for basic_auth_users, of a password typed (twice) or given as one line of stdin."""
    import getpass

    import bcrypt

    try:
        if sys.stdin.isatty():
            password = getpass.getpass("password: ")
            if getpass.getpass("again: ") != password:
                return _fail("the passwords differ")
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        return _fail("no password given")
    encoded = password.encode()
    if not encoded:
        return _fail("an empty password")
    if len(encoded) > 72:
        return _fail("bcrypt reads at most 72 bytes of a password")
    print(bcrypt.hashpw(encoded, bcrypt.gensalt(rounds=12)).decode())
    return 0


def _fail(message: str, code: int = 2) -> int:
    print(f"infertop exporter: {message}", file=sys.stderr)
    return code
