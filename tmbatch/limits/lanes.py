"""A lane: what one (base URL, model) is allowed, kept apart from every other model's.

OpenAI, LiteLLM and most gateways limit each model on its own, so a refusal for one model
says nothing about another: each lane has its own Retry-After pause, pace, stated limits and
controller, and `--limit-scope account` puts every model in one lane for an account limited
as a whole. The concurrency ceiling and `--tpm` stay the run's (`admission`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tmbatch.limits import fleet
from tmbatch.limits.controller import Answer, Change, Controller, PaceConfig
from tmbatch.limits.headers import StatedLimits
from tmbatch.limits.schedule import Pacer, TokenBucket

log = logging.getLogger("tmbatch")

MAX_HOLD = 60.0  # a hold (a reset header, or no hint at all) further away is capped
CLOCK_STEP = 0.001  # a loop clock's step when the loop does not say (uvloop's: whole ms)
LOG_EVERY = 30.0  # seconds between INFO lines about pauses and holds (DEBUG in between)
SCOPES = ("model", "account")
ACCOUNT = "*"  # the one lane's model when the account is limited as a whole


@dataclass(frozen=True, slots=True)
class LaneKey:
    """(base URL, model): the unit a server limits. `model` is ACCOUNT for one lane."""

    base_url: str
    model: str


class Lane:
    """One lane's gates: its pause (every worker sending to it waits), its pace, what its
    headers state; and its controller, told of every send and every answer."""

    def __init__(self, key: LaneKey, controller: Controller, label: str) -> None:
        self.key = key
        self.label = label  # "" when the run has one lane, else " for MODEL"
        self.controller = controller
        self.pacer = Pacer(controller.rate)
        self.floor = 0.0  # no pace below this: the fleet's mean (`share`, --redis)
        self.stated = StatedLimits()
        self.tpm: TokenBucket | None = None  # stated by x-ratelimit-*-tokens headers
        self.flight_tokens = 0.0  # estimates booked for requests not answered yet
        self.flight = 0  # requests sent and not answered yet (`Permit`)
        self.pause_until = -math.inf  # loop time
        self.pauses = 0
        self.paused_seconds = 0.0
        self.holds = 0
        self.held_seconds = 0.0
        self.refusals = 0
        self.refused_run = 0  # refusals in a row: none got through since (`streak`)
        self.sent = 0
        self.last_progress: float | None = None  # loop time of its last success
        self.turn = asyncio.Lock()  # whose slot in the pace is next (see `paced`)
        self.slot_wait: asyncio.Future[None] | None = None  # its wait for the slot
        # closed (rule 4): the attempt probing, when it left (inf: not yet), who waits
        self.probe: object | None = None
        self.probe_at = math.inf
        self.landing: list[asyncio.Future[None]] = []
        self.hearing: asyncio.TimerHandle | None = None  # the next verdict's (`verdicts`)
        self.clock_step: float | None = None  # the loop clock's step (`_extend`)
        self._logged_at = -math.inf

    @property
    def rate(self) -> float | None:
        return self.pacer.rate

    def streak(self, line_refusals: int) -> int:
        """How many refusals in a row a refused line's backoff should grow with. A learning
        lane that another line got through since is not closed: refusals at random, which
        probation left unpaced, are met at the first wait, and a limit is the pace's (or a
        closed lane's hold's) to meet. Without learning (--no-adaptive) the backoff is all
        that spaces a line's tries, so it grows with the line's own refusals."""
        if not self.controller.learn:
            return line_refusals
        return max(1, min(line_refusals, self.refused_run))

    def stalled_for(self, now: float) -> float:
        """Seconds since the lane's last success (or since it began sending)."""
        return 0.0 if self.last_progress is None else now - self.last_progress

    # -- waiting -------------------------------------------------------------------------
    async def wait_pause(self, loop: asyncio.AbstractEventLoop) -> None:
        while (left := self.pause_until - loop.time()) > 0:
            await asyncio.sleep(left)

    async def paced(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for this attempt's slot in the pace. One attempt at a time books and waits (a
        FIFO turnstile): booking ahead for every waiter would fix their slots at the pace of
        the moment, and a pace that changes (cut, paused) applies to the next one at once."""
        pacer = self.pacer
        async with self.turn:
            while True:
                delay = pacer.book(loop.time())
                if delay > 0:
                    epoch = pacer.epoch
                    self.slot_wait = fut = loop.create_future()
                    timer = loop.call_later(delay, _settle, fut)
                    try:
                        await fut
                    except BaseException:
                        timer.cancel()
                        pacer.unbook()
                        raise
                    finally:
                        self.slot_wait = None
                    if pacer.epoch != epoch:
                        timer.cancel()
                        continue  # the pace moved the slot: book again (`Pacer.repace`)
                if self.pause_until <= loop.time():
                    return
                pacer.unbook()  # a Retry-After came meanwhile: its end is the next slot
                await self.wait_pause(loop)

    async def probe_turn(self, loop: asyncio.AbstractEventLoop, who: object) -> bool:
        """Closed (rule 4), a probe is one request and one refusal (`PaceConfig.hold`): the
        first attempt past the hold and the pace probes (`who` becomes `probe`), the rest
        wait for its answer, which a refusal brings within its round trip. A probe out
        longer than twice the refusals' round trip is being served (the lane reopened): the
        rest go on then rather than wait out a long generation. True when this waited (the
        attempt goes through the pause and the pace again)."""
        if self.probe is None or self.probe is who:
            self.probe = who
            return False
        left = self.probe_at + self.controller.verdicts.verdict_in() - loop.time()
        if left <= 0:
            return False
        fut = loop.create_future()
        self.landing.append(fut)
        timer = loop.call_later(left, _settle, fut) if left != math.inf else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
        return True

    def probe_sent(self, now: float) -> None:
        """The probe left: who waits for it knows now how long a refusal would take."""
        self.probe_at = now
        self._wake_landing()

    def probe_landed(self) -> None:
        """The probe is answered (or never went, or the lane reopened): whoever waits for
        it checks again."""
        self.probe, self.probe_at = None, math.inf
        self._wake_landing()

    def _wake_landing(self) -> None:
        waiting, self.landing = self.landing, []
        for fut in waiting:
            _settle(fut)

    # -- what answers say ----------------------------------------------------------------
    def sent_at(self, now: float) -> None:
        self.sent += 1
        self.pacer.last_sent = now
        self.flight += 1
        if self.last_progress is None:
            self.last_progress = now  # --patience counts from the lane's first send
        change = self.controller.on_sent(now)
        if change is not None:
            self._changed(change, now)
        if self.hearing is None and self.controller.verdicts.pending:
            self._await_verdict(now)

    def succeeded(self, now: float, sent: float, headers: Mapping[str, str] | None,
                  used_tokens: int) -> None:
        self.last_progress = now
        self.refused_run = 0
        self.stated.consumed["requests"] += 1
        self.stated.consumed["tokens"] += used_tokens
        stated = self.read_headers(headers, now) if headers else None
        change = self.controller.on_success(sent, now, stated, bool(self.stated.rates))
        if change is not None:
            self._changed(change, now)
        if self.hearing is None and self.controller.verdicts.pending:
            self._await_verdict(now)
        if stated is not None:
            level = self.stated.level("requests")
            if level is not None:  # less what is on its way there, counted by it already
                self.pacer.at_most(level - self.flight, now)

    def refused(self, now: float, sent: float, wait: float | None,
                headers: Mapping[str, str] | None) -> float | None:
        """A refusal; the seconds of the Retry-After pause it started, if it started one."""
        self.refusals += 1
        self.refused_run += 1
        if self.pacer.allowance:
            log.debug("refused after a stated burst: the pace%s spends none again", self.label)
            self.pacer.no_stated_burst()
        stated = self.read_headers(headers, now) if headers else None
        paused = self.pause(wait, now) if wait is not None else None
        self._apply(Answer(sent, now, False, wait, stated, bool(self.stated.rates)), now)
        self.pacer.drained(now)
        self._await_verdict(now)
        return paused

    def _await_verdict(self, now: float) -> None:
        """Hear of the next request let through when it is due, not at the next send or
        answer: at a low pace those are a second apart, and a cut at one request heard of,
        paced at 1/s, heard of the rest of its volley only when its answers came a second
        later (over real sockets a first volley is sent over tens of milliseconds)."""
        if self.hearing is not None:
            return
        due = self.controller.verdicts.next_due()
        if due is not None:
            self.hearing = asyncio.get_running_loop().call_later(
                max(0.0, due - now), self._heard)

    def _heard(self) -> None:
        self.hearing = None
        now = asyncio.get_running_loop().time()
        change = self.controller.hear(now)
        if change is not None:
            self._changed(change, now)
        self._await_verdict(now)

    def read_headers(self, headers: Mapping[str, str], now: float) -> float | None:
        """The rate the headers state (requests/s), and their hold when one is spent (an
        answer of any kind: a success, a refusal, or a failure that only informs)."""
        hold = self.stated.read(headers, now)
        if hold is not None:
            self.hold(hold.seconds, hold.why, now)
        rates = self.stated.rates
        if not rates:
            return None  # (most servers: no x-ratelimit headers, nothing stated)
        tokens = rates.get("tokens")
        if tokens is not None and self.controller.learn:
            tpm = tokens * 60.0 * self.controller.cfg.margin
            if self.tpm is None:
                self.tpm = TokenBucket(tpm)
                log.info("tokens per minute%s: %.0f, stated by x-ratelimit headers",
                         self.label, tpm,
                         extra={"event": "pace", "tokens_per_minute": round(tpm)})
            else:
                self.tpm.set_rate(tpm)
            level = self.stated.level("tokens")
            if level is not None:  # less what is on its way there, booked here already
                self.tpm.at_most(level - self.flight_tokens, now)
        return rates.get("requests")

    def paused_elsewhere(self, until: float, now: float) -> None:
        """The fleet's pause (--redis): another process was refused; this one holds until
        `until` too, and its controller hears of it (`fleet.paused_elsewhere`)."""
        if not self._extend(until - now, now):
            return
        change = fleet.paused_elsewhere(self.controller, now)
        if change is not None:
            self._change(change, now)

    def share(self, mean: float) -> None:
        """The mean pace of the fleet's paced processes (--redis), as of this process's last
        take. The fleet's schedule holds their sum; this process paces at no less than the
        mean, or one whose own measure came out low (it started late, its refusals came in
        a bad second) would finish its shard long after the others. Unpaced, it joins at
        the mean (`fleet.join`): it would add nothing to the sum and learn nothing."""
        c = self.controller
        if c.stated is not None:
            return  # the headers state the limit: nothing learnt or shared goes above it
        if c.rate is None and mean > 0:
            fleet.join(c, mean)
        self.floor = mean
        self._pace(asyncio.get_running_loop().time())

    def _pace(self, now: float) -> None:
        rate = self.controller.rate
        if rate is not None and rate < self.floor:
            pacing = self.pacer.rate
            if pacing is not None and abs(self.floor - pacing) <= 0.01 * self.floor:
                return  # (the mean moves with every take: a per cent is not worth a reset)
            rate = self.floor
        if (rate != self.pacer.rate and self.pacer.repace(rate, self.controller.seen.allowance, now)
                and self.slot_wait):
            _settle(self.slot_wait)  # (a faster pace: the slot waited for comes sooner)

    def _apply(self, answer: Answer, now: float) -> None:
        change = self.controller.on_answer(answer)
        if change is not None:
            self._change(change, now)

    def _changed(self, change: Change, now: float) -> None:
        """A success's change (answered, or let through): it may have reopened the lane."""
        self._change(change, now)
        if self.probe is not None and self.controller.windows.closed_since is None:
            self.probe_landed()  # reopened: nobody waits for a probe's answer

    def _change(self, change: Change, now: float) -> None:
        self._pace(now)
        if change.burst:
            self.pacer.restart_at(self.pause_until, change.burst)
        if change.hold:
            self.hold(change.hold, change.why, now)

    # -- pausing -------------------------------------------------------------------------
    def _extend(self, seconds: float, now: float) -> float:
        """No worker sends for `seconds` from `now` (a Retry-After's are capped where it is
        read, at 600 s: `policy.MAX_RETRY_AFTER`; a hold's at MAX_HOLD, by `hold`); the
        seconds the pause grew by. The loop's clock reads up to one step behind (uvloop's
        counts whole milliseconds), so a pause counted on it could end that much before the
        server's window: one request in about ten runs of `halved` over real sockets arrived
        inside it, by less than a millisecond. The pause is one step longer."""
        if self.clock_step is None:
            loop = asyncio.get_running_loop()
            self.clock_step = float(getattr(loop, "_clock_resolution", CLOCK_STEP))
        until = now + seconds + self.clock_step
        if until <= self.pause_until:
            return 0.0
        grew = min(seconds, until - max(self.pause_until, now))  # (the step is the clock's)
        self.pause_until = until
        self.pacer.restart_at(until)  # nothing saved up before the pause ends
        return grew

    def pause(self, seconds: float, now: float) -> float | None:
        """A Retry-After: nobody sends to this lane for `seconds`; the seconds if it grew."""
        grew = self._extend(seconds, now)
        if not grew:
            return None
        self.pauses += 1
        self.paused_seconds += grew
        self._say(now, "rate limited: every worker%s pauses %.1fs (Retry-After; %d pause(s), "
                  "%.1fs in all)", self.label, seconds, self.pauses, self.paused_seconds,
                  event="rate_limit_pause", retry_after=seconds, pauses=self.pauses)
        return seconds

    def hold(self, seconds: float, why: str, now: float) -> None:
        """A header says the limit is spent, or everything is refused with no hint: nobody
        sends to this lane until it has room again (at most MAX_HOLD: a hold is a guess
        from headers or from refusals with no hint, not a window the server announced)."""
        grew = self._extend(min(seconds, MAX_HOLD), now)
        if not grew:
            return
        self.holds += 1
        self.held_seconds += grew
        shown = min(seconds, MAX_HOLD)
        self._say(now, "%s: every worker%s holds %.3gs (%d hold(s), %.1fs in all)", why,
                  self.label, shown, self.holds, self.held_seconds,
                  event="rate_limit_hold", hold_seconds=shown, holds=self.holds)

    def _say(self, now: float, msg: str, *args: Any, **extra: Any) -> None:
        """At INFO the first time and then at most every LOG_EVERY seconds (a run at its
        limit meets many), DEBUG in between."""
        quiet = now - self._logged_at < LOG_EVERY
        if not quiet:
            self._logged_at = now
        if self.key.model != ACCOUNT:
            extra["model"] = self.key.model
        log.log(logging.DEBUG if quiet else logging.INFO, msg, *args, extra=extra)

    def report(self) -> dict[str, Any]:
        c = self.controller
        return {
            "pace_requests_per_second": None if self.rate is None else round(self.rate, 3),
            "pace_source": c.source,
            "window_allowance": c.windows.allowance,  # sent at each opening (rule 4)
            "pace_lowest": None if c.lowest is None else round(c.lowest, 3),
            "pace_cuts": c.cuts,
            "noise_share": round(c.probation.noise, 3),
            "refusals": self.refusals,
            "pauses": self.pauses,
            "paused_seconds": round(self.paused_seconds, 3),
            "header_holds": self.holds,
            "held_seconds": round(self.held_seconds, 3),
        }


def make_lane(key: LaneKey, cfg: PaceConfig, rpm: float | None, learn: bool,
              label: str) -> Lane:
    return Lane(key, Controller(cfg, rate=rpm / 60.0 if rpm else None, learn=learn), label)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
