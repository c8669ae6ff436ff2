"""The server-side limits a simulated endpoint can enforce, each one a real behaviour.

Clients meet several kinds of limit in the wild and must cope with each without being told the
numbers: a token bucket of requests (OpenAI, Tensormesh), a fixed window of N requests per W
seconds (LiteLLM's proxy), a tokens-per-minute budget charged with real usage, and a server that
never refuses but queues past its capacity (vLLM's scheduler with --max-num-seqs). Each limit
here answers the same two questions, so the gate can combine them: how long until one more
request would pass (`wait`), and what its `x-ratelimit-*` headers say (`headers`). Nothing is
consumed until every limit has said yes (`take`), so a refusal by one never costs another.

Everything but Capacity is pure arithmetic on the `now` it is given (a monotonic time in
seconds): no class here reads a clock, so the same objects can be driven in virtual time,
without HTTP, by a harness that replays a client's pacing against them. A LimitSet is what one
scope enforces (the whole account, or one model) with the Retry-After windows its refusals
announced; build_limit_set makes one from a SimConfig. Refusals at random (overload, a flaky
gateway), asked before any limit, are overload.py's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from tmbatch.sim.config import SimConfig


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format, which is Go's time.Duration text at millisecond precision:
    "250ms" below a second, then "1s", "1.5s", "6m0s", "1h2m3.5s". Rounded up, so a client that
    waits what it reads never arrives early."""
    millis = max(0, math.ceil(seconds * 1000 - 1e-6))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class Limit(Protocol):
    """One server-side limit; `kind` names its x-ratelimit headers ("requests" or "tokens")."""

    kind: str

    def wait(self, now: float) -> float:
        """Seconds from `now` until one more request would pass (0.0: it passes now)."""
        ...

    def take(self, now: float) -> None:
        """Count one admitted request (after every limit said yes)."""
        ...

    def headers(self, now: float) -> dict[str, str]:
        """x-ratelimit-limit/remaining/reset-<kind> as the limit stands now."""
        ...

    def remaining(self, now: float) -> int:
        """What x-ratelimit-remaining-<kind> says: 0 announces a window of `wait(now)`."""
        ...


def _headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(remaining),
        f"x-ratelimit-reset-{kind}": openai_duration(reset),
    }


@dataclass
class _Bucket:
    """A level refilled at `rate` per second up to `capacity`, full at the start.

    Its headers follow OpenAI: limit is the capacity, remaining the whole units left, reset the
    time until the bucket is full again; so reset / (limit - remaining) is the time per unit,
    which is what a client that is never told the rate can learn it from.
    """

    rate: float
    capacity: float
    level: float
    last: float

    kind = "requests"

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
            self.last = now

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, int(self.level))

    def headers(self, now: float) -> dict[str, str]:
        self._refill(now)
        reset = (self.capacity - self.level) / self.rate
        return _headers(self.kind, int(self.capacity), self.remaining(now), reset)


