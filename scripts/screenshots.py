"""Make the demo recording and the screenshots in screenshots/ from the real app.

    .venv/bin/python scripts/screenshots.py            # demo recording + SVG and PNG screenshots
    .venv/bin/python scripts/screenshots.py --tune     # also the tuner screen, on a real run (needs .venv-vllm)
    .venv/bin/python scripts/screenshots.py --tune-node  # only the tuner on 8 scripted GPUs, trials in parallel

Without a GPU, the demo recording is *synthetic*: the real NVML backend running on the scripted NVML
(tuner/telemetry/scripted.py, an H100 under a decode-like load), labelled as such in its header and on screen.
The screenshots replay that recording through the real app (`infertop --replay`), so they show exactly what a
user who replays it sees. PNGs need cairosvg and the Fira Code font (Debian: fonts-firacode) for even columns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from textual.pilot import Pilot

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "screenshots"
DEMO = OUT / "demo-h100.ndjson"
SECONDS = 75.0
RATE_HZ = 4.0


def make_demo_recording(path: Path) -> None:
    """75 s of a scripted H100 at 4 Hz, on a manual clock (takes well under a second)."""
    from tuner.telemetry import scripted
    from tuner.telemetry.host import HostReader
    from tuner.telemetry.recording import Recorder
    from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

    clock = scripted.ManualClock()
    # A vLLM server in a container: the driver reports its pid and memory, psutil cannot see it.
    procs = [scripted.FakeProcess(scripted.INVISIBLE_PID, 0, 71_600 * 2**20)]
    nvml = scripted.h100_sxm(1, clock=clock, processes=procs)
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=HostReader(), clock=clock)
    sampler = Sampler(source)
    info = sampler.open()
    label = "SYNTHETIC demo: scripted NVML, not a real GPU"
    recorder = Recorder(path, info, label=label, force=True)  # the demo is remade in place
    sampler.add_listener(recorder)
    for _ in range(int(SECONDS * RATE_HZ)):
        clock.advance(1 / RATE_HZ)
        sampler.tick()
    recorder.close()
    sampler.stop()
    print(f"wrote {path.relative_to(REPO)} ({recorder.snapshots_written} snapshots)")


def _save(app: Any, name: str, out: Path = OUT) -> None:
    svg = app.export_screenshot(title=f"infertop — {name}")
    (out / f"{name}.svg").write_text(svg)
    try:
        import cairosvg
    except ImportError:
        print(f"cairosvg not installed: wrote {out / name}.svg only")
        return
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(out / f"{name}.png"), output_width=1600)
    print(f"wrote {out / name}.svg and .png")


async def live_screenshot(out: Path, vllm_urls: list[str], wait_s: float, size: tuple[int, int]) -> None:
    """The monitor as an operator sees it right now: live NVML and the given vLLM servers, after ``wait_s``
    seconds of history (scripts/gpu-check.sh captures it while its bench loads the GPU)."""
    from tui.app import make_app
    from tuner.telemetry.sampler import SamplerConfig

    out.mkdir(parents=True, exist_ok=True)
    app = make_app(config=SamplerConfig(discover_vllm=False), vllm_urls=vllm_urls)
    async with app.run_test(size=size) as pilot:
        await pilot.pause(wait_s)
        _save(app, "monitor", out)


async def replay_screenshot(name: str, size: tuple[int, int], keys: tuple[str, ...] = ()) -> None:
    from tui.app import make_app
    from tuner.telemetry.sampler import SamplerConfig

    app = make_app(config=SamplerConfig(discover_vllm=False), replay=DEMO, replay_speed=50.0)
    async with app.run_test(size=size) as pilot:
        await _until(pilot, lambda: app.sampler.ended, 30.0)
        for key in keys:
            await pilot.press(key)
        await pilot.pause(0.2)
        _save(app, name)


def _scripted_app(procs: list[Any], n_gpus: int, **app_options: Any) -> tuple[Any, Any]:
    """The real app over ``n_gpus`` scripted H100s holding ``procs``, on a manual clock (not started)."""
    from tui.app import make_app
    from tuner.telemetry import scripted
    from tuner.telemetry.host import HostReader
    from tuner.telemetry.sampler import LiveSource, SamplerConfig

    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(n_gpus, clock=clock, processes=procs)
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=HostReader(), clock=clock)
    return make_app(config=config, source=source, autostart=False, **app_options), clock


def _container_procs(n_gpus: int) -> list[Any]:
    """A server in a container on each GPU: the driver reports its pid and memory, psutil cannot see it."""
    from tuner.telemetry import scripted

    return [scripted.FakeProcess(scripted.INVISIBLE_PID + i, i, 71_600 * 2**20) for i in range(n_gpus)]


def _prime(app: Any, clock: Any, feed: Any = None, ticks: int = 240) -> None:
    """Open the machine and give the monitor a minute of readings at 4 Hz (each passed through ``feed``)."""
    app.monitor.show_system(app.sampler.open())
    snap = None
    for _ in range(ticks):
        clock.advance(0.25)
        snap = app.sampler.tick()
        if feed is not None:
            snap = feed(snap)
    assert snap is not None
    app.monitor.show_snapshot(snap)


async def scripted_screenshot(name: str, size: tuple[int, int], n_gpus: int) -> None:
    """Many GPUs: straight from the scripted backend (a recording of 8 GPUs would be a large file)."""
    app, clock = _scripted_app(_container_procs(n_gpus), n_gpus)
    async with app.run_test(size=size) as pilot:
        _prime(app, clock)
        await pilot.pause(0.2)
        _save(app, name)


async def fleet_screenshots(hosts: int = 32, wait_s: float = 12.0) -> None:
    """The fleet view for real: ``hosts`` SIMULATED 8x H100 machines, each a real `infertop exporter` over the
    scripted NVML (in this process, on loopback), read over HTTP by the real monitor; one host stops answering
    midway, one address never answers."""
    from tuner.telemetry import scripted
    from tuner.telemetry.exporter import Exporter
    from tuner.telemetry.host import HostReader
    from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

    class Named(HostReader):
        def __init__(self, name: str) -> None:
            super().__init__(hostname=name)

    exporters = []
    for i in range(hosts - 1):
        config = SamplerConfig(discover_vllm=False, interval_s=1.0, slow_every=1)
        nvml = scripted.h100_sxm(8, processes=[])
        source = LiveSource(
            scripted.scripted_backend(nvml), config=config, host=Named(f"gpu-node-{i + 2:02d}")
        )
        exporter = Exporter(Sampler(source, history_len=4), port=0)
        exporter.start()
        exporters.append(exporter)
    urls = [f"http://127.0.0.1:{e.port}" for e in exporters]
    urls.insert(5, "http://10.0.0.99:9400")  # an address nothing answers on
    shots = (((80, 24), "fleet-32x8xh100-80x24", 2), ((200, 60), "fleet-32x8xh100-200x60", 3))
    for size, name, stopping in shots:
        app, clock = _scripted_app(_container_procs(8), 8, remote_urls=urls)
        async with app.run_test(size=size) as pilot:
            assert app.remote is not None
            app.remote.start()
            _prime(app, clock)
            await pilot.pause(wait_s / 2)
            exporters[stopping].stop()  # that host stops answering
            await pilot.pause(wait_s / 2)
            if size[1] > 24:  # room to open the first host onto its GPUs; at 80x24 the host lines
                app.monitor.query("HostRow").first().action_open_host()
            app.monitor.show_fleet()
            await pilot.pause(0.5)
            _save(app, name)
            app.remote.stop()
    for e in exporters:
        e.stop()


async def engines_screenshot(name: str, size: tuple[int, int]) -> None:
    """The monitor with inference servers: two SIMULATED servers (an SGLang on GPUs 0-1, a vLLM on GPUs 2-3)
    whose counters are scripted beside the scripted NVML, so that energy per token has both sides to divide."""
    from tuner.telemetry import scripted
    from tuner.telemetry.model import EngineSample, Snapshot

    sglang_pid, vllm_pid = scripted.INVISIBLE_PID + 1, scripted.INVISIBLE_PID + 2
    procs = [scripted.FakeProcess(sglang_pid if i < 2 else vllm_pid, i, 71_600 * 2**20) for i in range(4)]
    app, clock = _scripted_app(procs, 4)
    ticks = iter(range(240))

    def with_servers(read: Any) -> Any:
        """The machine's reading with the two servers' counters at its time."""
        t = next(ticks) * 0.25
        engines = (
            EngineSample(
                url="http://127.0.0.1:30000", time_s=read.time_s, engine="sglang",
                model_name="meta-llama/Llama-3.1-70B-Instruct", requests_running=48, requests_waiting=0,
                kv_cache_usage_pct=62.0, generation_tokens_total=2400.0 * t, generation_tokens_per_s=2400.0,
                ttft_p50_s=0.21, ttft_p95_s=0.48, ttft_p99_s=0.71, tpot_p50_s=0.019, tpot_p95_s=0.026,
                tpot_p99_s=0.031, latency_window_s=60.0, server_pids=(sglang_pid,),
            ),
            EngineSample(
                url="http://127.0.0.1:8000", time_s=read.time_s, engine="vllm",
                model_name="Qwen/Qwen2.5-32B-Instruct", requests_running=31, requests_waiting=4,
                kv_cache_usage_pct=97.5, generation_tokens_total=1500.0 * t, generation_tokens_per_s=1500.0,
                ttft_p50_s=0.35, ttft_p95_s=1.9, ttft_p99_s=2.6, tpot_p50_s=0.024, tpot_p95_s=0.041,
                tpot_p99_s=0.055, latency_window_s=60.0, preemptions_total=12, server_pids=(vllm_pid,),
            ),
        )  # fmt: skip
        return Snapshot(read.time_s, read.host, read.gpus, engines)

    # The sampler takes the servers' readings with the machine's (history, sparklines); the monitor's
    # energy window, which the app's message handler would feed, is fed here.
    source = app.sampler.source
    read_machine = source.next_snapshot
    source.next_snapshot = lambda: with_servers(read_machine())

    def to_energy_window(snap: Any) -> Any:
        app.monitor.energy_window.add(snap)
        return snap

    async with app.run_test(size=size) as pilot:
        _prime(app, clock, to_energy_window)
        await pilot.pause(0.3)
        _save(app, name)


async def no_gpu_screenshot(name: str, size: tuple[int, int]) -> None:
    """This machine as it is: the real NVML backend, which finds no driver here."""
    from tui.app import make_app
    from tuner.telemetry.sampler import SamplerConfig

    app = make_app(config=SamplerConfig(discover_vllm=False))
    async with app.run_test(size=size) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(1.5)
        _save(app, name)


async def tune_screenshots(vllm_python: Path) -> None:
    """A real tuning run of the CPU build of vLLM on a tiny dummy-weight model, shown in the tuner screen."""
    import tempfile

    from tui.tune_app import make_tune_app
    from tuner.serving.launcher import api_server_command
    from tuner.serving.tinymodel import write_tiny_model
    from tuner.tuning.events import PhaseMeasured, TrialStarted
    from tuner.tuning.slo import parse_slo
    from tuner.tuning.tune import TuneConfig, Tuner

    work = Path(tempfile.mkdtemp(prefix="infertop-shot-"))
    config = TuneConfig(
        model=str(write_tiny_model(work / "tiny-llama")),
        slo=parse_slo("ttft=0.5,tps=30"),
        command=api_server_command(vllm_python),
        fixed_args=("--load-format", "dummy", "--enforce-eager"),
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        pins={"max_model_len": 512},
        values={"quantization": (None, "fp8"), "max_num_seqs": (8, 32)},
        input_len=64,
        output_len=32,
        min_phase_s=3.0,
        production_s=6.0,
        max_concurrency=32,
        launch_budget=3,
        store_path=work / "trials.sqlite",
        out_dir=work / "out",
        gpus=False,
    )
    seen: list[object] = []
    tuner = Tuner(config)
    run = tuner.run

    def run_and_watch(listener, cancel):  # type: ignore[no-untyped-def]
        return run(lambda e: (seen.append(e), listener(e)), cancel)

    tuner.run = run_and_watch  # type: ignore[method-assign]
    app = make_tune_app(tuner)
    async with app.run_test(size=(110, 34)) as pilot:

        def third_trial_measuring() -> bool:
            started = [e for e in seen if isinstance(e, TrialStarted)]
            return len(started) >= 3 and isinstance(seen[-1], PhaseMeasured)

        await _until(pilot, third_trial_measuring, 600.0)
        await pilot.pause(0.8)
        _save(app, "tune-cpu-running")
        await _until(pilot, lambda: not app.run_active, 900.0)
        await pilot.pause(0.8)
        _save(app, "tune-cpu-finished")
    print(f"tuning run kept in {work}")


async def tune_node_screenshots() -> None:
    """The tuner screen on a SIMULATED node of eight H100s, mid-run with four trials in parallel (one a TP-4
    server on GPUs 4-7): the real app and screen, fed the events and scripted NVML of the snapshot tests
    (tests/test_tune_screen.py), on a frozen clock."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_tune_screen as scene

    from tui.tune_app import make_tune_app
    from tuner.telemetry import scripted

    for size, name in (((80, 24), "tune-8xh100-parallel-80x24"), ((200, 60), "tune-8xh100-parallel-200x60")):
        clock = scripted.ManualClock()
        app = make_tune_app(scene.FakeTuner([]), autostart=False, clock=clock)
        async with app.run_test(size=size) as pilot:
            scene.feed_node(app, clock, scene.node_script())
            await pilot.pause(0.2)
            _save(app, name)


