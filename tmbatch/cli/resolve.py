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

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError, Settings, check_model
from tmbatch.base.config import resolve as resolve_connection
from tmbatch.base.defaults import DEFAULTS
from tmbatch.base.redact import SECRETS
from tmbatch.cli.common import connection_flags
from tmbatch.cli.fleet import resolve_fleet
from tmbatch.cli.jobfile import (
    ENV_COMPLETIONS,
    ENV_INDEX,
    Job,
    is_job_file,
    load_job,
    shard_from_env,
    share_limits,
)
from tmbatch.inputs.bodies import BodyTable
from tmbatch.inputs.routes import normalize_endpoint
from tmbatch.inputs.tables import table_kind
from tmbatch.inputs.templates import REQUESTS
from tmbatch.journal.store import is_remote
from tmbatch.run.config import Fleet, RunConfig, out_dir_of
from tmbatch.run.remote import ENV_WORK_DIR, work_dir_for
from tmbatch.spend.budget import BudgetSpec

log = logging.getLogger("tmbatch")

# The connection settings a job file may give (as strings: `base.config.resolve` parses them
# and reports their sources itself); the credentials never come from one (`jobfile`).
JOB_CONNECTION = ("surface", "base_url", "timeout", "max_retries", "ca_bundle")
PRECEDENCE = "flag > job file > environment > default"
ENV_CACHE = "TMBATCH_CACHE"


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
    output_url = _output_url(flags, job, shard, pick)
    out_dir = (_work_dir(output_url, env, pick) if output_url is not None
               else _out_dir(flags, job, input_path, shard, pick))
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
    records, table, input_path, endpoint = _staged(job, input_path, out_dir, source,
                                                   endpoint, pick)
    model, models, samples = _models(pick("models"), pick("samples"), model, records,
                                     output_url, pick)
    budget = BudgetSpec(tokens, usd, _prices(flags, job, pick))
    cache = _cache_path(flags, env, pick)
    fleet = resolve_fleet(pick, env, job.name if job else None, pick("job_id"))
    if fleet.redis:  # the whole job's budget, shared through Redis (the share: its fallback)
        fleet = _shared_budget(fleet, shard, pick)
    for key in ("restart", "quiet", "ordered", "sim"):
        pick.sources[key] = f"flag --{key}" if flags.get(key) else "default"
    pick.sources["preflight"] = "flag --no-preflight" if flags.get("no_preflight") else "default"
    config = RunConfig(
        input=input_path, out_dir=out_dir, endpoint=endpoint, model=model,
        stream=pick("stream", "--stream/--no-stream"), concurrency=pick("concurrency"),
        rpm=rpm, tpm=tpm, adaptive=pick("adaptive", "--adaptive/--no-adaptive"),
        limit_scope=pick("limit_scope"), patience=pick("patience"), fsync=pick("fsync"),
        restart=bool(flags.get("restart")), output_url=output_url,
        drain_timeout=pick("drain_timeout"),
        job_id=pick("job_id"), shard=shard, quiet=bool(flags.get("quiet")),
        progress_interval=pick("progress_interval"), max_line_bytes=pick("max_line_bytes"),
        budget=budget, fleet=fleet, connection=connection,
        preflight=not flags.get("no_preflight"),
        sim=bool(flags.get("sim")), ordered=bool(flags.get("ordered")), records=records,
        cache=cache, cache_mode=pick("cache_mode"), table=table, models=models, samples=samples,
        samples_via=pick("samples_via"),
        output_format=_output_format(pick("output_format")), sources=pick.sources,
    )
    return Resolved(config, job)


def _staged(job: Job | None, input_path: str, out_dir: Path, source: str,
            endpoint: str | None, pick: _Picker,
            ) -> tuple[str | None, BodyTable | None, str, str | None]:
    """Where the requests come from when the input is not them: a labelling job's records
    or a table's rows, both staged into OUTPUT/requests.jsonl, which becomes the input.
    Returns (records, table, the input path, the endpoint)."""
    if job is not None and job.label is not None:  # the run reads OUTPUT/requests.jsonl
        if pick("endpoint"):
            raise ConfigError(f"{job.path}: a labelling job builds its chat requests itself; "
                              "remove `endpoint` from the job file (and --endpoint)")
        pick.sources["records"] = source
        pick.sources["input"] = "the records rendered by the job file's [label] table"
        return input_path, None, str(out_dir / REQUESTS), endpoint
    body_column = pick("body_column")
    if table_kind(input_path) is not None or body_column is not None:
        table = _body_table(input_path, body_column, pick("id_column"), endpoint, job)
        pick.sources["table"] = source
        pick.sources["input"] = "the rows of the table (--body-column)"
        return None, table, str(out_dir / REQUESTS), None
    return None, None, input_path, endpoint


