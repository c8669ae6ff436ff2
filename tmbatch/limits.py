"""Admission: nothing is sent faster than the account allows, and as fast as it does.

Gates shared by every worker, checked in this order before each attempt:

1. one pause: a 429's Retry-After (any spelling `safety.parse_retry_after` reads), or an
   `x-ratelimit-remaining-*: 0` header (until one more request fits). No request leaves while
   it is on, whichever worker it belongs to.
2. a concurrency slot: `--concurrency` is the ceiling. While the pace is learnt, a run starts
   with a few in flight and opens up by one per answer (a server's burst is not spent on the
   first volley), so a server that answers fast is at the ceiling within a few round trips.
3. the pace (`pacing.Pacer`): `--rpm`, or what `pacing.RateLearner` learnt from refusals,
   `x-ratelimit-*` headers and successes when no `--rpm` is given.
4. tokens per minute: an estimate is charged before sending and the difference
   to the response's `usage` is settled afterwards (debt or credit), and the
   estimate itself is scaled by the learnt actual/estimated ratio. The token
   bucket is a small GCRA of our own because aiolimiter cannot go into debt.

Each admitted attempt gets a `Ticket`; the answer is reported to it, and the outcome's
`safety.Policy` says what that means here (refund the tokens, slow down).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tmbatch.pacing import Pacer, RateLearner
from tmbatch.safety import AttemptFailed

# The estimate lives in `tokens`, shared with budgets and `tmbatch estimate`; these names stay
# importable from here, where --tpm uses them.
from tmbatch.tokens import DEFAULT_MAX_OUTPUT_TOKENS, estimate_tokens  # noqa: F401

log = logging.getLogger("tmbatch")

BURST_SECONDS = 0.5  # the token bucket's burst
MAX_HOLD = 60.0  # a reset header further away than this is capped, like Retry-After
HOLD_LOG_EVERY = 30.0  # seconds between INFO lines about header holds (DEBUG in between)
PAUSE_LOG_EVERY = 30.0  # the same for Retry-After pauses: a run at its limit meets many
START_IN_FLIGHT = 8  # while learning: requests in flight at first, +1 per second answer ...
OPEN_EVERY = 0.05  # ... and doubled this often until the server first refuses, so a slow
# server (long answers, a queue) is at the ceiling in a few tenths of a second, not after a
# few of its round trips; a tick in which answers came back for half the cap is left to them
_RATELIMIT_HEADERS = tuple(
    (kind, f"x-ratelimit-remaining-{kind}", f"x-ratelimit-limit-{kind}",
     f"x-ratelimit-reset-{kind}") for kind in ("requests", "tokens"))
RATIO_ALPHA = 0.05  # weight of one response in the learnt usage/estimate ratio
RATIO_BOUNDS = (0.02, 50.0)
RATE_WINDOW = 30.0  # seconds of successes the settled rate is measured over


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds from an OpenAI-style reset header: "1s", "6m0s", "250ms", "1h2m3.5s", "0.5".

    Anything else counts as absent: a header we cannot read must not stall the run.
    """
    if not text:
        return None
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * scale[m.group(2)]
        pos = m.end()
    return total if pos == len(s) and pos > 0 else None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(float(raw))
    except ValueError:
        return None


class TokenBucket:
    """GCRA with reservations: `reserve` books tokens and says how long to wait.

    Unlike a leaky bucket it accepts a booking bigger than its burst (the wait is
    just longer) and `adjust` can move it into debt or give credit, which is what
    settling an estimate against real usage needs.
    """

    def __init__(self, per_minute: float, burst_seconds: float = BURST_SECONDS) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1.0, self.rate * burst_seconds) / self.rate  # seconds of tokens
        self.tat = -math.inf  # when the bucket would be empty again ("theoretical arrival")

    def set_rate(self, per_minute: float) -> None:
        """A new limit (stated by the server): bookings already made keep their times."""
        self.rate = per_minute / 60.0
        self.burst = max(1.0, self.rate * BURST_SECONDS) / self.rate

    def reserve(self, amount: float, now: float) -> float:
        self.tat = max(self.tat, now) + amount / self.rate
        return max(0.0, self.tat - now - self.burst)

    def adjust(self, amount: float) -> None:
        """Debt (positive) delays later bookings; credit (negative) brings them forward.
        Credit below an empty bucket is lost on purpose: an idle bucket is not a backlog."""
        if math.isfinite(self.tat):
            self.tat += amount / self.rate


