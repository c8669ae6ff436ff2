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


def add_sim_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Shared by `tmbatch sim` and `tmbatch run --sim` so both describe the simulator the same.
    Given a group, the flags join it: nesting argument groups is deprecated in argparse."""
    d = SimConfig()
    group = (
        parser.add_argument_group("simulator")
        if isinstance(parser, argparse.ArgumentParser)
        else parser
    )
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
