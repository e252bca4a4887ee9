"""What bench, tune and predict write, and to whom: private files (0600; serve-node.sh 0700), written whole
through an unpredictable temporary name, never over an earlier output without ``--force`` (refused in one line,
exit 2, before anything is launched), and a ``--json`` whose reader has gone ends quietly.

Real subprocesses of ``infertop`` against the stand-in vLLM (tests/fakes/fake_vllm.py): its ledger says whether
anything was launched at all.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model

REPO = Path(__file__).resolve().parent.parent
FAKE_VLLM = f"{sys.executable} {REPO / 'tests' / 'fakes' / 'fake_vllm.py'} serve"
QUICK_BENCH = [
    "--no-gpu",
    "--concurrency",
    "2",
    "--num-requests",
    "16",
    "--input-len",
    "16",
    "--output-len",
    "12",
]
QUICK_TUNE = [
    "--headless", "--no-predict", "--no-prove", "--slo", "ttft=1,tps=5", "--input-len", "16", "--output-len", "12",
    "--phase-seconds", "1", "--max-requests", "60", "--max-concurrency", "8", "--pin", "max-model-len=4096",
    "--pin", "tensor-parallel-size=1", "--values", "max-num-seqs=16", "--budget", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("llama-8b-shape"), **LLAMA_3_1_8B)


def infertop(
    args: list[str], ledger: Path, *, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        cwd=REPO, env={**os.environ, "FAKE_VLLM_LEDGER": str(ledger)}, stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.PIPE, text=True, timeout=300, check=False,
    )  # fmt: skip


def into_a_closed_pipe(args: list[str], ledger: Path) -> subprocess.CompletedProcess[str]:
    """``infertop ARGS | head`` where head has already gone: stdout is a pipe whose read end is closed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return infertop(args, ledger, stdout=write_end)
    finally:
        os.close(write_end)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def refused(run: subprocess.CompletedProcess[str], message: str) -> bool:
    lines = run.stderr.strip().splitlines()
    return run.returncode == 2 and len(lines) == 1 and message in lines[0]


# --- bench ----------------------------------------------------------------------------------------------------


def test_bench_refuses_an_existing_out_before_launching_anything(model: Path, tmp_path: Path) -> None:
    out, ledger = tmp_path / "bench.json", tmp_path / "ledger.jsonl"
    out.write_text("an earlier bench")
    run = infertop(
        ["bench", "--launch", str(model), "--vllm-cmd", FAKE_VLLM, *QUICK_BENCH, "--out", str(out)], ledger
    )
    assert refused(run, f"{out} exists: pass --force to replace it"), run.stderr
    assert out.read_text() == "an earlier bench"
    assert not ledger.exists(), "a server was launched before the output was checked"


def test_bench_results_are_private_and_never_written_through_a_planted_tmp_symlink(
    model: Path, tmp_path: Path
) -> None:
    out, ledger, victim = tmp_path / "bench.json", tmp_path / "ledger.jsonl", tmp_path / "victim"
    victim.write_text("someone else's file")
    (tmp_path / "bench.json.tmp").symlink_to(victim)  # the temporary name bench used to write through
    run = infertop(
        ["bench", "--launch", str(model), "--vllm-cmd", FAKE_VLLM, *QUICK_BENCH, "--out", str(out)], ledger
    )
    assert run.returncode == 0, run.stderr
    assert victim.read_text() == "someone else's file"
    assert not out.is_symlink() and mode(out) == 0o600
    assert json.loads(out.read_text())["phases"][0]["stats"]["requests_ok"] == 16


def test_bench_force_replaces_an_existing_out_and_json_into_a_closed_pipe_ends_quietly(
    model: Path, tmp_path: Path
) -> None:
    out, ledger = tmp_path / "bench.json", tmp_path / "ledger.jsonl"
    out.write_text("an earlier bench")
    args = ["bench", "--launch", str(model), "--vllm-cmd", FAKE_VLLM, *QUICK_BENCH, "--out", str(out)]
    run = into_a_closed_pipe([*args, "--force", "--json"], ledger)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
    assert run.returncode == 1  # the reader went away: the standard exit, and the results are on disk
    assert json.loads(out.read_text())["format"] == "infertop-bench" and mode(out) == 0o600


