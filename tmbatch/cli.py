"""The `tmbatch` command line: parse, hand over to a command, map the outcome to an exit code.

Logs go to stderr, data to files. Every error a user can cause ends in one clear
line and exit code 2; a traceback is a bug. Each subcommand's parser sits beside the
function that runs it, in `tmbatch.commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from tmbatch import __version__
from tmbatch.commands import estimate, outputs, resend, run, server, validate
from tmbatch.config import ConfigError
from tmbatch.exitcodes import ExitCode, help_text
from tmbatch.files import OutputError
from tmbatch.journal import JournalError
from tmbatch.logs import REDACT, event, json_mode, say, setup_logging
from tmbatch.reader import InputError

log = logging.getLogger("tmbatch")

MORE_EXAMPLES = """more:
  tmbatch status out/                         # done / failed by class / not sent / unknown
  tmbatch resend out/ --class ambiguous       # the only way a possibly-billed line goes again
  tmbatch estimate in.jsonl --prices p.toml   # tokens and cost before sending anything
  tmbatch export out/ --combined              # outputs in input order
  tmbatch run jobs/label-sentiment.toml --sim # a declared job: labelling on the simulator
  tmbatch run in.jsonl -o out/shard-0 --shard 0/4 && tmbatch merge out/shard-* -o out/all
  tmbatch doctor                              # which key/URL came from where; checks
  tmbatch report out/                         # HTML report (pip install 'tmbatch[report]')
"""

Command = Callable[[argparse.Namespace], int]
# name -> (adds its parser, runs it); the order is the order of --help
COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Command]] = {
    "run": (run.add_run_parser, run.cmd_run),
    "validate": (validate.add_validate_parser, validate.cmd_validate),
    "estimate": (estimate.add_estimate_parser, estimate.cmd_estimate),
    "report": (outputs.add_report_parser, outputs.cmd_report),
    "status": (outputs.add_status_parser, outputs.cmd_status),
    "resend": (resend.add_resend_parser, resend.cmd_resend),
    "export": (outputs.add_export_parser, outputs.cmd_export),
    "merge": (outputs.add_merge_parser, outputs.cmd_merge),
    "doctor": (server.add_doctor_parser, server.cmd_doctor),
    "models": (server.add_models_parser, server.cmd_models),
    "sim": (server.add_sim_parser, server.cmd_sim),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmbatch",
        allow_abbrev=False,
        description="Run large batches of inference requests against Tensormesh, as fast as "
        "the account's limits allow, without paying twice for a request by accident.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=run.RUN_EXAMPLES + "\n" + MORE_EXAMPLES + "\n" + help_text(),
    )
    parser.add_argument("--version", action="version", version=f"tmbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


def _refuse_api_key_flag(args: list[str]) -> int | None:
    """Say it without echoing the value: a key on a command line is already in `ps`."""
    if not any(a == "--api-key" or a.startswith("--api-key=") for a in args):
        return None
    json_asked = ("json" in args and "--log-format" in args) or "--log-format=json" in args
    setup_logging(0, False, "json" if json_asked else "text")
    msg = ("there is no --api-key flag (a key on the command line shows in `ps` and shell "
           "history); set TENSORMESH_INFERENCE_API_KEY or pass --api-key-file FILE")
    say("error", msg, text=f"tmbatch: error: {msg}", level=logging.ERROR,
        exit_code=ExitCode.USAGE)
    return ExitCode.USAGE


class Terminated(BaseException):
    """SIGTERM before a run's own handlers are in place (parsing, reading a job file)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    # Until a run installs its own handlers, SIGTERM ends tmbatch cleanly (exit 143) even as
    # PID 1 in a container, where the kernel would otherwise ignore it.
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    refused = _refuse_api_key_flag(args)
    if refused is not None:
        return refused
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    setup_logging(getattr(ns, "verbose", 0), getattr(ns, "quiet", False),
                  getattr(ns, "log_format", "text"))
    try:
        code = COMMANDS[ns.command][1](ns)
        if json_mode():
            event("exit", f"exit code {code}", exit_code=code, always=True)
        return code
    except OutputError as exc:  # an output path that cannot be used: 2, or 4 for a full disk
        msg = REDACT.scrub(str(exc))
        say("error", msg, text=f"tmbatch: error: {msg}", level=logging.ERROR,
            exit_code=exc.exit_code)
        return exc.exit_code
    except (ConfigError, InputError, JournalError, ValueError) as exc:
        msg = REDACT.scrub(str(exc))
        say("error", msg, text=f"tmbatch: error: {msg}", level=logging.ERROR,
            exit_code=ExitCode.USAGE)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        say("interrupted", "interrupted", text="tmbatch: interrupted", level=logging.ERROR,
            exit_code=ExitCode.SIGINT)
        return ExitCode.SIGINT
    except Terminated:
        say("interrupted", "stopped by SIGTERM", text="tmbatch: stopped by SIGTERM",
            level=logging.ERROR, exit_code=ExitCode.SIGTERM)
        return ExitCode.SIGTERM
    except BrokenPipeError:
        # The reader of stdout went away (`tmbatch validate big.jsonl | head`): not an error
        # to report, and Python must not try to flush into the closed pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.PIPE
    except Exception as exc:  # a bug: say so without a wall of traceback or a key
        if os.environ.get("TMBATCH_DEBUG"):
            raise
        msg = (f"internal error: {type(exc).__name__}: {REDACT.scrub(str(exc))} "
               "(this is a bug; TMBATCH_DEBUG=1 shows the traceback)")
        say("internal_error", msg, text=f"tmbatch: {msg}", level=logging.ERROR,
            exit_code=ExitCode.INTERNAL)
        return ExitCode.INTERNAL
