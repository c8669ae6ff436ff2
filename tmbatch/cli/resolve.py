"""One resolver: flags, a job file, the environment and the defaults become one frozen RunConfig.

Precedence is flag > job file > environment > default (README: Declared jobs): the file
describes *this* job, the environment the machine it happens to run on. The defaults are
`base.defaults`' table and nothing else; the parsers leave every such flag None so that "not
given" can be told from "given the default". The flags are read from a copy: neither the
argparse namespace nor the config changes after this (the config is frozen; what the run
learns later is `run.config.Learnt`).

Every value keeps where it came from, for `tmbatch run --print-config` and `tmbatch validate
JOB.toml`: `flag --rpm`, `job file rpm at jobs/x.toml`, `env TENSORMESH_TIMEOUT_SECONDS`,
`default`, with what was made of it after (a shard's share).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import ConfigError, Settings, check_model
from tmbatch.base.config import resolve as resolve_connection
from tmbatch.base.defaults import DEFAULTS
from tmbatch.base.redact import SECRETS
from tmbatch.cli.common import connection_flags
from tmbatch.cli.fleet import fleet_rows, resolve_fleet
from tmbatch.cli.jobfile import (
    ENV_COMPLETIONS,
    ENV_INDEX,
    Job,
    is_job_file,
    load_job,
    shard_from_env,
    share_limits,
)
from tmbatch.inputs.routes import normalize_endpoint
from tmbatch.run.config import RunConfig, out_dir_of
from tmbatch.spend.budget import BudgetSpec

log = logging.getLogger("tmbatch")

# The connection settings a job file may give (as strings: `base.config.resolve` parses them
# and reports their sources itself); the credentials never come from one (`jobfile`).
JOB_CONNECTION = ("surface", "base_url", "timeout", "max_retries", "ca_bundle")
PRECEDENCE = "flag > job file > environment > default"


@dataclass(frozen=True)
class Resolved:
    """A run's config, and the job file it came from (its [label] table is the labels')."""

    config: RunConfig
    job: Job | None


class _Picker:
    """flag > job file > default, remembering each value's source."""

    def __init__(self, flags: Mapping[str, Any], job: Job | None) -> None:
        self.flags, self.job = flags, job
        self.sources: dict[str, str] = {}

    def job_source(self, key: str) -> str | None:
        if self.job is not None and key in self.job.values:
            return f"job file {key} at {self.job.path}"
        return None

    def __call__(self, key: str, flag: str | None = None) -> Any:
        value = self.flags.get(key)
        if value is not None:
            self.sources[key] = f"flag {flag or '--' + key.replace('_', '-')}"
            return value
        source = self.job_source(key)
        if source is not None:
            self.sources[key] = source
            return self.job.values[key]  # type: ignore[union-attr]
        self.sources[key] = "default"
        default = DEFAULTS.get(key)
        return None if default is None else default.value

    def note(self, key: str, how: str) -> None:
        """What was made of a value after it was picked (a shard's share)."""
        self.sources[key] += f", {how}"


def resolve_run(flags: Mapping[str, Any], env: Mapping[str, str], *, require_key: bool,
                job: Job | None = None) -> Resolved:
    """The one place a run's settings are decided. `flags`: argparse dest -> value, None (or
    absent) when not given; `env`: the environment; `job`: the job file INPUT names, when the
    caller has loaded it already. Raises ConfigError (or ValueError) naming the flag, the job
    file's key or the variable, before anything is sent or written."""
    flags = dict(flags)  # a copy: the caller's namespace is never changed
    if job is None and is_job_file(str(flags["input"])):
        job = load_job(str(flags["input"]))
    pick = _Picker(flags, job)
    if job is not None:
        source, input_path = f"job file input at {job.path}", str(job.values["input"])
    else:
        source, input_path = "argument INPUT", str(flags["input"])
    pick.sources["input"] = source
    shard = _shard(flags, env, pick)
    out_dir = _out_dir(flags, job, input_path, shard, pick)
    rpm, tpm = _limits(pick("rpm"), pick("tpm"), shard, pick)
    tokens, usd = _budget_share(pick("budget_tokens"), pick("budget_usd"), shard, pick)
    connection = _connection(flags, job, env, require_key)
    endpoint_arg = pick("endpoint")
    endpoint = normalize_endpoint(endpoint_arg) if endpoint_arg else None
    model = pick("model")
    if model and pick.sources["model"].startswith("flag"):  # a job file's was checked at load
        problem = check_model(model, "--model")
        if problem:
            raise ConfigError(problem)
    records = None
    if job is not None and job.label is not None:  # the run reads OUTPUT/requests.jsonl
        if endpoint_arg:
            raise ConfigError(f"{job.path}: a labelling job builds its chat requests itself; "
                              "remove `endpoint` from the job file (and --endpoint)")
        from tmbatch.inputs.templates import REQUESTS

        records, input_path = input_path, str(out_dir / REQUESTS)
        pick.sources["records"] = source
        pick.sources["input"] = "the records rendered by the job file's [label] table"
    budget = BudgetSpec(tokens, usd, _prices(flags, job, pick))
    fleet = resolve_fleet(pick, env, job.name if job else None, pick("job_id"))
    for key in ("restart", "quiet", "ordered", "sim"):
        pick.sources[key] = f"flag --{key}" if flags.get(key) else "default"
    pick.sources["preflight"] = "flag --no-preflight" if flags.get("no_preflight") else "default"
    config = RunConfig(
        input=input_path, out_dir=out_dir, endpoint=endpoint, model=model,
        stream=pick("stream", "--stream/--no-stream"), concurrency=pick("concurrency"),
        rpm=rpm, tpm=tpm, adaptive=pick("adaptive", "--adaptive/--no-adaptive"),
        limit_scope=pick("limit_scope"), patience=pick("patience"), fsync=pick("fsync"),
        restart=bool(flags.get("restart")), drain_timeout=pick("drain_timeout"),
        job_id=pick("job_id"), shard=shard, quiet=bool(flags.get("quiet")),
        progress_interval=pick("progress_interval"), max_line_bytes=pick("max_line_bytes"),
        budget=budget, fleet=fleet, connection=connection,
        preflight=not flags.get("no_preflight"),
        sim=bool(flags.get("sim")), ordered=bool(flags.get("ordered")), records=records,
        sources=pick.sources,
    )
    return Resolved(config, job)


