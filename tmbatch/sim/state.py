"""The counters one simulator keeps, and the accounting that fills them.

These counters are the simulator's reason to exist: they are what tests and benchmarks read to
prove that no billable request was generated twice, that Retry-After was honoured and that keys
went only where needed. Every exit path of a handler goes through `record_arrival`, so nothing
escapes the count. A single event loop owns a state, so no locking is needed.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

from tmbatch.sim.config import (
    BILLABLE_ROUTES,
    GET_ROUTES,
    POST_ROUTES,
    USER_IDS_CAP,
    SimConfig,
)
from tmbatch.sim.limits import (
    Capacity,
    FixedWindow,
    LimitSet,
    build_limit_set,
)
from tmbatch.sim.overload import RandomRefusal


@dataclass
class SimState:
    """Mutable counters of one server; a single event loop owns it, so no locking is needed."""

    config: SimConfig
    id_prefix: str
    seq: int = 0
    received: int = 0
    completion_calls: int = 0
    tokenize_calls: int = 0
    by_route: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    status_counts: dict[int, int] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)
    processed_total: int = 0
    duplicates: int = 0
    duplicate_keys: list[str] = field(default_factory=list)
    rejected_429: int = 0
    rejected_503: int = 0
    refused_random: int = 0
    random_refusal: RandomRefusal | None = None
    injected_500: int = 0
    dropped: int = 0
    violations: int = 0
    epoch: float = 0.0  # when the server started or was last reset (monotonic)
    # The limits and the windows their refusals announced: the account's, or (limit_scope
    # "model") each model's, and then no account's.
    account: LimitSet | None = None
    per_model: dict[str, LimitSet] = field(default_factory=dict)
    capacity: Capacity | None = None
    rejected_by: dict[str, int] = field(default_factory=dict)
    windows_announced: int = 0
    bearer_ok: int = 0
    bearer_wrong: int = 0
    bearer_missing: int = 0
    user_ids: dict[str, None] = field(default_factory=dict)
    hook_arrivals: dict[str, int] = field(default_factory=dict)
    log: list[list[Any]] = field(default_factory=list)
    log_overflow: int = 0
    # The clock of the accounting (arrivals, limits, windows, the log): monotonic seconds. A
    # test passes a fake one to move time instead of sleeping; capacity's marks stay real.
    clock: Callable[[], float] = time.monotonic


STATE_KEY: web.AppKey[SimState] = web.AppKey("tmbatch_sim_state", SimState)


def new_state(config: SimConfig, clock: Callable[[], float] = time.monotonic) -> SimState:
    """Give each server its own id prefix so request ids never repeat across restarts."""
    state = SimState(config=config, id_prefix=secrets.token_hex(4), clock=clock)
    reset_state(state)
    return state


def reset_state(state: SimState) -> None:
    """Start counting afresh (tests reuse one server); the bucket refills so tests are isolated."""
    fresh = SimState(config=state.config, id_prefix=state.id_prefix)
    for f in fields(fresh):
        if f.name not in ("config", "id_prefix", "seq", "clock"):
            setattr(state, f.name, getattr(fresh, f.name))
    for route in (*POST_ROUTES, *GET_ROUTES):
        state.by_route[route] = {"received": 0, "status_counts": {}}
    for model in state.config.models:
        state.by_model[model] = {"received": 0, "ok": 0, "refused": 0, "violations": 0}
    _build_limits(state, state.clock())


def _build_limits(state: SimState, now: float) -> None:
    """Fresh limits, full buckets and a window starting now, so each test or run starts alike."""
    config = state.config
    state.epoch = now
    if config.limit_scope == "model":
        state.per_model = {model: build_limit_set(config, now) for model in config.models}
    else:
        state.account = build_limit_set(config, now)
    if config.refuse_fraction > 0.0:
        state.random_refusal = RandomRefusal(config.refuse_fraction, config.seed)
    if config.capacity is not None:
        state.capacity = Capacity(config.capacity)


def stats_of(state: SimState) -> dict[str, Any]:
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
        "by_model": {model: dict(counts) for model, counts in state.by_model.items()},
        "status_counts": {str(k): v for k, v in state.status_counts.items()},
        "processed": dict(state.processed),
        "processed_total": state.processed_total,
        "processed_keys": len(state.processed),
        "duplicates": state.duplicates,
        "duplicate_keys": list(state.duplicate_keys),
        "rejected_429": state.rejected_429,
        "rejected_503": state.rejected_503,
        "refused_random": state.refused_random,
        "injected_500": state.injected_500,
        "dropped": state.dropped,
        "retry_after_violations": state.violations,
        "windows_announced": state.windows_announced,
        "rejected_by": dict(state.rejected_by),
        "capacity": _capacity_stats(state.capacity),
        "window": _window_stats(state),
        "auth": {
            "bearer_ok": state.bearer_ok,
            "bearer_wrong": state.bearer_wrong,
            "bearer_missing": state.bearer_missing,
            "user_ids": list(state.user_ids),
        },
        "log": [list(entry) for entry in state.log],
        "log_overflow": state.log_overflow,
        "epoch": state.epoch,
        "time_now": state.clock(),
    }


def _window_stats(state: SimState) -> dict[str, float] | None:
    """Where the fixed windows start (monotonic clock), so a reader can tell them apart; with a
    per-model scope every model's start together, at the start or reset."""
    limits = state.account or next(iter(state.per_model.values()), None)
    limit = limits.requests if limits is not None else None
    if not isinstance(limit, FixedWindow):
        return None
    return {"epoch": limit.epoch, "seconds": limit.seconds, "limit": limit.limit}


