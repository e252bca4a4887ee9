"""scripts/gpu_check.py: its summary (what comes back from the GPU machine) and a real run of its first step."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402


def _run(tmp_path: Path, mode: gpu_check.Mode) -> gpu_check.Run:
    work = tmp_path / "work"
    work.mkdir()
    return gpu_check.Run(mode, tmp_path / "out", work)


def _bench_row(client: str, c: int, tok_s: float) -> dict[str, object]:
    return {"client": client, "concurrency": c, "ok": 64, "output_tok_s": tok_s, "ttft_p50_ms": 20.0}


def test_summary_names_the_gpu_every_step_and_what_was_skipped(tmp_path: Path) -> None:
    run = _run(tmp_path, gpu_check.gpu_mode(500.0))
    run.figures["inventory"] = {
        "state": "ok",
        "driver": "580.159.04",
        "gpus": [{"index": 0, "name": "NVIDIA H200", "gpm_supported": True, "peak_dram_bw_gbps": 4800.0}],
        "host": {"cpus": 16},
    }
    run.figures["bench"] = [
        _bench_row("infertop bench", 32, 6000.0),
        _bench_row("vllm bench serve", 32, 6250.0),
        _bench_row("vllm bench serve", 256, 16000.0),
        _bench_row("infertop bench", 256, 15200.0),
    ]
    run.steps = [
        gpu_check.StepRecord("inventory", "ok", "NVIDIA H200", 12.0, 75.0),
        gpu_check.StepRecord("serve", "ok", "vLLM ready in 80 s", 81.0, 150.0),
        gpu_check.StepRecord("bench", "timeout", "stopped", 131.0, 130.0),
        gpu_check.StepRecord("tune", "skipped", "no time left (4 s of the 500 s budget)"),
    ]
    run.notes.append("tune: --enforce-eager added")
    doc = gpu_check.summary_document(run)
    assert doc["gpu"] == "NVIDIA H200" and doc["simulated"] is False
    assert doc["skipped"] == ["tune"]
    text = gpu_check.summary_markdown(doc)
    assert "NVIDIA H200" in text and "REHEARSAL" not in text
    assert "skipped: tune" in text
    assert "| bench | timeout |" in text
    assert "--enforce-eager added" in text
    # Ratios pair each concurrency's clients whatever their order: 6000/6250 and 15200/16000.
    assert gpu_check.bench_ratios(doc["figures"]["bench"]) == {
        32: pytest.approx(0.96),
        256: pytest.approx(0.95),
    }
    assert "c=256: infertop bench / vLLM bench serve output tok/s = 0.950" in text


def _probe_figures() -> dict[str, object]:
    """nvml_probe.py's JSON as a 535 driver on two GPUs might give it (only the keys the summary reads)."""
    watts = {"n": 20, "mean": 71.2, "min": 69.0, "max": 80.5, "stdev": 3.1, "range": 11.5}
    steady = {**watts, "mean": 70.0, "min": 69.8, "max": 70.3, "stdev": 0.2}
    fine = {
        "repeats": 5, "wanted": 5, "ok": 5, "errors": {},
        "metrics": {"DRAM_BW_UTIL": {"returns": {"0": 5}, "values": {"min": 0.0, "max": 0.4}}},
    }  # fmt: skip
    return {
        "available": True,
        "driver": "535.104.05",
        "nvml": "12.535.104.05",
        "seconds": 20,
        "wall_s": 14.2,
        "gpus": [{"index": 0}, {"index": 1}],
        "processes": {
            "symbols": {"nvmlDeviceGetComputeRunningProcesses_v3": True,
                        "nvmlDeviceGetRunningProcessDetailList": False},
            "rule": {"entry_bytes": 32, "why": "_v3 and ConfCompute without DetailList"},
            "children": {"gpu": 0, "ready": 2, "started": 2, "python": "python3", "failures": []},
            "note": "32-byte entries on GPU 0 (pids in /proc): agrees with the rule",
            "gpus": [{"index": 0, "call": "nvmlDeviceGetComputeRunningProcesses_v3", "count": 2,
                      "verdict": {"entry_bytes": 32, "basis": "in_proc",
                                  "pids": {"24": [4242, 0], "32": [4242, 4243]}}}],
        },
        "power": {
            "samples": 20,
            "window_s": 2.0,
            "gpus": [
                {"index": 0, "instant_varies_more": True,
                 "instant": {"watts": watts, "returns": {"0": 20}, "value_type": "unsigned int"},
                 "average": {"watts": steady, "returns": {"0": 20}},
                 "usage": {"watts": steady, "returns": {"0": 20}}},
                {"index": 1, "instant_varies_more": None,
                 "instant": {"watts": None, "returns": {"3": 20}, "return_text": {"3": "Not Supported"}},
                 "average": {"watts": steady, "returns": {"0": 20}},
                 "usage": {"watts": steady, "returns": {"0": 20}}},
            ],
        },
        "gpm": {
            "repeats": 5,
            "intervals_s": [0.01, 0.1],
            "gpus": [
                {"index": 0, "supported": True, "smallest_fine_interval_s": 0.1, "intervals": [
                    {**fine, "interval_s": 0.01, "ok": 0, "errors": {"nvmlGpmMetricsGet: Invalid Argument (2)": 5}},
                    {**fine, "interval_s": 0.1},
                ]},
                {"index": 1, "supported": False, "errors": [], "intervals": []},
            ],
        },
    }  # fmt: skip


