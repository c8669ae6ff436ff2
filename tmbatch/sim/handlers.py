"""The common path of every POST route: account, refuse, admit, then process.

A request's body may carry a "sim" object (hooks) that forces one specific failure on it, so a
test can stage an exact sequence of 429s, drops and broken streams for one request; the random
faults of SimConfig are drawn per (seed, key, attempt) so a seed reproduces the same run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tmbatch.sim.bodies import (
    SSE_DONE,
    SSE_TYPE,
    Answer,
    build_answer,
    detokenize_body,
    full_body,
    prompt_text,
    stream_events,
    tokenize_body,
)
from tmbatch.sim.config import BILLABLE_ROUTES, DUPLICATE_KEYS_CAP, NO_RESPONSE, ROUTE_TOKENIZE
from tmbatch.sim.gate import (
    access_refusal,
    announce,
    limits_for,
    note_post_arrival,
    open_window,
    refused_at_random,
    rejection,
)
from tmbatch.sim.limits import LimitSet
from tmbatch.sim.replies import error_reply, json_reply
from tmbatch.sim.state import SimState, body_key, draws, next_id, note_auth, record_arrival


@dataclass
class _Hook:
    """The body's "sim" object, already reduced to what applies to this arrival."""

    status: int | None = None
    retry_after: Any = None
    drop: bool = False
    sleep: float = 0.0
    cut_after: int | None = None
    sse_error: bool = False
    bad_json: bool = False


_NO_HOOK = _Hook()


def _read_hook(state: SimState, key: str, body: dict[str, Any]) -> _Hook:
    """Apply "times": only the first K arrivals of a key that reach this point get the hook."""
    raw = body.get("sim")
    if not isinstance(raw, dict):
        return _NO_HOOK
    times = raw.get("times")
    if isinstance(times, int) and not isinstance(times, bool):
        seen = state.hook_arrivals.get(key, 0) + 1
        state.hook_arrivals[key] = seen
        if seen > times:
            return _NO_HOOK
    status = raw.get("status")
    sleep = raw.get("sleep")
    cut_after = raw.get("cut_after")
    return _Hook(
        status=status if isinstance(status, int) and status != 200 else None,
        retry_after=raw.get("retry_after"),
        drop=raw.get("drop") is True,
        sleep=float(sleep) if isinstance(sleep, (int, float)) and sleep > 0 else 0.0,
        cut_after=cut_after if isinstance(cut_after, int) and cut_after >= 0 else None,
        sse_error=raw.get("sse_error") is True,
        bad_json=raw.get("bad_json") is True,
    )


def _parse_body(state: SimState, raw: bytes) -> dict[str, Any] | tuple[int, str]:
    """The body, if it is a JSON object naming a served model; else the status and message of
    its refusal. Read before the limits, which may be the model's own."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 400, "The request body is not valid JSON."
    if not isinstance(body, dict):
        return 400, "The request body must be a JSON object."
    model = body.get("model")
    if model is None:
        return 400, "'model' is required."
    if not isinstance(model, str):
        return 400, "'model' must be a string."
    if model not in state.config.models:
        return 404, f"The model `{model}` does not exist."
    return body


def _drop(request: web.Request) -> web.Response:
    """Close without answering: the client sees a disconnect after sending everything."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=204)


async def _delay(state: SimState, key: str, hook: _Hook, billable: bool) -> tuple[bool, bool]:
    """Apply latency, jitter, slowness and hook sleep; return the random (drop, error) fates."""
    config = state.config
    delay = config.latency + hook.sleep
    drop = error = False
    if billable and (
        config.latency_jitter or config.error_500 or config.drop_after_read or config.slow
    ):
        attempt = state.processed.get(key, 1) - 1
        u_drop, u_error, u_slow, u_jitter = draws(config.seed, key, attempt)
        drop = u_drop < config.drop_after_read
        error = u_error < config.error_500
        if u_slow < config.slow:
            delay += config.slow_seconds
        delay += (2.0 * u_jitter - 1.0) * config.latency_jitter
    if delay > 0:
        await asyncio.sleep(delay)
    return drop, error


