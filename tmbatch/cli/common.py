"""What several subcommands share: argument types, the connection flags, the event loop."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tmbatch.base import defaults as D
from tmbatch.base.config import ConfigError, Settings, resolve
from tmbatch.base.redact import SECRETS
from tmbatch.inputs.lines import Shard
from tmbatch.spend.budget import BudgetSpec

log = logging.getLogger("tmbatch")


def subcommand(sub: Any, name: str, summary: str, description: str,
               **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser: `summary` in the command list, `description` atop its --help."""
    return sub.add_parser(name, help=summary, description=description, allow_abbrev=False,
                          **kwargs)


def run_async(coro: Any) -> Any:
    """Run on uvloop when it is installed (the `fast` extra): bench/ablate.py measured ~13 %
    less CPU per request. TMBATCH_LOOP=asyncio forces the standard loop."""
    choice = os.environ.get("TMBATCH_LOOP", "auto").strip().lower() or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"TMBATCH_LOOP={choice!r}: expected auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("TMBATCH_LOOP=uvloop but uvloop is not installed: "
                                  "pip install 'tmbatch[fast]'") from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return v


def shard_arg(text: str) -> Shard:
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "connection (flag > environment > default; ~/.config/tensormesh is read only with "
        "--tm-config)"
    )
    g.add_argument("--surface", choices=["serverless", "on-demand"],
                   help=f"inference surface (default: {D.SURFACE.value})")
    g.add_argument("--base-url", help="API base URL without /v1 (env "
                   "TENSORMESH_SERVERLESS_BASE_URL or TENSORMESH_ON_DEMAND_BASE_URL; serverless "
                   f"default {D.BASE_URL.value})")
    g.add_argument("--api-key-file", metavar="FILE", help="read the inference API key from FILE "
                   "(else env TENSORMESH_INFERENCE_API_KEY). There is deliberately no --api-key: "
                   "a key on the command line shows in `ps`")
    g.add_argument("--user-id", help="on-demand user UUID sent as X-User-Id "
                   "(env TENSORMESH_ON_DEMAND_USER_ID)")
    g.add_argument("--timeout", help="seconds per request (env TENSORMESH_TIMEOUT_SECONDS; "
                   f"default {D.TIMEOUT.value:g})")
    g.add_argument("--max-retries", help="retries per line of attempts that never reached "
                   "the server (not_sent; and ambiguous ones on /tokenize and /detokenize, "
                   "which bill nothing). A rate-limit refusal (429, 503 with Retry-After, 408) "
                   "is not counted: it is sent again until --patience (env "
                   f"TENSORMESH_MAX_RETRIES; default {D.MAX_RETRIES.value})")
    g.add_argument("--ca-bundle", help="PEM file of CAs to trust (env TENSORMESH_CA_BUNDLE)")
    g.add_argument("--tm-config", nargs="?", const="", metavar="PATH",
                   help="also read api key, user id and model from the tm CLI's config.toml "
                   "[managed] table (default $TM_CONFIG_HOME or ~/.config/tensormesh)")
    g.add_argument("--allow-insecure-http", action="store_true",
                   help="allow sending the key over plain http:// to a non-loopback host")


def connection_flags(flags: Mapping[str, Any]) -> dict[str, str | None]:
    """The connection flags (argparse dest -> value) as `base.config.resolve` takes them;
    None: not given."""
    return {
        "surface": flags.get("surface"), "base_url": flags.get("base_url"),
        "api_key_file": flags.get("api_key_file"), "user_id": flags.get("user_id"),
        "timeout": flags.get("timeout"), "max_retries": flags.get("max_retries"),
        "ca_bundle": flags.get("ca_bundle"), "tm_config": flags.get("tm_config"),
        "allow_insecure_http": "1" if flags.get("allow_insecure_http") else None,
    }


def settings_from(ns: argparse.Namespace, *, require_key: bool) -> Settings:
    """Resolve the connection settings, and make sure the key is scrubbed from every log."""
    settings = resolve(connection_flags(vars(ns)), os.environ, require_key=require_key)
    if settings.api_key:
        SECRETS.add(settings.api_key)
    return settings


def add_sim_group(p: argparse.ArgumentParser, help_text: str) -> None:
    if not getattr(p, "sim_flags", True):  # cli._QuickParser: the command line has no --sim*
        p.set_defaults(sim=False)  # (the --sim-* values are read only with --sim)
        return
    from tmbatch.sim import add_sim_arguments

    g = p.add_argument_group("demo: the built-in simulator (no credentials)")
    g.add_argument("--sim", action="store_true", help=f"{help_text}; the simulator's own "
                   "flags (--sim-latency, --sim-rate-limit, ...: `tmbatch sim --help` lists "
                   "them) apply to it too")
    add_sim_arguments(g, hidden=True)  # listed once, under `tmbatch sim`


async def on_sim_if_asked(ns: argparse.Namespace, settings: Settings,
                          then: Callable[[Settings], Awaitable[int]]) -> int:
    """`then(settings)`; with --sim, against the simulator started in-process for it (every
    --sim-* knob applies), so `run`, `doctor` and `models` try out the same way."""
    if not getattr(ns, "sim", False):
        return await then(settings)
    from tmbatch.sim import sim_config_from_args, start_sim

    config = sim_config_from_args(ns)
    server = await start_sim(config)
    try:
        settings = dataclasses.replace(
            settings, base_url=server.url, ca_bundle=None,
            sources={**settings.sources, "base_url": "--sim"},
        )
        needs = [what for what, wanted in (("the key given to --sim-api-key", config.api_key),
                                           ("the user id given to --sim-user-id",
                                            config.user_id)) if wanted]
        log.info("simulator on %s (%s)", server.url,
                 f"it requires {' and '.join(needs)}" if needs else "no credentials needed")
        return await then(settings)
    finally:
        await server.stop()


def add_price_args(g: Any) -> None:
    from tmbatch.spend.prices import price_flag

    g.add_argument("--prices", metavar="FILE", help="USD per million input/output tokens per "
                   "model, TOML or JSON (you supply them: tmbatch knows no prices); see the docs' "
                   "Cost and budgets page (docs/cost-and-budgets.md)")
    g.add_argument("--price", metavar="MODEL=IN:OUT", action="append", type=price_flag,
                   help="one model's price, USD per million input:output tokens "
                   "(IN:OUT:CACHED adds a cached-input price); repeatable, wins over --prices")


def add_budget_args(g: Any) -> None:
    g.add_argument("--budget-tokens", type=positive_int, default=None, metavar="N",
                   help="never let the job's billed tokens (prompt + completion, every run "
                   "counted) pass N: each request reserves its worst case first; at the budget "
                   "nothing more is sent and the run exits 6")
    g.add_argument("--budget-usd", type=positive_float, default=None, metavar="X",
                   help="the same in US dollars, at the prices given (--prices/--price): every "
                   "model sent needs one")
    add_price_args(g)


def budget_spec_from(ns: argparse.Namespace) -> BudgetSpec:
    """Limits and prices from the flags (and a job file's `budget_*` keys and `[prices]`)."""
    from tmbatch.spend.prices import resolve as resolve_prices

    prices = resolve_prices(getattr(ns, "prices", None), getattr(ns, "price", None),
                            getattr(ns, "job_prices", None), getattr(ns, "job_name", None))
    return BudgetSpec(getattr(ns, "budget_tokens", None), getattr(ns, "budget_usd", None),
                      prices)
