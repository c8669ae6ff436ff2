"""Declared jobs: a TOML file that is a `tmbatch run` command line written down.

A job file is committed to a repository, mounted from a Kubernetes ConfigMap and
printed in logs, so it must never hold a credential: keys that look like one are
refused with a pointer to the environment. Precedence is flag > job file >
environment > default, because the file describes *this* job while the
environment describes the machine it happens to run on; `cli.resolve` applies it
(this module reads and checks the file, and changes nothing it is given).

Relative paths in the file resolve against the file's own directory, not the
current directory: a job then means the same thing whoever starts it from
wherever (cron, a shell, a pod whose workdir is /work). In Kubernetes the file
sits on a read-only ConfigMap mount, so give data and output paths there as
absolute paths on the volume (/data/...).
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError, check_model
from tmbatch.base.files import os_problem
from tmbatch.base.tomlcheck import TableChecker, unknown_key
from tmbatch.inputs.routes import normalize_endpoint
from tmbatch.inputs.samples import VIA
from tmbatch.journal.cache import MODES as CACHE_MODES
from tmbatch.limits import SCOPES
from tmbatch.spend.prices import parse_table

log = logging.getLogger("tmbatch")

ENV_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
ENV_COMPLETIONS = "JOB_COMPLETIONS"  # NOT set by Kubernetes: the manifest passes spec.completions

SECRET_PARTS = {"key", "token", "secret", "password", "passwd", "credential", "credentials",
                "auth", "authorization", "bearer"}
LABEL_TABLE = "label"
PRICES_TABLE = "prices"  # model -> {input, output, cached_input}: model names are data


def _endpoint(c: TableChecker, key: str, value: Any) -> str:
    text = c.string(key, value)
    try:
        normalize_endpoint(text)
    except ValueError as exc:
        raise ConfigError(f"{c.path}: key `{key}`: {exc}") from None
    return text


def _model(c: TableChecker, key: str, value: Any) -> str:
    text = c.string(key, value)
    problem = check_model(text, f"{c.path}: key `{key}`")
    if problem:
        raise ConfigError(problem)
    return text


def _models(c: TableChecker, key: str, value: Any) -> list[str]:
    """`models = ["a", "org/b"]` (or "a,org/b"): every line to each, checked as `model` is."""
    if isinstance(value, str):
        value = value.split(",")
    return [_model(c, key, m) for m in c.string_list(key, value)]


# key -> (argparse dest, how to check it). Connection settings are strings in the
# namespace because config.resolve parses them (and reports sources) itself.
Spec = Callable[[TableChecker, str, Any], Any]
TOP_KEYS: dict[str, tuple[str | None, Spec]] = {
    "description": (None, lambda c, k, v: c.string(k, v)),
    "input": ("input", lambda c, k, v: c.path_value(k, v)),
    "output": ("output", lambda c, k, v: c.path_value(k, v)),
    "endpoint": ("endpoint", _endpoint),
    "model": ("model", _model),
    "models": ("models", _models),
    "samples": ("samples", lambda c, k, v: c.pos_int(k, v)),
    "samples_via": ("samples_via", lambda c, k, v: c.choice(k, v, VIA)),
    "body_column": ("body_column", lambda c, k, v: c.string(k, v)),
    "id_column": ("id_column", lambda c, k, v: c.string(k, v)),
    "output_format": ("output_format",
                      lambda c, k, v: c.choice(k, v, ("jsonl", "parquet", "csv"))),
    "stream": ("stream", lambda c, k, v: c.boolean(k, v)),
    "surface": ("surface", lambda c, k, v: c.choice(k, v, ("serverless", "on-demand"))),
    "base_url": ("base_url", lambda c, k, v: c.string(k, v)),
    "timeout": ("timeout", lambda c, k, v: repr(c.pos_number(k, v))),
    "max_retries": ("max_retries", lambda c, k, v: str(c.nonneg_int(k, v))),
    "ca_bundle": ("ca_bundle", lambda c, k, v: c.path_value(k, v)),
    "concurrency": ("concurrency", lambda c, k, v: c.pos_int(k, v)),
    "rpm": ("rpm", lambda c, k, v: c.pos_number(k, v)),
    "tpm": ("tpm", lambda c, k, v: c.pos_number(k, v)),
    "adaptive": ("adaptive", lambda c, k, v: c.boolean(k, v)),
    "patience": ("patience", lambda c, k, v: c.pos_number(k, v)),
    "limit_scope": ("limit_scope", lambda c, k, v: c.choice(k, v, SCOPES)),
    "fsync": ("fsync", lambda c, k, v: c.choice(k, v, ("always", "interval", "never"))),
    "drain_timeout": ("drain_timeout", lambda c, k, v: c.pos_number(k, v)),
    "max_line_bytes": ("max_line_bytes", lambda c, k, v: c.pos_int(k, v)),
    "job_id": ("job_id", lambda c, k, v: c.string(k, v)),
    "cache": ("cache", lambda c, k, v: c.path_value(k, v)),
    "work_dir": ("work_dir", lambda c, k, v: c.path_value(k, v)),
    "cache_mode": ("cache_mode", lambda c, k, v: c.choice(k, v, CACHE_MODES)),
    "metrics_port": ("metrics_port", lambda c, k, v: c.nonneg_int(k, v)),
    "pushgateway": ("pushgateway", lambda c, k, v: c.string(k, v)),
    "redis": ("redis", lambda c, k, v: c.string(k, v)),
    "redis_prefix": ("redis_prefix", lambda c, k, v: c.string(k, v)),
    "budget_tokens": ("budget_tokens", lambda c, k, v: c.pos_int(k, v)),
    "budget_usd": ("budget_usd", lambda c, k, v: c.pos_number(k, v)),
    PRICES_TABLE: ("job_prices", lambda c, k, v: parse_table(c.path, c.table(k, v), f"{k}.")),
}
CREDENTIAL_KEYS = {"user_id", "api_key_file", "tm_config"}


@dataclass(frozen=True)
class Job:
    """A loaded job file: values for `run`'s flags plus the optional labelling table."""

    path: Path
    name: str
    values: dict[str, Any]  # argparse dest -> value
    label: dict[str, Any] | None  # raw [label] table; tmbatch.tools.labels checks it