class RequestBucket(_Bucket):
    """A token bucket of `rate` requests/s holding `capacity` requests (the burst)."""

    def wait(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self.level >= 1.0 else (1.0 - self.level) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.level -= 1.0


@dataclass
class ScheduledBucket(RequestBucket):
    """A RequestBucket whose rate changes at set times: another job shares the account for a
    while. `schedule` holds (seconds after `epoch`, rate from then on) in time order; `rate` is
    the rate before the first change, then the rate in force, and the capacity (the burst) never
    changes.

    The refill integrates across each change: the old rate up to it, the new one after, however
    far apart the calls are. What the bucket announces (the wait a 429 gives, the reset of its
    headers) is worked out at the rate in force, as a real server that cannot know when the
    other job will stop would; the admission itself (level >= 1) is always exact.
    """

    epoch: float = 0.0
    schedule: tuple[tuple[float, float], ...] = ()
    applied: int = 0  # changes already in force

    def _refill(self, now: float) -> None:
        schedule = self.schedule
        while self.applied < len(schedule):
            offset, rate = schedule[self.applied]
            at = self.epoch + offset
            if at > now:
                break
            super()._refill(at)  # at the old rate up to the change
            self.rate = rate
            self.applied += 1
        super()._refill(now)

    def rate_at(self, now: float) -> float:
        """The rate in force at `now` (brings the bucket up to `now`)."""
        self._refill(now)
        return self.rate


@dataclass
class FixedWindow:
    """N requests per window of W seconds, windows counted from `epoch` (the server's start or
    reset, or the clock's minute before it), the way LiteLLM's proxy counts per-minute keys: a
    refused request costs nothing, and the count starts again at zero when the next window
    begins, whatever came before. With a `schedule` of (seconds after `start`, requests/s),
    a window admits the rate in force when it begins times its seconds (another job takes
    a share of each window for a while)."""

    limit: int
    seconds: float
    epoch: float
    index: int = 0
    count: int = 0
    kind: str = "requests"
    schedule: tuple[tuple[float, float], ...] = ()
    start: float = 0.0
    base: int = 0  # the limit before the schedule's first change

    def __post_init__(self) -> None:
        self.base = self.limit

    def _roll(self, now: float) -> None:
        index = math.floor((now - self.epoch) / self.seconds)
        if index != self.index:
            self.index = index
            self.count = 0
            self.limit = self.limit_of(index)

    def limit_of(self, index: int) -> int:
        """What the window numbered `index` from `epoch` admits."""
        begins, limit = self.epoch + index * self.seconds, self.base
        for offset, rate in self.schedule:
            if self.start + offset <= begins:
                limit = max(1, round(rate * self.seconds))
        return limit

    def _window_end(self) -> float:
        return self.epoch + (self.index + 1) * self.seconds

    def wait(self, now: float) -> float:
        self._roll(now)
        return 0.0 if self.count < self.limit else max(0.0, self._window_end() - now)

    def take(self, now: float) -> None:
        self._roll(now)
        self.count += 1

    def remaining(self, now: float) -> int:
        self._roll(now)
        return max(0, self.limit - self.count)

    def headers(self, now: float) -> dict[str, str]:
        self._roll(now)
        reset = max(0.0, self._window_end() - now)
        return _headers(self.kind, self.limit, self.remaining(now), reset)


class TokenBudget(_Bucket):
    """Tokens per minute (`rate` = limit / 60 per second), charged with each answer's real
    usage, booked as it is admitted (the simulator knows its answer then; the virtual server
    books alike).

    A request is admitted while the budget is above zero and then charged its total_tokens, so
    the budget can go into debt and stays closed until it refills past zero (`reset` says how
    deep, `remaining` stops at 0); that is how a server that does not estimate a request's
    cost up front enforces it, and why a client learns the token rate from `usage` rather
    than from its own estimate.
    """

    kind = "tokens"

    def wait(self, now: float) -> float:
        self._refill(now)
        # "above zero" with a hair of margin, so the announced wait really ends the debt
        return 0.0 if self.level > 0.0 else (1e-6 - self.level) / self.rate

    def take(self, now: float) -> None:
        """Admission costs nothing up front; `charge` books the real usage."""

    def charge(self, now: float, tokens: int) -> None:
        self._refill(now)
        self.level -= tokens


# ----------------------------------------------------------------------------------------------
# What one scope enforces, and the windows its refusals announce


@dataclass
class RetryWindows:
    """The pauses announced to a client (Retry-After and the like, or a remaining of 0), and
    whether an arrival broke one.

    `open(now, end)` is called as the answer leaves at `now`: arrivals from `grace` after it
    until `end` break the promise, the grace letting requests already on the wire arrive
    without blame (a window shorter than the grace is not kept). Calls must come in time order
    (`now` never decreasing), so a deque plus a running maximum gives O(1) per arrival.
    """

    grace: float
    pending: deque[tuple[float, float]] = field(default_factory=deque)
    matured_end: float = -math.inf

    def open(self, now: float, end: float) -> None:
        start = now + self.grace
        if end > start:
            self.pending.append((start, end))

    def arrive(self, now: float) -> bool:
        """Whether an arrival at `now` falls inside an announced window (a violation)."""
        pending = self.pending
        while pending and pending[0][0] < now:
            end = pending.popleft()[1]
            if end > self.matured_end:
                self.matured_end = end
        return now < self.matured_end


@dataclass
class LimitSet:
    """The limits one scope enforces (the whole account, or one model with a per-model scope)
    and the Retry-After windows its refusals opened."""

    requests: RequestBucket | FixedWindow | None
    tokens: TokenBudget | None
    windows: RetryWindows
    # what x-ratelimit-*-requests state instead of `requests` (`ratelimit_stated_burst`)
    stated: RequestBucket | None = None
    active: tuple[Limit, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.active = tuple(lim for lim in (self.requests, self.tokens) if lim is not None)

    def admit(self, now: float) -> tuple[float, str]:
        """Every limit must say yes before any counts the request, so a refusal by the tokens
        budget never costs a request token. Returns (0.0, "") when admitted (and counted), else
        the longest wait and the kind of the limit that asked for it ("requests" or
        "tokens"), with nothing consumed."""
        wait, kind = 0.0, ""
        for lim in self.active:
            w = lim.wait(now)
            if w > wait:
                wait, kind = w, lim.kind
        if wait == 0.0:
            for lim in self.active:
                lim.take(now)
            if self.stated is not None:
                self.stated.take(now)
        return wait, kind

    def headers(self, now: float) -> tuple[dict[str, str], list[float]]:
        """The x-ratelimit-* headers as the limits stand at `now`, and the ends of the windows
        they announce: a remaining of 0 says nothing more passes until that limit has room."""
        headers: dict[str, str] = {}
        ends: list[float] = []
        for lim in self.active:
            shown = self.stated if lim is self.requests and self.stated is not None else lim
            headers.update(shown.headers(now))
            if shown.remaining(now) == 0:
                ends.append(now + shown.wait(now))
        return headers, ends

    def charge(self, now: float, tokens: int) -> dict[str, str] | None:
        """Book an answer's real usage on the tokens budget; its headers then, if it has one."""
        if self.tokens is None:
            return None
        self.tokens.charge(now, tokens)
        return self.tokens.headers(now)


def one_second(rate: float) -> float:
    """One second of burst, but never less than one request, or a sub-1 rate could never pass."""
    return max(1.0, rate)


def build_limit_set(config: SimConfig, now: float) -> LimitSet:
    """Fresh limits as `config` describes them: full buckets, the first window and the rate
    schedule starting at `now` (the server's start or reset)."""
    requests: RequestBucket | FixedWindow | None = None
    if config.rate_limit is not None:
        burst = config.rate_burst if config.rate_burst is not None else one_second(
            config.rate_limit)
        if config.rate_schedule:
            requests = ScheduledBucket(config.rate_limit, burst, burst, now, epoch=now,
                                       schedule=config.rate_schedule)
        else:
            requests = RequestBucket(config.rate_limit, burst, burst, now)
    elif config.window_limit is not None:
        requests = FixedWindow(config.window_limit, config.window_seconds,
                               now - config.window_start, schedule=config.rate_schedule,
                               start=now)
    tokens: TokenBudget | None = None
    if config.tpm_limit is not None:
        rate = config.tpm_limit / 60.0
        burst = config.tpm_burst if config.tpm_burst is not None else one_second(rate)
        tokens = TokenBudget(rate, burst, burst, now)
    stated = None
    if config.ratelimit_stated_burst is not None and config.rate_limit is not None:
        size = config.ratelimit_stated_burst
        stated = RequestBucket(config.rate_limit, size, size, now)
    return LimitSet(requests, tokens, RetryWindows(config.grace), stated)


# ----------------------------------------------------------------------------------------------
# A server that queues instead of refusing


@dataclass
class Capacity:
    """At most `slots` requests processed at once; the rest wait in arrival order (FIFO).

    This is a server that never refuses, like vLLM's scheduler with --max-num-seqs N: past N in
    flight, latency grows by queueing and throughput stays flat, so the only signal a client
    gets is time. The peaks are kept so a test can prove the limit was never exceeded, and the
    first start and last finish so a benchmark can measure throughput where it is made: arrivals
    say nothing here, since a queue accepts any number at once.
    """

    slots: int
    running: int = 0
    running_peak: int = 0
    queued_peak: int = 0
    waited: int = 0
    finished: int = 0
    first_start: float | None = None
    last_finish: float | None = None
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    async def acquire(self) -> None:
        if self.running < self.slots and not self._waiters:
            self._enter()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.waited += 1
        self.queued_peak = max(self.queued_peak, len(self._waiters))
        try:
            await fut
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over as we left: pass it on
            raise

    def _enter(self) -> None:
        self.running += 1
        self.running_peak = max(self.running_peak, self.running)
        if self.first_start is None:
            self.first_start = time.monotonic()

    def release(self) -> None:
        """Hand the slot straight to the longest waiter, so nobody can overtake the queue."""
        self.running -= 1
        self.finished += 1
        self.last_finish = time.monotonic()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._enter()
                fut.set_result(None)
                return

    @property
    def queued(self) -> int:
        return len(self._waiters)
