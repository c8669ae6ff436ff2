"""`tmbatch merge`'s joining: the shards' outputs, labels and journals made into one directory.

Each input line keeps its first outcome in shard order; the tally says which lines have none
or more than one. Memory is a few bytes per input line plus a small entry per failed line of
the shard being read; no answer is held. The merged journal takes each line's records from
the shard whose outcome was kept, read through the journal's one reader and written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from tmbatch import __version__
from tmbatch.base.files import FAILURES, JOURNAL, LABELS, RESULTS, atomic_writer
from tmbatch.journal.format import (
    BudgetRecord,
    DispatchRecord,
    Header,
    OutcomeRecord,
    PauseRecord,
    Record,
    ResumeRecord,
    SpendRecord,
)
from tmbatch.journal.journal import spend_after
from tmbatch.journal.reading import JournalReader, Position
from tmbatch.tools.merge_checks import Part

log = logging.getLogger("tmbatch")
SHOW = 20  # line numbers listed in messages; summary.json keeps up to LIST_MAX
LIST_MAX = 1000
NO_OWNER = -1


@dataclass
class Tally:
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    missing: list[int] = field(default_factory=list)
    missing_count: int = 0
    duplicated: list[int] = field(default_factory=list)
    duplicated_count: int = 0
    foreign: int = 0  # outcomes for lines the input does not have
    # which part (index in merge order) the kept outcome of each line came from; NO_OWNER
    # when none: the merged journal takes each line's records from that part only
    owner: array = field(default_factory=lambda: array("i"))

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def count_claims(self, wanted: bytearray, claims: bytearray) -> None:
        """The lines no directory had an outcome for, and those more than one had."""
        for line in range(1, len(wanted)):
            if wanted[line] and claims[line] == 0:
                self.missing_count += 1
                if len(self.missing) < LIST_MAX:
                    self.missing.append(line)
            elif claims[line] > 1:
                self.duplicated_count += 1
                if len(self.duplicated) < LIST_MAX:
                    self.duplicated.append(line)

    def problems(self) -> list[str]:
        """What the lines say is wrong: no outcome, more than one, or a line not in the input."""
        found = []
        if self.missing_count:
            found.append(f"{self.missing_count} line(s) have no outcome in any shard: "
                         + _lines(self.missing, self.missing_count))
        if self.duplicated_count:
            found.append(f"{self.duplicated_count} line(s) have an outcome in more than one "
                         "shard (the first was kept): "
                         + _lines(self.duplicated, self.duplicated_count))
        if self.foreign:
            found.append(f"{self.foreign} outcome(s) name a line the input does not have")
        return found


def _lines(lines: list[int], count: int) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOW])
    return shown + (f", ... ({count - SHOW} more in summary.json)" if count > SHOW else "")


# -- results and failures ---------------------------------------------------------------------
def _outputs(path: Path) -> Iterator[tuple[bytes, int | None, dict[str, Any] | None]]:
    """(raw line, its input line, its error) for each record of a results/failures file."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                continue  # a torn last line from a crash is not an outcome
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            line = rec.get("line") if isinstance(rec, dict) else None
            err = rec.get("error") if isinstance(rec, dict) else None
            yield raw, line if isinstance(line, int) else None, err


def merge_outputs(parts: list[Part], wanted: bytearray, out: Path) -> Tally:
    """Write merged results/failures: the first outcome of each line, in shard order."""
    size = len(wanted)
    claims = bytearray(size)  # how many directories hold an outcome for the line (capped)
    written = bytearray(size)
    tally = Tally(owner=array("i", [NO_OWNER]) * size)
    with atomic_writer(out / RESULTS) as res_out, atomic_writer(out / FAILURES) as fail_out:
        for index, part in enumerate(parts):
            has_result = _join_results(part, index, written, tally, res_out)
            last_failure = _join_failures(part, index, has_result, written, tally, fail_out)
            for line in range(1, size):
                if has_result[line] or line in last_failure:
                    claims[line] = min(claims[line] + 1, 255)
    tally.count_claims(wanted, claims)
    return tally


def _join_results(part: Part, index: int, written: bytearray, tally: Tally,
                  dst: IO[bytes]) -> bytearray:
    """The part's successes not already written; which lines it has one for."""
    size = len(written)
    has_result = bytearray(size)
    for raw, line, _ in _outputs(part.path / RESULTS):
        if line is None or not 0 < line < size:
            tally.foreign += 1
            continue
        if has_result[line]:
            continue
        has_result[line] = 1
        if not written[line]:
            written[line] = 1
            tally.owner[line] = index
            tally.succeeded += 1
            dst.write(raw)
    return has_result


def _join_failures(part: Part, index: int, has_result: bytearray, written: bytearray,
                   tally: Tally, dst: IO[bytes]) -> dict[int, int]:
    """The last failure of each line the part has no success for, when no earlier part
    gave the line an outcome; which lines it has one for (line -> index of the record)."""
    size = len(written)
    last_failure = {}
    for i, (_, line, _) in enumerate(_outputs(part.path / FAILURES)):
        if line is not None and 0 < line < size and not has_result[line]:
            last_failure[line] = i
    for i, (raw, line, err) in enumerate(_outputs(part.path / FAILURES)):
        if line is None or last_failure.get(line) != i or written[line]:
            continue
        written[line] = 1
        tally.owner[line] = index
        cls = err.get("class") if isinstance(err, dict) else None
        tally.failed[str(cls or "unknown")] += 1
        dst.write(raw)
    return last_failure


