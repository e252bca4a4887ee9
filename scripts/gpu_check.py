"""The prepared GPU run: every step of scripts/gpu-check.sh (which explains the plan and how to call it).

One Python process runs the steps in order, each under its own time limit and all under one overall budget, and
always ends with a summary, even when a step failed, timed out or was skipped for lack of time:

1. ``inventory``: driver, GPUs, GPM support; the GPU-marked tests; NVML call costs (monitor_cost.py --real);
   what only a real driver shows (nvml_probe.py: process-info entry size, instant power, GPM's shortest interval);
2. ``serve``: a Llama-3.2-1B-shaped dummy-weight model served by vLLM, with ``infertop record`` running from
   before its start to the end of the run;
3. ``bench``: ``infertop bench`` and vLLM's own ``bench serve`` (token-id prompts, as ours) on that server,
   interleaved (A B, then B A, ...) at two concurrencies, the higher one meant to show whether the client or
   vLLM's API front end is the limit; the monitor is captured to SVG (and PNG where cairosvg is installed)
   during the high-concurrency pair by ``scripts/screenshots.py --live``;
4. ``tune``: a short ``infertop tune`` (a launch budget of 2, short phases) after the bench server is stopped;
5. the summary: ``summary.json`` and ``summary.md``, the recording, the monitor capture and one
   ``artifacts.tar.gz`` with every log and result file (at most 8 files in the output folder).

``--rehearse`` runs the same steps on a machine without a GPU: the CPU build of vLLM (``.venv-vllm``) on the tiny
test model, smaller loads, the tune on the CPU build. Nothing in it is a GPU figure, and the summary says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MAX_OUT_FILES = 8  # the device tool brings back at most 8 files ...
MAX_FILE_BYTES = 15 * 2**20  # ... of at most 16 MiB each (a margin kept)
SUMMARY_RESERVE_S = 20.0  # kept back from the last step for stopping everything and packing
PROBE_S = 20.0  # benchmarks/nvml_probe.py's own budget (--seconds), with CUDA children on GPU 0
PROBE_MIN_S = 8.0  # with less of the inventory step left the probe is not run
GRACE_S = 20.0  # after SIGINT, how long a step's process may take to write its results before SIGTERM


# --- what each mode runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """Everything that differs between the real GPU run and its rehearsal on the CPU build."""

    name: str  # "gpu" | "rehearse"
    vllm_python: str
    vllm_env: Mapping[str, str]
    model_preset: str  # tuner.serving.tinymodel preset
    server_args: tuple[str, ...]  # every vLLM launch (bench server and tune candidates)
    input_len: int
    output_len: int
    concurrencies: tuple[int, ...]  # bench pairs; the last is the high one
    rounds: int  # requests per bench run = rounds x concurrency
    tune_args: tuple[str, ...]
    budget_s: float  # the whole run
    limits_s: Mapping[str, float]  # per step


def gpu_mode(budget_s: float) -> Mode:
    return Mode(
        name="gpu",
        vllm_python=os.environ.get("GPU_CHECK_VLLM_PYTHON", "python3"),
        vllm_env={"HF_HUB_OFFLINE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"},
        model_preset="llama-3.2-1b",
        server_args=("--load-format", "dummy", "--max-model-len", "4096"),
        # REFERENCE.md measured this shape on an H100 at 128 in / 512 out: c=64 15,570 tok/s; c=256 10,965 from
        # a one-process Python client against 16,426 from vLLM's bench serve (the client was the limit there).
        input_len=128,
        output_len=512,
        concurrencies=(32, 256),
        rounds=2,
        tune_args=("--slo", "mlperf-llama3.1-8b-interactive", "--max-concurrency", "256"),
        budget_s=budget_s,
        # inventory: 75 s, and 25 more for nvml_probe.py (its 20 s budget, start and stop)
        limits_s={"inventory": 100, "serve": 150, "bench": 130, "tune": 1e9},
    )


def rehearse_mode(budget_s: float) -> Mode:
    return Mode(
        name="rehearse",
        vllm_python=os.environ.get("GPU_CHECK_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python")),
        vllm_env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        model_preset="tiny",
        server_args=("--load-format", "dummy", "--enforce-eager", "--max-model-len", "512"),
        input_len=64,
        output_len=32,
        concurrencies=(2, 8),
        rounds=4,
        tune_args=("--cpu", "--slo", "ttft=1,tps=10", "--input-len", "64", "--output-len", "32"),
        budget_s=budget_s,
        limits_s={"inventory": 120, "serve": 240, "bench": 240, "tune": 1e9},
    )


# --- steps ---------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """How one step went. ``status``: ok, failed, timeout or skipped."""

    name: str
    status: str = "skipped"
    note: str = ""
    wall_s: float = 0.0
    limit_s: float = 0.0


@dataclass
class Run:
    """The state of one gpu-check run: where it writes, what it started, what it found."""

    mode: Mode
    out: Path
    work: Path
    started: float = field(default_factory=time.monotonic)
    steps: list[StepRecord] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model_dir: Path | None = None
    server: Any = None  # tuner.serving.launcher.VllmServer while the bench server runs
    server_startup_s: float | None = None
    recorder: subprocess.Popen[bytes] | None = None

    def left_s(self) -> float:
        return self.mode.budget_s - (time.monotonic() - self.started)

    @property
    def python(self) -> str:
        return sys.executable

    def infertop(self, *args: str) -> list[str]:
        return [self.python, "-m", "tui.cli", *args]


class StepFailed(Exception):
    """A step could not finish; the message is one line for the summary."""


@dataclass(frozen=True)
class Finished:
    rc: int | None
    timed_out: bool
    wall_s: float
    stdout: str


def run_command(
    argv: Sequence[str],
    *,
    timeout_s: float,
    log: Path,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
) -> Finished:
    """Run ``argv`` in its own process group. At the time limit: SIGINT (the infertop commands then save what
    they measured), SIGTERM after ``GRACE_S``, SIGKILL after 5 s more. Output goes to ``log``."""
    started = time.monotonic()
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else log_file,
            stderr=log_file,
            env={**os.environ, **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )
        chunks: list[bytes] = []
        reader = None
        if capture:
            assert process.stdout is not None
            stream = process.stdout
            reader = threading.Thread(target=lambda: chunks.append(stream.read()), daemon=True)
            reader.start()
        timed_out = False
        try:
            process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(process)
        finally:
            if process.poll() is None:
                stop_group(process)
        if reader is not None:
            reader.join(timeout=5.0)
    return Finished(process.returncode, timed_out, time.monotonic() - started, b"".join(chunks).decode())


def stop_group(process: subprocess.Popen[bytes], grace_s: float = GRACE_S) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group, waiting between each."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)


def step_inventory(run: Run, limit_s: float) -> str:
    from tuner.telemetry.model import GpuState, to_jsonable
    from tuner.telemetry.nvml import NvmlBackend

    backend = NvmlBackend()
    info = backend.open()
    backend.close()
    run.figures["inventory"] = {
        "state": info.state.value,
        "message": info.message,
        "driver": info.driver_version,
        "cuda_driver": info.cuda_driver_version,
        "nvml": info.nvml_version,
        "gpus": to_jsonable(list(info.gpus)),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
    }
    deadline = time.monotonic() + limit_s
    tests = run_command(
        [run.python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"],
        timeout_s=min(60.0, deadline - time.monotonic()),
        log=run.work / "pytest-gpu.log",
        capture=True,
    )
    (run.work / "pytest-gpu.log").open("a").write(tests.stdout)
    lines = [line for line in tests.stdout.splitlines() if line.strip()]
    run.figures["gpu_tests"] = {"rc": tests.rc, "result": lines[-1] if lines else "no output"}
    cost = run_command(
        [run.python, "benchmarks/monitor_cost.py", "--real", "--ticks", "400", "--frames", "30",
         "--json", str(run.work / "monitor-cost.json")],
        timeout_s=max(1.0, deadline - time.monotonic()),
        log=run.work / "monitor-cost.log",
        capture=True,
    )  # fmt: skip
    (run.work / "monitor-cost.md").write_text(cost.stdout)
    with contextlib.suppress(OSError, ValueError):
        run.figures["monitor_cost"] = json.loads((run.work / "monitor-cost.json").read_text())
    probe = run_probe(run, deadline)
    gpus = ", ".join(g.name for g in info.gpus) or "no GPU"
    problems = []
    if tests.rc not in (0, 5):  # 5: no test collected
        problems.append(f"GPU tests: {run.figures['gpu_tests']['result']}")
    if cost.rc != 0:
        problems.append(
            "monitor_cost.py failed (log in artifacts)" + (" (time limit)" if cost.timed_out else "")
        )
    if probe is not None and probe.rc != 0:
        problems.append(
            "nvml_probe.py failed (log in artifacts)" + (" (time limit)" if probe.timed_out else "")
        )
    if problems:
        raise StepFailed("; ".join(problems))
    state = "" if info.state is GpuState.OK else f" ({info.message})"
    return f"{gpus}{state}; GPU tests: {run.figures['gpu_tests']['result']}"


def run_probe(run: Run, deadline: float) -> Finished | None:
    """benchmarks/nvml_probe.py within what is left of the inventory step: its JSON becomes the
    ``nvml_probe`` figures, its Markdown nvml-probe.md. It starts two CUDA processes on GPU 0 (torch from this
    Python, else from the vLLM Python) and ends them itself; without NVML it says so and exits 0."""
    left = deadline - time.monotonic()
    if left < PROBE_MIN_S:
        run.figures["nvml_probe"] = {"skipped": f"{left:.0f} s of the inventory step left"}
        return None
    seconds = min(PROBE_S, left - 5.0)
    out = run.work / "nvml-probe.json"
    probe = run_command(
        [run.python, "benchmarks/nvml_probe.py", "--seconds", f"{seconds:.0f}", "--json", str(out),
         "--cuda-python", run.mode.vllm_python],
        timeout_s=min(seconds + 15.0, left),
        log=run.work / "nvml-probe.log",
        capture=True,
    )  # fmt: skip
    (run.work / "nvml-probe.md").write_text(probe.stdout)
    try:
        run.figures["nvml_probe"] = json.loads(out.read_text())
    except (OSError, ValueError):
        run.figures["nvml_probe"] = {"skipped": f"no JSON (exit {probe.rc}, log in artifacts)"}
    return probe


def step_serve(run: Run, limit_s: float) -> str:
    from tuner.serving.launcher import LaunchError, ServerSpec, VllmServer, api_server_command, free_port
    from tuner.serving.tinymodel import PRESETS, write_tiny_model

    run.model_dir = write_tiny_model(
        run.work / f"model-{run.mode.model_preset}", **PRESETS[run.mode.model_preset]
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gpu = ", ".join(g.get("name", "?") for g in run.figures.get("inventory", {}).get("gpus", [])) or "no GPU"
    label = f"gpu-check {run.mode.name} on {gpu}, {dt.date.today().isoformat()}: vLLM {run.mode.model_preset}"
    run.recorder = subprocess.Popen(
        run.infertop("record", str(run.work / "recording.ndjson.gz"), "--vllm", url, "--no-discover",
                     "--label", label, "--force"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(run.work / "record.log", "wb"),  # noqa: SIM115 (the child holds it)
        cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    spec = ServerSpec(
        model=str(run.model_dir),
        args=run.mode.server_args,
        command=api_server_command(run.mode.vllm_python),
        port=port,
        env=dict(run.mode.vllm_env),
        startup_timeout_s=max(10.0, limit_s),
        log_path=run.work / "vllm-bench-server.log",
    )
    run.server = VllmServer(spec)
    try:
        run.server.start()
    except LaunchError as error:
        run.server = None
        raise StepFailed(error.summary) from None
    run.server_startup_s = run.server.startup_s
    run.figures["serve"] = {"model": run.mode.model_preset, "startup_s": run.server.startup_s, "url": url}
    return f"vLLM ready in {run.server.startup_s:.0f} s ({run.mode.model_preset}, {' '.join(run.mode.server_args)})"


def step_bench(run: Run, limit_s: float) -> str:
    import fidelity

    if run.server is None or run.model_dir is None:
        raise StepFailed("no server (the serve step failed)")
    deadline = time.monotonic() + limit_s
    url = run.server.url
    vocab = json.loads((run.model_dir / "config.json").read_text())["vocab_size"]
    rows: list[dict[str, Any]] = []
    capture: subprocess.Popen[bytes] | None = None
    exporter: tuple[subprocess.Popen[bytes], int] | None = None
    order = ("infertop", "vllm-bench")
    seed = 100
    for i, c in enumerate(run.mode.concurrencies):
        if c == run.mode.concurrencies[-1]:  # the high load: capture the monitor while it runs
            capture = subprocess.Popen(
                [run.python, "scripts/screenshots.py", "--live", str(run.work / "monitor"), "--vllm", url,
                 "--wait", "8"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(run.work / "monitor-capture.log", "wb"),  # noqa: SIM115
                cwd=REPO, start_new_session=True,
            )  # fmt: skip
            exporter = start_exporter(run, url)
        num = run.mode.rounds * c
        setting = fidelity.Setting(run.mode.input_len, run.mode.output_len, c)
        for client in order if i % 2 == 0 else tuple(reversed(order)):
            left = deadline - time.monotonic()
            if left < 5:
                run.notes.append(f"bench: {client} at c={c} skipped (step time limit)")
                continue
            seed += 1
            before = _scrape(url)
            if client == "infertop":
                row = _infertop_bench(run, url, c, num, vocab, seed, left)
            else:
                row = _vllm_bench(run, url, setting, num, seed, left)
            row["server_generation_tokens"] = _delta(before, _scrape(url), "vllm:generation_tokens_total")
            rows.append(row)
    if exporter is not None:
        read_exporter(run, *exporter)
    if capture is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            capture.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        stop_group(capture, grace_s=2.0)
    run.figures["bench"] = rows
    failed = [r for r in rows if r.get("error")]
    if not rows:
        raise StepFailed("no bench run finished")
    if failed:
        raise StepFailed("; ".join(f"{r['client']} c={r['concurrency']}: {r['error']}" for r in failed))
    return f"{len(rows)} runs at c={','.join(map(str, run.mode.concurrencies))}"


def start_exporter(run: Run, vllm_url: str) -> tuple[subprocess.Popen[bytes], int]:
    """`infertop exporter` on the real driver, beside the bench's high load (read by :func:`read_exporter`)."""
    from tuner.serving.launcher import free_port

    port = free_port()
    process = subprocess.Popen(
        run.infertop("exporter", "--listen", f"127.0.0.1:{port}", "--vllm", vllm_url),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(run.work / "exporter.log", "wb"),  # noqa: SIM115
        cwd=REPO, start_new_session=True,
    )  # fmt: skip
    return process, port