# --- tune -----------------------------------------------------------------------------------------------------


def tune_args(model: Path, tmp_path: Path, *more: str) -> list[str]:
    return [
        "tune", str(model), "--simulate", "h100x2", "--vllm-cmd", FAKE_VLLM, "--store", str(tmp_path / "s.sqlite"),
        "--out", str(tmp_path / "out"), *QUICK_TUNE, *more,
    ]  # fmt: skip


def test_tune_refuses_an_earlier_runs_out_before_launching_anything(model: Path, tmp_path: Path) -> None:
    old_log = tmp_path / "out" / "logs" / "001-defaults.log"
    old_log.parent.mkdir(parents=True)
    old_log.write_text("the only log of last night's run")
    ledger = tmp_path / "ledger.jsonl"
    run = infertop(tune_args(model, tmp_path), ledger)
    assert refused(
        run, "holds an earlier run's files: --resume carries that run on, --force replaces them"
    ), run.stderr
    assert old_log.read_text() == "the only log of last night's run"
    assert not ledger.exists() and not (tmp_path / "s.sqlite").exists()


def test_tune_refuses_an_existing_export_before_launching_anything(model: Path, tmp_path: Path) -> None:
    export, ledger = tmp_path / "best.yaml", tmp_path / "ledger.jsonl"
    export.write_text("model: the configuration in production\n")
    run = infertop(tune_args(model, tmp_path, "--export", str(export)), ledger)
    assert refused(run, f"{export} exists: pass --force to replace it"), run.stderr
    assert export.read_text() == "model: the configuration in production\n"
    assert not ledger.exists()


def test_a_forced_tune_writes_every_output_private_and_follows_no_planted_symlink(
    model: Path, tmp_path: Path
) -> None:
    out, export, victim = tmp_path / "out", tmp_path / "best.yaml", tmp_path / "victim"
    victim.write_text("someone else's file")
    out.mkdir()
    (out / "report.json").symlink_to(victim)
    (out / "serve-node.sh").symlink_to(victim)
    export.write_text("model: an earlier export\n")
    args = tune_args(model, tmp_path, "--export", str(export), "--force", "--json")
    run = into_a_closed_pipe(args, tmp_path / "ledger.jsonl")
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
    assert run.returncode == 1, run.stderr  # the report was printed to a reader that had gone
    assert victim.read_text() == "someone else's file"
    report = json.loads((out / "report.json").read_text())
    assert report["headline"].startswith("UNVERIFIED")
    private = [
        out / "report.json", out / "report.md", out / "report.html", out / "best.yaml", out / "best-replica-0.yaml",
        out / "best-replica-1.yaml", export, tmp_path / "s.sqlite", *out.glob("*.svg"),
    ]  # fmt: skip
    assert {p.name: mode(p) for p in private} == {p.name: 0o600 for p in private}
    assert mode(out / "serve-node.sh") == 0o700 and not (out / "serve-node.sh").is_symlink()
    assert "best-replica-1.yaml" in (out / "serve-node.sh").read_text()
    assert export.read_text() == (out / "best.yaml").read_text()


def test_tune_refuses_a_price_that_is_not_a_finite_positive_number(tmp_path: Path) -> None:
    for price in ("nan", "inf", "0", "-1"):
        run = infertop(["tune", str(tmp_path), "--price", price], tmp_path / "ledger.jsonl")
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert f"expected a price in USD above 0, got '{price}'" in run.stderr.strip().splitlines()[-1]


# --- predict --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("price", ["nan", "inf", "-inf", "0", "-1", "1e999"])
def test_predict_refuses_a_price_that_is_not_a_finite_positive_number(model: Path, price: str) -> None:
    run = infertop(["predict", str(model), "--gpu", "h100", "--price", f"h100={price}"], Path(os.devnull))
    assert refused(run, f"--price takes GPU=USD per GPU-hour, e.g. h100=2.5; got 'h100={price}'"), run.stderr


def test_predict_json_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny")  # on a T4 (the roofline): a whole prediction in a moment
    run = into_a_closed_pipe(["predict", str(tiny), "--gpu", "t4", "--json"], Path(os.devnull))
    assert run.returncode == 1 and run.stderr == "", run.stderr
