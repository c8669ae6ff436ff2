"""The states a kill -9 can leave an output directory in, made exactly from a finished run.

The writer's order is the crash-safety argument (`journal/writer.py`): a dispatch record is a
write(2) of its own, made before the request's bytes leave; a flush writes results.jsonl, then
failures.jsonl, then one journal write with the outcomes, the mark of the outputs' sizes and
any spend snapshot. A kill lands between two writes, so every state it can leave is the
finished journal cut at the start of one of its writes, with the outputs at the sizes of the
last mark before the cut, or (a kill between a flush's output writes and its journal write)
at the sizes of the mark that flush's journal write would have carried (or with only
results.jsonl's write made).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import orjson


@dataclass(frozen=True)
class Cut:
    """A state a kill can leave: the journal's size and the outputs' sizes."""

    journal: int
    results: int
    failures: int
    outputs_ahead: bool  # the outputs hold a flush whose journal write the kill cut off


def cuts(journal: bytes) -> list[Cut]:
    """Every state, in journal order. A flush's journal write starts with the first record
    after a dispatch record or after a mark or snapshot (the records that end a write) and
    ends with its mark; a write with no outcome (a snapshot alone, a pause) needs no mark."""
    found: list[Cut] = []
    offset, mark, start, prev = 0, (0, 0), None, "m"
    for raw in journal.splitlines(keepends=True):
        rec = orjson.loads(raw)
        kind = rec[0] if isinstance(rec, list) else "h"
        if kind == "d":
            found.append(Cut(offset, *mark, outputs_ahead=False))
        elif kind != "h" and prev in ("d", "m", "s", "h") and start is None:
            start = offset
            found.append(Cut(offset, *mark, outputs_ahead=False))
        if kind == "m":
            if start is not None:
                if rec[1] != mark[0] and rec[2] != mark[1]:  # killed between the two
                    found.append(Cut(start, rec[1], mark[1], outputs_ahead=True))
                found.append(Cut(start, rec[1], rec[2], outputs_ahead=True))
            mark = (rec[1], rec[2])
        if kind in ("m", "s", "d"):
            start = None
        prev, offset = kind, offset + len(raw)
    return found


def make(done: Path, out: Path, cut: Cut) -> None:
    """`out`: a copy of the finished run's directory `done` as `cut` leaves it."""
    shutil.copytree(done, out)
    for name, size in (("journal.jsonl", cut.journal), ("results.jsonl", cut.results),
                       ("failures.jsonl", cut.failures)):
        if (out / name).exists():
            os.truncate(out / name, size)
    (out / "summary.json").unlink(missing_ok=True)
