"""`tmbatch cache stats PATH` and `tmbatch cache prune PATH --older-than 30d`.

The cache a nightly benchmark shares across runs grows with every new prompt; these say what
is in it, what it saved, and drop what is too old to trust (docs/cache.md).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.exitcodes import ExitCode
from tmbatch.cli.common import subcommand
from tmbatch.journal.cache import CacheError, ResponseCache

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
EXAMPLES = """examples:
  tmbatch cache stats ~/.cache/tmbatch/eval.sqlite
  tmbatch cache stats eval.sqlite --json
  tmbatch cache prune eval.sqlite --older-than 30d     # s, m, h, d or w
"""


def age(text: str) -> float:
    """"30d" -> seconds; argparse shows the ValueError's words."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a positive number and a unit (s, m, h, d, w), e.g. 30d")
    return float(m.group(1)) * UNITS[m.group(2)]


def add_cache_parser(sub: Any) -> None:
    cache = subcommand(
        sub, "cache", "what a response cache (--cache) holds and saved; prune it",
        "Inspect or prune the SQLite response cache that `tmbatch run --cache PATH` uses.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True,
                                   help="stats: what it holds and saved; prune: drop old answers")
    st = actions.add_parser("stats", help="entries, size, the last runs' hits and misses, "
                            "tokens and money saved", allow_abbrev=False)
    st.add_argument("path", metavar="PATH", help="the cache's SQLite file")
    st.add_argument("--runs", type=int, default=10, metavar="N",
                    help="how many of the last runs to list (default 10)")
    st.add_argument("--json", action="store_true", help="one JSON object on stdout")
    pr = actions.add_parser("prune", help="drop answers stored longer ago than --older-than",
                            allow_abbrev=False)
    pr.add_argument("path", metavar="PATH", help="the cache's SQLite file")
    pr.add_argument("--older-than", type=age, required=True, metavar="AGE",
                    help="e.g. 30d, 12h, 2w: answers stored before now minus AGE go")
    pr.add_argument("--json", action="store_true", help="one JSON object on stdout")


def cmd_cache(ns: argparse.Namespace) -> int:
    path = Path(ns.path)
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file")
    if ns.cache_command == "prune":
        return _prune(path, ns)
    cache = ResponseCache.open(path, "read-only")
    try:
        st = cache.stats(max(1, ns.runs))
    finally:
        cache.close()
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(st) + b"\n")
    else:
        sys.stdout.write(render(st))
    return ExitCode.OK


def _prune(path: Path, ns: argparse.Namespace) -> int:
    cache = ResponseCache.open(path, "read-write")
    try:
        gone = cache.prune(ns.older_than)
        left = cache.stats(1)["entries"]
    finally:
        cache.close()
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps({"path": str(path), "removed": gone,
                                              "entries": left}) + b"\n")
    else:
        print(f"{path}: {gone} answer(s) removed, {left} left")
    return ExitCode.OK


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def render(st: dict[str, Any]) -> str:
    """`tmbatch cache stats` for people."""
    tok = st["tokens_stored"]
    lines = [f"{st['path']}: {st['entries']:,} answer(s), {st['bytes'] / 2**20:,.1f} MiB "
             f"(stored {_when(st['oldest'])} .. {_when(st['newest'])} UTC; "
             f"{tok['prompt'] + tok['completion']:,} tokens)"]
    for model, n in st["by_model"].items():
        lines.append(f"  {model}: {n:,}")
    total = st["all_runs"]
    usd = "" if total["usd_saved"] is None else f", ${total['usd_saved']:.4f}"
    lines.append(f"all runs: {total['hits']:,} hit(s), {total['tokens_saved']:,} tokens saved"
                 f"{usd}")
    if st["runs"]:
        lines.append("last runs (UTC):")
    for r in st["runs"]:
        usd = "" if r["usd_saved"] is None else f", ${r['usd_saved']:.4f}"
        lines.append(f"  {_when(r['t'])}  {r['mode']:<10}  {r['hits']:,} hit(s), "
                     f"{r['misses']:,} miss(es), {r['stored']:,} stored, "
                     f"{r['tokens_saved']:,} tokens saved{usd}  {r['output']}")
    return "\n".join(lines) + "\n"
