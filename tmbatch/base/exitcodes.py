"""Exit codes: the one table every command returns from, `--help` prints and the README lists.

Scripts, cron and Kubernetes decide what to do next from these numbers alone (resume, page
someone, merge), so each has one meaning in every command.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    FATAL = 3
    IO = 4
    INCOMPLETE = 5
    BUDGET = 6
    INTERNAL = 70
    SIGINT = 130
    PIPE = 141
    SIGTERM = 143


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "every line succeeded",
    ExitCode.FAILED: "the run finished and some lines failed (see failures.jsonl)",
    ExitCode.USAGE: "usage, configuration or input error: nothing was sent",
    ExitCode.FATAL: "stopped by a fatal error (401/403, or no model of the input is served)",
    ExitCode.IO: "an output file could not be written (disk full, I/O error); resume when fixed",
    ExitCode.INCOMPLETE: "merge only: some input lines have no outcome, or more than one",
    ExitCode.BUDGET: "budget reached (--budget-tokens/--budget-usd): unsent lines stay pending; "
    "run again with a larger budget to continue",
    ExitCode.INTERNAL: "a bug in tmbatch (TMBATCH_DEBUG=1 shows the traceback)",
    ExitCode.SIGINT: "interrupted by SIGINT (Ctrl-C); run the same command again to resume",
    ExitCode.PIPE: "the reader of stdout went away (`| head`); what it read was complete",
    ExitCode.SIGTERM: "stopped by SIGTERM (e.g. Kubernetes eviction); run it again to resume",
}


def help_text() -> str:
    """The `exit codes:` block of --help."""
    rows = [f"  {int(code):<4} {MEANINGS[code]}" for code in ExitCode]
    return "exit codes:\n" + "\n".join(rows) + "\n"
