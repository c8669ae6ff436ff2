"""One attempt's way past every gate admission keeps (`admission`), settled once with its outcome.

`Permit.__aenter__` meets the gates in order: the budget's reservation, the lane's pause, its
pace, a concurrency slot, tokens per minute. `ok` or `failed` settles it with the outcome,
whose `policy.Policy` says what it means here (refund the tokens, slow down, pause); leaving
the `async with` frees the slot and ends the budget hold, whatever happened. It also counts
the attempt on its way to the server (`Lane.flight`, `Lane.flight_tokens`) from the moment it
is sent until its answer, which is what a stated level less what is in flight needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tmbatch.base.stop import Stopped
from tmbatch.inputs.reader import Request
from tmbatch.limits.lanes import Lane
from tmbatch.limits.schedule import TokenBucket
from tmbatch.policy import AttemptFailed
from tmbatch.spend.reservation import Hold
from tmbatch.spend.tokens import estimate_tokens

if TYPE_CHECKING:
    from tmbatch.limits.admission import Admission


class Permit:
    """One attempt's way past every gate (see the module doc). `async with` it; settle it
    once with `ok` or `failed`; leaving frees the slot and ends the budget hold."""

    __slots__ = ("admission", "charged", "flying", "lane", "req", "sent_at", "slot", "spend",
                 "tokens", "tokens_flying", "tpm", "tpm_fleet", "tpm_local")

    def __init__(self, admission: Admission, lane: Lane, req: Request) -> None:
        self.admission = admission
        self.lane = lane
        self.req = req
        self.tokens = 0  # the estimate, made only when a tokens budget needs it
        self.charged = 0.0
        self.tokens_flying = 0.0
        self.sent_at = 0.0
        self.flying = False  # counted in its lane's requests on their way (`Lane.flight`)
        self.slot = False
        self.spend: Hold = None  # type: ignore[assignment]
        self.tpm: TokenBucket | None = None
        self.tpm_fleet = 0.0  # tokens/min of the fleet's bucket it was booked in (0: none)
        self.tpm_local = False  # booked in this process's bucket too

    async def __aenter__(self) -> Permit:
        adm, lane = self.admission, self.lane
        loop = adm.loop
        if loop is None:
            adm.now()
            loop = adm.loop
            assert loop is not None
        budget = adm.budget
        if budget.enforcing:
            spend = await budget.reserve(self.req)  # the worst case, within --budget-*
            if spend is None:
                raise Stopped  # the budget is reached (the stop is set): nothing was sent
            self.spend = spend
        else:
            self.spend = budget.track(self.req)
        try:
            while True:
                if lane.pause_until > loop.time():
                    await lane.wait_pause(loop)
                paced = lane.pacer.rate is not None
                if paced:
                    await lane.paced(loop)
                closed = lane.controller.windows.closed_since is not None
                if closed and await lane.probe_turn(loop, self):
                    continue  # it waited for a probe's answer: the pause and the pace again
                if adm.shared is not None and not await adm.shared.take(lane):
                    continue  # the fleet paused the lane (--redis)
                if adm.in_flight < adm.cap and not adm.waiters:
                    adm.in_flight += 1
                else:
                    await adm.take_slot()
                self.slot = True
                if lane.pause_until <= loop.time() and (paced or lane.pacer.rate is None):
                    break
                # a refusal came while this waited for a slot (the answer that freed it,
                # even), pausing or pacing the lane: the slot goes to another lane meanwhile
                self.slot = False
                adm.release()
            tpm = self.tpm = adm.tpm or lane.tpm
            if tpm is not None:
                await self._charge(tpm, loop)
        except BaseException:
            self._leave()
            raise
        now = self.sent_at = loop.time()
        if adm.first_sent is None:
            adm.first_sent = now
        lane.sent_at(now)
        if lane.probe is self:
            lane.probe_sent(now)
        self.flying = True
        return self

    async def _charge(self, tpm: TokenBucket, loop: asyncio.AbstractEventLoop) -> None:
        adm, req = self.admission, self.req
        self.tokens = estimate_tokens(req.body, generates=not req.idempotent)
        charged = self.charged = float(max(1, round(self.tokens * adm.ratio)))
        if adm.tpm is tpm and not adm.tpm_warned:
            adm.warn_if_tpm_too_small(charged)
        delay = 0.0
        if adm.shared is not None:  # --redis: the fleet's bucket, unless Redis is cut off
            account = tpm is adm.tpm
            per_minute = (adm.tpm_fleet or tpm.per_minute) if account else tpm.per_minute
            wait = await adm.shared.charge(None if account else self.lane, charged, per_minute,
                                           tpm.burst)
            if wait is not None:
                self.tpm_fleet, delay = per_minute, wait
        # this process's own: alone, or a lane's, whose levels the headers state it keeps
        self.tpm_local = not self.tpm_fleet or tpm is not adm.tpm
        if self.tpm_local:
            delay = max(delay, tpm.reserve(charged, loop.time()))
        self.lane.flight_tokens += charged
        self.tokens_flying = charged
        if delay > 0:
            await asyncio.sleep(delay)
        if self.lane.pause_until > loop.time():  # a refusal came while it waited
            await self.lane.wait_pause(loop)

    async def __aexit__(self, *exc: object) -> None:
        self._leave()

    def _adjust(self, tokens: float) -> None:
        """A debt (tokens > 0) or a credit, in every bucket the charge was booked in."""
        if self.tpm_local:
            self.tpm.adjust(tokens)  # type: ignore[union-attr]
        if self.tpm_fleet:
            adm = self.admission
            adm.shared.settle(  # type: ignore[union-attr]
                None if self.tpm is adm.tpm else self.lane, tokens, self.tpm_fleet)

    def _landed(self) -> None:
        """It is no longer on its way to the server (`Lane.flight`, `Lane.flight_tokens`)."""
        if self.lane.probe is self:
            self.lane.probe_landed()
        if self.flying:
            self.flying = False
            self.lane.flight -= 1
        if self.tokens_flying:
            self.lane.flight_tokens -= self.tokens_flying
            self.tokens_flying = 0.0

    def _leave(self) -> None:
        if self.flying or self.tokens_flying or self.lane.probe is self:
            self._landed()
        if self.slot:
            self.slot = False
            adm = self.admission  # (`Admission.release`, inlined: once per attempt)
            adm.in_flight = adm.in_flight - 1 if adm.in_flight > 0 else 0
            if adm.waiters:
                adm.wake()
        if self.charged and self.tpm is not None and self.sent_at == 0.0:
            self._adjust(-self.charged)  # never sent: the tokens go back
            self.charged = 0.0
        spend = self.spend
        if spend is not None and not spend.settled:
            spend.end()  # the attempt is over

    def ok(self, body: Mapping[str, Any], used: tuple[int, int, int] | None, tokens: int,
           headers: Mapping[str, str] | None) -> None:
        """A success: its spend, its tokens (`tokens`: prompt + completion) and its headers."""
        adm = self.admission
        now = adm.now() if adm.loop is None else adm.loop.time()
        self.spend.succeeded(body, used)  # type: ignore[arg-type]
        tpm = self.tpm
        if tpm is not None and tokens > 0:  # (before the headers, which count its usage)
            self._adjust(tokens - self.charged)
            self.charged = float(tokens)
            adm.learn_ratio(self.tokens, tokens)
        if self.flying or self.tokens_flying:
            self._landed()
        self.lane.succeeded(now, self.sent_at, headers, tokens)
        adm.succeeded(now)

    def failed(self, failure: AttemptFailed) -> float | None:
        """A failed attempt, learnt from as its class says; the seconds of the Retry-After
        pause it started for the lane (the runner journals it), else None."""
        adm, now = self.admission, self.admission.now()
        self.spend.failed(failure)
        policy = failure.cls.policy
        if policy.refund and self.tpm is not None and self.charged:
            self._adjust(-self.charged)  # nothing was generated
            self.charged = 0.0
        self._landed()
        if not policy.slows_admission:
            if failure.headers:
                self.lane.read_headers(failure.headers, now)
            return None
        adm.refused = True
        paused = self.lane.refused(now, self.sent_at, failure.retry_after, failure.headers)
        if paused is not None and adm.shared is not None:
            adm.shared.announce(self.lane, paused)  # the job's other processes pause too
        return paused

    def stalled_for(self) -> float:
        return self.lane.stalled_for(self.admission.now())
