"""The checkpoint: an append-only journal that makes a crash the same as a pause.

Its records and the one reader of them are in `journal.format`; this module replays them into
what a resume needs (`load`).

Spend. `spent` is the whole job's (every run's) billed tokens by model, `{model: [prompt,
completion, cached, requests]}`: an answer's `usage`, or the worst case of an attempt that
may have been billed without an answer (ambiguous). `in_flight` is `{model: [prompt, output,
attempts]}` reserved by attempts sent and not yet answered; `unknown` counts attempts with no
estimate (only journals of an older tmbatch have them). Every dispatch record carries its
attempt's worst case, `["d", line, attempt, custom_id, [model, prompt, output]]`, with or
without a budget, and every journal write after an attempt ended carries a snapshot, after
the outcomes it counts, so replay reads only the last one (the hot loop does not sum
per-request records). After a crash, spend = the last snapshot's `spent` + its `in_flight` +
the worst case of every dispatch after it that no outcome provably refunded. An answer in
the journal is therefore counted by its usage, in every later run; only an attempt with no
outcome counts its worst case: never less than was billed, more only by those worst cases.
A journal without snapshots (an older tmbatch) has unknown spend.

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

from tmbatch.base.files import (
    FAILURES,
    JOURNAL,
    RESULTS,
    OutputError,
    open_append,
    open_private,
    output_error,
)
from tmbatch.journal.compact import IN_FLIGHT, UNSEEN, IdSet, LineStates
from tmbatch.journal.format import (
    BudgetRecord,
    DispatchRecord,
    Header,
    MarkRecord,
    OutcomeRecord,
    PauseRecord,
    Record,
    ResumeRecord,
    SpendRecord,
)
from tmbatch.journal.format import JournalError as JournalError  # its home for callers
from tmbatch.journal.reading import JournalReader, Position, records
from tmbatch.journal.reading import nothing_sent as nothing_sent
from tmbatch.journal.reading import read_header as read_header
from tmbatch.journal.records import usage_tokens
from tmbatch.policy import Outcome

log = logging.getLogger("tmbatch")


@dataclass
class ResumeState:
    header: Header
    states: LineStates = field(default_factory=LineStates)
    seen: IdSet = field(default_factory=IdSet)
    in_flight: dict[int, DispatchRecord] = field(default_factory=dict)  # line -> last attempt
    attempts_done: int = 0
    cached: int = 0  # lines answered from the response cache, never sent (`--cache`)
    last_mark: tuple[int, int] = (0, 0)
    repaired: list[str] = field(default_factory=list)
    runs: int = 1
    superseded: bool = False  # some line got a newer outcome than a failure already written
    adopted: list[OutcomeRecord] = field(default_factory=list)  # found past the last mark
    pause_until: float = 0.0  # wall time the last Retry-After pause of every worker ends
    # spend (see the module docstring): by model [prompt, completion, cached, requests]; None
    # for a journal an older tmbatch wrote
    spend: dict[str, list[int]] | None = None
    spend_unknown: int = 0  # attempts cut off by a crash with no estimate of their spend
    budget: BudgetRecord | None = None  # the last run's budget record
    spend_at: tuple[SpendRecord, Position] | None = None  # the last snapshot, where it ends


def repair_torn(path: Path) -> str | None:
    """Cut a torn last line (no trailing newline) into a side file; never parse it as data."""
    try:
        fd = open_private(path, os.O_RDWR)
    except OutputError:
        if not path.exists():
            return None
        raise
    with os.fdopen(fd, "rb+") as f:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
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
        _save_torn(side, torn)  # durable before the cut: the bytes are never only in memory
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    msg = f"{path.name}: a torn last line ({len(torn)} bytes) was moved to {side.name}"
    log.warning("%s", msg, extra={"event": "torn_line_repaired", "file": path.name,
                                  "bytes": len(torn), "moved_to": side.name})
    return msg


def _save_torn(side: Path, torn: bytes) -> None:
    """Write the torn bytes to their side file, synced. On a full disk (or any write error)
    the side file is removed again and the torn line stays where it is: an OutputError (exit 4
    for a full disk) says to free space and run again, and nothing is lost or left behind."""
    try:
        side_fd = open_append(side)
    except OutputError as exc:
        raise OutputError(f"cannot move a torn last line aside: {exc}", exc.exit_code) from None
    try:
        view = memoryview(torn)
        while view:
            view = view[os.write(side_fd, view):]
        os.fsync(side_fd)
    except OSError as exc:
        os.close(side_fd)
        side.unlink(missing_ok=True)
        raise output_error(side, exc, "cannot move a torn last line to") from None
    os.close(side_fd)


def load(out_dir: Path, *, repair: bool = True) -> ResumeState:
    """Rebuild per-line state from the journal: done, failed by class, in flight.

    `repair=False` reads without touching anything (for `status` while a run may be
    writing): a last line without its newline is then skipped, not cut.
    """
    repaired = []
    if repair:
        names = (JOURNAL, RESULTS, FAILURES)
        repaired = [m for m in (repair_torn(out_dir / n) for n in names) if m]
    with JournalReader(out_dir / JOURNAL) as reader:
        assert reader.header is not None
        state = ResumeState(header=reader.header, repaired=repaired)
        _replay(reader, state)
    if state.spend_at is not None:
        state.spend, state.spend_unknown = spend_after(out_dir / JOURNAL, *state.spend_at)
    _adopt_tail(out_dir, state)
    return state


def _replay(reader: JournalReader, state: ResumeState) -> None:
    """Replay the journal into per-line states, with the cyclic GC off: millions of
    short-lived records would make it rescan them all."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        b, hashes, undone = _replay_records(reader, state)
    finally:
        if gc_was_on:
            gc.enable()
    if undone:  # sent again by this run: the reader must not call them duplicates
        gone = {hash(cid) for cid in undone.values()}
        hashes = array("q", (h for h in hashes if h not in gone))
    state.states = LineStates(b)
    state.seen = IdSet()
    state.seen.freeze(hashes)


