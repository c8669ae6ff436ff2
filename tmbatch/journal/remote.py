"""A journal that lives in a bucket: numbered segments, shipped by group commit.

With `-o s3://bkt/out/` the run writes its output directory as always, in a local working
directory, and ships what it appends to `journal.jsonl`, `results.jsonl` and `failures.jsonl`
to the bucket as segments: `segments/000000000042.seg`, one object each, numbered without a
gap. A segment holds a small header line (its number, whether it is a base, the byte counts)
and the appended bytes of the three files, so the bucket's segments, read in order, rebuild
the three files byte for byte (the journal's marks point at offsets of the results: they
stay true).

The contract does not bend: a dispatch record is durable before its request's bytes leave.
The sender calls `Shipper.durable` between writing the dispatch record (locally) and sending;
it returns once a segment holding that record is stored, and every segment before it (a
resume reads the segments up to the first gap only). Dispatch records gathered over a few
milliseconds (`WINDOW`) go in one segment, uploads overlap (`PARALLEL`), and the requests
they cover are sent when theirs is stored: group commit. Outcomes ride along, and are
shipped by themselves every `INTERVAL` when no request waits.

A segment is taken between two event-loop callbacks, when the writer (which writes on the
loop, synchronously) has written whole records: results and failures before the journal
records that point at them, as on a local disk.

At the end (`publish`), one base segment (`NNN.base`, built in a local temporary file and
streamed up) holds the whole of the three files (after the writer's own compaction of
superseded failures), the segments before it are deleted, and
`results.jsonl`, `failures.jsonl`, `summary.json` (and the table, the ordered files) are put
beside them, where a data engineer expects them.

A fresh pod with an empty disk (`restore`): the segments from the last base on, up to the
first gap, are written into the working directory, and the run resumes from there exactly
as from a local directory. Segments past a gap (their uploads raced a crash) are deleted: no
request they covered was sent, since none was released before every segment before it was
stored. What the local working directory held beyond the bucket is dropped: the bucket is
the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from tmbatch.base.files import FAILURES, JOURNAL, RESULTS, SUMMARY, open_append
from tmbatch.journal.store import SEGMENTS, Store, StoreError

log = logging.getLogger("tmbatch")
T = TypeVar("T")

FILES = (JOURNAL, RESULTS, FAILURES)  # the files segments carry, in this order
WINDOW = 0.010  # seconds dispatch records are gathered into one segment (bench/remote_bench.py)
INTERVAL = 0.25  # seconds between segments of outcomes alone
PARALLEL = 2  # uploads in flight: fewer, larger segments cost less CPU (remote_bench.py)
SUFFIX = ".seg"
BASE = ".base"
CHUNK = 1 << 20  # bytes copied at a time when a base segment is streamed


def seg_name(seq: int, base: bool = False) -> str:
    """A segment's object name; a base segment's ends in `.base`, so a start finds the last
    one without reading the others."""
    return f"{SEGMENTS}/{seq:012d}{BASE if base else SUFFIX}"


def encode(seq: int, chunks: list[bytes], base: bool = False) -> bytes:
    head = orjson.dumps({"seq": seq, "base": base, "sizes": [len(c) for c in chunks]})
    return head + b"\n" + b"".join(chunks)


def decode(data: bytes) -> tuple[dict[str, Any], list[bytes]] | None:
    """A segment's header and its three chunks; None for a damaged one (a partial object on
    a filesystem without atomic writes: treated as not stored)."""
    head, sep, body = data.partition(b"\n")
    try:
        meta = orjson.loads(head)
        sizes = [int(n) for n in meta["sizes"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if not sep or len(sizes) != len(FILES) or sum(sizes) != len(body):
        return None
    chunks, at = [], 0
    for n in sizes:
        chunks.append(body[at:at + n])
        at += n
    return meta, chunks


def stored_segments(store: Store) -> list[tuple[int, bool]]:
    """The segments in the bucket, ascending: (number, whether it is a base)."""
    out = []
    for name in store.listing(SEGMENTS):
        for suffix, base in ((SUFFIX, False), (BASE, True)):
            stem = name[:-len(suffix)] if name.endswith(suffix) else ""
            if stem.isdigit():
                out.append((int(stem), base))
    return sorted(out)


def restore(store: Store, work: Path, *, tidy: bool = True) -> tuple[int, list[int]]:
    """Rebuild the three files in `work` from the bucket (the module docstring says which
    segments count): the last base segment streamed, the segments after it in memory.
    Returns the next segment's number and the files' sizes. `tidy=False` (a read-only
    command) deletes nothing in the bucket; otherwise a job left in many segments (a run
    that died) is folded into one base segment, for the next start."""
    stored = stored_segments(store)
    start = max((i for i, (_, base) in enumerate(stored) if base), default=0)
    stale, rest = stored[:start], stored[start:]
    for name in (*FILES, SUMMARY):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(work / name)
    sizes, expect, read = [0] * len(FILES), rest[0][0] if rest else 0, 0
    if rest and rest[0][1]:
        sizes = _restore_base(store, seg_name(rest[0][0], True), work)
        rest, expect, read = rest[1:], expect + 1, 1
    fetched = store.get_many([seg_name(s) for s, _ in rest])
    usable = []
    for seq, _ in rest:
        data = fetched.get(seg_name(seq))
        got = None if data is None else decode(data)
        if seq != expect or got is None:
            break
        usable.append(got[1])
        expect += 1
    for i, name in enumerate(FILES):
        data = b"".join(chunks[i] for chunks in usable)
        if data:
            _append(work / name, data)
        sizes[i] += len(data)
    if tidy:
        orphans = [(s, b) for s, b in stored if s >= expect]
        if orphans:
            log.warning("%s: %d segment(s) past the last complete one were dropped (their "
                        "requests were never sent)", store.url, len(orphans))
        store.remove([seg_name(s, b) for s, b in stale + orphans])
        if read + len(usable) > 1:
            expect = rebase(store, work, expect)
    summary = store.get(SUMMARY) if read + len(usable) else None
    if summary is not None:
        (work / SUMMARY).write_bytes(summary)
    return expect, sizes


def _append(path: Path, data: bytes) -> None:
    fd = open_append(path)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_base(store: Store, name: str, work: Path) -> list[int]:
    """A base segment streamed through a temporary file into the three files; their sizes.
    A damaged base is an error, never read as less than it holds."""
    tmp = work / ".base.tmp"
    try:
        if not store.get_file(name, tmp):
            raise StoreError(f"{store.where(name)} went away while it was read; run again")
        with open(tmp, "rb") as f:
            head = f.readline()
            meta = orjson.loads(head) if head.endswith(b"\n") else None
            if not isinstance(meta, dict):
                raise ValueError("no header")
            sizes = [int(n) for n in meta.get("sizes", [])]
            if len(sizes) != len(FILES) or sum(sizes) != os.fstat(f.fileno()).st_size - len(
                    head):
                raise StoreError(f"{store.where(name)} is damaged (its sizes do not add "
                                 "up); restore it from the bucket's versions, or --restart")
            for file, n in zip(FILES, sizes, strict=True):
                if n:
                    with os.fdopen(open_append(work / file), "wb") as out:
                        _copy(f, out, n)
                        out.flush()
                        os.fsync(out.fileno())
        return sizes
    except (orjson.JSONDecodeError, ValueError, TypeError):
        raise StoreError(f"{store.where(name)} is damaged (not a segment); restore it from "
                         "the bucket's versions, or --restart") from None
    finally:
        tmp.unlink(missing_ok=True)


def _copy(src: Any, dst: Any, n: int) -> None:
    while n > 0:
        buf = src.read(min(n, CHUNK))
        if not buf:
            raise ValueError("short")
        dst.write(buf)
        n -= len(buf)


def discard(store: Store) -> None:
    """Delete every segment (a new job starts in this URL)."""
    store.remove([seg_name(s, b) for s, b in stored_segments(store)])


def move_aside(store: Store) -> str | None:
    """`--restart`: the job's objects go under `previous-<time>/`, as a local directory's
    files go to a subdirectory; the URL they went to, or None when there was nothing."""
    names = [seg_name(s, b) for s, b in stored_segments(store)]
    names += [n for n in (RESULTS, FAILURES, SUMMARY) if n in store.listing("")]
    if not names:
        return None
    aside = f"previous-{time.strftime('%Y%m%dT%H%M%S')}"
    for name in names:
        store.copy(name, f"{aside}/{name}")
    store.remove(names)
    return store.where(aside)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Shipper:
    """Group commit: the local files' new bytes go to the bucket as numbered segments, and
    `durable()` returns once everything written before it is stored."""

    def __init__(self, store: Store, work: Path, seq: int, sizes: list[int],
                 on_error: Callable[[StoreError], None] | None = None) -> None:
        self.store, self.work = store, work
        self.seq = seq
        self.sent = list(sizes)  # bytes of each file already cut into a segment
        self.error: StoreError | None = None
        self.on_error = on_error
        self.segments = 0
        self._next: asyncio.Future[None] | None = None  # what the next segment releases
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(PARALLEL)
        self._last: asyncio.Task[None] | None = None  # the latest upload (they chain)
        self._task: asyncio.Task[None] | None = None
        self._fds: dict[str, int] = {}

    # -- the sender's side ----------------------------------------------
    async def durable(self) -> None:
        """Wait until the journal as written now is in a stored segment (and every one before
        it): called after a dispatch record is written, before its request is sent."""
        if self.error is not None:
            raise self.error
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        self._wake.set()
        await asyncio.shield(fut)

    def guard(self, send: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """`send` that first waits for its dispatch record to be stored."""
        async def durable_send(*args: Any, **kwargs: Any) -> T:
            await self.durable()
            return await send(*args, **kwargs)
        return durable_send

    # -- the loop -------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self.error is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), INTERVAL)
            if self._next is not None:
                await asyncio.sleep(WINDOW)  # gather the dispatches of the next few ms
            self._wake.clear()
            await self._slots.acquire()
            if not self._cut():
                self._slots.release()

    def _cut(self) -> bool:
        """Take what the files hold now as the next segment and start its upload; False when
        there was nothing new (a waiter is then released with the uploads before it)."""
        fut, self._next = self._next, None
        chunks = self._read_new()
        if not any(chunks):
            if fut is not None:
                prev = self._last
                self._last = asyncio.get_running_loop().create_task(self._after(prev, fut))
            return False
        seq, self.seq = self.seq, self.seq + 1
        data = encode(seq, chunks)
        prev = self._last
        self._last = asyncio.get_running_loop().create_task(self._upload(seq, data, prev, fut))
        return True

    def _read_new(self) -> list[bytes]:
        chunks = []
        for i, name in enumerate(FILES):
            fd = self._fds.get(name)
            if fd is None:
                try:
                    fd = self._fds[name] = os.open(self.work / name, os.O_RDONLY)
                except FileNotFoundError:
                    chunks.append(b"")
                    continue
            size = os.fstat(fd).st_size
            data = os.pread(fd, size - self.sent[i], self.sent[i]) if size > self.sent[i] else b""
            self.sent[i] += len(data)
            chunks.append(data)
        return chunks

    async def _upload(self, seq: int, data: bytes, prev: asyncio.Task[None] | None,
                      fut: asyncio.Future[None] | None) -> None:
        try:
            try:
                await asyncio.to_thread(self.store.put, seg_name(seq), data)
            finally:
                self._slots.release()
            self.segments += 1
        except StoreError as exc:
            self._fail(exc)
        await self._after(prev, fut)

    async def _after(self, prev: asyncio.Task[None] | None,
                     fut: asyncio.Future[None] | None) -> None:
        """Release `fut` once every earlier upload is done (a resume reads up to a gap)."""
        if prev is not None:
            await prev
        if fut is None or fut.done():
            return
        if self.error is not None:
            fut.set_exception(self.error)
            fut.exception()  # retrieved: a waiter may have been cancelled meanwhile
        else:
            fut.set_result(None)

    def _fail(self, exc: StoreError) -> None:
        if self.error is None:
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    async def drain(self) -> None:
        """Stop the loop and ship what is left; raises the store's error if one happened."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.error is None:
            await self._slots.acquire()
            if not self._cut():
                self._slots.release()
        if self._last is not None:
            await self._last
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.error is not None:
            raise self.error