def _models(value: Any, samples: int | None, model: str | None, records: str | None,
            output_url: str | None, pick: _Picker) -> tuple[str | None, tuple[str, ...], int]:
    """--models A,B,C (a job file's list, or the same text) and --samples N, checked; and
    the model, which --models on the command line overrides when a job file names it."""
    if model and value and pick.sources["models"].startswith("flag") \
            and not pick.sources["model"].startswith("flag"):
        model = None
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",")]
    models = tuple(value or ())
    where = "--models" if pick.sources["models"].startswith("flag") else pick.sources["models"]
    if value is not None and (not models or any(not m for m in models)):
        raise ConfigError(f"{where}: an empty model name; give names separated by commas, "
                          "e.g. --models tm-small,tm-large")
    for m in models:
        problem = check_model(m, where)
        if problem:
            raise ConfigError(problem)
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ConfigError(f"{where}: {', '.join(twice)} given twice; each model once")
    if models and model:
        raise ConfigError("--model and --models: give one (--models sends every line to "
                          "each model, whatever it names; --model fills in a missing one)")
    samples = int(samples or DEFAULTS["samples"].value)
    if samples > 1 and records is not None:
        raise ConfigError("--samples does not run labelling jobs yet (one label per record "
                          "and model): --models does; for several labels per record, run the "
                          "job once per seed with -o")
    if (models or samples > 1) and output_url is not None:
        raise ConfigError(f"--models and --samples write one directory per model under -o; "
                          f"an output URL ({output_url}) takes one run: give a local -o, or run "
                          "once per model (--model, -o URL/MODEL/)")
    return model, models, samples


def _output_format(fmt: str) -> str:
    """A Parquet output needs pyarrow: said now, before anything is sent, not after the run."""
    if fmt == "parquet":
        from tmbatch.inputs.tables import require_pyarrow

        require_pyarrow()
    return fmt


def _body_table(path: str, body_column: str | None, id_column: str | None,
                endpoint: str | None, job: Job | None) -> BodyTable:
    """A Parquet or CSV input without a [label] table: its rows are request bodies."""
    if table_kind(path) is None:
        raise ConfigError(f"--body-column reads a Parquet or CSV table; {path} is neither "
                          "(.parquet, .pq or .csv)")
    if body_column is None:
        raise ConfigError(
            f"{path} is a table: give --body-column COLUMN (each row's request body, with "
            "--endpoint) or a job file with a [label] table (each row a record)")
    if endpoint is None:
        raise ConfigError(f"--body-column needs --endpoint (chat, completions, responses, ...): "
                          f"the route every row of {path} is sent to")
    if job is not None and job.label is not None:
        raise ConfigError(f"{job.path}: a labelling job renders its rows itself; drop "
                          "--body-column")
    return BodyTable(path, body_column, id_column, endpoint)


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


def _output_url(flags: Mapping[str, Any], job: Job | None, shard: tuple[int, int] | None,
                pick: _Picker) -> str | None:
    """-o (or the job file's `output`) when it names a bucket; a sharded job's gets
    /shard-I, as a directory does."""
    output = pick("output")
    if not is_remote(output):
        return None
    url = str(output).rstrip("/")
    if job is not None and shard is not None and flags.get("output") is None:
        url = f"{url}/shard-{shard[0]}"
        pick.note("output", f"/shard-{shard[0]} for shard {shard[0]}/{shard[1]}")
    return url


def _work_dir(url: str, env: Mapping[str, str], pick: _Picker) -> Path:
    """--work-dir > the job file's `work_dir` > TMBATCH_WORK_DIR (blank: unset) > the cache
    directory; a subdirectory keyed by the URL in any case."""
    root = pick("work_dir")
    if root is None and env.get(ENV_WORK_DIR, "").strip():
        root = env[ENV_WORK_DIR].strip()
        pick.sources["work_dir"] = f"env {ENV_WORK_DIR}"
    elif root is None:
        pick.sources["work_dir"] = "default (the user's cache directory)"
    elif not str(root).strip():
        raise ConfigError("--work-dir: an empty path; name a local directory")
    return work_dir_for(url, root)


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


def _shared_budget(fleet: Fleet, shard: tuple[int, int] | None, pick: _Picker) -> Fleet:
    """With --redis the shards share the whole budget; their 1/N share is what each keeps to
    while Redis does not answer (docs: Fleet, the budget)."""
    tokens, usd = pick("budget_tokens"), pick("budget_usd")
    if shard is not None and shard[1] > 1:
        for key, value in (("budget_tokens", tokens), ("budget_usd", usd)):
            if value is not None:
                pick.note(key, f"the whole job's, shared by its shards through Redis (1/"
                          f"{shard[1]} for shard {shard[0]}/{shard[1]} while Redis is down)")
    return dataclasses.replace(fleet, budget_tokens=tokens, budget_usd=usd)


def _cache_path(flags: Mapping[str, Any], env: Mapping[str, str], pick: _Picker) -> Path | None:
    """--cache > the job file's `cache` > TMBATCH_CACHE (blank: unset) > none."""
    value = pick("cache")
    if value is None and (env.get(ENV_CACHE) or "").strip():
        value = env[ENV_CACHE].strip()
        pick.sources["cache"] = f"env {ENV_CACHE}"
    if value is not None and not str(value).strip():
        raise ConfigError("--cache: an empty path; name the cache's SQLite file")
    return None if value is None else Path(value)


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
