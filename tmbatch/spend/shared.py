"""The job's budget shared by every shard through Redis (`--redis` with `--budget-*`).

Split statically, a budget share one shard cannot use is lost to the others. Here each shard
publishes, under the job's name, its own books as absolute figures (a hash `budget`, field =
the shard's index): what it spent (its journal's, earlier runs included) and what it holds
reserved in flight, stamped with Redis's clock. Absolute figures make every write
idempotent: a resumed shard overwrites its own entry from its journal, so nothing is counted
twice, and a Redis restarted empty is refilled by the next claim of every live shard.

Before each billed attempt the shard's claim is one atomic Lua script (`CLAIM`): if the
others' spent + reserved + its own + this attempt's worst case fits every limit, its entry is
set with this attempt reserved; else nothing is taken (the refusal takes nothing back because
nothing was taken) and the figures come back, for `Budget` to wait (others' reservations may
settle lower) or to call the budget reached. An answer settles the shard's entry (`publish`).
A shard killed with attempts in flight leaves them reserved; once its entry is STALE_MS old
they count as spent (they may have been billed), so the others stop waiting for them and never
spend what they may have cost; its resume replaces them by what its journal knows.

Redis down (or slower than TIMEOUT): the shard goes on at its static share (budget / K, as
without --redis), warns once, and tries again every few seconds (`base.redislink`). Redis sees
the job's name, shard indexes, counters and times: never a prompt, an answer or a key.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from tmbatch.base.redislink import RedisLink

TIMEOUT = 0.25  # seconds a claim waits on Redis at most; past it, the static share
STALE_MS = 30_000  # a shard silent this long: its reservations count as spent
KEEP_MS = 20 * 3600 * 1000  # the budget's key outlives the job's last write by this much
MICRO = 1_000_000  # USD are kept in Redis as integer micro-dollars (exact sums)

# KEYS: budget. ARGV: shard, spent tokens, spent µUSD, reserved tokens, reserved µUSD (this
# shard's, without this attempt), this attempt's tokens, its µUSD, the token limit and the µUSD
# limit (-1: none), stale ms, keep ms. Returns {ok (1/0), others' spent tokens, spent µUSD,
# reserved tokens, reserved µUSD}; a stale entry's reservations are counted as spent.
CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local st, su, rt, ru = 0, 0, 0, 0
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    local f = {}
    for v in string.gmatch(all[i + 1], '[^ ]+') do f[#f + 1] = tonumber(v) end
    if now - f[5] > tonumber(ARGV[10]) then
      st, su = st + f[1] + f[3], su + f[2] + f[4]
    else
      st, su, rt, ru = st + f[1], su + f[2], rt + f[3], ru + f[4]
    end
  end
end
local mt = tonumber(ARGV[2]) + tonumber(ARGV[4]) + tonumber(ARGV[6])
local mu = tonumber(ARGV[3]) + tonumber(ARGV[5]) + tonumber(ARGV[7])
local ok = 1
if tonumber(ARGV[8]) >= 0 and st + rt + mt > tonumber(ARGV[8]) then ok = 0 end
if tonumber(ARGV[9]) >= 0 and su + ru + mu > tonumber(ARGV[9]) then ok = 0 end
local mine = ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5]
if ok == 1 then
  mine = ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (tonumber(ARGV[4]) + tonumber(ARGV[6])) ..
    ' ' .. (tonumber(ARGV[5]) + tonumber(ARGV[7]))
end
redis.call('HSET', KEYS[1], ARGV[1], mine .. ' ' .. now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[11]))
return {ok, st, su, rt, ru}
"""

# KEYS: budget. ARGV: shard, spent tokens, spent µUSD, reserved tokens, reserved µUSD, keep ms.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4] .. ' ' ..
  ARGV[5] .. ' ' .. now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))
return 1
"""


@dataclass(frozen=True, slots=True)
class Others:
    """The other shards' books as Redis had them at a refused claim."""

    spent_tokens: int
    spent_usd: float
    reserved_tokens: int
    reserved_usd: float


def _micro(usd: float) -> int:
    return math.ceil(usd * MICRO)  # a claim never rounds a cost down


class RedisBudget:
    """This shard's side of the job's shared budget (see the module doc)."""

    def __init__(self, url: str, prefix: str, shard: int, tokens: int | None,
                 usd: float | None, *, timeout: float = TIMEOUT) -> None:
        self.link = RedisLink(
            url, timeout, alone="this shard spends only its share of the budget until it "
            "answers (tries again every %gs)", shared="the budget is shared again")
        self.key = f"tmbatch:{prefix}:budget"
        self.shard = str(shard)
        self.tokens = tokens  # the whole job's limits, not this shard's share
        self.usd = usd
        self._claim = self.link.script(CLAIM)
        self._publish = self.link.script(PUBLISH)
        self.lock = asyncio.Lock()  # one write at a time: absolute figures stay in order
        self._dirty = False

    def _books(self, budget: Any) -> list[int]:
        return [int(budget.spent_tokens), _micro(budget.spent_usd),
                math.ceil(budget.reserved_tokens), _micro(max(0.0, budget.reserved_usd))]

    async def claim(self, budget: Any, tokens: int, usd: float) -> Others | None:
        """Reserve this attempt in the job's books: None when it is taken (or Redis is down:
        the caller checks the static share then, see `up`), else the others' figures."""
        if self.link.cut_off(asyncio.get_running_loop().time()):
            return None
        async with self.lock:
            args = [self.shard, *self._books(budget), tokens, _micro(usd),
                    -1 if self.tokens is None else self.tokens,
                    -1 if self.usd is None else _micro(self.usd), STALE_MS, KEEP_MS]
            answered, got = await self.link.call(self._claim, [self.key], args)
            if not answered:
                return None
        self.link.answered()
        ok, st, su, rt, ru = (int(v) for v in got)
        if ok:
            return None
        return Others(st, su / MICRO, rt, ru / MICRO)

    @property
    def up(self) -> bool:
        """Whether the last word from Redis was an answer (else: the static share)."""
        return self.link.up

    def publish(self, budget: Any) -> None:
        """An attempt settled or gave its reservation back: the job's books follow (one write
        in flight at a time, carrying the books as they are when it goes)."""
        if self._dirty or self.link.cut_off(asyncio.get_running_loop().time()):
            return
        self._dirty = True
        self.link.spawn(self._send(budget))

    async def _send(self, budget: Any) -> None:
        async with self.lock:
            self._dirty = False
            await self.link.call(self._publish, [self.key],
                                 [self.shard, *self._books(budget), KEEP_MS])

    async def close(self, budget: Any) -> None:
        """The run is over: its last books (nothing reserved but what a stop left in flight),
        so what it did not spend is the others'."""
        await self.link.settle(cancel=False)
        self._dirty = False
        if self.up:
            await self._send(budget)
        await self.link.close()
