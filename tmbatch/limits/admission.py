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
up another's requests. The permit (`permit.Permit`) is settled once with the outcome (`ok` or
`failed`), whose `safety.Policy` says what it means here (refund the tokens, slow down,
pause); leaving the `async with` frees the slot and ends the budget hold, whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import Any

from tmbatch.base.defaults import CONCURRENCY, LIMIT_SCOPE
from tmbatch.inputs.reader import Request
from tmbatch.limits.controller import PaceConfig
from tmbatch.limits.lanes import ACCOUNT, SCOPES, Lane, LaneKey, make_lane
from tmbatch.limits.permit import Permit
from tmbatch.limits.schedule import TokenBucket
from tmbatch.limits.shared import LaneStore
from tmbatch.spend.budget import Budget
from tmbatch.spend.tokens import DEFAULT_MAX_OUTPUT_TOKENS

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
                 config: PaceConfig | None = None, alone: bool = True) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        self.rpm = rpm
        self.adaptive = adaptive
        self.scope = scope
        self.base_url = base_url
        self.alone = alone  # no other shard of the job sends to these limits (rule 4's windows)
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
        self.waiters: deque[asyncio.Future[None]] = deque()
        # learnt tokens-per-estimate ratio, as two moving sums so big requests weigh more
        self._ema_raw = 0.0
        self._ema_actual = 0.0
        self.ratio = 1.0
        self.settled = 0
        self._ok_times: deque[float] = deque()
        self.first_sent: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
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
            lane.controller.windows.shared = not self.alone or self.shared is not None
            if self._resumed_until > self.now():  # a window a previous run was told of
                lane.pause(self._resumed_until - self.now(), self.now())
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
        now = self.now()
        self._resumed_until = max(self._resumed_until, now + seconds)
        for lane in self.lanes.values():
            lane.pause(seconds, now)

    def now(self) -> float:
        """The loop's clock (the loop is looked up once: admission runs on one loop)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop.time()

    # -- concurrency slots ---------------------------------------------------------------
    async def take_slot(self) -> None:
        self.now()
        loop = self.loop
        assert loop is not None
        if self.cap < self.ceiling and self._opener is None and not self.refused:
            self._opener = loop.call_later(OPEN_EVERY, self._open)
        if self.in_flight >= self.cap and self.cap < self.ceiling and self.refused:
            self.open_if_paced()
        while self.in_flight >= self.cap or self.waiters:
            fut: asyncio.Future[None] = loop.create_future()
            self.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self.waiters:
                    self.waiters.remove(fut)
                else:
                    self.wake()  # woken but leaving: pass the free slot on
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
        self.wake()
        if self.cap < self.ceiling and self.waiters and self.loop is not None:
            self._opener = self.loop.call_later(OPEN_EVERY, self._open)

    def wake(self) -> None:
        free = self.cap - self.in_flight
        while free > 0 and self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self.waiters:
            self.wake()

    def _answered(self) -> None:
        """Slow start: one more in flight for every OPEN_PER answers, until every lane is
        paced (`open_if_paced`)."""
        self._opening_answers += 1
        self._opening += 1
        if self._opening >= OPEN_PER:
            self._opening = 0
            self.cap += 1
            self.wake()
        self.open_if_paced()

    def open_if_paced(self) -> None:
        """Once every lane is paced, the paces govern and the cap opens to the ceiling: a
        cap grown by answers held a lane paced near 50/s, answering in a second, to 16-30 in
        flight for seconds, and it knows no latency before the first answer (a lane's pace
        grows by the requests let through, `verdicts`, a latency before it)."""
        lanes = self.lanes.values()
        if lanes and all(lane.rate is not None for lane in lanes):
            self.cap = self.ceiling
            self.wake()

    # -- tokens per minute ---------------------------------------------------------------
    def warn_if_tpm_too_small(self, charged: float) -> None:
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

    def learn_ratio(self, estimated: int, actual: int) -> None:
        """The estimate's bias, so the next charges are closer to what usage will say."""
        self.settled += 1
        a = RATIO_ALPHA if self.settled > 1 else 1.0
        self._ema_raw += a * (max(1, estimated) - self._ema_raw)
        self._ema_actual += a * (actual - self._ema_actual)
        lo, hi = RATIO_BOUNDS
        self.ratio = min(hi, max(lo, self._ema_actual / self._ema_raw))

    # -- reporting -----------------------------------------------------------------------
    def succeeded(self, now: float) -> None:
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
        if not self._ok_times or self.first_sent is None:
            return None
        last = self._ok_times[-1]
        start = max(self.first_sent, last - RATE_WINDOW)
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
            "window_allowance": one["window_allowance"] if one else None,
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