async def sources_screenshot(name: str, size: tuple[int, int], wait_s: float = 10.0) -> None:
    """Three SIMULATED L4s, one per source of DRAM bandwidth, through the real sampler, readers and app: GPU 0
    read from a dcgm-exporter page in its real format (tests/fakes/dcgm_exporter_page.py, on loopback); GPU 1
    running the stand-in vLLM (tests/fakes/fake_vllm.py) on the Llama-3.1-8B shape, kept busy by 8 streams, so
    the decode-traffic estimate applies; GPU 2 with neither (n/a)."""
    import contextlib
    import os
    import signal
    import socket
    import subprocess
    import threading
    import time

    import httpx

    sys.path.insert(0, str(REPO / "tests"))
    from fakes.dcgm_exporter_page import exporter_page, l4_gpus, serving_page

    from tui.app import make_app
    from tuner.telemetry import scripted
    from tuner.telemetry.host import HostReader
    from tuner.telemetry.sampler import LaunchedServer, LiveSource, SamplerConfig

    model = REPO / "tests" / "data" / "llama-3.1-8b-shape"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        str(REPO / "tests" / "fakes" / "fake_vllm.py"),
        "serve",
        str(model),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        [*argv, "--max-num-seqs", "8"], start_new_session=True, stdout=subprocess.DEVNULL,
        env={**os.environ, "FAKE_VLLM_STEP_S": "0.07"},
    )  # fmt: skip
    url, stop = f"http://127.0.0.1:{port}", threading.Event()

    def stream() -> None:
        body = {"model": str(model), "prompt": "x", "max_tokens": 400, "stream": True}
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                with (
                    contextlib.suppress(httpx.HTTPError),
                    client.stream("POST", f"{url}/v1/completions", json=body),
                ):
                    stop.wait(5.0)

    try:
        while httpx.get(f"{url}/health", timeout=1).status_code != 200:  # up in well under a second
            time.sleep(0.1)
    except httpx.HTTPError:
        time.sleep(0.5)
    for _ in range(8):
        threading.Thread(target=stream, daemon=True).start()
    clock = scripted.ManualClock()
    nvml = scripted.l4(3, clock=clock, processes=[scripted.FakeProcess(server.pid, 1, 20 * 2**30)])
    try:
        with serving_page(exporter_page(l4_gpus(1))) as page:
            config = SamplerConfig(discover_vllm=False, dcgm=page.url, engine_interval_s=0.5)
            source = LiveSource(
                scripted.scripted_backend(nvml), config=config, host=HostReader(), clock=clock
            )
            app = make_app(config=config, source=source, autostart=False)
            async with app.run_test(size=size) as pilot:
                app.monitor.show_system(app.sampler.open())
                source.set_engine_urls(
                    [url], {url: LaunchedServer(server.pid, ("vllm", "serve", str(model)))}
                )
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:  # real time: DCGM and the server are read on their threads
                    clock.advance(0.25)
                    snap = app.sampler.tick()
                    await pilot.pause(0.05)
                assert snap is not None
                app.monitor.show_snapshot(snap)
                await pilot.pause(0.3)
                _save(app, name)
                app.sampler.stop()
    finally:
        stop.set()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


