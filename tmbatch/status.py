"""`tmbatch status out/`: where a run stands, read-only, safe while the run is going.

Answers the questions asked after a crash or an eviction: is it finished, how many
lines are done, failed (by class), never sent, or of unknown outcome.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from tmbatch.compact import FAILED_BASE, IN_FLIGHT, OK
from tmbatch.journal import JOURNAL, load
from tmbatch.reader import fingerprint
from tmbatch.safety import CLASSES


def is_running(out_dir: Path) -> bool:
    """True when a tmbatch process holds the directory's lock right now."""
    try:
        fd = os.open(out_dir / ".lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def count_input_lines(path: str, shard: list[int] | None) -> int | None:
    """Non-blank input lines this output directory is responsible for."""
    if path == "-" or not os.path.isfile(path):
        return None
    n = line = 0
    with open(path, "rb", buffering=1 << 20) as f:
        for raw in f:
            line += 1
            if shard and (line - 1) % shard[1] != shard[0]:
                continue
            if raw.strip() and not (line == 1 and raw.strip() == b"\xef\xbb\xbf"):
                n += 1
    return n


def status(out_dir: Path) -> dict[str, Any]:
    running = is_running(out_dir)
    state = load(out_dir, repair=False)
    header = state.header
    counts = state.states.counts()
    by_class = {cls: counts[FAILED_BASE + i] for i, cls in enumerate(CLASSES)}
    # `fatal` lines were refused before any work: they are sent again on resume.
    refused = by_class.pop("fatal")
    input_path = header.get("input", "-")
    shard = (header.get("options") or {}).get("shard")
    total = count_input_lines(input_path, shard)
    matches = None
    if input_path != "-" and os.path.isfile(input_path):
        matches = fingerprint(input_path) == header.get("fingerprint")
    with_outcome = counts[OK] + sum(by_class.values())
    unknown = counts[IN_FLIGHT]
    not_sent = None if total is None else max(0, total - with_outcome - unknown)
    finished = not running and not_sent == 0 and unknown == 0
    return {
        "output": str(out_dir),
        "input": input_path,
        "fingerprint": header.get("fingerprint"),
        "input_matches": matches,
        "job_id": header.get("job"),
        "runs": state.runs,
        "running": running,
        "finished": finished,
        "input_lines": total,
        "succeeded": counts[OK],
        "failed": sum(by_class.values()),
        "failed_by_class": by_class,
        "refused_fatal_will_resend": refused,
        "not_yet_sent": not_sent,
        "in_flight" if running else "unknown_outcome": unknown,
        "attempts_sent": state.attempts_done,
    }


def render(s: dict[str, Any]) -> str:
    fails = ", ".join(f"{k} {v}" for k, v in s["failed_by_class"].items() if v) or "none"
    if s["running"]:
        where = "running now"
    elif s["finished"]:
        where = "finished"
    else:
        where = "not finished: run the same `tmbatch run` command again to resume"
    match = {True: "matches", False: "CHANGED since the run started", None: "not checked"}
    lines = [
        f"output:       {s['output']} ({where})",
        f"input:        {s['input']} (fingerprint {str(s['fingerprint'])[:12]}, "
        f"{match[s['input_matches']]})",
        f"job id:       {s['job_id']} ({s['runs']} run(s), {s['attempts_sent']} attempt(s) sent)",
        f"input lines:  {s['input_lines'] if s['input_lines'] is not None else '?'}",
        f"succeeded:    {s['succeeded']}",
        f"failed:       {s['failed']} ({fails})",
        f"not yet sent: {s['not_yet_sent'] if s['not_yet_sent'] is not None else '?'}"
        + (f" (+{s['refused_fatal_will_resend']} refused by a fatal error, sent on resume)"
           if s["refused_fatal_will_resend"] else ""),
    ]
    if s["running"]:
        lines.append(f"in flight:    {s['in_flight']}")
    else:
        lines.append(f"unknown outcome: {s['unknown_outcome']} (dispatched, no outcome: "
                     "ambiguous on resume, never re-sent automatically)")
    return "\n".join(lines)


def has_journal(out_dir: Path) -> bool:
    return (out_dir / JOURNAL).is_file()
