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
from tmbatch.journal.compact import IN_FLIGHT
from tmbatch.journal.journal import load
from tmbatch.policy import FAILURE_CLASSES, Outcome
from tmbatch.run.summaries import read_summary
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
    lines = state.states.by_outcome()
    # Failures that are not final (a `fatal` refusal) are sent again on resume.
    by_class = {cls.value: lines[cls] for cls in FAILURE_CLASSES if cls.policy.final}
    refused = sum(lines[cls] for cls in FAILURE_CLASSES if not cls.policy.final)
    input_path = header.input
    total = count_lines(input_path, header.shard)
    matches = None
    if input_path != "-" and os.path.isfile(input_path):
        matches = fingerprint(input_path) == header.fingerprint
    succeeded = lines[Outcome.OK]
    with_outcome = succeeded + sum(by_class.values())
    unknown = state.states.counts()[IN_FLIGHT]
    if total is None and not running and _summary_says_finished(out_dir, with_outcome):
        total = with_outcome + unknown  # the input is gone; the last run counted it
    not_sent = None if total is None else max(0, total - with_outcome - unknown)
    finished = not running and not_sent == 0 and unknown == 0
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
        "succeeded": succeeded,
        "failed": sum(by_class.values()),
        "failed_by_class": by_class,
        "refused_fatal_will_resend": refused,
        "not_yet_sent": not_sent,
        "in_flight" if running else "unknown_outcome": unknown,
        "attempts_sent": state.attempts_done,
        "spend": spend_status(state),
    }


def _summary_says_finished(out_dir: Path, with_outcome: int) -> bool:
    """Whether summary.json, written when the last run ended, says every line had its
    outcome, and the journal still agrees (same count): then a run whose input was moved
    or deleted afterwards is still known to be finished."""
    summary = read_summary(out_dir)
    return summary is not None and summary.finished \
        and summary.counts.with_outcome == with_outcome


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
        f"succeeded:    {s['succeeded']}",
        f"failed:       {s['failed']} ({fails})",
        f"not yet sent: {s['not_yet_sent'] if s['not_yet_sent'] is not None else '?'}"
        + (f" (+{s['refused_fatal_will_resend']} refused by a fatal error, sent on resume)"
           if s["refused_fatal_will_resend"] else ""),
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
