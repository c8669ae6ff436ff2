"""One process's link to the Redis a job's processes share (`limits.shared`, `spend.shared`).

Both users call Lua scripts that must never hold a line up, and both go on alone when Redis
does not answer: what they share is kept here once. A call gives up after the link's timeout;
a failure of Redis (its errors, a socket's, a timeout) cuts the link for RETRY seconds, says
so once, and the caller falls back to what it does without Redis; an answer after that says
it is back. Background writes are tracked so that closing can wait for them or cancel them.
redis-py is imported only when a link is made (`tmbatch[fleet]`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from typing import Any

from tmbatch.base.logs import public_url

log = logging.getLogger("tmbatch")

RETRY = 2.0  # seconds between tries to reach Redis again


class RedisLink:
    """The client, the clock of being cut off, the one warning, and the writes in flight.
    `alone` says what the process does while cut off, `shared` what is shared again."""

    def __init__(self, url: str, timeout: float, *, alone: str, shared: str) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.timeout = timeout
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False)
        self.alone, self.shared = alone, shared
        self.down_until = -math.inf  # loop time: cut off until then
        self.warned = False
        self.up_again = 0  # times Redis came back after being down
        self.tasks: set[asyncio.Task[Any]] = set()

    def script(self, lua: str) -> Any:
        return self.client.register_script(lua)

    def cut_off(self, now: float) -> bool:
        return now < self.down_until

    @property
    def up(self) -> bool:
        """Whether the last word from Redis was an answer."""
        return self.down_until == -math.inf

    async def call(self, script: Any, keys: list[str], args: list[Any]) -> tuple[bool, Any]:
        """(answered, the script's answer); not answered cuts the link (`down`)."""
        try:
            return True, await asyncio.wait_for(script(keys=keys, args=args), self.timeout)
        except Exception as exc:  # a socket's, a timeout, redis-py's own: Redis is down
            if not is_redis_error(exc):
                raise
            self.down(exc, asyncio.get_running_loop().time())
            return False, None

    def down(self, exc: BaseException, now: float) -> None:
        self.down_until = now + RETRY
        if not self.warned:
            self.warned = True
            log.warning("Redis at %s does not answer (%s): " + self.alone,
                        public_url(self.url), type(exc).__name__, RETRY,
                        extra={"event": "redis_down"})

    def answered(self) -> None:
        """An answer: shared again if it was cut off."""
        if not self.up:
            self.up_again += 1
            log.info("Redis answers again: %s", self.shared, extra={"event": "redis_up"})
        self.down_until = -math.inf

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """A write that nobody waits for, kept until it ends (for `settle`)."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def settle(self, *, cancel: bool) -> None:
        """The writes in flight: cancelled (stale once the run is over) or waited for."""
        if cancel:
            for t in list(self.tasks):
                t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:
            if not is_redis_error(exc):
                raise


def is_redis_error(exc: BaseException) -> bool:
    from redis.exceptions import RedisError

    return isinstance(exc, RedisError | OSError | TimeoutError)
