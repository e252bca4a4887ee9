"""Outputs are private, whole and never replace something without --force (tuner/outputs.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tuner.outputs import OutputError, check_new, open_private, write_private


def test_written_private_and_whole(tmp_path: Path) -> None:
    path = write_private(tmp_path / "r.json", "{}\n")
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_an_existing_output_is_kept_without_force(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("measured")
    with pytest.raises(OutputError, match="exists: pass --force"):
        check_new(path)
    with pytest.raises(OutputError, match="exists"):
        write_private(path, "new")
    assert path.read_text() == "measured"
    write_private(path, "new", force=True)
    assert path.read_text() == "new"


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "bench.json"
    os.symlink(victim, tmp_path / "bench.json.tmp")  # the old predictable temporary name
    os.symlink(victim, out)
    with pytest.raises(OutputError):
        write_private(out, "results")
    write_private(out, "results", force=True)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and out.read_text() == "results"


def test_an_exception_discards_the_partial_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), open_private(tmp_path / "rec.ndjson") as f:
        f.write("half")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        check_new(tmp_path / "nope" / "r.json")
