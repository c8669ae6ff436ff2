"""Local simulator of the Tensormesh inference API.

The simulator exists so that tmbatch's safety contract can be *measured*: it counts how many
times each billable request was generated (duplicates are money lost), whether clients honour
Retry-After, and which auth headers arrived. It also serves as the credential-free demo backend
and as the benchmark target, so the hot path is kept small: no per-request logging, orjson,
precomputed constant responses, and randomness derived from hashes rather than shared state so
that a given seed yields the same faults regardless of arrival order.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import secrets
import signal
import struct
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field, fields
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

ROUTE_CHAT = "/v1/chat/completions"
ROUTE_COMPLETIONS = "/v1/completions"
ROUTE_RESPONSES = "/v1/responses"
ROUTE_TOKENIZE = "/tokenize"
ROUTE_DETOKENIZE = "/detokenize"
ROUTE_MODELS = "/v1/models"
ROUTE_HEALTH = "/health"
ROUTE_VERSION = "/version"
ROUTE_STATS = "/_sim/stats"
ROUTE_RESET = "/_sim/reset"

BILLABLE_ROUTES = (ROUTE_CHAT, ROUTE_COMPLETIONS, ROUTE_RESPONSES)
POST_ROUTES = (*BILLABLE_ROUTES, ROUTE_TOKENIZE, ROUTE_DETOKENIZE)
GET_ROUTES = (ROUTE_MODELS, ROUTE_HEALTH, ROUTE_VERSION)
RETRY_AFTER_FORMATS = ("seconds", "http-date", "none", "ms")

MAX_MODEL_LEN = 8192
ANSWER_PREFIX = "Simulated answer to: "
DUPLICATE_KEYS_CAP = 1000
USER_IDS_CAP = 1000
NO_RESPONSE = 0  # status recorded when the connection is closed without an answer

_JSON = "application/json"
_SSE = "text/event-stream"
_DONE = b"data: [DONE]\n\n"
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


@dataclass
class SimConfig:
    """Behaviour of one simulated endpoint; every knob maps to a failure tmbatch must survive."""

    latency: float = 0.0
    latency_jitter: float = 0.0
    rate_limit: float | None = None
    retry_after: float | None = None
    retry_after_format: str = "seconds"
    ratelimit_headers: bool = False
    error_500: float = 0.0
    drop_after_read: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 30.0
    api_key: str | None = None
    user_id: str | None = None
    models: tuple[str, ...] = ("tm-small", "tm-large")
    stream_chunks: int = 8
    seed: int = 0
    grace: float = 0.25
    log_limit: int = 100_000

    def __post_init__(self) -> None:
        """Fail at construction so a typo in a test or flag never silently disables a fault."""
        if self.retry_after_format not in RETRY_AFTER_FORMATS:
            raise ValueError(f"retry_after_format must be one of {', '.join(RETRY_AFTER_FORMATS)}")
        for name in ("error_500", "drop_after_read", "slow"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {value}")
        for name in ("latency", "latency_jitter", "slow_seconds", "grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be positive (or None for no limit)")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must not be negative")
        if self.stream_chunks < 1:
            raise ValueError("stream_chunks must be at least 1")
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError("at least one model is needed")


@dataclass
class _State:
    """Mutable counters of one server; a single event loop owns it, so no locking is needed."""

    config: SimConfig
    id_prefix: str
    seq: int = 0
    received: int = 0
    completion_calls: int = 0
    tokenize_calls: int = 0
    by_route: dict[str, dict[str, Any]] = field(default_factory=dict)
    status_counts: dict[int, int] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)
    processed_total: int = 0
    duplicates: int = 0
    duplicate_keys: list[str] = field(default_factory=list)
    rejected_429: int = 0
    rejected_503: int = 0
    injected_500: int = 0
    dropped: int = 0
    violations: int = 0
    pending_windows: deque[tuple[float, float]] = field(default_factory=deque)
    matured_window_end: float = -math.inf
    tokens: float = 0.0
    bucket_time: float = 0.0
    bearer_ok: int = 0
    bearer_wrong: int = 0
    bearer_missing: int = 0
    user_ids: dict[str, None] = field(default_factory=dict)
    hook_arrivals: dict[str, int] = field(default_factory=dict)
    log: list[list[Any]] = field(default_factory=list)
    log_overflow: int = 0


STATE_KEY: web.AppKey[_State] = web.AppKey("tmbatch_sim_state", _State)


def _new_state(config: SimConfig) -> _State:
    """Give each server its own id prefix so request ids never repeat across restarts."""
    state = _State(config=config, id_prefix=secrets.token_hex(4))
    _reset_state(state)
    return state


def _reset_state(state: _State) -> None:
    """Start counting afresh (tests reuse one server); the bucket refills so tests are isolated."""
    fresh = _State(config=state.config, id_prefix=state.id_prefix)
    for f in fields(fresh):
        if f.name not in ("config", "id_prefix", "seq"):
            setattr(state, f.name, getattr(fresh, f.name))
    for route in (*POST_ROUTES, *GET_ROUTES):
        state.by_route[route] = {"received": 0, "status_counts": {}}
    if state.config.rate_limit is not None:
        state.tokens = _bucket_capacity(state.config.rate_limit)
    state.bucket_time = time.monotonic()


def _bucket_capacity(rate: float) -> float:
    """One second of burst, but never less than one request, or a sub-1 rate could never pass."""
    return max(1.0, rate)


def stats_of(state: _State) -> dict[str, Any]:
    """Snapshot as plain JSON-able data (string status keys) for the route and in-process use."""
    return {
        "received": state.received,
        "completion_calls": state.completion_calls,
        "tokenize_calls": state.tokenize_calls,
        "by_route": {
            route: {
                "received": info["received"],
                "status_counts": {str(k): v for k, v in info["status_counts"].items()},
            }
            for route, info in state.by_route.items()
        },
        "status_counts": {str(k): v for k, v in state.status_counts.items()},
        "processed": dict(state.processed),
        "processed_total": state.processed_total,
        "processed_keys": len(state.processed),
        "duplicates": state.duplicates,
        "duplicate_keys": list(state.duplicate_keys),
        "rejected_429": state.rejected_429,
        "rejected_503": state.rejected_503,
        "injected_500": state.injected_500,
        "dropped": state.dropped,
        "retry_after_violations": state.violations,
        "auth": {
            "bearer_ok": state.bearer_ok,
            "bearer_wrong": state.bearer_wrong,
            "bearer_missing": state.bearer_missing,
            "user_ids": list(state.user_ids),
        },
        "log": [list(entry) for entry in state.log],
        "log_overflow": state.log_overflow,
        "time_now": time.monotonic(),
    }


# ----------------------------------------------------------------------------------------------
# Small helpers on the hot path


def _next_id(state: _State) -> str:
    """Ids only need to be unique per server; a counter is cheaper than uuid4."""
    state.seq += 1
    return f"{state.id_prefix}{state.seq:08x}"


def _body_key(body: bytes) -> str:
    """Identify a request without an Idempotency-Key: identical bodies are the same request."""
    return "body-" + hashlib.blake2b(body, digest_size=12).hexdigest()


def _draws(seed: int, key: str, attempt: int) -> tuple[float, float, float, float]:
    """Four uniforms from (seed, key, attempt): the same seed gives the same faults whatever the
    arrival order, while a re-send of a key gets a fresh draw (so `resend` can succeed)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{attempt}".encode(), digest_size=16).digest()
    a, b, c, d = struct.unpack("<4I", digest)
    scale = 1.0 / 4294967296.0
    return a * scale, b * scale, c * scale, d * scale


