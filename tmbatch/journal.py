"""The checkpoint: an append-only journal that makes a crash the same as a pause.

Format (`journal.jsonl`, one JSON value per line):
    {"e": "start", ...}            header: input, fingerprint, options, job id
    {"e": "resume", "t": ...}      each later run on the same directory
    ["d", line, attempt, custom_id] written and flushed *before* the bytes leave
    ["o", line, cls, code]          an outcome; cls is "ok" or a failure class
    ["m", results_size, failures_size]  output sizes after an outcome batch

Results and failures are flushed before the journal records that point at them,
so after a kill -9 an outcome can be in `results.jsonl` without its journal
record (found again through the last mark), never the reverse. A dispatch with
no outcome is `ambiguous` on resume: the server may have done the work.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tmbatch.compact import (
    FAILED_BASE,
    FATAL_STATE,
    IN_FLIGHT,
    OK,
    UNSEEN,
    IdSet,
    LineStates,
)
from tmbatch.safety import CLASSES

log = logging.getLogger("tmbatch")

JOURNAL = "journal.jsonl"
RESULTS = "results.jsonl"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
FORMAT_VERSION = 1


class JournalError(Exception):
    """The output directory cannot be resumed as it is; the message says why and what to do."""


def state_for(cls: str) -> int:
    """"pending" is an attempt the server refused when the run was stopping: read it again."""
    if cls == "pending":
        return UNSEEN
    return OK if cls == "ok" else FAILED_BASE + CLASSES.index(cls)



@dataclass
class ResumeState:
    header: dict[str, Any]
    states: LineStates = field(default_factory=LineStates)
    seen: IdSet = field(default_factory=IdSet)
    in_flight: dict[int, tuple[str, int]] = field(default_factory=dict)  # line -> (id, attempts)
    attempts_done: int = 0
    last_mark: tuple[int, int] = (0, 0)
    repaired: list[str] = field(default_factory=list)
    runs: int = 1
    superseded: bool = False  # some line got a newer outcome than a failure already written
    adopted: list[tuple[int, str, str]] = field(default_factory=list)  # found past the last mark


def repair_torn(path: Path) -> str | None:
    """Cut a torn last line (no trailing newline) into a side file; never parse it as data."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        pos = size
        chunk = 1 << 16
        cut = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            i = data.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        f.seek(cut)
        torn = f.read()
        side = path.with_name(f"{path.name}.torn-{int(time.time())}")
        with open(side, "ab") as s:
            s.write(torn)
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    msg = f"{path.name}: a torn last line ({len(torn)} bytes) was moved to {side.name}"
    log.warning("%s", msg, extra={"event": "torn_line_repaired", "file": path.name,
                                  "bytes": len(torn), "moved_to": side.name})
    return msg


def read_header(out_dir: Path) -> dict[str, Any]:
    path = out_dir / JOURNAL
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except FileNotFoundError:
        raise JournalError(f"{out_dir} has no {JOURNAL}: not a tmbatch output directory") from None
    try:
        header = orjson.loads(first)
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("e") != "start":
        raise JournalError(
            f"{path}: the first line is not a tmbatch journal header; "
            "use another --output directory or --restart"
        )
    return header


def load(out_dir: Path, *, repair: bool = True) -> ResumeState:
    """Rebuild per-line state from the journal: done, failed by class, in flight.

    `repair=False` reads without touching anything (for `status` while a run may be
    writing): a last line without its newline is then skipped, not cut.
    """
    repaired = []
    if repair:
        names = (JOURNAL, RESULTS, FAILURES)
        repaired = [m for m in (repair_torn(out_dir / n) for n in names) if m]
    state = ResumeState(header=read_header(out_dir), repaired=repaired)
    _replay(out_dir / JOURNAL, state)
    _adopt_tail(out_dir, state)
    return state


def _replay(path: Path, state: ResumeState) -> None:
    """Replay the journal into per-line states; the hot loop is kept flat on purpose."""
    b = bytearray(1024)
    size = len(b)
    hashes = array("q")
    hashes_append = hashes.append
    in_flight = state.in_flight
    undone: dict[int, str] = {}  # refused while stopping: the reader must see them as new
    superseded = False
    attempts = runs = 0
    mark = state.last_mark
    ok_, unseen_, fatal_, inflight_ = OK, UNSEEN, FATAL_STATE, IN_FLIGHT
    codes = {"ok": OK, "pending": UNSEEN}
    for i, cls in enumerate(CLASSES):
        codes[cls] = FAILED_BASE + i
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of short-lived lists: the cyclic GC would rescan them all
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            f.readline()  # the header
            for raw in f:
                try:
                    rec = loads(raw)
                except decode_error:
                    if raw.endswith(b"\n"):
                        raise JournalError(
                            f"{path}: a corrupt line (not a torn last line): {raw[:80]!r}; "
                            "inspect it, or start over with --restart (old files are kept aside)"
                        ) from None
                    break  # torn last line (only possible with repair=False): never data
                if type(rec) is not list:
                    if rec.get("e") == "resume":
                        runs += 1
                    continue
                kind = rec[0]
                if kind == "d":
                    line = rec[1]
                    if line >= size:
                        b.extend(bytes(max(line + 1, 2 * size) - size))
                        size = len(b)
                    prev = b[line]
                    if prev == unseen_:
                        hashes_append(hash(rec[3]))
                    elif prev > ok_:
                        superseded = True
                    b[line] = inflight_
                    in_flight[line] = rec  # [d, line, attempt, custom_id]: no tuple per record
                    if undone:
                        undone.pop(line, None)
                    attempts += 1
                elif kind == "o":
                    line = rec[1]
                    if line >= size:
                        b.extend(bytes(max(line + 1, 2 * size) - size))
                        size = len(b)
                    if b[line] > ok_:
                        superseded = True
                    new = codes[rec[2]]
                    b[line] = new
                    entry = in_flight.pop(line, None)
                    if entry is not None and new in (unseen_, fatal_):
                        undone[line] = entry[3]
                elif kind == "m":
                    mark = (rec[1], rec[2])
    finally:
        if gc_was_on:
            gc.enable()
    for line, rec in list(in_flight.items()):
        in_flight[line] = (rec[3], rec[2])
    if undone:
        gone = {hash(cid) for cid in undone.values()}
        hashes = array("q", (h for h in hashes if h not in gone))
    state.states = LineStates(b)
    state.seen = IdSet()
    state.seen.freeze(hashes)
    state.superseded = superseded
    state.attempts_done = attempts
    state.runs += runs
    state.last_mark = mark


def _adopt_tail(out_dir: Path, state: ResumeState) -> None:
    """Outcomes flushed to results/failures just before a crash, after the last mark."""
    if not state.in_flight:
        return
    for name, offset in ((RESULTS, state.last_mark[0]), (FAILURES, state.last_mark[1])):
        path = out_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size <= offset:
            continue
        with open(path, "rb") as f:
            f.seek(max(offset - 1, 0))
            if offset > 0 and f.read(1) != b"\n":
                f.readline()  # the mark points mid-line (file was rewritten): resync
            for raw in f:
                try:
                    rec = orjson.loads(raw)
                    line = rec["line"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
                if line in state.in_flight:
                    err = rec.get("error")
                    cls = err.get("class", "ambiguous") if isinstance(err, dict) else "ok"
                    state.states.set(line, state_for(cls))
                    state.adopted.append((line, cls, (err or {}).get("code", "")))
                    del state.in_flight[line]
