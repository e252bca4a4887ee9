"""Probe three NVML behaviours that only a real driver can confirm, on every GPU the driver lists.

    python benchmarks/nvml_probe.py [--seconds 20] [--json FILE] [--cuda-python PYTHON]

1. Process-info entries. nvidia-ml-py maps ``c_nvmlProcessInfo_v3_t`` to the 24-byte v2 layout (pid u32,
   usedGpuMemory u64, gpuInstanceId u32, computeInstanceId u32), but some 535 drivers fill 32-byte entries (the
   same plus usedGpuCcProtectedMemory u64). nvitop's rule predicts 32 bytes when the library has
   ``nvmlDeviceGetComputeRunningProcesses_v3`` and ``nvmlDeviceGetConfComputeMemSizeInfo`` but not
   ``nvmlDeviceGetRunningProcessDetailList``. The probe reports the symbols, the rule's prediction, and what one
   raw buffer (the ``_v3`` function called through ctypes, 32 bytes of room per entry, zero-filled) decodes to
   with 24- and 32-byte strides, and which decoding gives only pids that exist in /proc (or, when NVML's pids
   are another namespace's, only plausible ones: nonzero, below 2**22). Two entries at least are needed to tell
   the layouts apart, so the probe starts two short-lived processes that each make a CUDA context on GPU 0
   (torch, from this Python or else from ``--cuda-python``) and ends them when done.
2. Power: ``NVML_FI_DEV_POWER_INSTANT`` (186), ``NVML_FI_DEV_POWER_AVERAGE`` (185) and
   ``nvmlDeviceGetPowerUsage`` read 20 times over 2 s: whether the instant field is supported, its value type,
   mean/min/max/spread of each in watts.
3. GPM's shortest usable interval: two samples ``interval`` apart, for 0.01 to 0.5 s, 5 times each; per interval
   the per-metric returns and values of DRAM_BW_UTIL and SM_UTIL, and any error.

Every NVML error is kept as data (its code and text), never raised. Without NVML (no driver, no GPU) it prints
one line, writes ``{"available": false, "reason": ...}`` and exits 0. Prints Markdown tables; ``--json`` writes
every figure. ``--seconds`` bounds the whole probe: power (2 s) and GPM (about 4.5 s, every GPU in one loop) run
while the children start, and the layout is read once both hold a context, so it ends after 7-10 s when torch is
at hand and at ``--seconds`` minus 1.5 s when the children never get ready.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

V3 = "nvmlDeviceGetComputeRunningProcesses_v3"
V2 = "nvmlDeviceGetComputeRunningProcesses_v2"
CONF_COMPUTE = "nvmlDeviceGetConfComputeMemSizeInfo"
DETAIL_LIST = "nvmlDeviceGetRunningProcessDetailList"
SYMBOLS = (V3, V2, CONF_COMPUTE, DETAIL_LIST)
ENTRY_FORMATS = {
    24: "<I4xQII",
    32: "<I4xQIIQ",
}  # pid, (pad), usedGpuMemory, gpuInstanceId, computeInstanceId[, cc]
RAW_ENTRY_BYTES = 32  # the raw buffer gives every entry room for the larger layout
PID_LIMIT = 2**22  # Linux's largest pid_max
NVML_SUCCESS = 0
NVML_ERROR_INSUFFICIENT_SIZE = 7
RAW_HEX_BYTES = 128  # how much of the raw buffer the JSON keeps

FI_POWER_AVERAGE = 185
FI_POWER_INSTANT = 186
POWER_SAMPLES = 20
POWER_WINDOW_S = 2.0
VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
VALUE_TYPES = {
    0: "double",
    1: "unsigned int",
    2: "unsigned long",
    3: "unsigned long long",
    4: "signed long long",
    5: "signed int",
    6: "unsigned short",
}

GPM_METRICS = {10: "DRAM_BW_UTIL", 2: "SM_UTIL"}  # both percentages
GPM_INTERVALS_S = (0.01, 0.05, 0.1, 0.2, 0.5)
GPM_REPEATS = 5
GPM_METRICS_GET_VERSION = 1
PERCENT_MAX = 100.5  # a utilisation above this is a wrong value, not rounding

CHILDREN = 2
CHILD_CODE = """
import sys, time
try:
    import torch
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
except BaseException as error:
    print("error", type(error).__name__, (str(error).splitlines() or [""])[0][:200], flush=True)
    sys.exit(3)
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""
BASIS_LABELS = {"in_proc": "pids in /proc", "plausible": "pids plausible, not in this /proc"}
GPM_RESERVE_S = 3.0  # GPM stops this long before the end: the layout reads and stopping the children
LAYOUT_RESERVE_S = 1.5  # waiting for the children stops this long before the end


# --- the pure pieces -----------------------------------------------------------------------------------------


