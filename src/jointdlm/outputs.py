"""Output paths: checked before the work starts, written all or nothing (a failed run leaves no partial file)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def _check_parents(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory (so `mkdir(parents=True)` can succeed)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a directory")
            return


def _as_path(path: str | Path, kind: str) -> Path:
    if not str(path).strip():
        raise ValueError(f"the output {kind} path is empty")
    return Path(path)


def check_output_file(path: str | Path) -> Path:
    """A path a file can be written to: not an existing directory, and not below an existing file."""
    path = _as_path(path, "file")
    if path.is_dir():
        raise ValueError(f"output file {path} is a directory; give a file path")
    _check_parents(path)
    return path


def check_output_dir(path: str | Path) -> Path:
    """A path a directory can be created at (or already is): not an existing file, and not below one."""
    path = _as_path(path, "directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {path} is a file, not a directory")
    _check_parents(path)
    return path


def new_file_mode() -> int:
    """The mode `open` would give a new file under this process's umask. `tempfile.mkstemp` makes its file
    private (0600) whatever the umask, and a temporary file renamed into place would keep that."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[TextIO]:
    """A text file open for writing at `path`, through a temporary file in the same directory that replaces `path`
    when the block ends and is removed if anything fails: readers see the old file or the whole new one, never a
    partial one. Large outputs can be written in parts without holding them in memory."""
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, new_file_mode())
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` all or nothing (see `atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)
