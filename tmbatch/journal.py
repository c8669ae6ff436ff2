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

import logging
import os
import time
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
    id_hash,
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


def class_of(state: int) -> str:
    if state == OK:
        return "ok"
    if state == IN_FLIGHT:
        return "in_flight"
    return CLASSES[state - FAILED_BASE]


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
    states, seen, in_flight = state.states, state.seen, state.in_flight
    loads = orjson.loads
    undone: dict[int, str] = {}  # refused when stopping: the reader must see them as new
    with open(out_dir / JOURNAL, "rb") as f:
        f.readline()
        for n, raw in enumerate(f, start=2):
            if not raw.endswith(b"\n"):
                break  # torn (only possible with repair=False): never parsed as data
            try:
                rec = loads(raw)
            except orjson.JSONDecodeError:
                raise JournalError(
                    f"{out_dir / JOURNAL} line {n} is corrupt (not a torn last line); "
                    "inspect it, or start over with --restart (old files are kept aside)"
                ) from None
            kind = rec[0] if isinstance(rec, list) else rec.get("e")
            if kind == "d":
                line = rec[1]
                prev = states.get(line)
                if prev > OK:
                    state.superseded = True
                states.set(line, IN_FLIGHT)
                seen.add_hash(id_hash(rec[3]))
                in_flight[line] = (rec[3], rec[2])
                undone.pop(line, None)
                state.attempts_done += 1
            elif kind == "o":
                line = rec[1]
                prev = states.get(line)
                if prev > OK:
                    state.superseded = True
                new = state_for(rec[2])
                states.set(line, new)
                entry = in_flight.pop(line, None)
                if entry is not None and new in (UNSEEN, FATAL_STATE):
                    undone[line] = entry[0]
            elif kind == "m":
                state.last_mark = (rec[1], rec[2])
            elif kind == "resume":
                state.runs += 1
    for cid in undone.values():
        seen.discard(cid)
    _adopt_tail(out_dir, state)
    return state


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
