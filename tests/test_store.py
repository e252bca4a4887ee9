"""The SQLite trial store: results survive, a crash mid-trial is retried on resume, other runs are refused."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tuner.tuning.slo import PRESETS
from tuner.tuning.space import Candidate
from tuner.tuning.store import (
    SCHEMA_VERSION,
    BestPoint,
    RunMeta,
    StoreError,
    TrialStatus,
    TrialStore,
    load_run,
)

META = RunMeta(
    model="/models/Llama-3.1-8B",
    hardware={"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1},
    slo=PRESETS["mlperf-llama3.1-8b-interactive"].to_dict(),
    space={"values": {"max-num-seqs": [64, 128]}},
    workload={"input_len": 512, "output_len": 256},
)
A = Candidate(max_num_seqs=64)
B = Candidate(max_num_seqs=128, quantization="fp8")
C = Candidate(max_num_seqs=256)
CAPACITY = {
    "objective": "rate",
    "points": [{"load": {"kind": "rate", "value": 2.4}}],
    "best": 0,
    "ceiling": None,
}


def test_results_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    clock = iter(float(t) for t in range(100, 200))
    with TrialStore.open(path, run_meta=META, clock=lambda: next(clock)) as store:
        store.record_planned([A, B, C])
        store.record_start(A)
        store.record_result(
            A, TrialStatus.FEASIBLE, capacity=CAPACITY, best=BestPoint(2.4, 7567.0, "rate"), startup_s=61.5
        )
        store.record_start(B)
        store.record_result(B, "failed", "engine died: CUDA out of memory", log_tail="...OOM\n")
        store.record_result(C, TrialStatus.INFEASIBLE, "KV cache holds ~100 tokens")
    with TrialStore.open(path, run_meta=META) as store:
        trials = {t.key: t for t in store.trials()}
        assert list(trials) == [A.key(), B.key(), C.key()]
        a = trials[A.key()]
        assert (a.candidate, a.status, a.best, a.capacity, a.startup_s) == (
            A,
            TrialStatus.FEASIBLE,
            BestPoint(2.4, 7567.0, "rate"),
            CAPACITY,
            61.5,
        )
        assert (a.attempts, a.started_s, a.finished_s) == (1, 101.0, 102.0)
        b = trials[B.key()]
        assert (b.candidate, b.status, b.reason, b.log_tail) == (
            B,
            TrialStatus.FAILED,
            "engine died: CUDA out of memory",
            "...OOM\n",
        )
        assert trials[C.key()].attempts == 0 and trials[C.key()].started_s is None
        assert store.done_keys() == {A.key(), B.key(), C.key()}
        assert store.interrupted_on_open == 0
        assert store.run_meta.model == META.model and store.run_meta.created_s is not None


_CRASH = textwrap.dedent(
    """
    import os, sys
    from tuner.tuning.space import Candidate
    from tuner.tuning.store import BestPoint, RunMeta, TrialStatus, TrialStore
    import json
    meta = RunMeta(**json.loads(sys.argv[2]))
    store = TrialStore.open(sys.argv[1], run_meta=meta)
    store.record_start(Candidate(max_num_seqs=64))
    store.record_result(Candidate(max_num_seqs=64), TrialStatus.FEASIBLE, best=BestPoint(64, 100.0))
    store.record_start(Candidate(max_num_seqs=128))
    os._exit(9)  # the tuner dies mid-trial: no close, no cleanup
    """
)


def test_resume_after_a_crash_retries_the_running_trial(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    meta_json = json.dumps({k: getattr(META, k) for k in ("model", "hardware", "slo", "space", "workload")})
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(path), meta_json], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    with TrialStore.open(path, run_meta=META) as store:  # the dead process's lock went with it
        assert store.interrupted_on_open == 1
        statuses = {t.candidate.max_num_seqs: t.status for t in store.trials()}
        assert statuses == {64: TrialStatus.FEASIBLE, 128: TrialStatus.INTERRUPTED}
        assert store.done_keys() == {A.key()}  # the interrupted trial is not done: it runs again
        store.record_start(Candidate(max_num_seqs=128))
        store.record_result(Candidate(max_num_seqs=128), TrialStatus.FEASIBLE, best=BestPoint(128, 150.0))
        retried = next(t for t in store.trials() if t.candidate.max_num_seqs == 128)
        assert (retried.status, retried.attempts, retried.reason) == (TrialStatus.FEASIBLE, 2, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "/models/other"}, "for model '/models/Llama-3.1-8B', not '/models/other'"),
        ({"slo": PRESETS["aa-100"].to_dict()}, "another slo (mlperf-llama3.1-8b-interactive)"),
        ({"hardware": {"gpu_name": "NVIDIA L4", "gpu_count": 1}}, "another hardware (NVIDIA H100"),
        ({"workload": {"input_len": 128, "output_len": 256}}, "another workload"),
    ],
)
def test_reopen_for_another_run_is_refused(tmp_path: Path, change: dict[str, object], message: str) -> None:
    path = tmp_path / "run.db"
    with TrialStore.open(path, run_meta=META) as store:
        store.record_result(A, TrialStatus.INFEASIBLE, "x")
    other = RunMeta(
        **{**{k: getattr(META, k) for k in ("model", "hardware", "slo", "space", "workload")}, **change}
    )
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        TrialStore.open(path, run_meta=other)
    assert "\n" not in str(info.value)
    with TrialStore.open(path, run_meta=META) as store:  # the refused open changed nothing
        assert [t.key for t in store.trials()] == [A.key()]


def test_changed_space_is_allowed_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    TrialStore.open(path, run_meta=META).close()
    wider = RunMeta(
        META.model, META.hardware, META.slo, {"values": {"max-num-seqs": [64, 128, 256]}}, META.workload
    )
    with TrialStore.open(path, run_meta=wider) as store:
        assert store.run_meta.space == wider.space


def test_one_writer_per_file(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    with TrialStore.open(path, run_meta=META) as store:
        store.record_start(A)
        with pytest.raises(StoreError, match="in use by another infertop tune"):
            TrialStore.open(path, run_meta=META)
        meta, trials = load_run(path)  # reading alongside the writer changes nothing
        assert meta.model == META.model and [t.status for t in trials] == [TrialStatus.RUNNING]
    TrialStore.open(path, run_meta=META).close()  # free again after close


def test_concurrent_records_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    candidates = [Candidate(max_num_seqs=n) for n in range(1, 81)]
    with TrialStore.open(path, run_meta=META) as store:

        def work(chunk: list[Candidate]) -> None:
            for c in chunk:
                store.record_start(c)
                store.record_result(
                    c, TrialStatus.FEASIBLE, best=BestPoint(c.max_num_seqs or 0, 10.0 * (c.max_num_seqs or 0))
                )

        threads = [threading.Thread(target=work, args=(candidates[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with TrialStore.open(path, run_meta=META) as store:
        assert store.done_keys() == {c.key() for c in candidates}
        assert all(t.attempts == 1 for t in store.trials())


def test_running_servers_are_recorded_until_stopped(tmp_path: Path) -> None:
    """What --resume needs after a kill -9: the servers the dead tuner had running."""
    path = tmp_path / "run.db"
    with TrialStore.open(path, run_meta=META) as store:
        store.record_server(A.key(), 4242, 8001, 1234.5)
        store.record_server(B.key(), 4343, 8002, None)
        store.forget_server(4242)
        with pytest.raises(ValueError, match="result status"):
            store.record_result(A, TrialStatus.RUNNING)
    with TrialStore.open(path, run_meta=META) as store:
        [left] = store.servers()
        assert (left.pid, left.port, left.key, left.create_time) == (4343, 8002, B.key(), None)


def test_a_store_of_another_version_says_so(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with TrialStore.open(path, run_meta=META):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    with pytest.raises(StoreError, match=r"another version of infertop.*--store"):
        TrialStore.open(path, run_meta=META)


def test_files_that_are_not_stores(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("hello, this is not SQLite\n" * 100)
    with pytest.raises(StoreError, match="not an infertop trial store"):
        TrialStore.open(text, run_meta=META)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE x (a)")
    with pytest.raises(StoreError, match="not an infertop trial store"):
        TrialStore.open(foreign, run_meta=META)
    with pytest.raises(StoreError, match="no such trial store"):
        load_run(tmp_path / "missing.db")


def test_a_new_store_and_its_journal_are_private_and_a_resumed_one_keeps_its_mode(tmp_path: Path) -> None:
    """Trials hold vLLM's log tails (its command line, what it printed): nobody else's to read."""
    path = tmp_path / "run.db"
    with TrialStore.open(path, run_meta=META) as store:
        store.record_result(B, "failed", "engine died", log_tail="...OOM\n")
        files = [p for p in tmp_path.iterdir() if p.name.startswith("run.db")]
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
    path.chmod(0o640)  # the operator's own choice for an existing run
    with TrialStore.open(path, run_meta=META) as store:
        assert [t.key for t in store.trials()] == [B.key()]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
