"""The node as the unit, on a scripted 8-GPU H100 box (NVML scripted, a stand-in vLLM per trial: CI has no GPU).

``infertop tune --simulate h100x8 --vllm-cmd "python tests/fakes/fake_vllm.py serve"``: trials run side by side
on disjoint GPUs (each server given its CUDA_VISIBLE_DEVICES), a crashing candidate frees its GPUs for the
next, the node proof starts every replica of the winning layout and loads them together, ``kill -9`` of the
tuner leaves no server, and ``--resume`` stops what the runs left. These are the parallel paths proven without
an 8-GPU machine: what they show is scheduling and bookkeeping, not GPU performance.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tuner.predict import aic
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model
from tuner.tuning.placement import Node, pack_batch

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fakes" / "fake_vllm.py"
QUICK = [
    "--slo", "ttft=1,tps=5", "--input-len", "16", "--output-len", "12", "--phase-seconds", "1",
    "--production-seconds", "2", "--max-requests", "90", "--max-concurrency", "16", "--pin", "max-model-len=4096",
    "--values", "quantization=default", "--values", "kv-cache-dtype=default",
    "--values", "max-num-batched-tokens=8192", "--values", "gpu-memory-utilization=default",
    "--values", "enable-prefix-caching=default", "--values", "max-num-seqs=8,16",
    "--values", "tensor-parallel-size=1,2,4",
]  # fmt: skip


# The batches come from the performance model's ranking (one configuration family each first): CI installs it.
needs_model = pytest.mark.skipif(not aic.available() and not os.environ.get("CI"), reason=aic.INSTALL_HINT)


def _ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _intervals(
    entries: list[dict[str, Any]], end_t: float
) -> list[tuple[int, frozenset[int], float, float, str]]:
    """(pid, GPUs, start, stop, argv) of every stand-in server the ledger saw."""
    starts = {e["pid"]: e for e in entries if e["event"] == "start"}
    stops = {e["pid"]: e["t"] for e in entries if e["event"] == "stop"}
    return [
        (
            pid,
            frozenset(int(g) for g in e["gpus"].split(",") if g),
            e["t"],
            stops.get(pid, end_t),
            " ".join(e["argv"]),
        )
        for pid, e in starts.items()
    ]


@contextlib.contextmanager
def _tune(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[str]]:
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", "tune", *args],
            cwd=REPO, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "llama-8b-shape", **LLAMA_3_1_8B)


def _args(model: Path, tmp_path: Path, *more: str) -> list[str]:
    return [
        str(model), "--simulate", "h100x8", "--headless",
        "--vllm-cmd", f"{sys.executable} {FAKE} serve", "--store", str(tmp_path / "s.sqlite"),
        "--out", str(tmp_path / "out"), *QUICK, *more,
    ]  # fmt: skip


@needs_model
def test_a_node_tune_runs_trials_side_by_side_on_disjoint_gpus_and_proves_every_replica(
    model: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    log = tmp_path / "tune.log"
    # One candidate dies at start-up as vLLM does when CUDA runs out of memory.
    crash = "--max-num-seqs 16 --max-num-batched-tokens 8192 --max-model-len 4096 --tensor-parallel-size 4"
    env = {"FAKE_VLLM_LEDGER": str(ledger), "FAKE_VLLM_FAIL_IF": crash}
    args = _args(model, tmp_path, "--budget", "5", "--objective", "users")
    with _tune(args, env, log) as proc:
        code = proc.wait(timeout=420)
    text = log.read_text()
    assert code == 0, text[-3000:]
    servers = _intervals(_ledger(ledger), time.time())
    # No GPU held by two servers at once.
    for i, (pid_a, gpus_a, start_a, stop_a, _) in enumerate(servers):
        for pid_b, gpus_b, start_b, stop_b, _ in servers[i + 1 :]:
            if start_a < stop_b and start_b < stop_a:
                assert not gpus_a & gpus_b, f"servers {pid_a} and {pid_b} shared GPUs {set(gpus_a & gpus_b)}"
    trials = [s for s in servers if "--config" not in s[4]]
    overlapping = any(a[2] < b[3] and b[2] < a[3] for i, a in enumerate(trials) for b in trials[i + 1 :])
    assert overlapping, "no two trials ran side by side"
    assert all(s[1] for s in servers), "a server was started without its CUDA_VISIBLE_DEVICES"
    # The crashing candidate failed on its own GPUs and the search went on; its GPUs were used again later.
    crashed = [s for s in trials if crash in s[4]]
    assert crashed and "failed (seqs 16, batch 8192, len 4096, tp 4): vLLM failed to start" in text
    later = [s for s in servers if s[2] > crashed[0][3] and s[1] & crashed[0][1]]
    assert later, "the GPUs of the trial that crashed were never used again"
    # The node proof: every replica of the winning layout started from the exported file, all live at once.
    proof = [s for s in servers if "--config" in s[4]]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    attempt = report["verdict"]["attempts"][0]
    replicas = attempt["replicas"]
    assert replicas >= 2 and len([s for s in proof if "best.yaml" in s[4]]) >= replicas
    first = proof[:replicas]
    assert max(s[2] for s in first) < min(s[3] for s in first), "the replicas were not all serving together"
    assert len(frozenset().union(*(s[1] for s in first))) == sum(len(s[1]) for s in first)
    assert attempt["predicted_node_tokens_per_s"] and attempt["measured_node_tokens_per_s"]
    out = tmp_path / "out"
    script = (out / "serve-node.sh").read_text()
    assert script.count("vllm serve --config best-replica-") == replicas and "CUDA_VISIBLE_DEVICES=" in script
    assert "port: 8001" in (out / "best-replica-1.yaml").read_text()
    assert "SIMULATED 8x NVIDIA H100" in text and "the node: GPUs 0,1,2,3,4,5,6,7" in text
    # Then one --data-parallel-size server on all the replicas' GPUs, at the loads they held: the export follows it.
    dp = report["verdict"]["dp"]
    [dp_server] = [s for s in proof if "best-dp.yaml" in s[4]]
    assert (
        dp["replicas"] == replicas
        and dp["points"]
        and dp_server[1] == frozenset().union(*(s[1] for s in first))
    )
    best = (out / "best.yaml").read_text()
    if dp["held"]:
        assert report["verdict"]["export_as"] == "data_parallel" and f"data-parallel-size: {replicas}" in best
        assert "exported as one server with --data-parallel-size" in text
    else:
        assert report["verdict"]["export_as"] == "independent" and "data-parallel-size" not in best
        assert f"exported as {replicas} independent servers" in text


@needs_model
def test_kill_9_of_a_node_tune_leaves_no_server_and_resume_stops_what_was_left(
    model: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    log = tmp_path / "tune.log"
    env = {"FAKE_VLLM_LEDGER": str(ledger), "FAKE_VLLM_STARTUP_S": "0.2"}
    args = _args(model, tmp_path, "--budget", "6", "--objective", "users", "--no-prove")

    def live() -> list[int]:
        return [pid for pid, *_ in _intervals(_ledger(ledger), time.time()) if _alive(pid)]

    with _tune(args, env, log) as proc:
        deadline = time.monotonic() + 120
        while len(live()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        running = live()
        assert len(running) >= 2, log.read_text()[-2000:]
        # kill -9 of the tuner alone: its watchdog stops every server of every slot.
        psutil.Process(proc.pid).kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in running) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in running), "a server outlived the tuner killed with -9"

    # kill -9 of the tuner and its watchdog (a run of its own): servers survive; --resume stops each before it
    # launches anything.
    args = _args(model, tmp_path / "again", "--budget", "6", "--objective", "users", "--no-prove")
    with _tune(args, env, log) as proc:
        deadline = time.monotonic() + 120
        while len(live()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        left = live()
        assert len(left) >= 2
        tuner = psutil.Process(proc.pid)
        victims = [tuner, *(c for c in tuner.children() if "TERM_GRACE_S" in " ".join(c.cmdline()))]
        assert len(victims) == 2, "the tuner's watchdog was not found"
        for victim in victims:
            victim.kill()
        proc.wait(timeout=10)
        time.sleep(0.5)
        assert all(_alive(p) for p in left), "with the watchdog killed too, the servers should have survived"
    with _tune([*args, "--resume", "--budget", "1"], env, log) as proc:
        proc.wait(timeout=300)
    text = log.read_text()
    for pid in left:
        assert f"stopped the vLLM server an earlier run left (pid {pid}" in text
        assert not _alive(pid)


def test_the_node_hands_out_disjoint_aligned_blocks_and_takes_them_back() -> None:
    node = Node(
        tuple(range(8)),
        frozenset(range(16)),
        {g: frozenset(range(8)) if g < 4 else frozenset(range(8, 16)) for g in range(8)},
    )
    four = node.take(4)
    two = node.take(2)
    one = node.take(1)
    assert four is not None and two is not None and one is not None
    assert four.gpus == (0, 1, 2, 3) and two.gpus == (4, 5) and one.gpus == (6,)
    assert node.take(2) is None and node.free_gpus() == (7,)
    assert four.server_cpus and four.client_cpus and four.server_cpus <= frozenset(range(8))
    assert not four.server_cpus & four.client_cpus
    assert four.env()["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    node.release(four)
    assert node.take(4) is not None and node.free_gpus() == (7,)
    # The best waits for its GPUs; smaller ones fill what is free only behind it.
    assert pack_batch([8, 1, 1], free=4, node_gpus=8) == []
    assert pack_batch([2, 4, 1, 2], free=4, node_gpus=8) == [0, 2]
    assert pack_batch([1, 1], free=0, node_gpus=0) == [] and pack_batch([1, 1], free=1, node_gpus=0) == [0]


def test_a_trial_records_how_long_its_gpus_were_slowed_and_is_flagged_beyond_a_tenth() -> None:
    """Trials side by side share the node's power and cooling: each keeps the share of its GPUs' readings that a
    throttle reason slowed (idle and application clocks are not slowing), and over 10 % it is flagged."""
    from tuner.measure import summarise_snapshots
    from tuner.telemetry.model import GpuSample, Snapshot
    from tuner.tuning.capacity import summarise
    from tuner.tuning.points import RATE, Load, Point, empty_steady
    from tuner.tuning.space import Candidate
    from tuner.tuning.store import TrialStatus
    from tuner.tuning.tune import TrialOutcome

    def reading(t: float, gpu: int, reasons: tuple[str, ...]) -> GpuSample:
        return GpuSample(index=gpu, time_s=t, clock_event_reasons=reasons)

    snaps = [
        Snapshot(
            time_s=float(t),
            host=None,
            gpus=(
                reading(t, 0, ("sw_power_cap",) if t < 3 else ()),
                reading(t, 1, ("gpu_idle",)),  # GPU 1 is another trial's
            ),
        )
        for t in range(10)
    ]
    mine = summarise_snapshots(snaps, {0})
    assert mine["throttled_pct"] == pytest.approx(30.0) and mine["throttle_reasons"] == ("sw_power_cap",)
    assert summarise_snapshots(snaps, {1})["throttled_pct"] == 0.0

    def outcome(share: float) -> TrialOutcome:
        evidence = {"throttled_pct": share, "throttle_reasons": ["sw_power_cap"]}
        point = Point(Load.rate(2.0), "judged", "pass", empty_steady(), phases=({"evidence": evidence},))
        return TrialOutcome(Candidate(), TrialStatus.FEASIBLE, "ok", summarise(RATE, [point]))

    assert outcome(30.0).disturbed == "its GPUs slowed 30 % of a window (sw_power_cap)"
    assert outcome(5.0).disturbed == ""
