"""Lanes shared by every process of a job through Redis (`--redis`): the pause and the pace.

K pods on one account each learn the limit alone: a Retry-After one pod is told of does not
stop the others, which send into the window the server announced, and the pods together
probe past the limit K times as often. Here each lane has, in Redis, under the job's prefix:

* `pause`: until when (Redis's clock, ms) nobody sends. A pod that is told a Retry-After
  extends it (`PAUSE`); every pod reads it before each send (`TAKE`) and, when it is on,
  pauses its own lane for what is left of it (the controller is not told: it was not this
  pod's refusal);
* `rates`: each pod's pace as its controller decided it (a hash, pod -> rate:when), so the
  pods' schedule is their sum; `tat`: that schedule's next slot (GCRA, as `schedule.Pacer`).
  A pod's controller keeps deciding from its own answers (its share of the limit); the shared
  schedule keeps the sum of the shares from bunching.

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

# KEYS: pause, tat, rates. ARGV: pod, its rate (req/s; 0: unpaced), stale ms, tolerance.
# Returns {wait ms, why}: why 0 go (a slot was taken), 1 paused, 2 the schedule's next slot.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if pause > now then return {pause - now, 1} end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':' .. now)
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[3]) * 6)
local all = redis.call('HGETALL', KEYS[3])
local total, unpaced = 0, false
for i = 1, #all, 2 do
  local sep = string.find(all[i + 1], ':', 1, true)
  local r = tonumber(string.sub(all[i + 1], 1, sep - 1))
  local at = tonumber(string.sub(all[i + 1], sep + 1))
  if now - at > tonumber(ARGV[3]) then redis.call('HDEL', KEYS[3], all[i])
  elseif r <= 0 then unpaced = true
  else total = total + r end
end
if unpaced or total <= 0 then return {0, 0} end
local interval = 1000.0 / total
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat < now then tat = now end
local ahead = interval * tonumber(ARGV[4])
if tat - now > ahead then return {math.ceil(tat - now - ahead), 2} end
redis.call('SET', KEYS[2], tostring(tat + interval), 'PX', 60000)
return {0, 0}
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


class LaneStore(Protocol):
    """What a lane shares with the other processes of its job. Without --redis there is no
    store: the admission's fast path checks for None and each lane is its process's alone."""

    async def take(self, lane: Lane, now: float) -> float:
        """Seconds to wait before this send (0: go; a slot is taken), the lane paused
        meanwhile when the fleet is."""
        ...

    def announce(self, lane: Lane, seconds: float) -> None:
        """A Retry-After this process was told: the fleet pauses the lane too."""
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

    @property
    def _tasks(self) -> set[asyncio.Task[Any]]:
        return self.link.tasks

    def _keys(self, lane: Lane, *names: str) -> list[str]:
        return [f"{self.prefix}lane:{lane.key.model}:{n}" for n in names]

    async def take(self, lane: Lane, now: float) -> float:
        if self.link.cut_off(now):
            return 0.0
        rate = lane.rate or 0.0
        answered, got = await self.link.call(self._take, self._keys(lane, "pause", "tat", "rates"),
                                             [self.pod, repr(rate), STALE_MS, TOLERANCE])
        if not answered:
            return 0.0
        self.link.answered()
        wait_ms, why = got
        wait = int(wait_ms) / 1000.0
        if int(why) == 1 and wait > 0:
            # what is left of the fleet's window (not ours), from when Redis answered: from
            # `now`, before the round trip, the lane would reopen that much too early
            now = asyncio.get_running_loop().time()
            lane.pause_until = max(lane.pause_until, now + wait)
            lane.pacer.restart_at(lane.pause_until)
        return wait

    def announce(self, lane: Lane, seconds: float) -> None:
        if not self.link.cut_off(asyncio.get_running_loop().time()):
            self.link.spawn(self._announce(lane, seconds))

    async def _announce(self, lane: Lane, seconds: float) -> None:
        await self.link.call(self._pause, self._keys(lane, "pause"),
                             [max(1, round(seconds * 1000))])

    async def close(self) -> None:
        await self.link.settle(cancel=True)
        await self.link.close()
