"""Command-line flags of the simulator.

Shared by `tmbatch sim` and `tmbatch run --sim` so both describe the simulator the same way;
values are checked by argparse types so a bad flag is a usage error, not a traceback.
"""

from __future__ import annotations

import argparse
import math

from tmbatch.sim.config import RETRY_AFTER_FORMATS, SimConfig


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


# (flag, SimConfig field, type, metavar, help): one table drives both the parser and
# sim_config_from_args, so a knob cannot be added to one and forgotten in the other.
_FLAGS: tuple[tuple[str, str, object, str | None, str], ...] = (
    ("--sim-latency", "latency", _non_negative, "SECONDS",
     "delay added before answering each POST request (default: 0)"),
    ("--sim-jitter", "latency_jitter", _non_negative, "SECONDS",
     "uniform +- jitter on the latency (default: 0)"),
    ("--sim-rate-limit", "rate_limit", _positive, "RPS",
     "server-side limit in requests/second over all POST routes; excess requests get 429 "
     "(default: no limit)"),
    ("--sim-retry-after", "retry_after", _non_negative, "SECONDS",
     "fixed Retry-After on every 429 (default: time until the rate limiter has room, at "
     "least 1 s)"),
    ("--sim-retry-after-format", "retry_after_format", RETRY_AFTER_FORMATS, None,
     "how 429s announce the pause: Retry-After in seconds or as an HTTP date, only "
     "retry-after-ms, or no header (default: seconds)"),
    ("--sim-ratelimit-headers", "ratelimit_headers", bool, None,
     "send x-ratelimit-limit/remaining/reset-requests headers"),
    ("--sim-error-500", "error_500", _fraction, "FRACTION",
     "fraction of billable requests processed and then answered 500"),
    ("--sim-drop-after-read", "drop_after_read", _fraction, "FRACTION",
     "fraction of billable requests processed and then disconnected without an answer"),
    ("--sim-slow", "slow", _fraction, "FRACTION",
     "fraction of billable requests answered only after --sim-slow-seconds"),
    ("--sim-slow-seconds", "slow_seconds", _non_negative, "SECONDS",
     "extra delay of slow requests (default: 30)"),
    ("--sim-api-key", "api_key", _non_empty, "KEY",
     "require 'Authorization: Bearer KEY' (default: accept anything)"),
    ("--sim-user-id", "user_id", _non_empty, "UUID",
     "on-demand mode: require 'X-User-Id: UUID' on every route"),
    ("--sim-models", "models", _models, "A,B",
     "served model names (default: tm-small,tm-large)"),
    ("--sim-stream-chunks", "stream_chunks", _at_least_one, "N",
     "content deltas per streamed answer (default: 8)"),
    ("--sim-seed", "seed", int, "N", "seed of the simulated faults and jitter (default: 0)"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_sim_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Shared by `tmbatch sim` and `tmbatch run --sim` so both describe the simulator the same.
    Given a group, the flags join it: nesting argument groups is deprecated in argparse."""
    d = SimConfig()
    group = (
        parser.add_argument_group("simulator")
        if isinstance(parser, argparse.ArgumentParser)
        else parser
    )
    for flag, attr, kind, metavar, text in _FLAGS:
        if kind is bool:
            group.add_argument(flag, action="store_true", help=text)
        elif isinstance(kind, tuple):
            group.add_argument(flag, choices=kind, default=getattr(d, attr), help=text)
        else:
            group.add_argument(flag, type=kind, default=getattr(d, attr), metavar=metavar,
                               help=text)


def sim_config_from_args(ns: argparse.Namespace) -> SimConfig:
    """Missing attributes fall back to defaults, so callers may add only some of the flags."""
    d = SimConfig()
    values = {attr: getattr(ns, _dest(flag), getattr(d, attr)) for flag, attr, *_ in _FLAGS}
    values["models"] = tuple(values["models"])
    return SimConfig(**values)
