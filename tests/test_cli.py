"""The `infertop` command: help, one-line errors, headless recording."""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tui.cli import main

INFERTOP = [sys.executable, "-m", "tui.cli"]


def test_help_lists_the_subcommands_and_does_not_import_textual() -> None:
    code = "import sys; from tui.cli import main; main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True, check=False)
    assert "infertop record FILE" in out.stdout
    probe = "import sys, tui.cli; print('textual' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"  # --help stays instant


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replay", "/nonexistent/file.ndjson"], "cannot read"),
        (["--replay", __file__], "not an infertop recording"),
        (["--interval", "0"], "interval_s must be between"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_record_writes_a_replayable_file(tmp_path: Path) -> None:
    out = tmp_path / "rec.ndjson"
    run = subprocess.run(
        [
            *INFERTOP,
            "record",
            str(out),
            "--duration",
            "1.2",
            "--interval",
            "0.1",
            "--no-discover",
            "--label",
            "ci",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "infertop-recording" and header["label"] == "ci"
    snapshots = [json.loads(line) for line in lines[1:]]
    assert 6 <= len(snapshots) <= 14
    assert all(s["host"]["cpu_count"] >= 1 for s in snapshots)
    assert "wrote" in run.stderr


def test_record_to_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = subprocess.run(
        [*INFERTOP, "record", str(blocker / "sub" / "rec.ndjson"), "--duration", "0.1", "--no-discover"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.strip().startswith("infertop: cannot write") and "Traceback" not in run.stderr


# --- record: a private file, never over another, whole however it is stopped --------------------------


def test_record_refuses_an_existing_file_before_it_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rec.ndjson"
    out.write_text("an older recording\n")

    def no_sampling() -> None:
        raise AssertionError("the GPUs were opened before the output was checked")

    monkeypatch.setattr("tuner.telemetry.nvml.NvmlBackend", no_sampling)
    assert main(["record", str(out), "--duration", "0.1", "--no-discover"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"infertop: {out} exists: pass --force to replace it"
    assert out.read_text() == "an older recording\n"


def test_record_force_replaces_the_file_with_a_private_one(tmp_path: Path) -> None:
    out = tmp_path / "rec.ndjson.gz"
    out.write_text("an older recording\n")
    out.chmod(0o644)
    run = subprocess.run(
        [*INFERTOP, "record", str(out), "--force", "--duration", "0.3", "--interval", "0.1", "--no-discover"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline())["format"] == "infertop-recording"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_recording_stopped_by_a_signal_is_whole_and_private(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "rec.ndjson"
    child = subprocess.Popen(
        [*INFERTOP, "record", str(out), "--interval", "0.05", "--no-discover"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stderr is not None
        assert "recording" in child.stderr.readline()  # sampling has started
        time.sleep(0.5)
        child.send_signal(signum)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = out.read_text().splitlines()
    assert len(lines) >= 3 and all(json.loads(line) for line in lines)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["record", "{tmp}/r.ndjson", "--duration", "nan"], "--duration must be"),
        (["--record", "{tmp}/old.ndjson"], "old.ndjson exists: pass --force"),
        (["--record", "{tmp}/no/such/dir/r.ndjson"], "does not exist"),
        (["--replay", "{tmp}/old.ndjson", "--speed", "nan"], "--speed must be"),
        (["--host", "node-2", "--host-interval", "inf"], "--host-interval must be"),
    ],
)
def test_bad_numbers_and_outputs_are_one_line_and_exit_2(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "old.ndjson").write_text("an older recording\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# --- replay: checked before Textual starts ------------------------------------------------------------

HEADER = '{"type":"header","format":"infertop-recording","version":1,"system":{"state":"ok"}}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (HEADER, "holds no readable snapshot"),
        (HEADER + '{"type":"snapshot","gpus":[]}\n', "holds no readable snapshot (1 lines skipped)"),
        (
            HEADER + '{"type":"snapshot","time_s":NaN}\n{"type":"snapshot","time_s":1e999}\n',
            "2 lines skipped",
        ),
        ('{"format":"infertop-recording","version":[1]}\n', "header is damaged"),
        ('{"format":"infertop-recording","system":"a GPU"}\n', "header is damaged"),
    ],
)
def test_replay_of_a_file_without_a_snapshot_to_show_is_one_line_and_exit_2(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.ndjson"
    path.write_text(content)
    assert main(["--replay", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and "\n" not in err


# --- --hosts: a file that cannot be read is named ------------------------------------------------------


def _hosts_missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.txt"


def _hosts_directory(tmp_path: Path) -> Path:
    return tmp_path


def _hosts_binary(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _hosts_fifo(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.fifo"
    os.mkfifo(path)  # reading it would wait for a writer forever
    return path


def _hosts_huge(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.txt"
    path.write_text("node-1\n" * 200_000)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_hosts_missing, "No such file"),
        (_hosts_directory, "a directory"),
        (_hosts_binary, "not a text file"),
        (_hosts_fifo, "not a regular file"),
        (_hosts_huge, "no list of hosts"),
    ],
)
def test_an_unreadable_hosts_file_is_named_in_one_line(
    tmp_path: Path, make: Callable[[Path], Path], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path)
    assert main(["--hosts", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"infertop: --hosts {path}: ") and message in err and "\n" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_hosts_file_without_read_permission_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hosts.txt"
    path.write_text("node-1\n")
    path.chmod(0)
    assert main(["--hosts", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"infertop: --hosts {path}: Permission denied"