def _record(state: _State, route: str, key: str, arrived: float, status: int) -> None:
    """One place that counts outcomes, so every exit path of a handler is accounted for."""
    state.status_counts[status] = state.status_counts.get(status, 0) + 1
    info = state.by_route.get(route)
    if info is not None:
        counts = info["status_counts"]
        counts[status] = counts.get(status, 0) + 1
    if len(state.log) < state.config.log_limit:
        state.log.append([arrived, route, key, status])
    else:
        state.log_overflow += 1


def _note_auth(state: _State, headers: Any) -> None:
    """Record what credentials arrived, so tests can prove keys are sent where (and only where)
    they are needed."""
    auth = headers.get("Authorization")
    if auth is None:
        state.bearer_missing += 1
    elif state.config.api_key is None or auth == "Bearer " + state.config.api_key:
        state.bearer_ok += 1
    else:
        state.bearer_wrong += 1
    user = headers.get("X-User-Id")
    if user is not None and user not in state.user_ids and len(state.user_ids) < USER_IDS_CAP:
        state.user_ids[user] = None


def _error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "APIError")
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def _json(status: int, body: bytes, rid: str, extra: dict[str, str] | None = None) -> web.Response:
    headers = {"Content-Type": _JSON, "x-request-id": rid}
    if extra:
        headers.update(extra)
    return web.Response(status=status, body=body, headers=headers)


