"""One HTTP attempt against the inference API, classified by the safety contract.

`send` either returns a parsed 2xx answer or raises `AttemptFailed` carrying its
class; it never retries (the runner decides that from the class).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from tmbatch.base.config import Settings
from tmbatch.client.classify import classify_exception, classify_status
from tmbatch.client.sse import Aggregator, StreamError, error_payload
from tmbatch.policy import AttemptFailed, Outcome

MAX_BODY_BYTES = 64 * 1024 * 1024


# Headers that name a request, in the order they are believed: OpenAI, vLLM and Tensormesh
# send x-request-id, Anthropic request-id, the LiteLLM proxy x-litellm-call-id.
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-litellm-call-id", "x-correlation-id")
# Our own request ids: unique across processes by the random part, within one by the counter
# (a uuid4 per request cost ~1.5 µs of a ~150 µs request budget).
_ID_PREFIX = f"tmbatch-{secrets.token_hex(8)}-"
_ID_COUNTER = itertools.count(1)


@dataclass(slots=True)
class Answer:
    status: int
    request_id: str
    body: dict[str, Any]
    latency: float
    ttft: float | None
    headers: Any
    raw: bytes | None = None  # the body as received, when it can be written as it is


def _route_url(session: aiohttp.ClientSession, route: str) -> URL | str:
    """The absolute URL aiohttp would build for `route` on this session: its base URL joined
    with the route, as `ClientSession._build_url` joins it, made once per route instead of
    on every request (parsing the relative URL and the RFC 3986 join cost ~1.5 µs a
    request). An absolute URL is used by aiohttp as it is. Without a base URL (a session
    not from make_session) the route goes as before, for aiohttp to resolve."""
    base = getattr(session, "_base_url", None)
    cached = _ROUTE_URLS.get(route)
    if cached is not None and cached[0] is base:  # the same base object: the same join
        return cached[1]
    rel = route.lstrip("/")
    if base is None:
        return rel
    url = base.join(URL(rel))
    _ROUTE_URLS[route] = (base, url)  # holds the base, so `is` never meets a reused id
    return url


_ROUTE_URLS: dict[str, tuple[URL, URL]] = {}  # route -> (session base URL, joined URL)


def idempotency_key(job_id: str, custom_id: str) -> str:
    """Stable for a line across attempts, resumes and resends of the same job: blake2b-128
    of the custom_id (a copy of an empty state: cheaper than a constructor with keywords)."""
    digest = _BLAKE2B_128.copy()
    digest.update(custom_id.encode("utf-8", "surrogatepass"))
    return f"tmbatch-{job_id}-{digest.hexdigest()}"


_BLAKE2B_128 = hashlib.blake2b(digest_size=16)


def make_session(settings: Settings, concurrency: int,
                 swept: bool = False) -> aiohttp.ClientSession:
    """One pooled session for the whole run: one connection per worker, TLS verified.
    `swept`: the caller holds each request to `settings.timeout` itself (`run.inflight`),
    so aiohttp arms no timer per request (only one per new connection)."""
    ssl_ctx: ssl.SSLContext | bool = True
    if settings.ca_bundle:
        ssl_ctx = ssl.create_default_context(cafile=settings.ca_bundle)
    connector = aiohttp.TCPConnector(
        limit=concurrency + 8, limit_per_host=concurrency + 8, ssl=ssl_ctx,
        keepalive_timeout=30, enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None if swept else settings.timeout, sock_connect=min(30.0, settings.timeout)
    )
    return aiohttp.ClientSession(
        base_url=settings.base_url.rstrip("/") + "/",
        connector=connector,
        timeout=timeout,
        headers=settings.headers(),
        json_serialize=lambda o: orjson.dumps(o).decode(),
        auto_decompress=True,
        trust_env=False,
    )


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it is over `limit` bytes.

    StreamReader.read(n) returns what has arrived so far (at most n), not n bytes:
    one call would cut any answer that spans several TCP reads and lose a paid result.
    """
    if resp.content_length is not None:
        if resp.content_length > limit:
            return None
        return await resp.read()  # bounded by Content-Length: aiohttp's one-call path
    buf = bytearray()
    while chunk := await resp.content.read(1 << 20):
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def send(
    session: aiohttp.ClientSession,
    route: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST one request; raise AttemptFailed with the class the contract gives it."""
    stream = body.get("stream") is True
    if stream:
        body = with_stream_usage(route, body)
    # Ours, sent as X-Request-Id (vLLM takes it as its own request id, others log it), and
    # recorded when the server names the request with no header of its own.
    own_id = f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
    hdrs = {"Content-Type": "application/json", "X-Request-Id": own_id}
    if stream:
        hdrs["Accept"] = "text/event-stream"
    if headers:
        hdrs.update(headers)
    start = time.monotonic()
    try:
        async with session.post(
            _route_url(session, route), data=orjson.dumps(body), headers=hdrs,
            allow_redirects=False,
        ) as resp:
            request_id = _request_id(resp, own_id)
            status = resp.status
            if 300 <= status < 400:
                raise _redirect(resp, request_id)
            if status < 300 and stream and resp.content_type == "text/event-stream":
                return await _read_stream(resp, route, start, request_id)
            # A whole answer, read here rather than in a coroutine of its own (one per answer)
            length = resp.content_length
            if length is not None and length <= MAX_BODY_BYTES:
                raw: bytes | None = await resp.read()  # bounded: aiohttp's one-call path
            else:
                raw = await _read_body(resp, MAX_BODY_BYTES)
            return _plain_answer(resp, raw, start, request_id)
    except AttemptFailed:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise classify_exception(exc) from None


def _request_id(resp: aiohttp.ClientResponse, own: str) -> str:
    """The server's name for the request when it gives one, else the id we sent: output
    readers (vLLM's BatchRequestOutput, OpenAI's batch output) type it as a string."""
    get = resp.headers.get
    for name in REQUEST_ID_HEADERS:
        value = get(name)
        if value and (value := value.strip()):
            return value[:200]
    return own


def _redirect(resp: aiohttp.ClientResponse, request_id: str) -> AttemptFailed:
    return AttemptFailed(
        Outcome.PERMANENT, "redirect",
        f"HTTP {resp.status} redirect to {resp.headers.get('Location', '?')!r} not "
        "followed (it would carry the API key); point --base-url at the final host",
        resp.status, None, request_id,
    )


def _plain_answer(resp: aiohttp.ClientResponse, raw: bytes | None, start: float,
                  request_id: str) -> Answer:
    """A whole JSON answer, or the failure its status (or a broken body: None when it was
    over MAX_BODY_BYTES) makes it."""
    status = resp.status
    if raw is None:
        raise AttemptFailed(
            Outcome.AMBIGUOUS if status < 300 else Outcome.PERMANENT, "response_too_large",
            f"response body over {MAX_BODY_BYTES} bytes", status, None, request_id,
        )
    try:  # _loads, inline: once per answer
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if status >= 300:
        if parsed is None:
            parsed = error_payload(raw) or raw[:2000].decode("utf-8", "replace")
        raise classify_status(status, resp.headers, parsed, request_id)
    if not isinstance(parsed, dict):
        raise AttemptFailed(
            Outcome.AMBIGUOUS, "invalid_response_body",
            f"HTTP {status} but the body is not a JSON object: "
            f"{raw[:200].decode('utf-8', 'replace')!r}",
            status, None, request_id,
        )
    return Answer(status, request_id, parsed, time.monotonic() - start, None, resp.headers, raw)


async def _read_stream(resp: aiohttp.ClientResponse, route: str, start: float,
                       request_id: str) -> Answer:
    """An SSE answer rebuilt into the body the same request returns unstreamed."""
    status = resp.status
    agg = Aggregator(route)
    try:
        async for chunk in resp.content.iter_any():
            agg.feed(chunk, time.monotonic())
        final = agg.finish()
    except StreamError as exc:
        raise AttemptFailed(Outcome.AMBIGUOUS, exc.code, exc.message, status, exc.partial,
                            request_id) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if agg.done and agg.error is None:  # the whole answer was in: only the close failed
            return _answer_of(agg, status, request_id, start, resp)
        cut = classify_exception(exc)
        raise AttemptFailed(
            Outcome.AMBIGUOUS, "stream_cut",
            f"stream cut before {agg.end_marker} after {agg.events} event(s): "
            f"{cut.message}; what arrived is in response.body",
            status, agg.partial(), request_id,
        ) from None
    return _answer_of(agg, status, request_id, start, resp, final)


def _answer_of(agg: Aggregator, status: int, request_id: str, start: float,
               resp: aiohttp.ClientResponse, final: dict[str, Any] | None = None) -> Answer:
    ttft = None if agg.first_token_at is None else agg.first_token_at - start
    body = agg.partial() if final is None else final
    return Answer(status, request_id, body, time.monotonic() - start, ttft, resp.headers)


USAGE_ROUTES = ("/v1/chat/completions", "/v1/completions")


def with_stream_usage(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """Ask a streamed chat/completions call for its usage, unless the line says otherwise.

    Without `stream_options.include_usage` an OpenAI-compatible server sends no
    usage in a stream, so token counts, --tpm settling and results.jsonl would
    differ from the same line not streamed. An explicit `include_usage: false`
    is kept; /v1/responses always reports usage in response.completed.
    """
    if route not in USAGE_ROUTES:
        return body
    options = body.get("stream_options")
    if options is None:
        return {**body, "stream_options": {"include_usage": True}}
    if isinstance(options, dict) and "include_usage" not in options:
        return {**body, "stream_options": {**options, "include_usage": True}}
    return body


async def get_json(session: aiohttp.ClientSession, route: str) -> tuple[int, Any, str | None]:
    """GET a diagnostic route: (status, parsed body or text, request id); never retried here.

    Transport failures raise AttemptFailed like `send` does, so callers word them the same.
    """
    try:
        async with session.get(route.lstrip("/"), allow_redirects=False) as resp:
            raw = await _read_body(resp, MAX_BODY_BYTES)
            if raw is None:
                raw = f"response body over {MAX_BODY_BYTES} bytes".encode()
            parsed = _loads(raw)
            if parsed is None:
                parsed = raw[:2000].decode("utf-8", "replace")
            return resp.status, parsed, _request_id(resp, "") or None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise classify_exception(exc) from None
