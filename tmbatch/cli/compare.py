"""`tmbatch compare OUT [OUT ...]`: runs side by side (models, prompts, nights of a benchmark)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.logs import add_log_format_arg
from tmbatch.cli import common
from tmbatch.cli.common import subcommand

log = logging.getLogger("tmbatch")

EXAMPLES = """examples:
  tmbatch compare out/                          # the models of a `run --models A,B -o out/`
  tmbatch compare small.out/ large.out/ --json  # any output directories
  tmbatch compare a.out/ b.out/ --csv > runs.csv --price tm-small=0.2:0.6
  tmbatch compare out/ --sample 0 --html cmp/   # first samples only; an HTML page in cmp/

exit codes: 0 compared; 2 a directory is not a tmbatch output directory, only one run was
given, or a file is not tmbatch's (the message names it); 70 a bug
"""


def add_compare_parser(sub: Any) -> None:
    cmp = subcommand(
        sub, "compare", "runs side by side: success, failures, latency, cost, agreement, kappa",
        "Compare runs of the same lines: per run the success rate, failures by class, latency "
        "p50/p90/p99, tokens in/out, cost and finish reasons; per line (matched by custom_id "
        "and sample) how often the runs give the same answer (whitespace and case ignored); "
        "for labelling jobs the label agreement matrix and Cohen's kappa, and with the "
        "records' gold labels each run's accuracy and confusion matrix. OUT is an output "
        "directory, or a directory whose subdirectories are (what run --models writes). "
        "Read-only; runs still going are compared as they stand.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    cmp.add_argument("dirs", nargs="+", metavar="OUT",
                     help="output directories (two or more runs in all)")
    fmt = cmp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout")
    fmt.add_argument("--csv", action="store_true",
                     help="CSV on stdout, one row per run (pairwise figures as columns)")
    cmp.add_argument("--sample", type=int, metavar="K", default=None,
                     help="compare only sample K of each line (run --samples; 0 is the first); "
                     "by default every sample is compared with the same sample of the others")
    cmp.add_argument("--html", metavar="DIR",
                     help="also write the comparison as an HTML page, DIR/index.html, with its "
                     "chart (needs pip install 'tmbatch[report]')")
    common.add_price_args(cmp.add_argument_group(
        "prices (USD per million tokens; over the prices each run's journal recorded)"))
    add_log_format_arg(cmp)


def cmd_compare(ns: argparse.Namespace) -> int:
    from tmbatch.tools.compare import compare
    from tmbatch.tools.compare_render import render_csv, render_text

    if ns.sample is not None and ns.sample < 0:
        raise ConfigError(f"--sample {ns.sample}: a sample index is 0 or more (0 is the first)")
    prices = common.budget_spec_from(ns).prices
    result = compare(ns.dirs, prices, ns.sample)
    for warning in result.warnings:
        log.warning("%s", warning)
    if ns.html:
        from tmbatch.tools.report_compare import write_compare_report

        page = write_compare_report(result, Path(ns.html))
        log.info("comparison page: %s", page)
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(result.as_dict()) + b"\n")
    elif ns.csv:
        sys.stdout.write(render_csv(result))
    else:
        print(render_text(result))
    return ExitCode.OK
