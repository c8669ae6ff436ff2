"""What a simulated endpoint is told to do, and the routes it serves.

Everything else in the simulator reads these names, so they live apart from the server: a test
or the command line can build a SimConfig without importing aiohttp handlers. Validation runs at
construction so that a typo never silently disables the fault a test meant to inject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
# How a 429 announces its pause. "llm-provider" is LiteLLM passing the provider's header on
# under its own prefix: `llm_provider-retry-after` in seconds and nothing else.
RETRY_AFTER_FORMATS = ("seconds", "http-date", "none", "ms", "llm-provider")
# What a refusal at random answers: 429 (an overloaded provider) or 503 (a flaky gateway).
REFUSE_STATUSES = (429, 503)
# Whom the limits count: the whole account, or each model on its own (OpenAI, LiteLLM).
LIMIT_SCOPES = ("account", "model")

MAX_MODEL_LEN = 8192
ANSWER_PREFIX = "Simulated answer to: "
DUPLICATE_KEYS_CAP = 1000
USER_IDS_CAP = 1000
NO_RESPONSE = 0  # status recorded when the connection is closed without an answer


@dataclass
class SimConfig:
    """Behaviour of one simulated endpoint; every knob maps to a failure tmbatch must survive."""

    latency: float = 0.0
    latency_jitter: float = 0.0
    # Limits (limits.py has the exact behaviour of each). Requests: a token bucket of
    # rate_limit/s holding rate_burst (default one second's worth), or a fixed window of
    # window_limit per window_seconds. Tokens: tpm_limit per minute charged with real usage.
    # capacity: at most this many billable requests processed at once, the rest queue.
    rate_limit: float | None = None
    rate_burst: float | None = None
    # x-ratelimit-*-requests state a bucket of this many at rate_limit/s while the one
    # enforced holds rate_burst: a limit enforced over shorter spans than its headers say
    # (OpenAI's per-minute limits may be enforced per second). None: the headers state it.
    ratelimit_stated_burst: float | None = None
    # (seconds after the start or reset, rate from then on), in time order: the bucket's rate
    # changes while its burst stays (another job shares the account for a while).
    rate_schedule: tuple[tuple[float, float], ...] = ()
    window_limit: int | None = None
    window_seconds: float = 60.0
    # seconds into its first window the server starts: windows are the server's clock's (a
    # per-minute key counts from the minute), not the client's
    window_start: float = 0.0
    tpm_limit: float | None = None
    tpm_burst: float | None = None
    # "model": each served model has its own requests and tokens limits (and rate schedule),
    # and its own Retry-After windows; capacity stays the account's.
    limit_scope: str = "account"
    capacity: int | None = None
    retry_after: float | None = None
    retry_after_format: str = "seconds"
    # Overload: each billable arrival refused with this probability (drawn per seed, key and
    # arrival), before the limits and costing none of them, answering refuse_status with the
    # Retry-After hint of the rate limits (retry_after, else 1 second).
    refuse_fraction: float = 0.0
    refuse_status: int = 429
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
    # Seconds after a 429 left in which an arrival is not counted inside its window: requests
    # that crossed it (sent before the client could read it) reach their handler up to ~5 ms
    # after it left when the server is busy with a burst (measured on 2 cores); 10 ms covers
    # that and nothing a client sends once it has read the 429 and waited (0.25 s hid a bug).
    grace: float = 0.01
    log_limit: int = 100_000

    def __post_init__(self) -> None:
        """Fail at construction so a typo in a test or flag never silently disables a fault."""
        self._check_choices()
        self._check_amounts()
        self._check_limits()
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must not be negative")
        if self.stream_chunks < 1:
            raise ValueError("stream_chunks must be at least 1")
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError("at least one model is needed")

    def _check_choices(self) -> None:
        """Knobs that take one of a few names or statuses."""
        if self.retry_after_format not in RETRY_AFTER_FORMATS:
            raise ValueError(f"retry_after_format must be one of {', '.join(RETRY_AFTER_FORMATS)}")
        if self.limit_scope not in LIMIT_SCOPES:
            raise ValueError(f"limit_scope must be one of {', '.join(LIMIT_SCOPES)}, "
                             f"got {self.limit_scope!r}")
        if self.refuse_status not in REFUSE_STATUSES:
            raise ValueError(f"refuse_status must be 429 or 503, got {self.refuse_status}")

    def _check_amounts(self) -> None:
        """Fractions, durations and limits, each within its range."""
        for name in ("error_500", "drop_after_read", "slow", "refuse_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {value}")
        for name in ("latency", "latency_jitter", "slow_seconds", "grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("rate_limit", "rate_burst", "tpm_limit", "tpm_burst"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None for no limit)")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise ValueError("rate_burst must be at least 1, or no request could ever pass")
        if self.ratelimit_stated_burst is not None and (
                self.ratelimit_stated_burst < 1 or self.rate_limit is None):
            raise ValueError("ratelimit_stated_burst must be at least 1, and needs rate_limit")
        for name in ("window_limit", "capacity"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for no limit)")
        if not self.window_seconds > 0:
            raise ValueError("window_seconds must be positive")
        if not 0 <= self.window_start < self.window_seconds:
            raise ValueError("window_start must be at least 0 and less than window_seconds")

    def _check_limits(self) -> None:
        """The request limits agree with one another (and the schedule is normalized)."""
        if self.rate_limit is not None and self.window_limit is not None:
            # one requests limit, so x-ratelimit-*-requests has one meaning
            raise ValueError("rate_limit and window_limit are two request limits: choose one")
        self.rate_schedule = _schedule(self.rate_schedule)
        if self.rate_schedule and self.rate_limit is None and self.window_limit is None:
            raise ValueError("rate_schedule changes the token bucket's rate (or the window's): "
                             "it needs rate_limit, the rate until the first change (or "
                             "window_limit)")

def _schedule(raw: Any) -> tuple[tuple[float, float], ...]:
    """(seconds, rate) pairs as floats: times positive and increasing, rates positive."""
    try:
        pairs = tuple((float(at), float(rate)) for at, rate in raw)
    except (TypeError, ValueError):
        raise ValueError("rate_schedule must be (seconds, rate) pairs") from None
    previous = 0.0
    for at, rate in pairs:
        if not (math.isfinite(at) and at > previous):
            raise ValueError("rate_schedule times must be positive and increasing, "
                             f"got {at:g} after {previous:g}")
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate_schedule rates must be positive, got {rate:g}")
        previous = at
    return pairs
