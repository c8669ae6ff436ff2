"""One line, from admission to its outcome: attempts, retries, and the record that says how.

Retries follow the class table (`safety.Outcome`'s policies) through tenacity: only what the
server provably did not process is sent again for billed routes; everything else gets exactly
one outcome. Where a 429 goes: `safety` classifies it, the attempt's admission ticket pauses
every worker and slows the pace (`limits`), and the loop here sends it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import aiohttp

from tmbatch.base.config import Settings
from tmbatch.base.defaults import PATIENCE
from tmbatch.base.logs import public_url
from tmbatch.base.stop import Stop, Stopped
from tmbatch.client.http import Answer, idempotency_key, send
from tmbatch.client.served import ServedCheck
from tmbatch.inputs.reader import BadLine, Request
from tmbatch.inputs.samples import as_one, split_choices, takes_n
from tmbatch.journal.cache import Hit
from tmbatch.journal.compact import OK
from tmbatch.journal.records import FailureRecord, ResultRecord, Timing, record_id, usage_tokens
from tmbatch.journal.records import Response as RecordedResponse
from tmbatch.journal.writer import Writer
from tmbatch.limits import Admission, Lane, Permit
from tmbatch.policy import AttemptFailed, Outcome, retryable
from tmbatch.run.cached import RunCache
from tmbatch.run.inflight import InFlight
from tmbatch.run.summary import RunStats

if TYPE_CHECKING:  # tenacity is imported at a line's first failure: most runs never need it
    from tenacity import RetryCallState, wait_exponential_jitter

log = logging.getLogger("tmbatch")

# Attempts in a row that never reach the server, with no answer at all in this run, before the
# run stops (exit 3) instead of walking every line of a big file through its retries.
BREAKER_ATTEMPTS = 16
# Answers to a request of several units (`n`) that say the server does not take the body as
# it is: no work was done, so its units are sent again one request each (`_units`)
N_REFUSED = frozenset((400, 422))


@dataclass(frozen=True, slots=True)
class _Streak:
    """What tenacity's wait reads of a retry (its attempt number), for a backoff that grows
    with the lane's refusals in a row rather than the line's (`Lane.streak`)."""

    attempt_number: int


@dataclass
class Tries:
    """Attempts made for one line in this run (a resend adds the earlier runs' count)."""

    before: int = 0
    now: int = 0
    counted: int = 0  # the failed ones --max-retries counts (not the patient refusals)
    refused: AttemptFailed | None = None  # the last attempt's, when it was a patient refusal

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
    fatal_404_after: int = 8  # 404s on one (route, model), none answered: its lines fail
    patience: float = PATIENCE.value  # seconds without any success before refusals are final
    served_models: tuple[str, ...] | None = None  # preflight's list (served.ServedCheck)
    served: ServedCheck = field(init=False)
    # Workers whose request is on the wire, held to --timeout (`InFlight`, swept by the runner)
    in_flight: InFlight = field(init=False)
    # Circuit breaker: attempts in a row that never reached the server, while none ever has.
    answered: bool = False
    unreached_streak: int = 0
    # The one call that sends an attempt (client.send); the virtual-time matrix answers here.
    transport: Callable[..., Awaitable[Answer]] = send
    # --cache: looked up before admission, stored after the result (`run.cached`)
    cache: RunCache | None = None
    # --samples-via n: (route, model) pairs whose server ignored or refused `n`; their
    # units are sent one request each from then on (`joins`)
    no_n: set[tuple[str, object]] = field(default_factory=set)
    # The waits between attempts (tenacity's), made at the run's first retry (`_retry`).
    _backoff: wait_exponential_jitter | None = field(default=None, init=False)
    _refused_backoff: wait_exponential_jitter | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.served = ServedCheck(self.served_models, self.fatal_404_after)
        self.in_flight = InFlight(self.settings.timeout)

    async def process(self, req: Request, task: asyncio.Task[None] | None = None) -> None:
        """Send `req` until it has an outcome (or the run stops), and record it. `task`: the
        one running this (a worker knows its own: `asyncio.current_task()` is a Python
        call and a getpid(2) on 3.11, once per line otherwise)."""
        if self.cache is not None:
            missed = self._look_up(req)
            if missed is not req:  # no permit, no spend, nothing sent for a hit
                if self.cache.hits % 64 == 0:
                    await asyncio.sleep(0)  # a run of hits lets the writer and progress in
                if missed is None:
                    return
                req = missed
        refusal = self.served.refusal(req.url, req.body.get("model"), req.line)
        if refusal is not None:  # the server does not serve it: fail it unsent, run the rest
            for unit in req.each_unit:
                self.record_failure(FailureRecord.of(
                    self.job_id, unit.line, unit.custom_id, Outcome.PERMANENT, refusal.code,
                    refusal.message, self.prior_attempts.get(unit.line, 0),
                    sample=unit.sample))
            return
        headers = None
        if not req.idempotent:
            headers = {"Idempotency-Key": idempotency_key(
                self.job_id, req.custom_id if req.key_id is None else req.key_id)}
        before = self.prior_attempts.get(req.line, 0) if self.prior_attempts else 0
        # Most first attempts succeed, and a tenacity loop costs ~30 % of the client's CPU per
        # request (bench/ablate.py): try once bare, and replay a failure into the loop as its
        # attempt 1, so the predicate, stop, attempt numbers and waits are exactly tenacity's.
        # The first attempt is `_attempt`'s frame written out here (a coroutine less per
        # line, and its `Tries` made only when it fails); the steps are the same methods.
        tries: Tries | None = None
        try:
            async with self.admission.permit(req) as permit:
                if self.stop.stopping:
                    raise Stopped
                if task is None:
                    task = asyncio.current_task()
                self._dispatch(req, before + 1, permit, task)  # type: ignore[arg-type]
                try:
                    answer = await self.transport(self.session, req.url, req.body, headers)
                except (AttemptFailed, asyncio.CancelledError) as caught:
                    tries = Tries(before, 1)
                    raise self._unanswered(caught, req, permit, tries, task) from None
                finally:
                    self._landed(task)  # type: ignore[arg-type]
                self._answered(answer, permit)
        except (Stopped, AttemptFailed) as exc:
            await self._retry(req, headers, tries or Tries(before), exc)
        else:
            if req.units is None:
                self._succeed(req, answer)
            else:
                await self._units(req.units, answer, task)

    async def _retry(self, req: Request, headers: dict[str, str] | None, tries: Tries,
                     first: BaseException) -> None:
        from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

        if self._backoff is None:
            self._backoff = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=1.0)
            # A refusal with no hint on an unpaced lane: the server did no work and the lane's
            # controller decides the pace, so a retry waits briefly (refusals at random are
            # met at once, a limit by the pace the refusals set), growing if they go on
            self._refused_backoff = wait_exponential_jitter(multiplier=0.1, max=10.0,
                                                            jitter=0.1)
        pending: list[BaseException] = [first]
        lane = self.admission.lane(req.body.get("model"))
        retrying = AsyncRetrying(
            retry=retry_if_exception(partial(retryable, idempotent=req.idempotent)),
            stop=partial(self._give_up, tries, lane),
            wait=partial(self._wait, lane),
            sleep=asyncio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if pending:
                        raise pending.pop()
                    answer = await self._attempt(req, headers, tries)
        except Stopped:
            return  # the line is pending: its last attempt, if any, did no work (journaled)
        except AttemptFailed as exc:
            if self.stop.stopping and exc.cls.policy.retry:
                return  # it would have been retried: pending (journaled), the next run sends it
            if req.units is not None and exc.status in N_REFUSED:
                await self._units(req.units, None, None, exc.message)
                return
            self._fail(req, exc, tries.total)
            return
        if req.units is None:
            self._succeed(req, answer)
        else:
            await self._units(req.units, answer, None)

    def _wait(self, lane: Lane, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        if isinstance(exc, AttemptFailed) and exc.cls.policy.patient:
            if exc.retry_after is not None or lane.rate is not None:
                return 0.0  # the lane's pause (`_await_turn`), or its pace, holds it back
            # never past the patience: a 10 s backoff begun 9 s into it would end the line
            # only after the next refusal, at 19 s (issue 24 saw 15.3 s for --patience 10)
            left = self.patience - lane.stalled_for(asyncio.get_running_loop().time())
            streak = _Streak(lane.streak(rs.attempt_number))  # the lane's, not the line's
            return max(0.0, min(float(self._refused_backoff(streak)), left))  # type: ignore
        return float(self._backoff(rs))  # type: ignore[misc]

    def _give_up(self, tries: Tries, lane: Lane, rs: RetryCallState) -> bool:
        """A refusal proves the server did no work, and a lane that still makes progress will
        get its turn: retried until nothing at all has succeeded on its lane for --patience.
        Anything else has --max-retries."""
        if self.stop.stopping:
            return True
        exc = rs.outcome.exception() if rs.outcome else None
        if isinstance(exc, AttemptFailed) and exc.cls.policy.patient:
            return lane.stalled_for(asyncio.get_running_loop().time()) >= self.patience
        return tries.counted > self.settings.max_retries

    async def _await_turn(self, lane: Lane, refused: AttemptFailed) -> None:
        """After a refusal: wait out the lane's pause (a Retry-After window) only while the
        patience lasts. If nothing on the lane succeeds before it is over, the refusal is
        final then, at --patience, not after a pause that outlasts it and one more refusal."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            left = self.patience - lane.stalled_for(now)
            if left <= 0:
                raise refused  # `_give_up` ends the line: its lane made no progress
            pause = lane.pause_until - now
            if pause <= 0:
                return
            await asyncio.sleep(min(pause, left))

    async def _attempt(self, req: Request, headers: dict[str, str] | None,
                       tries: Tries) -> Answer:
        """One attempt after the first (which `process` makes itself, the same way), inside
        its permit (budget, pause, pace, slot, tokens), which is settled with the outcome and
        let go whatever happens. One coroutine, not one per step: every layer is walked again
        on each resume of the send (bench/instructions.py)."""
        if tries.refused is not None:
            await self._await_turn(self.admission.lane(req.body.get("model")), tries.refused)
        async with self.admission.permit(req) as permit:
            if self.stop.stopping:
                raise Stopped
            tries.now += 1
            self.stats.retries += 1  # (attempt 1 is `process`'s)
            task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
            self._dispatch(req, tries.total, permit, task)
            try:
                answer = await self.transport(self.session, req.url, req.body, headers)
            except (AttemptFailed, asyncio.CancelledError) as caught:
                raise self._unanswered(caught, req, permit, tries, task) from None
            finally:
                self._landed(task)
            self._answered(answer, permit)
            return answer

    # -- one attempt's steps, for `process`'s first attempt and `_attempt`'s later ones ----
    def _answered(self, answer: Answer, permit: Permit) -> None:
        """The server answered: the permit is settled with what the answer used."""
        self.answered, self.unreached_streak = True, 0
        used = usage_tokens(answer.body)
        permit.ok(answer.body, used, self.stats.add_usage(used), answer.headers)

    def _unanswered(self, caught: AttemptFailed | asyncio.CancelledError, req: Request,
                    permit: Permit, tries: Tries, task: asyncio.Task[None] | None
                    ) -> AttemptFailed:
        """The attempt failed or was cancelled in flight: what it was, settled."""
        exc = self.in_flight.failure(caught, task)  # type: ignore[arg-type]
        self._failed_attempt(req, exc, permit, tries)
        return exc

    def _landed(self, task: asyncio.Task[None]) -> None:
        """The attempt is no longer in flight, however it ended."""
        self.stats.in_flight -= 1
        self.in_flight.discard(task)

    def _dispatch(self, req: Request, attempt: int, permit: Permit,
                  task: asyncio.Task[None]) -> None:
        """Journal the attempt (durable before its bytes leave) and count `task`, whose
        request it is, in flight. A request of several units (`n`) is dispatched for each,
        its worst case booked once, on the first."""
        spend = permit.spend
        if req.units is None:
            self.writer.dispatch(req.line, attempt, req.custom_id, spend.journal())
        else:
            reserved = spend.journal()
            for unit in req.units:
                self.writer.dispatch(unit.line, attempt, unit.custom_id, reserved)
                if reserved is not None:
                    reserved = [reserved[0], 0, 0]
        spend.dispatched()
        self.stats.sent += 1
        self.stats.in_flight += 1
        self.in_flight.add(task, permit.sent_at)

    def _failed_attempt(self, req: Request, exc: AttemptFailed, permit: Permit,
                        tries: Tries) -> None:
        if exc.status == 429:
            self.stats.rejected_429 += 1
        tries.refused = exc if exc.cls.policy.patient else None
        if not exc.cls.policy.patient:
            tries.counted += 1
        paused = permit.failed(exc)
        if paused is not None:
            self.writer.pause(paused)  # on the report's timeline, and honoured by a resume
        if exc.cls.policy.retry:
            # Provably not processed: if the run dies before the next attempt, the line is
            # sent again on resume, not mistaken for an unknown (ambiguous) outcome.
            for unit in req.each_unit:
                self.writer.pending(unit.line)
        if exc.cls.policy.reached_server:
            self.answered, self.unreached_streak = True, 0
            return
        self.unreached_streak += 1
        if not self.answered and self.unreached_streak >= self.breaker_after:
            self.fatal(
                f"cannot reach {public_url(self.settings.base_url)}: {self.unreached_streak} "
                f"attempts in a row never reached it ({exc.code}: {exc.message}) and nothing "
                "has answered; check --base-url (or TENSORMESH_*_BASE_URL) and the network. "
                "The lines not sent yet stay pending: run the same command again to resume"
            )

    @property
    def breaker_after(self) -> int:
        """Before any line can exhaust its retries, so a dead host leaves every line pending."""
        return max(1, min(BREAKER_ATTEMPTS, self.settings.max_retries + 1))

    # -- outcomes -------------------------------------------------------
    def joins(self, req: Request) -> bool:
        """Whether `req` may share one request with its line's other samples (`n`)."""
        return takes_n(req) and (req.url, req.body.get("model")) not in self.no_n

    def _look_up(self, req: Request) -> Request | None:
        """`req` with its cached units answered from the cache: `req` itself when none
        was, None when all were, else the units left, as one request."""
        assert self.cache is not None
        every = req.each_unit
        left = []
        for unit in every:
            hit = self.cache.lookup(unit)
            if hit is None:
                left.append(unit)
            else:
                self._cached(unit, hit)
        if not left:
            return None
        return req if len(left) == len(every) else as_one(left)

    async def _units(self, units: tuple[Request, ...], answer: Answer | None,
                     task: asyncio.Task[None] | None, refused: str | None = None) -> None:
        """The answer to a request of several units: choice k is unit k's answer. Units
        it has no choice for (a server that ignores `n`), or all of them when the server
        refused the body (`refused`: a 400 or 422, which did no work), are sent again one
        request each, and the pair's units are not joined again: after fewer choices at
        once, after a refusal only once the first unit alone succeeds (a body the server
        refuses either way says nothing about `n`, and each unit fails on its own)."""
        got = 0
        if answer is not None:
            split = split_choices(answer.body, len(units))  # [] when `choices` is no list
            for unit, body in zip(units, split, strict=False):
                self._succeed(unit, dataclasses.replace(answer, body=body, raw=None))
            got = len(split)
            if got < len(units):
                self._without_n(units[0], f"answered {got} choice(s) for n={len(units)}")
        rest = units[got:]
        for unit in rest:
            self.writer.pending(unit.line)  # no answer yet, and nothing billed for it
        for i, unit in enumerate(rest):
            await self.process(unit, task)
            if i == 0 and refused is not None and self.writer.states.get(unit.line) == OK:
                self._without_n(unit, f"refused it ({refused}), and took the sample alone")

    def _without_n(self, unit: Request, why: str) -> None:
        """From now on `unit`'s route and model get a request per sample; said once."""
        pair = (unit.url, unit.body.get("model"))
        if pair in self.no_n:
            return
        self.no_n.add(pair)
        log.warning("%s on %s: the server %s; each sample of this model is sent as a "
                    "request of its own from now on (--samples-via seed)", pair[1], pair[0],
                    why, extra={"event": "samples_via_seed", "model": pair[1],
                                "route": pair[0]})

    def _succeed(self, req: Request, answer: Answer) -> None:
        self.served.succeeded(req.url, req.body.get("model"))
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
            RecordedResponse(answer.status, answer.request_id, answer.body), timing, answer.raw,
            sample=req.sample)
        self.writer.result(record, answer.latency, answer.ttft)
        if self.cache is not None:
            self.cache.store(req, answer)  # committed after the result line is written

    def _cached(self, req: Request, hit: Hit) -> None:
        """A hit: results.jsonl gets the stored answer, marked, with its original request id."""
        self.stats.ok += 1
        self.writer.result(ResultRecord(
            record_id(self.job_id, req.custom_id), req.custom_id, req.line,
            RecordedResponse(hit.status, hit.request_id, None), None, hit.body, cached=True,
            sample=req.sample))

    def _fail(self, req: Request, exc: AttemptFailed, attempts: int) -> None:
        if exc.cls.policy.stops_run:
            self.fatal(f"HTTP {exc.status} {exc.code}: {exc.message.rstrip('.')}. Check the "
                       "inference API key (TENSORMESH_INFERENCE_API_KEY) and, on-demand, the "
                       "user id")
        elif exc.status == 404:  # judged per (route, model): the rest of the file runs
            self.served.not_found(req.url, req.body.get("model"), exc.message)
        for unit in req.each_unit:
            self.record_failure(FailureRecord.of_attempt(self.job_id, unit.line,
                                                         unit.custom_id, exc, attempts,
                                                         unit.sample))

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
