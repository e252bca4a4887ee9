"""On a machine with a real DCGM (skipped without one): infertop reads its profiling values read-only, through
nv-hostengine and DCGM's own Python bindings or a dcgm-exporter process, and they land on the right GPUs.

It runs in a child process: the fake bindings of test_dcgm.py share DCGM's module names (dcgm_agent, ...), and
a process can hold only one of the two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

_CHILD = r"""
import dataclasses, json, time
from tuner.telemetry.dcgm import DcgmWatcher, apply_dcgm, find_dcgm_processes
from tuner.telemetry.model import GpuState
from tuner.telemetry.nvml import NvmlBackend

backend = NvmlBackend()
info = backend.open()
if info.state is not GpuState.OK:
    print(json.dumps({"skip": f"no GPU here: {info.message}"}))
    raise SystemExit(0)
processes = [p.name for p in find_dcgm_processes()]
watcher = DcgmWatcher("auto")
started = time.monotonic()
reading = watcher.poll_once()
took_s = time.monotonic() - started
if reading is not None and reading.error is None and not any(g.has_values() for g in reading.gpus):
    time.sleep(min(reading.interval_s or 1.0, 5.0) + 0.5)  # a hostengine between its first samples
    reading = watcher.poll_once()
watcher.stop()
first = backend.read(time.time(), slow=True)
time.sleep(0.3)
now = time.time()
samples = backend.read(now, slow=False)
applied = apply_dcgm(samples, info.gpus, reading, now) if reading is not None else samples
backend.close()
print(json.dumps({
    "processes": processes,
    "took_s": took_s,
    "reading": dataclasses.asdict(reading) if reading is not None else None,
    "infos": [dataclasses.asdict(g) for g in info.gpus],
    "applied": [dataclasses.asdict(s) for s in applied],
}))
"""


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in data:
        pytest.skip(data["skip"])
    if data["reading"] is None:
        pytest.skip(
            f"no DCGM here (no hostengine answering through DCGM's bindings, no dcgm-exporter; saw {data['processes']})"
        )
    return data


def test_real_dcgm_reading_is_one_line_and_in_range(result: dict[str, Any]) -> None:
    reading = result["reading"]
    assert result["took_s"] < 10.0  # a slow DCGM costs its own thread, and even that is bounded
    assert reading["status"] and "\n" not in reading["status"] and "Traceback" not in reading["status"]
    for gpu in reading["gpus"]:
        for name in ("dram_active", "sm_active", "sm_occupancy", "tensor_active"):
            assert gpu[name] is None or 0.0 <= gpu[name] <= 1.0
        for name in (
            "pcie_tx_bytes_per_s",
            "pcie_rx_bytes_per_s",
            "nvlink_tx_bytes_per_s",
            "nvlink_rx_bytes_per_s",
        ):
            assert gpu[name] is None or 0.0 <= gpu[name] < 1e13


def test_real_dcgm_values_land_on_the_gpus_they_belong_to(result: dict[str, Any]) -> None:
    reading = result["reading"]
    whole = [g for g in reading["gpus"] if g["gpu_instance_id"] is None and g["dram_active"] is not None]
    if reading["error"] is not None or not whole:
        pytest.skip(f"DCGM gives no DRAM active here: {reading['status']}")
    uuids = {info["uuid"] for info in result["infos"]}
    assert any(g["uuid"] in uuids for g in whole), (whole, uuids)  # DCGM and NVML name the GPUs alike
    for sample, info in zip(result["applied"], result["infos"], strict=True):
        if sample["profiling_source"] == "dcgm":
            assert sample["dram_bw_util_pct"] is not None and 0.0 <= sample["dram_bw_util_pct"] <= 100.0
            if info["peak_dram_bw_gbps"]:
                expected = sample["dram_bw_util_pct"] / 100 * info["peak_dram_bw_gbps"]
                assert sample["dram_bw_gbps"] == pytest.approx(expected)
        elif sample["profiling_source"] == "gpm":
            assert info["gpm_supported"]  # GPM's own figures, left alone