def _shard(flags: Mapping[str, Any], env: Mapping[str, str],
           pick: _Picker) -> tuple[int, int] | None:
    """--shard, else a Kubernetes Indexed Job's pod (`jobfile.shard_from_env`)."""
    if flags.get("shard") is not None:
        pick.sources["shard"] = "flag --shard"
        return tuple(flags["shard"])  # type: ignore[return-value]
    shard = shard_from_env(env)
    if shard is None:
        pick.sources["shard"] = "default"
        return None
    pick.sources["shard"] = f"env {ENV_INDEX}/{ENV_COMPLETIONS}"
    log.info("shard %d/%d from %s/%s", shard[0], shard[1], ENV_INDEX, ENV_COMPLETIONS)
    return shard


def _out_dir(flags: Mapping[str, Any], job: Job | None, input_path: str,
             shard: tuple[int, int] | None, pick: _Picker) -> Path:
    """-o, the job file's `output`, or INPUT's (the job's) name + .out; a sharded job whose
    output is the file's gets OUTPUT/shard-I: N pods must not share one directory (each would
    refuse the other's journal)."""
    output = pick("output")
    if output is not None:
        out = out_dir_of(input_path, output)
    elif job is not None:  # like `run x.jsonl` -> x.out, named after the job
        out = Path(f"{job.name}.out")
        pick.sources["output"] = "default (the job file's name + .out)"
    else:
        out = out_dir_of(input_path, None)
        pick.sources["output"] = "default (INPUT's name + .out)"
    if job is not None and shard is not None and flags.get("output") is None:
        out = out / f"shard-{shard[0]}"
        pick.note("output", f"/shard-{shard[0]} for shard {shard[0]}/{shard[1]}")
    return out


def _limits(rpm: float | None, tpm: float | None, shard: tuple[int, int] | None,
            pick: _Picker) -> tuple[float | None, float | None]:
    """--rpm/--tpm are the account's limits: N shards sending at once split them."""
    if shard is None or shard[1] <= 1 or not (rpm or tpm):
        return rpm, tpm
    shared = share_limits(rpm, tpm, shard)
    log.info("shard %d/%d takes 1/%d of the account's limits: rpm %s, tpm %s",
             shard[0], shard[1], shard[1], _fmt(shared[0]), _fmt(shared[1]))
    for key, value in (("rpm", rpm), ("tpm", tpm)):
        if value:
            pick.note(key, f"1/{shard[1]} for shard {shard[0]}/{shard[1]}")
    return shared


