"""The checkpoint: an append-only journal that makes a crash the same as a pause.

Format (`journal.jsonl`, one JSON value per line):
    {"e": "start", ...}            header: input, fingerprint, options, job id
    {"e": "resume", "t": ...}      each later run on the same directory
    ["d", line, attempt, custom_id] written and flushed *before* the bytes leave
    ["o", line, outcome, code, ...] an outcome: "ok", a failure class, or "pending"
    ["p", t, seconds]               a Retry-After pause of every worker
    ["m", results_size, failures_size]  output sizes after an outcome batch
    {"e": "budget", "t", "tokens", "usd", "prices"}  a run's budget and prices, when it has any
    ["s", t, spent, in_flight, unknown]  the job's spend so far (see below)

Spend. `spent` is the whole job's (every run's) billed tokens by model, `{model: [prompt,
completion, cached, requests]}`: an answer's `usage`, or the worst case of an attempt that
may have been billed without an answer (ambiguous). `in_flight` is `{model: [prompt, output,
attempts]}` reserved by attempts sent and not yet answered, `unknown` how many such attempts
had no estimate (a run without a budget). A snapshot is written at the start of a run, at
most every 0.25 s while answers come, and at close, so replay reads only the last one (the
hot loop does not sum per-request records). Under a budget a dispatch record carries its
reservation as a fifth element, `["d", line, attempt, custom_id, [model, prompt, output]]`.
After a crash, spend = the last snapshot's `spent` + its `in_flight` + the reservation of
every dispatch after it whose outcome did not provably refund it: under a budget never less
than was billed, at most a quarter of a second of attempts' worst cases more (without one,
those attempts are counted as `unknown`). A journal without snapshots (an older tmbatch) has
unknown spend.

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

from tmbatch.base.files import FAILURES, JOURNAL, RESULTS, OutputError, open_append, open_private
from tmbatch.journal.compact import IN_FLIGHT, UNSEEN, IdSet, LineStates
from tmbatch.policy import Outcome

log = logging.getLogger("tmbatch")

FORMAT_VERSION = 1
_OK = Outcome.OK.value  # a plain str: orjson writes it a little faster than the StrEnum
_NL = orjson.OPT_APPEND_NEWLINE  # the record's newline, without a copy to add it


class JournalError(Exception):
    """The output directory cannot be resumed as it is; the message says why and what to do."""


# -- the records ------------------------------------------------------------------------------
@dataclass(slots=True)
class DispatchRecord:
    """["d", line, attempt, custom_id(, reserved)]: flushed before the request's bytes leave;
    under a budget `reserved` is the attempt's worst case, [model, prompt, output]."""

    line: int
    attempt: int
    custom_id: str
    reserved: list[Any] | None = None

    def to_json(self) -> bytes:
        return self.of(self.line, self.attempt, self.custom_id, self.reserved)

    @staticmethod
    def of(line: int, attempt: int, custom_id: str, reserved: list[Any] | None = None) -> bytes:
        """`DispatchRecord(...).to_json()` without building the record: one per attempt."""
        if reserved is not None:
            return orjson.dumps(("d", line, attempt, custom_id, reserved), option=_NL)
        return orjson.dumps(("d", line, attempt, custom_id), option=_NL)


@dataclass(slots=True)
class OutcomeRecord:
    """["o", line, outcome, code, t, latency_ms, ttft_ms]: resume reads the first three
    fields; the time fields, present for outcomes this run saw happen, are what
    `tmbatch report` draws."""

    line: int
    outcome: Outcome
    code: str = ""
    t: float | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None

    def to_json(self) -> bytes:
        # orjson writes an Outcome (a StrEnum) as its value, without Enum.value's call
        rec: tuple[Any, ...] = ("o", self.line, self.outcome, self.code)
        if self.t is not None:
            rec += (self.t,)
            if self.latency_ms is not None or self.ttft_ms is not None:
                rec += (self.latency_ms, self.ttft_ms)
        return orjson.dumps(rec) + b"\n"

    @staticmethod
    def ok_json(line: int, t: float, latency_ms: float | None, ttft_ms: float | None) -> bytes:
        """`OutcomeRecord(line, Outcome.OK, "", t, latency_ms, ttft_ms).to_json()`, without
        building the record: one is written per answer."""
        if latency_ms is None and ttft_ms is None:
            return orjson.dumps(("o", line, _OK, "", t), option=_NL)
        return orjson.dumps(("o", line, _OK, "", t, latency_ms, ttft_ms), option=_NL)

    @classmethod
    def from_list(cls, rec: list[Any]) -> OutcomeRecord | None:
        """Parse a journal list; None for a record that is not a well-formed outcome."""
        try:
            outcome = Outcome(rec[2])
        except (IndexError, ValueError):
            return None
        fields = [*rec[3:7], None, None, None, None][:4]
        code = fields[0] if isinstance(fields[0], str) else ""
        nums = [v if isinstance(v, int | float) else None for v in fields[1:]]
        return cls(rec[1], outcome, code, *nums)