def read_exporter(run: Run, process: subprocess.Popen[bytes], port: int) -> None:
    """Its /metrics (OpenMetrics) after the high load, kept in the archive; a few figures in the summary."""
    import httpx
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    try:
        response = httpx.get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            timeout=10.0,
        )
        response.raise_for_status()
        (run.work / "exporter-metrics.txt").write_text(response.text)
        figures: dict[str, Any] = {"bytes": len(response.content)}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in ("infertop_engine_energy_joules_per_token", "infertop_gpu_telemetry_up"):
                    figures[sample.name] = sample.value
                if sample.name == "infertop_gpu_dram_bandwidth_ratio":
                    figures.setdefault("dram_bw_ratio", []).append(sample.value)
        run.figures["exporter"] = figures
    except Exception as exc:  # a summary line, never the end of the run
        run.notes.append(f"exporter: not read ({type(exc).__name__}: {exc})")
    finally:
        stop_group(process, grace_s=2.0)


def _scrape(url: str) -> Any:
    import httpx

    from tuner.telemetry.vllm_metrics import parse_metrics

    with contextlib.suppress(httpx.HTTPError):
        return parse_metrics(httpx.get(f"{url}/metrics", timeout=5.0).text)
    return None


def _delta(before: Any, after: Any, name: str) -> float | None:
    if before is None or after is None or name not in after.values:
        return None
    return float(after.values[name] - before.values.get(name, 0.0))