# Outcome -> state byte, and the states a resume sends again (fatal, pending).
_STATE_OF = {o: o.policy.state for o in Outcome}
_SENT_AGAIN = frozenset(o.policy.state for o in Outcome if not o.policy.final)


def _replay_records(reader: JournalReader, state: ResumeState,
                    ) -> tuple[bytearray, array, dict[int, str]]:
    """The hot loop, kept flat on purpose: a million-line job replays two million records."""
    b = bytearray(1024)
    size = len(b)
    hashes = array("q")
    hashes_append = hashes.append
    in_flight: dict[int, DispatchRecord] = {}
    undone: dict[int, str] = {}  # refused while stopping or fatal: the reader sees them anew
    ok_, unseen_, inflight_ = _STATE_OF[Outcome.OK], UNSEEN, IN_FLIGHT
    codes, sent_again = _STATE_OF, _SENT_AGAIN
    dispatch_, outcome_ = DispatchRecord, OutcomeRecord
    attempts = cached = 0
    for rec in reader:
        kind = type(rec)
        if kind is not dispatch_ and kind is not outcome_:
            _note(state, rec, reader)
            continue
        line = rec.line
        if line >= size:
            b.extend(bytes(max(line + 1, 2 * size) - size))
            size = len(b)
        prev = b[line]
        if prev > ok_:
            state.superseded = True
        if kind is dispatch_:
            if prev == unseen_:
                hashes_append(hash(rec.custom_id))
            b[line] = inflight_
            in_flight[line] = rec
            if undone:
                undone.pop(line, None)
            attempts += 1
        else:
            new = b[line] = codes[rec.outcome]
            entry = in_flight.pop(line, None)
            if entry is None:  # nothing was sent for it: answered from the response cache?
                cached += rec.cached
            elif new in sent_again:
                undone[line] = entry.custom_id
    state.attempts_done += attempts
    state.cached += cached
    state.in_flight = in_flight
    return b, hashes, undone