@dataclass(slots=True, eq=False)
class Ticket:
    """One admitted attempt: its concurrency slot and the tokens charged for it.

    The runner holds it for the attempt and reports the answer to it, so what is refunded
    or settled is exactly what this attempt was charged, whatever other attempts do.
    """

    admission: Admission
    estimated: int
    charged: float
    sent_at: float
    released: bool = False

    def release(self) -> None:
        """End of the attempt, whatever its outcome: its slot is free again (once)."""
        if not self.released:
            self.released = True
            self.admission._release()

    def succeeded(self, headers: Mapping[str, str] | None, used_tokens: int) -> None:
        """Learn from an answer: rate-limit headers, the pace, the real token usage."""
        adm = self.admission
        now = adm._loop.time()
        consumed = adm._consumed
        consumed["requests"] += 1
        consumed["tokens"] += used_tokens
        if headers:
            adm._from_headers(headers, now)
        adm._on_success(now, self.sent_at)
        if adm.tpm is not None and used_tokens > 0:
            adm.tpm.adjust(used_tokens - self.charged)
            self.charged = float(used_tokens)  # settled: a second report is a no-op
            adm._learn_ratio(self.estimated, used_tokens)

    def failed(self, failure: AttemptFailed) -> float | None:
        """Learn from a failed attempt as its class says; the seconds of a Retry-After pause
        this started for every worker (the runner journals it), else None."""
        adm = self.admission
        now = adm._loop.time()
        if failure.headers:
            adm._from_headers(failure.headers, now)
        policy = failure.cls.policy
        if policy.refund and adm.tpm is not None and self.charged:
            adm.tpm.adjust(-self.charged)  # nothing was generated
            self.charged = 0.0
        if not policy.slows_admission:
            return None
        adm.refusals += 1
        closed = adm.learner.refused(now, self.sent_at, failure.retry_after or 0.0)
        if failure.retry_after is not None and adm.pause(failure.retry_after):
            return failure.retry_after
        if failure.retry_after is None and closed is not None:
            adm.hold(closed, "every request refused for a second, with no Retry-After")
        return None