def _infertop_bench(
    run: Run, url: str, c: int, num: int, vocab: int, seed: int, left_s: float
) -> dict[str, Any]:
    out = run.work / f"bench-infertop-c{c}.json"
    done = run_command(
        run.infertop("bench", "--endpoint", url, "--concurrency", str(c), "--num-requests", str(num),
                     "--warmup", str(min(c, 32)), "--input-len", str(run.mode.input_len),
                     "--output-len", str(run.mode.output_len), "--vocab-size", str(vocab), "--seed", str(seed),
                     "--out", str(out), "--force"),
        timeout_s=left_s, log=run.work / "bench-infertop.log",
    )  # fmt: skip
    row: dict[str, Any] = {
        "client": "infertop bench",
        "concurrency": c,
        "requests": num,
        "wall_s": done.wall_s,
    }
    try:
        phase = json.loads(out.read_text())["phases"][0]
    except (OSError, ValueError, KeyError, IndexError):
        row["error"] = f"no result (exit {done.rc}{', time limit' if done.timed_out else ''})"
        return row
    s, e = phase["stats"], phase["evidence"]
    row.update(
        ok=s["requests_ok"], failed=s["requests_failed"], output_tok_s=s["output_tokens_per_s"],
        ttft_p50_ms=_ms(s["ttft_p50_s"]), ttft_p95_ms=_ms(s["ttft_p95_s"]), tpot_p50_ms=_ms(s["tpot_p50_s"]),
        bound=phase["bound"]["kind"], bound_reason=phase["bound"]["reason"],
        dram_bw_util_pct=e.get("dram_bw_util_pct_mean"), sm_active_pct=e.get("sm_active_pct_mean"),
        mem_busy_pct=e.get("mem_busy_pct_mean"), power_w=e.get("power_w_mean"),
        client_cpu_pct=e.get("client_cpu_pct"), server_cpu_pct=e.get("server_cpu_pct"),
        tokens_check=phase["tokens"]["note"],
    )  # fmt: skip
    if s["requests_failed"]:
        row["error"] = f"{s['requests_failed']} requests failed"
    return row


