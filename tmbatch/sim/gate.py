"""What a request must pass before it is processed: routing, the key, the rate limits.

The order mirrors the gateway (X-User-Id routing before the key, the key before the limiter),
because clients must cope with the refusals in the order the real service gives them. Each 429
or 503 opens the window its hint announces (Retry-After in seconds or as a date, retry-after-ms,
llm_provider-retry-after, or an x-ratelimit-remaining of 0 until that limit has room), so that
arrivals inside it can be counted as violations: the measure of whether a client honours them.
"""

from __future__ import annotations

import math
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web

from tmbatch.sim.limits import Limit
from tmbatch.sim.replies import error_reply
from tmbatch.sim.state import SimState


def access_refusal(state: SimState, headers: Any, needs_key: bool) -> web.Response | None:
    """Mirror the gateway: routing by X-User-Id happens before the key is checked."""
    config = state.config
    if config.user_id is not None:
        if headers.get("X-User-Id") != config.user_id:
            return error_reply(state, 404, "no route: missing or unknown X-User-Id")
        needs_key = True
    key = config.api_key
    if needs_key and key is not None and headers.get("Authorization") != "Bearer " + key:
        return error_reply(state, 401, "Incorrect API key provided.")
    return None


# ----------------------------------------------------------------------------------------------
# Rate limiting and Retry-After accounting


def note_post_arrival(state: SimState, now: float) -> None:
    """Count an arrival inside any announced Retry-After window. Windows are opened in time
    order and arrivals are monotonic, so a deque plus a running maximum suffices: O(1)."""
    pending = state.pending_windows
    while pending and pending[0][0] < now:
        end = pending.popleft()[1]
        if end > state.matured_window_end:
            state.matured_window_end = end
    if now < state.matured_window_end:
        state.violations += 1


def _active_limits(state: SimState) -> tuple[Limit, ...]:
    return tuple(lim for lim in (state.requests_limit, state.tokens_limit) if lim is not None)


def admit(state: SimState, now: float) -> tuple[float, str]:
    """Every limit must say yes before any counts the request, so a refusal by the tokens
    budget never costs a request token. Returns (0.0, "") when admitted, else the longest wait
    and the kind of the limit that asked for it ("requests" or "tokens")."""
    wait, kind = 0.0, ""
    limits = _active_limits(state)
    for lim in limits:
        w = lim.wait(now)
        if w > wait:
            wait, kind = w, lim.kind
    if wait == 0.0:
        for lim in limits:
            lim.take(now)
    return wait, kind


def announce(state: SimState, now: float) -> tuple[dict[str, str] | None, list[float]]:
    """The x-ratelimit-* headers of an answer, when the server sends them, and the ends of the
    windows they announce: a remaining of 0 says nothing more passes until that limit has room,
    which the server knows exactly (`wait`) and a client can work out from reset and limit. The
    caller opens those windows when the answer leaves (`open_window`), not now: a client can
    only honour what it has read."""
    if not state.config.ratelimit_headers:
        return None, []
    headers: dict[str, str] = {}
    ends: list[float] = []
    for lim in _active_limits(state):
        headers.update(lim.headers(now))
        if lim.remaining(now) == 0:
            ends.append(now + lim.wait(now))
    return headers, ends


def open_window(state: SimState, end: float) -> None:
    """Arrivals from `grace` after now until `end` count as violations; the grace lets requests
    already on the wire when the answer left arrive without blame, so a window shorter than the
    grace can never count anything and is not kept."""
    start = time.monotonic() + state.config.grace
    if end > start:
        state.pending_windows.append((start, end))


def _hint_seconds(state: SimState, wait: float, hook_retry_after: Any) -> float:
    """What the pause announces: a hook's or the fixed value, else the real wait rounded up to
    what the format can say (whole seconds, at least 1; milliseconds for retry-after-ms)."""
    if isinstance(hook_retry_after, (int, float)) and not isinstance(hook_retry_after, bool):
        return float(hook_retry_after)
    if state.config.retry_after is not None:
        return state.config.retry_after
    if state.config.retry_after_format == "ms":
        return max(1, math.ceil(wait * 1000 - 1e-6)) / 1000.0
    return float(max(1, math.ceil(wait - 1e-9)))


def _seconds_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def rejection(
    state: SimState,
    status: int,
    wait: float,
    hook_retry_after: Any,
    extra: dict[str, str] | None,
    kind: str = "requests",
) -> web.Response:
    """Answer 429/503 without processing and open the Retry-After window it announces."""
    retry_after = _hint_seconds(state, wait, hook_retry_after)
    headers = dict(extra) if extra else {}
    announced: float | None = retry_after
    fmt = state.config.retry_after_format
    if fmt == "seconds":
        headers["Retry-After"] = _seconds_text(retry_after)
    elif fmt == "ms":
        millis = round(retry_after * 1000)
        headers["retry-after-ms"] = str(millis)
        announced = millis / 1000.0
    elif fmt == "llm-provider":
        headers["llm_provider-retry-after"] = _seconds_text(retry_after)
    elif fmt == "http-date":
        wall = time.time()
        target = math.ceil(wall + retry_after)
        headers["Retry-After"] = formatdate(target, usegmt=True)
        announced = target - wall
    else:
        announced = None
    if announced is not None:
        open_window(state, time.monotonic() + announced)
    if status == 429:
        state.rejected_429 += 1
        state.rejected_by[kind] = state.rejected_by.get(kind, 0) + 1
        message = f"Rate limit reached for {kind}. Please retry after the indicated time."
    else:
        state.rejected_503 += 1
        message = "The server is temporarily unable to handle the request."
    return error_reply(state, status, message, headers)
