"""Why a run stops, and the exit code and message that say so.

A run can be asked to stop by a signal, by a fatal answer (401/403), by an output file
that cannot be written, or by its budget, and several can happen in one run (a 401 arriving
during a SIGTERM drain). Nothing new is admitted once any of them is set; the most serious
one is what the user is told and what the exit code says: an unwritable disk, then a fatal
refusal, then the budget, then the signal.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from enum import Enum

from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.logs import say


class Stopped(Exception):
    """Raised inside an attempt when the run is stopping: nothing was sent for it."""


class StopReason(Enum):
    IO_ERROR = ExitCode.IO
    FATAL = ExitCode.FATAL
    BUDGET = ExitCode.BUDGET
    SIGINT = ExitCode.SIGINT
    SIGTERM = ExitCode.SIGTERM

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode(self.value)

    @property
    def label(self) -> str:
        """The `stopped` field of summary.json: the signal's name, "fatal", "io_error" or
        "budget"."""
        return self.name if self in (StopReason.SIGINT, StopReason.SIGTERM) else \
            self.name.lower()


@dataclass
class Stop:
    """The run's stop state, shared by the pipeline, the workers and the signal handler."""

    signal: StopReason | None = None
    signals: int = 0  # a second one stops at once
    fatal: str | None = None
    io_error: str | None = None
    budget: str | None = None  # why the budget is reached
    # Any reason set: read before every attempt, so a plain field (kept by the on_* methods)
    stopping: bool = False

    @property
    def reason(self) -> StopReason | None:
        if self.io_error is not None:
            return StopReason.IO_ERROR
        if self.fatal is not None:
            return StopReason.FATAL
        if self.budget is not None:
            return StopReason.BUDGET
        return self.signal

    def on_signal(self, signum: int) -> int:
        """Count a signal; the first one names the stop. Returns how many have come."""
        self.signals += 1
        self.stopping = True
        if self.signal is None:
            self.signal = StopReason.SIGTERM if signum == signal.SIGTERM else StopReason.SIGINT
        return self.signals

    def on_fatal(self, message: str) -> bool:
        """True the first time: the caller logs it once."""
        if self.fatal is not None:
            return False
        self.fatal, self.stopping = message, True
        return True

    def on_budget(self, message: str) -> bool:
        """True the first time: the caller logs it once."""
        if self.budget is not None:
            return False
        self.budget, self.stopping = message, True
        return True

    def on_io_error(self, message: str) -> None:
        if self.io_error is None:
            self.io_error, self.stopping = message, True

    def exit_code(self, failed_lines: int) -> ExitCode:
        reason = self.reason
        if reason is None:
            return ExitCode.FAILED if failed_lines else ExitCode.OK
        return reason.exit_code

    def announce(self) -> None:
        """The last line a stopped run prints: why, and what to do."""
        reason = self.reason
        if reason is StopReason.IO_ERROR:
            say("stopped", f"stopped: {self.io_error}", text=f"tmbatch: stopped: {self.io_error}",
                level=logging.ERROR, reason="io_error", exit_code=ExitCode.IO)
        elif reason is StopReason.FATAL:
            # the text was logged in full when it happened (`on_fatal`'s caller): once is
            # enough on a terminal; the JSON event keeps it for a machine reading the end
            say("stopped", f"stopped by a fatal error: {self.fatal}",
                text="tmbatch: stopped by the fatal error above; nothing more was sent",
                level=logging.ERROR, reason="fatal", exit_code=ExitCode.FATAL)
        elif reason is StopReason.BUDGET:
            msg = (f"budget reached: {self.budget}. Unsent lines stay pending: run the same "
                   "command with a larger budget to continue")
            say("stopped", msg, text=f"tmbatch: {msg}", level=logging.WARNING, reason="budget",
                exit_code=ExitCode.BUDGET)
        elif reason is not None:
            msg = (f"interrupted ({reason.name}); run the same command again to resume "
                   "where it stopped")
            say("interrupted", msg, text=f"tmbatch: {msg}", level=logging.WARNING,
                signal=reason.name, exit_code=reason.exit_code)