def _vllm_bench(run: Run, url: str, setting: Any, num: int, seed: int, left_s: float) -> dict[str, Any]:
    import fidelity

    row: dict[str, Any] = {"client": "vllm bench serve", "concurrency": setting.concurrency, "requests": num}
    assert run.model_dir is not None
    workdir = run.work / "bench-serve"
    workdir.mkdir(exist_ok=True)
    argv = fidelity.bench_serve_argv(fidelity.BENCH_IDS, url, run.model_dir, setting, num, seed, workdir)
    started = time.monotonic()
    try:
        r = fidelity.bench_serve(Path(run.mode.vllm_python), argv, workdir, left_s)
    except fidelity.BenchmarkError as error:
        row["error"] = str(error)
        return row
    row.update(
        wall_s=time.monotonic() - started, ok=int(r["completed"]), failed=int(r.get("failed", 0) or 0),
        output_tok_s=float(r["output_throughput"]), ttft_p50_ms=r.get("median_ttft_ms"),
        ttft_p95_ms=None, tpot_p50_ms=r.get("median_tpot_ms"),
    )  # fmt: skip
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def step_tune(run: Run, limit_s: float) -> str:
    if run.model_dir is None:
        raise StepFailed("no model directory (the serve step failed)")
    if run.server is not None:  # its GPU memory is the candidates' now
        run.server.stop()
        run.server = None
    args = list(run.mode.tune_args)
    extra = list(run.mode.server_args)
    # Three launches (two candidates and the proof) at the bench server's start-up time, plus phases. Where that
    # does not fit, --enforce-eager (no torch.compile, no CUDA graphs) makes starts faster; said in the summary.
    startup = run.server_startup_s or 60.0
    if run.mode.name == "gpu" and "--enforce-eager" not in extra and 3 * startup + 120 > limit_s:
        extra.append("--enforce-eager")
        run.notes.append(
            f"tune: --enforce-eager added: 3 launches x {startup:.0f} s start-up + phases exceed the "
            f"{limit_s:.0f} s left; eager mode understates small-model speed"
        )
    out = run.work / "tune"
    done = run_command(
        run.infertop("tune", str(run.model_dir), "--headless", "--budget", "2", "--phase-seconds", "3",
                     "--production-seconds", "10", "--out", str(out), "--store", str(run.work / "tune.sqlite"),
                     "--force", "--vllm-python", run.mode.vllm_python, *args, "--", *extra),
        timeout_s=limit_s, log=run.work / "tune.log", env=dict(run.mode.vllm_env),
    )  # fmt: skip
    report_path = out / "report.json"
    run.figures["tune"] = {"rc": done.rc, "wall_s": done.wall_s, "timed_out": done.timed_out, "extra": extra}
    if not report_path.exists():
        raise StepFailed(f"no tune report (exit {done.rc}{', time limit' if done.timed_out else ''})")
    report = json.loads(report_path.read_text())
    run.figures["tune"].update(tune_figures(report))
    last = tail_line(run.work / "tune.log", ("PROVEN", "NO CONFIGURATION", "UNVERIFIED", "INTERRUPTED"))
    if done.timed_out:
        raise StepFailed(f"stopped at the time limit; report of what was measured kept; last line: {last}")
    return last