def rebase(store: Store, work: Path, seq: int) -> int:
    """One base segment (number `seq`) with the whole of the three files, built in a local
    temporary file and streamed up, then the older segments deleted: what a later start
    reads is one object. Returns the next segment's number."""
    paths = [work / name for name in FILES]
    sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
    tmp = work / f".base-{seq}.tmp"
    try:
        with open(tmp, "wb") as out:
            out.write(orjson.dumps({"seq": seq, "base": True, "sizes": sizes}) + b"\n")
            for path, n in zip(paths, sizes, strict=True):
                if n:
                    with open(path, "rb") as src:
                        _copy(src, out, n)
        store.put_file(seg_name(seq, True), tmp)
    finally:
        tmp.unlink(missing_ok=True)
    store.remove([seg_name(s, b) for s, b in stored_segments(store) if s < seq])
    return seq + 1


def publish(store: Store, work: Path, seq: int) -> int:
    """The end of a run (or a merge into a URL): a base segment (`rebase`), and the outputs
    put beside it. Returns the next segment's number."""
    seq = rebase(store, work, seq)
    for path in sorted(work.iterdir()):
        if path.is_file() and path.name != JOURNAL and not path.name.startswith(".") and (
                ".torn-" not in path.name):
            store.put_file(path.name, path)
    return seq
