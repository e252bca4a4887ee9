"""On a real NVIDIA GPU (skipped without one): the NVML backend reads plausible values, GPM on Hopper."""

from __future__ import annotations

import time

import pytest

from tuner.telemetry.model import GpuState
from tuner.telemetry.nvml import NvmlBackend

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():  # type: ignore[no-untyped-def]
    b = NvmlBackend()
    info = b.open()
    if info.state is not GpuState.OK:
        pytest.skip(f"no GPU here: {info.message}")
    yield b
    b.close()


def test_real_readings_are_plausible(backend: NvmlBackend) -> None:  # type: ignore[no-untyped-def]
    info = backend.open()
    first = backend.read(time.time(), slow=True)
    time.sleep(0.3)
    samples = backend.read(time.time(), slow=False)
    assert len(samples) == len(info.gpus) == len(first)
    for gpu, s in zip(info.gpus, samples, strict=True):
        assert s.error is None
        assert s.vram_total_bytes and 0 < (s.vram_used_bytes or 0) <= s.vram_total_bytes
        assert s.power_w is not None and 0 < s.power_w < 2000
        assert s.power_limit_w is not None and s.power_limit_w >= 10
        assert s.gpu_temp_c is not None and 0 < s.gpu_temp_c < 120
        assert s.clock_event_reasons is not None
        if gpu.gpm_supported:  # Hopper: the second tick has two GPM samples to difference
            assert s.dram_bw_util_pct is not None and 0 <= s.dram_bw_util_pct <= 100
            assert s.dram_bw_gbps is not None and gpu.peak_dram_bw_gbps
            assert s.dram_bw_gbps == pytest.approx(s.dram_bw_util_pct / 100 * gpu.peak_dram_bw_gbps)
