"""The failed lines of an output directory as they stand: the last failure record per line.

failures.jsonl is appended to, so a line resent and failed again has several records, and
one that succeeded later still has its old ones: the journal's line states say which record
is current. The end of a run (its advice), `resend` and `export --failed` read them here,
so all three agree on what failed and why. Memory is bounded by the number of failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from tmbatch.base.files import FAILURES
from tmbatch.journal.compact import LineStates
from tmbatch.policy import Cause, Fix, Outcome, fix_for


@dataclass(frozen=True, slots=True)
class Failed:
    """One line's failure, as failures.jsonl says it."""

    line: int
    custom_id: str | None
    cls: Outcome
    code: str
    message: str
    attempts: int

    @property
    def fix(self) -> Fix:
        return fix_for(self.cls, self.code)

    @property
    def cause(self) -> Cause:
        return self.fix.cause

    @property
    def resendable(self) -> bool:
        """`resend --class` sends a line as it is: only one that was sent (it may go through
        now) or that the server did not serve (re-checked first) can get another answer; a
        bad line, or a request the server refused as written, needs correcting first."""
        if self.cause is Cause.SERVED:
            return True
        return self.attempts > 0 and self.cause is not Cause.REQUEST


def last_failures(out_dir: Path) -> dict[int, Failed]:
    """The last failure record of each line in failures.jsonl (a torn or foreign line is
    skipped: it is not a record)."""
    out: dict[int, Failed] = {}
    path = out_dir / FAILURES
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = orjson.loads(raw)
                err = rec["error"]
                cid = rec.get("custom_id")
                line = rec["line"]
                if type(line) is not int:
                    continue
                out[line] = Failed(line, cid if isinstance(cid, str) else None,
                                   Outcome(err["class"]), str(err.get("code") or ""),
                                   str(err.get("message") or ""), int(rec.get("attempts") or 0))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def current_failures(out_dir: Path, states: LineStates) -> dict[int, Failed]:
    """The lines whose current outcome (the journal's) is the failure last recorded for it."""
    return {line: r for line, r in last_failures(out_dir).items()
            if states.outcome(line) is r.cls}
