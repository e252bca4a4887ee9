"""benchmarks/nvml_probe.py: the pure pieces on synthetic bytes, the whole probe against a fake 535-era driver,
the CUDA children's fallback and clean-up, and a real run on this machine (no GPU: it must say so and exit 0)."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import nvml_probe  # noqa: E402

NO_MIG = 0xFFFFFFFF  # NVML's gpuInstanceId/computeInstanceId outside MIG


def entries_32(rows: list[tuple[int, int]]) -> bytes:
    """Process-info entries as a 535 driver fills them: pid, pad, usedGpuMemory, gi, ci, ccProtectedMemory."""
    return b"".join(struct.pack("<I4xQIIQ", pid, mem, NO_MIG, NO_MIG, 0) for pid, mem in rows)


def entries_24(rows: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<I4xQII", pid, mem, NO_MIG, NO_MIG) for pid, mem in rows)


ROWS = [(1111, 500 * 2**20), (2222, 600 * 2**20), (3333, 700 * 2**20)]
PIDS = {1111, 2222, 3333}


def test_a_32_byte_buffer_reads_wrong_pids_with_the_24_byte_stride_and_is_judged_32() -> None:
    raw = entries_32(ROWS) + bytes(32 * 5)  # the rest of the zero-filled buffer
    assert [e["pid"] for e in nvml_probe.decode_entries(raw, 3, 32)] == [1111, 2222, 3333]
    assert nvml_probe.decode_entries(raw, 3, 32)[1]["used_gpu_memory"] == 600 * 2**20
    wrong = [e["pid"] for e in nvml_probe.decode_entries(raw, 3, 24)]
    assert wrong[0] == 1111 and wrong[1:] == [0, NO_MIG]  # entry 0's cc memory, then entry 1's gpuInstanceId
    verdict = nvml_probe.judge_layout(raw, 3, exists=PIDS.__contains__)
    assert verdict["entry_bytes"] == 32 and verdict["basis"] == "in_proc"
    assert verdict["checks"]["24"] == {"in_proc": False, "plausible": False}
    # In a container NVML's pids are the host's: none is in /proc here, so plausibility decides.
    contained = nvml_probe.judge_layout(raw, 3, exists=lambda pid: False)
    assert contained["entry_bytes"] == 32 and contained["basis"] == "plausible"


def test_a_24_byte_buffer_is_judged_24() -> None:
    raw = entries_24(ROWS) + bytes(32 * 8)
    verdict = nvml_probe.judge_layout(raw, 3, exists=PIDS.__contains__)
    assert verdict["entry_bytes"] == 24, verdict
    assert verdict["pids"]["24"] == [1111, 2222, 3333]
    assert verdict["pids"]["32"] != [1111, 2222, 3333]


def test_one_entry_or_pids_from_no_layout_decide_nothing() -> None:
    one = nvml_probe.judge_layout(entries_32(ROWS[:1]) + bytes(64), 1, exists=PIDS.__contains__)
    assert one["entry_bytes"] is None and "fewer than two" in one["why"]
    garbage = struct.pack("<8Q", *([2**63 + 12345] * 8))  # every pid 12345, every field huge
    both = nvml_probe.judge_layout(garbage, 2, exists=lambda pid: False)
    assert both["entry_bytes"] is None


@pytest.mark.parametrize(
    ("present", "function", "entry_bytes"),
    [
        ({nvml_probe.V3, nvml_probe.V2, nvml_probe.CONF_COMPUTE}, nvml_probe.V3, 32),  # 535
        ({nvml_probe.V3, nvml_probe.V2, nvml_probe.CONF_COMPUTE, nvml_probe.DETAIL_LIST}, nvml_probe.V3, 24),
        ({nvml_probe.V3, nvml_probe.V2}, nvml_probe.V3, 24),  # before confidential computing
        ({nvml_probe.V2, nvml_probe.CONF_COMPUTE}, nvml_probe.V2, 24),
        ({nvml_probe.CONF_COMPUTE}, None, None),
        (set(), None, None),
    ],
)
def test_the_symbol_rule(present: set[str], function: str | None, entry_bytes: int | None) -> None:
    rule = nvml_probe.predicted_layout(present)
    assert (rule["function"], rule["entry_bytes"]) == (function, entry_bytes)


def test_the_shortest_fine_gpm_interval_needs_every_longer_one_fine() -> None:
    def rep(ret: int, value: float, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"measured_s": 0.1, "metrics": None if error else {"SM_UTIL": (ret, value)}, "error": error}

    err = {"call": "nvmlGpmMetricsGet", "code": 2, "text": "Invalid Argument"}
    items = [
        nvml_probe.summarise_interval(0.01, [rep(0, 5.0)] * 3, 3),  # fine, but 0.05 below is not
        nvml_probe.summarise_interval(0.05, [rep(0, 5.0), rep(0, 250.0), rep(0, 0, err)], 3),
        nvml_probe.summarise_interval(0.1, [rep(0, 5.0)] * 3, 3),
        nvml_probe.summarise_interval(0.2, [rep(0, 5.0)] * 3, 3),
    ]
    assert items[1]["ok"] == 1
    assert items[1]["metrics"]["SM_UTIL"]["out_of_range"] == 1
    assert items[1]["errors"] == {"nvmlGpmMetricsGet: Invalid Argument (2)": 1}
    assert nvml_probe.smallest_fine_interval(items) == 0.1
    bad_return = nvml_probe.summarise_interval(0.5, [rep(3, 0.0)] * 3, 3)
    assert bad_return["ok"] == 0 and bad_return["metrics"]["SM_UTIL"]["returns"] == {"3": 3}
    assert nvml_probe.smallest_fine_interval([*items, bad_return]) is None
    cut_short = nvml_probe.summarise_interval(0.5, [rep(0, 5.0)], 3)  # the budget ran out
    assert nvml_probe.smallest_fine_interval([cut_short]) is None


# --- a fake driver: 535-era symbols, 32-byte entries on GPU 0, no instant power on GPU 1 ----------------------


class FakeSample:
    taken = 0.0


class FakeMetricsGet:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: FakeSample | None = None
        self.sample2: FakeSample | None = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)]


class FakeDriver:
    """Just what nvml_probe calls, with pynvml's own error classes."""

    NVMLError = pynvml.NVMLError
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    c_nvmlGpmMetricsGet_t = FakeMetricsGet

    def __init__(self, pids: list[int], entry_bytes: int = 32, symbols: set[str] | None = None) -> None:
        self.pids = pids
        self.entry_bytes = entry_bytes
        self.symbols = (
            symbols if symbols is not None else {nvml_probe.V3, nvml_probe.V2, nvml_probe.CONF_COMPUTE}
        )
        self.allocated: list[FakeSample] = []
        self.freed: list[FakeSample] = []
        self.power_reads = 0
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return "535.104.05"

    def nvmlSystemGetNVMLVersion(self) -> str:
        return "12.535.104.05"

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-fake-{handle}"

    def _nvmlGetFunctionPointer(self, name: str) -> Any:
        if name not in self.symbols:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._list_processes

    def _list_processes(self, handle: int, count_ref: Any, buffer: Any) -> int:
        """The C function: the count when ``buffer`` is NULL or too small, else the entries."""
        count = count_ref._obj
        pids = self.pids if handle == 0 else []
        if not pids:
            count.value = 0
            return pynvml.NVML_SUCCESS
        if buffer is None or count.value < len(pids):
            count.value = len(pids)
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        rows = [(pid, 512 * 2**20) for pid in pids]
        data = entries_32(rows) if self.entry_bytes == 32 else entries_24(rows)
        ctypes.memmove(buffer, data, len(data))
        count.value = len(pids)
        return pynvml.NVML_SUCCESS

    def nvmlDeviceGetFieldValues(self, handle: int, ids: list[int]) -> list[Any]:
        self.power_reads += 1
        wobble = 40_000 * (self.power_reads % 3)
        out = []
        for field in ids:
            value = SimpleNamespace(uiVal=300_000 + (wobble if field == nvml_probe.FI_POWER_INSTANT else 0))
            ret = (
                pynvml.NVML_ERROR_NOT_SUPPORTED if handle == 1 and field == nvml_probe.FI_POWER_INSTANT else 0
            )
            out.append(
                SimpleNamespace(
                    fieldId=field, nvmlReturn=ret, valueType=1, value=value, timestamp=self.power_reads
                )
            )
        return out

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return 301_000

    def nvmlGpmQueryDeviceSupport(self, handle: int) -> Any:
        return SimpleNamespace(isSupportedDevice=int(handle == 0))

    def nvmlGpmSampleAlloc(self) -> FakeSample:
        sample = FakeSample()
        self.allocated.append(sample)
        return sample

    def nvmlGpmSampleFree(self, sample: FakeSample) -> None:
        self.freed.append(sample)

    def nvmlGpmSampleGet(self, handle: int, sample: FakeSample) -> FakeSample:
        sample.taken = time.monotonic()
        return sample

    def nvmlGpmMetricsGet(self, request: FakeMetricsGet) -> FakeMetricsGet:
        assert request.version == 1 and request.numMetrics == 2
        assert request.sample1 is not None and request.sample2 is not None
        gap = request.sample2.taken - request.sample1.taken
        if gap < 0.03:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for metric in request.metrics[: request.numMetrics]:
            metric.nvmlReturn = 0
            metric.value = 250.0 if gap < 0.08 else 42.0
        return request