def _error(
    state: _State, status: int, message: str, extra: dict[str, str] | None = None
) -> web.Response:
    return _json(status, _error_body(status, message), _next_id(state), extra)


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


# ----------------------------------------------------------------------------------------------
# Request parsing and answer text


def _content_text(content: Any) -> str:
    """Message content is either a string or a list of typed parts (text / input_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return ""


def _messages_text(messages: list[Any]) -> tuple[str, str]:
    """(full text of all messages, text of the last user message or else the last message)."""
    texts = []
    last_user = None
    for message in messages:
        if not isinstance(message, dict):
            continue
        text = _content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    if last_user is None:
        last_user = texts[-1] if texts else ""
    return "\n".join(texts), last_user


def _prompt_text(route: str, body: dict[str, Any]) -> tuple[str, str] | str:
    """(full prompt, the part the answer echoes); a plain str is a 400 message."""
    if route == ROUTE_CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        return _messages_text(messages)
    if route == ROUTE_COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = " ".join(f"tok{t}" for t in prompt)  # one pre-tokenized prompt
        elif isinstance(prompt, list) and prompt:
            prompt = prompt[0]  # batched prompts: the simulator answers the first one only
            if isinstance(prompt, list):
                prompt = " ".join(f"tok{t}" for t in prompt)
        if not isinstance(prompt, str):
            return "'prompt' must be a string or a list of strings"
        return prompt, prompt
    given = body.get("input")
    if isinstance(given, str):
        return given, given
    if isinstance(given, list) and given:
        return _messages_text(given)
    return "'input' must be a string or a non-empty list of input items"


def _label_choice(full: str) -> str | None:
    """Label mode: answer with exactly one allowed label, stable across processes (crc32)."""
    lowered = full.lower()
    at = lowered.find("allowed labels:")
    if at < 0:
        return None
    rest = full[at + len("allowed labels:") :].split("\n", 1)[0]
    labels = [label.strip().strip("\"'`.").strip() for label in rest.split(",")]
    labels = [label for label in labels if label]
    if not labels:
        return None
    return labels[zlib.crc32(full.encode()) % len(labels)]


def _max_tokens(route: str, body: dict[str, Any]) -> int | None:
    names = {
        ROUTE_CHAT: ("max_completion_tokens", "max_tokens"),
        ROUTE_COMPLETIONS: ("max_tokens",),
        ROUTE_RESPONSES: ("max_output_tokens",),
    }[route]
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass
class _Answer:
    """Everything needed to render one answer, streamed or not, identically."""

    route: str
    model: str
    text: str
    words: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    rid: str
    created: int


def _answer(
    state: _State, route: str, body: dict[str, Any], model: str, full: str, echo: str
) -> _Answer:
    """Whitespace is normalised so that re-joining streamed word groups reproduces the text."""
    label = _label_choice(full)
    words = label.split() if label is not None else (ANSWER_PREFIX + echo[:60]).split()
    finish = "stop"
    cap = _max_tokens(route, body)
    if cap is not None and len(words) > cap:
        words = words[:cap]
        finish = "length"
    return _Answer(
        route=route,
        model=model,
        text=" ".join(words),
        words=words,
        finish_reason=finish,
        prompt_tokens=len(full) // 4 + 1,
        completion_tokens=len(words),
        rid=_next_id(state),
        created=int(time.time()),
    )


# ----------------------------------------------------------------------------------------------
# Rendering


def _chat_body(a: _Answer) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + a.rid,
        "object": "chat.completion",
        "created": a.created,
        "model": a.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": a.text},
                "finish_reason": a.finish_reason,
            }
        ],
        "usage": _usage(a),
    }


def _completion_body(a: _Answer) -> dict[str, Any]:
    return {
        "id": "cmpl-" + a.rid,
        "object": "text_completion",
        "created": a.created,
        "model": a.model,
        "choices": [
            {"index": 0, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
        ],
        "usage": _usage(a),
    }


def _usage(a: _Answer) -> dict[str, int]:
    return {
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens + a.completion_tokens,
    }


def _message_item(a: _Answer, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": "msg_" + a.rid,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _response_body(a: _Answer, done: bool = True) -> dict[str, Any]:
    incomplete = None if a.finish_reason == "stop" else {"reason": "max_output_tokens"}
    return {
        "id": "resp_" + a.rid,
        "object": "response",
        "created_at": a.created,
        "status": "completed" if done else "in_progress",
        "model": a.model,
        "output": [_message_item(a, "completed", a.text)] if done else [],
        "incomplete_details": incomplete if done else None,
        "usage": {
            "input_tokens": a.prompt_tokens,
            "output_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        }
        if done
        else None,
    }


def _full_body(a: _Answer) -> dict[str, Any]:
    if a.route == ROUTE_CHAT:
        return _chat_body(a)
    if a.route == ROUTE_COMPLETIONS:
        return _completion_body(a)
    return _response_body(a)


def _pieces(words: list[str], chunks: int) -> list[str]:
    """Split into at most `chunks` deltas whose concatenation is exactly " ".join(words)."""
    if not words:
        return []
    n = min(chunks, len(words))
    size, extra = divmod(len(words), n)
    pieces = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        piece = " ".join(words[start:end])
        pieces.append(piece if i == 0 else " " + piece)
        start = end
    return pieces


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _stream_events(a: _Answer, body: dict[str, Any], chunks: int) -> list[bytes]:
    """All data events of a stream except the final [DONE]."""
    pieces = _pieces(a.words, chunks)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if a.route == ROUTE_CHAT:
        return _chat_events(a, pieces, include_usage)
    if a.route == ROUTE_COMPLETIONS:
        return _completion_events(a, pieces, include_usage)
    return _response_events(a, pieces)


def _chat_events(a: _Answer, pieces: list[str], include_usage: bool) -> list[bytes]:
    head = {
        "id": "chatcmpl-" + a.rid,
        "object": "chat.completion.chunk",
        "created": a.created,
        "model": a.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": piece}, None) for piece in pieces)
    events.append(chunk({}, a.finish_reason))
    if include_usage:
        events.append(_sse({**head, "choices": [], "usage": _usage(a)}))
    return events


def _completion_events(a: _Answer, pieces: list[str], include_usage: bool) -> list[bytes]:
    head = {
        "id": "cmpl-" + a.rid,
        "object": "text_completion",
        "created": a.created,
        "model": a.model,
    }

    def chunk(text: str, finish: str | None) -> bytes:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return _sse({**head, "choices": [choice]})

    events = [chunk(piece, None) for piece in pieces]
    events.append(chunk("", a.finish_reason))
    if include_usage:
        events.append(_sse({**head, "choices": [], "usage": _usage(a)}))
    return events


def _response_events(a: _Answer, pieces: list[str]) -> list[bytes]:
    item_id = "msg_" + a.rid
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    full_part = {"type": "output_text", "text": a.text, "annotations": []}
    objs: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response_body(a, done=False)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": _message_item(a, "in_progress", None),
        },
        {"type": "response.content_part.added", **where, "part": empty_part},
    ]
    objs.extend({"type": "response.output_text.delta", **where, "delta": p} for p in pieces)
    objs.append({"type": "response.output_text.done", **where, "text": a.text})
    objs.append({"type": "response.content_part.done", **where, "part": full_part})
    objs.append(
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": _message_item(a, "completed", a.text),
        }
    )
    objs.append({"type": "response.completed", "response": _response_body(a)})
    for number, obj in enumerate(objs):
        obj["sequence_number"] = number
    return [_sse(obj) for obj in objs]


# ----------------------------------------------------------------------------------------------
# Handlers


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


def _read_hook(state: _State, key: str, body: dict[str, Any]) -> _Hook:
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


def _parse_body(state: _State, raw: bytes) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(state, 400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return _error(state, 400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        return _error(state, 400, "'model' is required.")
    if not isinstance(model, str):
        return _error(state, 400, "'model' must be a string.")
    if model not in state.config.models:
        return _error(state, 404, f"The model `{model}` does not exist.")
    return body


def _drop(request: web.Request) -> web.Response:
    """Close without answering: the client sees a disconnect after sending everything."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=204)


