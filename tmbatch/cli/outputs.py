"""Commands that read an output directory: status, export, report, merge. Each takes an
output URL too (`cli.remote`: a copy fetched from the bucket, what is written put back)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import JOURNAL
from tmbatch.base.logs import add_log_format_arg
from tmbatch.cli.common import subcommand
from tmbatch.cli.remote import files_of, local_copy, publish_dir, put_new_files
from tmbatch.journal.journal import JournalError, read_header
from tmbatch.journal.store import is_remote

log = logging.getLogger("tmbatch")


def add_status_parser(sub: Any) -> None:
    st = subcommand(
        sub, "status", "where a run stands: done, failed by class, not sent, unknown outcome",
        "Read-only; safe while the run is going. Exit 0 when the run is finished, "
        "1 when it is not (or still running), 2 when OUTPUT is not a tmbatch directory.",
    )
    st.add_argument("output", help="the run's output directory (or its URL)")
    st.add_argument("--json", action="store_true", help="one JSON object on stdout, for scripts")


def cmd_status(ns: argparse.Namespace) -> int:
    from tmbatch.tools.status import has_journal, render, status

    with local_copy(ns.output) as out:
        if not has_journal(out):
            from tmbatch.run.fanout import model_dirs, models_hint

            dirs = model_dirs(out)
            if dirs:  # the -o of a --models run: each model's status, in its order
                return _status_of_models(ns, dirs)
            raise JournalError(f"{ns.output} has no journal.jsonl: not a tmbatch output "
                               "directory (nor an output URL with segments)"
                               + models_hint(out))
        st = status(out)
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(st) + b"\n")
    else:
        print(render(st))
    return ExitCode.OK if st["finished"] else ExitCode.FAILED


def _status_of_models(ns: argparse.Namespace, dirs: dict[str, Path]) -> int:
    """`status` of a --models run's -o: one block per model (`--json`: an object by model);
    finished only when every model's run is."""
    from tmbatch.tools.status import has_journal, render, status

    states = {model: status(d) for model, d in dirs.items() if has_journal(d)}
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps({"models": states}) + b"\n")
    else:
        print("\n\n".join(f"model:        {m}\n{render(st)}" for m, st in states.items()))
    done = len(states) == len(dirs) and all(st["finished"] for st in states.values())
    return ExitCode.OK if done else ExitCode.FAILED


def add_export_parser(sub: Any) -> None:
    ex = subcommand(
        sub, "export", "write results and failures in input order (bounded memory)",
        "Writes results.ordered.jsonl and failures.ordered.jsonl (and with "
        "--combined outcomes.ordered.jsonl, one line per input line) sorted by input line, "
        "with an external merge sort: memory stays flat for any size.",
    )
    ex.add_argument("output", help="the run's output directory")
    # Removed: export always writes in input order, so the flag did nothing. It is still
    # parsed, to answer with what to do instead of argparse's bare "unrecognized arguments".
    ex.add_argument("--ordered", action="store_true", help=argparse.SUPPRESS)
    ex.add_argument("--combined", action="store_true",
                    help="also write outcomes.ordered.jsonl with results and failures together")
    ex.add_argument("--to", metavar="DIR", help="write there instead of the output directory")
    ex.add_argument("--failed", action="store_true",
                    help="with --as-input: the failed lines only (their current failure)")
    ex.add_argument("--as-input", action="store_true",
                    help="with --failed: write the failed lines' requests on stdout as an "
                    "input file (OpenAI Batch lines, custom_id kept), to correct and send back "
                    "with `tmbatch resend OUT --input FILE`, or to run elsewhere. E.g. tmbatch "
                    "export out/ --failed --as-input > retry.jsonl")
    ex.add_argument("--format", choices=("jsonl", "parquet", "csv"), default="jsonl",
                    help="parquet or csv: write outcomes.parquet / outcomes.csv instead, one "
                    "row per outcome in input order with flat columns (custom_id, status, "
                    "class, model, text, finish_reason, tokens, ...); Parquet needs pip "
                    "install 'tmbatch[parquet]' (default jsonl)")


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.ordered:
        raise ConfigError("export has no --ordered: it always writes in input order; drop the "
                          "flag (run --ordered is the one that exports when a run finishes)")
    with local_copy(ns.output) as out:
        read_header(out)
        if ns.failed or ns.as_input:
            return _export_failed(ns, out)
        before = files_of(out) if is_remote(ns.output) and not ns.to else None
        code = _export(ns, out)
        for url in put_new_files(ns.output, out, before) if before is not None else []:
            print(f"put {url}", file=sys.stderr)
        return code


def _export(ns: argparse.Namespace, out: Path) -> int:
    if ns.format != "jsonl":  # flat tables: `tools.tables`
        from tmbatch.tools.tables import export_table

        dest, n = export_table(out, ns.format, Path(ns.to) if ns.to else None)
        print(f"{dest}: {n} row(s)", file=sys.stderr)
        return ExitCode.OK
    from tmbatch.tools.export import export_ordered

    counts = export_ordered(out, Path(ns.to) if ns.to else None, combined=ns.combined)
    dest = ns.to or out
    for name, n in counts.items():
        print(f"{Path(dest) / name}: {n} line(s)", file=sys.stderr)
    return ExitCode.OK