def _count_processed(state: SimState, key: str) -> None:
    count = state.processed.get(key, 0) + 1
    state.processed[key] = count
    state.processed_total += 1
    if count == 2:
        state.duplicates += 1
        if len(state.duplicate_keys) < DUPLICATE_KEYS_CAP:
            state.duplicate_keys.append(key)


async def _stream(
    request: web.Request,
    state: SimState,
    answer: Answer,
    body: dict[str, Any],
    hook: _Hook,
    extra: dict[str, str] | None,
) -> web.StreamResponse:
    headers = {"Content-Type": SSE_TYPE, "Cache-Control": "no-cache", "x-request-id": answer.rid}
    if extra:
        headers.update(extra)
    response = web.StreamResponse(status=200, headers=headers)
    await response.prepare(request)
    if hook.bad_json:
        await response.write(b'data: {"id": "broken", "choices": [\n\n')
        await response.write(SSE_DONE)
        await response.write_eof()
        return response
    events = stream_events(answer, body, state.config.stream_chunks)
    if hook.sse_error:
        events = events[: hook.cut_after if hook.cut_after is not None else 1]
    elif hook.cut_after is not None:
        events = events[: hook.cut_after]
    for event in events:
        await response.write(event)
    if hook.sse_error:
        error = {
            "error": {
                "message": "simulated error in the middle of the stream",
                "type": "InternalServerError",
                "code": 500,
            }
        }
        await response.write(b"event: error\ndata: " + orjson.dumps(error) + b"\n\n")
    elif hook.cut_after is not None:
        if request.transport is not None:
            request.transport.close()
        return response
    else:
        await response.write(SSE_DONE)
    await response.write_eof()
    return response


async def handle_post(request: web.Request, state: SimState, route: str) -> web.StreamResponse:
    """The common path of every POST route: account, refuse, admit, then process.

    The order of the refusals is the gateway's: routing and the key, then a body that names no
    served model (it costs no token: the limits may be the model's own), then a refusal at
    random (an overloaded server: no token either), then the limits."""
    raw = await request.read()
    now = state.clock()
    headers = request.headers
    key = headers.get("Idempotency-Key") or body_key(raw)
    billable = route in BILLABLE_ROUTES
    state.received += 1
    state.by_route[route]["received"] += 1
    if billable:
        state.completion_calls += 1
    elif route == ROUTE_TOKENIZE:
        state.tokenize_calls += 1
    note_auth(state, headers)
    parsed = _parse_body(state, raw)
    model = parsed["model"] if isinstance(parsed, dict) else None
    limits = limits_for(state, model)
    note_post_arrival(state, now, limits, model if billable else None)

    refusal = access_refusal(state, headers, needs_key=True)
    if refusal is not None:
        record_arrival(state, route, key, now, refusal.status, model)
        return refusal
    if isinstance(parsed, tuple):
        status, message = parsed
        extra, ends = announce(state, limits, now)
        response: web.StreamResponse = error_reply(state, status, message, extra)
        record_arrival(state, route, key, now, status, model)
    elif refused_at_random(state, key, billable):
        status = state.config.refuse_status
        extra, ends = announce(state, limits, now)
        response = rejection(state, limits, status, 1.0, None, extra, kind=None)
        record_arrival(state, route, key, now, status, model)
    else:
        assert limits is not None  # a served model always has limits (maybe none enforced)
        wait, kind = limits.admit(now)
        extra, ends = announce(state, limits, now)
        if wait > 0.0:
            response = rejection(state, limits, 429, wait, None, extra, kind)
            record_arrival(state, route, key, now, 429, model)
        else:
            response = await _serve(request, state, limits, route, key, now, parsed, billable,
                                    extra)
    for end in ends:  # opened as the answer leaves: only then can a client read it
        open_window(state, limits, end)
    return response


