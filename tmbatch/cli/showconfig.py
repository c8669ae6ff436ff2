"""`tmbatch run --print-config` and `tmbatch validate JOB.toml`: a resolved `RunConfig` shown
setting by setting, with where each value came from.

Apart from the resolver so that showing a config can change (a new row, a JSON field) without
touching how one is built; the API key and the user id are shown as set or unset, never.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import orjson

from tmbatch.cli.fleet import fleet_rows
from tmbatch.cli.resolve import PRECEDENCE
from tmbatch.run.config import RunConfig

Row = tuple[str, Any, str]  # setting, value (JSON-able; never a secret), source


def config_rows(config: RunConfig) -> list[Row]:
    """Every setting of `config`, its value and where it came from, in the order of
    `tmbatch run --help`. The API key and the user id are shown as set or unset, never."""
    src = config.sources.get
    rows: list[Row] = []
    if config.records is not None:
        rows.append(("input", config.records, src("records", "")))
        rows.append(("requests", config.input, src("input", "")))
    elif config.table is not None:
        t = config.table
        rows.append(("input", t.path, src("table", "")))
        rows.append(("requests", config.input, src("input", "")))
        rows.append(("body_column", t.body_column, src("body_column", "")))
        rows.append(("id_column", t.id_column, src("id_column", "")))
        rows.append(("table_endpoint", t.route, src("endpoint", "")))
    else:
        rows.append(("input", config.input, src("input", "")))
    if config.output_url is not None:  # a bucket: its working directory beside it
        rows.append(("output", config.output_url, src("output", "")))
        rows.append(("work_dir", str(config.out_dir), src("work_dir", "")))
    else:
        rows.append(("output", str(config.out_dir), src("output", "")))
    for key in ("endpoint", "model", "stream"):
        rows.append((key, getattr(config, key), src(key, "")))
    rows.append(("models", list(config.models) or None, src("models", "")))
    rows.append(("samples", config.samples, src("samples", "")))
    rows.append(("samples_via", config.samples_via, src("samples_via", "")))
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
    rows.append(("cache", None if config.cache is None else str(config.cache),
                 src("cache", "")))
    rows.append(("cache_mode", config.cache_mode, src("cache_mode", "")))
    for key in ("fsync", "drain_timeout", "max_line_bytes", "restart", "job_id",
                "progress_interval", "quiet", "ordered", "output_format", "preflight"):
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
