"""Lanes shared by every process of a job through Redis (`--redis`): the pause and the pace.

K pods on one account each learn the limit alone: a Retry-After one pod is told of does not
stop the others, which send into the window the server announced, and the pods together
probe past the limit K times as often. Here each lane has, in Redis, under the job's prefix:

* `pause`: until when (Redis's clock, ms) nobody sends. A pod that is told a Retry-After
  extends it (`PAUSE`); every pod reads it before each send (`TAKE`) and, when it is on,
  pauses its own lane for what is left of it (`Lane.paused_elsewhere`);
* `rates`: each pod's pace as its controller decided it (a hash, pod -> rate:when), so the
  pods' schedule is their sum; `tat`: that schedule's next slot (GCRA, as `schedule.Pacer`);
  `start`: when the lane's first take came (slow start, below).

The rules that make K controllers, each deciding from its own answers, act as one:

1. One schedule: every send takes a slot at the sum of the pods' paces. One task per lane
   and pod waits for it at a time (a turnstile): K x concurrency tasks asking at once would
   load Redis and the pods enough to delay the sends past the window a refusal opens.
2. Slow start: while no pod has a pace, the schedule runs at START a second, doubling every
   second. Unpaced, K pods would each burst; the first refusal reaches the others a Redis
   round trip later, and what they sent meanwhile lands inside its window.
3. A pause anywhere is every pod's: each pod's controller hears of it
   (`fleet.paused_elsewhere`: the plateau restarts, a probe or a ramp ends), so the
   fleet probes as one process would, not K times as often.
4. The mean: a pod paces at no less than the paced pods' mean (each take returns it), and an
   unpaced pod joins a paced fleet at it (`fleet.join`). A pod whose own measure came
   out low (it started late) would otherwise finish its shard long after the others, and
   one that joins unpaced would add nothing to the sum and learn nothing.

Every check-and-take is one Lua script, atomic in Redis, on Redis's own clock (`TIME`): pods'
clocks may disagree, Redis's is one. Redis sees the job's name, the lanes' models, counters
and times: never a prompt, an answer or a key.

Redis down (or slow past TIMEOUT): the pod goes on alone, as without --redis (its controller
paces it at what it learns, its share), warns once, tries again every few seconds, and never
waits on Redis longer than TIMEOUT for a line (`base.redislink`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any, Protocol

from tmbatch.base.redislink import RedisLink
from tmbatch.limits.lanes import Lane

TIMEOUT = 0.25  # seconds a send waits on Redis at most; past it, the pod goes on alone
STALE_MS = 10_000  # a pod that has not sent for this long is out of the shared schedule
TOLERANCE = 2.0  # slots of the shared schedule a pod may book ahead (GCRA's burst)
# requests/s the fleet's schedule starts at while no pod has a pace, doubling every second
# (TCP's slow start, by the second): K pods unpaced at once would send into a window until
# the first refusal reaches the others; this way few are on their way when it comes
START = 16.0
DOUBLINGS = 8  # past START x 2^8 without a refusal the fleet is unpaced (concurrency governs)

# KEYS: pause, tat, rates, start. ARGV: pod, its rate (req/s; 0: unpaced), stale ms,
# tolerance, START, DOUBLINGS.
# Returns {wait ms, why, the mean pace of the paced pods}: why 0 go (a slot was taken), 1
# paused, 2 the schedule's next slot.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return {pause - now, 1, '0'} end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':' .. now)
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[3]) * 6)
local all = redis.call('HGETALL', KEYS[3])
local total, paced = 0, 0
for i = 1, #all, 2 do
  local sep = string.find(all[i + 1], ':', 1, true)
  local r = tonumber(string.sub(all[i + 1], 1, sep - 1))
  local at = tonumber(string.sub(all[i + 1], sep + 1))
  if now - at > tonumber(ARGV[3]) then redis.call('HDEL', KEYS[3], all[i])
  elseif r > 0 then total, paced = total + r, paced + 1 end
end
local mean = '0'
if total > 0 then
  mean = tostring(total / paced)
else
  local born = tonumber(redis.call('GET', KEYS[4]) or '0')
  if born == 0 then born = now end
  redis.call('SET', KEYS[4], born, 'PX', 600000)
  local doublings = (now - born) / 1000.0
  if doublings >= tonumber(ARGV[6]) then return {0, 0, mean} end
  total = tonumber(ARGV[5]) * 2 ^ doublings
end
local interval = 1000.0 / total
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat < now then tat = now end
local ahead = interval * tonumber(ARGV[4])
if tat - now > ahead then return {math.ceil(tat - now - ahead), 2, mean} end
redis.call('SET', KEYS[2], tostring(tat + interval), 'PX', 60000)
return {0, 0, mean}
"""

# KEYS: pause. ARGV: seconds (ms). Returns the ms it now holds for.
PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if want > cur then
  redis.call('SET', KEYS[1], want, 'PX', tonumber(ARGV[1]) + 1000)
  cur = want
end
return cur - now
"""

# KEYS: tat. ARGV: tokens, tokens per minute, burst (s). Returns the wait in ms (a string).
# A GCRA in tokens, as `schedule.TokenBucket`: the same bucket, one for the whole fleet.
CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local per_ms = tonumber(ARGV[2]) / 60000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1]) / per_ms
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 60000)
local wait = tat - now - tonumber(ARGV[3]) * 1000
if wait < 0 then wait = 0 end
return tostring(wait)
"""

