"""`tmbatch run`: reader → admission → workers → writer, with the safety contract.

Retries follow the class table through tenacity: only `not_sent` and `rejected`
are sent again for billed routes; everything else gets exactly one outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_exponential_jitter,
)

from tmbatch.client import Answer, idempotency_key, make_session, send
from tmbatch.compact import LineStates
from tmbatch.config import Settings
from tmbatch.journal import (
    SUMMARY,
    ResumeState,
)
from tmbatch.limits import Admission, estimate_tokens
from tmbatch.logs import event, progress_kwargs, public_url, say
from tmbatch.outdir import lock_output, prepare_output
from tmbatch.progress import Progress
from tmbatch.reader import (
    MAX_LINE_BYTES,
    BadLine,
    ReadStats,
    Request,
    open_input,
    read_requests,
)
from tmbatch.safety import FATAL, NOT_SENT, REJECTED, AttemptFailed, retryable
from tmbatch.summary import RunStats, build_summary, final_line
from tmbatch.writer import Writer, WriterError, record_id

log = logging.getLogger("tmbatch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FATAL, EXIT_IO = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


@dataclass
class RunOptions:
    input: str
    out_dir: Path
    endpoint: str | None = None
    model: str | None = None
    stream: bool | None = None
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    fsync: str = "interval"
    restart: bool = False
    drain_timeout: float = 25.0
    job_id: str | None = None
    shard: tuple[int, int] | None = None
    quiet: bool = False
    progress_interval: float = 10.0
    max_line_bytes: int = MAX_LINE_BYTES
    fatal_404_after: int = 8
    only_lines: set[int] | None = None  # resend: exactly these lines, even if done
    prior_attempts: dict[int, int] = field(default_factory=dict)  # resend: attempts so far
    adaptive: bool | None = None  # None: adaptive concurrency exactly when no --rpm
    extra_header: dict[str, Any] = field(default_factory=dict)


class Stopped(Exception):
    """Raised inside an attempt when the run is stopping: nothing was sent for it."""


class Runner:
    def __init__(self, opts: RunOptions, settings: Settings) -> None:
        self.opts = opts
        self.settings = settings
        self.stats = RunStats()
        # No --rpm: the concurrency limit adapts to 429s (AIMD), --concurrency is its ceiling,
        # unless --adaptive / --no-adaptive says otherwise.
        adaptive = opts.rpm is None if opts.adaptive is None else opts.adaptive
        self.admission = Admission(opts.rpm, opts.tpm, concurrency=opts.concurrency,
                                   adaptive=adaptive)
        self.stopping: str | None = None
        self.fatal: str | None = None
        self.io_error: str | None = None
        self.read_stats = ReadStats()
        self._signals = 0
        self._signal_name: str | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._backoff = wait_exponential_jitter(initial=0.5, max=30.0, jitter=1.0)
        self._404_streak = 0
        self.prior_attempts: dict[int, int] = dict(opts.prior_attempts)
        self.writer: Writer
        self.header: dict[str, Any] = {}

    # -- stopping -------------------------------------------------------
    def stop(self, reason: str) -> None:
        if self.stopping is None:
            self.stopping = reason

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self._signal_name = name
            self.stop(name)
            say(
                "signal",
                f"\n{name}: no new requests; waiting up to {self.opts.drain_timeout:g}s for "
                f"{self.stats.in_flight} in flight (send {name} again to stop at once)",
                level=logging.WARNING, signal=name, in_flight=self.stats.in_flight,
                drain_timeout=self.opts.drain_timeout,
            )
        else:
            for t in self._workers:
                t.cancel()

    # -- one line -------------------------------------------------------
    def _wait(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        if isinstance(exc, AttemptFailed) and exc.retry_after is not None:
            return 0.0  # the shared pause already holds every worker back
        return float(self._backoff(rs))

    def _stop_now(self, rs: RetryCallState) -> bool:
        return self.stopping is not None

    async def _attempt(self, req: Request, tokens: int, headers: dict[str, str] | None,
                       counter: list[int]) -> Answer:
        try:
            await self.admission.admit(tokens)
        except asyncio.CancelledError:
            self._pending_if_retrying(req, counter)
            raise
        try:  # admit() took a concurrency slot: release it whatever happens
            if self.stopping is not None:
                raise Stopped
            counter[0] += 1
            if counter[0] > 1:
                self.stats.retries += 1
            self.writer.dispatch(req.line, self.prior_attempts.get(req.line, 0) + counter[0],
                                 req.custom_id)
            self.stats.sent += 1
            self.stats.in_flight += 1
            try:
                answer = await send(self.session, req.url, req.body, headers)
            except AttemptFailed as exc:
                self.admission.observe(exc.status, getattr(exc, "headers", None),
                                       rejected=exc.cls == REJECTED)
                if exc.cls == REJECTED:
                    if exc.status == 429:
                        self.stats.rejected_429 += 1
                    if exc.retry_after is not None:
                        self.admission.pause(exc.retry_after)
                raise
            finally:
                self.stats.in_flight -= 1
            self.admission.observe(answer.status, answer.headers)
            return answer
        finally:
            self.admission.release()

    def _pending_if_retrying(self, req: Request, counter: list[int]) -> None:
        """Cancelled (drain timeout) between attempts: the last one was refused or never sent,
        so on resume the line is sent again, not mistaken for an unknown (ambiguous) outcome."""
        if counter[0]:
            self.writer.pending(req.line)

    async def _sleep_between(self, req: Request, counter: list[int], seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._pending_if_retrying(req, counter)
            raise

    async def process(self, req: Request) -> None:
        tokens = 0  # only a --tpm budget needs the estimate: skip the prompt walk otherwise
        if self.admission.tpm is not None:
            tokens = estimate_tokens(req.body, generates=not req.idempotent)
        headers = None
        if not req.idempotent:
            headers = {"Idempotency-Key": idempotency_key(self.header["job"], req.custom_id)}
        counter = [0]
        # Most first attempts succeed, and a tenacity loop costs ~30 % of the client's CPU per
        # request (bench/ablate.py): try once bare, and replay a failure into the loop as its
        # attempt 1, so the predicate, stop, attempt numbers and waits are exactly tenacity's.
        try:
            answer: Answer | None = await self._attempt(req, tokens, headers, counter)
        except (Stopped, AttemptFailed) as exc:
            first: list[BaseException] = [exc]
            answer = None
        else:
            self._succeed(req, answer, tokens, counter[0])
            return
        retrying = AsyncRetrying(
            retry=retry_if_exception(partial(retryable, idempotent=req.idempotent)),
            stop=stop_any(stop_after_attempt(self.settings.max_retries + 1), self._stop_now),
            wait=self._wait,
            sleep=partial(self._sleep_between, req, counter),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if first:
                        raise first.pop()
                    answer = await self._attempt(req, tokens, headers, counter)
        except Stopped:
            if counter[0]:
                self.writer.pending(req.line)  # the last attempt was refused: not processed
            return
        except AttemptFailed as exc:
            if self.stopping and exc.cls in (NOT_SENT, REJECTED):
                self.writer.pending(req.line)
                return
            self._fail(req, exc, counter[0])
            return
        assert answer is not None
        self._succeed(req, answer, tokens, counter[0])

    def _succeed(self, req: Request, answer: Answer, estimated: int, attempts: int) -> None:
        self._404_streak = 0
        total = self.stats.add_usage(answer.body)
        self.admission.settle(estimated, total)
        self.stats.ok += 1
        self.stats.latencies.add(answer.latency)
        record: dict[str, Any] = {
            "id": record_id(self.header["job"], req.custom_id),
            "custom_id": req.custom_id,
            "response": {"status_code": answer.status, "request_id": answer.request_id,
                         "body": answer.body},
            "error": None,
            "line": req.line,
        }
        if answer.ttft is not None:
            self.stats.ttfts.add(answer.ttft)
            usage = answer.body.get("usage") or {}
            out_tokens = usage.get("completion_tokens", usage.get("output_tokens"))
            gen = answer.latency - answer.ttft
            record["timing"] = {
                "ttft_ms": round(answer.ttft * 1000, 2),
                "total_ms": round(answer.latency * 1000, 2),
                "tokens_per_s": round(out_tokens / gen, 1) if out_tokens and gen > 0 else None,
            }
        self.writer.result(req.line, record, answer.latency, answer.ttft)

    def _fail(self, req: Request, exc: AttemptFailed, attempts: int) -> None:
        cls = exc.cls
        if cls == FATAL:
            self._fatal(f"HTTP {exc.status} {exc.code}: {exc.message}. Check the inference API "
                        "key (TENSORMESH_INFERENCE_API_KEY) and, on-demand, the user id")
        elif exc.status == 404 and self.stats.ok == 0:
            self._404_streak += 1
            if self._404_streak >= self.opts.fatal_404_after:
                self._fatal(
                    f"the first {self._404_streak} requests all got 404 ({exc.message}); the "
                    "model is probably not served here: check --model / body.model (`tmbatch "
                    "models` lists served ones) and, on-demand, X-User-Id"
                )
        self.stats.failed[cls] += 1
        self.stats.codes[exc.code] += 1
        response = None
        if exc.status is not None or exc.body is not None:
            response = {"status_code": exc.status, "request_id": exc.request_id, "body": exc.body}
        self._write_failure(req.line, req.custom_id, cls, exc.code, exc.message,
                            self.prior_attempts.get(req.line, 0) + attempts, response)

    def _write_failure(self, line: int, custom_id: str | None, cls: str, code: str,
                       message: str, attempts: int, response: dict[str, Any] | None = None,
                       ) -> None:
        """The one shape of a failures.jsonl line: OpenAI Batch's error file plus ours."""
        self.writer.failure(line, {
            "id": record_id(self.header["job"], custom_id or f"line-{line}"),
            "custom_id": custom_id,
            "response": response,
            "error": {"code": code, "message": message, "class": cls},
            "attempts": attempts,
            "line": line,
        })

    def _fatal(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
            log.error("fatal: %s; stopping, nothing more is sent", message,
                      extra={"event": "fatal"})
        self.stop("fatal")

    def bad_line(self, bad: BadLine) -> None:
        self.stats.failed["permanent"] += 1
        self.stats.codes[bad.code] += 1
        self._write_failure(bad.line, bad.custom_id, "permanent", bad.code, bad.message, 0)

    # -- the pipeline ---------------------------------------------------
    async def _produce(self, queue: asyncio.Queue[Request | None], f: Any, resume: Any) -> None:
        done = resume.states if resume else None
        seen = resume.seen if resume else None
        only = self.opts.only_lines
        items = read_requests(
            f, endpoint=self.opts.endpoint, model=self.opts.model, stream=self.opts.stream,
            done=None if only is not None else done,
            seen=None if only is not None else seen, shard=self.opts.shard,
            stats=self.read_stats, max_line_bytes=self.opts.max_line_bytes,
        )
        n = 0
        try:
            for item in items:
                if self.stopping is not None:
                    break
                if only is not None and item.line not in only:
                    continue
                if isinstance(item, BadLine):
                    if only is None:
                        self.bad_line(item)
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
            if req is None or self.stopping is not None:
                return
            try:
                await self.process(req)
            except WriterError as exc:
                self.io_error = str(exc)
                self.stop("io_error")
                return

    async def run(self) -> int:
        opts = self.opts
        header, resume = prepare_output(opts)
        self.header = header
        lock_fd = lock_output(opts.out_dir)
        try:
            return await self._run(header, resume)
        finally:
            os.close(lock_fd)

    def _recover(self, resume: ResumeState) -> None:
        """Outcomes from before the crash: found ones journaled, unknown ones ambiguous."""
        for line, cls, code in resume.adopted:
            self.writer.adopt(line, cls, code)
        for line, (cid, attempts) in sorted(resume.in_flight.items()):
            self._write_failure(
                line, cid, "ambiguous", "unknown_outcome_after_crash",
                "dispatched before the previous run stopped, with no outcome recorded: the "
                "server may have processed (and billed) it; not re-sent. `tmbatch resend "
                "--class ambiguous` sends it again", attempts,
            )
        if resume.in_flight:
            log.warning("%d request(s) had no outcome when the previous run stopped: recorded "
                        "as ambiguous (unknown_outcome_after_crash), not re-sent",
                        len(resume.in_flight),
                        extra={"event": "unknown_outcome", "count": len(resume.in_flight)})
        self.writer.superseded = self.writer.superseded or resume.superseded

    async def _run(self, header: dict[str, Any], resume: ResumeState | None) -> int:
        opts = self.opts
        states = resume.states if resume else LineStates()
        if resume is not None:
            log.info("resuming %s: %d line(s) already have an outcome", opts.out_dir,
                     sum(states.counts()[2:]))
        try:
            self.writer = Writer(opts.out_dir, states, opts.fsync)
            self.admission.on_pause = self.writer.pause  # 429 pauses on the report's timeline
            if resume is None:
                self.writer.header(header)
            else:
                self.writer.header({"e": "resume", "t": time.time(), **opts.extra_header})
                self._recover(resume)
        except (OSError, WriterError) as exc:
            say("io_error", f"cannot write to {opts.out_dir}: {exc}",
                text=f"tmbatch: cannot write to {opts.out_dir}: {exc}", level=logging.ERROR,
                exit_code=EXIT_IO)
            return EXIT_IO
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
        self.session = make_session(self.settings, opts.concurrency)
        self.writer.start()
        progress = Progress(self.stats, None, quiet=opts.quiet, interval=opts.progress_interval,
                            **progress_kwargs())
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
            await self.session.close()
            if f is not sys.stdin.buffer:
                f.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            try:
                await self.writer.aclose()
            except WriterError as exc:
                self.io_error = self.io_error or str(exc)
        return self._finish(states)

    async def _count_total(self, progress: Progress, states: LineStates) -> None:
        """Lines left to answer, for the ETA: counted in a thread so sending starts at once."""
        with contextlib.suppress(OSError):
            lines = await asyncio.to_thread(count_lines, self.opts.input)
            if self.opts.shard:
                i, n = self.opts.shard
                lines = len(range(i, lines, n))
            done_before = sum(states.counts()[2:]) - self.stats.ok - sum(self.stats.failed.values())
            progress.set_total(max(0, lines - done_before))

    async def _wait_workers(self, producer: asyncio.Task[None]) -> None:
        workers = self._workers
        pending = set(workers)
        while pending:
            if self.stopping is not None and self._signals:
                done, pending = await asyncio.wait(pending, timeout=self.opts.drain_timeout)
                if pending:
                    log.warning("drain timeout: %d request(s) still in flight are left without "
                                "an outcome (ambiguous on resume)", self.stats.in_flight,
                                extra={"event": "drain", "left_in_flight": self.stats.in_flight})
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                return
            done, pending = await asyncio.wait(pending, timeout=0.2)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        if producer.done() and not producer.cancelled() and producer.exception():
            exc = producer.exception()
            if isinstance(exc, WriterError):
                self.io_error = str(exc)
            else:
                raise exc  # type: ignore[misc]

    def _finish(self, states: Any) -> int:
        opts = self.opts
        summary = build_summary(
            self.stats, states, input_lines=self.read_stats.lines,
            blank_lines=self.read_stats.blank, header=self.header,
            stopped=self.stopping, admission=self.admission,
        )
        if self.fatal:
            summary["fatal"] = self.fatal
        if self.io_error:
            summary["io_error"] = self.io_error
        try:
            tmp = opts.out_dir / (SUMMARY + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
            os.replace(tmp, opts.out_dir / SUMMARY)
        except OSError as exc:
            self.io_error = self.io_error or f"cannot write {SUMMARY}: {exc.strerror}"
        if not opts.quiet:
            say("summary", final_line(summary), **summary)
        if self.io_error:
            say("stopped", f"stopped: {self.io_error}", text=f"tmbatch: stopped: {self.io_error}",
                level=logging.ERROR, reason="io_error", exit_code=EXIT_IO)
            return EXIT_IO
        if self.fatal:
            say("stopped", f"stopped by a fatal error: {self.fatal}",
                text=f"tmbatch: stopped by a fatal error: {self.fatal}", level=logging.ERROR,
                reason="fatal", exit_code=EXIT_FATAL)
            return EXIT_FATAL
        if self._signal_name:
            code = EXIT_SIGTERM if self._signal_name == "SIGTERM" else EXIT_SIGINT
            msg = (f"interrupted ({self._signal_name}); run the same command again to resume "
                   "where it stopped")
            say("interrupted", msg, text=f"tmbatch: {msg}", level=logging.WARNING,
                signal=self._signal_name, exit_code=code)
            return code
        failed = summary["counts"]["failed"]
        return EXIT_FAILED if failed else EXIT_OK


def count_lines(path: str) -> int:
    """Newline count plus a last line without one; blank lines included (an estimate)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")
