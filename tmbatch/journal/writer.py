"""The one owner of `results.jsonl`, `failures.jsonl` and `journal.jsonl`.

Everything runs on the event loop thread, so there is exactly one writer and no
locks. Order is the crash-safety argument: a dispatch record reaches the OS
before the request's bytes leave, and a result reaches the OS before the
journal record that says it exists. Outcomes that finish in the same loop tick
are written with one syscall per file.

A dispatch record is written by `dispatch` itself, with its own write(2), before
it returns (and so before the sender hands the request to aiohttp). It does not
wait for, nor force out, the outcomes queued for the end of the tick: an outcome
is about another line (a line with an outcome is not sent again in the same
run), so a dispatch record may land before it without changing what a resume
reads. Records whose place relative to a dispatch does matter (a retried
line's `pending`, a spend snapshot made when it was queued, a pause) make the
next dispatch flush everything queued first, in order; the snapshot each write
carries after an attempt ended is made at the write itself (`spend_changed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.defaults import FSYNC
from tmbatch.base.files import FAILURES, JOURNAL, RESULTS, atomic_writer, open_append
from tmbatch.base.redact import SECRETS
from tmbatch.journal.compact import IN_FLIGHT, OK, LineStates
from tmbatch.journal.format import (
    CACHED,
    BudgetRecord,
    DispatchRecord,
    Header,
    MarkRecord,
    OutcomeRecord,
    PauseRecord,
    ResumeRecord,
    SpendRecord,
    decode,
)
from tmbatch.journal.records import FailureRecord, ResultRecord, line_of
from tmbatch.policy import Outcome

log = logging.getLogger("tmbatch")
FSYNC_MODES = ("always", "interval", "never")


class WriterError(Exception):
    """A write to the output directory failed (disk full, I/O error); the run must stop."""


class Writer:
    def __init__(self, out_dir: Path, states: LineStates, fsync: str = FSYNC.value) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}")
        self.out_dir = out_dir
        self.states = states
        self.fsync_mode = fsync
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        for name in (RESULTS, FAILURES, JOURNAL):
            fd = open_append(out_dir / name)
            self._fds[name] = fd
            self._sizes[name] = os.fstat(fd).st_size
        self._res: list[bytes] = []
        self._fail: list[bytes] = []
        self._jour: list[bytes] = []
        self._scheduled = False
        # A queued journal record that must stay before the next dispatch record (see the
        # module docstring); False while only outcomes (results, failures) are queued.
        self._ordered = False
        self._always = fsync == "always"
        self._now: float | None = None  # this tick's outcome time (`_stamp`)
        self._dirty = False
        self.superseded = False
        self.error: WriterError | None = None
        self._fsync_task: asyncio.Task[None] | None = None
        self.before_close: list[Callable[[], None]] = []  # last records (a spend snapshot)
        # the budget's `due`: a spend snapshot to write after the outcomes it counts, or None
        self.spend_snapshot: Callable[[], SpendRecord | None] | None = None

    # -- journal records ------------------------------------------------
    def header(self, record: Header | ResumeRecord | BudgetRecord | dict[str, Any]) -> None:
        """A run's own record (its header, its resume, its budget), written at once. A dict
        (the budget's) is decoded first: the writer writes nothing the reader would refuse."""
        if isinstance(record, dict):
            record = decode(orjson.dumps(record))
        self._jour.append(record.to_json())
        self.flush()

    def dispatch(self, line: int, attempt: int, custom_id: str,
                 reserved: list[Any] | None = None) -> None:
        """Record that this line's bytes are about to leave; durable before it returns.
        `reserved`: the attempt's worst case under a budget, counted if a crash cuts it off."""
        record = DispatchRecord.of(line, attempt, custom_id, reserved)
        if self.states.replace(line, IN_FLIGHT):  # _note_supersede: a resend's old failure
            self.superseded = True  # goes at close
        if self._ordered or self._always:
            # what is queued first, with its spend snapshot, which this attempt is not in yet
            self.flush()
            self._write_bytes(JOURNAL, record)
            self._dirty = True
            if self._always:
                self._fsync_all()
            return
        # Only outcomes of other lines are queued: this record goes out alone, now; they
        # follow at the end of the tick, all in one write per file (module docstring).
        if self.error is not None:
            raise self.error
        self._write_bytes(JOURNAL, record)
        self._dirty = True

    def result(self, record: ResultRecord, latency: float | None = None,
               ttft: float | None = None) -> None:
        """A success, journaled with its time and latency (ms) for `tmbatch report`.
        Once per answer: `_note_supersede` and `_stamp` are inlined."""
        if self.error is not None:
            return  # the disk failed: never counted done, the line stays of unknown outcome
        line = record.line
        data = record.to_json()
        if self.states.replace(line, OK):  # _note_supersede
            self.superseded = True
        self._res.append(data)
        t = self._now
        if t is None:
            t = self._now = round(time.time(), 3)
        if record.cached:  # answered from the response cache: nothing was sent (format.py)
            self._jour.append(OutcomeRecord(line, Outcome.OK, CACHED, t).to_json())
        else:
            self._jour.append(OutcomeRecord.ok_json(
                line, t, None if latency is None else round(latency * 1000.0, 2),
                None if ttft is None else round(ttft * 1000.0, 2)))
        if not self._scheduled or self._always:
            self._schedule()

    def failure(self, record: FailureRecord) -> None:
        if self.error is not None:
            return  # as `result`: nothing more is written, so nothing more is counted
        line = record.line
        self._note_supersede(line)
        self._fail.append(record.to_json())
        self._jour.append(OutcomeRecord(line, record.outcome, record.code,
                                        self._stamp()).to_json())
        self.states.set(line, record.outcome.policy.state)
        self._schedule()

    def _stamp(self) -> float:
        """An outcome's time, to the millisecond: the outcomes one loop tick records share
        the time its first one was recorded at (round() costs more than the rest of the
        record; they all reach the OS together at the end of the tick)."""
        t = self._now
        if t is None:
            t = self._now = round(time.time(), 3)
        return t

    def pause(self, seconds: float) -> None:
        """A Retry-After pause of every worker, for the report's timeline; resume ignores it."""
        self._jour.append(PauseRecord(round(time.time(), 3), seconds).to_json())
        self._ordered = True
        self._schedule()

    def spend(self, record: SpendRecord) -> None:
        """A snapshot of the job's spend; journaled in order with the outcomes it counts."""
        self._jour.append(record.to_json())
        self._ordered = True
        self._schedule()

    def spend_changed(self) -> None:
        """An attempt ended: the next write, at the end of the tick, carries a spend snapshot
        (`spend_snapshot`). It need not go out before the next dispatch record: it is made
        when it is written, so every attempt whose dispatch record is already written is in
        it (settled, or in flight: the sender counts an attempt in flight as soon as its
        record is written, with no write in between), and an answer's outcome after it adds
        nothing on replay. Flushing before each dispatch made one write per answer instead
        of one per tick (bench/cpu_bench.py: 1.28x -> 1.55x the bare loop).

        Never a flush now, even with --fsync always: the answer whose spend just settled
        is queued after this, in the same tick, and a snapshot written before its result
        would count it settled while a crash leaves its outcome unwritten (a resume then
        counts it once more, at its usage: `journal._settle_found`)."""
        self._soon()

    def pending(self, line: int) -> None:
        """The line's last attempt provably did no work and the run is stopping: the next
        run sends it."""
        self.adopt(OutcomeRecord(line, Outcome.PENDING))

    def adopt(self, record: OutcomeRecord) -> None:
        """Journal an outcome without writing an output line (one found after a crash)."""
        self._jour.append(record.to_json())
        self.states.set(record.line, record.outcome.policy.state)
        self._ordered = True  # a retried line's `pending` must precede its next dispatch
        self._schedule()

    def _note_supersede(self, line: int) -> None:
        if self.states.failed(line):
            self.superseded = True

    # -- flushing -------------------------------------------------------
    def _schedule(self) -> None:
        if self._always:
            self.flush()
            self._fsync_all()
            return
        self._soon()

    def _soon(self) -> None:
        """A flush at the end of the loop's tick (at once, without a running loop)."""
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self._flush_soon)
            except RuntimeError:
                self.flush()

    def _flush_soon(self) -> None:
        """A loop callback: raising there only prints a traceback. The error stays in
        self.error; the next dispatch and close() raise it where the runner can stop."""
        with contextlib.suppress(WriterError):
            self.flush()

    def _write(self, name: str, chunks: list[bytes]) -> None:
        data = b"".join(chunks)
        self._write_bytes(name, data)
        chunks.clear()  # kept on an error: `_broken` takes their lines back out of the counts

    def _write_bytes(self, name: str, data: bytes) -> None:
        data = SECRETS.data(data)  # a server that echoed the key: kept, without the key
        fd = self._fds[name]
        try:
            n = os.write(fd, data)  # all of it, nearly always
            self._sizes[name] += n
            if n < len(data):
                view = memoryview(data)[n:]
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    self._sizes[name] += n
        except OSError as exc:
            raise self._broken(WriterError(
                f"cannot write {self.out_dir / name}: {exc.strerror or exc}; "
                "free space or fix the disk, then run the same command again to resume"
            )) from None

    def _broken(self, error: WriterError) -> WriterError:
        """The run's first write error, kept. Whichever write failed (an outcome's, or a
        dispatch record's with outcomes still queued behind it), nothing queued will be
        written now, so its lines leave the counts here, in one place."""
        self.error = error
        self._unwritten(self._res)
        self._unwritten(self._fail)
        return error

    def flush(self) -> None:
        """Results and failures first, then the journal that points at them."""
        self._scheduled = False
        self._now = None
        if self.error is not None:
            raise self.error
        self._ordered = False
        had_outcomes = bool(self._res or self._fail)
        if self._res:  # a failed write takes its lines back out of the counts (_broken)
            self._write(RESULTS, self._res)
        if self._fail:
            self._write(FAILURES, self._fail)
        if had_outcomes:
            self._jour.append(MarkRecord(self._sizes[RESULTS], self._sizes[FAILURES]).to_json())
        if self.spend_snapshot is not None:
            snap = self.spend_snapshot()
            if snap is not None:
                self._jour.append(snap.to_json())
        if self._jour:
            self._write(JOURNAL, self._jour)
            self._dirty = True

    def _unwritten(self, chunks: list[bytes]) -> None:
        """Outcomes a failed write did not (or not surely) put on disk: their lines go back
        to in flight, so `done:` and summary.json count only what was written; a resume
        finds any that did land (past the last mark) and sends nothing twice."""
        for raw in chunks:
            for one in raw.splitlines():
                line = line_of(one)
                if line is not None:
                    self.states.set(line, IN_FLIGHT)
        chunks.clear()

    def _fsync_all(self) -> None:
        self._fsync_fds()
        self._dirty = False

    async def fsync_loop(self, interval: float = 1.0) -> None:
        """At least once a second, in a thread so the loop keeps sending."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if self._dirty and self.error is None:
                self._dirty = False
                try:
                    await loop.run_in_executor(None, self._fsync_fds)
                except OSError as exc:
                    self._broken(WriterError(f"fsync failed in {self.out_dir}: {exc}"))

    def _fsync_fds(self) -> None:
        for fd in list(self._fds.values()):
            os.fsync(fd)

    def start(self) -> None:
        if self.fsync_mode == "interval":
            self._fsync_task = asyncio.get_running_loop().create_task(self.fsync_loop())

    async def aclose(self) -> None:
        if self._fsync_task is not None:
            self._fsync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fsync_task
        self.close()

    def close(self) -> None:
        try:
            if self.error is None:
                for hook in self.before_close:
                    hook()
                self.flush()
                if self.fsync_mode != "never":
                    self._fsync_all()
        except OSError as exc:
            self._broken(WriterError(f"cannot sync {self.out_dir}: {exc.strerror or exc}"))
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self.error is not None:
            raise self.error  # also when the failed flush ran as a loop callback
        if self.superseded:
            compact_failures(self.out_dir, self.states)


def compact_failures(out_dir: Path, states: LineStates) -> int:
    """Keep one outcome per line: drop failures a later success or failure superseded.

    Written to a temporary file and renamed, so a crash leaves the old or the new
    file, never half of one. Returns how many records were dropped.
    """
    path = out_dir / FAILURES
    last: dict[int, int] = {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            line = line_of(raw)
            if line is not None:
                last[line] = i
    dropped = 0
    with open(path, "rb") as src, atomic_writer(path) as dst:
        for i, raw in enumerate(src):
            line = line_of(raw)
            outcome = None if line is None else states.outcome(line)
            if line is None or (last.get(line) == i and outcome is not None
                                and outcome.policy.failure):
                dst.write(raw)
            else:
                dropped += 1
    # A fresh mark so a later resume does not look for a tail past the new end.
    size_r = (out_dir / RESULTS).stat().st_size
    fd = open_append(out_dir / JOURNAL)
    try:
        os.write(fd, MarkRecord(size_r, path.stat().st_size).to_json())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("failures.jsonl: %d superseded record(s) removed", dropped)
    return dropped