async def _until(pilot: Pilot[Any], condition: Any, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition() and loop.time() < deadline:
        await pilot.pause(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep-recording", action="store_true", help="reuse screenshots/demo-h100.ndjson")
    parser.add_argument(
        "--fleet", action="store_true", help="only the fleet view's and the inference servers' screenshots"
    )
    parser.add_argument("--tune", action="store_true", help="also screenshot a real tuning run (CPU vLLM)")
    parser.add_argument(
        "--tune-node", action="store_true", help="only the tuner on a scripted 8-GPU node, trials in parallel"
    )
    parser.add_argument(
        "--sources",
        action="store_true",
        help="only three L4s, one per source of DRAM bandwidth (DCGM, est., n/a)",
    )
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument(
        "--live", type=Path, metavar="DIR", help="only: the live monitor now, to DIR/monitor.svg"
    )
    parser.add_argument(
        "--vllm", action="append", default=[], metavar="URL", help="with --live: a vLLM server"
    )
    parser.add_argument(
        "--wait", type=float, default=8.0, metavar="S", help="with --live: seconds of history"
    )
    args = parser.parse_args()
    if args.live:
        asyncio.run(live_screenshot(args.live, args.vllm, args.wait, (120, 36)))
        return 0
    OUT.mkdir(exist_ok=True)
    if args.tune_node:
        asyncio.run(tune_node_screenshots())
        return 0
    if args.sources:
        asyncio.run(sources_screenshot("monitor-l4-bandwidth-sources-110x46", (110, 46)))
        return 0
    if args.fleet:
        asyncio.run(fleet_screenshots())
        asyncio.run(engines_screenshot("monitor-engines-4xh100-110x44", (110, 44)))
        return 0
    if not (args.keep_recording and DEMO.exists()):
        make_demo_recording(DEMO)
    asyncio.run(replay_screenshot("monitor-h100", (110, 32)))
    asyncio.run(replay_screenshot("monitor-h100-80x24", (80, 24)))
    asyncio.run(replay_screenshot("help", (100, 34), keys=("question_mark",)))
    asyncio.run(scripted_screenshot("monitor-8xh100-80x24", (80, 24), 8))
    asyncio.run(scripted_screenshot("monitor-8xh100-120x50", (120, 50), 8))
    asyncio.run(no_gpu_screenshot("no-gpu", (80, 24)))
    asyncio.run(fleet_screenshots())
    asyncio.run(engines_screenshot("monitor-engines-4xh100-110x44", (110, 44)))
    asyncio.run(tune_node_screenshots())
    if args.tune:
        asyncio.run(tune_screenshots(args.vllm_python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
