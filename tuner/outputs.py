"""Files infertop writes for its user: private, whole, and never over something already there.

Every output (a recording, bench results, a tune log, a report, an exported YAML) goes through here:

- it is written to a fresh temporary file in the same directory, created exclusively with mode 0600 and an
  unpredictable name (so a planted ``<out>.tmp`` symlink is never followed), then renamed into place, so a
  reader or a crash never sees half a file;
- an existing output is never replaced unless the user said ``--force``; without it the rename is a hard
  link that fails when the name exists, so even a file created meanwhile is kept;
- a CLI checks its outputs with :func:`check_new` before it measures anything, so a refusal costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any

PRIVATE_MODE = 0o600


class OutputError(Exception):
    """An output cannot be written; the message is one line for the user."""


def exists_message(path: Path) -> str:
    return f"{path} exists: pass --force to replace it"


def check_new(path: str | Path, *, force: bool = False) -> Path:
    """Refuse, before any work, an output that exists (unless ``force``) or whose directory is missing."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise OutputError(exists_message(path))
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    return path


class PrivateFile:
    """A file being written: mode 0600 under a temporary name, renamed to ``path`` by :meth:`commit`.

    ``open_private(path)`` is the usual way in; leaving its ``with`` block normally commits, an exception
    discards. A streaming writer (a recording) keeps one open and commits on close.
    """

    def __init__(self, path: str | Path, *, force: bool = False, binary: bool = False) -> None:
        self.path = Path(path)
        self.force = force
        directory = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=directory)
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror or error}") from None
        os.fchmod(fd, PRIVATE_MODE)
        self.tmp = Path(tmp)
        self.file: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        self.done = False

    def commit(self) -> Path:
        """Flush, sync and rename into place; :class:`OutputError` (and the temporary file kept) on failure."""
        if self.done:
            return self.path
        self.done = True
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            _place(self.tmp, self.path, force=self.force)
        except OSError as error:
            with contextlib.suppress(OSError):
                self.file.close()
            raise OutputError(
                f"cannot write {self.path}: {error.strerror or error} (what was written is in {self.tmp})"
            ) from None
        return self.path

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def open_private(path: str | Path, *, force: bool = False, binary: bool = False) -> PrivateFile:
    return PrivateFile(path, force=force, binary=binary)


def write_private(path: str | Path, data: str | bytes, *, force: bool = False) -> Path:
    """Write ``data`` whole to a new 0600 file at ``path`` (see the module's rules)."""
    with open_private(path, force=force, binary=isinstance(data, bytes)) as f:
        f.write(data)
    return Path(path)


def _place(tmp: Path, path: Path, *, force: bool) -> None:
    if force:
        os.replace(tmp, path)  # replaces a symlink itself, never the file it points to
        return
    try:
        os.link(tmp, path)  # fails if the name exists, even if it appeared since check_new
    except FileExistsError:
        raise OSError(17, f"{path} exists (pass --force to replace it)") from None
    except OSError:
        # Filesystems without hard links (some FUSE, vfat): fall back to a checked rename.
        if path.exists() or path.is_symlink():
            raise OSError(17, f"{path} exists (pass --force to replace it)") from None
        os.replace(tmp, path)
        return
    tmp.unlink(missing_ok=True)