def tune_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a tune report worth a line in the summary: the verdict and each trial's capacity."""
    trials = [
        {
            "label": t.get("label"),
            "status": t.get("status"),
            "reason": t.get("reason"),
            "capacity": (t.get("capacity") or {}).get("describe"),
        }
        for t in report.get("trials", [])
    ]
    verdict = report.get("verdict") or {}
    keep = ("headline", "exit_code", "winner", "defaults", "launches", "interrupted", "ties", "objective")
    return {
        "trials": trials,
        "verdict": {
            k: verdict.get(k) for k in ("status", "headline", "operating_point", "capacity", "exit_code")
        },
        **{k: report.get(k) for k in keep if k in report},
    }


def tail_line(path: Path, words: Sequence[str] = ()) -> str:
    """The last line of a log that holds one of ``words`` (any line when none is given)."""
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        wanted = [line for line in lines if any(w in line for w in words)] if words else lines
        if wanted or lines:
            return (wanted or lines)[-1][:300]
    return ""


STEPS: dict[str, Callable[[Run, float], str]] = {
    "inventory": step_inventory,
    "serve": step_serve,
    "bench": step_bench,
    "tune": step_tune,
}


def run_steps(run: Run, wanted: Sequence[str]) -> None:
    for name, fn in STEPS.items():
        record = StepRecord(name)
        run.steps.append(record)
        if name not in wanted:
            record.note = "not asked for (--steps)"
            continue
        left = run.left_s() - SUMMARY_RESERVE_S
        record.limit_s = round(min(run.mode.limits_s[name], left), 1)
        if record.limit_s < 10:
            record.note = f"no time left ({left:.0f} s of the {run.mode.budget_s:.0f} s budget)"
            continue
        started = time.monotonic()
        print(f"gpu-check: {name} (limit {record.limit_s:.0f} s)", file=sys.stderr, flush=True)
        try:
            record.note = fn(run, record.limit_s)
            record.status = "ok"
        except StepFailed as error:
            record.status, record.note = "failed", str(error)
        except Exception as error:
            record.status, record.note = "failed", f"{type(error).__name__}: {error}"
        record.wall_s = round(time.monotonic() - started, 1)
        if record.status == "ok" and record.wall_s > record.limit_s:
            record.status = "timeout"
        print(f"gpu-check: {name} {record.status} in {record.wall_s:.0f} s: {record.note}", file=sys.stderr)


