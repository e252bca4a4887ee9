"""What the fleet costs: one exporter scrape of an 8-GPU host, and the monitor's CPU with 32 remote hosts.

    .venv/bin/python benchmarks/fleet_cost.py [--scrapes 500] [--hosts 32] [--seconds 20] [--repeats 2]
                                              [--host-interval 2]

1. Scrape: an exporter over a scripted 8x H100 with an inference server, CPU per scrape (process time) of the
   text and OpenMetrics expositions, of /snapshot.json (what the remote view reads), and what parsing each costs
   the reader; then the wall time of a scrape over HTTP on loopback.
2. Remote hosts: ``--hosts`` simulated 8x H100 exporters in a separate process (pinned to core 0, sampling at
   1 Hz), and the real monitor app (pinned to core 1) running in real time with its own scripted 8 GPUs (4 Hz
   sampling, 2 Hz redraw), without and then with the remote hosts, alternated ``--repeats`` times: the
   monitor process's CPU over ``--seconds``, all its threads included (sampler, remote readers, UI).

Prints Markdown for BENCHMARKS.md. Every GPU here is simulated (the scripted NVML).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil

from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter
from tuner.telemetry.model import EngineSample, Snapshot
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig


def _serving_exporter(clock: scripted.ManualClock, n_gpus: int = 8) -> Exporter:
    pid = scripted.INVISIBLE_PID + 1
    procs = [scripted.FakeProcess(pid, i, 70 * 2**30) for i in range(n_gpus)]
    nvml = scripted.h100_sxm(n_gpus, clock=clock, processes=procs)
    config = SamplerConfig(discover_vllm=False)
    exporter = Exporter(
        Sampler(LiveSource(scripted.scripted_backend(nvml), config=config, clock=clock)), port=0, clock=clock
    )
    exporter.start(sampling=False)
    for tick in range(240):
        clock.advance(0.25)
        read = exporter.sampler.tick()
        assert read is not None
        engine = EngineSample(
            url="http://127.0.0.1:8000", time_s=read.time_s, engine="vllm", model_name="llama-70b",
            requests_running=64.0, requests_waiting=3.0, kv_cache_usage_pct=71.0,
            generation_tokens_total=4000.0 * tick * 0.25, server_pids=(pid,), ttft_p50_s=0.1, ttft_p95_s=0.3,
            ttft_p99_s=0.5, tpot_p50_s=0.02, tpot_p95_s=0.03, tpot_p99_s=0.04,
        )  # fmt: skip
        snap = Snapshot(read.time_s, read.host, read.gpus, (engine,))
        exporter.collector.take(snap)
        exporter.sampler.latest = snap
    return exporter


def _cpu_per_call(fn: object, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.process_time() - start) / n


def scrape_cost(scrapes: int) -> list[str]:
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
    from prometheus_client.parser import text_string_to_metric_families

    from tuner.telemetry.remote import parse_snapshot_page

    exporter = _serving_exporter(scripted.ManualClock())
    try:
        text = generate_latest(exporter.registry)
        body = exporter.snapshot_json()
        rows = [
            (
                "/metrics, Prometheus text",
                len(text),
                _cpu_per_call(lambda: generate_latest(exporter.registry), scrapes),
            ),
            (
                "/metrics, OpenMetrics",
                len(generate_openmetrics(exporter.registry)),
                _cpu_per_call(lambda: generate_openmetrics(exporter.registry), scrapes),
            ),
            ("/snapshot.json (remote view)", len(body), _cpu_per_call(exporter.snapshot_json, scrapes)),
        ]
        decoded = text.decode()
        parse_text = _cpu_per_call(
            lambda: list(text_string_to_metric_families(decoded)), max(20, scrapes // 10)
        )
        parse_json = _cpu_per_call(lambda: parse_snapshot_page(json.loads(body)), scrapes)
        with httpx.Client() as client:
            client.get(exporter.url)
            wall = []
            for _ in range(min(scrapes, 200)):
                start = time.perf_counter()
                client.get(exporter.url).raise_for_status()
                wall.append(time.perf_counter() - start)
        series = sum(1 for line in decoded.splitlines() if line and not line.startswith("#"))
    finally:
        exporter.stop()
    out = [
        f"8 GPUs (scripted H100), one inference server: {series} series.",
        "",
        "| what | bytes | CPU per scrape (exporter) |",
        "|---|---|---|",
    ]
    out += [f"| {name} | {size:,} | {cpu * 1e3:.2f} ms |" for name, size, cpu in rows]
    out += [
        "",
        f"Parsing it (the reader's side): the text page {parse_text * 1e3:.2f} ms with prometheus_client's parser; "
        f"/snapshot.json {parse_json * 1e3:.2f} ms (json + dataclasses).",
        f"A scrape over HTTP on loopback (client and exporter in one process): median "
        f"{statistics.median(wall) * 1e3:.2f} ms wall, p95 {sorted(wall)[int(0.95 * len(wall))] * 1e3:.2f} ms.",
    ]
    return out


def serve_hosts(n: int, port_file: Path) -> None:
    """Run ``n`` simulated 8-GPU exporters in this process until SIGTERM (sampling at 1 Hz each)."""
    exporters = []
    for i in range(n):
        nvml = scripted.h100_sxm(8)
        config = SamplerConfig(discover_vllm=False, interval_s=1.0, slow_every=1)
        from tuner.telemetry.host import HostReader

        source = LiveSource(
            scripted.scripted_backend(nvml), config=config, host=HostReader(f"gpu-node-{i + 2:02d}")
        )
        exporter = Exporter(Sampler(source, history_len=4), port=0)
        exporter.start()
        exporters.append(exporter)
    port_file.write_text("\n".join(str(e.port) for e in exporters))
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    while not stop[0]:
        time.sleep(0.2)
    for e in exporters:
        e.stop()


async def _monitor_cpu(urls: list[str], seconds: float, interval_s: float) -> tuple[float, int]:
    from tui.app import make_app
    from tuner.telemetry.host import HostReader

    nvml = scripted.h100_sxm(8)
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=HostReader())
    app = make_app(config=config, source=source, remote_urls=urls, remote_interval_s=interval_s)
    me = psutil.Process()
    async with app.run_test(size=(120, 40)) as pilot:
        await asyncio.sleep(3.0)  # started, every host read once
        start_cpu, start = sum(me.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(seconds)
        cpu = sum(me.cpu_times()[:2]) - start_cpu
        wall = time.monotonic() - start
        answering = 0
        if app.remote is not None:
            answering = sum(1 for h in app.remote.latest() if h.state(time.time()) == "ok")
        await pilot.pause()
    return 100.0 * cpu / wall, answering


def remote_cost(hosts: int, seconds: float, repeats: int, interval_s: float) -> list[str]:
    port_file = Path(f"/tmp/infertop-fleet-ports-{os.getpid()}")
    server = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            __file__,
            "--serve",
            str(hosts),
            "--port-file",
            str(port_file),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and len(port_file.read_text().split()) == hosts):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the simulated exporters did not start")
            time.sleep(0.2)
        urls = [f"http://127.0.0.1:{p}" for p in port_file.read_text().split()]
        os.sched_setaffinity(0, {1})
        rows: dict[str, list[float]] = {"local only": [], f"+ {hosts} remote hosts": []}
        seen = 0
        for _ in range(repeats):
            rows["local only"].append(asyncio.run(_monitor_cpu([], seconds, interval_s))[0])
            pct, seen = asyncio.run(_monitor_cpu(urls, seconds, interval_s))
            rows[f"+ {hosts} remote hosts"].append(pct)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        port_file.unlink(missing_ok=True)
    out = [
        f"The monitor (120x40, 8 local scripted GPUs, 4 Hz sampling, 2 Hz redraw) over {seconds:.0f} s, pinned to "
        f"core 1; {hosts} simulated 8x H100 exporters in another process on core 0, each read every {interval_s:g} s "
        f"({seen} answering at the end).",
        "",
        "| monitor | CPU, % of one core (each run) | median |",
        "|---|---|---|",
    ]
    for name, values in rows.items():
        out.append(
            f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} % |"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--host-interval", type=float, default=2.0, help="seconds between reads of a host")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_hosts(args.serve, args.port_file)
        return 0
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("\n".join(scrape_cost(args.scrapes)))
    print()
    print("\n".join(remote_cost(args.hosts, args.seconds, args.repeats, args.host_interval)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