async def _delay(state: _State, key: str, hook: _Hook, billable: bool) -> tuple[bool, bool]:
    """Apply latency, jitter, slowness and hook sleep; return the random (drop, error) fates."""
    config = state.config
    delay = config.latency + hook.sleep
    drop = error = False
    if billable and (
        config.latency_jitter or config.error_500 or config.drop_after_read or config.slow
    ):
        attempt = state.processed.get(key, 1) - 1
        u_drop, u_error, u_slow, u_jitter = _draws(config.seed, key, attempt)
        drop = u_drop < config.drop_after_read
        error = u_error < config.error_500
        if u_slow < config.slow:
            delay += config.slow_seconds
        delay += (2.0 * u_jitter - 1.0) * config.latency_jitter
    if delay > 0:
        await asyncio.sleep(delay)
    return drop, error


def _count_processed(state: _State, key: str) -> None:
    count = state.processed.get(key, 0) + 1
    state.processed[key] = count
    state.processed_total += 1
    if count == 2:
        state.duplicates += 1
        if len(state.duplicate_keys) < DUPLICATE_KEYS_CAP:
            state.duplicate_keys.append(key)


async def _stream(
    request: web.Request,
    state: _State,
    answer: _Answer,
    body: dict[str, Any],
    hook: _Hook,
    extra: dict[str, str] | None,
) -> web.StreamResponse:
    headers = {"Content-Type": _SSE, "Cache-Control": "no-cache", "x-request-id": answer.rid}
    if extra:
        headers.update(extra)
    response = web.StreamResponse(status=200, headers=headers)
    await response.prepare(request)
    if hook.bad_json:
        await response.write(b'data: {"id": "broken", "choices": [\n\n')
        await response.write(_DONE)
        await response.write_eof()
        return response
    events = _stream_events(answer, body, state.config.stream_chunks)
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
        await response.write(_DONE)
    await response.write_eof()
    return response


