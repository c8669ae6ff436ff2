"""Transport and HTTP answers, as the policy's values: the one place that knows aiohttp's
exceptions and the status table, so `policy` stays pure data.

Each answer or error becomes an `AttemptFailed` whose `Outcome` carries what it permits; what
the bytes can have done decides the class (a connection never made is `not_sent`, one cut
after the request left is `ambiguous`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tmbatch.policy import AttemptFailed, Outcome, error_message, parse_retry_after


def _class_of_status(status: int, retry_after: float | None) -> tuple[Outcome, str]:
    """The table for HTTP answers. 503 is only a rejection when the server says when."""
    if status == 429:
        return Outcome.REJECTED, "rate_limited"
    if status == 503 and retry_after is not None:
        return Outcome.REJECTED, "overloaded"
    if status == 408:
        return Outcome.REJECTED, "request_timeout"
    if status in (401, 403):
        return Outcome.FATAL, "unauthorized" if status == 401 else "forbidden"
    if status == 404:
        return Outcome.PERMANENT, "not_found"
    if 400 <= status < 500 and status != 409:
        return Outcome.PERMANENT, f"http_{status}"
    # 409 (an idempotency key still in use), 5xx, and anything stranger: the
    # server may have done the work, so nobody may send it again silently.
    return Outcome.AMBIGUOUS, f"http_{status}"


def classify_status(status: int, headers: Any, body: Any, request_id: str | None) -> AttemptFailed:
    """Map a non-2xx answer to its class, keeping what admission needs to learn from it."""
    retry_after = parse_retry_after(headers)
    cls, code = _class_of_status(status, retry_after)
    return AttemptFailed(cls, code, error_message(body, f"HTTP {status}"), status, body,
                         request_id, retry_after, headers)


def _is_connection_error(exc: BaseException) -> bool:
    """Fairly sure that the server did not receive the request: the connection was never
    made (DNS, refused, TLS handshake, connect timeout)."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def classify_exception(exc: BaseException) -> AttemptFailed:
    """Map a transport error to its class by whether the request bytes can have left."""
    if isinstance(exc, AttemptFailed):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return AttemptFailed(
            Outcome.NOT_SENT, "tls_certificate",
            f"{text}; the server's certificate is not trusted: if it uses a private CA, pass "
            "--ca-bundle FILE or set TENSORMESH_CA_BUNDLE (verification is never turned off)",
        )
    if _is_connection_error(exc):
        code = "connect_timeout" if isinstance(exc, aiohttp.ConnectionTimeoutError) else \
            "connect_failed"
        return AttemptFailed(Outcome.NOT_SENT, code, text)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return AttemptFailed(Outcome.AMBIGUOUS, "server_disconnected", text)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return AttemptFailed(Outcome.AMBIGUOUS, "response_cut", text)
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return AttemptFailed(Outcome.AMBIGUOUS, "read_timeout",
                             "no complete answer within the timeout")
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return AttemptFailed(Outcome.AMBIGUOUS, "connection_lost", text)
    return AttemptFailed(Outcome.AMBIGUOUS, "transport_error", f"{type(exc).__name__}: {text}")
