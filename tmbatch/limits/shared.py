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
paces it at what it learns, its share), warns once, tries again every RETRY seconds, and
never waits on Redis longer than TIMEOUT for a line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
from typing import Any, Protocol

from tmbatch.base.logs import public_url
from tmbatch.limits.lanes import Lane

log = logging.getLogger("tmbatch")

TIMEOUT = 0.25  # seconds a send waits on Redis at most; past it, the pod goes on alone
RETRY = 2.0  # seconds between tries to reach Redis again
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
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = f"tmbatch:{prefix}:"
        self.pod = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self.timeout = timeout
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False)
        self._take = self.client.register_script(TAKE)
        self._pause = self.client.register_script(PAUSE)
        self.down_until = -math.inf  # loop time: alone until then
        self.warned = False
        self.up_again = 0  # times Redis came back after being down
        self._tasks: set[asyncio.Task[Any]] = set()

    def _keys(self, lane: Lane, *names: str) -> list[str]:
        return [f"{self.prefix}lane:{lane.key.model}:{n}" for n in names]

    def _down(self, exc: BaseException, now: float) -> None:
        self.down_until = now + RETRY
        if not self.warned:
            self.warned = True
            log.warning("Redis at %s does not answer (%s): this process goes on alone (its "
                        "own pace and pauses) and tries again every %gs", public_url(self.url),
                        type(exc).__name__, RETRY, extra={"event": "redis_down"})

    def _up(self) -> None:
        if self.warned and self.down_until > -math.inf:
            self.up_again += 1
            log.info("Redis answers again: the lanes are shared again",
                     extra={"event": "redis_up"})
        self.down_until = -math.inf

    async def take(self, lane: Lane, now: float) -> float:
        if now < self.down_until:
            return 0.0
        rate = lane.rate or 0.0
        try:
            wait_ms, why = await asyncio.wait_for(self._take(
                keys=self._keys(lane, "pause", "tat", "rates"),
                args=[self.pod, repr(rate), STALE_MS, TOLERANCE]), self.timeout)
        except Exception as exc:  # a socket's, a timeout, redis-py's own: Redis is down
            if not _is_redis_error(exc):
                raise
            self._down(exc, now)
            return 0.0
        if self.down_until != -math.inf:
            self._up()
        wait = int(wait_ms) / 1000.0
        if int(why) == 1 and wait > 0:
            # what is left of the fleet's window (not ours), from when Redis answered: from
            # `now`, before the round trip, the lane would reopen that much too early
            now = asyncio.get_running_loop().time()
            lane.pause_until = max(lane.pause_until, now + wait)
            lane.pacer.restart_at(lane.pause_until)
        return wait

    def announce(self, lane: Lane, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self.down_until:
            return
        task = loop.create_task(self._announce(lane, seconds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self, lane: Lane, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._pause(keys=self._keys(lane, "pause"),
                                               args=[max(1, round(seconds * 1000))]),
                                   self.timeout)
        except Exception as exc:
            if not _is_redis_error(exc):
                raise
            self._down(exc, asyncio.get_running_loop().time())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.client.aclose()
        except Exception as exc:
            if not _is_redis_error(exc):
                raise


def _is_redis_error(exc: BaseException) -> bool:
    from redis.exceptions import RedisError

    return isinstance(exc, RedisError | OSError | TimeoutError)
