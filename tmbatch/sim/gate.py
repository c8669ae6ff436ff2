"""What a request must pass before it is processed: routing, the key, the rate limit.

The order mirrors the gateway (X-User-Id routing before the key, the key before the limiter),
because clients must cope with the refusals in the order the real service gives them. Each 429
or 503 opens the Retry-After window it announces, so that arrivals inside it can be counted as
violations: the measure of whether a client honours Retry-After.
"""

from __future__ import annotations

import math
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web

from tmbatch.sim.replies import _error
from tmbatch.sim.state import _bucket_capacity, _State


def _access_refusal(state: _State, headers: Any, needs_key: bool) -> web.Response | None:
    """Mirror the gateway: routing by X-User-Id happens before the key is checked."""
    config = state.config
    if config.user_id is not None:
        if headers.get("X-User-Id") != config.user_id:
            return _error(state, 404, "no route: missing or unknown X-User-Id")
        needs_key = True
    key = config.api_key
    if needs_key and key is not None and headers.get("Authorization") != "Bearer " + key:
        return _error(state, 401, "Incorrect API key provided.")
    return None


# ----------------------------------------------------------------------------------------------
# Rate limiting and Retry-After accounting


def _note_post_arrival(state: _State, now: float) -> None:
    """Count an arrival inside any announced Retry-After window. Windows are opened in time
    order and arrivals are monotonic, so a deque plus a running maximum suffices: O(1)."""
    pending = state.pending_windows
    while pending and pending[0][0] < now:
        end = pending.popleft()[1]
        if end > state.matured_window_end:
            state.matured_window_end = end
    if now < state.matured_window_end:
        state.violations += 1


def _take_token(state: _State, now: float) -> tuple[bool, float, dict[str, str] | None]:
    """Token bucket over all POST routes. Returns (allowed, seconds until a token, headers)."""
    rate = state.config.rate_limit
    if rate is None:
        return True, 0.0, None
    capacity = _bucket_capacity(rate)
    tokens = min(capacity, state.tokens + (now - state.bucket_time) * rate)
    state.bucket_time = now
    allowed = tokens >= 1.0
    if allowed:
        tokens -= 1.0
    state.tokens = tokens
    wait = 0.0 if allowed else (1.0 - tokens) / rate
    headers = None
    if state.config.ratelimit_headers:
        headers = {
            "x-ratelimit-limit-requests": str(int(capacity)),
            "x-ratelimit-remaining-requests": str(int(tokens)),
            "x-ratelimit-reset-requests": _duration((capacity - tokens) / rate),
        }
    return allowed, wait, headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "250ms" below a second, "1.5s" above."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    return f"{round(seconds, 3):g}s"


def _seconds_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _rejection(
    state: _State, status: int, wait: float, hook_retry_after: Any, extra: dict[str, str] | None
) -> web.Response:
    """Answer 429/503 without processing and open the Retry-After window it announces."""
    config = state.config
    if isinstance(hook_retry_after, (int, float)) and not isinstance(hook_retry_after, bool):
        retry_after = float(hook_retry_after)
    elif config.retry_after is not None:
        retry_after = config.retry_after
    else:
        retry_after = float(max(1, math.ceil(wait)))
    headers = dict(extra) if extra else {}
    announced: float | None = retry_after
    fmt = config.retry_after_format
    if fmt == "seconds":
        headers["Retry-After"] = _seconds_text(retry_after)
    elif fmt == "ms":
        millis = round(retry_after * 1000)
        headers["retry-after-ms"] = str(millis)
        announced = millis / 1000.0
    elif fmt == "http-date":
        wall = time.time()
        target = math.ceil(wall + retry_after)
        headers["Retry-After"] = formatdate(target, usegmt=True)
        announced = target - wall
    else:
        announced = None
    if announced is not None:
        sent = time.monotonic()
        state.pending_windows.append((sent + config.grace, sent + announced))
    if status == 429:
        state.rejected_429 += 1
        message = "Rate limit reached for requests. Please retry after the indicated time."
    else:
        state.rejected_503 += 1
        message = "The server is temporarily unable to handle the request."
    return _error(state, status, message, headers)
