"""The files tmbatch writes: their names, and the only ways it creates and opens them.

Outputs hold prompts and model answers, so every file is created readable by its owner only
(0600) and every directory 0700, whatever the umask. Whole-file outputs (summaries, merged and
ordered files, reports) are written to a temporary name and renamed, so a crash leaves the old
file or the new one, never half of one. An output directory may be shared or planted with
links: no output file is ever opened through a symbolic link (O_NOFOLLOW) or as anything but
a regular file, so tmbatch never appends to, truncates or overwrites a file elsewhere. Every
byte goes through `redact`, so an echoed API key never reaches the disk. Every module that
writes goes through here, so these promises are kept in one place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.redact import SECRETS

JOURNAL = "journal.jsonl"
RESULTS = "results.jsonl"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
LABELS = "labels.jsonl"
LOCK = ".lock"

FILE_MODE = 0o600
DIR_MODE = 0o700
# Out of space, quota, I/O, file too large: the disk's fault, not the user's command (exit 4).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


class OutputError(Exception):
    """An output path that cannot be used as it is; the message names it and the fix."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def os_problem(exc: OSError) -> str:
    """What went wrong with a path, worded for a person, with the fix where there is one."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied; check the file's mode and owner"
    if exc.errno == errno.ELOOP:
        return "is a symbolic link; tmbatch does not follow links to its outputs"
    return f"cannot open ({exc.strerror or exc})"


def output_error(path: Path, exc: OSError, what: str = "cannot write") -> OutputError:
    """A clear error for an output path: exit 4 when the disk is at fault, else 2."""
    if exc.errno in _DISK_ERRNOS:
        return OutputError(f"{what} {path}: {exc.strerror}; free space or fix the disk, then "
                           "run the same command again to resume", ExitCode.IO)
    if isinstance(exc, PermissionError):
        return OutputError(
            f"{what} {path}: permission denied; choose an output directory you can write "
            "(-o DIR), or fix its owner and mode (in a container: run it as the directory's "
            'owner, e.g. docker run --user "$(id -u):$(id -g)")')
    return OutputError(f"{what} {path}: {os_problem(exc)}")


def make_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700; an existing directory is left as it is."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except FileExistsError:
        raise OutputError(f"cannot use {path} as the output directory: a file of that name is "
                          "in the way; give another -o") from None
    except OSError as exc:
        raise output_error(path, exc, "cannot create the output directory") from None


def open_private(path: Path, flags: int) -> int:
    """Open an output file: never through a link, only a regular file, created 0600."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise output_error(path, exc, "cannot open") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path} is not a regular file; move it out of the output directory")
    return fd


def open_append(path: Path) -> int:
    """An append-only descriptor for one of the run's growing outputs."""
    return open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def check_not_link(path: Path) -> None:
    """Refuse a planted link (or a directory, fifo...) where an output file belongs."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path} is a symbolic link; tmbatch never writes through links in "
                          "an output directory: remove it (or use another -o)")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} is not a regular file; move it out of the output directory")


class _Output:
    """A file being written whole, buffered here so that only `write` and `finish` touch the
    disk: every secret is dropped from its bytes, and a failed write is reported as the
    output's problem (exit 4 for a full disk), not as a crash."""

    BUFFER = 1 << 20

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self._path = fd, path
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += SECRETS.data(data) if SECRETS else data
        if len(self._buf) >= self.BUFFER:
            self._drain()
        return len(data)

    def _drain(self) -> None:
        view = memoryview(self._buf)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise output_error(self._path, exc) from None
        finally:
            view.release()
        self._buf.clear()

    def finish(self) -> None:
        self._drain()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise output_error(self._path, exc) from None


@contextmanager
def atomic_writer(path: Path) -> Iterator[_Output]:
    """Write `path` through a new temporary file renamed over it when the block ends cleanly.

    The temporary file is created exclusively and never through a link; the rename replaces a
    link at `path` itself, not what it points to.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        os.unlink(tmp)  # left by a crashed process that had our pid: a link is never followed
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        out = _Output(fd, path)
        yield out
        out.finish()
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise output_error(path, exc) from None
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (a crash leaves the old or the new file)."""
    with atomic_writer(path) as f:
        f.write(data)