def predicted_layout(present: Collection[str]) -> dict[str, Any]:
    """nvitop's rule: which function lists the processes, and how many bytes the driver writes per entry."""
    if V3 in present and CONF_COMPUTE in present and DETAIL_LIST not in present:
        why = f"{V3} and {CONF_COMPUTE} without {DETAIL_LIST}: a 535-era driver that fills 32-byte entries"
        return {"function": V3, "entry_bytes": 32, "why": why}
    if V3 in present:
        why = f"{V3} with " + (
            f"{DETAIL_LIST}: a newer driver" if DETAIL_LIST in present else f"no {CONF_COMPUTE}"
        )
        return {"function": V3, "entry_bytes": 24, "why": why}
    if V2 in present:
        return {"function": V2, "entry_bytes": 24, "why": f"no {V3}: {V2} and its 24-byte entries"}
    return {"function": None, "entry_bytes": None, "why": "neither _v3 nor _v2: the layout cannot be checked"}


def decode_entries(raw: bytes, count: int, entry_bytes: int) -> list[dict[str, int]]:
    """The first ``count`` process-info entries of ``raw`` read with a stride of ``entry_bytes`` (24 or 32)."""
    fmt = ENTRY_FORMATS[entry_bytes]
    out: list[dict[str, int]] = []
    for i in range(max(0, count)):
        offset = i * entry_bytes
        if offset + entry_bytes > len(raw):
            break
        values = struct.unpack_from(fmt, raw, offset)
        entry = {
            "pid": values[0],
            "used_gpu_memory": values[1],
            "gpu_instance_id": values[2],
            "compute_instance_id": values[3],
        }
        if entry_bytes == 32:
            entry["used_cc_protected_memory"] = values[4]
        out.append(entry)
    return out


def pid_in_proc(pid: int) -> bool:
    return pid > 0 and os.path.isdir(f"/proc/{pid}")


def plausible_pid(pid: int) -> bool:
    return 0 < pid < PID_LIMIT


def judge_layout(raw: bytes, count: int, exists: Callable[[int], bool] = pid_in_proc) -> dict[str, Any]:
    """Which stride reads ``count`` entries of ``raw`` as real pids: first by /proc (``exists``), and when no
    decoding passes that (NVML gives the host's pids inside a container) by plausibility alone."""
    pids = {b: [e["pid"] for e in decode_entries(raw, count, b)] for b in ENTRY_FORMATS}
    checks = {
        b: {
            "in_proc": bool(p) and all(exists(pid) for pid in p),
            "plausible": bool(p) and all(plausible_pid(pid) for pid in p),
        }
        for b, p in pids.items()
    }
    result: dict[str, Any] = {
        "pids": {str(b): p for b, p in pids.items()},
        "checks": {str(b): c for b, c in checks.items()},
        "entry_bytes": None,
        "basis": None,
    }
    if count < 2:
        result["why"] = "fewer than two entries: both layouts read the same first pid"
        return result
    if pids[24] == pids[32]:
        result["why"] = "both decodings give the same pids"
        return result
    for basis, label in (
        ("in_proc", "every pid exists in /proc"),
        ("plausible", "no decoding's pids all exist in /proc; every pid plausible (nonzero, < 2**22)"),
    ):
        fits = [b for b in ENTRY_FORMATS if checks[b][basis]]
        if len(fits) == 1:
            result.update(entry_bytes=fits[0], basis=basis, why=f"only the {fits[0]}-byte decoding: {label}")
            return result
        if fits:
            result.update(basis=basis, why=f"both decodings pass ({label}): not decided")
            return result
    result["why"] = "neither decoding gives plausible pids"
    return result


