"""What a request must pass before it is processed: routing, the key, the rate limits.

The order mirrors the gateway (X-User-Id routing before the key, the key before the limiter),
because clients must cope with the refusals in the order the real service gives them. Each 429
or 503 opens the window its hint announces (Retry-After in seconds or as a date, retry-after-ms,
llm_provider-retry-after, or an x-ratelimit-remaining of 0 until that limit has room), so that
arrivals inside it can be counted as violations: the measure of whether a client honours them.
Limits and windows belong to a scope (limits_for): the account, or each model on its own.

The decisions themselves are pure and live in limits.py (LimitSet, RetryWindows) and
overload.py (RandomRefusal); hint_seconds and hint_headers say what a refusal announces
without a clock. The clock is read by the HTTP side only: here as an answer leaves, and in
handlers.
"""

from __future__ import annotations

import math
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web

from tmbatch.sim.config import SimConfig
from tmbatch.sim.limits import LimitSet
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


def limits_for(state: SimState, model: str | None) -> LimitSet | None:
    """The limits (and windows) an arrival for `model` meets: the account's, or the model's
    when each model is limited on its own; None for a body naming no served model then, which
    no limit counts and no window concerns."""
    if state.account is not None:
        return state.account
    return state.per_model.get(model) if model is not None else None


def note_post_arrival(
    state: SimState, now: float, limits: LimitSet | None, model: str | None = None
) -> None:
    """Count an arrival inside any Retry-After window announced by the limits it meets, and
    against `model` (a billable arrival's) too."""
    if limits is not None and limits.windows.arrive(now):
        state.violations += 1
        counts = state.by_model.get(model) if model is not None else None
        if counts is not None:
            counts["violations"] += 1


def announce(
    state: SimState, limits: LimitSet | None, now: float
) -> tuple[dict[str, str] | None, list[float]]:
    """The x-ratelimit-* headers of an answer, when the server sends them, and the ends of the
    windows they announce: a remaining of 0 says nothing more passes until that limit has room,
    which the server knows exactly (`wait`) and a client can work out from reset and limit. The
    caller opens those windows when the answer leaves (`open_window`), not now: a client can
    only honour what it has read."""
    if not state.config.ratelimit_headers or limits is None:
        return None, []
    return limits.headers(now)


def open_window(state: SimState, limits: LimitSet | None, end: float) -> None:
    """Arrivals from `grace` after now (the answer leaving) until `end` count as violations."""
    if limits is not None:
        limits.windows.open(state.clock(), end)


def hint_seconds(config: SimConfig, wait: float, hook_retry_after: Any = None) -> float:
    """What the pause announces: a hook's or the fixed value, else the real wait rounded up to
    what the format can say (whole seconds, at least 1; milliseconds for retry-after-ms)."""
    if isinstance(hook_retry_after, (int, float)) and not isinstance(hook_retry_after, bool):
        return float(hook_retry_after)
    if config.retry_after is not None:
        return config.retry_after
    if config.retry_after_format == "ms":
        return max(1, math.ceil(wait * 1000 - 1e-6)) / 1000.0
    return float(max(1, math.ceil(wait - 1e-9)))


def _seconds_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def hint_headers(fmt: str, seconds: float, wall: float) -> tuple[dict[str, str], float | None]:
    """The headers that announce a pause of `seconds` in format `fmt` (RETRY_AFTER_FORMATS),
    sent at wall-clock time `wall`, and the pause they really announce: what a client reading
    them would wait (an HTTP date is whole seconds of wall clock; ms is rounded to the ms), or
    None when nothing is announced."""
    if fmt == "seconds":
        return {"Retry-After": _seconds_text(seconds)}, seconds
    if fmt == "ms":
        millis = round(seconds * 1000)
        return {"retry-after-ms": str(millis)}, millis / 1000.0
    if fmt == "llm-provider":
        return {"llm_provider-retry-after": _seconds_text(seconds)}, seconds
    if fmt == "http-date":
        target = math.ceil(wall + seconds)
        return {"Retry-After": formatdate(target, usegmt=True)}, target - wall
    return {}, None


def refused_at_random(state: SimState, key: str, billable: bool) -> bool:
    """Whether this billable arrival is refused at random (overload): decided before the limits,
    so it costs none of them."""
    refusal = state.random_refusal
    return billable and refusal is not None and refusal.refuses(key)


def rejection(
    state: SimState,
    limits: LimitSet | None,
    status: int,
    wait: float,
    hook_retry_after: Any,
    extra: dict[str, str] | None,
    kind: str | None = "requests",
) -> web.Response:
    """Answer 429/503 without processing and open the Retry-After window it announces in the
    windows of `limits` (the scope whose refusal it is). `kind` names the limit that refused
    ("requests" or "tokens"); None is a refusal at random, an overloaded server."""
    retry_after = hint_seconds(state.config, wait, hook_retry_after)
    hint, announced = hint_headers(state.config.retry_after_format, retry_after, time.time())
    headers = {**extra, **hint} if extra else hint
    if announced is not None:
        open_window(state, limits, state.clock() + announced)
    if kind is None:
        state.refused_random += 1
        message = "The engine is currently overloaded, please try again later."
    elif status == 429:
        state.rejected_by[kind] = state.rejected_by.get(kind, 0) + 1
        message = f"Rate limit reached for {kind}. Please retry after the indicated time."
    else:
        message = "The server is temporarily unable to handle the request."
    if status == 429:
        state.rejected_429 += 1
    else:
        state.rejected_503 += 1
    return error_reply(state, status, message, headers)
