"""`tmbatch validate`: read an input as `run` would, send nothing, list every bad line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from tmbatch.commands.common import subcommand
from tmbatch.exitcodes import ExitCode
from tmbatch.logs import add_log_format_arg
from tmbatch.reader import BadLine, ReadStats, normalize_endpoint, open_input, read_requests


def add_validate_parser(sub: Any) -> None:
    val = subcommand(
        sub, "validate", "check an input file without sending anything",
        "Read INPUT as `run` would and report every bad line. Exit 0 when every "
        "line is good, 1 when some are bad, 2 when the file cannot be read.",
    )
    val.add_argument("input", help="the JSONL file to check (- reads stdin)")
    val.add_argument("--endpoint", help="as for run: the route of bare request bodies")
    val.add_argument("--model", help="as for run: the model of lines that name none")
    val.add_argument("--json", action="store_true", help="one JSON object per bad line, then "
                     "a summary object, on stdout")
    add_log_format_arg(val)


def cmd_validate(ns: argparse.Namespace) -> int:
    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    stats = ReadStats()
    good = bad = 0
    by_url: dict[str, int] = {}
    f = open_input(ns.input)
    try:
        for item in read_requests(f, endpoint=endpoint, model=ns.model, stats=stats):
            if isinstance(item, BadLine):
                bad += 1
                show_bad(ns.input, item, ns.json)
            else:
                good += 1
                by_url[item.url] = by_url.get(item.url, 0) + 1
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    summary: dict[str, Any] = {"lines": stats.lines, "valid": good, "invalid": bad,
                               "blank": stats.blank, "by_route": by_url}
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    else:
        routes = ", ".join(f"{k} {v}" for k, v in by_url.items()) or "none"
        print(f"{ns.input}: {stats.lines} lines, {good} valid ({routes}), {bad} invalid, "
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