def _export_failed(ns: argparse.Namespace, out: Path) -> int:
    """`--failed --as-input`: the failed lines' requests on stdout; what cannot be written
    (a line the reader refuses has no request) is named on stderr with its fix."""
    from tmbatch.tools.export_failed import failed_as_input

    if not (ns.failed and ns.as_input):
        raise ConfigError("give --failed and --as-input together: export --failed --as-input "
                          "writes the failed lines' requests as an input file on stdout")
    if ns.combined or ns.to:
        raise ConfigError("--failed --as-input writes to stdout: drop --combined and --to, "
                          "and redirect it (> retry.jsonl)")
    done = failed_as_input(out, sys.stdout.buffer)
    sys.stdout.flush()
    print(f"{done.written} failed line(s) written as input lines", file=sys.stderr)
    if done.bad:
        shown = ", ".join(f"line {f.line} ({f.code})" for f in done.bad[:10])
        more = " ..." if len(done.bad) > 10 else ""
        print(f"{len(done.bad)} failed line(s) not written: the input line itself is bad "
              f"({shown}{more}); correct them in the input and send them with tmbatch resend "
              f"{out} --input FIXED (matched by custom_id; a line without one by its line "
              "number)", file=sys.stderr)
    return ExitCode.OK


def add_report_parser(sub: Any) -> None:
    rep = subcommand(
        sub, "report", "an HTML page of a run: throughput, latency, TTFT, 429s, failures, cost",
        "Read OUTPUT's journal (and summary.json) and write a self-contained "
        "OUTPUT/report/index.html with its charts as PNGs beside it. When OUTPUT holds "
        "several runs in its subdirectories (run --models), write each run's report and a "
        "page comparing them (tmbatch compare's figures, with a chart). Needs the optional "
        "extra: pip install 'tmbatch[report]'.",
    )
    rep.add_argument("out_dir", metavar="OUTPUT",
                     help="a run's output directory, or the parent of several (run --models)")
    rep.add_argument("-o", "--to", "--output", dest="output", metavar="DIR",
                     help="write the page and its charts into DIR (default OUTPUT/report)")
    add_log_format_arg(rep)


def cmd_report(ns: argparse.Namespace) -> int:
    from tmbatch.tools.report import write_report

    dest = Path(ns.output) if ns.output else None
    if not is_remote(ns.out_dir):
        out = Path(ns.out_dir)
        if out.is_dir() and not (out / JOURNAL).is_file():
            from tmbatch.tools.compare_read import runs_under

            runs = runs_under(out)
            if len(runs) > 1:  # run --models: each model's report, and one comparing them
                return _report_runs(out, runs, dest)
            if len(runs) == 1:
                ns.out_dir = str(runs[0])
    with local_copy(ns.out_dir) as out:
        before = files_of(out) if is_remote(ns.out_dir) and not ns.output else None
        page = write_report(out, dest)
        if before is not None:  # OUTPUT is a bucket: the report goes beside its outputs
            put_new_files(ns.out_dir, out, before)
            print(f"{ns.out_dir.rstrip('/')}/{page.relative_to(out).as_posix()}")
            return ExitCode.OK
    print(page)
    return ExitCode.OK


def _report_runs(parent: Path, runs: list[Path], dest: Path | None) -> int:
    from tmbatch.tools.compare import compare
    from tmbatch.tools.report import write_report
    from tmbatch.tools.report_compare import write_compare_report

    result = compare([str(r) for r in runs])
    for warning in result.warnings:
        log.warning("%s", warning)
    pages = {row.run: write_report(Path(row.path)) for row in result.runs}
    print(write_compare_report(result, dest or parent / "report", pages))
    return ExitCode.OK


def add_merge_parser(sub: Any) -> None:
    mg = subcommand(
        sub, "merge", "join the output directories of a sharded run, checking coverage",
        "Join the results.jsonl, failures.jsonl (and labels.jsonl) of shard output "
        "directories into OUT, with a merged summary.json, and check that every line of the "
        "input has exactly one outcome. Example: tmbatch merge out/shard-0 out/shard-1 -o out/all",
        epilog="exit codes: 0 every line succeeded; 1 every line has one outcome, some failed; "
        "2 the directories cannot be merged (different inputs or options, no journal, input "
        "unreadable); 5 incomplete: lines missing or duplicated (listed, and in summary.json)",
    )
    mg.add_argument("dirs", nargs="+", metavar="DIR", help="shard output directories")
    mg.add_argument("-o", "--output", required=True, help="directory for the merged files")
    mg.add_argument("--input", help="the input the shards ran, when the path in their journals "
                    "is not readable here (checked by fingerprint)")


def cmd_merge(ns: argparse.Namespace) -> int:
    from tmbatch.tools.merge import merge

    with contextlib.ExitStack() as stack:  # shards or the merged output at URLs
        dirs = [str(stack.enter_context(local_copy(d))) for d in ns.dirs]
        if not is_remote(ns.output):
            return merge(dirs, ns.output, ns.input)
        into = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tmbatch-")))
        code = merge(dirs, str(into / "merged"), ns.input)
        publish_dir(ns.output, into / "merged")
        print(f"published to {ns.output}", file=sys.stderr)
        return code
