"""`tmbatch run`: reader → admission → workers → writer, and how a run stops.

The pipeline only: workers take the input's lines one at a time from the one reader and
send each to its outcome (`retry.LineSender`), one writer owns the files, and signals turn
into a drain.
What a failure means is `safety`'s, how fast to send is `limits`', what is written is
`records`' and `journal`'s.

A run has two halves. `prepare` is everything local (the input, the output directory, its
lock, the journal, the first write), so a command that is refused has touched neither the
network nor a live job's files. `send` is the network. Signal handlers are installed before
either, so a SIGTERM is honoured at any point, preflight included, and every stop ends: the
idle workers (waiting for a slot, a pause or a retry) are cancelled at once, the ones
with a request on the wire get --drain-timeout, and a second signal cancels those too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from typing import IO, Any, TypeVar

from tmbatch.base.config import Settings
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import FAILURES, JOURNAL, RESULTS, SUMMARY, OutputError
from tmbatch.base.logs import event, progress_kwargs, public_url, say
from tmbatch.base.stop import Stop, StopReason
from tmbatch.client.http import make_session
from tmbatch.inputs.files import open_input
from tmbatch.inputs.lines import count_lines
from tmbatch.inputs.reader import BadLine, ReadStats, Request, read_requests
from tmbatch.inputs.samples import sample_of, units
from tmbatch.journal.cache import ResponseCache
from tmbatch.journal.compact import LineStates
from tmbatch.journal.format import Header, ResumeRecord
from tmbatch.journal.journal import ResumeState
from tmbatch.journal.records import FailureRecord
from tmbatch.journal.writer import Writer, WriterError
from tmbatch.limits import Admission
from tmbatch.policy import Outcome
from tmbatch.run.attach import attach, detach, drop_unused_cache
from tmbatch.run.attempts import LineSender
from tmbatch.run.cached import RunCache, open_cache
from tmbatch.run.config import Learnt, RunConfig
from tmbatch.run.outdir import Lock, prepare_output
from tmbatch.run.progress import Progress, open_pause
from tmbatch.run.summaries import read_summary, write_summary
from tmbatch.run.summary import RunStats, build_summary, final_line, say_next_steps
from tmbatch.spend.budget import Budget

log = logging.getLogger("tmbatch")
T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Runner:
    def __init__(self, config: RunConfig) -> None:
        if config.connection is None:
            raise ValueError("a run needs its connection settings (RunConfig.connection)")
        self.config = opts = config  # read, never changed (frozen)
        # where requests go: the resolved connection, or what `send` is given (--sim)
        self.settings: Settings = config.connection
        self.stats = RunStats()
        self.admission = Admission(opts.rpm, opts.tpm, concurrency=opts.concurrency,
                                   adaptive=opts.is_adaptive, scope=opts.limit_scope,
                                   base_url=self.settings.base_url, alone=opts.alone)
        self.stop = Stop()
        self.read_stats = ReadStats()
        self.header: Header | None = None  # prepare() reads or makes it
        self.states = LineStates()
        self.resume: ResumeState | None = None
        self.writer: Writer | None = None
        self._lock: Lock | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._sender: LineSender | None = None
        self._waiting: asyncio.Task[Any] | None = None  # preflight: cancelled by a signal
        self._signal_at = 0.0
        self._sent = False  # send() began: from here on the job's files are the record
        self._bad_lines = 0  # bad lines the workers met, to yield to the loop now and then
        self._made_dir = False
        self._total: int | None = None  # the input's lines that need an outcome, once counted
        self.budget = Budget(opts.budget, self.stop)  # for_job() in prepare()
        self.cache_file: ResponseCache | None = None  # opened by prepare(), used by send()
        self.cache: RunCache | None = None
        self.metrics: Any = None  # run.metrics.Metrics with --metrics-port/--pushgateway

    async def run(self) -> int:
        """Both halves, for callers without a preflight or a simulator."""
        self.install_signals()
        try:
            self.prepare()
            return await self.send()
        finally:
            await self.close()

    # -- signals --------------------------------------------------------
    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, signum: int) -> None:
        count = self.stop.on_signal(signum)
        if self._waiting is not None:
            self._waiting.cancel()
        if count > 1:
            for t in self._workers:
                t.cancel()
            return
        self._signal_at = time.monotonic()
        name = signal.Signals(signum).name
        say(
            "signal",
            f"\n{name}: no new requests; waiting up to {self.config.drain_timeout:g}s for "
            f"{self.stats.in_flight} in flight (send {name} again to stop at once)",
            level=logging.WARNING, signal=name, in_flight=self.stats.in_flight,
            drain_timeout=self.config.drain_timeout,
        )
        self._cancel_idle()

    async def interruptible(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """Run a step before sending (preflight) so that a signal ends it at once: None then."""
        if self.stop.stopping:
            coro.close()
            return None
        self._waiting = asyncio.get_running_loop().create_task(coro)
        try:
            return await self._waiting
        except asyncio.CancelledError:
            if not self.stop.stopping:
                raise
            return None
        finally:
            self._waiting = None

    # -- the local half -------------------------------------------------
    def prepare(self) -> None:
        """Everything local, in an order that never touches a live job's files; raises a
        clear error (JournalError, OutputError, InputError) when the run must not start."""
        opts = self.config
        self.cache_file = open_cache(opts)  # --cache: a bad file stops here (exit 2)
        self._made_dir = not opts.out_dir.exists()
        header, resume, self._lock = prepare_output(opts)
        self.header, self.resume = header, resume
        if resume is not None:
            self.states = resume.states
            log.info("resuming %s: %d line(s) already have an outcome", opts.out_dir,
                     sum(n for o, n in self.states.by_outcome().items() if o.policy.final))
        try:
            writer = Writer(opts.out_dir, self.states, opts.fsync)
            if resume is None:
                writer.header(header)
            else:
                writer.header(ResumeRecord(time.time(), **opts.extra_header))
                _recover(writer, resume, opts.samples)
            self.budget = Budget.for_job(opts.budget, self.stop, resume)
            self.budget.start(writer)
            self.admission.budget = self.budget
        except (OSError, WriterError) as exc:
            raise OutputError(f"cannot write to {opts.out_dir}: {exc}", ExitCode.IO) from None
        self.writer = writer

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        drop_unused_cache(self)
        await self._close_writer()
        try:
            await detach(self)  # with -o URL: the last segment and the published outputs
        finally:
            if not self._sent and self.resume is None and self._lock is not None:
                self._forget_new_job()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _forget_new_job(self) -> None:
        """A new job that never reached send() (refused at preflight, stopped before its first
        request) leaves nothing behind: the next command starts as if it had not run."""
        out = self.config.out_dir
        for name in (JOURNAL, RESULTS, FAILURES):
            with contextlib.suppress(OSError):
                os.unlink(out / name)
        if self._made_dir and self._lock is not None:
            self._lock.release()  # its file is in the directory
            self._lock = None
            with contextlib.suppress(OSError):
                out.rmdir()

    async def _close_writer(self) -> None:
        """Flush, sync and close the outputs (once): a failure here is the run's I/O error."""
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        try:
            await writer.aclose()
        except WriterError as exc:
            self.stop.on_io_error(str(exc))

    # -- the network half -----------------------------------------------
    async def send(self, learnt: Learnt | None = None) -> int:
        """Send every line; `learnt`: where to (the simulator's address with --sim) and what
        the server serves, as found out after the config was resolved."""
        assert self.writer is not None, "prepare() first"
        if learnt is not None:
            self.settings = learnt.settings
        served = None if learnt is None else learnt.served_models
        if self.stop.stopping:  # a signal during preflight: nothing was sent
            self._announce_unsent()
            return self.stop.exit_code(0)
        self._sent = True
        opts, header, writer = self.config, self.header, self.writer
        assert header is not None
        event("start", f"job {header.job}: {opts.input} -> {opts.out_dir} "
              f"({self.settings.surface} at {public_url(self.settings.base_url)})",
              input=opts.input, output=str(opts.out_dir), job_id=header.job,
              surface=self.settings.surface, base_url=public_url(self.settings.base_url),
              resumed=self.resume is not None)
        self._honour_open_pause()
        loop = asyncio.get_running_loop()
        f = open_input(opts.input) if opts.requests is None else None
        session = make_session(self.settings, opts.concurrency, swept=True)
        sender = self._sender = LineSender(
            self.settings, header.job, self.admission, writer, self.stats, self.stop,
            session, dict(opts.prior_attempts), patience=opts.patience, served_models=served)
        writer.start()
        progress = Progress.for_run(self.stats, self.states, opts, budget=self.budget,
                                    **progress_kwargs())
        progress.pace = lambda: self.admission.pace
        progress.pause_left = lambda: open_pause(self.admission)
        await attach(self, sender, progress)  # --cache, --redis, --metrics-port
        progress.start()
        counter = None
        if opts.input != "-" and opts.only_lines is None:
            counter = loop.create_task(self._count_total(progress))
        lines = self._lines(f, sender)
        self._workers = [loop.create_task(self._work(lines, sender))
                         for _ in range(opts.concurrency)]
        try:
            await self._wait_workers()
        finally:
            if counter is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await counter  # the job's line count: the summary's too
            await progress.stop()
            await session.close()
            if f is not None and f is not sys.stdin.buffer:
                f.close()
            if self.cache is not None:
                self.cache.close(opts.out_dir)  # its last stores, after their results
            await self._close_writer()
        return await self._finish()

    def _announce_unsent(self) -> None:
        """Stopped before the first request. A new job leaves nothing behind (`close`), so
        there is nothing to resume: say that, not the resume a stopped job is promised."""
        reason = self.stop.reason
        if self.resume is not None or reason not in (StopReason.SIGINT, StopReason.SIGTERM):
            self.stop.announce()
            return
        msg = (f"interrupted ({reason.name}) before the first request: nothing was sent and "
               f"no job was recorded in {self.config.out_dir}; run the same command to start it")
        say("interrupted", msg, text=f"tmbatch: {msg}", level=logging.WARNING,
            signal=reason.name, exit_code=reason.exit_code)

    def _honour_open_pause(self) -> None:
        """A Retry-After window the previous run was told about is still a window."""
        if self.resume is None:
            return
        left = self.resume.pause_until - time.time()
        if left > 0:
            log.info("the previous run was asked to wait until %s (Retry-After): waiting %.1fs "
                     "more before the first request", time.strftime(
                         "%H:%M:%S", time.localtime(self.resume.pause_until)), left)
            self.admission.pause(left)

    def _lines(self, f: IO[bytes] | None, sender: LineSender) -> Iterator[Request | BadLine]:
        """The input's lines, for the workers to take one at a time (`_work`); with
        `resend --input`, the corrected ones instead. With --samples-via n a line's units
        come as one request (`units`); a resend sends the units it names one by one."""
        samples = self.config.samples
        if f is None:
            assert self.config.requests is not None
            return units(iter(self.config.requests), samples, None)
        joins = sender.joins if self.config.samples_via == "n" and \
            self.config.only_lines is None else None
        resume = None if self.config.only_lines is not None else self.resume
        lines = read_requests(
            f, endpoint=self.config.endpoint, model=self.config.model, stream=self.config.stream,
            done=None if resume is None else resume.states,
            seen=None if resume is None else resume.seen,
            shard=self.config.shard, stats=self.read_stats,
            max_line_bytes=self.config.max_line_bytes,
            unit="line" if self.config.table is None else "row",
        )
        return units(lines, samples, joins)

    async def _work(self, lines: Iterator[Request | BadLine], sender: LineSender) -> None:
        """Take the next line and send it to its outcome, until the input or the run ends.

        Every worker reads from the one iterator, synchronously (nothing awaits inside it, so
        no two workers are ever in it at once): a line costs no queue and no producer task to
        wake. A run of bad lines yields to the loop every 512 of them."""
        only = self.config.only_lines
        me: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
        while not self.stop.stopping:
            item = next(lines, None)
            if item is None:
                return  # the input is over (or its reader failed: raised to another worker)
            if only is not None and item.line not in only:
                continue
            try:
                if isinstance(item, BadLine):
                    if only is None:
                        sender.bad_line(item)
                    self._bad_lines += 1
                    if self._bad_lines % 512 == 0:
                        await asyncio.sleep(0)
                    continue
                await sender.process(item, me)
            except (WriterError, OutputError) as exc:
                self.stop.on_io_error(str(exc))
                self._cancel_idle()
                return

    def _cancel_idle(self) -> None:
        """Stopping: every worker without a request on the wire ends now (one waiting for a
        concurrency slot, a Retry-After pause, a rate bucket or a retry backoff)."""
        busy = self._sender.in_flight if self._sender is not None else set()
        for t in self._workers:
            if not t.done() and t not in busy:
                t.cancel()

    async def _count_total(self, progress: Progress) -> None:
        """Lines to answer, for the bar and the ETA: counted in a thread so sending starts at
        once."""
        lines = await asyncio.to_thread(count_lines, self.config.input, self.config.shard)
        if lines is None:
            return
        self._total = lines
        progress.set_total(lines)

    async def _job_lines(self) -> int | None:
        """The job's lines that need an outcome, for the summary's counts: counted while it
        ran, or now (a resend does not count them for its progress); stdin's when it was
        read to its end."""
        if self._total is None and self.config.input != "-":
            self._total = await asyncio.to_thread(count_lines, self.config.input,
                                                  self.config.shard)
        if self._total is None and not self.stop.stopping and self.config.shard is None:
            return self.read_stats.lines - self.read_stats.blank  # stdin, read to its end
        return self._total

    async def _wait_workers(self) -> None:
        """Until every worker has ended; a worker's exception is raised here. Woken by the last
        worker to end (or one that failed), and every 0.2 s to drive a stop and cut off answers
        past --timeout (`InFlight.sweep`): one future to wait on, not every worker's callback."""
        ended = asyncio.get_running_loop().create_future()
        left = len(self._workers)
        failed: list[BaseException] = []

        def on_end(t: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            if not t.cancelled() and t.exception() is not None:
                failed.append(t.exception())  # type: ignore[arg-type]
            if (left == 0 or failed) and not ended.done():
                ended.set_result(None)

        for t in self._workers:
            t.add_done_callback(on_end)
        while True:
            if not ended.done():
                await asyncio.wait((ended,), timeout=0.2)
            self._sender.in_flight.sweep(ended.get_loop().time())  # type: ignore[union-attr]
            if failed:
                raise failed[0]
            if left == 0:
                return
            if self.stop.stopping:
                self._cancel_idle()
                if self.stop.signals and (
                        time.monotonic() >= self._signal_at + self.config.drain_timeout):
                    await self._cut({t for t in self._workers if not t.done()})
                    return

    async def _cut(self, pending: set[asyncio.Task[None]]) -> None:
        """The drain timeout is over: what is still on the wire is left without an outcome."""
        log.warning("drain timeout: %d request(s) still in flight are left without "
                    "an outcome (ambiguous on resume)", self.stats.in_flight,
                    extra={"event": "drain", "left_in_flight": self.stats.in_flight})
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _finish(self) -> int:
        assert self.header is not None
        summary = build_summary(
            self.stats, self.states, input_lines=self.read_stats.lines,
            blank_lines=self.read_stats.blank, header=self.header, stop=self.stop,
            admission=self.admission, spend=self.budget.report(),
            previous=(previous := read_summary(self.config.out_dir)),
            lines=await self._job_lines(),
        )
        if self.cache is not None:
            summary = dataclasses.replace(summary, cache=self.cache.report_after(previous))
        try:
            write_summary(self.config.out_dir, summary)
        except OutputError as exc:
            self.stop.on_io_error(f"cannot write {SUMMARY}: {exc}")
        if not self.config.quiet:
            say("summary", final_line(summary), **summary.as_dict())
            say_next_steps(summary, self.config.out_dir, self.states, self.header)
            if self.cache is not None:
                say("cache", self.cache.line(), **self.cache.report())
            spend = self.budget.final_line()
            if spend:
                say("spend", spend, **(summary.spend or {}))
        self.stop.announce()
        return self.stop.exit_code(summary.counts.failed)


def _recover(writer: Writer, resume: ResumeState, samples: int) -> None:
    """Outcomes from before the crash: found ones journaled, unknown ones ambiguous."""
    for record in resume.adopted:
        writer.adopt(record)
    job = resume.header.job
    for line, sent in sorted(resume.in_flight.items()):
        writer.failure(FailureRecord.of(
            job, line, sent.custom_id, Outcome.AMBIGUOUS, "unknown_outcome_after_crash",
            "dispatched before the previous run stopped, with no outcome recorded: the "
            "server may have processed (and billed) it; not re-sent. `tmbatch resend "
            "--class ambiguous` sends it again", sent.attempt, sample=sample_of(line, samples),
        ))
    if resume.in_flight:
        log.warning("%d request(s) had no outcome when the previous run stopped: recorded "
                    "as ambiguous (unknown_outcome_after_crash), not re-sent",
                    len(resume.in_flight),
                    extra={"event": "unknown_outcome", "count": len(resume.in_flight)})
    writer.superseded = writer.superseded or resume.superseded
