"""One line, from admission to its outcome: attempts, retries, and the record that says how.

Retries follow the class table (`safety.Outcome`'s policies) through tenacity: only what the
server provably did not process is sent again for billed routes; everything else gets exactly
one outcome. Where a 429 goes: `safety` classifies it, the attempt's admission ticket pauses
every worker and slows the pace (`limits`), and the loop here sends it again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_exponential_jitter,
)

from tmbatch.budget import Budget, Hold
from tmbatch.client import Answer, idempotency_key, send
from tmbatch.config import Settings
from tmbatch.limits import Admission, Ticket, estimate_tokens
from tmbatch.reader import BadLine, Request
from tmbatch.records import FailureRecord, ResultRecord, Timing, record_id
from tmbatch.records import Response as RecordedResponse
from tmbatch.safety import AttemptFailed, Outcome, retryable
from tmbatch.stop import Stop
from tmbatch.summary import RunStats
from tmbatch.writer import Writer

log = logging.getLogger("tmbatch")


class Stopped(Exception):
    """Raised inside an attempt when the run is stopping: nothing was sent for it."""


@dataclass
class Tries:
    """Attempts made for one line in this run (a resend adds the earlier runs' count)."""

    before: int = 0
    now: int = 0

    @property
    def total(self) -> int:
        return self.before + self.now


@dataclass
class LineSender:
    """Everything sending a line needs, shared by the run's workers."""

    settings: Settings
    job_id: str
    admission: Admission
    writer: Writer
    stats: RunStats
    stop: Stop
    session: aiohttp.ClientSession
    prior_attempts: dict[int, int] = field(default_factory=dict)
    fatal_404_after: int = 8
    budget: Budget = field(default_factory=Budget)  # spend, and the --budget-* limits
    _404_streak: int = 0
    _backoff: wait_exponential_jitter = field(
        default_factory=lambda: wait_exponential_jitter(initial=0.5, max=30.0, jitter=1.0))

    async def process(self, req: Request) -> None:
        """Send `req` until it has an outcome (or the run stops), and record it."""
        tokens = 0  # only a --tpm budget needs the estimate: skip the prompt walk otherwise
        if self.admission.tpm is not None:
            tokens = estimate_tokens(req.body, generates=not req.idempotent)
        headers = None
        if not req.idempotent:
            headers = {"Idempotency-Key": idempotency_key(self.job_id, req.custom_id)}
        tries = Tries(self.prior_attempts.get(req.line, 0))
        # Most first attempts succeed, and a tenacity loop costs ~30 % of the client's CPU per
        # request (bench/ablate.py): try once bare, and replay a failure into the loop as its
        # attempt 1, so the predicate, stop, attempt numbers and waits are exactly tenacity's.
        try:
            answer = await self._attempt(req, tokens, headers, tries)
        except (Stopped, AttemptFailed) as exc:
            await self._retry(req, tokens, headers, tries, exc)
        else:
            self._succeed(req, answer)

    async def _retry(self, req: Request, tokens: int, headers: dict[str, str] | None,
                     tries: Tries, first: BaseException) -> None:
        pending: list[BaseException] = [first]
        retrying = AsyncRetrying(
            retry=retry_if_exception(partial(retryable, idempotent=req.idempotent)),
            stop=stop_any(stop_after_attempt(self.settings.max_retries + 1), self._stopping),
            wait=self._wait,
            sleep=partial(self._sleep_between, req, tries),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if pending:
                        raise pending.pop()
                    answer = await self._attempt(req, tokens, headers, tries)
        except Stopped:
            if tries.now:
                self.writer.pending(req.line)  # the last attempt was refused: not processed
            return
        except AttemptFailed as exc:
            if self.stop.stopping and exc.cls.policy.retry:
                self.writer.pending(req.line)  # it would have been retried: the next run does
                return
            self._fail(req, exc, tries.total)
            return
        self._succeed(req, answer)

    def _wait(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        if isinstance(exc, AttemptFailed) and exc.retry_after is not None:
            return 0.0  # the shared pause already holds every worker back
        return float(self._backoff(rs))

    def _stopping(self, rs: RetryCallState) -> bool:
        return self.stop.stopping

    async def _sleep_between(self, req: Request, tries: Tries, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._pending_if_retrying(req, tries)
            raise

    def _pending_if_retrying(self, req: Request, tries: Tries) -> None:
        """Cancelled (drain timeout) between attempts: the last one was refused or never sent,
        so on resume the line is sent again, not mistaken for an unknown (ambiguous) outcome."""
        if tries.now:
            self.writer.pending(req.line)

    async def _attempt(self, req: Request, tokens: int, headers: dict[str, str] | None,
                       tries: Tries) -> Answer:
        try:
            spend = await self.budget.reserve(req)  # the worst case, within --budget-*
        except asyncio.CancelledError:
            self._pending_if_retrying(req, tries)
            raise
        if spend is None:
            raise Stopped  # the budget is reached (the stop is set): nothing was sent
        try:
            return await self._admitted(req, tokens, headers, tries, spend)
        finally:
            spend.end()  # the attempt is over: a no-op once its answer settled it

    async def _admitted(self, req: Request, tokens: int, headers: dict[str, str] | None,
                        tries: Tries, spend: Hold) -> Answer:
        try:
            ticket = await self.admission.admit(tokens)
        except asyncio.CancelledError:
            self._pending_if_retrying(req, tries)
            raise
        try:
            if self.stop.stopping:
                raise Stopped
            return await self._send(req, headers, tries, ticket, spend)
        finally:
            ticket.release()

    async def _send(self, req: Request, headers: dict[str, str] | None, tries: Tries,
                    ticket: Ticket, spend: Hold) -> Answer:
        tries.now += 1
        if tries.now > 1:
            self.stats.retries += 1
        self.writer.dispatch(req.line, tries.total, req.custom_id, spend.journal())
        spend.dispatched()
        self.stats.sent += 1
        self.stats.in_flight += 1
        try:
            answer = await send(self.session, req.url, req.body, headers)
        except AttemptFailed as exc:
            if exc.status == 429:
                self.stats.rejected_429 += 1
            spend.failed(exc)
            paused = ticket.failed(exc)
            if paused is not None:
                self.writer.pause(paused)  # on the report's timeline
            raise
        finally:
            self.stats.in_flight -= 1
        spend.succeeded(answer.body)
        ticket.succeeded(answer.headers, self.stats.add_usage(answer.body))
        return answer

    # -- outcomes -------------------------------------------------------
    def _succeed(self, req: Request, answer: Answer) -> None:
        self._404_streak = 0
        self.stats.ok += 1
        self.stats.latencies.add(answer.latency)
        timing = None
        if answer.ttft is not None:
            self.stats.ttfts.add(answer.ttft)
            usage = answer.body.get("usage") or {}
            out_tokens = usage.get("completion_tokens", usage.get("output_tokens"))
            timing = Timing.of(answer.ttft, answer.latency, out_tokens)
        record = ResultRecord(
            record_id(self.job_id, req.custom_id), req.custom_id, req.line,
            RecordedResponse(answer.status, answer.request_id, answer.body), timing)
        self.writer.result(record, answer.latency, answer.ttft)

    def _fail(self, req: Request, exc: AttemptFailed, attempts: int) -> None:
        if exc.cls.policy.stops_run:
            self.fatal(f"HTTP {exc.status} {exc.code}: {exc.message}. Check the inference API "
                       "key (TENSORMESH_INFERENCE_API_KEY) and, on-demand, the user id")
        elif exc.status == 404 and self.stats.ok == 0:
            self._404_streak += 1
            if self._404_streak >= self.fatal_404_after:
                self.fatal(
                    f"the first {self._404_streak} requests all got 404 ({exc.message}); the "
                    "model is probably not served here: check --model / body.model (`tmbatch "
                    "models` lists served ones) and, on-demand, X-User-Id"
                )
        self.record_failure(FailureRecord.of_attempt(self.job_id, req.line, req.custom_id,
                                                     exc, attempts))

    def bad_line(self, bad: BadLine) -> None:
        self.record_failure(FailureRecord.of(self.job_id, bad.line, bad.custom_id,
                                             Outcome.PERMANENT, bad.code, bad.message, 0))

    def record_failure(self, record: FailureRecord) -> None:
        self.stats.failed[record.outcome] += 1
        self.stats.codes[record.code] += 1
        self.writer.failure(record)

    def fatal(self, message: str) -> None:
        """Nothing more is sent: every request would fail the same way."""
        if self.stop.on_fatal(message):
            log.error("fatal: %s; stopping, nothing more is sent", message,
                      extra={"event": "fatal"})