def merge_labels(parts: list[Part], out: Path) -> Counter[str] | None:
    """Each shard's labels.jsonl is in line order; a k-way merge keeps input order."""
    have = [p for p in parts if (p.path / LABELS).exists()]
    if not have:
        return None
    for p in parts:
        if p not in have:
            log.warning("%s has no %s (its run did not finish?): the merged %s lacks its lines",
                        p.path, LABELS, LABELS)
    counts: Counter[str] = Counter()

    def rows(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
        for raw in f:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                yield int(orjson.loads(raw).get("line") or 0), raw

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p.path / LABELS, "rb")) for p in have]
        dst = stack.enter_context(atomic_writer(out / LABELS))
        for _, raw in heapq.merge(*(rows(f) for f in files), key=lambda t: t[0]):
            counts[str(orjson.loads(raw).get("status"))] += 1
            dst.write(raw)
    return counts


# -- the journal and its books ----------------------------------------------------------------
@dataclass
class Books:
    """The shards' spend as their journals keep it, gathered while their records are copied:
    every snapshot in time order (for the cost over time), each shard's last snapshot and
    where it ends (a crash's tail after it is counted as a resume counts it), its last
    budget record. The job's books are their sum: each pod kept its own, and was held to its
    share of the job's budget."""

    snaps: list[tuple[float, int, SpendRecord]] = field(default_factory=list)
    last: dict[int, tuple[SpendRecord, Position]] = field(default_factory=dict)
    budgets: dict[int, BudgetRecord] = field(default_factory=dict)

    def close(self, parts: list[Part]) -> list[Record]:
        """Sum the shards' books; the merged journal's records that state them: a budget
        record (the shards' shares added up, the job's budget again; their prices), a
        snapshot at each shard snapshot's time (every shard's latest so far, summed), then
        the totals."""
        if not self.last:
            return []
        spent: dict[str, list[int]] = {}
        spent_unknown = 0
        for index, (snap, at) in sorted(self.last.items()):
            rows, unknown = spend_after(parts[index].path / JOURNAL, snap, at)
            _add_rows(spent, rows)
            spent_unknown += unknown
        out: list[Record] = []
        if self.budgets:
            budgets = self.budgets.values()
            out.append(BudgetRecord(
                t=max(b.t for b in budgets),
                tokens=_budget_sum([b.tokens for b in budgets], len(parts)),
                usd=_budget_sum([b.usd for b in budgets], len(parts)),
                prices={k: v for b in budgets for k, v in b.prices.items()}))
        latest: dict[int, SpendRecord] = {}
        for t, index, snap in sorted(self.snaps, key=lambda s: s[0]):
            latest[index] = snap
            total: dict[str, list[int]] = {}
            in_flight: dict[str, list[int]] = {}
            for one in latest.values():
                _add_rows(total, one.spent)
                _add_rows(in_flight, one.in_flight)
            out.append(SpendRecord(t, total, in_flight, sum(s.unknown for s in latest.values())))
        last_t = max(t for t, _, _ in self.snaps)  # a shard with a `last` has a snapshot
        out.append(SpendRecord(last_t, spent, {}, spent_unknown))
        return out


def _add_rows(into: dict[str, list[int]], rows: dict[str, list[int]]) -> None:
    for model, row in rows.items():
        mine = into.setdefault(model, [0] * len(row))
        for i, v in enumerate(row):
            mine[i] += v


def _budget_sum(values: list[float | None], shards: int) -> float | None:
    """The job's budget in one unit: the shards' shares added up, unless some shard had none."""
    if len(values) < shards or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def merged_header(parts: list[Part]) -> Header:
    """The merged directory's header: the first shard's input and options, and the shards."""
    first = parts[0].header
    jobs = [p.header.job for p in parts]
    return Header(
        input=first.input, fingerprint=first.fingerprint,
        job="merged-" + hashlib.blake2b("\0".join(jobs).encode(), digest_size=8).hexdigest(),
        options={**first.options, "shard": None},
        t=min((p.header.t for p in parts if p.header.t is not None), default=time.time()),
        tmbatch=__version__,
        merged=[{"dir": str(p.path), "shard": list(p.shard) if p.shard else None,
                 "job": p.header.job} for p in parts])


def write_journal(parts: list[Part], owner: array, out: Path) -> Books:
    """A journal for the merged directory: a header naming the shards, then each line's
    records from the shard whose outcome was kept (and the dispatches of lines with no
    outcome anywhere: their result is unknown, not "never sent"), and every 429 pause.
    `status` and `report` read it like any run's; `run` and `resend` refuse it, because each
    shard's job id (and so each line's Idempotency-Key) lives in the shard's own directory."""
    books = Books()
    with atomic_writer(out / JOURNAL) as dst:
        dst.write(merged_header(parts).to_json())
        for index, part in enumerate(parts):
            for rec in _journal_records(part, index, owner, books):
                dst.write(rec.to_json())
        for rec in books.close(parts):
            dst.write(rec.to_json())
    return books


def _journal_records(part: Part, index: int, owner: array, books: Books) -> Iterator[Record]:
    """The records of one shard's journal that belong in the merged one (not its header: the
    merged header lists the shards); its spend and budget go into `books` instead (the
    merged journal states their sum), its marks nowhere (they point into its own files)."""
    size = len(owner)
    with JournalReader(part.path / JOURNAL) as reader:
        for rec in reader:
            kind = type(rec)
            if kind is DispatchRecord or kind is OutcomeRecord:
                kept = owner[rec.line] if rec.line < size else None  # None: not an input line
                if kept == index or (kept == NO_OWNER and kind is DispatchRecord):
                    yield rec
            elif kind is ResumeRecord or kind is PauseRecord:
                yield rec
            elif kind is SpendRecord:
                books.snaps.append((rec.t, index, rec))
                books.last[index] = (rec, reader.position())
            elif kind is BudgetRecord:
                books.budgets[index] = rec
