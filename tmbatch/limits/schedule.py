"""The two schedules admission books against: a lane's pace and a tokens-per-minute budget.

Both are GCRA ("theoretical arrival time"): a booking moves the next free slot on by one
interval, and the wait is how far that slot lies ahead. aiolimiter's buckets have a fixed
rate and cannot go into debt; a pace changes under its waiters (the controller sets it after
every answer) and a token budget is settled against real usage after the answer (debt or
credit), so both are the few lines below.
"""

from __future__ import annotations

import math

MIN_RATE = 0.05  # requests/s: a pace never falls below one request in 20 s
BURST_SECONDS = 0.05  # a pace's own burst: 50 ms worth, at least one request ...
MAX_BURST = 4.0  # ... and at most four, so a pace is a pace and not a volley
TOKEN_BURST_SECONDS = 0.5  # a tokens-per-minute budget's burst
NONE, SLOT, CREDIT = 0, 1, 2  # what a booking took (`Pacer.booked`)


class Pacer:
    """A lane's pace. `credit` requests are free at once from `credit_from` (what a server's
    bucket refilled during a pause, sent when it ends). A server that states what its bucket
    holds (`at_most`) has that spent at once: `allowance` is the most it said it held."""

    __slots__ = ("allowance", "booked", "credit", "credit_from", "epoch", "interval",
                 "last_sent", "own", "rate", "slot", "stated_burst", "tat", "tolerance")

    def __init__(self, rate: float | None = None) -> None:
        self.rate: float | None = None
        self.interval = 0.0
        self.own = 0.0  # the pace's own burst, as a tolerance (BURST_SECONDS, MAX_BURST)
        self.tolerance = 0.0  # the larger of it and the stated allowance
        self.allowance = 0.0
        self.stated_burst = True  # until a refusal says the stated level is not all at once
        self.tat = -math.inf
        self.credit = 0
        self.credit_from = math.inf
        # what the last booking took, for unbook to give back: a slot, a credit, or nothing
        # (a pause since voided it: `restart_at` rebuilt the schedule without it)
        self.booked = NONE
        self.slot = -math.inf  # the start of the last slot booked
        self.last_sent = -math.inf  # when the lane last sent (it sets this)
        self.epoch = 0  # moves on when a slot waited for is void (`drained`)
        self.set_rate(rate)

    def set_rate(self, rate: float | None, most: float | None = None) -> None:
        """`most`: the most the server was seen to grant at once (the controller's
        allowance). The pace's own burst stays within it: a server with no burst of its own
        (nginx's limit_req without `burst`, a GCRA with no tolerance) refuses any two requests
        closer than its interval, however far under its rate the pace is."""
        self.rate = rate
        if rate is None:
            return
        self.interval = 1.0 / rate
        burst = min(MAX_BURST, max(1.0, rate * BURST_SECONDS))
        if most is not None:
            burst = max(1.0, min(burst, most))
        self.own = (burst - 1.0) * self.interval
        self.tolerance = max(self.own, (self.allowance - 1.0) * self.interval)

    def drained(self, now: float) -> None:
        """A refusal: the server's allowance is spent, so the pace's next slot is one
        interval after the last request sent, with nothing saved up, and a slot booked
        before it and still waited for is booked again (`epoch`) at the pace the refusal
        left. A cut's slower pace took effect only after the slots booked at the faster one,
        which went into a drained bucket: two refused after each cut of a 10/s bucket, and
        the trial that judged the cut read them as refusals at random and undid it."""
        if self.rate is None:
            return
        self._give_back(self.slot, now)  # (its waiter books this slot or a later one)
        self.tat = max(self.tat, self.last_sent + self.interval)

    def repace(self, rate: float | None, most: float | None, now: float) -> bool:
        """A new pace, from the slot last booked: the next slot is one new interval after
        it. Faster, a slot still waited for comes sooner too, one new interval after the
        slot before it (True: its waiter books again, `epoch`): each slot was booked at the
        pace of the moment the one before it went, so a lane whose pace rose with every
        success sent at the pace of a success before (a ramp from 5 to 29/s went out at
        5/s, and the refusal that ended it measured a bucket of 10/s as 7). Slower, the
        slots booked stand until a refusal says the server is drained (`drained`)."""
        old = self.interval if self.rate is not None else math.inf
        self.set_rate(rate, most)
        if rate is None or old == math.inf or self.interval >= old or self.credit:
            return False  # (paced at last: the schedule starts at its first booking)
        if self._give_back(self.slot - old + self.interval, now):
            return True
        self.tat = min(self.tat, self.slot + self.interval)
        return False

    def _give_back(self, tat: float, now: float) -> bool:
        """The slot last booked, if still waited for (it starts after `now`), is void: the
        schedule goes on from `tat`, and its waiter books again (`epoch` moves on)."""
        if self.booked != SLOT or self.slot <= now:
            return False
        self.tat = tat
        self.booked = NONE
        self.epoch += 1
        return True

    def at_most(self, level: float, now: float) -> None:
        """The server says its bucket holds `level` requests now (`x-ratelimit-remaining`,
        less what is on its way there): the pace may run ahead of its schedule by that many,
        and never past it. What it says it holds is what it can hold (as
        `TokenBucket.at_most`): a lane not yet held back by its pace spends a stated bucket of
        600 at 10/s at once, not at its refill rate from the first answer (llmock --rpm 600,
        700 lines: 54 s, where the allowance and then the pace take 12). Until a refusal
        after one (`no_stated_burst`)."""
        if self.rate is None:
            return
        if self.stated_burst and level > self.allowance:
            self.allowance = level
            self.tolerance = max(self.tolerance, (level - 1.0) * self.interval)
        self.tat = max(self.tat, now - (level - 1.0) * self.interval)

    def no_stated_burst(self) -> None:
        """Refused after spending a stated burst: the level was not all to be had at once (a
        limit enforced over shorter spans than its headers state, as OpenAI's may be, or a
        bucket other clients share). From now on the level only holds the pace back."""
        self.stated_burst = False
        self.allowance = 0.0
        self.tolerance = self.own

    def book(self, now: float) -> float:
        """Seconds to wait before sending; the slot is taken either way."""
        if self.rate is None:
            return 0.0
        if self.credit and now >= self.credit_from:
            self.credit -= 1
            self.booked = CREDIT
            return 0.0
        self.booked = SLOT
        start = max(self.tat, now - self.tolerance)
        self.slot = start
        self.tat = start + self.interval
        return max(0.0, start - now)

    def unbook(self) -> None:
        """A booked request that will not be sent now: its slot goes back."""
        if self.rate is None:
            return
        if self.booked == CREDIT:
            self.credit += 1
        elif self.booked == SLOT:
            self.tat -= self.interval
        self.booked = NONE

    def restart_at(self, when: float, burst: int = 0) -> None:
        """After a pause: the first slot is its end, with nothing saved up before it, and
        `burst` slots free at once then (else only the pace's own burst). A slot booked
        before it is void: given back, it would make the burst one more than the server
        refilled."""
        self.booked = NONE
        if self.rate is not None and burst > 1 + self.own / self.interval:
            self.credit = burst - 1
            self.credit_from = when
            self.tat = max(self.tat, when)
        else:  # (a stated allowance is not what refilled in a pause: the pace's own burst)
            self.credit = 0
            self.tat = max(self.tat, when - self.own)