async def _serve(
    request: web.Request,
    state: SimState,
    limits: LimitSet,
    route: str,
    key: str,
    now: float,
    body: dict[str, Any],
    billable: bool,
    extra: dict[str, str] | None,
) -> web.StreamResponse:
    """An admitted request: apply hooks, generate (in a capacity slot), answer."""
    model = body["model"]
    hook = _read_hook(state, key, body)
    if hook.status in (429, 503):
        response = rejection(state, limits, hook.status, 1.0, hook.retry_after, extra)
        record_arrival(state, route, key, now, hook.status, model)
        return response
    made, extra = _generate(state, limits, route, key, now, body, billable, extra)
    if isinstance(made, str):
        response = error_reply(state, 400, made, extra)
        record_arrival(state, route, key, now, 400, model)
        return response
    drop, error = await _in_slot(state, key, hook, billable)
    if hook.drop or drop:
        state.dropped += 1
        record_arrival(state, route, key, now, NO_RESPONSE, model)
        return _drop(request)
    if hook.status is not None or error:
        status = hook.status if hook.status is not None else 500
        if status == 500:
            state.injected_500 += 1
        record_arrival(state, route, key, now, status, model)
        return error_reply(state, status, f"simulated error {status}", extra)
    record_arrival(state, route, key, now, 200, model)
    return await _reply(request, state, made, body, hook, extra)


def _generate(
    state: SimState,
    limits: LimitSet,
    route: str,
    key: str,
    now: float,
    body: dict[str, Any],
    billable: bool,
    extra: dict[str, str] | None,
) -> tuple[Answer | bytes | str, dict[str, str] | None]:
    """What the request makes, and the headers to send with it: a billable route's answer
    (counted as processed, its usage charged), /tokenize's or /detokenize's body, or a str
    saying why the body is refused (400)."""
    if billable:
        prompt = prompt_text(route, body)
        if isinstance(prompt, str):
            return prompt, extra
        _count_processed(state, key)
        answer = build_answer(state, route, body, body["model"], *prompt)
        return answer, _charge_usage(limits, now, answer, extra)
    result = tokenize_body(body) if route == ROUTE_TOKENIZE else detokenize_body(body)
    if isinstance(result, str):
        return result, extra
    return orjson.dumps(result), extra


async def _in_slot(state: SimState, key: str, hook: _Hook, billable: bool) -> tuple[bool, bool]:
    """`_delay`, in one of the capacity's slots for a billable request."""
    capacity = state.capacity if billable else None
    if capacity is not None:
        await capacity.acquire()
    try:
        return await _delay(state, key, hook, billable)
    finally:
        if capacity is not None:
            capacity.release()


async def _reply(
    request: web.Request,
    state: SimState,
    made: Answer | bytes,
    body: dict[str, Any],
    hook: _Hook,
    extra: dict[str, str] | None,
) -> web.StreamResponse:
    """A success: the body as JSON or as a stream, or broken as the hook asks."""
    if isinstance(made, bytes):
        if hook.bad_json:
            return json_reply(200, b'{"count": ', next_id(state), extra)
        return json_reply(200, made, next_id(state), extra)
    if body.get("stream") is True:
        return await _stream(request, state, made, body, hook, extra)
    if hook.bad_json:
        truncated = b'{"id": "' + made.rid.encode() + b'", "choices": ['
        return json_reply(200, truncated, made.rid, extra)
    return json_reply(200, orjson.dumps(full_body(made)), made.rid, extra)


def _charge_usage(
    limits: LimitSet, now: float, answer: Answer, extra: dict[str, str] | None
) -> dict[str, str] | None:
    """Book the answer's real usage on the tokens budget; its headers then say what is left."""
    if limits.tokens is None:
        return extra
    tokens = limits.charge(now, answer.prompt_tokens + answer.completion_tokens)
    if extra is None or tokens is None:
        return extra
    return {**extra, **tokens}