def _capacity_stats(capacity: Capacity | None) -> dict[str, Any] | None:
    """The peaks prove the capacity was never exceeded; `waited` counts requests that queued;
    first_start / last_finish (monotonic) bound the time the slots worked."""
    if capacity is None:
        return None
    return {"slots": capacity.slots, "running": capacity.running,
            "running_peak": capacity.running_peak, "queued": capacity.queued,
            "queued_peak": capacity.queued_peak, "waited": capacity.waited,
            "finished": capacity.finished, "first_start": capacity.first_start,
            "last_finish": capacity.last_finish}


# ----------------------------------------------------------------------------------------------
# Small helpers on the hot path


def next_id(state: SimState) -> str:
    """Ids only need to be unique per server; a counter is cheaper than uuid4."""
    state.seq += 1
    return f"{state.id_prefix}{state.seq:08x}"


def body_key(body: bytes) -> str:
    """Identify a request without an Idempotency-Key: identical bodies are the same request."""
    return "body-" + hashlib.blake2b(body, digest_size=12).hexdigest()


def draws(seed: int, key: str, attempt: int) -> tuple[float, float, float, float]:
    """Four uniforms from (seed, key, attempt): the same seed gives the same faults whatever the
    arrival order, while a re-send of a key gets a fresh draw (so `resend` can succeed)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{attempt}".encode(), digest_size=16).digest()
    a, b, c, d = struct.unpack("<4I", digest)
    scale = 1.0 / 4294967296.0
    return a * scale, b * scale, c * scale, d * scale


def record_arrival(
    state: SimState, route: str, key: str, arrived: float, status: int, model: str | None = None
) -> None:
    """One place that counts outcomes, so every exit path of a handler is accounted for.
    `model` is the served model the body names (None when it names none, or on a GET)."""
    state.status_counts[status] = state.status_counts.get(status, 0) + 1
    info = state.by_route.get(route)
    if info is not None:
        counts = info["status_counts"]
        counts[status] = counts.get(status, 0) + 1
    if model is not None and route in BILLABLE_ROUTES:
        per_model = state.by_model.get(model)
        if per_model is not None:
            per_model["received"] += 1
            if status == 200:
                per_model["ok"] += 1
            elif status in (429, 503):
                per_model["refused"] += 1
    if len(state.log) < state.config.log_limit:
        state.log.append([arrived, route, key, status, model])
    else:
        state.log_overflow += 1


def note_auth(state: SimState, headers: Any) -> None:
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
