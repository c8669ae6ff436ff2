"""`tmbatch resend`: the only way a failed line is sent again, and only when asked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError, Settings
from tmbatch.base.defaults import RESEND_CONCURRENCY
from tmbatch.base.exitcodes import ExitCode, help_text
from tmbatch.base.files import FAILURES
from tmbatch.cli import common
from tmbatch.cli.remote import local_copy, work_dir
from tmbatch.inputs.files import fingerprint
from tmbatch.journal.format import Header
from tmbatch.journal.reading import read_header
from tmbatch.journal.store import is_remote
from tmbatch.policy import RESENDABLE, Cause, Outcome
from tmbatch.run.config import Learnt, RunConfig
from tmbatch.run.runner import Runner
from tmbatch.spend.budget import BudgetSpec
from tmbatch.tools.resend import (
    SHOWN,
    Selected,
    confirm,
    corrected,
    describe,
    describe_unused,
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
        "failures.jsonl keeps one outcome per line. A line that would fail the same way as it "
        "is (a bad input line, a request the server refused as written) goes corrected: "
        "--input FIXED.jsonl. Example: tmbatch resend out/ --class ambiguous --yes",
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
    rs.add_argument("--input", metavar="FIXED", help="send the corrected requests of FIXED "
                    "(OpenAI Batch lines, e.g. from `tmbatch export OUT --failed --as-input`, "
                    "or the whole corrected input) for the failed lines they name by "
                    "custom_id (of --class, default permanent); checked as run checks its "
                    "input; a line that succeeded is never sent again")
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
    """On an output URL the lines are chosen in a copy of it, and the run that sends them
    rebuilds its working directory from the bucket under the URL's lease (`cli.remote`)."""
    with local_copy(ns.output) as out:
        return _cmd_resend(ns, out)


def _cmd_resend(ns: argparse.Namespace, out: Path) -> int:
    if not ns.classes and not ns.ids and not ns.input:
        raise ConfigError("say what to resend: --class ambiguous (or rejected, ...), --ids "
                          "FILE, or --input FIXED.jsonl with corrected lines")
    if ns.ids and (ns.classes or ns.input):
        raise ConfigError("give --ids alone: it names the lines itself (not with --class or "
                          "--input)")
    # everything local first, the key included: nothing is listed that cannot then be sent
    header = read_header(out)
    settings = None if ns.dry_run else common.settings_from(ns, require_key=not ns.sim)
    budget = common.budget_spec_from(ns)
    chosen = _choose(ns, out)
    if not chosen:
        what = ", ".join(ns.classes or ["permanent"]) if not ns.ids else "the ids of --ids"
        where = f" that {ns.input} gives again" if ns.input else ""
        _say(f"nothing to resend in {out}: no line's current outcome is {what}{where}")
        _json(ns, chosen, dry_run=ns.dry_run, sent=False)
        return ExitCode.OK
    _say(describe(chosen, out, limit=None if ns.dry_run else SHOWN))
    sendable = [r for r in chosen if r.sendable]
    if ns.dry_run:
        _say("dry run: nothing was sent")
        _json(ns, chosen, dry_run=True, sent=False)
        return ExitCode.OK
    if not sendable:
        _say("nothing was sent: none of the selected lines can be resent as they are; send "
             "corrected ones with --input (the fixes above say how)")
        _json(ns, chosen, dry_run=False, sent=False)
        return ExitCode.USAGE
    if not ns.yes and not _confirmed(len(sendable)):
        _say("not sent")
        return ExitCode.FAILED
    assert settings is not None
    code = _send(ns, out, header, sendable, settings, budget)
    if code not in (ExitCode.OK, ExitCode.FAILED):
        return code
    if is_remote(ns.output):  # the run's working directory holds what it published
        out = work_dir(ns.output)
    return _report(ns, out, chosen, sendable)


def _choose(ns: argparse.Namespace, out: Path) -> list[Selected]:
    """The lines to list: by class or ids, or the failed lines `--input` corrects (what of
    the file is not used is said first)."""
    classes = [Outcome(c) for c in ns.classes or []]
    if not ns.input:
        return select(out, classes, ns.ids)
    found = corrected(out, classes or [Outcome.PERMANENT], ns.input)
    for line in describe_unused(found, ns.input):
        _say(line)
    return found.chosen


def _confirmed(n: int) -> bool:
    return confirm(f"Send these {n} line(s) again? [y/N]")


def _send(ns: argparse.Namespace, out: Path, header: Header, lines: list[Selected],
          settings: Settings, budget: BudgetSpec) -> int:
    options = header.options
    concurrency = RESEND_CONCURRENCY.value if ns.concurrency is None else ns.concurrency
    fixed = [r.request for r in lines if r.request is not None]
    extra: dict[str, Any] = {"resend": len(lines)}
    if fixed:  # the journal says where the corrected requests came from
        extra.update(input=str(Path(ns.input).resolve()), fingerprint=fingerprint(ns.input))
    url = ns.output if is_remote(ns.output) else None
    config = RunConfig(  # the run's shape from its journal; the rest as a run's defaults
        input=header.input, out_dir=out if url is None else work_dir(url), output_url=url,
        endpoint=options.get("endpoint"),
        model=options.get("model"), stream=options.get("stream"),
        shard=tuple(options["shard"]) if options.get("shard") else None,
        samples=options.get("samples") or 1,
        concurrency=concurrency, rpm=ns.rpm, tpm=ns.tpm, quiet=ns.quiet,
        only_lines=frozenset(r.line for r in lines),
        extra_header=extra, requests=tuple(fixed) if fixed else None,
        prior_attempts={r.line: r.attempts for r in lines},
        budget=budget, connection=settings, preflight=False, sim=bool(ns.sim),
    )
    served = any(r.failed.cause is Cause.SERVED for r in lines)
    return common.run_async(_resend(ns, config, served))


async def _resend(ns: argparse.Namespace, config: RunConfig, check_served: bool) -> int:
    """As `run`: everything local (the directory, its lock, the journal) before the network.
    Lines the server did not serve are checked against GET /v1/models first: those it
    serves now are sent, the others fail again unsent (`model_not_served`)."""
    assert config.connection is not None
    runner = Runner(config)
    runner.install_signals()
    try:
        runner.prepare()

        async def send(settings: Settings) -> int:
            served = await _served_models(settings) if check_served else None
            return await runner.send(Learnt(settings, served))

        return await common.on_sim_if_asked(ns, config.connection, send)
    finally:
        await runner.close()


async def _served_models(settings: Settings) -> tuple[str, ...] | None:
    """The served models now (None: the server gives no list; its 404s judge then)."""
    from tmbatch.client.preflight import run_checks

    report = await run_checks(settings, [], check_auth=False)
    if report.served is not None:
        _say(f"the server serves {len(report.served)} model(s) now: "
             f"{', '.join(report.served[:10])}{' ...' if len(report.served) > 10 else ''}")
    return None if report.served is None else tuple(report.served)


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
        text += (f"; {len(chosen) - len(sent)} line(s) could not be resent as they are "
                 "(correct them and send them with --input)")
    _say(text)
    _json(ns, chosen, dry_run=False, sent=True, succeeded=ok, still=still)
    return ExitCode.OK if ok == len(chosen) else ExitCode.FAILED


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _json(ns: argparse.Namespace, chosen: list[Selected], **kwargs: Any) -> None:
    if ns.json:
        sys.stdout.buffer.write(json_report(chosen, **kwargs))
        sys.stdout.flush()
