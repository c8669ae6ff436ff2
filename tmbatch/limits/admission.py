"""Admission: one permit per attempt, covering every gate it must pass before it is sent.

The gates, in the order an attempt meets them (`Permit.__aenter__`):

1. the budget (`--budget-*`): the attempt's worst case is reserved, or the run stops;
2. its lane's pause: a Retry-After window (any spelling `safety.parse_retry_after` reads), a
   header that says the limit is spent, or a hold while everything is refused. No request of
   the lane leaves while it is on;
3. its lane's pace (`lanes.Lane.paced`): `--rpm`, or what the lane's controller learnt;
   with `--redis`, then a slot in the schedule the job's processes share (`shared`);
4. a concurrency slot: `--concurrency` is the ceiling for the run. While the pace is learnt,
   a run starts with a few in flight and opens up by one per second answer and by doubling on
   a clock until the first refusal (a server's burst is not spent on the first volley);
5. tokens per minute (`--tpm`, or a lane's stated by headers): an estimate is charged before
   sending and settled against the answer's `usage` afterwards (debt or credit), the estimate
   scaled by the learnt usage/estimate ratio.

A slot is never held while waiting for a lane's pause: a refusal for one model does not hold
up another's requests. The permit is settled once with the outcome (`ok` or `failed`), whose
`safety.Policy` says what it means here (refund the tokens, slow down, pause); leaving the
`async with` frees the slot and ends the budget hold, whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from tmbatch.base.defaults import CONCURRENCY, LIMIT_SCOPE
from tmbatch.base.stop import Stopped
from tmbatch.inputs.reader import Request
from tmbatch.limits.controller import PaceConfig
from tmbatch.limits.lanes import ACCOUNT, SCOPES, Lane, LaneKey, make_lane
from tmbatch.limits.schedule import TokenBucket
from tmbatch.limits.shared import LaneStore
from tmbatch.policy import AttemptFailed
from tmbatch.spend.budget import Budget
from tmbatch.spend.reservation import Hold
from tmbatch.spend.tokens import DEFAULT_MAX_OUTPUT_TOKENS, estimate_tokens

log = logging.getLogger("tmbatch")

START_IN_FLIGHT = 8  # while learning: requests in flight at first, +1 per OPEN_PER answers ...
OPEN_PER = 4  # (a quarter more each round trip: a server that grants N at once and then
# refuses, a window, sees about a fifth of N more before the first refusal comes back)
OPEN_EVERY = 0.05  # ... and doubled this often until the server first refuses, so a slow
# server (long answers, a queue) is at the ceiling in a few tenths of a second, not after a
# few of its round trips; a tick in which answers came back for half the cap is left to them
RATIO_ALPHA = 0.05  # weight of one response in the learnt usage/estimate ratio
RATIO_BOUNDS = (0.02, 50.0)
RATE_WINDOW = 30.0  # seconds of successes the settled rate is measured over


class Admission:
    """The run's gates: its lanes, the concurrency ceiling, --tpm and the budget."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *,
                 concurrency: int = CONCURRENCY.value, adaptive: bool = False,
                 scope: str = LIMIT_SCOPE.value,
                 base_url: str = "", budget: Budget | None = None,
                 config: PaceConfig | None = None) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        self.rpm = rpm
        self.adaptive = adaptive
        self.scope = scope
        self.base_url = base_url
        self.config = config or PaceConfig()
        self.budget = budget or Budget()
        self.lanes: dict[str | None, Lane] = {}
        self.tpm = TokenBucket(tpm) if tpm else None
        self.tpm_target = tpm
        self.tpm_fleet = tpm  # the account's --tpm, which with --redis the shards share whole
        self.tpm_warned = False
        self.ceiling = max(1, concurrency)
        # while learning, a slow start: a few in flight, one more per answer
        self.cap = min(self.ceiling, START_IN_FLIGHT) if adaptive else self.ceiling
        self._opening = 0
        self._opening_answers = 0  # answers since the slow start's clock last ticked
        self._opener: asyncio.TimerHandle | None = None
        self.refused = False  # any lane was refused: the slow start's clock stops
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # learnt tokens-per-estimate ratio, as two moving sums so big requests weigh more
        self._ema_raw = 0.0
        self._ema_actual = 0.0
        self.ratio = 1.0
        self.settled = 0
        self._ok_times: deque[float] = deque()
        self._first_sent: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed_until = -math.inf  # loop time a window told of before this run ends
        # the lanes' pause and pace shared with the job's other processes (`shared`, --redis)
        self.shared: LaneStore | None = None

    # -- lanes ---------------------------------------------------------------------------
    def lane(self, model: str | None) -> Lane:
        """The lane of a request for `model` (one lane for all with --limit-scope account)."""
        name = model if self.scope == "model" else ACCOUNT
        lane = self.lanes.get(name)
        if lane is None:
            key = LaneKey(self.base_url, name if isinstance(name, str) else ACCOUNT)
            lane = self.lanes[name] = make_lane(key, self.config, self.rpm, self.adaptive, "")
            if self._resumed_until > self._time():  # a window a previous run was told of
                lane.pause(self._resumed_until - self._time(), self._time())
            if len(self.lanes) > 1:  # from the second lane on, every message names its model
                for each in self.lanes.values():
                    each.label = f" for {each.key.model}"
        return lane

    def permit(self, req: Request) -> Permit:
        """The one call an attempt makes before it is sent: `async with` it."""
        model = req.body.get("model")
        lane = self.lanes.get(model if self.scope == "model" else ACCOUNT)  # (`lane`, inlined)
        return Permit(self, lane if lane is not None else self.lane(model), req)

    @property
    def pace(self) -> float | None:
        """Requests per second the run is paced at: the sum of its lanes' paces (None while
        any lane is unpaced: only concurrency limits it)."""
        rates = [lane.rate for lane in self.lanes.values()]
        if not rates or any(r is None for r in rates):
            return None
        return sum(rates)  # type: ignore[arg-type]

    def pause(self, seconds: float) -> None:
        """Pause every lane, present and future (a window a previous run was told of: the
        journal does not say which lane it was, so it holds them all)."""
        now = self._time()
        self._resumed_until = max(self._resumed_until, now + seconds)
        for lane in self.lanes.values():
            lane.pause(seconds, now)

    def _time(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    # -- concurrency slots ---------------------------------------------------------------
    async def _take_slot(self) -> None:
        self._time()
        loop = self._loop
        assert loop is not None
        if self.cap < self.ceiling and self._opener is None and not self.refused:
            self._opener = loop.call_later(OPEN_EVERY, self._open)
        while self.in_flight >= self.cap or self._waiters:
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
            if self.in_flight < self.cap:
                break
        self.in_flight += 1

    def _open(self) -> None:
        """The slow start's clock: double the cap, until the ceiling or the first refusal."""
        self._opener = None
        if self.refused:
            return  # the server said no: from here answers open the cap, the pace governs
        if self._opening_answers < self.cap // 2:
            # too few answers came back this tick to open the cap by themselves (a slow
            # server): the clock doubles it; a fast server's answers open it as they come,
            # and doubling on top would send a volley bigger than any the server answered
            self.cap = min(self.ceiling, self.cap * 2)
        self._opening_answers = 0
        self._wake()
        if self.cap < self.ceiling and self._waiters and self._loop is not None:
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

    def _answered(self) -> None:
        """Slow start: one more in flight for every second answer."""
        self._opening_answers += 1
        self._opening += 1
        if self._opening >= OPEN_PER:
            self._opening = 0
            self.cap += 1
            self._wake()

    # -- tokens per minute ---------------------------------------------------------------
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

    def _learn_ratio(self, estimated: int, actual: int) -> None:
        """The estimate's bias, so the next charges are closer to what usage will say."""
        self.settled += 1
        a = RATIO_ALPHA if self.settled > 1 else 1.0
        self._ema_raw += a * (max(1, estimated) - self._ema_raw)
        self._ema_actual += a * (actual - self._ema_actual)
        lo, hi = RATIO_BOUNDS
        self.ratio = min(hi, max(lo, self._ema_actual / self._ema_raw))

    # -- reporting -----------------------------------------------------------------------
    def _succeeded(self, now: float) -> None:
        ok = self._ok_times
        ok.append(now)
        if ok[0] < now - 2 * RATE_WINDOW:
            while ok and ok[0] < now - 2 * RATE_WINDOW:
                ok.popleft()
        if self.cap < self.ceiling:
            self._answered()

    @property
    def pauses(self) -> int:
        return sum(lane.pauses for lane in self.lanes.values())

    @property
    def paused_seconds(self) -> float:
        return sum(lane.paused_seconds for lane in self.lanes.values())

    def settled_rate(self) -> float | None:
        """Successes per second over the last RATE_WINDOW seconds of the run, from no
        earlier than the first admission (a few answers finishing together are no rate)."""
        if not self._ok_times or self._first_sent is None:
            return None
        last = self._ok_times[-1]
        start = max(self._first_sent, last - RATE_WINDOW)
        n = sum(1 for t in self._ok_times if t > start)
        span = last - start
        return round(n / span, 2) if span > 0 else None

    def report(self) -> dict[str, Any]:
        lanes = {lane.key.model: lane.report() for lane in self.lanes.values()}
        one = next(iter(lanes.values())) if len(lanes) == 1 else None
        pace = self.pace
        out: dict[str, Any] = {
            "mode": "adaptive" if self.adaptive else "fixed",
            "limit_scope": self.scope,
            "concurrency_ceiling": self.ceiling,
            "settled_requests_per_second": self.settled_rate(),
            "header_holds": sum(x["header_holds"] for x in lanes.values()),
            "held_seconds": round(sum(x["held_seconds"] for x in lanes.values()), 3),
            "pace_requests_per_second": None if pace is None else round(pace, 3),
            "pace_source": one["pace_source"] if one else "per lane",
            "refusals": sum(x["refusals"] for x in lanes.values()),
        }
        if self.adaptive:
            out["pace_lowest"] = one["pace_lowest"] if one else None
            out["pace_cuts"] = sum(x["pace_cuts"] for x in lanes.values())
        if self.tpm_target:
            out["tpm_target"] = self.tpm_target
            out["usage_to_estimate_ratio"] = round(self.ratio, 3)
        out["lanes"] = lanes
        return out


class Permit:
    """One attempt's way past every gate (see the module doc). `async with` it; settle it
    once with `ok` or `failed`; leaving frees the slot and ends the budget hold."""

    __slots__ = ("admission", "charged", "lane", "req", "sent_at", "slot", "spend", "tokens",
                 "tokens_flying", "tpm", "tpm_fleet", "tpm_local")

    def __init__(self, admission: Admission, lane: Lane, req: Request) -> None:
        self.admission = admission
        self.lane = lane
        self.req = req
        self.tokens = 0  # the estimate, made only when a tokens budget needs it
        self.charged = 0.0
        self.tokens_flying = 0.0
        self.sent_at = 0.0
        self.slot = False
        self.spend: Hold = None  # type: ignore[assignment]
        self.tpm: TokenBucket | None = None
        self.tpm_fleet = 0.0  # tokens/min of the fleet's bucket it was booked in (0: none)
        self.tpm_local = False  # booked in this process's bucket too

    async def __aenter__(self) -> Permit:
        adm, lane = self.admission, self.lane
        loop = adm._loop
        if loop is None:
            adm._time()
            loop = adm._loop
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
                if adm.shared is not None and not await adm.shared.take(lane):
                    continue  # the fleet paused the lane (--redis)
                if adm.in_flight < adm.cap and not adm._waiters:
                    adm.in_flight += 1
                else:
                    await adm._take_slot()
                self.slot = True
                if lane.pause_until <= loop.time() and (paced or lane.pacer.rate is None):
                    break
                # a refusal came while this waited for a slot (the answer that freed it,
                # even), pausing or pacing the lane: the slot goes to another lane meanwhile
                self.slot = False
                adm._release()
            tpm = self.tpm = adm.tpm or lane.tpm
            if tpm is not None:
                await self._charge(tpm, loop)
        except BaseException:
            self._leave()
            raise
        now = self.sent_at = loop.time()
        if adm._first_sent is None:
            adm._first_sent = now
        lane.sent_at(now)
        return self

    async def _charge(self, tpm: TokenBucket, loop: asyncio.AbstractEventLoop) -> None:
        adm, req = self.admission, self.req
        self.tokens = estimate_tokens(req.body, generates=not req.idempotent)
        charged = self.charged = float(max(1, round(self.tokens * adm.ratio)))
        if adm.tpm is tpm and not adm.tpm_warned:
            adm._warn_if_tpm_too_small(charged)
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
        """Its estimate is no longer on its way to the server (see `Lane.flight_tokens`)."""
        if self.tokens_flying:
            self.lane.flight_tokens -= self.tokens_flying
            self.tokens_flying = 0.0

    def _leave(self) -> None:
        if self.tokens_flying:
            self._landed()
        if self.slot:
            self.slot = False
            adm = self.admission  # (`Admission._release`, inlined: once per attempt)
            adm.in_flight = adm.in_flight - 1 if adm.in_flight > 0 else 0
            if adm._waiters:
                adm._wake()
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
        now = adm._time() if adm._loop is None else adm._loop.time()
        self.spend.succeeded(body, used)  # type: ignore[arg-type]
        tpm = self.tpm
        if tpm is not None and tokens > 0:  # (before the headers, which count its usage)
            self._adjust(tokens - self.charged)
            self.charged = float(tokens)
            adm._learn_ratio(self.tokens, tokens)
        if self.tokens_flying:
            self._landed()
        self.lane.succeeded(now, self.sent_at, headers, tokens)
        adm._succeeded(now)

    def failed(self, failure: AttemptFailed) -> float | None:
        """A failed attempt, learnt from as its class says; the seconds of the Retry-After
        pause it started for the lane (the runner journals it), else None."""
        adm, now = self.admission, self.admission._time()
        self.spend.failed(failure)
        policy = failure.cls.policy
        if policy.refund and self.tpm is not None and self.charged:
            self._adjust(-self.charged)  # nothing was generated
            self.charged = 0.0
        self._landed()
        if not policy.slows_admission:
            if failure.headers:
                self.lane._read(failure.headers, now)
            return None
        adm.refused = True
        paused = self.lane.refused(now, self.sent_at, failure.retry_after, failure.headers)
        if paused is not None and adm.shared is not None:
            adm.shared.announce(self.lane, paused)  # the job's other processes pause too
        return paused

    def stalled_for(self) -> float:
        return self.lane.stalled_for(self.admission._time())