class TokenBucket:
    """Tokens per minute with reservations: `reserve` books tokens and says how long to wait;
    a booking bigger than the burst just waits longer, and `adjust` moves the bucket into debt
    or gives credit, which settling an estimate against real usage needs."""

    def __init__(self, per_minute: float, burst_seconds: float = TOKEN_BURST_SECONDS) -> None:
        self.burst_seconds = burst_seconds
        self.capacity = 0.0  # the most tokens the server said it had at once (`at_most`)
        self.tat = -math.inf
        self.set_rate(per_minute)

    def set_rate(self, per_minute: float) -> None:
        """A new limit (stated by the server): bookings already made keep their times."""
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.burst = max(1.0, self.rate * self.burst_seconds, self.capacity) / self.rate

    def reserve(self, amount: float, now: float) -> float:
        self.tat = max(self.tat, now) + amount / self.rate
        return max(0.0, self.tat - now - self.burst)

    def at_most(self, level: float, now: float) -> None:
        """The bucket holds no more than `level` tokens (below 0: a debt), as the server
        says of its own: bookings wait until the server's would admit them too. What it says
        it holds is also what it can hold: a burst of the client's own half second would
        never spend an allowance the server grants at once."""
        if level > self.capacity:
            self.capacity = level
            self.burst = max(self.burst, level / self.rate)
        self.tat = max(self.tat, now + self.burst - level / self.rate)

    def adjust(self, amount: float) -> None:
        """Debt (positive) delays later bookings; credit (negative) brings them forward.
        Credit below an empty bucket is lost on purpose: an idle bucket is not a backlog."""
        if math.isfinite(self.tat):
            self.tat += amount / self.rate