def stats(values: Sequence[float]) -> dict[str, float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return {
        "n": len(finite),
        "mean": round(statistics.fmean(finite), 4),
        "min": round(min(finite), 4),
        "max": round(max(finite), 4),
        "stdev": round(statistics.pstdev(finite), 4),
        "range": round(max(finite) - min(finite), 4),
    }


def summarise_interval(interval_s: float, reps: Sequence[Mapping[str, Any]], wanted: int) -> dict[str, Any]:
    """One GPM interval's repeats. A repeat: ``measured_s`` (float or None), ``metrics`` ({name: (return,
    value)} or None) and ``error`` (an error dict or None). A repeat is fine when nothing raised, every metric
    returned success and every value is a percentage."""
    metrics: dict[str, dict[str, Any]] = {}
    ok = 0
    errors: Counter[str] = Counter()
    for rep in reps:
        fine = rep.get("error") is None and rep.get("metrics") is not None
        if rep.get("error") is not None:
            err = rep["error"]
            errors[
                f"{err['call']}: {err['text']}" + (f" ({err['code']})" if err.get("code") is not None else "")
            ] += 1
        for name, (ret, value) in (rep.get("metrics") or {}).items():
            m = metrics.setdefault(name, {"returns": Counter(), "values": [], "out_of_range": 0})
            m["returns"][str(ret)] += 1
            if ret != NVML_SUCCESS:
                fine = False
                continue
            m["values"].append(value)
            if not (math.isfinite(value) and 0.0 <= value <= PERCENT_MAX):
                m["out_of_range"] += 1
                fine = False
        ok += fine
    measured = [r["measured_s"] for r in reps if r.get("measured_s") is not None]
    return {
        "interval_s": interval_s,
        "repeats": len(reps),
        "wanted": wanted,
        "ok": ok,
        "measured_s": stats(measured),
        "metrics": {
            name: {
                "returns": dict(m["returns"]),
                "values": stats(m["values"]),
                "out_of_range": m["out_of_range"],
            }
            for name, m in metrics.items()
        },
        "errors": dict(errors),
    }


def smallest_fine_interval(intervals: Sequence[Mapping[str, Any]]) -> float | None:
    """The shortest interval from which every longer one had all its repeats done and fine."""
    best = None
    for item in sorted(intervals, key=lambda i: -i["interval_s"]):
        if item["repeats"] == 0 or item["repeats"] < item["wanted"] or item["ok"] < item["repeats"]:
            break
        best = item["interval_s"]
    return best


# --- NVML, recorded never raised -----------------------------------------------------------------------------


def nvml_error(call: str, error: BaseException) -> dict[str, Any]:
    code = getattr(error, "value", None)
    return {
        "call": call,
        "code": code if isinstance(code, int) else None,
        "text": str(error) or type(error).__name__,
        "type": type(error).__name__,
    }


def return_text(nvml: Any, code: int) -> str:
    if code == NVML_SUCCESS:
        return "Success"
    try:
        return str(nvml.NVMLError(code))
    except Exception:
        return f"NVML return {code}"


def present_symbols(nvml: Any) -> tuple[dict[str, bool | None], list[dict[str, Any]]]:
    found: dict[str, bool | None] = {}
    errors = []
    for name in SYMBOLS:
        try:
            nvml._nvmlGetFunctionPointer(name)
            found[name] = True
        except nvml.NVMLError_FunctionNotFound:
            found[name] = False
        except nvml.NVMLError as error:
            found[name] = None
            errors.append(nvml_error(f"_nvmlGetFunctionPointer({name})", error))
    return found, errors


def read_raw_processes(nvml: Any, handle: Any, function: str) -> dict[str, Any]:
    """Call ``function`` through its pointer, as nvidia-ml-py does, but into a raw zero-filled buffer with 32
    bytes per entry, and judge the layout from it."""
    out: dict[str, Any] = {"call": function}
    try:
        fn = nvml._nvmlGetFunctionPointer(function)
    except nvml.NVMLError as error:
        out["error"] = nvml_error(function, error)
        return out
    count = ctypes.c_uint(0)
    ret = int(fn(handle, ctypes.byref(count), None))
    out["size_return"] = ret
    out["size_count"] = count.value
    if ret == NVML_SUCCESS:
        out.update(count=0, verdict=None)
        return out
    if ret != NVML_ERROR_INSUFFICIENT_SIZE:
        out["error"] = {"call": function, "code": ret, "text": return_text(nvml, ret), "type": "return"}
        return out
    capacity = count.value * 2 + 5
    buffer = ctypes.create_string_buffer(capacity * RAW_ENTRY_BYTES)
    count.value = capacity
    ret = int(fn(handle, ctypes.byref(count), buffer))
    out["return"] = ret
    if ret != NVML_SUCCESS:
        out["error"] = {"call": function, "code": ret, "text": return_text(nvml, ret), "type": "return"}
        return out
    n = min(count.value, capacity)
    raw = buffer.raw
    out["count"] = n
    out["raw_hex"] = raw[: min(len(raw), max(n, 1) * RAW_ENTRY_BYTES, RAW_HEX_BYTES)].hex()
    out["verdict"] = judge_layout(raw, n)
    return out


class CudaChildren:
    """Short-lived processes that each hold a CUDA context on one GPU, so that NVML lists them. Each Python in
    ``pythons`` is tried in turn until one's children make a context; every child is ended by ``stop``."""

    def __init__(self, pythons: Sequence[str], env: Mapping[str, str], linger_s: float, n: int = CHILDREN):
        self.pythons = list(dict.fromkeys(p for p in pythons if p))
        self.env = dict(env)
        self.linger_s = linger_s
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []
        self.current: list[subprocess.Popen[bytes]] = []
        self.python: str | None = None
        self.ready: set[int] = set()
        self.last_line: dict[int, str] = {}
        self.failures: list[str] = []
        self.tried: list[str] = []
        self._readers: dict[int, threading.Thread] = {}
        self.gpu: int | None = None  # NVML's index of the GPU they use, for the report
        self._next = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._waiter: threading.Thread | None = None

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under it
            for line in proc.stdout:
                text = line.decode(errors="replace").strip()
                with self._lock:
                    if text == "ready":
                        self.ready.add(proc.pid)
                    elif text:
                        self.last_line[proc.pid] = text[:300]

    def start(self) -> bool:
        """Start ``n`` children with the next Python; False when none is left."""
        while self._next < len(self.pythons):
            python = self.pythons[self._next]
            self._next += 1
            self.tried.append(python)
            self.current = []
            try:
                for _ in range(self.n):
                    with self._lock:
                        if self._stopped:
                            return False
                        proc = subprocess.Popen(
                            [python, "-c", CHILD_CODE, f"{self.linger_s:.1f}"],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env=self.env,
                            start_new_session=True,
                        )
                        self.procs.append(proc)
                        self.current.append(proc)
                    reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
                    reader.start()
                    self._readers[proc.pid] = reader
            except OSError as error:
                self.failures.append(f"{python}: {error}")
                continue
            self.python = python
            return True
        self.python = None
        return False

    def ready_now(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self.current if p.pid in self.ready and p.poll() is None]

    def begin(self, deadline: float) -> None:
        """Start the children now and, in the background, the next Python's when the first's fail."""
        self._waiter = threading.Thread(target=self.wait, args=(deadline,), daemon=True)
        self._waiter.start()

    def wait_done(self, deadline: float) -> None:
        if self._waiter is None:
            self.wait(deadline)
        else:
            self._waiter.join(timeout=max(0.0, deadline - time.monotonic()))

    def wait(self, deadline: float) -> None:
        """Until ``n`` children hold a context, every Python failed, or ``deadline`` (time.monotonic)."""
        if not self.current and not self.start():
            return
        while time.monotonic() < deadline and not self._stopped:
            if len(self.ready_now()) >= self.n:
                return
            if all(p.poll() is not None for p in self.current):  # every child of this Python failed
                for proc in self.current:
                    self._readers[proc.pid].join(timeout=0.5)
                with self._lock:
                    why = sorted({self.last_line.get(p.pid, f"exit {p.returncode}") for p in self.current})
                self.failures.append(f"{self.python}: {'; '.join(why)}")
                if not self.start():
                    return
                continue
            time.sleep(0.05)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            reader = self._readers.get(proc.pid)
            if reader is not None:
                reader.join(timeout=1.0)
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()

    def report(self) -> dict[str, Any]:
        ready = self.ready_now()
        return {
            "gpu": self.gpu,
            "pythons_tried": self.tried,
            "python": self.python if ready else None,
            "started": len(self.procs),
            "ready": len(ready),
            "pids": ready,
            "failures": self.failures,
        }


def check_processes(
    nvml: Any,
    handles: Sequence[tuple[int, Any]],
    symbols: Mapping[str, bool | None],
    children: CudaChildren | None,
    wait_deadline: float,
) -> dict[str, Any]:
    rule = predicted_layout({name for name, ok in symbols.items() if ok})
    out: dict[str, Any] = {
        "symbols": dict(symbols),
        "rule": rule,
        "children": None,
        "gpus": [],
        "observed_entry_bytes": None,
        "agrees_with_rule": None,
    }
    if rule["function"] is None:
        out["note"] = rule["why"]
        return out
    if children is not None:
        children.wait_done(wait_deadline)
        out["children"] = children.report()
    for index, handle in handles:
        try:
            gpu = {"index": index, **read_raw_processes(nvml, handle, rule["function"])}
        except Exception as error:  # ctypes or the driver: recorded, never raised
            gpu = {"index": index, "error": nvml_error(rule["function"], error)}
        out["gpus"].append(gpu)
    decided = sorted(
        {g["verdict"]["entry_bytes"] for g in out["gpus"] if (g.get("verdict") or {}).get("entry_bytes")}
    )
    if len(decided) == 1:
        out["observed_entry_bytes"] = decided[0]
        out["agrees_with_rule"] = decided[0] == rule["entry_bytes"]
        where = [g["index"] for g in out["gpus"] if (g.get("verdict") or {}).get("entry_bytes")]
        basis = {
            BASIS_LABELS.get(g["verdict"]["basis"], g["verdict"]["basis"])
            for g in out["gpus"]
            if (g.get("verdict") or {}).get("entry_bytes")
        }
        out["note"] = (
            f"{decided[0]}-byte entries on GPU {', '.join(map(str, where))} ({', '.join(sorted(basis))}): "
            + ("agrees with the rule" if out["agrees_with_rule"] else f"the rule said {rule['entry_bytes']}")
        )
    elif len(decided) > 1:
        out["observed_entry_bytes"] = "inconsistent"
        out["note"] = "GPUs disagree on the entry size: " + ", ".join(
            f"GPU {g['index']} {g['verdict']['entry_bytes']}"
            for g in out["gpus"]
            if (g.get("verdict") or {}).get("entry_bytes")
        )
    elif not any(g.get("count") for g in out["gpus"]):
        out["note"] = "no processes on the GPU: layout not checked"
    else:
        out["note"] = (
            "no GPU listed two processes that only one layout reads as real pids: layout not decided"
        )
    return out


def field_value(item: Any) -> float | None:
    name = VALUE_FIELDS.get(int(item.valueType))
    return float(getattr(item.value, name)) if name else None


def check_power(
    nvml: Any, handles: Sequence[tuple[int, Any]], window_s: float, samples: int
) -> dict[str, Any]:
    sources = ("instant", "average", "usage")
    acc: dict[int, dict[str, dict[str, Any]]] = {
        index: {
            s: {
                "returns": Counter(),
                "watts": [],
                "timestamps": set(),
                "value_type": None,
                "raw_first": None,
                "errors": [],
            }
            for s in sources
        }
        for index, _ in handles
    }

    def error(slot: dict[str, Any], err: dict[str, Any]) -> None:
        slot["returns"][str(err["code"])] += 1
        if len(slot["errors"]) < 3 and err not in slot["errors"]:
            slot["errors"].append(err)

    period = window_s / max(1, samples)
    started = time.monotonic()
    done = 0
    for i in range(samples):
        time.sleep(max(0.0, started + i * period - time.monotonic()))
        done += 1
        for index, handle in handles:
            slots = acc[index]
            try:
                values = nvml.nvmlDeviceGetFieldValues(handle, [FI_POWER_INSTANT, FI_POWER_AVERAGE])
            except nvml.NVMLError as e:
                err = nvml_error("nvmlDeviceGetFieldValues", e)
                error(slots["instant"], err)
                error(slots["average"], err)
            else:
                for source, item in zip(("instant", "average"), values, strict=False):
                    slot = slots[source]
                    ret = int(item.nvmlReturn)
                    if ret != NVML_SUCCESS:
                        error(
                            slot,
                            {
                                "call": f"field {item.fieldId}",
                                "code": ret,
                                "text": return_text(nvml, ret),
                                "type": "return",
                            },
                        )
                        continue
                    slot["returns"][str(ret)] += 1
                    value = field_value(item)
                    slot["value_type"] = VALUE_TYPES.get(int(item.valueType), f"type {int(item.valueType)}")
                    if value is None:
                        continue
                    if slot["raw_first"] is None:
                        slot["raw_first"] = value
                    slot["watts"].append(value / 1000.0)
                    slot["timestamps"].add(int(item.timestamp))
            try:
                milliwatts = nvml.nvmlDeviceGetPowerUsage(handle)
            except nvml.NVMLError as e:
                error(slots["usage"], nvml_error("nvmlDeviceGetPowerUsage", e))
            else:
                slots["usage"]["returns"]["0"] += 1
                slots["usage"]["value_type"] = "unsigned int (mW)"
                if slots["usage"]["raw_first"] is None:
                    slots["usage"]["raw_first"] = milliwatts
                slots["usage"]["watts"].append(milliwatts / 1000.0)
    gpus = []
    for index, slots in acc.items():
        gpu: dict[str, Any] = {"index": index}
        for source, slot in slots.items():
            w = stats(slot["watts"])
            gpu[source] = {
                "supported": w is not None,
                "returns": dict(slot["returns"]),
                "return_text": {
                    code: return_text(nvml, int(code))
                    for code in slot["returns"]
                    if code.lstrip("-").isdigit()
                },
                "value_type": slot["value_type"],
                "raw_first": slot["raw_first"],
                "watts": w,
                "distinct_values": len(set(slot["watts"])),
                "errors": slot["errors"],
            }
            if source != "usage":
                gpu[source]["distinct_timestamps"] = len(slot["timestamps"])
        spreads = {s: (gpu[s]["watts"] or {}).get("stdev") for s in sources}
        gpu["instant_varies_more"] = (
            spreads["instant"] > spreads["average"]
            if spreads["instant"] is not None and spreads["average"] is not None
            else None
        )
        gpus.append(gpu)
    return {
        "fields": {"instant": FI_POWER_INSTANT, "average": FI_POWER_AVERAGE},
        "unit_assumed": "mW, as nvmlDeviceGetPowerUsage",
        "samples": done,
        "window_s": round(time.monotonic() - started, 3),
        "gpus": gpus,
    }


def gpm_metrics(nvml: Any, first: Any, second: Any) -> dict[str, tuple[int, float]]:
    request = nvml.c_nvmlGpmMetricsGet_t()
    request.version = GPM_METRICS_GET_VERSION
    request.numMetrics = len(GPM_METRICS)
    request.sample1 = first
    request.sample2 = second
    for i, metric_id in enumerate(GPM_METRICS):
        request.metrics[i].metricId = metric_id
    nvml.nvmlGpmMetricsGet(request)
    return {
        name: (int(request.metrics[i].nvmlReturn), float(request.metrics[i].value))
        for i, name in enumerate(GPM_METRICS.values())
    }


def check_gpm(
    nvml: Any,
    handles: Sequence[tuple[int, Any]],
    deadline: float,
    intervals: Sequence[float] = GPM_INTERVALS_S,
    repeats: int = GPM_REPEATS,
) -> dict[str, Any]:
    """Every supported GPU in the same loop (one thread): a sample on each, the interval, a sample on each."""
    gpus: dict[int, dict[str, Any]] = {}
    active: dict[int, Any] = {}
    for index, handle in handles:
        gpu: dict[str, Any] = {"index": index, "supported": False, "errors": [], "intervals": []}
        gpus[index] = gpu
        try:
            gpu["supported"] = bool(nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except nvml.NVMLError as error:
            gpu["errors"].append(nvml_error("nvmlGpmQueryDeviceSupport", error))
            continue
        if gpu["supported"]:
            active[index] = handle
    allocated: list[Any] = []
    pairs: dict[int, tuple[Any, Any]] = {}
    skipped: list[str] = []
    try:
        for index in list(active):
            try:
                first = nvml.nvmlGpmSampleAlloc()
                allocated.append(first)
                second = nvml.nvmlGpmSampleAlloc()
                allocated.append(second)
            except nvml.NVMLError as error:
                gpus[index]["errors"].append(nvml_error("nvmlGpmSampleAlloc", error))
                del active[index]
                continue
            pairs[index] = (first, second)
        reps: dict[int, dict[float, list[dict[str, Any]]]] = {i: {} for i in active}
        for interval in intervals if active else ():
            for _ in range(repeats):
                if time.monotonic() + interval + 0.05 > deadline:
                    skipped.append(f"{interval} s")
                    break
                taken: dict[int, float] = {}
                for index, handle in active.items():
                    rep: dict[str, Any] = {"measured_s": None, "metrics": None, "error": None}
                    reps[index].setdefault(interval, []).append(rep)
                    try:
                        nvml.nvmlGpmSampleGet(handle, pairs[index][0])
                        taken[index] = time.monotonic()
                    except nvml.NVMLError as error:
                        rep["error"] = nvml_error("nvmlGpmSampleGet", error)
                time.sleep(interval)
                ended: dict[int, float] = {}
                for index in taken:
                    try:
                        nvml.nvmlGpmSampleGet(active[index], pairs[index][1])
                        ended[index] = time.monotonic()
                    except nvml.NVMLError as error:
                        reps[index][interval][-1]["error"] = nvml_error("nvmlGpmSampleGet", error)
                for index, at in ended.items():
                    rep = reps[index][interval][-1]
                    rep["measured_s"] = at - taken[index]
                    try:
                        rep["metrics"] = gpm_metrics(nvml, *pairs[index])
                    except nvml.NVMLError as error:
                        rep["error"] = nvml_error("nvmlGpmMetricsGet", error)
        for index in active:
            done = [summarise_interval(i, reps[index].get(i, []), repeats) for i in intervals]
            gpus[index]["intervals"] = done
            gpus[index]["smallest_fine_interval_s"] = smallest_fine_interval(done)
    finally:
        for sample in allocated:
            with contextlib.suppress(Exception):
                nvml.nvmlGpmSampleFree(sample)
    return {
        "metrics": {str(k): v for k, v in GPM_METRICS.items()},
        "intervals_s": list(intervals),
        "repeats": repeats,
        "skipped_for_time": sorted(set(skipped), key=float_key),
        "gpus": list(gpus.values()),
    }


def float_key(text: str) -> float:
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return math.inf


def guarded(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A check that raised records the exception instead of ending the probe."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        return {"exception": f"{type(error).__name__}: {error}"}


def library_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:
        return None


def unavailable(reason: str, started: float) -> dict[str, Any]:
    return {
        "format": "infertop-nvml-probe",
        "version": 1,
        "available": False,
        "reason": reason,
        "nvidia_ml_py": library_version(),
        "wall_s": round(time.monotonic() - started, 3),
    }


def run_probe(
    nvml: Any,
    seconds: float,
    cuda_pythons: Sequence[str] = (),
    power_window_s: float = POWER_WINDOW_S,
    power_samples: int = POWER_SAMPLES,
    gpm_intervals: Sequence[float] = GPM_INTERVALS_S,
    gpm_repeats: int = GPM_REPEATS,
) -> dict[str, Any]:
    """Every check on every GPU ``nvml`` lists, within ``seconds``. ``cuda_pythons`` empty: no children."""
    started = time.monotonic()
    end = started + seconds
    try:
        nvml.nvmlInit()
    except Exception as error:
        return unavailable(f"nvmlInit failed: {nvml_error('nvmlInit', error)['text']}", started)
    children: CudaChildren | None = None
    try:
        doc: dict[str, Any] = {
            "format": "infertop-nvml-probe",
            "version": 1,
            "available": True,
            "nvidia_ml_py": library_version(),
            "seconds": seconds,
            "errors": [],
        }
        for key, call in (("driver", "nvmlSystemGetDriverVersion"), ("nvml", "nvmlSystemGetNVMLVersion")):
            try:
                doc[key] = str(getattr(nvml, call)())
            except Exception as error:
                doc[key] = None
                doc["errors"].append(nvml_error(call, error))
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as error:
            return {**unavailable(f"nvmlDeviceGetCount failed: {error}", started), "driver": doc["driver"]}
        if count == 0:
            return {**unavailable("NVML lists no GPU", started), "driver": doc["driver"]}
        handles: list[tuple[int, Any]] = []
        doc["gpus"] = []
        for index in range(count):
            gpu: dict[str, Any] = {"index": index}
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as error:
                gpu["error"] = nvml_error("nvmlDeviceGetHandleByIndex", error)
                doc["gpus"].append(gpu)
                continue
            handles.append((index, handle))
            for key, call in (("name", "nvmlDeviceGetName"), ("uuid", "nvmlDeviceGetUUID")):
                try:
                    value = getattr(nvml, call)(handle)
                    gpu[key] = value.decode() if isinstance(value, bytes) else str(value)
                except Exception as error:
                    gpu[key] = None
                    doc["errors"].append(nvml_error(call, error))
            doc["gpus"].append(gpu)
        symbols, errors = present_symbols(nvml)
        doc["errors"] += errors
        rule = predicted_layout({name for name, ok in symbols.items() if ok})
        if rule["function"] is not None and cuda_pythons and handles:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            uuid = doc["gpus"][handles[0][0]].get("uuid")
            if uuid:  # the children on NVML's first GPU, whatever CUDA's order
                env["CUDA_VISIBLE_DEVICES"] = uuid
            children = CudaChildren(cuda_pythons, env, linger_s=seconds + 10.0)
            children.gpu = handles[0][0]
            children.begin(end - LAYOUT_RESERVE_S)  # they start while power and GPM are measured
        try:
            window = min(power_window_s, max(0.2, 0.1 * seconds))
            doc["power"] = guarded(check_power, nvml, handles, window, power_samples)
            doc["gpm"] = guarded(check_gpm, nvml, handles, end - GPM_RESERVE_S, gpm_intervals, gpm_repeats)
            doc["processes"] = guarded(
                check_processes, nvml, handles, symbols, children, end - LAYOUT_RESERVE_S
            )
        finally:
            if children is not None:
                children.stop()
        doc["wall_s"] = round(time.monotonic() - started, 3)
        return doc
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


# --- Markdown ------------------------------------------------------------------------------------------------


def _short(symbol: str) -> str:
    return symbol.replace("nvmlDeviceGet", "")


def _watts(source: Mapping[str, Any] | None) -> str:
    if not source:
        return "n/a"
    w = source.get("watts")
    codes = ", ".join(
        f"{source.get('return_text', {}).get(c, c)} x{n}"
        for c, n in (source.get("returns") or {}).items()
        if c != "0"
    )
    if not w:
        return f"no value ({codes or 'none read'})"
    cell = f"{w['mean']:.1f} W ({w['min']:.1f}–{w['max']:.1f}), sd {w['stdev']:.2f}"
    if source.get("distinct_values") is not None:
        cell += f", {source['distinct_values']} distinct"
    if source.get("value_type"):
        cell += f", {source['value_type']}"
    return cell + (f"; {codes}" if codes else "")


def _gpm_cell(item: Mapping[str, Any]) -> str:
    if not item["repeats"]:
        return "not run (time)"
    cell = f"{item['ok']}/{item['repeats']}"
    values = []
    for name, m in item.get("metrics", {}).items():
        v = m.get("values")
        label = name.replace("_UTIL", "").replace("DRAM_BW", "DRAM")
        if v:
            values.append(f"{label} {v['min']:.1f}–{v['max']:.1f}")
        bad = {c: n for c, n in m.get("returns", {}).items() if c != "0"}
        if bad:
            values.append(f"{label} returns {bad}")
    if values:
        cell += ": " + ", ".join(values)
    if item.get("errors"):
        cell += "; " + "; ".join(f"{text} x{n}" for text, n in item["errors"].items())
    return cell.replace("|", "\\|")


def markdown(doc: Mapping[str, Any], heading: bool = True) -> str:
    """Short Markdown: one table per check (stdout, and the probe's section of gpu-check's summary.md)."""
    lines: list[str] = []
    if not doc.get("available"):
        return f"- NVML not available: {doc.get('reason')}; nothing probed\n"
    if heading:
        lines += ["## NVML probe (benchmarks/nvml_probe.py)", ""]
    lines.append(
        f"- driver {doc.get('driver')}, NVML {doc.get('nvml')}, nvidia-ml-py {doc.get('nvidia_ml_py')}; "
        f"{len(doc.get('gpus', []))} GPU(s); {doc.get('wall_s', 0):.1f} s of a {doc.get('seconds', 0):.0f} s budget"
    )
    for err in doc.get("errors", []):
        lines.append(f"- {err['call']}: {err['text']}")
    p = doc.get("processes") or {}
    lines += ["", "### Process-info entries", ""]
    if p.get("exception"):
        lines.append(f"- the check raised {p['exception']}")
    else:
        symbols = p.get("symbols", {})
        lines.append(
            "- symbols: "
            + ", ".join(
                f"{_short(s)} {'yes' if ok else 'no' if ok is False else '?'}" for s, ok in symbols.items()
            )
        )
        rule = p.get("rule") or {}
        lines.append(
            f"- the rule predicts {rule.get('entry_bytes') or 'n/a'}-byte entries ({rule.get('why')})"
        )
        ch = p.get("children")
        if ch:
            lines.append(
                f"- children with a CUDA context on GPU {ch.get('gpu')}: "
                f"{ch['ready']} of {ch['started']} ({ch.get('python') or 'none'})"
                + (f"; failed: {'; '.join(ch['failures'])}" if ch.get("failures") else "")
            )
        lines.append(f"- observed: {p.get('note')}")
        rows = [g for g in p.get("gpus", []) if g.get("count") or g.get("error")]
        if rows:
            lines += [
                "",
                "| GPU | call | entries | pids as 24 B | pids as 32 B | fits |",
                "|---:|---|---:|---|---|---|",
            ]
            for g in rows:
                v = g.get("verdict") or {}
                pids = v.get("pids", {})
                fits = (
                    f"{v['entry_bytes']} B ({BASIS_LABELS.get(v['basis'], v['basis'])})"
                    if v.get("entry_bytes")
                    else (v.get("why") or "")
                )
                if g.get("error"):
                    fits = f"{g['error']['text']} ({g['error'].get('code')})"
                lines.append(
                    f"| {g['index']} | {_short(g.get('call', ''))} | {g.get('count', 'n/a')} "
                    f"| {', '.join(map(str, pids.get('24', [])))} "
                    f"| {', '.join(map(str, pids.get('32', [])))} | {fits} |"
                )
    power = doc.get("power") or {}
    lines += ["", f"### Power ({power.get('samples', 0)} reads over {power.get('window_s', 0):.1f} s)", ""]
    if power.get("exception"):
        lines.append(f"- the check raised {power['exception']}")
    else:
        lines += [
            "| GPU | instant field (186) | average field (185) | nvmlDeviceGetPowerUsage | instant varies more |",
            "|---:|---|---|---|---|",
        ]
        for g in power.get("gpus", []):
            more = {True: "yes", False: "no", None: "n/a"}[g.get("instant_varies_more")]
            lines.append(
                f"| {g['index']} | {_watts(g.get('instant'))} | {_watts(g.get('average'))} "
                f"| {_watts(g.get('usage'))} | {more} |"
            )
    gpm = doc.get("gpm") or {}
    lines += [
        "",
        f"### GPM intervals ({gpm.get('repeats', 0)} tries each; fine = every metric Success, 0–100 %)",
        "",
    ]
    if gpm.get("exception"):
        lines.append(f"- the check raised {gpm['exception']}")
    else:
        intervals = gpm.get("intervals_s", [])
        lines += [
            "| GPU | GPM | " + " | ".join(f"{i} s" for i in intervals) + " | shortest fine |",
            "|---:|---|" + "---|" * len(intervals) + "---:|",
        ]
        for g in gpm.get("gpus", []):
            if not g.get("supported") or not g.get("intervals"):
                why = "; ".join(e["text"] for e in g.get("errors", [])) or (
                    "no" if not g.get("supported") else "not run"
                )
                lines.append(f"| {g['index']} | {why} |" + " |" * len(intervals) + " n/a |")
                continue
            cells = " | ".join(_gpm_cell(i) for i in g["intervals"])
            best = g.get("smallest_fine_interval_s")
            lines.append(f"| {g['index']} | yes | {cells} | {f'{best} s' if best is not None else 'none'} |")
        if gpm.get("skipped_for_time"):
            lines.append(f"\n- not all tries ran for lack of time: {', '.join(gpm['skipped_for_time'])}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="time budget for the whole probe (default 20)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    parser.add_argument(
        "--cuda-python",
        metavar="PYTHON",
        help="a Python with torch, for the children that hold CUDA contexts, tried after this one",
    )
    parser.add_argument("--no-children", action="store_true", help="start no processes on the GPU")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that the children are ended on the way out

    signal.signal(signal.SIGTERM, on_term)
    try:
        import pynvml
    except ImportError as error:
        doc = unavailable(f"no pynvml: {error}", started)
    else:
        pythons = (
            [] if args.no_children else [sys.executable, *([args.cuda_python] if args.cuda_python else [])]
        )
        doc = run_probe(pynvml, max(1.0, args.seconds), pythons)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if not doc.get("available"):
        print(f"nvml_probe: NVML not available ({doc.get('reason')}): nothing probed")
    else:
        print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
