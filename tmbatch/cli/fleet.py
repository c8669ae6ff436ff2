"""`run`'s fleet flags (many pods, one account): Prometheus metrics, the Pushgateway, Redis.

Apart from `run` and `resolve` because they are one feature with one page (docs: Fleet) and
two optional dependencies (the `fleet` extra), checked here, before anything is sent.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from tmbatch.base.config import ConfigError
from tmbatch.base.logs import public_url
from tmbatch.run.config import Fleet

ENV_REDIS = "TMBATCH_REDIS_URL"
EXTRA = "pip install 'tmbatch[fleet]'"
PREFIX_OK = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def port_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535; 0 picks a free one)")
    return v


def add_fleet_args(g: Any) -> None:
    g.add_argument("--metrics-port", type=port_arg, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics while the run "
                   "goes (0: a free port, logged); needs the fleet extra")
    g.add_argument("--pushgateway", metavar="URL", help="push the same metrics to this "
                   "Prometheus Pushgateway every 15 s and at exit, grouped by job and shard "
                   "(for CronJobs that end before a scrape)")
    g.add_argument("--redis", metavar="URL", help="share each lane's Retry-After pause, pace "
                   f"and the budget with every shard of the job through Redis (env {ENV_REDIS}"
                   "; redis://host:6379/0); Redis sees counters and times, never a prompt or "
                   "a key")
    g.add_argument("--redis-prefix", metavar="NAME", help="the job's name in Redis keys and "
                   "the Pushgateway's job label (default: the job file's name, else --job-id)")


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


def resolve_fleet(pick: Callable[..., Any], env: Mapping[str, str], job_name: str | None,
                  job_id: str | None) -> Fleet:
    """The fleet settings (flag > job file > environment), checked: the extra is installed,
    the URLs parse, the shards can agree on a job name."""
    port, gateway = pick("metrics_port"), pick("pushgateway")
    redis = pick("redis")
    sources = pick.sources  # type: ignore[attr-defined]
    if redis is None and env.get(ENV_REDIS):
        redis, sources["redis"] = env[ENV_REDIS], f"env {ENV_REDIS}"
    prefix = pick("redis_prefix")
    if prefix is not None and not PREFIX_OK.fullmatch(str(prefix)):
        raise ConfigError(f"--redis-prefix {prefix!r}: letters, digits and _ . : - only "
                          "(at most 100)")
    name = prefix or job_name or job_id
    if (port is not None or gateway) and _missing("prometheus_client"):
        raise ConfigError(f"--metrics-port and --pushgateway need prometheus_client: {EXTRA}")
    if gateway:
        _check_url(gateway, "--pushgateway", ("http", "https"))
    if redis:
        _check_url(redis, f"--redis (or {ENV_REDIS})", ("redis", "rediss", "unix"))
        if _missing("redis"):
            raise ConfigError(f"--redis needs redis-py: {EXTRA}")
        if name is None:
            raise ConfigError("--redis: the shards must share one job name for their Redis "
                              "keys: give --redis-prefix NAME, run a job file (its name), or "
                              "pin --job-id")
    return Fleet(metrics_port=port, pushgateway=gateway or None, redis=redis or None, job=name)


def _check_url(url: str, what: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in schemes and (parts.scheme == "unix" or bool(parts.hostname))
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{what} {public_url(url)!r} is not a URL: give "
                          f"{schemes[0]}://HOST:PORT")


def fleet_rows(fleet: Fleet, src: Callable[[str, str], str]) -> list[tuple[str, Any, str]]:
    """--print-config's rows; the Redis URL without its password."""
    return [("metrics_port", fleet.metrics_port, src("metrics_port", "")),
            ("pushgateway", fleet.pushgateway and public_url(fleet.pushgateway),
             src("pushgateway", "")),
            ("redis", fleet.redis and public_url(fleet.redis), src("redis", "")),
            ("redis_prefix", fleet.job, src("redis_prefix", ""))]
