"""A run whose output is a bucket: its lease, its working directory rebuilt from the bucket,
its segments shipped while it sends, and the outputs published when it ends.

The order is the one of a local run (`outdir`): the working directory's own lock, then the
output URL's lease (a second run on the URL stops here, having changed nothing), then
`--restart` moves the bucket's objects aside, then the working directory is rebuilt from the
segments, and only then is the journal read. The pieces are in `journal.store` (the bucket,
the lease) and `journal.remote` (segments, group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from tmbatch.base.files import make_dir
from tmbatch.journal.remote import Shipper, discard, move_aside, publish, restore
from tmbatch.journal.store import LEASE_SECONDS, Lease, Store, StoreError

log = logging.getLogger("tmbatch")

ENV_WORK_DIR = "TMBATCH_WORK_DIR"


def work_dir_for(url: str, root: str | None = None) -> Path:
    """Where a run on `url` keeps its output directory: `root` (--work-dir, TMBATCH_WORK_DIR)
    or the user's cache directory, in a subdirectory named after the URL, so two outputs
    never share one and the same URL finds its own again."""
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
            os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "tmbatch", "work")
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "out"
    return Path(root) / f"{tail}-{key}"


class RemoteOutput:
    """One run's hold on an output URL (the module docstring gives the order)."""

    def __init__(self, url: str, work: Path) -> None:
        self.url = url
        self.work = work
        self.store = Store(url)
        self.lease = Lease(self.store)
        self.seq = 0
        self.sizes = [0, 0, 0]
        self.shipper: Shipper | None = None
        self._renewer: asyncio.Task[None] | None = None

    def open(self, restart: bool) -> None:
        """Take the lease, then rebuild the working directory from the bucket."""
        self.lease.take()
        try:
            if restart:
                aside = move_aside(self.store)
                if aside is not None:
                    log.warning("--restart: the previous run's objects were moved to %s", aside)
            self.seq, self.sizes = restore(self.store, self.work)
        except BaseException:
            self.lease.release()
            raise

    def discard(self) -> None:
        """The journal there recorded nothing sent: a new job starts from nothing."""
        discard(self.store)
        self.seq, self.sizes = 0, [0, 0, 0]

    def start(self, on_error: Callable[[StoreError], None]) -> Shipper:
        """Ship segments (and renew the lease) from now until `finish`."""
        self.shipper = Shipper(self.store, self.work, self.seq, self.sizes, on_error)
        self.shipper.start()
        self._renewer = asyncio.get_running_loop().create_task(self._renew(on_error))
        return self.shipper

    async def _renew(self, on_error: Callable[[StoreError], None]) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                await asyncio.to_thread(self.lease.renew)
            except StoreError as exc:
                if self.shipper is not None:
                    self.shipper._fail(exc)
                on_error(exc)
                return

    async def finish(self) -> None:
        """Ship what is left as one base segment and publish the outputs; raises StoreError
        (exit 4) when the bucket cannot take them (the run resumes from what it holds)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        shipper, self.shipper = self.shipper, None
        if shipper is None:
            return
        await shipper.drain()
        self.seq = await asyncio.to_thread(publish, self.store, self.work, shipper.seq)
        log.info("%s: %d segment(s) shipped; results.jsonl and failures.jsonl published",
                 self.url, shipper.segments + 1)

    def release(self) -> None:
        self.lease.release()


def fetch(url: str, into: Path) -> Path:
    """A read-only copy of an output URL's directory in `into` (status, report, export,
    merge, resend's listing): the local code then reads it as it reads any directory."""
    make_dir(into)
    restore(Store(url), into, tidy=False)
    return into

