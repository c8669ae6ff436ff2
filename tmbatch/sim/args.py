"""Command-line flags of the simulator.

Shared by `tmbatch sim` and `tmbatch run --sim` so both describe the simulator the same way;
values are checked by argparse types so a bad flag is a usage error, not a traceback.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tmbatch.sim.config import LIMIT_SCOPES, REFUSE_STATUSES, RETRY_AFTER_FORMATS, SimConfig


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


def _schedule(text: str) -> tuple[tuple[float, float], ...]:
    """"15:20,30:40": from 15 s after the start 20 requests/s, from 30 s 40 again."""
    pairs = []
    for part in text.split(","):
        at, sep, rate = part.strip().partition(":")
        try:
            pairs.append((float(at), float(rate)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expects SECONDS:RPS[,SECONDS:RPS...], got {text!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expects SECONDS:RPS[,SECONDS:RPS...], got {text!r}")
    try:
        return SimConfig(rate_limit=1.0, rate_schedule=tuple(pairs)).rate_schedule
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("rate_schedule ")) from None


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


@dataclass(frozen=True)
class _Kind:
    """How a flag's value is read and shown: the parser and the metavar travel together, so the
    table below needs one line per flag."""

    parse: Callable[[str], Any]
    metavar: str


SECONDS = _Kind(_non_negative, "SECONDS")
DURATION = _Kind(_positive, "SECONDS")
RATE = _Kind(_positive, "RPS")
TOKENS = _Kind(_positive, "TOKENS")
COUNT = _Kind(_at_least_one, "N")
FRACTION = _Kind(_fraction, "FRACTION")
KEY = _Kind(_non_empty, "KEY")
UUID = _Kind(_non_empty, "UUID")
MODELS = _Kind(_models, "A,B")
SCHEDULE = _Kind(_schedule, "T:RPS,...")
SEED = _Kind(int, "N")
SWITCH = "switch"  # store_true
_Flag = _Kind | str | tuple[str, ...]  # a kind, SWITCH, or the choices

# flag -> (how it is read, help). One table drives both the parser and sim_config_from_args, so
# a knob cannot be added to one and forgotten in the other; the SimConfig field is the flag's
# name without "--sim-" (see _FIELD_OF for the one exception).
_FLAGS: dict[str, tuple[_Flag, str]] = {
    "--sim-latency": (SECONDS, "delay added before answering each POST request (default: 0)"),
    "--sim-jitter": (SECONDS, "uniform +- jitter on the latency (default: 0)"),
    "--sim-rate-limit": (RATE, "token bucket of RPS requests/second over all POST routes; "
                         "excess requests get 429 (default: no limit)"),
    "--sim-rate-burst": (COUNT, "capacity of that bucket, in requests (default: one "
                         "second's worth, at least 1)"),
    "--sim-rate-schedule": (SCHEDULE, "the bucket's rate changes over time, its burst stays: "
                            "15:20,30:40 is 20 RPS from 15 s after the start (or a reset), "
                            "40 from 30 s; needs --sim-rate-limit, the rate until then (or "
                            "--sim-window-limit: each window then admits RPS x its seconds)"),
    "--sim-window-limit": (COUNT, "instead of the bucket: a fixed window admitting N "
                           "requests per --sim-window-seconds, LiteLLM-style (default: none)"),
    "--sim-window-seconds": (DURATION, "length of that window, counted from the start "
                             "(default: 60)"),
    "--sim-window-start": (SECONDS, "seconds into its first window the server starts, as a "
                           "per-minute key counts from the clock's minute (default: 0)"),
    "--sim-tpm-limit": (TOKENS, "tokens per minute: admitted while the budget is above zero, "
                        "charged each answer's usage.total_tokens (default: no limit)"),
    "--sim-tpm-burst": (TOKENS, "capacity of the tokens budget (default: one second's worth)"),
    "--sim-limit-scope": (LIMIT_SCOPES, "whom the requests and tokens limits count: the whole "
                          "account, or each model on its own with its own headers and "
                          "Retry-After windows (default: account)"),
    "--sim-capacity": (COUNT, "at most N billable requests processed at once; the others "
                       "queue in arrival order instead of getting 429 (vLLM --max-num-seqs)"),
    "--sim-retry-after": (SECONDS, "fixed pause announced by every 429 (default: the real wait, "
                          "rounded up to whole seconds and at least 1 s; to the ms for ms; "
                          "1 s for refusals at random)"),
    "--sim-retry-after-format": (RETRY_AFTER_FORMATS, "how 429s announce the pause: "
                                 "Retry-After in seconds or as an HTTP date, only "
                                 "retry-after-ms, only llm_provider-retry-after (LiteLLM), or "
                                 "no header (default: seconds)"),
    "--sim-refuse-fraction": (FRACTION, "fraction of billable requests refused at random "
                              "(overload), before the limits and costing none of them; "
                              "announced like a rate limit's 429 (default: 0)"),
    "--sim-refuse-status": (REFUSE_STATUSES, "status of those refusals: 429 (an overloaded "
                            "provider) or 503 (a flaky gateway) (default: 429)"),
    "--sim-ratelimit-headers": (SWITCH, "send x-ratelimit-limit/remaining/reset-requests "
                                "(and -tokens) headers on every POST answer"),
    "--sim-ratelimit-stated-burst": (COUNT, "those headers state a bucket of N requests at "
                                     "the --sim-rate-limit rate, while the one enforced "
                                     "holds --sim-rate-burst: a limit enforced over shorter "
                                     "spans than it states (default: the one enforced)"),
    "--sim-error-500": (FRACTION, "fraction of billable requests processed and then answered 500"),
    "--sim-drop-after-read": (FRACTION, "fraction of billable requests processed and then "
                              "disconnected without an answer"),
    "--sim-slow": (FRACTION, "fraction of billable requests answered only after "
                   "--sim-slow-seconds"),
    "--sim-slow-seconds": (SECONDS, "extra delay of slow requests (default: 30)"),
    "--sim-api-key": (KEY, "require 'Authorization: Bearer KEY' (default: accept anything)"),
    "--sim-user-id": (UUID, "on-demand mode: require 'X-User-Id: UUID' on every route"),
    "--sim-models": (MODELS, "served model names (default: tm-small,tm-large)"),
    "--sim-stream-chunks": (COUNT, "content deltas per streamed answer (default: 8)"),
    "--sim-seed": (SEED, "seed of the simulated faults and jitter (default: 0)"),
    "--sim-grace": (SECONDS, "arrivals this soon after a 429 left are not counted inside "
                    "its Retry-After window: requests that crossed it on the wire "
                    "(default: 0.01)"),
}
_FIELD_OF = {"--sim-jitter": "latency_jitter"}
# Two limits of requests would give x-ratelimit-*-requests two meanings: one or the other.
_EXCLUSIVE = ("--sim-rate-limit", "--sim-window-limit")


def _field(flag: str) -> str:
    return _FIELD_OF.get(flag) or flag.removeprefix("--sim-").replace("-", "_")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_sim_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                      hidden: bool = False) -> None:
    """Shared by `tmbatch sim` and `tmbatch run --sim` so both describe the simulator the same.
    Given a group, the flags join it: nesting argument groups is deprecated in argparse.
    `hidden`: accepted but left out of --help (run, doctor and models: their help is about
    them, the knobs are listed once, by `tmbatch sim --help`)."""
    d = SimConfig()
    group = (
        parser.add_argument_group("simulator")
        if isinstance(parser, argparse.ArgumentParser)
        else parser
    )
    exclusive = group.add_mutually_exclusive_group()
    for flag, (kind, shown) in _FLAGS.items():
        where = exclusive if flag in _EXCLUSIVE else group
        text = argparse.SUPPRESS if hidden else shown
        if kind == SWITCH:
            where.add_argument(flag, action="store_true", help=text)
        elif isinstance(kind, tuple):  # the choices, read as the type they are written in
            where.add_argument(flag, choices=kind, type=type(kind[0]),
                               default=getattr(d, _field(flag)), help=text)
        else:
            assert isinstance(kind, _Kind)
            where.add_argument(flag, type=kind.parse, default=getattr(d, _field(flag)),
                               metavar=kind.metavar, help=text)


def sim_config_from_args(ns: argparse.Namespace) -> SimConfig:
    """Missing attributes fall back to defaults, so callers may add only some of the flags.

    Each value was checked by argparse; flags that do not combine (a rate schedule without a
    rate) raise ValueError naming the flags, which the CLI reports as a usage error."""
    d = SimConfig()
    values = {_field(f): getattr(ns, _dest(f), getattr(d, _field(f))) for f in _FLAGS}
    values["models"] = tuple(values["models"])
    try:
        return SimConfig(**values)
    except ValueError as exc:
        message = str(exc)
        for flag in _FLAGS:
            message = re.sub(rf"\b{_field(flag)}\b", flag, message)
        raise ValueError(message) from None
