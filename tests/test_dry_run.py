"""`infertop tune --dry-run` on a scripted 8-GPU H100 box: the plan, launching nothing, with and without the
performance model; bad node arguments are one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui.cli import main
from tuner.predict import aic
from tuner.serving.tinymodel import LLAMA_3_1_8B, write_tiny_model

# A small space so the model's predictions take seconds: two batch sizes, the four TP sizes, FP8 or not.
SMALL = [
    "--pin", "max-model-len=4096", "--values", "max-num-seqs=64,256", "--values", "max-num-batched-tokens=8192",
    "--values", "gpu-memory-utilization=default", "--values", "enable-prefix-caching=default",
]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("dry") / "llama-8b", **LLAMA_3_1_8B)


def _dry_run(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *more: str) -> str:
    store = tmp_path / "s.sqlite"
    code = main(
        ["tune", str(model), "--simulate", "h100x8", "--dry-run", "--store", str(store), *SMALL, *more]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert not store.exists(), "a dry run wrote a trial store"
    assert not (tmp_path / "out").exists()
    return out


@pytest.mark.skipif(not aic.available(), reason=aic.INSTALL_HINT)
def test_the_plan_ranks_layouts_by_the_node_and_packs_the_first_batch_on_the_gpus(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _dry_run(model, tmp_path, capsys, "--out", str(tmp_path / "out"))
    assert "nothing is launched" in out and "SIMULATED 8x NVIDIA H100" in out
    assert "ranked by aiconfigurator" in out
    ranking = out.split("Layouts ranked by the node's requests/s")[1].split("First batches")[0]
    first = ranking.strip().splitlines()[1]
    assert "8 x TP 1" in first  # an 8B model: eight replicas, not one server on eight GPUs
    batch = out.split("batch 1:")[1].split("batch 2:")[0]
    gpus = [line.rsplit(" on ", 1)[1] for line in batch.strip().splitlines()]
    assert "GPU 0" in gpus[0] and len(gpus) >= 3  # the defaults first, then one family each beside them
    serial, parallel = (int(x) for x in _minutes(out))
    assert parallel < serial


def _minutes(out: str) -> tuple[str, str]:
    line = next(line for line in out.splitlines() if line.startswith("Expected wall time"))
    serial = line.split(": ")[1].split(" min one")[0]
    parallel = line.split("after another, ")[1].split(" min side")[0]
    return serial, parallel


def test_without_the_model_the_plan_uses_the_roofline_and_says_so(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aic, "available", lambda: False)
    out = _dry_run(model, tmp_path, capsys, "--parallel", "2")
    assert "memory-bandwidth roofline: a ceiling, not a prediction" in out
    assert "output tokens/s ceiling" in out and "no performance model installed" in out
    assert "vLLM defaults" in out.split("batch 1:")[1] and "up to 2 trials at once" in out
    serial, parallel = (int(x) for x in _minutes(out))
    assert parallel <= serial


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "9"], "--gpus: GPU 9 is not visible here (visible: 0,1,2,3,4,5,6,7)"),
        (["--gpus", "3-1"], "is not a range of GPU indices"),
        (["--parallel", "0"], "--parallel must be at least 1, got 0"),
        (["--simulate", "h100x9"], "expected GPUxN with N 1-8"),
    ],
)
def test_bad_node_arguments_are_one_line_and_exit_2(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["tune", str(model), "--dry-run", "--store", str(tmp_path / "s.sqlite"), *SMALL, *args]
    if "--simulate" not in args:
        argv += ["--simulate", "h100x8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