def test_the_probe_against_a_fake_535_driver_finds_32_byte_entries_and_records_every_error() -> None:
    fake = FakeDriver([os.getpid(), os.getppid()])
    doc = nvml_probe.run_probe(
        fake, 10.0, cuda_pythons=(), power_window_s=0.2, power_samples=4, gpm_intervals=(0.01, 0.05, 0.1),
        gpm_repeats=2,
    )  # fmt: skip
    assert doc["available"] is True and doc["driver"] == "535.104.05" and fake.shut
    p = doc["processes"]
    assert p["rule"]["entry_bytes"] == 32
    assert p["observed_entry_bytes"] == 32 and p["agrees_with_rule"] is True
    gpu0, gpu1 = p["gpus"]
    assert gpu0["verdict"]["pids"]["32"] == [os.getpid(), os.getppid()]
    assert gpu0["verdict"]["basis"] == "in_proc"
    assert gpu1["count"] == 0
    power = {g["index"]: g for g in doc["power"]["gpus"]}
    assert power[0]["instant"]["supported"] and power[0]["instant"]["value_type"] == "unsigned int"
    assert power[0]["instant"]["watts"]["min"] == 300.0 and power[0]["instant"]["watts"]["max"] == 380.0
    assert power[0]["instant_varies_more"] is True
    assert power[1]["instant"] == {**power[1]["instant"], "supported": False, "returns": {"3": 4}}
    assert power[1]["usage"]["errors"][0]["code"] == pynvml.NVML_ERROR_NO_PERMISSION
    gpm = {g["index"]: g for g in doc["gpm"]["gpus"]}
    assert gpm[1]["supported"] is False
    first, second, third = gpm[0]["intervals"]
    assert first["ok"] == 0 and "nvmlGpmMetricsGet: Invalid Argument (2)" in first["errors"]
    assert second["ok"] == 0 and second["metrics"]["SM_UTIL"]["out_of_range"] == 2
    assert third["ok"] == 2 and third["metrics"]["DRAM_BW_UTIL"]["values"]["mean"] == 42.0
    assert gpm[0]["smallest_fine_interval_s"] == 0.1
    assert len(fake.allocated) == 2 and fake.freed == fake.allocated
    text = nvml_probe.markdown(doc)
    assert "32-byte entries on GPU 0 (pids in /proc): agrees with the rule" in text
    assert "| 1 | no value (Not Supported x4)" in text
    assert "| 0.1 s |" in text
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN


