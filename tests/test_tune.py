"""`infertop tune` end to end on the real CPU build of vLLM: a failing candidate, an interrupt, a resume, the
verdict on a relaunch from the exported YAML, ``kill -9`` at the worst moments, a small vocabulary, a refused
workload, and a relaunch that does not hold (a fault injected into the relaunch only)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tuner.serving.launcher import api_server_command
from tuner.serving.leftovers import group_members
from tuner.serving.tinymodel import write_tiny_model
from tuner.tuning import events as ev
from tuner.tuning.export import parse_simple_yaml
from tuner.tuning.slo import parse_slo
from tuner.tuning.space import Candidate
from tuner.tuning.store import TrialStatus, load_run
from tuner.tuning.tune import TuneConfig, TuneError, Tuner

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
FIXED = ("--load-format", "dummy", "--enforce-eager")
# Short, cheap phases: these tests check the machinery, not the CPU build's capacity.
QUICK = ["--input-len", "32", "--output-len", "16", "--phase-seconds", "1", "--production-seconds", "3"]


def _config(tmp_path: Path, model: Path, vllm_python: Path) -> TuneConfig:
    return TuneConfig(
        model=str(model),
        slo=parse_slo("ttft=2,tps=5"),
        command=api_server_command(vllm_python),
        fixed_args=FIXED,
        env=VLLM_ENV,
        pins={"max_model_len": 512},
        # FP8 weights: the CPU build refuses them at start-up, a real infeasible candidate. A larger prefill budget
        # is a move the evidence proposes whenever the per-user speed had room, so a third launch always follows
        # (fewer sequences is proposed only when the SLO held far fewer users than vLLM's 128: on a fast day the
        # defaults held 73, and the search ended after two launches).
        values={
            "quantization": (None, "fp8"),
            "max_num_seqs": (4, 8),
            "max_num_batched_tokens": (2048, 4096),
        },
        input_len=32,
        output_len=16,
        min_phase_s=1.0,
        production_s=3.0,
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
    assert first.stopped == "interrupted" and first.exit_code == 130
    assert first.headline.startswith("INTERRUPTED")
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
    assert defaults.best.kind == "rate" and defaults.capacity is not None  # open-loop capacity, stored

    # 2. Starting again without --resume refuses to overwrite the run.
    with pytest.raises(TuneError, match="--resume"):
        Tuner(config).run()

    # 3. Resume: finished trials are not relaunched; the interrupted one is retried; the winner is exported,
    #    relaunched from the YAML, proven and reported.
    resumed: list[ev.TuneEvent] = []
    result = Tuner(config, resume=True).run(resumed.append)
    launched = [e.key for e in resumed if isinstance(e, ev.TrialStarted)]
    assert defaults.key not in launched and failed.key not in launched
    started = next(e for e in resumed if isinstance(e, ev.TuneStarted))
    assert started.resumed_trials == 2
    assert result.winner is not None and result.verdict is not None
    roles = [e.role for e in resumed if isinstance(e, ev.PhaseMeasured) and e.key == "proof"]
    assert roles[0] == "proof" and "production" in roles  # the relaunch: proof, then the production check
    assert result.verdict.status in ("proven", "backed_off"), result.headline
    assert result.exit_code == 0 and result.headline.startswith("PROVEN")

    yaml_text = Path(result.outputs["yaml"]).read_text()
    assert yaml_text.splitlines()[2].startswith("# PROVEN")  # the header says what the relaunch showed
    exported = parse_simple_yaml(yaml_text)
    assert exported["model"] == str(tiny_model_dir)
    assert Candidate.from_config_dict({k: v for k, v in exported.items() if k != "model"}) == result.winner

    report = json.loads(Path(result.outputs["json"]).read_text())
    assert report["version"] == 2 and report["headline"] == result.headline
    assert report["verdict"]["operating_point"]["kind"] == "rate"
    assert {t["status"] for t in report["trials"]} == {"feasible", "failed"}
    assert Path(result.outputs["markdown"]).read_text().startswith("# PROVEN")
    assert _vllm_children(already) == []


# --- kill -9, resume, a small vocabulary --------------------------------------------------------------------


def _servers(store: Path) -> list[tuple[int, int]]:
    """(pid, port) of the servers a tuner has recorded as running (read without the tuner's lock)."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as conn:
        return [(int(pid), int(port)) for pid, port in conn.execute("SELECT pid, port FROM servers")]


class TuneProcess:
    """`infertop tune` as a user runs it, in its own session; its stderr lines as they come."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.lines: list[str] = []
        env = {**os.environ, **VLLM_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", "tune", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with open(self._log, "a") as log:
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                log.write(line)

    def wait_for(self, text: str, timeout_s: float = 240.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hit = next((line for line in self.lines if text in line), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None and not any(text in line for line in self.lines):
                time.sleep(0.5)  # let the reader catch up with the last lines
                if not any(text in line for line in self.lines):
                    break
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r}; got:\n" + "\n".join(self.lines[-30:]))

    def kill9(self, *, watchdog_too: bool = False) -> None:
        victims = [psutil.Process(self.proc.pid)]
        if watchdog_too:  # the watchdog: the tuner's child running `python -I -S -c <watchdog code>`
            victims += [c for c in victims[0].children() if "TERM_GRACE_S" in " ".join(c.cmdline())]
            assert len(victims) == 2, "the tuner's watchdog was not found"
        for victim in victims:
            victim.kill()
        self.proc.wait(timeout=10)

    def finish(self, timeout_s: float = 600.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _gone_within(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def small_vocab_model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "vocab-513", vocab_size=513)


@contextlib.contextmanager
def _cleanup(groups: list[int], procs: list[TuneProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def test_kill_9_leaves_no_server_and_resume_stops_what_was_left_then_tunes_a_513_token_vocabulary(
    tmp_path: Path, small_vocab_model: Path, vllm_python: Path
) -> None:
    store = tmp_path / "s.sqlite"
    own = [
        str(small_vocab_model), "--cpu", "--headless", "--slo", "ttft=2,tps=5", "--budget", "1", "--no-prove",
        "--pin", "max-model-len=512", "--max-concurrency", "4", "--store", str(store), "--out", str(tmp_path / "out"),
        "--vllm-python", str(vllm_python), *QUICK,
    ]  # fmt: skip
    args, resume = [*own, "--", *FIXED], [*own, "--resume", "--", *FIXED]
    groups: list[int] = []
    procs: list[TuneProcess] = []
    log = tmp_path / "tune.log"
    with _cleanup(groups, procs):
        # 1. kill -9 while the candidate starts: its server (recorded with its pid) goes with the tuner.
        first = TuneProcess(args, log)
        procs.append(first)
        first.wait_for("launch 1:")
        deadline = time.monotonic() + 30
        while not _servers(store) and time.monotonic() < deadline:
            time.sleep(0.1)
        [(pid, _)] = _servers(store)
        groups.append(pid)
        assert group_members(pid), "the server should be starting"
        first.kill9()
        assert _gone_within(pid, 30), f"vLLM (process group {pid}) outlived the tuner killed during start-up"

        # 2. --resume, then kill -9 during a measured phase: again nothing is left.
        second = TuneProcess(resume, log)
        procs.append(second)
        second.wait_for("scout")
        [(pid2, _)] = [s for s in _servers(store) if s[0] != pid]
        groups.append(pid2)
        second.kill9()
        assert _gone_within(pid2, 30), f"vLLM (process group {pid2}) outlived the tuner killed during a phase"

        # 3. --resume, then kill -9 of the tuner AND its watchdog: now the server does survive ...
        third = TuneProcess(resume, log)
        procs.append(third)
        third.wait_for("scout")
        [(pid3, port3)] = [s for s in _servers(store) if s[0] not in (pid, pid2)]
        groups.append(pid3)
        third.kill9(watchdog_too=True)
        time.sleep(1.0)
        assert group_members(pid3), "with its watchdog killed too, the server should have been left running"

        # 4. ... and the next --resume stops it before launching anything, never running two servers at once,
        #    then tunes the 513-token model to the end (prompt ids inside its vocabulary).
        most_at_once = 0
        watching = threading.Event()

        def count_servers() -> None:
            nonlocal most_at_once
            while not watching.is_set():
                alive = [g for g in {pid3, *(p for p, _ in _safe_servers(store))} if group_members(g)]
                most_at_once = max(most_at_once, len(alive))
                time.sleep(0.2)

        counter = threading.Thread(target=count_servers, daemon=True)
        counter.start()
        fourth = TuneProcess(resume, log)
        procs.append(fourth)
        fourth.wait_for(f"stopped the vLLM server an earlier run left (pid {pid3}, port {port3})", 120)
        assert not group_members(pid3)
        code = fourth.finish()
        watching.set()
        counter.join(timeout=5)
        assert code == 0, "\n".join(fourth.lines[-20:])
        assert most_at_once == 1, f"{most_at_once} servers ran at once"
        assert fourth.lines[-1].startswith("infertop tune: UNVERIFIED (--no-prove)")
        assert not any("out of vocabulary" in line for line in fourth.lines)
        _, trials = load_run(store)
        assert [t.status for t in trials] == [TrialStatus.FEASIBLE]
        assert _servers(store) == []  # every server the runs started is accounted for


def _safe_servers(store: Path) -> list[tuple[int, int]]:
    try:
        return _servers(store)
    except sqlite3.Error:
        return []


def test_a_workload_the_server_refuses_ends_the_tune_with_its_message(
    tmp_path: Path, small_vocab_model: Path, vllm_python: Path
) -> None:
    """Token ids up to 1000 against a 513-token vocabulary: every request fails; one line says why."""
    run = subprocess.run(
        [sys.executable, "-m", "tui.cli", "tune", str(small_vocab_model), "--cpu", "--headless", "--budget", "2",
         "--vocab-size", "1000", "--pin", "max-model-len=512", "--store", str(tmp_path / "s.sqlite"),
         "--out", str(tmp_path / "out"), "--vllm-python", str(vllm_python), *QUICK, "--", *FIXED],
        cwd=REPO, env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "infertop tune: NO CONFIGURATION: vLLM's defaults: the server refused every request"
    )
    assert "out of vocabulary" in last and "Traceback" not in run.stderr
    assert run.stderr.count("launch ") == 1  # no other configuration is worth a launch


# The injected fault: a relaunch from the exported file (--config) serves one sequence at a time (CLI flags
# override the file), so the load the search found cannot hold there. Everything else runs vLLM as it is.
DEGRADED_RELAUNCH = """\
import os, sys
argv = sys.argv[1:]
if "--config" in argv:
    argv += ["--max-num-seqs", "1"]
os.execv(argv[0], argv)
"""


def test_a_relaunch_that_does_not_hold_is_not_proven_and_exits_3(
    tmp_path: Path, tiny_model_dir: Path, vllm_python: Path
) -> None:
    wrapper = tmp_path / "degrade.py"
    wrapper.write_text(DEGRADED_RELAUNCH)
    vllm_cmd = f"{sys.executable} {wrapper} {' '.join(api_server_command(vllm_python))}"
    run = subprocess.run(
        [sys.executable, "-m", "tui.cli", "tune", str(tiny_model_dir), "--cpu", "--headless", "--budget", "1",
         "--slo", "ttft=0.5,tps=5", "--pin", "max-model-len=512", "--max-concurrency", "16",
         "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out"), "--vllm-cmd", vllm_cmd,
         *QUICK, "--", *FIXED],
        cwd=REPO, env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 3, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("infertop tune: NOT PROVEN"), last
    yaml_text = (tmp_path / "out" / "best.yaml").read_text()
    assert yaml_text.splitlines()[2].startswith("# NOT PROVEN")  # the file says so too
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exit_code"] == 3 and report["verdict"]["status"] == "not_proven"
    [attempt] = report["verdict"]["attempts"]
    assert attempt["proof"]["decision"] != "pass"
    assert attempt["checks"] and all(c["decision"] != "pass" for c in attempt["checks"])
    assert (tmp_path / "out" / "report.md").read_text().startswith("# NOT PROVEN")


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
