"""The output directory: a new job's header, or the checks that make a resume safe.

A resume must be the same job: same input (by fingerprint), same options that shape
requests. Anything else is refused before a byte is sent, and `--restart` moves the old
files aside instead of deleting results that were paid for.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from tmbatch import __version__
from tmbatch.files import FAILURES, FILE_MODE, JOURNAL, LOCK, RESULTS, SUMMARY, make_dir
from tmbatch.journal import JournalError, ResumeState, load
from tmbatch.options import RunOptions
from tmbatch.reader import fingerprint
from tmbatch.words import setting

log = logging.getLogger("tmbatch")


def lock_output(out_dir: Path) -> int:
    """One run per output directory: two writers would interleave the journal."""
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(
            f"another tmbatch process is using {out_dir}; wait for it or stop it first"
        ) from None
    return fd


def prepare_output(opts: RunOptions) -> tuple[dict[str, Any], ResumeState | None]:
    """Start a new journal, or check that this is the same job and load it to resume."""
    out = opts.out_dir
    stdin = opts.input == "-"
    fp = "stdin" if stdin else fingerprint(opts.input)  # a bad input leaves no empty out/
    make_dir(out)
    journal = out / JOURNAL
    if journal.exists() and opts.restart:
        aside = out / f"previous-{time.strftime('%Y%m%dT%H%M%S')}"
        make_dir(aside)
        for name in (JOURNAL, RESULTS, FAILURES, SUMMARY):
            if (out / name).exists():
                os.replace(out / name, aside / name)
        log.warning("--restart: the previous run's files were moved to %s", aside)
    if journal.exists() and journal.stat().st_size > 0:
        if stdin:
            raise JournalError(
                f"{out} holds a run already and stdin cannot be resumed; give the input as a "
                "file, use another --output, or --restart"
            )
        state = load(out)
        header = state.header
        if header.get("merged"):  # its lines' Idempotency-Keys belong to the shards' job ids
            raise JournalError(f"{out} was written by `tmbatch merge`; run (or resend) in the "
                               "shard directories, then merge again")
        if header.get("fingerprint") != fp:
            raise JournalError(
                f"{out} belongs to a different input ({header.get('input')}, fingerprint "
                f"{str(header.get('fingerprint'))[:12]}), not {opts.input} ({fp[:12]}); use "
                "another --output, or --restart to start over (old files are kept aside)"
            )
        recorded = header.get("options") or {}
        current = opts.request_shape()
        diff = [k for k in current if recorded.get(k) != current[k]]
        if diff:
            parts = ", ".join(f"{k} was {setting(recorded.get(k))}, now {setting(current[k])}"
                              for k in diff)
            raise JournalError(
                f"{out} was started with other options ({parts}); resume with the same "
                "options, or --restart"
            )
        return header, state
    header = {
        "e": "start", "v": 1, "tmbatch": __version__,
        "input": "-" if stdin else os.path.abspath(opts.input),
        "fingerprint": fp, "options": opts.request_shape(),
        "job": opts.job_id or secrets.token_hex(8), "t": time.time(),
    }
    return header, None