@dataclass(slots=True)
class PauseRecord:
    """["p", t, seconds]: every worker paused for a Retry-After (drawn by the report)."""

    t: float
    seconds: float

    def to_json(self) -> bytes:
        return orjson.dumps(("p", self.t, self.seconds)) + b"\n"


@dataclass(slots=True)
class MarkRecord:
    """["m", results_size, failures_size]: the output sizes after a batch of outcomes, so a
    resume knows where outcomes without a journal record can start."""

    results_size: int
    failures_size: int

    def to_json(self) -> bytes:
        # two ints: formatted directly, as orjson would (one per flush with outcomes)
        return b'["m",%d,%d]\n' % (self.results_size, self.failures_size)


@dataclass(slots=True)
class SpendRecord:
    """["s", t, spent, in_flight, unknown]: the job's spend so far (module docstring)."""

    t: float
    spent: dict[str, list[int]]
    in_flight: dict[str, list[int]] = field(default_factory=dict)
    unknown: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(("s", self.t, self.spent, self.in_flight, self.unknown)) + b"\n"

    @classmethod
    def from_list(cls, rec: list[Any]) -> SpendRecord | None:
        """Parse a journal list; None for a record that is not a well-formed snapshot."""
        try:
            t, spent, in_flight, unknown = rec[1], rec[2], rec[3], rec[4]
        except IndexError:
            return None
        if not (isinstance(t, int | float) and isinstance(spent, dict)
                and isinstance(in_flight, dict) and isinstance(unknown, int)):
            return None
        return cls(float(t), _counts(spent, 4), _counts(in_flight, 3), unknown)


def _counts(table: dict[str, Any], width: int) -> dict[str, list[int]]:
    """{model: [n, ...]} with exactly `width` integers per model, whatever was written."""
    out = {}
    for model, row in table.items():
        nums = [int(v) if isinstance(v, int | float) else 0 for v in row] \
            if isinstance(row, list) else []
        out[str(model)] = (nums + [0] * width)[:width]
    return out


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
    adopted: list[OutcomeRecord] = field(default_factory=list)  # found past the last mark
    pause_until: float = 0.0  # wall time the last Retry-After pause of every worker ends
    # spend (see the module docstring): by model [prompt, completion, cached, requests]; None
    # for a journal an older tmbatch wrote
    spend: dict[str, list[int]] | None = None
    spend_unknown: int = 0  # attempts cut off by a crash with no estimate of their spend
    budget: dict[str, Any] | None = None  # the last run's {"e": "budget"} record
    spend_at: tuple[list[Any], int] | None = None  # the last snapshot and the offset after it


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
        side_fd = open_append(side)
        try:
            os.write(side_fd, torn)
        finally:
            os.close(side_fd)
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