# KEYS: tat. ARGV: tokens (above 0 a debt, below a credit), tokens per minute.
SETTLE = """
local tat = redis.call('GET', KEYS[1])
if not tat then return 0 end
tat = tonumber(tat) + tonumber(ARGV[1]) / (tonumber(ARGV[2]) / 60000)
redis.call('SET', KEYS[1], tostring(tat), 'KEEPTTL')
return 0
"""


class LaneStore(Protocol):
    """What a lane shares with the other processes of its job. Without --redis there is no
    store: the admission's fast path checks for None and each lane is its process's alone."""

    async def take(self, lane: Lane) -> bool:
        """Wait for this send's slot in the fleet's schedule. True: go (a slot is taken; or
        the store is cut off, and this process goes alone). False: the fleet paused the lane
        meanwhile (`Lane.paused_elsewhere`). One task per lane at a time waits for the fleet
        (a FIFO turnstile, as `Lane.paced`): every waiting task asking at once would ask
        K x concurrency times per slot, and the asking would delay the sends."""
        ...

    def announce(self, lane: Lane, seconds: float) -> None:
        """A Retry-After this process was told: the fleet pauses the lane too."""
        ...

    async def charge(self, lane: Lane | None, tokens: float, per_minute: float,
                     burst: float) -> float | None:
        """Book `tokens` in the fleet's tokens-per-minute bucket: the lane's (a rate its
        headers state) or the run's (`--tpm`: lane None). Seconds to wait; None when the
        store is cut off (the process's own bucket books them, at its share)."""
        ...

    def settle(self, lane: Lane | None, tokens: float, per_minute: float) -> None:
        """A debt (tokens > 0: the answer used more than its estimate) or a credit."""
        ...

    async def close(self) -> None: ...


class RedisLanes:
    """The lanes' shared state in Redis (see the module doc)."""

    def __init__(self, url: str, prefix: str, *, timeout: float = TIMEOUT) -> None:
        self.link = RedisLink(
            url, timeout, alone="this process goes on alone (its own pace and pauses) and "
            "tries again every %gs", shared="the lanes are shared again")
        self.prefix = f"tmbatch:{prefix}:"
        self.pod = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self._take = self.link.script(TAKE)
        self._pause = self.link.script(PAUSE)
        self._charge = self.link.script(CHARGE)
        self._settle_tokens = self.link.script(SETTLE)
        self._turns: dict[object, asyncio.Lock] = {}  # per lane: whose fleet slot is next

    @property
    def _tasks(self) -> set[asyncio.Task[Any]]:
        return self.link.tasks

    def _keys(self, lane: Lane, *names: str) -> list[str]:
        return [f"{self.prefix}lane:{lane.key.model}:{n}" for n in names]

    async def take(self, lane: Lane) -> bool:
        turn = self._turns.get(lane.key)
        if turn is None:
            turn = self._turns[lane.key] = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with turn:
            while True:
                if self.link.cut_off(loop.time()):
                    return self._alone(lane)
                rate = lane.controller.rate or 0.0  # its own say (its pacer may be at the mean)
                answered, got = await self.link.call(
                    self._take, self._keys(lane, "pause", "tat", "rates", "start"),
                    [self.pod, repr(rate), STALE_MS, TOLERANCE, START, DOUBLINGS])
                if not answered:
                    return self._alone(lane)
                self.link.answered()
                wait_ms, why, mean = got
                wait = int(wait_ms) / 1000.0
                lane.share(float(mean))
                if int(why) == 0:
                    return True
                now = loop.time()
                if int(why) == 1:
                    # what is left of the fleet's window, from when Redis answered: from
                    # before the round trip the lane would reopen that much too early
                    lane.paused_elsewhere(now + wait, now)
                    return False
                await asyncio.sleep(wait)
                if lane.pause_until > loop.time():
                    return False  # a refusal of this process's came meanwhile

    @staticmethod
    def _alone(lane: Lane) -> bool:
        """Cut off: the process goes on at its own pace, no longer held up by the fleet's
        last mean (a limit that falls meanwhile must be able to slow it down)."""
        if lane.floor:
            lane.share(0.0)
        return True

    def announce(self, lane: Lane, seconds: float) -> None:
        if not self.link.cut_off(asyncio.get_running_loop().time()):
            self.link.spawn(self._announce(lane, seconds))

    async def _announce(self, lane: Lane, seconds: float) -> None:
        await self.link.call(self._pause, self._keys(lane, "pause"),
                             [max(1, round(seconds * 1000))])

    def _tpm_key(self, lane: Lane | None) -> list[str]:
        return [f"{self.prefix}tpm"] if lane is None else self._keys(lane, "tpm")

    async def charge(self, lane: Lane | None, tokens: float, per_minute: float,
                     burst: float) -> float | None:
        if self.link.cut_off(asyncio.get_running_loop().time()):
            return None
        answered, got = await self.link.call(self._charge, self._tpm_key(lane),
                                             [repr(tokens), repr(per_minute), repr(burst)])
        if not answered:
            return None
        self.link.answered()
        return float(got) / 1000.0

    def settle(self, lane: Lane | None, tokens: float, per_minute: float) -> None:
        if tokens and not self.link.cut_off(asyncio.get_running_loop().time()):
            self.link.spawn(self._settle(lane, tokens, per_minute))

    async def _settle(self, lane: Lane | None, tokens: float, per_minute: float) -> None:
        await self.link.call(self._settle_tokens, self._tpm_key(lane),
                             [repr(tokens), repr(per_minute)])

    async def close(self) -> None:
        await self.link.settle(cancel=True)
        await self.link.close()
