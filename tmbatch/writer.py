"""The one owner of `results.jsonl`, `failures.jsonl` and `journal.jsonl`.

Everything runs on the event loop thread, so there is exactly one writer and no
locks. Order is the crash-safety argument: a dispatch record reaches the OS
before the request's bytes leave, and a result reaches the OS before the
journal record that says it exists. Outcomes that finish in the same loop tick
are written with one syscall per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from tmbatch.compact import FAILED_BASE, IN_FLIGHT, OK, UNSEEN, LineStates
from tmbatch.journal import FAILURES, JOURNAL, RESULTS, state_for

log = logging.getLogger("tmbatch")
FSYNC_MODES = ("always", "interval", "never")


class WriterError(Exception):
    """A write to the output directory failed (disk full, I/O error); the run must stop."""


def record_id(job_id: str, custom_id: str) -> str:
    digest = hashlib.blake2b(f"{job_id}\0{custom_id}".encode(), digest_size=12).hexdigest()
    return f"batch_req_{digest}"


def open_append(path: Path) -> int:
    """Output files hold model answers and prompts: readable by the owner only."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


class Writer:
    def __init__(self, out_dir: Path, states: LineStates, fsync: str = "interval") -> None:
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
        self._dirty = False
        self.superseded = False
        self.error: WriterError | None = None
        self._fsync_task: asyncio.Task[None] | None = None

    # -- journal records ------------------------------------------------
    def header(self, record: dict[str, Any]) -> None:
        self._jour.append(orjson.dumps(record) + b"\n")
        self.flush()

    def dispatch(self, line: int, attempt: int, custom_id: str) -> None:
        """Record that this line's bytes are about to leave; durable before it returns."""
        self._jour.append(orjson.dumps(["d", line, attempt, custom_id]) + b"\n")
        self._note_supersede(line)  # a resend: its old failure line goes at close
        self.states.set(line, IN_FLIGHT)
        self.flush()
        if self.fsync_mode == "always":
            self._fsync_all()

    def result(self, line: int, record: dict[str, Any], latency: float | None = None,
               ttft: float | None = None) -> None:
        """Journaled as ["o", line, "ok", "", t, latency_ms, ttft_ms]: the time fields, appended
        after the ones resume reads, are what `tmbatch report` draws."""
        self._note_supersede(line)
        self._res.append(orjson.dumps(record) + b"\n")
        self._jour.append(orjson.dumps(
            ["o", line, "ok", "", round(time.time(), 3), _ms(latency), _ms(ttft)]) + b"\n")
        self.states.set(line, OK)
        self._schedule()

    def failure(self, line: int, record: dict[str, Any]) -> None:
        err = record["error"]
        self._note_supersede(line)
        self._fail.append(orjson.dumps(record) + b"\n")
        self._jour.append(
            orjson.dumps(["o", line, err["class"], err["code"], round(time.time(), 3)]) + b"\n")
        self.states.set(line, state_for(err["class"]))
        self._schedule()

    def pause(self, seconds: float) -> None:
        """["p", t, seconds]: a Retry-After pause of every worker; resume ignores it."""
        self._jour.append(orjson.dumps(["p", round(time.time(), 3), seconds]) + b"\n")
        self._schedule()

    def pending(self, line: int) -> None:
        """The server refused this line's last attempt as the run stopped: send it on resume."""
        self._jour.append(orjson.dumps(["o", line, "pending"]) + b"\n")
        self.states.set(line, UNSEEN)
        self._schedule()

    def adopt(self, line: int, cls: str, code: str) -> None:
        """Journal an outcome already present in results/failures (found after a crash)."""
        self._jour.append(orjson.dumps(["o", line, cls, code]) + b"\n")
        self.states.set(line, state_for(cls))
        self._schedule()

    def _note_supersede(self, line: int) -> None:
        if self.states.get(line) >= FAILED_BASE:
            self.superseded = True

    # -- flushing -------------------------------------------------------
    def _schedule(self) -> None:
        if self.fsync_mode == "always":
            self.flush()
            self._fsync_all()
            return
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
        chunks.clear()
        fd = self._fds[name]
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
                self._sizes[name] += n
        except OSError as exc:
            self.error = WriterError(
                f"cannot write {self.out_dir / name}: {exc.strerror or exc}; "
                "free space or fix the disk, then run the same command again to resume"
            )
            raise self.error from None

    def flush(self) -> None:
        """Results and failures first, then the journal that points at them."""
        self._scheduled = False
        if self.error is not None:
            raise self.error
        had_outcomes = bool(self._res or self._fail)
        if self._res:
            self._write(RESULTS, self._res)
        if self._fail:
            self._write(FAILURES, self._fail)
        if had_outcomes:
            self._jour.append(
                orjson.dumps(["m", self._sizes[RESULTS], self._sizes[FAILURES]]) + b"\n"
            )
        if self._jour:
            self._write(JOURNAL, self._jour)
            self._dirty = True

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
                    self.error = WriterError(f"fsync failed in {self.out_dir}: {exc}")

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
                self.flush()
                if self.fsync_mode != "never":
                    self._fsync_all()
        except OSError as exc:
            self.error = WriterError(f"cannot sync {self.out_dir}: {exc.strerror or exc}")
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self.error is not None:
            raise self.error  # also when the failed flush ran as a loop callback
        if self.superseded:
            compact_failures(self.out_dir, self.states)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self._sizes)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def compact_failures(out_dir: Path, states: LineStates) -> int:
    """Keep one outcome per line: drop failures a later success or failure superseded.

    Written to a temporary file and renamed, so a crash leaves the old or the new
    file, never half of one. Returns how many records were dropped.
    """
    path = out_dir / FAILURES
    last: dict[int, int] = {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                last[orjson.loads(raw)["line"]] = i
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
    tmp = path.with_name(FAILURES + ".tmp")
    dropped = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
        for i, raw in enumerate(src):
            try:
                line = orjson.loads(raw)["line"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                dst.write(raw)
                continue
            if last.get(line) == i and states.get(line) >= FAILED_BASE:
                dst.write(raw)
            else:
                dropped += 1
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    # A fresh mark so a later resume does not look for a tail past the new end.
    size_r = (out_dir / RESULTS).stat().st_size
    with open(out_dir / JOURNAL, "ab") as j:
        j.write(orjson.dumps(["m", size_r, path.stat().st_size]) + b"\n")
        j.flush()
        os.fsync(j.fileno())
    log.info("failures.jsonl: %d superseded record(s) removed", dropped)
    return dropped
