"""Test helpers: deterministic apps over the scripted NVML, with a fixed host and a manual clock."""

from __future__ import annotations

from tui.app import InfertopApp, make_app
from tuner.telemetry import scripted
from tuner.telemetry.exporter import Exporter
from tuner.telemetry.model import HostSample
from tuner.telemetry.sampler import LiveSource, Sampler, SamplerConfig

NO_DISCOVERY = SamplerConfig(discover_vllm=False)


class FixedHost:
    """A host that always reads the same, so snapshots do not depend on this machine."""

    def read(self, now_s: float) -> HostSample:
        return HostSample(
            time_s=now_s,
            hostname="gpu-node-01",
            cpu_pct=23.0,
            cpu_count=64,
            ram_used_bytes=180 * 2**30,
            ram_total_bytes=1024 * 2**30,
            load_avg_1m=7.5,
            load_avg_5m=6.9,
            load_avg_15m=6.1,
        )


def scripted_app(
    nvml: scripted.ScriptedNvml | None,
    clock: scripted.ManualClock,
    *,
    vllm_urls: tuple[str, ...] = (),
    config: SamplerConfig = NO_DISCOVERY,
) -> InfertopApp:
    """The real app over a scripted NVML (None: GPU telemetry disabled), not started: tests drive ticks."""
    backend = scripted.scripted_backend(nvml) if nvml is not None else None
    source = LiveSource(backend, config=config, vllm_urls=vllm_urls, host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    return make_app(config=config, source=source, autostart=False)


def prime(app: InfertopApp, clock: scripted.ManualClock, ticks: int, interval_s: float = 0.25) -> None:
    """Open the telemetry source and feed ``ticks`` readings to the monitor, on the calling (UI) thread."""
    info = app.sampler.open()
    app.monitor.show_system(info)
    for _ in range(ticks):
        clock.advance(interval_s)
        snap = app.sampler.tick()
        assert snap is not None
    assert app.sampler.latest is not None
    app.monitor.show_snapshot(app.sampler.latest)


def scripted_exporter(nvml: scripted.ScriptedNvml, clock: scripted.ManualClock, ticks: int = 8) -> Exporter:
    """The real exporter over a scripted NVML, serving on a free loopback port, after ``ticks`` readings that
    the caller's clock drives (its own sampler thread is not started)."""
    config = SamplerConfig(discover_vllm=False)
    source = LiveSource(scripted.scripted_backend(nvml), config=config, host=FixedHost(), clock=clock)  # type: ignore[arg-type]
    exporter = Exporter(Sampler(source, history_len=8), port=0, version="test", clock=clock)
    exporter.start(sampling=False)
    for _ in range(ticks):
        clock.advance(0.25)
        exporter.sampler.tick()
    return exporter
