"""Admission: nothing is sent faster than the account allows.

Gates shared by every worker, checked in this order before each attempt:

1. one pause: a 429's Retry-After, or an `x-ratelimit-remaining-*: 0` header
   (hold until its `x-ratelimit-reset-*`). No request leaves while it is on.
2. a concurrency slot. With a fixed `--rpm` every worker may be in flight; without
   one the limit is adaptive (AIMD): it starts at `--concurrency` (the ceiling),
   is cut by a factor on each 429 event and grows back by one per round trip, so
   a run finds the rate the server sustains instead of living on Retry-After.
3. requests per minute (aiolimiter leaky bucket, half a second of burst).
4. tokens per minute: an estimate is charged before sending and the difference
   to the response's `usage` is settled afterwards (debt or credit), and the
   estimate itself is scaled by the learnt actual/estimated ratio. The token
   bucket is a small GCRA of our own because aiolimiter cannot go into debt.
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

from aiolimiter import AsyncLimiter

from tmbatch.safety import AttemptFailed

# The estimate lives in `tokens`, shared with budgets and `tmbatch estimate`; these names stay
# importable from here, where --tpm uses them.
from tmbatch.tokens import DEFAULT_MAX_OUTPUT_TOKENS, estimate_tokens  # noqa: F401

log = logging.getLogger("tmbatch")

# A client bucket as large as the server's (typically one second) leaves no room for
# network jitter: two requests sent 1/R apart can arrive closer and the second is a 429.
BURST_SECONDS = 0.5
MAX_HOLD = 60.0  # a reset header further away than this is capped, like Retry-After
AIMD_BETA = 0.7  # multiplicative decrease on a 429 event
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


def bucket(per_minute: float) -> AsyncLimiter:
    """A leaky bucket for `per_minute` holding BURST_SECONDS' worth (at least 1)."""
    capacity = max(1.0, per_minute / 60.0 * BURST_SECONDS)
    return AsyncLimiter(capacity, capacity * 60.0 / per_minute)


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
        """Learn from an answer: rate-limit headers, AIMD growth, the real token usage."""
        adm = self.admission
        now = asyncio.get_running_loop().time()
        if headers:
            adm._from_headers(headers, now)
        adm._on_success(now)
        if adm.tpm is not None and used_tokens > 0:
            adm.tpm.adjust(used_tokens - self.charged)
            self.charged = float(used_tokens)  # settled: a second report is a no-op
            adm._learn_ratio(self.estimated, used_tokens)

    def failed(self, failure: AttemptFailed) -> float | None:
        """Learn from a failed attempt as its class says; the seconds of a Retry-After pause
        this started for every worker (the runner journals it), else None."""
        adm = self.admission
        now = asyncio.get_running_loop().time()
        if failure.headers:
            adm._from_headers(failure.headers, now)
        policy = failure.cls.policy
        if policy.refund and adm.tpm is not None and self.charged:
            adm.tpm.adjust(-self.charged)  # nothing was generated
            self.charged = 0.0
        if not policy.slows_admission:
            return None
        adm._slow_down(self.sent_at, now)
        if failure.retry_after is not None and adm.pause(failure.retry_after):
            return failure.retry_after
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
        self.rpm = bucket(rpm) if rpm else None
        self.tpm = TokenBucket(tpm) if tpm else None
        self.tpm_target = tpm
        self.pause_until = 0.0
        self.pauses = 0
        self.paused_seconds = 0.0
        self.holds = 0
        self.held_seconds = 0.0
        # adaptive concurrency (AIMD)
        self.adaptive = adaptive
        self.ceiling = max(1, concurrency)
        self.limit = float(self.ceiling)
        self.limit_min = self.ceiling
        self.decreases = 0
        self.in_flight = 0
        self._acked = 0
        self._last_decrease = -math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()
        # learnt tokens-per-estimate ratio, as two moving sums so big requests weigh more
        self._ema_raw = 0.0
        self._ema_actual = 0.0
        self.ratio = 1.0
        self.settled = 0
        # successes, for the rate the run settled at
        self._ok_times: deque[float] = deque()
        self._first_ok: float | None = None

    # -- waiting --------------------------------------------------------
    async def wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = self.pause_until - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def _take_slot(self) -> None:
        loop = asyncio.get_running_loop()
        while self.in_flight >= self._cap():
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

    def _cap(self) -> int:
        return max(1, int(self.limit)) if self.adaptive else self.ceiling

    def _wake(self) -> None:
        free = self._cap() - self.in_flight
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    def _release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._wake()

    async def admit(self, tokens: int) -> Ticket:
        """Wait until this attempt may be sent; the ticket must be released when it ends."""
        loop = asyncio.get_running_loop()
        await self.wait_pause()
        await self._take_slot()
        charged = 0.0
        try:
            if self.rpm is not None:
                await self.rpm.acquire()
            if self.tpm is not None:
                charged = float(max(1, round(tokens * self.ratio)))
                delay = self.tpm.reserve(charged, loop.time())
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.wait_pause()  # a 429 may have arrived while we waited for a token
        except BaseException:
            if self.tpm is not None and charged:
                self.tpm.adjust(-charged)
            self._release()
            raise
        return Ticket(self, tokens, charged, loop.time())

    # -- learning from answers ------------------------------------------
    def _learn_ratio(self, estimated: int, actual: int) -> None:
        """The estimate's bias, so the next charges are closer to what usage will say."""
        self.settled += 1
        a = RATIO_ALPHA if self.settled > 1 else 1.0
        self._ema_raw += a * (max(1, estimated) - self._ema_raw)
        self._ema_actual += a * (actual - self._ema_actual)
        lo, hi = RATIO_BOUNDS
        self.ratio = min(hi, max(lo, self._ema_actual / self._ema_raw))

    def _on_success(self, now: float) -> None:
        self._ok_times.append(now)
        if self._first_ok is None:
            self._first_ok = now
        while self._ok_times and self._ok_times[0] < now - 2 * RATE_WINDOW:
            self._ok_times.popleft()
        if self.adaptive and self.limit < self.ceiling:
            self._acked += 1
            if self._acked >= int(self.limit):  # about one round trip of answers
                self._acked = 0
                self.limit = min(float(self.ceiling), self.limit + 1.0)
                self._wake()

    def _slow_down(self, sent_at: float, now: float) -> None:
        """One cut per congestion event: answers to requests sent before the last cut were
        already reacted to."""
        if not self.adaptive or sent_at < self._last_decrease:
            return
        self._last_decrease = now
        self.limit = max(1.0, math.floor(self.limit * AIMD_BETA))
        self.limit_min = min(self.limit_min, int(self.limit))
        self._acked = 0
        self.decreases += 1
        log.info("rate limited: at most %d in flight from now on (adaptive)", int(self.limit))

    def _from_headers(self, headers: Mapping[str, str], now: float) -> None:
        for kind in ("requests", "tokens"):
            remaining = _int_header(headers, f"x-ratelimit-remaining-{kind}")
            if remaining is None or remaining > 0:
                continue
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
            if reset:
                self.hold(reset, f"x-ratelimit-remaining-{kind}: 0")

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
        """A server header says the budget is spent: nobody sends until it resets."""
        grew = self._extend(seconds)
        if grew:
            self.holds += 1
            self.held_seconds += grew
            log.debug("%s: every worker holds %.3fs", why, seconds)
        return bool(grew)

    def pause(self, seconds: float) -> bool:
        """Pause every worker for `seconds` from now; True if this extended the pause."""
        grew = self._extend(seconds)
        if not grew:
            return False
        self.pauses += 1
        self.paused_seconds += grew
        log.info("rate limited: every worker pauses %.1fs (Retry-After)", seconds,
                 extra={"event": "rate_limit_pause", "retry_after": seconds})
        return True

    # -- reporting ------------------------------------------------------
    def settled_rate(self) -> float | None:
        """Successes per second over the last RATE_WINDOW seconds of answers."""
        if not self._ok_times or self._first_ok is None:
            return None
        last = self._ok_times[-1]
        start = max(self._first_ok, last - RATE_WINDOW)
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
        if self.adaptive:
            out["concurrency_final"] = self._cap()
            out["concurrency_min"] = self.limit_min
            out["decreases"] = self.decreases
        if self.tpm_target:
            out["tpm_target"] = self.tpm_target
            out["usage_to_estimate_ratio"] = round(self.ratio, 3)
        return out