async def _handle_post(request: web.Request, state: _State, route: str) -> web.StreamResponse:
    """The common path of every POST route: account, refuse, then process."""
    raw = await request.read()
    now = time.monotonic()
    headers = request.headers
    key = headers.get("Idempotency-Key") or _body_key(raw)
    billable = route in BILLABLE_ROUTES
    state.received += 1
    state.by_route[route]["received"] += 1
    if billable:
        state.completion_calls += 1
    elif route == ROUTE_TOKENIZE:
        state.tokenize_calls += 1
    _note_auth(state, headers)
    _note_post_arrival(state, now)

    refusal = _access_refusal(state, headers, needs_key=True)
    if refusal is not None:
        _record(state, route, key, now, refusal.status)
        return refusal
    allowed, wait, extra = _take_token(state, now)
    if not allowed:
        response = _rejection(state, 429, wait, None, extra)
        _record(state, route, key, now, 429)
        return response
    parsed = _parse_body(state, raw)
    if isinstance(parsed, web.Response):
        if extra:
            parsed.headers.update(extra)
        _record(state, route, key, now, parsed.status)
        return parsed
    body = parsed
    hook = _read_hook(state, key, body)
    if hook.status in (429, 503):
        response = _rejection(state, hook.status, 1.0, hook.retry_after, extra)
        _record(state, route, key, now, hook.status)
        return response
    if billable:
        prompt = _prompt_text(route, body)
        if isinstance(prompt, str):
            response = _error(state, 400, prompt, extra)
            _record(state, route, key, now, 400)
            return response
        _count_processed(state, key)
        answer_or_body: _Answer | bytes = _answer(state, route, body, body["model"], *prompt)
    else:
        result = _tokenize(body) if route == ROUTE_TOKENIZE else _detokenize(body)
        if isinstance(result, str):
            response = _error(state, 400, result, extra)
            _record(state, route, key, now, 400)
            return response
        answer_or_body = orjson.dumps(result)

    drop, error = await _delay(state, key, hook, billable)
    if hook.drop or drop:
        state.dropped += 1
        _record(state, route, key, now, NO_RESPONSE)
        return _drop(request)
    if hook.status is not None or error:
        status = hook.status if hook.status is not None else 500
        if status == 500:
            state.injected_500 += 1
        _record(state, route, key, now, status)
        return _error(state, status, f"simulated error {status}", extra)
    if isinstance(answer_or_body, bytes):
        _record(state, route, key, now, 200)
        if hook.bad_json:
            return _json(200, b'{"count": ', _next_id(state), extra)
        return _json(200, answer_or_body, _next_id(state), extra)
    answer = answer_or_body
    _record(state, route, key, now, 200)
    if body.get("stream") is True:
        return await _stream(request, state, answer, body, hook, extra)
    if hook.bad_json:
        return _json(200, b'{"id": "' + answer.rid.encode() + b'", "choices": [', answer.rid, extra)
    return _json(200, orjson.dumps(_full_body(answer)), answer.rid, extra)


