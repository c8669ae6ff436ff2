"""`tmbatch resend`: the only way a failed line is sent again, and only when asked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from tmbatch.commands import common
from tmbatch.commands.run import start_run
from tmbatch.config import ConfigError
from tmbatch.exitcodes import ExitCode, help_text
from tmbatch.files import SUMMARY
from tmbatch.journal import read_header
from tmbatch.options import RunOptions
from tmbatch.safety import RESENDABLE, Outcome


def add_resend_parser(sub: Any) -> None:
    rs = common.subcommand(
        sub, "resend",
        "send failed lines again, explicitly (the only way an ambiguous one is re-sent)",
        "List the selected failed lines, ask for confirmation (or --yes), and send "
        "them again with the same Idempotency-Key. A later success supersedes the failure: "
        "failures.jsonl keeps one outcome per line. Example: tmbatch resend out/ --class "
        "ambiguous --yes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=help_text(),
    )
    rs.add_argument("output", help="the run's output directory")
    rs.add_argument("--class", dest="classes", action="append",
                    choices=[cls.value for cls in RESENDABLE],
                    help="resend the lines whose current outcome is this failure class "
                    "(repeatable; ambiguous = possibly processed; rejected/not_sent = retries "
                    "exhausted)")
    rs.add_argument("--ids", metavar="FILE", help="resend exactly these custom_ids (one a line)")
    rs.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rs.add_argument("--dry-run", action="store_true", help="only list what would be sent")
    rs.add_argument("-c", "--concurrency", type=common.positive_int, default=16,
                    help="requests in flight at once (default 16)")
    rs.add_argument("--rpm", type=common.positive_float, help="requests per minute")
    rs.add_argument("--tpm", type=common.positive_float, help="tokens per minute")
    common.add_budget_args(rs.add_argument_group(
        "budget and prices: the job's whole spend counts, earlier runs included"))
    rs.add_argument("-q", "--quiet", action="store_true", help="no progress, only warnings")
    rs.add_argument("-v", "--verbose", action="count", default=0)
    common.add_connection_args(rs)
    common.add_sim_group(rs, "send to the in-process simulator")


def cmd_resend(ns: argparse.Namespace) -> int:
    from tmbatch.resend import confirm, describe, select

    out = Path(ns.output)
    if not ns.classes and not ns.ids:
        raise ConfigError("say what to resend: --class ambiguous (or rejected, ...) or --ids FILE")
    if ns.classes and ns.ids:
        raise ConfigError("give either --class or --ids, not both")
    header = read_header(out)
    chosen = select(out, [Outcome(c) for c in ns.classes or []], ns.ids)
    if not chosen:
        print(f"nothing to resend in {out}", file=sys.stderr)
        return ExitCode.OK
    print(describe(chosen), file=sys.stderr)
    if ns.dry_run:
        return ExitCode.OK
    if not ns.yes and not confirm(f"Send these {len(chosen)} request(s) again? [y/N]"):
        print("not sent", file=sys.stderr)
        return ExitCode.FAILED
    settings = common.settings_from(ns, require_key=not ns.sim)
    options = header.get("options") or {}
    opts = RunOptions(
        input=header["input"], out_dir=out, endpoint=options.get("endpoint"),
        model=options.get("model"), stream=options.get("stream"),
        shard=tuple(options["shard"]) if options.get("shard") else None,
        concurrency=ns.concurrency, rpm=ns.rpm, tpm=ns.tpm, quiet=ns.quiet,
        only_lines={r.line for r in chosen},
        extra_header={"resend": len(chosen)},
        prior_attempts={r.line: r.attempts for r in chosen},
        budget=common.budget_spec_from(ns),
    )
    code = common.run_async(start_run(ns, opts, settings, preflight=False))
    if code in (ExitCode.OK, ExitCode.FAILED):
        # Only the chosen lines were sent, each once: this run's successes are theirs.
        summary = orjson.loads((out / SUMMARY).read_bytes())
        ok = summary["this_run"]["succeeded"]
        print(f"resend: {ok} of {len(chosen)} now succeeded", file=sys.stderr)
        return ExitCode.OK if ok == len(chosen) else ExitCode.FAILED
    return code
