"""The commands that read or write a finished run on an output URL (status, report, export,
merge, resend): the bucket's segments are fetched into a temporary directory and the local
code runs on it as on any directory; what a command writes beside the outputs (an ordered
export, a report, a merged output) is put back in the bucket.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tmbatch.journal.remote import publish, stored_segments
from tmbatch.journal.store import Lease, Store, is_remote
from tmbatch.run.remote import ENV_WORK_DIR, fetch, work_dir_for


@contextlib.contextmanager
def local_copy(output: str) -> Iterator[Path]:
    """OUTPUT itself when it is a directory; a URL's read-only copy in a temporary directory
    (removed afterwards) when it is a bucket."""
    if not is_remote(output):
        yield Path(output)
        return
    with tempfile.TemporaryDirectory(prefix="tmbatch-") as tmp:
        yield fetch(output, Path(tmp) / "out")


def put_new_files(url: str, local: Path, before: set[str]) -> list[str]:
    """Put the files (recursively) a command wrote in the copy of `url` into the bucket;
    their URLs."""
    store = Store(url)
    done = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel not in before:
            store.put(rel, path.read_bytes())
            done.append(store.where(rel))
    return done


def files_of(local: Path) -> set[str]:
    return {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}


def publish_dir(url: str, local: Path) -> None:
    """A directory made here (a merge) becomes the output at `url`: one base segment (so
    `status` and `resend` read it as any output URL) and its files beside it, under the
    URL's lease."""
    store = Store(url)
    lease = Lease(store)
    lease.take()
    try:
        seqs = stored_segments(store)
        publish(store, local, (seqs[-1] + 1) if seqs else 0)
    finally:
        lease.release()


def work_dir(url: str) -> Path:
    """The working directory a run on `url` uses (TMBATCH_WORK_DIR or the cache's)."""
    return work_dir_for(url, os.environ.get(ENV_WORK_DIR, "").strip() or None)