def test_a_24_byte_driver_that_the_rule_calls_32_is_reported_as_disagreeing() -> None:
    fake = FakeDriver([os.getpid(), os.getppid()], entry_bytes=24)
    doc = nvml_probe.run_probe(
        fake, 5.0, power_window_s=0.1, power_samples=1, gpm_intervals=(0.1,), gpm_repeats=1
    )
    assert doc["processes"]["observed_entry_bytes"] == 24
    assert doc["processes"]["agrees_with_rule"] is False


def test_no_process_and_no_symbol_are_notes_not_failures() -> None:
    empty = nvml_probe.run_probe(
        FakeDriver([]), 5.0, power_window_s=0.1, power_samples=1, gpm_intervals=(0.1,), gpm_repeats=1
    )
    assert empty["processes"]["note"] == "no processes on the GPU: layout not checked"
    bare = nvml_probe.run_probe(
        FakeDriver([1], symbols=set()),
        5.0,
        power_window_s=0.1,
        power_samples=1,
        gpm_intervals=(),
        gpm_repeats=1,
    )
    assert bare["processes"]["rule"]["function"] is None and bare["processes"]["gpus"] == []


def test_children_fall_back_to_the_next_python_and_are_always_ended(tmp_path: Path) -> None:
    # No torch in this venv: its children fail at once; a missing Python cannot start; a stand-in "Python"
    # that says ready and sleeps plays the one with torch.
    standin = tmp_path / "python-with-torch"
    standin.write_text("#!/bin/sh\necho ready\nexec sleep 60\n")
    standin.chmod(0o755)
    no_torch = sys.executable
    try:
        import torch  # noqa: F401

        no_torch = str(tmp_path / "missing-python")  # this venv has torch after all: two missing ones then
    except ImportError:
        pass
    children = nvml_probe.CudaChildren(
        [no_torch, str(tmp_path / "nope"), str(standin)], dict(os.environ), 60.0
    )
    try:
        children.begin(time.monotonic() + 30.0)
        children.wait_done(time.monotonic() + 30.0)
        report = children.report()
    finally:
        children.stop()
    assert report["ready"] == 2 and report["python"] == str(standin)
    assert len(report["failures"]) == 2, report["failures"]
    assert all(proc.poll() is not None for proc in children.procs)


def test_children_that_never_get_ready_are_reported_and_ended(tmp_path: Path) -> None:
    silent = tmp_path / "python-silent"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    children = nvml_probe.CudaChildren([str(silent)], dict(os.environ), 60.0)
    started = time.monotonic()
    try:
        children.begin(time.monotonic() + 1.0)
        children.wait_done(time.monotonic() + 1.0)
        report = children.report()
    finally:
        children.stop()
    assert time.monotonic() - started < 10.0
    assert report["ready"] == 0 and report["python"] is None and report["started"] == 2
    assert all(proc.poll() is not None for proc in children.procs)


def test_the_probe_on_this_machine_without_nvml_exits_0_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/nvml_probe.py", "--seconds", "5", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    if doc["available"]:
        pytest.skip("this machine has NVML and a GPU: the no-NVML path does not apply")
    assert doc["reason"] and doc["format"] == "infertop-nvml-probe"
    assert done.stdout.strip().splitlines() == [
        f"nvml_probe: NVML not available ({doc['reason']}): nothing probed"
    ]
