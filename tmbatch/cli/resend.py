"""`tmbatch resend`: the only way a failed line is sent again, and only when asked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError
from tmbatch.base.defaults import RESEND_CONCURRENCY
from tmbatch.base.exitcodes import ExitCode, help_text
from tmbatch.base.files import FAILURES
from tmbatch.cli import common
from tmbatch.cli.run import start_run
from tmbatch.journal.format import Header, read_header
from tmbatch.policy import RESENDABLE, Outcome
from tmbatch.run.config import RunConfig
from tmbatch.tools.resend import (
    SHOWN,
    Selected,
    confirm,
    describe,
    json_report,
    outcome_after,
    select,
)


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
    rs.add_argument("--dry-run", action="store_true",
                    help="list every selected line and send nothing")
    rs.add_argument("--json", action="store_true",
                    help="write the selected lines (and, after sending, what became of them) "
                    "as one JSON object on stdout")
    rs.add_argument("-c", "--concurrency", type=common.positive_int, default=None,
                    help="requests in flight at once (default "
                    f"{RESEND_CONCURRENCY.value})")
    rs.add_argument("--rpm", type=common.positive_float, help="requests per minute")
    rs.add_argument("--tpm", type=common.positive_float, help="tokens per minute")
    common.add_budget_args(rs.add_argument_group(
        "budget and prices: the job's whole spend counts, earlier runs included"))
    rs.add_argument("-q", "--quiet", action="store_true", help="no progress, only warnings")
    rs.add_argument("-v", "--verbose", action="count", default=0,
                    help="log debug detail too")
    common.add_connection_args(rs)
    common.add_sim_group(rs, "send to the in-process simulator")


def cmd_resend(ns: argparse.Namespace) -> int:
    out = Path(ns.output)
    if not ns.classes and not ns.ids:
        raise ConfigError("say what to resend: --class ambiguous (or rejected, ...) or --ids FILE")
    if ns.classes and ns.ids:
        raise ConfigError("give either --class or --ids, not both")
    header = read_header(out)
    chosen = select(out, [Outcome(c) for c in ns.classes or []], ns.ids)
    if not chosen:
        what = ", ".join(ns.classes) if ns.classes else "the ids of --ids"
        _say(f"nothing to resend in {out}: no line's current outcome is {what}")
        _json(ns, chosen, dry_run=ns.dry_run, sent=False)
        return ExitCode.OK
    _say(describe(chosen, limit=None if ns.dry_run else SHOWN))
    sendable = [r for r in chosen if r.sendable]
    if ns.dry_run:
        _say("dry run: nothing was sent")
        _json(ns, chosen, dry_run=True, sent=False)
        return ExitCode.OK
    if not sendable:
        _say("nothing was sent: none of the selected lines can be resent")
        _json(ns, chosen, dry_run=False, sent=False)
        return ExitCode.USAGE
    if not ns.yes and not _confirmed(len(sendable)):
        _say("not sent")
        return ExitCode.FAILED
    code = _send(ns, out, header, sendable)
    if code not in (ExitCode.OK, ExitCode.FAILED):
        return code
    return _report(ns, out, chosen, sendable)


def _confirmed(n: int) -> bool:
    return confirm(f"Send these {n} line(s) again? [y/N]")


def _send(ns: argparse.Namespace, out: Path, header: Header,
          lines: list[Selected]) -> int:
    settings = common.settings_from(ns, require_key=not ns.sim)
    options = header.options
    concurrency = RESEND_CONCURRENCY.value if ns.concurrency is None else ns.concurrency
    config = RunConfig(  # the run's shape from its journal; the rest as a run's defaults
        input=header.input, out_dir=out, endpoint=options.get("endpoint"),
        model=options.get("model"), stream=options.get("stream"),
        shard=tuple(options["shard"]) if options.get("shard") else None,
        concurrency=concurrency, rpm=ns.rpm, tpm=ns.tpm, quiet=ns.quiet,
        only_lines=frozenset(r.line for r in lines),
        extra_header={"resend": len(lines)},
        prior_attempts={r.line: r.attempts for r in lines},
        budget=common.budget_spec_from(ns), connection=settings, preflight=False,
        sim=bool(ns.sim),
    )
    return common.run_async(start_run(ns, config))


def _report(ns: argparse.Namespace, out: Path, chosen: list[Selected],
            sent: list[Selected]) -> int:
    """What became of the lines, read back from the journal; exit 0 only when every
    selected line now succeeded."""
    ok, still = outcome_after(out, sent)
    failed = sum(still.values())
    text = f"resend: {ok} of {len(sent)} sent line(s) now succeeded"
    if failed:
        text += (f"; {failed} failed again ("
                 + ", ".join(f"{k} {v}" for k, v in still.items()) + f"): see {out / FAILURES}")
    if len(sent) < len(chosen):
        text += f"; {len(chosen) - len(sent)} line(s) could not be resent (bad input)"
    _say(text)
    _json(ns, chosen, dry_run=False, sent=True, succeeded=ok, still=still)
    return ExitCode.OK if ok == len(chosen) else ExitCode.FAILED


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _json(ns: argparse.Namespace, chosen: list[Selected], **kwargs: Any) -> None:
    if ns.json:
        sys.stdout.buffer.write(json_report(chosen, **kwargs))
        sys.stdout.flush()
