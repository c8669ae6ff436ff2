"""JSON replies and OpenAI-shaped error bodies.

Clients (tmbatch and the openai SDK) branch on the error "type" and on the status, so errors are
shaped the way the real API shapes them; every reply carries an x-request-id as the gateway's do.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from tmbatch.sim.state import SimState, next_id

_JSON = "application/json"
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


def _error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "APIError")
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def json_reply(
    status: int, body: bytes, rid: str, extra: dict[str, str] | None = None
) -> web.Response:
    headers = {"Content-Type": _JSON, "x-request-id": rid}
    if extra:
        headers.update(extra)
    return web.Response(status=status, body=body, headers=headers)


def error_reply(
    state: SimState, status: int, message: str, extra: dict[str, str] | None = None
) -> web.Response:
    return json_reply(status, _error_body(status, message), next_id(state), extra)
