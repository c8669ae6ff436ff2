"""`tmbatch validate`: read an input as `run` would, send nothing, list every bad line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.logs import add_log_format_arg
from tmbatch.cli.common import subcommand
from tmbatch.cli.jobfile import Job, is_job_file, load_job
from tmbatch.cli.resolve import resolve_run
from tmbatch.cli.showconfig import config_json, print_config
from tmbatch.inputs.files import open_input
from tmbatch.inputs.reader import BadLine, ReadStats, read_requests
from tmbatch.inputs.routes import normalize_endpoint
from tmbatch.run.config import RunConfig

log = logging.getLogger("tmbatch")


def add_validate_parser(sub: Any) -> None:
    val = subcommand(
        sub, "validate", "check an input file (or a job file and its input) without sending",
        "Read INPUT as `run` would and report every bad line. A job file (NAME.toml) is "
        "checked as `run` checks it, its resolved configuration shown (as `tmbatch run "
        "NAME.toml --print-config` shows it), then the input it names (labelling records for "
        "a job with a [label] table). Exit 0 when every line is good, 1 when some are bad, 2 when "
        "the file cannot be read or the job file is wrong.",
    )
    val.add_argument("input", help="the JSONL file to check (- reads stdin), or a job file "
                     "NAME.toml")
    val.add_argument("--endpoint", help="as for run: the route of bare request bodies")
    val.add_argument("--model", help="as for run: the model of lines that name none")
    val.add_argument("--json", action="store_true", help="one JSON object per bad line, then "
                     "a summary object, on stdout")
    add_log_format_arg(val)


def cmd_validate(ns: argparse.Namespace) -> int:
    if not is_job_file(ns.input):
        from tmbatch.inputs.tables import refuse_bare_table

        refuse_bare_table(ns.input, "validate")
        return _check(ns, ns.input, _requests(ns.endpoint, ns.model))
    job = load_job(ns.input)  # a wrong job file is one ConfigError: exit 2
    config = _config(ns, job)
    source = str(job.values["input"])
    model = ns.model or job.values.get("model")
    if job.label is None:
        endpoint = ns.endpoint or job.values.get("endpoint")
        items = _requests(endpoint, model)
    else:
        from tmbatch.inputs.templates import load_spec

        items = _records(load_spec(job.path, job.label), model)
    if not ns.json:
        if config is not None:
            print_config(config)
        print(f"{ns.input}: job file is valid; its input:")
    shown = None if config is None else config_json(config)
    return _check(ns, source, items, job=ns.input, config=shown)


def _config(ns: argparse.Namespace, job: Job) -> RunConfig | None:
    """The config `tmbatch run JOB.toml --print-config` shows (this command's --endpoint and
    --model as flags). What only the environment gets wrong (a shard without its count, an
    on-demand surface without a user id) is said as a warning: the job file is what is
    checked here, and the exit code stays the file's and the input's."""
    flags = {"input": ns.input, "endpoint": ns.endpoint, "model": ns.model}
    try:
        return resolve_run(flags, os.environ, require_key=False, job=job).config
    except (ConfigError, ValueError) as exc:
        log.warning("the run's configuration cannot be resolved here: %s", exc)
        return None


Items = Callable[[IO[bytes], ReadStats], Iterator[tuple[str | None, BadLine | None]]]


def _requests(endpoint_arg: str | None, model: str | None) -> Items:
    """Request lines, as `run` reads them: (route, None) or (None, the bad line)."""
    endpoint = normalize_endpoint(endpoint_arg) if endpoint_arg else None

    def items(f: IO[bytes], stats: ReadStats) -> Iterator[tuple[str | None, BadLine | None]]:
        for item in read_requests(f, endpoint=endpoint, model=model, stats=stats):
            yield (None, item) if isinstance(item, BadLine) else (item.url, None)

    return items


def _records(spec: Any, model: str | None) -> Items:
    """A labelling job's records, rendered into requests as `run` will render them."""
    from tmbatch.inputs.tables import unit_of
    from tmbatch.inputs.templates import RecordError, iter_records, render

    def items(f: IO[bytes], stats: ReadStats) -> Iterator[tuple[str | None, BadLine | None]]:
        unit = unit_of(f)
        for line, raw in iter_records(f):
            stats.lines = line
            if not raw:
                stats.blank += 1
                continue
            got = render(spec, raw, line, model or "model", unit)
            if isinstance(got, RecordError):
                yield None, BadLine(line, None, got.code, got.message)
            else:
                yield str(got.get("url")), None

    return items


def _check(ns: argparse.Namespace, source: str, items: Items, job: str | None = None,
           config: dict[str, Any] | None = None) -> int:
    stats = ReadStats()
    good = bad = 0
    by_url: dict[str, int] = {}
    f = open_input(source)
    try:
        for url, problem in items(f, stats):
            if problem is not None:
                bad += 1
                show_bad(source, problem, ns.json)
            else:
                good += 1
                by_url[str(url)] = by_url.get(str(url), 0) + 1
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    summary: dict[str, Any] = {"lines": stats.lines, "valid": good, "invalid": bad,
                               "blank": stats.blank, "by_route": by_url}
    if job is not None:
        summary.update(job=job, input=source)
    if config is not None:
        summary["config"] = config
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    else:
        routes = ", ".join(f"{k} {v}" for k, v in by_url.items()) or "none"
        print(f"{source}: {stats.lines} lines, {good} valid ({routes}), {bad} invalid, "
              f"{stats.blank} blank skipped")
    return ExitCode.FAILED if bad else ExitCode.OK


def show_bad(source: str, item: BadLine, as_json: bool) -> None:
    """One bad line, as `validate` lists it (and `estimate`, the same way)."""
    if as_json:
        sys.stdout.buffer.write(orjson.dumps({
            "line": item.line, "custom_id": item.custom_id, "code": item.code,
            "message": item.message}) + b"\n")
    else:
        print(f"{source}:{item.line}: {item.code}: {item.message}")
