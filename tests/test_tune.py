"""`infertop tune` end to end on the real CPU build of vLLM: a failing candidate, an interrupt, a resume,
the exported YAML relaunched, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from tuner.serving.launcher import api_server_command
from tuner.tuning import events as ev
from tuner.tuning.export import parse_simple_yaml
from tuner.tuning.slo import parse_slo
from tuner.tuning.space import Candidate
from tuner.tuning.store import TrialStatus, load_run
from tuner.tuning.tune import TuneConfig, TuneError, Tuner

pytestmark = pytest.mark.vllm

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def _config(tmp_path: Path, model: Path, vllm_python: Path) -> TuneConfig:
    return TuneConfig(
        model=str(model),
        slo=parse_slo("ttft=2,tps=5"),
        command=api_server_command(vllm_python),
        fixed_args=("--load-format", "dummy", "--enforce-eager"),
        env=VLLM_ENV,
        pins={"max_model_len": 512},
        # FP8 weights: the CPU build refuses them at start-up, a real infeasible candidate.
        values={"quantization": (None, "fp8"), "max_num_seqs": (4, 8)},
        input_len=32,
        output_len=16,
        requests_per_stream=2,
        min_requests=8,
        min_phase_s=1.0,
        max_concurrency=8,
        launch_budget=3,
        store_path=tmp_path / "trials.sqlite",
        out_dir=tmp_path / "out",
        startup_timeout_s=300,
        gpus=False,
    )


def _vllm_children(ignore: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """vLLM processes this test process started (other tests' shared server, in ``ignore``, excepted)."""
    me = psutil.Process()
    found = []
    for p in me.children(recursive=True):
        try:
            if p.pid not in ignore and "vllm" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_tune_survives_a_failing_candidate_and_an_interrupt_then_resumes_and_proves_the_export(
    tmp_path: Path, tiny_model_dir: Path, vllm_python: Path
) -> None:
    config = _config(tmp_path, tiny_model_dir, vllm_python)
    already = frozenset(p.pid for p in _vllm_children())  # the session's shared server, if it runs

    # 1. Run until the third launch has measured one load, then interrupt it (as Ctrl-C or `s` in the TUI do).
    cancel = threading.Event()
    seen: list[ev.TuneEvent] = []

    def interrupt_third_launch(event: ev.TuneEvent) -> None:
        seen.append(event)
        started = [e for e in seen if isinstance(e, ev.TrialStarted)]
        if isinstance(event, ev.PhaseMeasured) and len(started) == 3:
            cancel.set()

    first = Tuner(config).run(interrupt_third_launch, cancel)
    assert first.stopped == "interrupted"
    assert _vllm_children(already) == []  # the interrupted candidate's server was stopped
    _, trials = load_run(config.store_path)
    by_status = {t.candidate.label(): t.status for t in trials}
    statuses = sorted(t.status.value for t in trials)
    assert statuses == ["failed", "feasible", "interrupted"], by_status
    failed = next(t for t in trials if t.status is TrialStatus.FAILED)
    assert failed.candidate.quantization == "fp8"
    assert (
        "unsupported" in (failed.reason or "") and failed.log_tail
    )  # the reason and the log's tail are kept
    defaults = next(t for t in trials if t.status is TrialStatus.FEASIBLE)
    assert defaults.candidate == Candidate(max_model_len=512) and defaults.best is not None

    # 2. Starting again without --resume refuses to overwrite the run.
    with pytest.raises(TuneError, match="--resume"):
        Tuner(config).run()

    # 3. Resume: finished trials are not relaunched; the interrupted one is retried; the winner is exported,
    #    relaunched from the YAML and reported.
    resumed: list[ev.TuneEvent] = []
    result = Tuner(config, resume=True).run(resumed.append)
    launched = [e.key for e in resumed if isinstance(e, ev.TrialStarted)]
    assert defaults.key not in launched and failed.key not in launched
    assert launched[-1] == "proof"
    assert result.winner is not None
    started = next(e for e in resumed if isinstance(e, ev.TuneStarted))
    assert started.resumed_trials == 2

    yaml_text = Path(result.outputs["yaml"]).read_text()
    exported = parse_simple_yaml(yaml_text)
    assert exported["model"] == str(tiny_model_dir)
    assert Candidate.from_config_dict({k: v for k, v in exported.items() if k != "model"}) == result.winner
    proof = result.report["proof"]
    assert proof["error"] is None and proof["output_tokens_per_s"] > 0, proof
    production = result.report["production"]
    assert production is not None and production["stats"]["requests_ok"] > 0

    report = json.loads(Path(result.outputs["json"]).read_text())
    assert {t["status"] for t in report["trials"]} == {"feasible", "failed"}
    assert Path(result.outputs["markdown"]).read_text().count("fp8") >= 1
    assert _vllm_children(already) == []


def test_tune_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    for argv, message in (
        (["tune", str(tmp_path)], "no config.json"),
        (["tune", str(tmp_path), "--slo", "fast-please"], "fast-please"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "tui.cli", *argv], capture_output=True, text=True, check=False
        )
        assert run.returncode == 2
        assert message in run.stderr and "Traceback" not in run.stderr and run.stderr.count("\n") == 1