def test_summary_has_the_nvml_probe_section(tmp_path: Path) -> None:
    run = _run(tmp_path, gpu_check.gpu_mode(500.0))
    run.figures["nvml_probe"] = _probe_figures()
    text = gpu_check.summary_markdown(gpu_check.summary_document(run))
    section = text.split("## NVML probe (benchmarks/nvml_probe.py)", 1)[1]
    assert "driver 535.104.05" in section
    assert "the rule predicts 32-byte entries" in section
    assert "observed: 32-byte entries on GPU 0 (pids in /proc): agrees with the rule" in section
    assert "| 0 | ComputeRunningProcesses_v3 | 2 | 4242, 0 | 4242, 4243 | 32 B (pids in /proc) |" in section
    assert "| 0 | 71.2 W (69.0–80.5), sd 3.10" in section
    assert "| 1 | no value (Not Supported x20)" in section
    assert "0/5: DRAM 0.0–0.4; nvmlGpmMetricsGet: Invalid Argument (2) x5" in section
    assert "| 5/5: DRAM 0.0–0.4 | 0.1 s |" in section  # the shortest fine interval
    assert "could not be rendered" not in section
    run.figures["nvml_probe"] = {
        "available": False,
        "reason": "nvmlInit failed: NVML Shared Library Not Found",
    }
    assert "- NVML not available: nvmlInit failed" in gpu_check.summary_markdown(
        gpu_check.summary_document(run)
    )
    run.figures["nvml_probe"] = {"skipped": "5 s of the inventory step left"}
    assert "- not run: 5 s of the inventory step left" in gpu_check.summary_markdown(
        gpu_check.summary_document(run)
    )


def test_pack_brings_back_at_most_eight_files_with_the_logs_inside_one_archive(tmp_path: Path) -> None:
    run = _run(tmp_path, gpu_check.rehearse_mode(60.0))
    (run.work / "recording.ndjson.gz").write_bytes(b"\x1f\x8b" + b"0" * 100)
    (run.work / "monitor").mkdir()
    (run.work / "monitor" / "monitor.svg").write_text("<svg/>")
    for i in range(20):  # more result files than could ever come back one by one
        (run.work / f"bench-{i}.json").write_text("{}")
    (run.work / "model-tiny").mkdir()
    (run.work / "model-tiny" / "config.json").write_text("{}")
    files = gpu_check.pack(run, gpu_check.summary_document(run))
    assert len(files) <= gpu_check.MAX_OUT_FILES
    assert {p.name for p in files} == {
        "summary.json", "summary.md", "recording.ndjson.gz", "monitor.svg", "artifacts.tar.gz"
    }  # fmt: skip
    assert "REHEARSAL" in (run.out / "summary.md").read_text()
    with tarfile.open(run.out / "artifacts.tar.gz") as tar:
        names = tar.getnames()
    assert "bench-19.json" in names
    assert not any(n.startswith("model-") for n in names)  # made again anywhere: not worth the transfer
    assert "recording.ndjson.gz" not in names  # it came back on its own


def test_rehearsed_inventory_step_writes_a_summary_that_says_what_it_found(tmp_path: Path) -> None:
    """The real first step on this machine: no GPU, so the GPU tests skip and NVML reports why."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--rehearse", "--steps", "inventory", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["mode"] == "rehearse" and doc["simulated"] is True
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["inventory"]["status"] == "ok"
    assert [steps[n]["status"] for n in ("serve", "bench", "tune")] == ["skipped"] * 3
    assert doc["skipped"] == ["serve", "bench", "tune"]
    inventory = doc["figures"]["inventory"]
    if inventory["gpus"]:
        pytest.skip("this machine has a GPU: the rehearsal's no-GPU path does not apply")
    assert inventory["state"] != "ok" and inventory["message"]
    assert (
        "skipped" in doc["figures"]["gpu_tests"]["result"]
        or "deselected" in doc["figures"]["gpu_tests"]["result"]
    )
    cost = doc["figures"]["monitor_cost"]
    assert cost["real_nvml"] is True and cost["gpus"] == 0 and cost["own_ms"] > 0
    probe = doc["figures"]["nvml_probe"]
    assert probe["available"] is False and probe["reason"]
    assert "## NVML probe" in (out / "summary.md").read_text()
    assert (out / "summary.md").read_text().startswith("# infertop GPU check, REHEARSAL")
