"""The output directory: a new job's header, or the checks that make a resume safe.

Everything here is local and happens before the network, in an order that never touches a
live job's files: the directory is created, then its lock is taken (a second command on a
directory in use stops here, having changed nothing), then the planted links are refused,
then `--restart` moves the old files aside, then the journal's header is compared with this
command (same input by fingerprint, same options that shape requests), and only then are torn
last lines repaired and the journal replayed. A resume must be the same job; anything else is
refused before a byte is sent, and `--restart` moves the old files aside instead of deleting
results that were paid for.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from tmbatch import __version__
from tmbatch.base.files import (
    FAILURES,
    JOURNAL,
    LOCK,
    RESULTS,
    SUMMARY,
    check_not_link,
    make_dir,
    open_private,
    output_error,
)
from tmbatch.base.words import setting
from tmbatch.inputs.files import fingerprint, url_scheme
from tmbatch.journal.format import Header
from tmbatch.journal.journal import JournalError, ResumeState, load, nothing_sent, read_header
from tmbatch.run.config import RunConfig
from tmbatch.run.remote import RemoteOutput

log = logging.getLogger("tmbatch")

RUN_FILES = (JOURNAL, RESULTS, FAILURES, SUMMARY)


@dataclass
class Lock:
    """The one-process-per-directory lock. Released by deleting the file while still holding
    it, so no `.lock` is left behind; a process that opened the old file checks the inode."""

    fd: int
    path: Path
    remote: RemoteOutput | None = None  # an output URL's lease, held with this lock

    def release(self) -> None:
        if self.remote is not None:
            self.remote.release()
            self.remote = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)


def lock_output(out_dir: Path) -> Lock:
    """One run per output directory: two writers would interleave the journal."""
    path = out_dir / LOCK
    while True:
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"another tmbatch process is using {out_dir}; wait for it to finish or stop it "
                "first (`tmbatch status` shows it), or use another --output"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return Lock(fd, path)
        os.close(fd)  # the file was released (deleted) between our open and our lock: again


def prepare_output(opts: RunConfig) -> tuple[Header, ResumeState | None, Lock]:
    """Start a new job, or check that this is the same job and load it to resume; the
    directory's lock is held on return (the caller releases it)."""
    out = opts.out_dir
    stdin = opts.input == "-"
    # a bad input leaves no empty out/; `resend --input` does not read the input at all
    fp = "stdin" if stdin else None if opts.requests is not None else fingerprint(opts.input)
    make_dir(out)
    lock = lock_output(out)
    try:
        for name in RUN_FILES:
            check_not_link(out / name)
        if opts.output_url is not None:  # the bucket is the record: rebuilt here from it
            lock.remote = RemoteOutput(opts.output_url, out)
            lock.remote.open(opts.restart)
        elif opts.restart and (out / JOURNAL).exists():
            _move_aside(out)
        journal = out / JOURNAL
        if journal.exists() and journal.stat().st_size > 0:
            header = read_header(out)
            if not nothing_sent(out):
                _check_same_job(header, opts, fp)
                return header, load(out), lock
            # The last run ended before its first request (refused at preflight, stopped):
            # nothing to resume, so this command may differ from it.
            os.unlink(journal)
            if lock.remote is not None:
                lock.remote.discard()
        return _new_header(opts, fp or fingerprint(opts.input)), None, lock
    except BaseException:
        lock.release()
        raise


def _move_aside(out: Path) -> None:
    aside = out / f"previous-{time.strftime('%Y%m%dT%H%M%S')}"
    make_dir(aside)
    for name in RUN_FILES:
        if (out / name).exists():
            try:
                os.replace(out / name, aside / name)
            except OSError as exc:
                raise output_error(out / name, exc, "cannot move aside") from None
    log.warning("--restart: the previous run's files were moved to %s", aside)


def _check_same_job(header: Header, opts: RunConfig, fp: str | None) -> None:
    out = opts.out_dir
    if header.merged:  # its lines' Idempotency-Keys belong to the shards' job ids
        raise JournalError(f"{out} was written by `tmbatch merge`; run (or resend) in the "
                           "shard directories, then merge again")
    if opts.input == "-":
        raise JournalError(
            f"{out} holds a run already and stdin cannot be resumed; give the input as a "
            "file, use another --output, or --restart"
        )
    if fp is not None and header.fingerprint != fp:
        raise JournalError(
            f"{out} belongs to a different input ({header.input}, fingerprint "
            f"{header.fingerprint[:12]}), not {opts.input} ({fp[:12]}). If you corrected "
            f"failed lines, send them: tmbatch resend {out} --input {opts.input} (matched "
            "by custom_id; a line that succeeded is never sent again); else use another "
            "--output, or --restart to start over (old files are kept aside)"
        )
    recorded = header.options
    current = opts.request_shape()
    diff = [k for k in current if recorded.get(k) != current[k]]
    if diff:
        parts = ", ".join(f"--{k} was {setting(recorded.get(k))}, now {setting(current[k])}"
                          for k in diff)
        raise JournalError(
            f"{out} was started with other options ({parts}); resume with the same "
            "options, or --restart"
        )


def _new_header(opts: RunConfig, fp: str) -> Header:
    # a URL stays a URL (`merge` reads the input again from where the journal says it is)
    where = opts.input if opts.input == "-" or url_scheme(opts.input) else os.path.abspath(
        opts.input)
    return Header(input=where,
                  fingerprint=fp, job=opts.job_id or secrets.token_hex(8),
                  options=opts.request_shape(), t=time.time(), tmbatch=__version__)
