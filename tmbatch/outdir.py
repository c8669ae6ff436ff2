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
from typing import TYPE_CHECKING, Any

from tmbatch import __version__
from tmbatch.journal import (
    FAILURES,
    JOURNAL,
    RESULTS,
    SUMMARY,
    JournalError,
    ResumeState,
    load,
)
from tmbatch.reader import fingerprint

if TYPE_CHECKING:
    from tmbatch.runner import RunOptions

log = logging.getLogger("tmbatch")


def options_record(opts: RunOptions) -> dict[str, Any]:
    return {"endpoint": opts.endpoint, "model": opts.model, "stream": opts.stream,
            "shard": list(opts.shard) if opts.shard else None}


def lock_output(out_dir: Path) -> int:
    """One run per output directory: two writers would interleave the journal."""
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
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
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    journal = out / JOURNAL
    if journal.exists() and opts.restart:
        aside = out / f"previous-{time.strftime('%Y%m%dT%H%M%S')}"
        aside.mkdir(mode=0o700)
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
        if header.get("fingerprint") != fp:
            raise JournalError(
                f"{out} belongs to a different input ({header.get('input')}, fingerprint "
                f"{str(header.get('fingerprint'))[:12]}), not {opts.input} ({fp[:12]}); use "
                "another --output, or --restart to start over (old files are kept aside)"
            )
        recorded = header.get("options") or {}
        current = options_record(opts)
        diff = [k for k in current if recorded.get(k) != current[k]]
        if diff:
            parts = ", ".join(f"{k} was {recorded.get(k)!r}, now {current[k]!r}" for k in diff)
            raise JournalError(
                f"{out} was started with other options ({parts}); resume with the same "
                "options, or --restart"
            )
        return header, state
    header = {
        "e": "start", "v": 1, "tmbatch": __version__,
        "input": "-" if stdin else os.path.abspath(opts.input),
        "fingerprint": fp, "options": options_record(opts),
        "job": opts.job_id or secrets.token_hex(8), "t": time.time(),
    }
    return header, None
