"""`tmbatch status out/`: where a run stands, read-only, safe while the run is going.

Answers the questions asked after a crash or an eviction: is it finished, how many
lines are done, failed (by class), never sent, or of unknown outcome.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from tmbatch.base.files import JOURNAL, LOCK
from tmbatch.inputs.files import fingerprint
from tmbatch.inputs.lines import count_lines
from tmbatch.journal.journal import load
from tmbatch.policy import Outcome
from tmbatch.run.summaries import Counts, read_summary
from tmbatch.spend.usage import render_spend, spend_status


def is_running(out_dir: Path) -> bool:
    """True when a tmbatch process holds the directory's lock right now."""
    try:
        fd = os.open(out_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def status(out_dir: Path) -> dict[str, Any]:
    running = is_running(out_dir)
    state = load(out_dir, repair=False)
    header = state.header
    input_path = header.input
    matches = None
    if input_path != "-" and os.path.isfile(input_path):
        matches = fingerprint(input_path) == header.fingerprint
    counts = job_counts(state, out_dir, running)
    total = counts.lines
    unknown = counts.unknown_outcome_in_flight
    fatal = counts.failed_by_class.get(Outcome.FATAL.value, 0)
    finished = not running and counts.pending == 0 and unknown == 0 and not fatal
    return {
        "merged_from": [m.get("dir") for m in header.merged or []],
        "input_readable": input_path != "-" and os.path.isfile(input_path),
        "output": str(out_dir),
        "input": input_path,
        "fingerprint": header.fingerprint,
        "input_matches": matches,
        "job_id": header.job,
        "runs": state.runs,
        "running": running,
        "finished": finished,
        "input_lines": total,
        "succeeded": counts.succeeded,
        "cached": state.cached,
        "failed": counts.failed,
        "failed_by_class": counts.failed_by_class,
        "refused_fatal_will_resend": fatal,
        "not_yet_sent": counts.pending,
        "in_flight" if running else "unknown_outcome": unknown,
        "attempts_sent": state.attempts_done,
        "spend": spend_status(state),
    }


def job_counts(state: Any, out_dir: Path, running: bool) -> Counts:
    """The job's counts (`Counts`, as the run's `done:` line and summary.json have them) from
    a loaded journal (`journal.load`): its line states, of the input's lines."""
    total = count_lines(state.header.input, state.header.shard)
    if total is None and not running:
        total = _summary_lines(out_dir, Counts.of(state.states))  # the input is gone
    return Counts.of(state.states, total)


def _summary_lines(out_dir: Path, counts: Counts) -> int | None:
    """The job's line count from summary.json, written when the last run ended, while the
    journal still agrees with it (same outcomes): a run whose input was moved or deleted
    afterwards still has its pending lines counted."""
    summary = read_summary(out_dir)
    if summary is None or summary.counts.with_outcome != counts.with_outcome \
            or summary.counts.failed != counts.failed:
        return None
    if summary.counts.lines is not None:
        return summary.counts.lines
    return counts.done + (counts.unknown_outcome_in_flight or 0) if summary.finished else None


def _input_state(s: dict[str, Any]) -> str:
    if s["input"] == "-":
        return "stdin: not checked"
    if not s["input_readable"]:
        return "not found here: counts come from the journal and summary.json"
    return {True: "matches", False: "CHANGED since the run started"}[bool(s["input_matches"])]


def render(s: dict[str, Any]) -> str:
    fails = ", ".join(f"{k} {v}" for k, v in s["failed_by_class"].items() if v) or "none"
    if s["running"]:
        where = "running now"
    elif s["finished"]:
        where = "finished"
    else:
        where = "not finished: run the same `tmbatch run` command again to resume"
    lines = [
        f"output:       {s['output']} ({where})",
        f"input:        {s['input']} (fingerprint {str(s['fingerprint'])[:12]}, "
        f"{_input_state(s)})",
        f"job id:       {s['job_id']} ({s['runs']} run(s), {s['attempts_sent']} attempt(s) sent)",
        f"input lines:  {s['input_lines'] if s['input_lines'] is not None else '?'}",
        f"succeeded:    {s['succeeded']}"
        + (f" ({s['cached']} from the response cache, never sent)" if s["cached"] else ""),
        f"failed:       {s['failed']} ({fails})"
        + (f"; the {s['refused_fatal_will_resend']} fatal are sent again on resume"
           if s["refused_fatal_will_resend"] else ""),
        f"not yet sent: {s['not_yet_sent'] if s['not_yet_sent'] is not None else '?'}",
    ]
    if s["merged_from"]:
        lines.insert(1, f"merged from:  {', '.join(map(str, s['merged_from']))}")
    if s["running"]:
        lines.append(f"in flight:    {s['in_flight']}")
    else:
        lines.append(f"unknown outcome: {s['unknown_outcome']} (dispatched, no outcome: "
                     "ambiguous on resume, never re-sent automatically)")
    lines.append(f"spent:        {render_spend(s['spend'])}")
    return "\n".join(lines)


def has_journal(out_dir: Path) -> bool:
    return (out_dir / JOURNAL).is_file()
