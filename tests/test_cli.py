"""The `infertop` command: help, one-line errors, headless recording."""

from __future__ import annotations

import json
import subprocess
import sys
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