def stop_everything(run: Run) -> None:
    if run.server is not None:
        with contextlib.suppress(Exception):
            run.server.stop()
        run.server = None
    if run.recorder is not None:
        stop_group(run.recorder, grace_s=10.0)
        run.recorder = None


# --- the summary ---------------------------------------------------------------------------------------------


def summary_document(run: Run) -> dict[str, Any]:
    inventory = run.figures.get("inventory", {})
    gpus = [g.get("name", "?") for g in inventory.get("gpus", [])]
    return {
        "format": "infertop-gpu-check",
        "version": 1,
        "mode": run.mode.name,
        "simulated": run.mode.name != "gpu",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": ", ".join(gpus) if gpus else None,
        "budget_s": run.mode.budget_s,
        "wall_s": round(time.monotonic() - run.started, 1),
        "steps": [asdict(s) for s in run.steps],
        "skipped": [s.name for s in run.steps if s.status == "skipped"],
        "notes": run.notes,
        "figures": run.figures,
    }


def _cell(value: Any, fmt: str = "{:,.0f}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def summary_markdown(doc: Mapping[str, Any]) -> str:
    """The summary for people (and for BENCHMARKS.md): every figure, the GPU named, what was skipped."""
    f = doc.get("figures", {})
    where = doc["gpu"] or "no GPU"
    title = "GPU check" if doc["mode"] == "gpu" else "GPU check, REHEARSAL on the CPU build (no GPU figures)"
    lines = [f"# infertop {title}", "", f"- machine: {where}; {doc['date']}; {doc['wall_s']:.0f} s of a "
             f"{doc['budget_s']:.0f} s budget"]  # fmt: skip
    inv = f.get("inventory")
    if inv:
        lines.append(
            f"- driver {inv.get('driver') or 'n/a'} (CUDA {inv.get('cuda_driver') or 'n/a'}), NVML "
            f"{inv.get('nvml') or 'n/a'}; {inv.get('host', {}).get('cpus')} CPUs; NVML state: {inv.get('state')}"
            + (f" ({inv['message']})" if inv.get("message") else "")
        )
        for g in inv.get("gpus", []):
            lines.append(
                f"- GPU {g.get('index')}: {g.get('name')}, GPM {'yes' if g.get('gpm_supported') else 'no'}, "
                f"peak DRAM {_cell(g.get('peak_dram_bw_gbps'))} GB/s ({g.get('peak_dram_bw_source')})"
            )
    skipped = doc.get("skipped") or []
    lines.append(f"- skipped: {', '.join(skipped) if skipped else 'nothing'}")
    lines += ["", "## Steps", "", "| step | status | time | limit | note |", "|---|---|---:|---:|---|"]
    for s in doc["steps"]:
        note = str(s["note"]).replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.0f} s | {s['limit_s']:.0f} s | {note} |")
    for note in doc.get("notes", []):
        lines.append(f"\n- {note}")
    cost = f.get("monitor_cost")
    if cost:
        lines += ["", "## Monitor cost (benchmarks/monitor_cost.py --real)", ""]
        lines.append(
            f"- sampling tick: own {_cell(cost.get('own_ms'), '{:.3f}')} ms + NVML "
            f"{_cell(cost.get('nvml_ms'), '{:.3f}')} ms per tick for {cost.get('gpus')} GPU(s): "
            f"{_cell(cost.get('sampling_pct_core'), '{:.2f}')} % of a core at 4 Hz; with redraws "
            f"{_cell(cost.get('total_pct_core'), '{:.2f}')} % (nvitop's TUI: 1.07 %)"
        )
        for name, c in sorted((cost.get("nvml_calls") or {}).items(), key=lambda kv: -kv[1]["ms_per_call"]):
            lines.append(f"  - `{name}`: {c['ms_per_call']:.3f} ms per call, {c['calls']} calls")
    probe = f.get("nvml_probe")
    if probe:
        lines += ["", "## NVML probe (benchmarks/nvml_probe.py)", "", probe_markdown(probe)]
    bench = f.get("bench")
    if bench:
        lines += [
            "", "## Bench: infertop against vLLM's bench serve, interleaved",
            "",
            "| client | c | requests ok | out tok/s | TTFT p50 ms | TPOT p50 ms | bound | DRAM % | SM % "
            "| client CPU % |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]  # fmt: skip
        for r in bench:
            lines.append(
                f"| {r['client']} | {r['concurrency']} | {_cell(r.get('ok'))} | {_cell(r.get('output_tok_s'))} "
                f"| {_cell(r.get('ttft_p50_ms'))} | {_cell(r.get('tpot_p50_ms'), '{:.1f}')} "
                f"| {r.get('bound', '')} | {_cell(r.get('dram_bw_util_pct'))} | {_cell(r.get('sm_active_pct'))} "
                f"| {_cell(r.get('client_cpu_pct'))} |" + (f" {r['error']}" if r.get("error") else "")
            )
        for c, ratio in bench_ratios(bench).items():
            lines.append(f"\n- c={c}: infertop bench / vLLM bench serve output tok/s = {ratio:.3f}")
    exporter = f.get("exporter")
    if exporter:
        lines += ["", "## Exporter on the real driver (after the high load; exporter-metrics.txt)", ""]
        bw = ", ".join(f"{v:.1%}" for v in exporter.get("dram_bw_ratio", ())) or "none"
        lines.append(
            f"- {exporter['bytes']:,} bytes; telemetry up {exporter.get('infertop_gpu_telemetry_up')}; "
            f"GPM DRAM bandwidth {bw}; J/token {exporter.get('infertop_engine_energy_joules_per_token', 'n/a')}"
        )
    tune = f.get("tune")
    if tune:
        lines += ["", "## Tune", ""]
        verdict = tune.get("verdict") or {}
        lines.append(f"- verdict: {tune.get('headline') or verdict.get('headline') or 'none'}")
        winner = tune.get("winner") or "none"
        lines.append(f"- winner: {winner}; launches {tune.get('launches')}; exit {tune.get('rc')}")
        for t in tune.get("trials", []):
            what = (
                f"capacity {t['capacity']}"
                if t.get("capacity") and t["status"] == "feasible"
                else t["reason"]
            )
            lines.append(f"  - {t['label']}: {t['status']}, {what}")
        for tie in tune.get("ties") or []:
            lines.append(f"- {tie}")
    return "\n".join(lines) + "\n"


def probe_markdown(probe: Mapping[str, Any]) -> str:
    """The probe's section: its own tables (nvml_probe.markdown), or why there are none."""
    if probe.get("skipped"):
        return f"- not run: {probe['skipped']}"
    try:
        import nvml_probe

        return nvml_probe.markdown(probe, heading=False).rstrip("\n")
    except Exception as error:  # the summary is always written
        return f"- the probe's figures could not be rendered ({type(error).__name__}: {error})"


def bench_ratios(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Per concurrency: our output tok/s over vLLM bench serve's (both must have run)."""
    out: dict[int, float] = {}
    for c in sorted({r["concurrency"] for r in rows}):
        ours = [r["output_tok_s"] for r in rows if r["concurrency"] == c and r["client"] == "infertop bench"
                and r.get("output_tok_s")]  # fmt: skip
        theirs = [r["output_tok_s"] for r in rows if r["concurrency"] == c and r["client"] != "infertop bench"
                  and r.get("output_tok_s")]  # fmt: skip
        if ours and theirs:
            out[c] = (sum(ours) / len(ours)) / (sum(theirs) / len(theirs))
    return out


def pack(run: Run, doc: Mapping[str, Any]) -> list[Path]:
    """The output folder: summary.json, summary.md, the recording, the monitor capture, artifacts.tar.gz."""
    run.out.mkdir(parents=True, exist_ok=True)
    written = [run.out / "summary.json", run.out / "summary.md"]
    written[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    written[1].write_text(summary_markdown(doc))
    singles = [run.work / "recording.ndjson.gz", *sorted((run.work / "monitor").glob("monitor.*"))]
    for path in singles:
        if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES and len(written) < MAX_OUT_FILES - 1:
            written.append(Path(shutil.copy2(path, run.out / path.name)))
    archive = run.out / "artifacts.tar.gz"
    members = sorted(p for p in run.work.rglob("*") if p.is_file() and p not in singles)
    members = [
        p for p in members if "model-" not in p.parts[-2]
    ]  # the model directory is made again anywhere
    with tarfile.open(archive, "w:gz") as tar:
        for path in members:
            if path.stat().st_size <= MAX_FILE_BYTES // 2:
                tar.add(path, arcname=str(path.relative_to(run.work)))
    if archive.stat().st_size > MAX_FILE_BYTES:
        archive.unlink()
        run.notes.append("artifacts.tar.gz was too large to bring back and was dropped")
    else:
        written.append(archive)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="the same steps on the CPU build of vLLM")
    parser.add_argument("--out", type=Path, help="output folder (default $OUT, else gpu-check-out/)")
    parser.add_argument("--budget", type=float, metavar="S", help="seconds for the whole run")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} (default all)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or REPO / "gpu-check-out")
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s): {', '.join(unknown)}")
    mode = rehearse_mode(args.budget or 840.0) if args.rehearse else gpu_mode(args.budget or 500.0)
    work = Path(tempfile.mkdtemp(prefix="infertop-gpu-check-"))
    run = Run(mode, out, work)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        run_steps(run, wanted)
    except KeyboardInterrupt:
        run.notes.append("interrupted: the steps after this point did not run")
    finally:
        stop_everything(run)
        doc = summary_document(run)
        files = pack(run, doc)
    print(summary_markdown(doc))
    for path in files:
        print(f"gpu-check: wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    failed = [s for s in run.steps if s.status in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
