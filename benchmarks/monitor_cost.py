"""What the monitor costs: CPU per sampling tick (infertop's own Python vs NVML), UI frame time, first frame.

    .venv/bin/python benchmarks/monitor_cost.py [--ticks 2000] [--frames 200]

Without a GPU the NVML calls go to the scripted NVML; the time spent inside it is measured and subtracted, so
"own" is infertop's Python alone. The real driver's cost is then added from measurements on an H100
(REFERENCE.md): cheap set 0.31 ms + GPM 0.35 ms per GPU per tick, energy counter 3.8 ms per read. On a machine
with a GPU, run with --real to measure the real driver instead. Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.telemetry import scripted
from tuner.telemetry.host import HostReader
from tuner.telemetry.nvml import NvmlBackend
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

RATE_HZ = 4.0  # sampling (history, sparklines, recording)
REDRAW_HZ = 2.0  # screen redraws (Settings.redraw_interval_s = 0.5)
# H100, driver 580, nvidia-ml-py (REFERENCE.md): per GPU per tick, and per energy read.
REAL_NVML_TICK_S = 0.31e-3 + 0.35e-3
REAL_ENERGY_READ_S = 3.8e-3
ENERGY_INTERVAL_S = 5.0
NVITOP_PCT = 1.07


class TimedNvml:
    """Forwards to an NVML module and adds up the CPU time spent inside its nvml* functions, and inside the
    driver entry points the backend calls directly (``_nvmlGetFunctionPointer``'s, for process lists)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.inside_s = 0.0
        self.by_call: dict[str, list[float]] = {}  # name -> [calls, CPU seconds]

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not (name.startswith(("nvml", "_nvml")) and callable(value)):
            return value
        if name == "_nvmlGetFunctionPointer":
            return lambda symbol: self._timed(symbol, value(symbol))
        return self._timed(name, value)

    def _timed(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                self.inside_s += spent
                entry = self.by_call.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += spent

        return timed


def sampler_cost(n_gpus: int, ticks: int, real: bool) -> dict[str, float]:
    clock = scripted.ManualClock() if not real else time.time
    if real:
        import pynvml

        nvml: Any = TimedNvml(pynvml)
    else:
        nvml = TimedNvml(scripted.h100_sxm(n_gpus, clock=clock))
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(NvmlBackend(nvml), config=config, host=HostReader(), clock=clock)
    sampler = Sampler(source, history_len=config.history_len)
    sampler.open()
    n = len(sampler.info.gpus)
    for _ in range(8):  # warm-up: GPM samples, process cache
        if not real:
            clock.advance(0.25)  # type: ignore[attr-defined]
        sampler.tick()
    nvml.inside_s = 0.0
    nvml.by_call.clear()
    start = time.process_time()
    for _ in range(ticks):
        if not real:
            clock.advance(0.25)  # type: ignore[attr-defined]
        sampler.tick()
    total_s = (time.process_time() - start) / ticks
    inside_s = nvml.inside_s / ticks
    sampler.stop()
    own_s = total_s - inside_s
    if real:
        nvml_s = inside_s
    else:
        energy_per_tick = n * REAL_ENERGY_READ_S / (ENERGY_INTERVAL_S * RATE_HZ)
        nvml_s = n * REAL_NVML_TICK_S + energy_per_tick
    calls = {
        name: {"calls": int(c), "ms_per_call": 1e3 * t / c} for name, (c, t) in nvml.by_call.items() if c
    }
    return {
        "gpus": n,
        "total_s": total_s,
        "fake_nvml_s": inside_s,
        "own_s": own_s,
        "nvml_s": nvml_s,
        "nvml_calls": calls if real else {},
    }


async def _frames(n_gpus: int, frames: int, size: tuple[int, int]) -> tuple[float, float]:
    from tui.app import make_app

    clock = scripted.ManualClock()
    nvml = scripted.h100_sxm(n_gpus, clock=clock)
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=HostReader(), clock=clock)
    app = make_app(config=config, source=source, autostart=False)
    async with app.run_test(size=size) as pilot:
        app.monitor.show_system(app.sampler.open())
        for _ in range(240):  # full history
            clock.advance(0.25)
            app.sampler.tick()
        cpu: list[float] = []
        for _ in range(frames):
            clock.advance(0.25)
            snap = app.sampler.tick()
            assert snap is not None
            start = time.process_time()
            app.monitor.show_snapshot(snap)
            await pilot.pause()  # lets Textual lay out and render the frame
            cpu.append(time.process_time() - start)
        compact = app.monitor.compact
    return statistics.median(cpu), float(compact)


async def _first_frame(n_gpus: int) -> float:
    """Wall time from starting the app to the first GPU card showing a reading (real threads, real cadence)."""
    from tui.app import make_app
    from tui.widgets.gpu_card import GpuCard

    nvml = scripted.h100_sxm(n_gpus)
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=HostReader())
    start = time.perf_counter()
    app = make_app(config=config, source=source)
    async with app.run_test(size=(120, 40)) as pilot:
        while time.perf_counter() - start < 10:
            cards = list(app.monitor.query(GpuCard))
            if cards and all(c.sample is not None for c in cards):
                break
            await pilot.pause(0.005)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--real", action="store_true", help="measure the real NVML (needs a GPU)")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the figures as JSON (gpu-check)"
    )
    args = parser.parse_args()

    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print(f"date: {time.strftime('%Y-%m-%d')}   command: {' '.join(sys.argv)}\n")
    print("### Sampling tick (CPU per tick; % of one core at 4 Hz)\n")
    nvml_what = "measured" if args.real else "H100 figures from REFERENCE.md"
    print(f"| GPUs | infertop's own Python | NVML ({nvml_what}) | total | own % core | total % core |")
    print("|---|---|---|---|---|---|")
    results = {}
    for n in (1, 8) if not args.real else (0,):
        r = sampler_cost(n, args.ticks, args.real)
        results[int(r["gpus"])] = r
        total = r["own_s"] + r["nvml_s"]
        print(
            f"| {int(r['gpus'])} | {r['own_s'] * 1e3:.3f} ms | {r['nvml_s'] * 1e3:.3f} ms | {total * 1e3:.3f} ms "
            f"| {r['own_s'] * RATE_HZ * 100:.2f} % | {total * RATE_HZ * 100:.2f} % |"
        )
    print("\n### UI frame (CPU per redraw, median)\n")
    print("| GPUs | terminal | layout | CPU per frame | % of one core at 2 Hz redraw | ... at 4 Hz redraw |")
    print("|---|---|---|---|---|---|")
    frame_cost = {}
    for n, size in ((1, (120, 40)), (8, (80, 24)), (8, (200, 80))):
        cpu, compact = asyncio.run(_frames(n, args.frames, size))
        frame_cost[(n, size)] = cpu
        layout = "compact rows" if compact else "full cards"
        print(
            f"| {n} | {size[0]}x{size[1]} | {layout} | {cpu * 1e3:.2f} ms | {cpu * REDRAW_HZ * 100:.2f} % "
            f"| {cpu * RATE_HZ * 100:.2f} % |"
        )
    print("\n### Everything: sampling at 4 Hz (own + NVML) + redraws, % of one core\n")
    print("| GPUs | terminal | total, 2 Hz redraw (default) | total, 4 Hz redraw | goal |")
    print("|---|---|---|---|---|")
    totals: dict[int, tuple[str, float]] = {}  # GPUs -> (terminal, % of a core at the default redraw)
    for (n, size), cpu in frame_cost.items():
        if n not in results:
            continue
        r = results[n]
        sampling = (r["own_s"] + r["nvml_s"]) * RATE_HZ
        pct2 = (sampling + cpu * REDRAW_HZ) * 100
        pct4 = (sampling + cpu * RATE_HZ) * 100
        goal = f"<= {NVITOP_PCT} % (nvitop's TUI, H100)" if n == 1 else "<= 5 %"
        print(f"| {n} | {size[0]}x{size[1]} | {pct2:.2f} % | {pct4:.2f} % | {goal} |")
        totals.setdefault(n, (f"{size[0]}x{size[1]}", pct2))
    if args.json:
        first = results[min(results)]
        terminal, total_pct = totals.get(int(first["gpus"]), (None, None))
        figures = {
            "real_nvml": args.real,
            "gpus": int(first["gpus"]),
            "own_ms": first["own_s"] * 1e3,
            "nvml_ms": first["nvml_s"] * 1e3,
            "sampling_pct_core": (first["own_s"] + first["nvml_s"]) * RATE_HZ * 100,
            "total_pct_core": total_pct,
            "terminal": terminal,
            "nvml_calls": first["nvml_calls"],
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print("\n### First frame (wall time from start to every GPU card showing a reading)\n")
    for n in (1, 8):
        t = min(asyncio.run(_first_frame(n)) for _ in range(3))
        print(f"- {n} GPU{'s' if n > 1 else ''}: {t * 1e3:.0f} ms (best of 3; goal < 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