def _budget_share(tokens: int | None, usd: float | None, shard: tuple[int, int] | None,
                  pick: _Picker) -> tuple[int | None, float | None]:
    """--budget-tokens/--budget-usd are the whole job's: N shards spending at once split them
    (a shard that stops at its share leaves its lines pending for a rerun)."""
    if shard is None or shard[1] <= 1 or (tokens is None and usd is None):
        return tokens, usd
    i, n = shard
    if tokens is not None:
        tokens = max(1, tokens // n)
        pick.note("budget_tokens", f"1/{n} for shard {i}/{n}")
    if usd is not None:
        usd = usd / n
        pick.note("budget_usd", f"1/{n} for shard {i}/{n}")
    log.info("shard %d/%d takes 1/%d of the job's budget: %s tokens, %s USD", i, n, n,
             _fmt(tokens), _fmt(usd))
    return tokens, usd


def _prices(flags: Mapping[str, Any], job: Job | None, pick: _Picker) -> Any:
    """--price > --prices > the job file's [prices], model by model (`spend.prices`)."""
    from tmbatch.spend.prices import resolve as resolve_prices

    prices = resolve_prices(flags.get("prices"), flags.get("price"),
                            job.values.get("job_prices") if job is not None else None,
                            job.path.name if job is not None else None)
    pick.sources["prices"] = ", ".join(prices.sources) or "default"
    return prices


def _connection(flags: Mapping[str, Any], job: Job | None, env: Mapping[str, str],
                require_key: bool) -> Settings:
    """Key, URL and the rest: flag > job file > environment > default, as `base.config`
    resolves them, with a job file's values named as such in the sources."""
    given = connection_flags(flags)
    origins: dict[str, str] = {}
    if job is not None:
        for key in JOB_CONNECTION:
            if given[key] is None and key in job.values:
                given[key] = job.values[key]
                origins[key] = f"job file {key} at {job.path}"
    settings = resolve_connection(given, env, require_key=require_key, origins=origins)
    if settings.api_key:
        SECRETS.add(settings.api_key)  # scrubbed from every log line and file from now on
    return settings


def _fmt(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g}"


# -- showing it --------------------------------------------------------------------------

Row = tuple[str, Any, str]  # setting, value (JSON-able; never a secret), source


def config_rows(config: RunConfig) -> list[Row]:
    """Every setting of `config`, its value and where it came from, in the order of
    `tmbatch run --help`. The API key and the user id are shown as set or unset, never."""
    src = config.sources.get
    rows: list[Row] = []
    if config.records is not None:
        rows.append(("input", config.records, src("records", "")))
        rows.append(("requests", config.input, src("input", "")))
    else:
        rows.append(("input", config.input, src("input", "")))
    rows.append(("output", str(config.out_dir), src("output", "")))
    for key in ("endpoint", "model", "stream"):
        rows.append((key, getattr(config, key), src(key, "")))
    shard = config.shard
    rows.append(("shard", f"{shard[0]}/{shard[1]}" if shard else None, src("shard", "")))
    for key in ("concurrency", "rpm", "tpm"):
        rows.append((key, getattr(config, key), src(key, "")))
    adaptive_source = src("adaptive", "")
    if adaptive_source == "default":
        adaptive_source = "default (on without --rpm)" if config.rpm is None \
            else "default (off: --rpm given)"
    rows.append(("adaptive", config.is_adaptive, adaptive_source))
    for key in ("limit_scope", "patience"):
        rows.append((key, getattr(config, key), src(key, "")))
    rows.append(("budget_tokens", config.budget.tokens, src("budget_tokens", "")))
    rows.append(("budget_usd", config.budget.usd, src("budget_usd", "")))
    models = sorted(config.budget.prices.table)
    rows.append(("prices", ", ".join(models) if models else None, src("prices", "")))
    for key in ("fsync", "drain_timeout", "max_line_bytes", "restart", "job_id",
                "progress_interval", "quiet", "ordered", "preflight"):
        rows.append((key, getattr(config, key), src(key, "")))
    rows += fleet_rows(config.fleet, src)
    rows += _connection_rows(config)
    return rows


def _connection_rows(config: RunConfig) -> list[Row]:
    s = config.connection
    if s is None:
        return []
    src = s.sources.get
    rows: list[Row] = [("surface", s.surface, src("surface", ""))]
    if config.sim:
        rows.append(("base_url", "the simulator on 127.0.0.1 (its port chosen at start)",
                     "flag --sim"))
    else:
        rows.append(("base_url", s.base_url, src("base_url", "")))
    key_source = src("api_key", "")
    if not s.api_key and not config.sim:
        key_source += " (a run needs one: TENSORMESH_INFERENCE_API_KEY or --api-key-file)"
    rows.append(("api_key", "set" if s.api_key else "unset", key_source))
    if s.surface == "on-demand":
        rows.append(("user_id", "set" if s.user_id else "unset", src("user_id", "")))
    rows += [("timeout", s.timeout, src("timeout", "")),
             ("max_retries", s.max_retries, src("max_retries", "")),
             ("ca_bundle", s.ca_bundle, src("ca_bundle", "")),
             ("allow_insecure_http", s.allow_insecure_http,
              "flag --allow-insecure-http" if s.allow_insecure_http else "default")]
    return rows


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_json(config: RunConfig) -> dict[str, dict[str, Any]]:
    """setting -> {"value", "source"}, as `--print-config` with --log-format json shows it."""
    return {k: {"value": v, "source": s} for k, v, s in config_rows(config)}


def print_config(config: RunConfig, *, as_json: bool = False,
                 write: Callable[[str], Any] | None = None) -> None:
    """`--print-config`: the settings, values and sources on stdout (one JSON object with
    `as_json`)."""
    out = write or sys.stdout.write
    if as_json:
        out(orjson.dumps({"config": config_json(config), "precedence": PRECEDENCE}).decode()
            + "\n")
        return
    rows = config_rows(config)
    width = max(len(k) for k, _, _ in rows)
    shown = [(k, _shown(v), s) for k, v, s in rows]
    vwidth = min(48, max(len(v) for _, v, _ in shown))
    lines = [f"resolved configuration ({PRECEDENCE}):"]
    lines += [f"  {k:<{width}}  {v:<{vwidth}}  {s}" for k, v, s in shown]
    out("\n".join(lines) + "\n")
