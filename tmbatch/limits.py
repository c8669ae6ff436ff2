"""Admission: nothing is sent faster than the account allows.

Three gates, all shared by every worker: requests per minute and tokens per
minute (aiolimiter leaky buckets, sized to one second of burst so a fresh run
does not fire a minute's worth at once), and one pause that a 429's
Retry-After sets. No request leaves while the pause is on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiolimiter import AsyncLimiter

log = logging.getLogger("tmbatch")

DEFAULT_MAX_OUTPUT_TOKENS = 256  # assumed when a body names no max_tokens


def _text_len(value: Any) -> int:
    """Characters of prompt text in a string, a list of parts, or chat messages."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, int):
                total += 4  # a token id
            elif isinstance(item, dict):
                total += _text_len(item.get("content")) + _text_len(item.get("text"))
                total += 4  # role and framing
        return total
    if isinstance(value, dict):
        return _text_len(value.get("content")) + _text_len(value.get("text"))
    return 0


def estimate_tokens(body: dict[str, Any]) -> int:
    """A pre-send estimate: ~4 characters a token for the prompt, plus the output cap."""
    chars = (
        _text_len(body.get("messages"))
        + _text_len(body.get("prompt"))
        + _text_len(body.get("input"))
        + _text_len(body.get("instructions"))
        + _text_len(body.get("tokens"))
    )
    out = body.get("max_tokens") or body.get("max_completion_tokens") or body.get(
        "max_output_tokens"
    )
    if not isinstance(out, int) or out < 0:
        out = DEFAULT_MAX_OUTPUT_TOKENS
    return chars // 4 + 1 + out


def bucket(per_minute: float) -> AsyncLimiter:
    """A leaky bucket for `per_minute`, holding at most one second's worth (at least 1)."""
    capacity = max(1.0, per_minute / 60.0)
    return AsyncLimiter(capacity, capacity * 60.0 / per_minute)


class Admission:
    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self.rpm = bucket(rpm) if rpm else None
        self.tpm = bucket(tpm) if tpm else None
        self.pause_until = 0.0
        self.pauses = 0
        self.paused_seconds = 0.0
        self._credit = 0.0  # tokens estimated too high: taken off the next acquire
        self._debt = 0.0  # tokens estimated too low: added to the next acquire
        self.on_pause: Callable[[float], None] | None = None

    async def wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = self.pause_until - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def admit(self, tokens: int) -> None:
        """Wait until this request may be sent. Returns with the pause checked last."""
        await self.wait_pause()
        if self.rpm is not None:
            await self.rpm.acquire()
        if self.tpm is not None:
            amount = tokens + self._debt - self._credit
            self._debt = self._credit = 0.0
            if amount < 0:
                self._credit = -amount
                amount = 0
            elif amount > self.tpm.max_rate:
                self._debt = amount - self.tpm.max_rate
                amount = self.tpm.max_rate
            await self.tpm.acquire(amount)
        await self.wait_pause()  # a 429 may have arrived while we waited for a token

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token bucket from a response's usage."""
        if self.tpm is None or actual <= 0:
            return
        diff = actual - estimated
        if diff > 0:
            self._debt += diff
        else:
            self._credit += -diff

    def pause(self, seconds: float) -> bool:
        """Pause every worker for `seconds` from now; True if this extended the pause."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if until <= self.pause_until:
            return False
        now = loop.time()
        self.paused_seconds += until - max(self.pause_until, now)
        self.pause_until = until
        self.pauses += 1
        log.info("rate limited: every worker pauses %.1fs (Retry-After)", seconds,
                 extra={"event": "rate_limit_pause", "retry_after": seconds})
        if self.on_pause is not None:
            self.on_pause(seconds)  # the runner journals it for `tmbatch report`
        return True
