"""`tmbatch run`: reader → admission → workers → writer, and how a run stops.

The pipeline only: a producer reads lines into a bounded queue, workers send each line to
its outcome (`retry.LineSender`), one writer owns the files, and signals turn into a drain.
What a failure means is `safety`'s, how fast to send is `limits`', what is written is
`records`' and `journal`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from tmbatch.budget import Budget
from tmbatch.client import make_session
from tmbatch.compact import LineStates
from tmbatch.config import Settings
from tmbatch.exitcodes import ExitCode
from tmbatch.files import SUMMARY
from tmbatch.journal import ResumeState
from tmbatch.limits import Admission
from tmbatch.lines import count_lines
from tmbatch.logs import event, progress_kwargs, public_url, say
from tmbatch.options import RunOptions
from tmbatch.outdir import lock_output, prepare_output
from tmbatch.progress import Progress
from tmbatch.reader import BadLine, ReadStats, Request, open_input, read_requests
from tmbatch.records import FailureRecord
from tmbatch.retry import LineSender
from tmbatch.safety import Outcome
from tmbatch.stop import Stop
from tmbatch.summary import RunStats, build_summary, final_line, write_summary
from tmbatch.writer import Writer, WriterError

log = logging.getLogger("tmbatch")


class Runner:
    def __init__(self, opts: RunOptions, settings: Settings) -> None:
        self.opts = opts
        self.settings = settings
        self.stats = RunStats()
        self.admission = Admission(opts.rpm, opts.tpm, concurrency=opts.concurrency,
                                   adaptive=opts.is_adaptive)
        self.stop = Stop()
        self.read_stats = ReadStats()
        self._workers: list[asyncio.Task[None]] = []
        self.header: dict[str, Any] = {}
        self.sender: LineSender
        self.budget = Budget(opts.budget, self.stop)

    async def run(self) -> int:
        header, resume = prepare_output(self.opts)
        self.header = header
        lock_fd = lock_output(self.opts.out_dir)
        try:
            return await self._run(header, resume)
        finally:
            os.close(lock_fd)

    def _on_signal(self, signum: int) -> None:
        if self.stop.on_signal(signum) > 1:
            for t in self._workers:
                t.cancel()
            return
        name = signal.Signals(signum).name
        say(
            "signal",
            f"\n{name}: no new requests; waiting up to {self.opts.drain_timeout:g}s for "
            f"{self.stats.in_flight} in flight (send {name} again to stop at once)",
            level=logging.WARNING, signal=name, in_flight=self.stats.in_flight,
            drain_timeout=self.opts.drain_timeout,
        )

    # -- the pipeline ---------------------------------------------------
    async def _run(self, header: dict[str, Any], resume: ResumeState | None) -> int:
        opts = self.opts
        states = resume.states if resume else LineStates()
        if resume is not None:
            log.info("resuming %s: %d line(s) already have an outcome", opts.out_dir,
                     sum(n for o, n in states.by_outcome().items() if o.policy.final))
        try:
            writer = self._open_writer(states, header, resume)
        except (OSError, WriterError) as exc:
            say("io_error", f"cannot write to {opts.out_dir}: {exc}",
                text=f"tmbatch: cannot write to {opts.out_dir}: {exc}", level=logging.ERROR,
                exit_code=ExitCode.IO)
            return ExitCode.IO
        event("start", f"job {header['job']}: {opts.input} -> {opts.out_dir} "
              f"({self.settings.surface} at {public_url(self.settings.base_url)})",
              input=opts.input, output=str(opts.out_dir), job_id=header["job"],
              surface=self.settings.surface, base_url=public_url(self.settings.base_url),
              resumed=resume is not None)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        f = open_input(opts.input)
        session = make_session(self.settings, opts.concurrency)
        self.budget = Budget.for_job(opts.budget, self.stop, resume)
        self.budget.start(writer)
        self.sender = LineSender(
            self.settings, header["job"], self.admission, writer, self.stats, self.stop,
            session, dict(opts.prior_attempts), opts.fatal_404_after, budget=self.budget)
        writer.start()
        progress = Progress(self.stats, None, quiet=opts.quiet, interval=opts.progress_interval,
                            budget=self.budget, **progress_kwargs())
        progress.start()
        counter = None
        if opts.input != "-" and opts.only_lines is None:
            counter = loop.create_task(self._count_total(progress, states))
        queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=opts.concurrency * 2)
        self._workers = [loop.create_task(self._work(queue)) for _ in range(opts.concurrency)]
        producer = loop.create_task(self._produce(queue, f, resume))
        try:
            await self._wait_workers(producer)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            if counter is not None:
                counter.cancel()
            await progress.stop()
            await session.close()
            if f is not sys.stdin.buffer:
                f.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            try:
                await writer.aclose()
            except WriterError as exc:
                self.stop.on_io_error(str(exc))
        return self._finish(states)

    def _open_writer(self, states: LineStates, header: dict[str, Any],
                     resume: ResumeState | None) -> Writer:
        writer = Writer(self.opts.out_dir, states, self.opts.fsync)
        if resume is None:
            writer.header(header)
        else:
            writer.header({"e": "resume", "t": time.time(), **self.opts.extra_header})
            _recover(writer, resume)
        return writer

    async def _produce(self, queue: asyncio.Queue[Request | None], f: IO[bytes],
                       resume: ResumeState | None) -> None:
        only = self.opts.only_lines
        items = read_requests(
            f, endpoint=self.opts.endpoint, model=self.opts.model, stream=self.opts.stream,
            done=None if only is not None or resume is None else resume.states,
            seen=None if only is not None or resume is None else resume.seen,
            shard=self.opts.shard, stats=self.read_stats,
            max_line_bytes=self.opts.max_line_bytes,
        )
        n = 0
        try:
            for item in items:
                if self.stop.stopping:
                    break
                if only is not None and item.line not in only:
                    continue
                if isinstance(item, BadLine):
                    if only is None:
                        self.sender.bad_line(item)
                    n += 1
                    if n % 512 == 0:
                        await asyncio.sleep(0)
                    continue
                await queue.put(item)
        finally:
            for _ in self._workers:
                await queue.put(None)

    async def _work(self, queue: asyncio.Queue[Request | None]) -> None:
        while True:
            req = await queue.get()
            if req is None or self.stop.stopping:
                return
            try:
                await self.sender.process(req)
            except WriterError as exc:
                self.stop.on_io_error(str(exc))
                return

    async def _count_total(self, progress: Progress, states: LineStates) -> None:
        """Lines left to answer, for the ETA: counted in a thread so sending starts at once."""
        lines = await asyncio.to_thread(count_lines, self.opts.input, self.opts.shard)
        if lines is None:
            return
        final = sum(n for o, n in states.by_outcome().items() if o.policy.final)
        done_before = final - self.stats.ok - sum(self.stats.failed.values())
        progress.set_total(max(0, lines - done_before))

    async def _wait_workers(self, producer: asyncio.Task[None]) -> None:
        pending = set(self._workers)
        while pending:
            if self.stop.stopping and self.stop.signals:
                await self._drain(pending)
                return
            done, pending = await asyncio.wait(pending, timeout=0.2)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        if producer.done() and not producer.cancelled() and producer.exception():
            exc = producer.exception()
            if isinstance(exc, WriterError):
                self.stop.on_io_error(str(exc))
            else:
                raise exc  # type: ignore[misc]

    async def _drain(self, pending: set[asyncio.Task[None]]) -> None:
        """After a signal: in-flight requests get --drain-timeout to finish, then are cut."""
        _, pending = await asyncio.wait(pending, timeout=self.opts.drain_timeout)
        if pending:
            log.warning("drain timeout: %d request(s) still in flight are left without "
                        "an outcome (ambiguous on resume)", self.stats.in_flight,
                        extra={"event": "drain", "left_in_flight": self.stats.in_flight})
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _finish(self, states: LineStates) -> int:
        summary = build_summary(
            self.stats, states, input_lines=self.read_stats.lines,
            blank_lines=self.read_stats.blank, header=self.header,
            stopped=self.stop.reason.label if self.stop.reason else None,
            admission=self.admission,
        )
        if self.stop.fatal:
            summary["fatal"] = self.stop.fatal
        if self.stop.io_error:
            summary["io_error"] = self.stop.io_error
        summary["spend"] = self.budget.report()
        try:
            write_summary(self.opts.out_dir, summary)
        except OSError as exc:
            self.stop.on_io_error(f"cannot write {SUMMARY}: {exc.strerror}")
        if not self.opts.quiet:
            say("summary", final_line(summary), **summary)
            spend = self.budget.final_line()
            if spend:
                say("spend", spend, **summary["spend"])
        self.stop.announce()
        return self.stop.exit_code(summary["counts"]["failed"])


def _recover(writer: Writer, resume: ResumeState) -> None:
    """Outcomes from before the crash: found ones journaled, unknown ones ambiguous."""
    for record in resume.adopted:
        writer.adopt(record)
    job = resume.header["job"]
    for line, (cid, attempts) in sorted(resume.in_flight.items()):
        writer.failure(FailureRecord.of(
            job, line, cid, Outcome.AMBIGUOUS, "unknown_outcome_after_crash",
            "dispatched before the previous run stopped, with no outcome recorded: the "
            "server may have processed (and billed) it; not re-sent. `tmbatch resend "
            "--class ambiguous` sends it again", attempts,
        ))
    if resume.in_flight:
        log.warning("%d request(s) had no outcome when the previous run stopped: recorded "
                    "as ambiguous (unknown_outcome_after_crash), not re-sent",
                    len(resume.in_flight),
                    extra={"event": "unknown_outcome", "count": len(resume.in_flight)})
    writer.superseded = writer.superseded or resume.superseded


def out_dir_of(input_arg: str, output: str | None) -> Path:
    """The default output directory: INPUT's name + .out (stdin.out for `-`)."""
    if output:
        return Path(output)
    return Path((Path(input_arg).stem if input_arg != "-" else "stdin") + ".out")