def nothing_sent(out_dir: Path) -> bool:
    """True when the journal holds no line's record at all: the last run stopped (or was
    refused at preflight) before sending or recording anything, so there is nothing to resume."""
    with open(out_dir / JOURNAL, "rb") as f:
        f.readline()
        for raw in f:
            if raw.startswith((b'["d"', b'["o"')):
                return False
    return True


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
    """Replay the journal into per-line states, with the cyclic GC off: millions of
    short-lived lists would make it rescan them all."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            f.readline()  # the header
            b, hashes, undone = _replay_records(f, path, state)
    finally:
        if gc_was_on:
            gc.enable()
    in_flight = state.in_flight
    for line, rec in list(in_flight.items()):
        in_flight[line] = (rec[3], rec[2])
    if undone:  # sent again by this run: the reader must not call them duplicates
        gone = {hash(cid) for cid in undone.values()}
        hashes = array("q", (h for h in hashes if h not in gone))
    state.states = LineStates(b)
    state.seen = IdSet()
    state.seen.freeze(hashes)
    replay_spend(path, state)


# Outcome spelling -> state byte, and the states a resume sends again (fatal, pending).
_STATE_OF = {o.value: o.policy.state for o in Outcome}
_SENT_AGAIN = frozenset(o.policy.state for o in Outcome if not o.policy.final)


def _replay_records(f: Any, path: Path, state: ResumeState,
                    ) -> tuple[bytearray, array, dict[int, str]]:
    """The hot loop, kept flat on purpose: a million-line job replays two million records."""
    b = bytearray(1024)
    size = len(b)
    hashes = array("q")
    hashes_append = hashes.append
    in_flight: dict[int, Any] = state.in_flight
    undone: dict[int, str] = {}  # refused while stopping or fatal: the reader sees them anew
    ok_, unseen_, inflight_ = _STATE_OF["ok"], UNSEEN, IN_FLIGHT
    codes, sent_again = _STATE_OF, _SENT_AGAIN
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    attempts = 0
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
            e = rec.get("e")
            if e == "resume":
                state.runs += 1
            elif e == "budget":
                state.budget = rec
            continue
        kind = rec[0]
        if kind == "d" or kind == "o":
            line = rec[1]
            if line >= size:
                b.extend(bytes(max(line + 1, 2 * size) - size))
                size = len(b)
            prev = b[line]
            if prev > ok_:
                state.superseded = True
            if kind == "d":
                if prev == unseen_:
                    hashes_append(hash(rec[3]))
                b[line] = inflight_
                in_flight[line] = rec  # [d, line, attempt, custom_id]: no tuple per record
                if undone:
                    undone.pop(line, None)
                attempts += 1
            else:
                new = codes[rec[2]]
                b[line] = new
                entry = in_flight.pop(line, None)
                if entry is not None and new in sent_again:
                    undone[line] = entry[3]
        elif kind == "m":
            state.last_mark = (rec[1], rec[2])
        elif kind == "p":
            state.pause_until = max(state.pause_until, rec[1] + rec[2])
        elif kind == "s":  # a few a second at most: only the last one counts
            state.spend_at = (rec, f.tell())
    state.attempts_done += attempts
    return b, hashes, undone


def replay_spend(path: Path, state: ResumeState) -> None:
    """The job's spend: the last snapshot, plus the worst case of what it may have missed.

    Only the records after the last snapshot are read again (a fraction of a second of the
    run): each dispatch there that carries a reservation counts it, unless a later outcome
    of its line provably did no work (`policy.refund`); one without counts as unknown."""
    if state.spend_at is None:
        return
    snap = SpendRecord.from_list(state.spend_at[0])
    if snap is None:
        return
    spent = snap.spent
    unknown = snap.unknown
    for model, (prompt, output, n) in snap.in_flight.items():
        _add_spend(spent, model, prompt, output, n)
    tail: dict[int, list[Any] | None] = {}
    with open(path, "rb") as f:
        f.seek(state.spend_at[1])
        for raw in f:
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                break  # a torn last line (reading without repair)
            if type(rec) is not list or len(rec) < 3:
                continue
            if rec[0] == "d":
                res = rec[4] if len(rec) > 4 else None
                tail[rec[1]] = res if isinstance(res, list) and len(res) == 3 else None
            elif rec[0] == "o" and rec[1] in tail and _refunded(rec[2]):
                del tail[rec[1]]
    for res in tail.values():
        if res is None:
            unknown += 1
        elif isinstance(res[1], int) and isinstance(res[2], int):
            _add_spend(spent, str(res[0]), res[1], res[2], 1)
    state.spend = spent
    state.spend_unknown = unknown


def _refunded(outcome: Any) -> bool:
    try:
        return Outcome(outcome).policy.refund
    except ValueError:
        return False


def _add_spend(spent: dict[str, list[int]], model: str, prompt: int, output: int,
               n: int) -> None:
    row = spent.setdefault(model, [0, 0, 0, 0])
    row[0] += prompt
    row[1] += output
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
                if found is not None and found.line in state.in_flight:
                    state.states.set(found.line, found.outcome.policy.state)
                    state.adopted.append(found)
                    del state.in_flight[found.line]


def _outcome_in_output(raw: bytes) -> OutcomeRecord | None:
    """The outcome a results/failures line records (a record without an error succeeded)."""
    try:
        rec = orjson.loads(raw)
        line = rec["line"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    err = rec.get("error")
    if not isinstance(err, dict):
        return OutcomeRecord(line, Outcome.OK)
    try:
        outcome = Outcome(err.get("class", Outcome.AMBIGUOUS))
    except ValueError:
        outcome = Outcome.AMBIGUOUS
    return OutcomeRecord(line, outcome, str(err.get("code", "")))
