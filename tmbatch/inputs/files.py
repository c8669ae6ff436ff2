"""The input as a file: opened (a path, or `-` for stdin), told apart from another, read twice.

What happens to the file before a line is read, shared by the reader, preflight, `estimate`,
status, merge and labels: a directory or a pipe is refused with what to do instead (every pass
over a pipe would consume data the next one needs), and a job's outdir knows its input by a
fingerprint that samples the file rather than reading all of it. How lines are numbered (the
byte-order mark, blank lines, shards) is `lines`; what a line must hold is `reader`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import sys
from typing import IO

from tmbatch.base.files import os_problem
from tmbatch.base.urls import URL_EXTRAS as URL_EXTRAS  # their home for callers
from tmbatch.base.urls import url_scheme as url_scheme


class InputError(Exception):
    """The input as a whole cannot be read (missing, a directory, unreadable)."""


def open_input(path: str) -> IO[bytes]:
    """The input's bytes; a Parquet or CSV table's as JSONL, a line per row (`tables`)."""
    f = open_file(path)
    if path == "-":
        return f
    from tmbatch.inputs.tables import open_table, table_kind

    kind = table_kind(path)
    return f if kind is None else open_table(path, f, kind)


class _UrlFile(io.BufferedReader):
    """An object read through fsspec, with `readline(limit)` as a local file has it (fsspec's
    own takes no limit) and the object's `size` for the fingerprint."""

    @property
    def size(self) -> int:
        return int(self.raw.size)  # type: ignore[attr-defined]


def open_url(path: str, scheme: str) -> IO[bytes]:
    """An input at a URL, through fsspec with the credentials its filesystem reads itself
    (AWS env and profile, AWS_ENDPOINT_URL for MinIO or R2; GCP application default; Azure
    env). A missing filesystem names the extra that brings it."""
    extra = URL_EXTRAS[scheme]
    how = f"pip install 'tmbatch[{extra}]'" if extra else "pip install fsspec aiohttp"
    try:
        import fsspec

        fs, target = fsspec.core.url_to_fs(path)
    except ImportError:
        raise InputError(f"{path}: reading {scheme}:// needs its filesystem: {how}") from None
    except ValueError as exc:  # fsspec: "Protocol not known", a malformed URL
        raise InputError(f"{path}: {exc}") from None
    try:
        return _UrlFile(fs.open(target, "rb", block_size=1 << 20), 1 << 20)
    except FileNotFoundError:
        raise InputError(f"{path}: no such object (check the bucket and the key)") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a prefix, not an object; give the file's URL") from None
    except Exception as exc:  # credentials, network, permissions: one message, no traceback
        raise InputError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


def open_file(path: str) -> IO[bytes]:
    """The file itself, as it is on disk or in its bucket (a table's bytes too)."""
    scheme = url_scheme(path)
    if scheme is not None:
        return open_url(path, scheme)
    if path == "-":
        return sys.stdin.buffer
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; give a JSONL, Parquet or CSV file")
    with contextlib.suppress(OSError):  # missing or unreadable: open() below says which
        if not stat.S_ISREG(os.stat(path).st_mode):
            # A named pipe blocks open() until a writer comes, and every pass over it
            # (preflight, fingerprint, the run) would consume data the next one needs.
            raise InputError(
                f"{path} is not a regular file (a pipe or device); pipe the data to `-` "
                "(stdin, not resumable) or save it to a file first"
            )
    try:
        return open(path, "rb", buffering=1024 * 1024)
    except OSError as exc:
        raise InputError(f"{path}: {os_problem(exc)}") from None


def fingerprint(path: str) -> str:
    """Identify an input without reading all of it: size plus sampled blocks.

    Sampling (head, tail and 256 evenly spaced 4 KiB blocks) keeps resume fast on
    multi-GB inputs and still tells any two different files apart in practice.
    """
    h = hashlib.blake2b(digest_size=16)
    f = open_file(path)
    with f:
        size = getattr(f, "size", None)  # an object in a bucket knows its size
        if not isinstance(size, int):
            size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            for i in range(256):
                f.seek((size * i) // 256)
                h.update(f.read(4096))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
        else:
            h.update(f.read())
    return h.hexdigest()


def seekable(f: IO[bytes]) -> bool:
    """Whether the input can be read again from the start (stdin cannot)."""
    try:
        return f.seekable()
    except (OSError, ValueError):
        return False