def secret_problem(path: Path, key: str) -> str | None:
    """Names like api_key, token, auth_secret are refused before their value is ever shown."""
    parts = set(key.lower().replace("-", "_").split("_"))
    if parts & SECRET_PARTS:
        return (f"{path}: key `{key}` looks like a credential; a job file never holds one (it is "
                "committed, mounted from a ConfigMap, printed in logs): set "
                "TENSORMESH_INFERENCE_API_KEY in the environment (in Kubernetes from a Secret via "
                "secretKeyRef) or pass --api-key-file on the command line")
    if key in CREDENTIAL_KEYS:
        return (f"{path}: key `{key}` is a credential setting; give it in the environment "
                "(TENSORMESH_ON_DEMAND_USER_ID for the user id) or as a command-line flag, "
                "never in the job file")
    return None


def check_secret_keys(path: Path, table: Mapping[str, Any], skip: tuple[str, ...] = ()) -> None:
    for key, value in table.items():
        problem = secret_problem(path, key)
        if problem:
            raise ConfigError(problem)
        if isinstance(value, dict) and key not in skip:
            check_secret_keys(path, value)


def load_job(path_text: str) -> Job:
    """Read and check a job file; every problem is one ConfigError naming the file and key."""
    path = Path(path_text)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {os_problem(exc)}; give a job .toml file") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    # Secrets first, and anywhere but inside a JSON schema (whose property names are data).
    check_secret_keys(path, {k: v for k, v in data.items()
                             if k not in (LABEL_TABLE, PRICES_TABLE)})
    if isinstance(data.get(LABEL_TABLE), dict):
        check_secret_keys(path, data[LABEL_TABLE], skip=("schema",))
    checker = TableChecker(path)
    values: dict[str, Any] = {}
    label: dict[str, Any] | None = None
    for key, value in data.items():
        if key == LABEL_TABLE:
            label = checker.table(key, value)
            continue
        if key not in TOP_KEYS:
            raise unknown_key(path, key, [*TOP_KEYS, LABEL_TABLE])
        dest, check = TOP_KEYS[key]
        checked = check(checker, key, value)
        if dest is not None:
            values[dest] = checked
    if label is not None:
        from tmbatch.inputs.templates import (
            load_spec,  # checked now, so no mistake waits for the run
        )

        load_spec(path, label)
    if "input" not in values:
        raise ConfigError(f"{path}: key `input` is missing; name the JSONL file to read, e.g. "
                          'input = "data.jsonl" (relative to the job file\'s directory)')
    return Job(path=path, name=path.stem, values=values, label=label)


def is_job_file(input_arg: str) -> bool:
    return input_arg.lower().endswith(".toml")


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    """The shard of a pod in a Kubernetes Indexed Job.

    Kubernetes sets JOB_COMPLETION_INDEX in every pod of an Indexed Job but not
    the number of completions, so the manifest passes spec.completions as
    JOB_COMPLETIONS. Guessing N would silently skip or double lines, so an index
    without a count is an error.
    """
    index_text = (env.get(ENV_INDEX) or "").strip()
    if not index_text:
        return None
    count_text = (env.get(ENV_COMPLETIONS) or "").strip()
    if not count_text:
        raise ConfigError(
            f"{ENV_INDEX}={index_text} is set (a Kubernetes Indexed Job) but {ENV_COMPLETIONS} "
            "is not: Kubernetes does not set it; add `- name: JOB_COMPLETIONS, value: \"N\"` "
            "with N = spec.completions to the container's env, or pass --shard I/N "
            "(--shard 0/1 takes every line)"
        )
    if not index_text.isdigit() or not count_text.isdigit():
        raise ConfigError(f"{ENV_INDEX}={index_text!r} and {ENV_COMPLETIONS}={count_text!r} must "
                          "be non-negative integers")
    index, count = int(index_text), int(count_text)
    if count < 1 or index >= count:
        raise ConfigError(f"{ENV_INDEX}={index} must be below {ENV_COMPLETIONS}={count} (the "
                          "Job's spec.completions)")
    return index, count


def share_limits(
    rpm: float | None, tpm: float | None, shard: tuple[int, int] | None
) -> tuple[float | None, float | None]:
    """--rpm/--tpm are the account's limits; N pods sending at once must split them."""
    if shard is None or shard[1] == 1:
        return rpm, tpm
    n = shard[1]
    return (rpm / n if rpm else rpm), (tpm / n if tpm else tpm)