def _note(state: ResumeState, rec: Record, reader: JournalReader) -> None:
    """The records that are not about a line: a few per run, or a few a second at most."""
    if type(rec) is MarkRecord:
        state.last_mark = (rec.results_size, rec.failures_size)
    elif type(rec) is SpendRecord:  # only the last one counts
        state.spend_at = (rec, reader.position())
    elif type(rec) is PauseRecord:
        state.pause_until = max(state.pause_until, rec.t + rec.seconds)
    elif type(rec) is ResumeRecord:
        state.runs += 1
    elif type(rec) is BudgetRecord:
        state.budget = rec


def spend_after(path: Path, snap: SpendRecord, at: Position) -> tuple[dict[str, list[int]], int]:
    """The job's spend (and its attempts of unknown spend): the last snapshot, plus the worst
    case of what it may have missed.

    Only the records after the snapshot are read again (a fraction of a second of the run):
    each dispatch there that carries a reservation counts it, unless a later outcome of its
    line provably did no work (`policy.refund`); one without counts as unknown."""
    spent = {model: list(row) for model, row in snap.spent.items()}
    unknown = snap.unknown
    for model, (prompt, output, n) in snap.in_flight.items():
        _add_spend(spent, model, prompt, output, n)
    tail: dict[int, list[tuple[str, int, int] | None]] = {}
    for rec in records(path, at):
        if type(rec) is DispatchRecord:
            tail.setdefault(rec.line, []).append(rec.reserved)
        elif type(rec) is OutcomeRecord and tail.get(rec.line) and rec.outcome.policy.refund:
            tail[rec.line].pop()  # that attempt provably did no work
    for res in (r for attempts in tail.values() for r in attempts):
        if res is None:
            unknown += 1
        else:
            _add_spend(spent, res[0], res[1], res[2], 1)
    return spent, unknown


def _add_spend(spent: dict[str, list[int]], model: str, prompt: int, output: int,
               n: int, cached: int = 0) -> None:
    row = spent.setdefault(model, [0, 0, 0, 0])
    row[0] += prompt
    row[1] += output
    row[2] += cached
    row[3] += n


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
                found = _outcome_in_output(raw)
                if found is None or found[0].line not in state.in_flight:
                    continue
                record, body = found
                sent = state.in_flight.pop(record.line)
                state.states.set(record.line, record.outcome.policy.state)
                state.adopted.append(record)
                if state.spend is not None:
                    _settle_found(state.spend, sent.reserved, record.outcome, body)


def _settle_found(spent: dict[str, list[int]], reserved: tuple[str, int, int] | None,
                  outcome: Outcome, body: Any) -> None:
    """An outcome found past the last mark is counted as its run would have counted it: an
    answer at its usage, a failure that provably did no work (`policy.refund`) at nothing,
    not at the worst case the books hold for it. They do hold that: the snapshot that would
    count it settled is made by the flush that writes its outcome, and goes out in that
    flush's journal write, after the outcome's line (`Writer.flush`); a crash between the two
    leaves the snapshot before, which counted the attempt in flight, or the tail after it
    (`spend_after`), which counts its dispatch record. Both count what the dispatch record
    carries. An answer without usage stays at its worst case: never below what was billed."""
    if reserved is None or reserved[0] not in spent:
        return
    model, prompt, output = reserved
    if outcome.policy.refund:
        _add_spend(spent, model, -prompt, -output, -1)
        return
    used = usage_tokens(body) if outcome is Outcome.OK and isinstance(body, dict) else None
    if used is not None:
        _add_spend(spent, model, used[0] - prompt, used[1] - output, 0, cached=used[2])


def _outcome_in_output(raw: bytes) -> tuple[OutcomeRecord, Any] | None:
    """The outcome a results/failures line records (a record without an error succeeded),
    and an answer's body."""
    try:
        rec = orjson.loads(raw)
        line = rec["line"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    err = rec.get("error")
    if not isinstance(err, dict):
        response = rec.get("response")
        return OutcomeRecord(line, Outcome.OK), \
            response.get("body") if isinstance(response, dict) else None
    try:
        outcome = Outcome(err.get("class", Outcome.AMBIGUOUS))
    except ValueError:
        outcome = Outcome.AMBIGUOUS
    return OutcomeRecord(line, outcome, str(err.get("code", ""))), None