class Admission:
    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        concurrency: int = 64,
        adaptive: bool = False,
    ) -> None:
        self.pacer = Pacer(rpm / 60.0 if rpm else None)
        # No --rpm: the pace is learnt (unless --no-adaptive); with it, --adaptive learns too.
        self.learner = RateLearner(self.pacer, learn=adaptive)
        self.tpm = TokenBucket(tpm) if tpm else None
        self.tpm_target = tpm
        self.tpm_warned = False
        self.pause_until = 0.0
        self.pauses = 0
        self.paused_seconds = 0.0
        self.holds = 0
        self.held_seconds = 0.0
        self.refusals = 0
        self._hold_logged_at = -math.inf
        self._pause_logged_at = -math.inf
        self._anchors: dict[str, tuple[float, float, int]] = {}
        self._hinted: dict[str, float] = {}
        self._measured: set[str] = set()  # kinds whose rate was measured over a second
        self._consumed = {"requests": 0, "tokens": 0}
        self.tpm_learnt = False
        self.adaptive = adaptive
        self.ceiling = max(1, concurrency)
        # while learning, a slow start: a few in flight, one more per answer
        self.cap = min(self.ceiling, START_IN_FLIGHT) if adaptive else self.ceiling
        self._opening = 0
        self._opening_answers = 0  # answers since the slow start's clock last ticked
        self._opener: asyncio.TimerHandle | None = None
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._turn = asyncio.Lock()  # whose slot in the pace is next (see _paced)
        # learnt tokens-per-estimate ratio, as two moving sums so big requests weigh more
        self._ema_raw = 0.0
        self._ema_actual = 0.0
        self.ratio = 1.0
        self.settled = 0
        # successes, for the rate the run settled at and for --patience
        self._ok_times: deque[float] = deque()
        self._first_sent: float | None = None
        self.last_progress: float | None = None  # loop time of the last success
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def stalled_for(self) -> float:
        """Seconds since the last success of the run (or since it began sending)."""
        if self.last_progress is None or self._loop is None:
            return 0.0
        return self._loop.time() - self.last_progress

    @property
    def pace(self) -> float | None:
        """Requests per second the run is paced at (None: only concurrency limits it)."""
        return self.pacer.rate

    # -- waiting --------------------------------------------------------
    async def wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = self.pause_until - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def _take_slot(self) -> None:
        loop = self._loop
        if self.cap < self.ceiling and self._opener is None and not self.refusals:
            self._opener = loop.call_later(OPEN_EVERY, self._open)
        while self.in_flight >= self.cap:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                else:
                    self._wake()  # woken but leaving: pass the free slot on
                raise
        self.in_flight += 1

    def _open(self) -> None:
        """The slow start's clock: double the cap, until the ceiling or the first refusal."""
        self._opener = None
        if self.refusals:
            return  # the server said no: from here answers open the cap, the pace governs
        if self._opening_answers < self.cap // 2:
            # too few answers came back this tick to open the cap by themselves (a slow
            # server): the clock doubles it; a fast server's answers open it as they come,
            # and doubling on top would send a volley bigger than any the server answered
            self.cap = min(self.ceiling, self.cap * 2)
        self._opening_answers = 0
        self._wake()
        if self.cap < self.ceiling and self._waiters:
            self._opener = self._loop.call_later(OPEN_EVERY, self._open)

    def _wake(self) -> None:
        free = self.cap - self.in_flight
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    def _release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self._waiters:
            self._wake()

    def admit_now(self, tokens: int) -> Ticket | None:
        """`admit` without a coroutine, for the common case with nothing to wait for (no
        pause, no pace, no --tpm, a free slot and nobody queued for one); None when the
        caller must `await admit(tokens)`."""
        loop = self._loop
        if (loop is None or self.pacer.rate is not None or self.tpm is not None
                or self.in_flight >= self.cap or self._waiters):
            return None
        now = loop.time()
        if self.pause_until > now:
            return None
        self.in_flight += 1
        return self._ticket(tokens, 0.0, now)

    async def admit(self, tokens: int) -> Ticket:
        """Wait until this attempt may be sent; the ticket must be released when it ends."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self.last_progress = loop.time()
        if self.pause_until > loop.time():
            await self.wait_pause()
        if self.in_flight >= self.cap:
            await self._take_slot()
        else:
            self.in_flight += 1
        charged = 0.0
        try:
            if self.pause_until > loop.time():
                # a 429 came while this waited for a slot (the answer that freed it, even):
                # 59 requests went out in the 15 ms after the first 429 at 20/s holding 5
                await self.wait_pause()
            if self.pacer.rate is not None:
                await self._paced()
            if self.tpm is not None:
                charged = float(max(1, round(tokens * self.ratio)))
                if not self.tpm_warned:
                    self._warn_if_tpm_too_small(charged)
                delay = self.tpm.reserve(charged, loop.time())
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.pause_until > loop.time():  # a 429 came while we waited
                    await self.wait_pause()
        except BaseException:
            if self.tpm is not None and charged:
                self.tpm.adjust(-charged)
            self._release()
            raise
        return self._ticket(tokens, charged, loop.time())

    def _ticket(self, tokens: int, charged: float, now: float) -> Ticket:
        """An admitted attempt (a slot taken, `charged` tpm tokens): the settled rate counts
        from the first."""
        if self._first_sent is None:
            self._first_sent = now
        return Ticket(self, tokens, charged, now)

    async def _paced(self) -> None:
        """Wait for this attempt's slot in the pace. One attempt at a time books and waits
        (a FIFO turnstile): booking ahead for every waiter would fix their slots at the pace
        of the moment, and a pace that changes (learnt, cut, paused) must apply to the next
        attempt at once."""
        loop, pacer = self._loop, self.pacer
        async with self._turn:
            while True:
                delay = pacer.book(loop.time())
                if delay > 0:
                    try:
                        await asyncio.sleep(delay)
                    except BaseException:
                        pacer.unbook()
                        raise
                if self.pause_until <= loop.time():
                    return
                pacer.unbook()  # a Retry-After came meanwhile: its end is the next slot
                await self.wait_pause()

    def _warn_if_tpm_too_small(self, charged: float) -> None:
        """A request bigger than a minute's budget waits minutes for it, and the first one
        shows it: say so at once rather than leave the run looking stuck."""
        target = self.tpm_target or 0.0
        if charged <= target:
            return
        self.tpm_warned = True
        log.warning(
            "--tpm %g is below one request's estimate of %d tokens (prompt characters / 4 + "
            "max_tokens, %d when a request gives none): each such request waits %.1f minutes "
            "for the budget; raise --tpm, or give the requests a smaller max_tokens",
            target, charged, DEFAULT_MAX_OUTPUT_TOKENS, charged / target,
            extra={"event": "tpm_below_request", "tpm": target, "estimate": charged},
        )

    # -- learning from answers ------------------------------------------
    def _learn_ratio(self, estimated: int, actual: int) -> None:
        """The estimate's bias, so the next charges are closer to what usage will say."""
        self.settled += 1
        a = RATIO_ALPHA if self.settled > 1 else 1.0
        self._ema_raw += a * (max(1, estimated) - self._ema_raw)
        self._ema_actual += a * (actual - self._ema_actual)
        lo, hi = RATIO_BOUNDS
        self.ratio = min(hi, max(lo, self._ema_actual / self._ema_raw))

    def _on_success(self, now: float, sent_at: float) -> None:
        self.last_progress = now
        ok = self._ok_times
        ok.append(now)
        if ok[0] < now - 2 * RATE_WINDOW:
            while ok and ok[0] < now - 2 * RATE_WINDOW:
                ok.popleft()
        self.learner.success(now, sent_at)
        if self.cap < self.ceiling:  # slow start: one more in flight for every second answer
            self._opening_answers += 1
            self._opening += 1
            if self._opening >= 2:
                self._opening = 0
                self.cap += 1
                self._wake()

    def _from_headers(self, headers: Mapping[str, str], now: float) -> None:
        """What `x-ratelimit-*` headers say: the limit itself, and when the bucket is empty.

        OpenAI's `x-ratelimit-reset-*` is the time until the bucket is FULL again (llmock:
        `60s` with a limit of 120/min, where its own 429 says `retry-after: 20`), and the
        bucket refills evenly: it refills (limit - remaining) in `reset`, which is the rate
        the pace follows; with nothing remaining, the next request fits after
        reset / (limit - remaining), not after all of it (the hold). Without a limit, reset
        is all we know, so the hold is the whole of it (capped at MAX_HOLD).
        """
        for kind, remaining_name, limit_name, reset_name in _RATELIMIT_HEADERS:
            if remaining_name not in headers:  # most servers: no call at all
                continue
            remaining = _int_header(headers, remaining_name)
            if remaining is None:
                continue
            limit = _int_header(headers, limit_name)
            reset = parse_duration(headers.get(reset_name))
            if limit is not None and reset is not None:
                self._hinted_rate(kind, limit, remaining, reset, now)
            if remaining > 0 or not reset:
                continue
            if limit is not None and limit > remaining:
                seconds = reset / (limit - remaining)
                why = (f"x-ratelimit-remaining-{kind}: 0 (limit {limit}, full again in "
                       f"{reset:g}s: one more fits in {seconds:.3g}s)")
            else:
                seconds = reset
                why = f"x-ratelimit-remaining-{kind}: 0 (reset in {reset:g}s, no limit header)"
            self.hold(seconds, why)

    def _hinted_rate(self, kind: str, limit: int, remaining: int, reset: float,
                     now: float) -> None:
        """The refill rate, from how `reset` moves: reset = deficit / rate, so between two
        answers reset grows by consumed / rate and shrinks by the time passed, and
        rate = consumed / (reset' - reset + elapsed). `remaining` alone would do
        ((limit - remaining) / reset), but it is a whole number: with a small limit that is
        off by up to a token in ten. Sampled a second apart, smoothed; a full bucket says
        nothing (it stopped refilling), so it restarts the measurement."""
        consumed = self._consumed[kind]
        if remaining >= limit:
            self._anchors.pop(kind, None)
            return
        anchor = self._anchors.get(kind)
        if anchor is None or now - anchor[0] < 1.0:
            if anchor is None:
                self._anchors[kind] = (now, reset, consumed)
            deficit = limit - remaining
            if kind in self._measured or deficit < max(2, limit / 4) or reset <= 0:
                return
            # until a second has been measured: this answer's own ratio, its whole-number
            # `remaining` corrected by half a token on average, on a deficit big enough
            rate = (deficit - 0.5) / reset
            old = self._hinted.get(kind)
            rate = rate if old is None else 0.8 * old + 0.2 * rate
        else:
            t0, reset0, consumed0 = anchor
            self._anchors[kind] = (now, reset, consumed)
            refill = reset - reset0 + (now - t0)
            if refill <= 0 or consumed <= consumed0:
                return
            rate = (consumed - consumed0) / refill
            old = self._hinted.get(kind) if kind in self._measured else None
            rate = rate if old is None else 0.5 * old + 0.5 * rate
            self._measured.add(kind)
        self._hinted[kind] = rate
        if kind == "requests":
            self.learner.hint(rate)
        elif self.learner.learn and (self.tpm is None or self.tpm_learnt):
            tpm = rate * 60.0 * 0.98
            if self.tpm is None:
                self.tpm = TokenBucket(tpm)
                self.tpm_learnt = True
                log.info("tokens per minute: %.0f, stated by x-ratelimit headers", tpm,
                         extra={"event": "pace", "tokens_per_minute": round(tpm)})
            else:
                self.tpm.set_rate(tpm)
            self.tpm_target = tpm

    # -- pausing --------------------------------------------------------
    def _extend(self, seconds: float) -> float:
        """Move the shared pause to `seconds` from now; return how much it grew (0 if not)."""
        now = asyncio.get_running_loop().time()
        until = now + min(seconds, MAX_HOLD)
        if until <= self.pause_until:
            return 0.0
        grew = until - max(self.pause_until, now)
        self.pause_until = until
        return grew

    def hold(self, seconds: float, why: str) -> bool:
        """A server header says the budget is spent: nobody sends until it has room again.

        Logged at INFO the first time and then at most every HOLD_LOG_EVERY seconds (a run
        at its limit meets such headers on most answers), with the count so far."""
        grew = self._extend(seconds)
        if grew:
            self.holds += 1
            self.held_seconds += grew
            now = asyncio.get_running_loop().time()
            quiet = now - self._hold_logged_at < HOLD_LOG_EVERY
            log.log(logging.DEBUG if quiet else logging.INFO,
                    "%s: every worker holds %.3gs (%d header hold(s), %.1fs in all)",
                    why, min(seconds, MAX_HOLD), self.holds, self.held_seconds,
                    extra={"event": "rate_limit_hold", "hold_seconds": min(seconds, MAX_HOLD),
                           "holds": self.holds})
            if not quiet:
                self._hold_logged_at = now
        return bool(grew)

    def pause(self, seconds: float) -> bool:
        """Pause every worker for `seconds` from now; True if this extended the pause."""
        grew = self._extend(seconds)
        if not grew:
            return False
        self.pauses += 1
        self.paused_seconds += grew
        # no burst saved up before the pause ends; what the server refilled meanwhile then
        self.pacer.restart_at(self.pause_until,
                              self.learner.paused(seconds, self.pause_until))
        now = self._loop.time() if self._loop is not None else 0.0
        quiet = now - self._pause_logged_at < PAUSE_LOG_EVERY
        if not quiet:
            self._pause_logged_at = now
        log.log(logging.DEBUG if quiet else logging.INFO,
                "rate limited: every worker pauses %.1fs (Retry-After; %d pause(s), %.1fs in "
                "all)", seconds, self.pauses, self.paused_seconds,
                extra={"event": "rate_limit_pause", "retry_after": seconds,
                       "pauses": self.pauses})
        return True

    # -- reporting ------------------------------------------------------
    def settled_rate(self) -> float | None:
        """Successes per second over the last RATE_WINDOW seconds of the run.

        The window starts no earlier than the first admission: measured from the first
        success instead, a few answers that all finish together (8 streams in flight, each
        0.12 s long, done within a millisecond) made thousands of requests a second."""
        if not self._ok_times or self._first_sent is None:
            return None
        last = self._ok_times[-1]
        start = max(self._first_sent, last - RATE_WINDOW)
        n = sum(1 for t in self._ok_times if t > start)
        span = last - start
        return round(n / span, 2) if span > 0 else None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": "adaptive" if self.adaptive else "fixed",
            "concurrency_ceiling": self.ceiling,
            "settled_requests_per_second": self.settled_rate(),
            "header_holds": self.holds,
            "held_seconds": round(self.held_seconds, 3),
        }
        pace = self.pacer.rate
        out["pace_requests_per_second"] = None if pace is None else round(pace, 3)
        out["pace_source"] = self.learner.source
        out["refusals"] = self.refusals
        if self.adaptive:
            out["pace_lowest"] = None if self.learner.lowest is None else \
                round(self.learner.lowest, 3)
            out["pace_cuts"] = self.learner.cuts
        if self.tpm_target:
            out["tpm_target"] = self.tpm_target
            out["usage_to_estimate_ratio"] = round(self.ratio, 3)
        return out
