"""The `tmbatch` command line: parse, hand over to a command, map the outcome to an exit code.

Logs go to stderr, data to files. Every error a user can cause ends in one clear
line and exit code 2; a traceback is a bug. Each subcommand's parser sits beside the
function that runs it, in `tmbatch.cli`.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from tmbatch import __version__
from tmbatch.base.config import ConfigError
from tmbatch.base.exitcodes import ExitCode, help_text
from tmbatch.base.files import OutputError
from tmbatch.base.logs import REDACT, event, json_mode, say, setup_logging
from tmbatch.inputs.files import InputError
from tmbatch.journal.journal import JournalError

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
  tmbatch compare small.out/ large.out/       # runs side by side: success, cost, kappa
  tmbatch completion bash > ~/.local/share/bash-completion/completions/tmbatch
  tmbatch cache stats eval.sqlite             # what a --cache holds and saved
"""

Command = Callable[[argparse.Namespace], int]
# name -> (its module in tmbatch.cli, the function adding its parser, the function running
# it); the order is the order of --help. A start imports the module of the command it runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("run", "add_run_parser", "cmd_run"),
    "validate": ("validate", "add_validate_parser", "cmd_validate"),
    "estimate": ("estimate", "add_estimate_parser", "cmd_estimate"),
    "report": ("outputs", "add_report_parser", "cmd_report"),
    "status": ("outputs", "add_status_parser", "cmd_status"),
    "resend": ("resend", "add_resend_parser", "cmd_resend"),
    "export": ("outputs", "add_export_parser", "cmd_export"),
    "merge": ("outputs", "add_merge_parser", "cmd_merge"),
    "compare": ("compare", "add_compare_parser", "cmd_compare"),
    "cache": ("cache", "add_cache_parser", "cmd_cache"),
    "doctor": ("server", "add_doctor_parser", "cmd_doctor"),
    "models": ("server", "add_models_parser", "cmd_models"),
    "sim": ("server", "add_sim_parser", "cmd_sim"),
    "completion": ("completion", "add_completion_parser", "cmd_completion"),
}


def _command(name: str) -> tuple[Callable[[argparse._SubParsersAction], None], Command]:
    module, add_parser, run = COMMANDS[name]
    mod = importlib.import_module(f"tmbatch.cli.{module}")
    return getattr(mod, add_parser), getattr(mod, run)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's parser, with every flag: what --help and every error message show."""
    from tmbatch.cli.run import RUN_EXAMPLES

    parser = argparse.ArgumentParser(
        prog="tmbatch",
        allow_abbrev=False,
        description="Run large batches of inference requests against Tensormesh, as fast as "
        "the account's limits allow, without paying twice for a request by accident.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_EXAMPLES + "\n" + MORE_EXAMPLES + "\n" + help_text(),
    )
    parser.add_argument("--version", action="version", version=f"tmbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _command(name)[0](sub)
    return parser


class _Unsure(Exception):
    """The quick parser met something only the whole one can say (`_QuickParser`)."""


class _QuickParser(argparse.ArgumentParser):
    """The one subcommand a command line names, without the simulator's flags when none is
    given (`cli.common.add_sim_group` leaves them out for this parser): `tmbatch.sim`
    imports aiohttp's server, ~18 ms of every start, and every subcommand's parser and module
    another few. It never speaks: an error (or anything it cannot be sure of) is left to the
    whole parser (`build_parser`), which parses again and says it as it always has."""

    sim_flags = False

    def error(self, message: str) -> NoReturn:
        raise _Unsure(message)


def _quick_parse(args: list[str]) -> argparse.Namespace | None:
    """The namespace the whole parser would give `args`, when this parser can be sure of it;
    else None. It is sure when `args` start with a subcommand, ask for no help (whose text
    lists every flag) and give no --sim flag, and they parse."""
    name = args[0] if args else None
    if name not in COMMANDS:
        return None  # --version, --help, nothing, or a mistake: the whole parser says it
    for a in args:
        if a.startswith("--sim") or a == "--help" or (
                a.startswith("-") and not a.startswith("--") and "h" in a):  # -h, -qh, ...
            return None
    parser = _QuickParser(prog="tmbatch", allow_abbrev=False)
    _command(name)[0](parser.add_subparsers(dest="command", metavar="COMMAND"))
    try:
        return parser.parse_args(args)
    except _Unsure:
        return None


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
    ns = _quick_parse(args)
    if ns is None:
        parser = build_parser()
        ns = parser.parse_args(args)
        if ns.command is None:
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
    setup_logging(getattr(ns, "verbose", 0), getattr(ns, "quiet", False),
                  getattr(ns, "log_format", "text"))
    command = _command(ns.command)[1]
    if argv is None:
        # The process is tmbatch's own (not a caller's, in-process): what its start made
        # (modules, aiohttp's among them) lives as long as it does, so out of the collector's
        # way, a full collection during a run walks only what the run made (~11 ms less for
        # each one in a 20,000-line run; cpu_bench: ~0.8 % of the run's CPU)
        gc.freeze()
    try:
        code = command(ns)
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
