"""The safety contract: every failed attempt falls into exactly one class.

The class alone decides what happens next. Non-idempotent POSTs are generated
and billed once accepted, so the only failures that may be sent again without
the user asking are the ones where the server provably did not do the work:
the bytes never left (`not_sent`) or the server said "not now" (`rejected`).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

NOT_SENT = "not_sent"
REJECTED = "rejected"
AMBIGUOUS = "ambiguous"
PERMANENT = "permanent"
FATAL = "fatal"

FailureClass = Literal["not_sent", "rejected", "ambiguous", "permanent", "fatal"]
CLASSES: tuple[str, ...] = (NOT_SENT, REJECTED, AMBIGUOUS, PERMANENT, FATAL)

# A Retry-After further away than this is capped: a server that asks for a
# year is treated as asking for this long (documented in the README).
MAX_RETRY_AFTER = 600.0


@dataclass
class AttemptFailed(Exception):
    """One attempt failed; `cls` decides whether it may be sent again."""

    cls: str
    code: str
    message: str
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.cls}/{self.code}: {self.message}"


def retryable(exc: BaseException, idempotent: bool) -> bool:
    """The tenacity predicate: built from the class table, never 'any exception'."""
    if not isinstance(exc, AttemptFailed):
        return False
    if exc.cls in (NOT_SENT, REJECTED):
        return True
    return idempotent and exc.cls == AMBIGUOUS


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date.

    Garbage and negative values count as absent; huge ones are capped.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and value >= 0:
            return min(value, MAX_RETRY_AFTER)
    raw = headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        value = when.timestamp() - (time.time() if now is None else now)
        return min(max(value, 0.0), MAX_RETRY_AFTER)
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, MAX_RETRY_AFTER)


def error_message(body: Any, fallback: str) -> str:
    """The server's own words when it sent an OpenAI-style error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:500]
        if isinstance(err, str):
            return err[:500]
        if isinstance(body.get("message"), str):
            return body["message"][:500]
    return fallback


def classify_status(status: int, headers: Any, body: Any, request_id: str | None) -> AttemptFailed:
    """Map a non-2xx answer to its class. 503 is only a rejection when the server says when."""
    retry_after = parse_retry_after(headers)
    msg = error_message(body, f"HTTP {status}")
    def fail(cls: str, code: str) -> AttemptFailed:
        return AttemptFailed(cls, code, msg, status, body, request_id, retry_after)

    if status == 429:
        return fail(REJECTED, "rate_limited")
    if status == 503 and retry_after is not None:
        return fail(REJECTED, "overloaded")
    if status == 408:
        return fail(REJECTED, "request_timeout")
    if status in (401, 403):
        return fail(FATAL, "unauthorized" if status == 401 else "forbidden")
    if status == 404:
        return fail(PERMANENT, "not_found")
    if 400 <= status < 500 and status != 409:
        return fail(PERMANENT, f"http_{status}")
    # 409 (an idempotency key still in use), 5xx, and anything stranger: the
    # server may have done the work, so nobody may send it again silently.
    return fail(AMBIGUOUS, f"http_{status}")


def classify_exception(exc: BaseException) -> AttemptFailed:
    """Map a transport error to its class by whether the request bytes can have left."""
    if isinstance(exc, AttemptFailed):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return AttemptFailed(
            NOT_SENT, "tls_certificate",
            f"{text}; the server's certificate is not trusted: if it uses a private CA, pass "
            "--ca-bundle FILE or set TENSORMESH_CA_BUNDLE (verification is never turned off)",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return AttemptFailed(NOT_SENT, "connect_failed", text)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return AttemptFailed(NOT_SENT, "connect_timeout", text)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return AttemptFailed(AMBIGUOUS, "server_disconnected", text)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return AttemptFailed(AMBIGUOUS, "response_cut", text)
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return AttemptFailed(AMBIGUOUS, "read_timeout", "no complete answer within the timeout")
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return AttemptFailed(AMBIGUOUS, "connection_lost", text)
    return AttemptFailed(AMBIGUOUS, "transport_error", f"{type(exc).__name__}: {text}")