def _token_ids(text: str) -> list[int]:
    return [zlib.crc32(word.encode()) % 50000 for word in text.split()]


def _tokenize(body: dict[str, Any]) -> dict[str, Any] | str:
    if isinstance(body.get("prompt"), str):
        text = body["prompt"]
    elif isinstance(body.get("messages"), list):
        text = _messages_text(body["messages"])[0]
    else:
        return "'prompt' (string) or 'messages' (list) is required"
    tokens = _token_ids(text)
    return {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}


def _detokenize(body: dict[str, Any]) -> dict[str, Any] | str:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        return "'tokens' must be a list of integers"
    return {"prompt": " ".join(f"tok{t}" for t in tokens)}


def build_app(config: SimConfig) -> web.Application:
    """Handlers are closures over one state object: cheaper than app-key lookups per request."""
    state = _new_state(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    models_body = orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "tensormesh"}
                for m in config.models
            ],
        }
    )
    version_body = orjson.dumps({"version": "tmbatch-sim 1"})

    def post_handler(route: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await _handle_post(request, state, route)

        return handler

    def get_handler(route: str, body: bytes | None) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            now = time.monotonic()
            state.by_route[route]["received"] += 1
            _note_auth(state, request.headers)
            refusal = _access_refusal(state, request.headers, needs_key=False)
            if refusal is not None:
                _record(state, route, "", now, refusal.status)
                return refusal
            _record(state, route, "", now, 200)
            if body is None:
                return web.Response(status=200, headers={"x-request-id": _next_id(state)})
            return _json(200, body, _next_id(state))

        return handler

    async def stats_handler(request: web.Request) -> web.Response:
        return _json(200, orjson.dumps(stats_of(state)), _next_id(state))

    async def reset_handler(request: web.Request) -> web.Response:
        _reset_state(state)
        return _json(200, b'{"reset": true}', _next_id(state))

    async def fallback(request: web.Request) -> web.Response:
        path = request.path
        if path in POST_ROUTES or path in GET_ROUTES or path in (ROUTE_STATS, ROUTE_RESET):
            return _error(state, 405, f"Method {request.method} is not allowed on {path}.")
        refusal = _access_refusal(state, request.headers, needs_key=False)
        if refusal is not None:
            return refusal
        return _error(state, 404, f"Unknown route {path}.")

    for route in POST_ROUTES:
        app.router.add_post(route, post_handler(route))
    app.router.add_get(ROUTE_MODELS, get_handler(ROUTE_MODELS, models_body))
    app.router.add_get(ROUTE_HEALTH, get_handler(ROUTE_HEALTH, None))
    app.router.add_get(ROUTE_VERSION, get_handler(ROUTE_VERSION, version_body))
    app.router.add_get(ROUTE_STATS, stats_handler)
    app.router.add_post(ROUTE_RESET, reset_handler)
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class SimServer:
    """A running simulator; `stats()` reads the live counters without an HTTP round trip."""

    url: str
    config: SimConfig
    _state: _State = field(repr=False)
    _runner: web.AppRunner = field(repr=False)

    def stats(self) -> dict[str, Any]:
        return stats_of(self._state)

    def reset(self) -> None:
        _reset_state(self._state)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_sim(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> SimServer:
    """Start on the running loop; port 0 lets the OS pick, so parallel tests never collide.
    A short shutdown timeout keeps stop() quick even when slow requests are still pending."""
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return SimServer(
        url=f"http://{url_host}:{bound[1]}", config=config, _state=app[STATE_KEY], _runner=runner
    )


def run_sim_forever(config: SimConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then close listeners and connections cleanly."""

    async def main() -> None:
        server = await start_sim(config, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"tmbatch sim listening on {server.url}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------
# Command-line flags


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return value


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    if not models:
        raise argparse.ArgumentTypeError("needs at least one model name")
    return models


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared by `tmbatch sim` and `tmbatch run --sim` so both describe the simulator the same."""
    d = SimConfig()
    group = parser.add_argument_group("simulator")
    group.add_argument(
        "--sim-latency",
        type=_non_negative,
        default=d.latency,
        metavar="SECONDS",
        help="delay added before answering each POST request (default: 0)",
    )
    group.add_argument(
        "--sim-jitter",
        type=_non_negative,
        default=d.latency_jitter,
        metavar="SECONDS",
        help="uniform +- jitter on the latency (default: 0)",
    )
    group.add_argument(
        "--sim-rate-limit",
        type=_positive,
        default=None,
        metavar="RPS",
        help="server-side limit in requests/second over all POST routes; excess "
        "requests get 429 (default: no limit)",
    )
    group.add_argument(
        "--sim-retry-after",
        type=_non_negative,
        default=None,
        metavar="SECONDS",
        help="fixed Retry-After on every 429 (default: time until the rate "
        "limiter has room, at least 1 s)",
    )
    group.add_argument(
        "--sim-retry-after-format",
        choices=RETRY_AFTER_FORMATS,
        default=d.retry_after_format,
        help="how 429s announce the pause: Retry-After in seconds or as an HTTP "
        "date, only retry-after-ms, or no header (default: seconds)",
    )
    group.add_argument(
        "--sim-ratelimit-headers",
        action="store_true",
        help="send x-ratelimit-limit/remaining/reset-requests headers",
    )
    group.add_argument(
        "--sim-error-500",
        type=_fraction,
        default=d.error_500,
        metavar="FRACTION",
        help="fraction of billable requests processed and then answered 500",
    )
    group.add_argument(
        "--sim-drop-after-read",
        type=_fraction,
        default=d.drop_after_read,
        metavar="FRACTION",
        help="fraction of billable requests processed and then disconnected without an answer",
    )
    group.add_argument(
        "--sim-slow",
        type=_fraction,
        default=d.slow,
        metavar="FRACTION",
        help="fraction of billable requests answered only after --sim-slow-seconds",
    )
    group.add_argument(
        "--sim-slow-seconds",
        type=_non_negative,
        default=d.slow_seconds,
        metavar="SECONDS",
        help="extra delay of slow requests (default: 30)",
    )
    group.add_argument(
        "--sim-api-key",
        type=_non_empty,
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: accept anything)",
    )
    group.add_argument(
        "--sim-user-id",
        type=_non_empty,
        default=None,
        metavar="UUID",
        help="on-demand mode: require 'X-User-Id: UUID' on every route",
    )
    group.add_argument(
        "--sim-models",
        type=_models,
        default=d.models,
        metavar="A,B",
        help=f"served model names (default: {','.join(d.models)})",
    )
    group.add_argument(
        "--sim-stream-chunks",
        type=_at_least_one,
        default=d.stream_chunks,
        metavar="N",
        help="content deltas per streamed answer (default: 8)",
    )
    group.add_argument(
        "--sim-seed",
        type=int,
        default=d.seed,
        metavar="N",
        help="seed of the simulated faults and jitter (default: 0)",
    )


def sim_config_from_args(ns: argparse.Namespace) -> SimConfig:
    """Missing attributes fall back to defaults, so callers may add only some of the flags."""
    d = SimConfig()
    return SimConfig(
        latency=getattr(ns, "sim_latency", d.latency),
        latency_jitter=getattr(ns, "sim_jitter", d.latency_jitter),
        rate_limit=getattr(ns, "sim_rate_limit", d.rate_limit),
        retry_after=getattr(ns, "sim_retry_after", d.retry_after),
        retry_after_format=getattr(ns, "sim_retry_after_format", d.retry_after_format),
        ratelimit_headers=getattr(ns, "sim_ratelimit_headers", d.ratelimit_headers),
        error_500=getattr(ns, "sim_error_500", d.error_500),
        drop_after_read=getattr(ns, "sim_drop_after_read", d.drop_after_read),
        slow=getattr(ns, "sim_slow", d.slow),
        slow_seconds=getattr(ns, "sim_slow_seconds", d.slow_seconds),
        api_key=getattr(ns, "sim_api_key", d.api_key),
        user_id=getattr(ns, "sim_user_id", d.user_id),
        models=tuple(getattr(ns, "sim_models", d.models)),
        stream_chunks=getattr(ns, "sim_stream_chunks", d.stream_chunks),
        seed=getattr(ns, "sim_seed", d.seed),
    )
