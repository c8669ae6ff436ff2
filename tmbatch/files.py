"""The files tmbatch writes: their names, and the only ways it creates them.

Outputs hold prompts and model answers, so every file is created readable by its owner only
(0600) and every directory 0700, whatever the umask. Whole-file outputs (summaries, merged and
ordered files, reports) are written to a temporary name and renamed, so a crash leaves the old
file or the new one, never half of one. Every module that writes goes through here, so these
promises are kept in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

JOURNAL = "journal.jsonl"
RESULTS = "results.jsonl"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
LABELS = "labels.jsonl"
LOCK = ".lock"

FILE_MODE = 0o600
DIR_MODE = 0o700


def os_problem(exc: OSError) -> str:
    """What went wrong with a path, worded for a person, with the fix where there is one."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied; check the file's mode and owner"
    return f"cannot open ({exc.strerror or exc})"


def make_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700; an existing directory is left as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)


def open_append(path: Path) -> int:
    """An append-only descriptor for one of the run's growing outputs."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)


@contextmanager
def atomic_writer(path: Path, mode: int = FILE_MODE) -> Iterator[IO[bytes]]:
    """Write `path` through a temporary file renamed over it when the block ends cleanly."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` in one step (a crash leaves the old or the new file)."""
    with atomic_writer(path, mode) as f:
        f.write(data)

