"""`tmbatch merge`: join the output directories of a sharded run into one.

A merge is only worth trusting if it proves coverage: every non-blank line of
the input has exactly one outcome across the shards. The shards' journals name
the input (path and fingerprint) and the shard option, so merge checks that
they belong together, reads the input once to learn its lines, and reports
missing and duplicated lines by number with a non-zero exit instead of writing
a plausible-looking partial result. Memory is a few bytes per input line plus
a small entry per failed line of the shard being read; no answer is held.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import os
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from tmbatch import __version__
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import (
    FAILURES,
    JOURNAL,
    LABELS,
    RESULTS,
    SUMMARY,
    atomic_write,
    atomic_writer,
    make_dir,
)
from tmbatch.base.words import setting
from tmbatch.inputs.lines import is_blank, numbered_lines
from tmbatch.inputs.reader import fingerprint, open_input
from tmbatch.journal.journal import (
    JournalError,
    ResumeState,
    SpendRecord,
    read_header,
    replay_spend,
)
from tmbatch.spend.usage import spend_status

log = logging.getLogger("tmbatch")
SHOW = 20  # line numbers listed in messages; summary.json keeps up to LIST_MAX
LIST_MAX = 1000


@dataclass
class Part:
    """One shard's output directory as its journal header describes it."""

    path: Path
    header: dict[str, Any]
    shard: tuple[int, int] | None
    summary: dict[str, Any] | None

    @property
    def name(self) -> str:
        return f"{self.path} (shard {self.shard[0]}/{self.shard[1]})" if self.shard else \
            f"{self.path} (not sharded)"


def load_part(path: Path) -> Part:
    header = read_header(path)  # read-only: merge never repairs or rewrites a shard
    raw = (header.get("options") or {}).get("shard")
    shard = (int(raw[0]), int(raw[1])) if isinstance(raw, list) and len(raw) == 2 else None
    summary = None
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        summary = orjson.loads((path / SUMMARY).read_bytes())
    return Part(path, header, shard, summary)


def check_parts(parts: list[Part]) -> None:
    """Shards of different inputs or options cannot be merged at all: that is a usage error."""
    first = parts[0]
    for p in parts[1:]:
        if p.header.get("fingerprint") != first.header.get("fingerprint"):
            raise JournalError(
                f"{p.path} ran a different input ({p.header.get('input')}) than {first.path} "
                f"({first.header.get('input')}): the fingerprints differ; merge only the shards "
                "of one run"
            )
        mine = {k: v for k, v in (p.header.get("options") or {}).items() if k != "shard"}
        theirs = {k: v for k, v in (first.header.get("options") or {}).items() if k != "shard"}
        if mine != theirs:
            diff = ", ".join(f"{k} {setting(theirs.get(k))} vs {setting(mine.get(k))}"
                             for k in sorted(set(mine) | set(theirs))
                             if mine.get(k) != theirs.get(k))
            raise JournalError(f"{p.path} and {first.path} were run with different options "
                               f"({diff}); merge only the shards of one run")
    counts = {p.shard[1] if p.shard else 1 for p in parts}
    if len(counts) > 1:
        raise JournalError(
            "the directories were run with different shard counts ("
            + ", ".join(p.name for p in parts) + "): they are not the shards of one run; merge "
            "the directories of one `--shard I/N` run, all with the same N"
        )


def shard_problems(parts: list[Part]) -> list[str]:
    """Shards missing or given twice (the counts agree: `check_parts` saw to it)."""
    problems = []
    n = parts[0].shard[1] if parts[0].shard else 1
    taken = Counter(p.shard[0] if p.shard else 0 for p in parts)
    missing = [i for i in range(n) if taken[i] == 0]
    twice = [i for i, c in sorted(taken.items()) if c > 1]
    if missing:
        problems.append(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} not given")
    if twice:
        problems.append(f"shard(s) {', '.join(f'{i}/{n}' for i in twice)} given more than once")
    return problems


def find_input(parts: list[Part], given: str | None) -> str:
    fp = parts[0].header.get("fingerprint")
    candidates = [given] if given else [str(p.header.get("input")) for p in parts]
    for c in candidates:
        if c and c != "-" and os.path.isfile(c):
            if fingerprint(c) == fp:
                return c
            if given:
                raise JournalError(f"--input {c} is not the input the shards ran (fingerprint "
                                   f"{fingerprint(c)[:12]}, the shards have {str(fp)[:12]})")
    raise JournalError(
        f"the input the shards ran ({parts[0].header.get('input')}) is not readable here; "
        "merge needs it to check that every line has an outcome: pass --input PATH"
    )


def scan_input(path: str) -> tuple[bytearray, int]:
    """One byte per line: 1 when the line needs an outcome (not blank), else 0."""
    wanted = bytearray(1)  # index 0 unused: lines are 1-based
    blank = 0
    with open_input(path) as f:
        for _, content, _ in numbered_lines(f, 1 << 20):
            empty = is_blank(content)
            blank += empty
            wanted.append(0 if empty else 1)
    return wanted, blank


def _records(path: Path) -> Iterator[tuple[bytes, int | None, dict[str, Any] | None]]:
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


NO_OWNER = -1


def merge_outputs(parts: list[Part], wanted: bytearray, out: Path) -> Tally:
    """Write merged results/failures: the first outcome of each line, in shard order."""
    size = len(wanted)
    claims = bytearray(size)  # how many directories hold an outcome for the line (capped)
    written = bytearray(size)
    tally = Tally(owner=array("i", [NO_OWNER]) * size)
    with atomic_writer(out / RESULTS) as res_out, atomic_writer(out / FAILURES) as fail_out:
        for index, part in enumerate(parts):
            has_result = bytearray(size)
            last_failure = {}  # line -> index of its last failure record in this directory
            for raw, line, _ in _records(part.path / RESULTS):
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
                    res_out.write(raw)
            for i, (_, line, _) in enumerate(_records(part.path / FAILURES)):
                if line is not None and 0 < line < size and not has_result[line]:
                    last_failure[line] = i
            for i, (raw, line, err) in enumerate(_records(part.path / FAILURES)):
                if line is None or last_failure.get(line) != i:
                    continue
                if not written[line]:
                    written[line] = 1
                    tally.owner[line] = index
                    cls = err.get("class") if isinstance(err, dict) else None
                    tally.failed[str(cls or "unknown")] += 1
                    fail_out.write(raw)
            for line in range(1, size):
                if has_result[line] or line in last_failure:
                    claims[line] = min(claims[line] + 1, 255)
            del last_failure
    for line in range(1, size):
        if wanted[line] and claims[line] == 0:
            tally.missing_count += 1
            if len(tally.missing) < LIST_MAX:
                tally.missing.append(line)
        elif claims[line] > 1:
            tally.duplicated_count += 1
            if len(tally.duplicated) < LIST_MAX:
                tally.duplicated.append(line)
    return tally


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


def _sum_runs(parts: list[Part]) -> dict[str, Any]:
    total: Counter[str] = Counter()
    wall = 0.0
    for p in parts:
        run = (p.summary or {}).get("this_run") or {}
        for key in ("attempts_sent", "retries", "rate_limited_429"):
            total[key] += int(run.get(key) or 0)
        tokens = run.get("tokens") or {}
        for key in ("prompt", "completion", "total"):
            total[f"tokens_{key}"] += int(tokens.get(key) or 0)
        wall = max(wall, float(run.get("wall_seconds") or 0.0))
    return {**total, "max_wall_seconds": wall}


def merge(dirs: list[str], out_dir: str, input_path: str | None = None) -> int:
    """Check that the directories are the shards of one run, join their outputs, prove
    coverage, and leave a directory that `status`, `export` and `report` can read."""
    out = Path(out_dir)
    parts = load_parts(dirs, out)
    source = find_input(parts, input_path)
    wanted, blank = scan_input(source)
    make_dir(out)
    tally = merge_outputs(parts, wanted, out)
    labels = merge_labels(parts, out)
    if labels is None:
        (out / LABELS).unlink(missing_ok=True)  # left by an earlier merge into `out`
    problems = shard_problems(parts) + tally.problems()
    books = write_journal(parts, tally.owner, out)
    summary = merged_summary(parts, wanted, blank, tally, problems, labels)
    if books.spend is not None:
        summary["spend"] = spend_status(books)
    atomic_write(out / SUMMARY, orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    return announce(parts, source, summary, out)


def load_parts(dirs: list[str], out: Path) -> list[Part]:
    """The directories, read-only, in shard order; refused (exit 2) unless they can be merged
    into `out` at all. A directory an earlier merge wrote may be merged into again."""
    if not dirs:
        raise JournalError("merge needs at least one shard output directory")
    paths = [Path(d) for d in dirs]
    for p in paths:
        if p.resolve() == out.resolve():
            raise JournalError(f"-o {out} is one of the directories being merged; give a new "
                               "directory")
    if len({p.resolve() for p in paths}) != len(paths):
        raise JournalError("the same directory is named twice; name each shard once")
    if (out / JOURNAL).exists() and not read_header(out).get("merged"):
        raise JournalError(f"{out} holds a run ({JOURNAL}); merge into a new directory")
    parts = [load_part(p) for p in paths]
    for p in parts:
        if p.header.get("merged"):
            raise JournalError(f"{p.path} is itself a merged directory; merge the shard "
                               "directories it was made from")
    check_parts(parts)
    parts.sort(key=lambda p: p.shard[0] if p.shard else -1)
    return parts


@dataclass
class Books:
    """The shards' spend as their journals keep it, gathered while their records are copied:
    every snapshot in time order (for the cost over time), each shard's last snapshot and
    where it ends (a crash's tail after it is counted as a resume counts it), its last
    budget record. The job's books are their sum: each pod kept its own, and was held to its
    share of the job's budget."""

    snaps: list[tuple[float, int, SpendRecord]] = field(default_factory=list)
    last: dict[int, tuple[list[Any], int]] = field(default_factory=dict)
    budgets: dict[int, dict[str, Any]] = field(default_factory=dict)
    # the sums, once `close` has run; the names `spend.spend_status` reads
    spend: dict[str, list[int]] | None = None
    spend_unknown: int = 0
    budget: dict[str, Any] | None = None

    def close(self, parts: list[Part]) -> list[bytes]:
        """Sum the shards' books; the merged journal's records that state them: a budget
        record (the shards' shares added up, the job's budget again; their prices), a
        snapshot at each shard snapshot's time (every shard's latest so far, summed), then
        the totals."""
        if not self.last:
            return []
        spent: dict[str, list[int]] = {}
        for index, at in sorted(self.last.items()):
            state = ResumeState(header={}, spend_at=at)
            replay_spend(parts[index].path / JOURNAL, state)
            _add_rows(spent, state.spend or {})
            self.spend_unknown += state.spend_unknown
        self.spend = spent
        out = []
        if self.budgets:
            self.budget = {"e": "budget", "t": max(b.get("t") or 0 for b in self.budgets.values()),
                           "tokens": _budget_sum(self.budgets, len(parts), "tokens"),
                           "usd": _budget_sum(self.budgets, len(parts), "usd"),
                           "prices": {k: v for b in self.budgets.values()
                                      for k, v in (b.get("prices") or {}).items()}}
            out.append(orjson.dumps(self.budget) + b"\n")
        latest: dict[int, SpendRecord] = {}
        for t, index, snap in sorted(self.snaps, key=lambda s: s[0]):
            latest[index] = snap
            total = SpendRecord(t, {}, {}, 0)
            for one in latest.values():
                _add_rows(total.spent, one.spent)
                _add_rows(total.in_flight, one.in_flight)
                total.unknown += one.unknown
            out.append(total.to_json())
        last_t = max(t for t, _, _ in self.snaps)  # a shard with a `last` has a snapshot
        out.append(SpendRecord(last_t, spent, {}, self.spend_unknown).to_json())
        return out


def _add_rows(into: dict[str, list[int]], rows: dict[str, list[int]]) -> None:
    for model, row in rows.items():
        mine = into.setdefault(model, [0] * len(row))
        for i, v in enumerate(row):
            mine[i] += v


def _budget_sum(budgets: dict[int, dict[str, Any]], shards: int, key: str) -> float | None:
    """The job's budget in one unit: the shards' shares added up, unless some shard had none."""
    values = [b.get(key) for b in budgets.values()]
    if len(values) < shards or any(not isinstance(v, int | float) for v in values):
        return None
    return sum(values)


def write_journal(parts: list[Part], owner: array, out: Path) -> Books:
    """A journal for the merged directory: a header naming the shards, then each line's
    records from the shard whose outcome was kept (and the dispatches of lines with no
    outcome anywhere: their result is unknown, not "never sent"), and every 429 pause.
    `status` and `report` read it like any run's; `run` and `resend` refuse it, because each
    shard's job id (and so each line's Idempotency-Key) lives in the shard's own directory."""
    first = parts[0].header
    jobs = [str(p.header.get("job")) for p in parts]
    header = {
        "e": "start", "v": 1, "tmbatch": __version__, "input": first.get("input"),
        "fingerprint": first.get("fingerprint"),
        "options": {**(first.get("options") or {}), "shard": None},
        "job": "merged-" + hashlib.blake2b("\0".join(jobs).encode(), digest_size=8).hexdigest(),
        "t": min((p.header["t"] for p in parts if isinstance(p.header.get("t"), int | float)),
                 default=time.time()),
        "merged": [{"dir": str(p.path), "shard": list(p.shard) if p.shard else None,
                    "job": p.header.get("job")} for p in parts],
    }
    books = Books()
    with atomic_writer(out / JOURNAL) as dst:
        dst.write(orjson.dumps(header) + b"\n")
        for index, part in enumerate(parts):
            for raw in _journal_records(part, index, owner, books):
                dst.write(raw)
        for raw in books.close(parts):
            dst.write(raw)
    return books


def _journal_records(part: Part, index: int, owner: array, books: Books) -> Iterator[bytes]:
    """The records of one shard's journal that belong in the merged one; its spend records
    go into `books` instead (the merged journal states their sum)."""
    size = len(owner)
    with open(part.path / JOURNAL, "rb") as f:
        f.readline()  # the shard's own header: the merged header lists the shards
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a torn last line is never data
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                if rec.get("e") == "resume":
                    yield raw
                elif rec.get("e") == "budget":
                    books.budgets[index] = rec
                continue
            if not isinstance(rec, list) or not rec:
                continue
            if rec[0] == "p":
                yield raw
            elif rec[0] == "s":
                snap = SpendRecord.from_list(rec)
                if snap is not None:
                    books.snaps.append((snap.t, index, snap))
                    books.last[index] = (rec, f.tell())
            elif rec[0] in ("d", "o") and isinstance(rec[1], int) and 0 < rec[1] < size:
                kept = owner[rec[1]]
                if kept == index or (kept == NO_OWNER and rec[0] == "d"):
                    yield raw


def merged_summary(parts: list[Part], wanted: bytearray, blank: int, tally: Tally,
                   problems: list[str], labels: Counter[str] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "merged": True,
        "input": parts[0].header.get("input"),
        "fingerprint": parts[0].header.get("fingerprint"),
        "shards": [{"dir": str(p.path), "shard": list(p.shard) if p.shard else None,
                    "job_id": p.header.get("job"),
                    "finished": (p.summary or {}).get("finished")} for p in parts],
        "input_lines": len(wanted) - 1,
        "blank_lines_skipped": blank,
        "counts": {"succeeded": tally.succeeded, "failed": tally.failed_total,
                   "failed_by_class": dict(tally.failed),
                   "with_outcome": tally.succeeded + tally.failed_total},
        "missing_lines": {"count": tally.missing_count, "lines": tally.missing},
        "duplicated_lines": {"count": tally.duplicated_count, "lines": tally.duplicated},
        "complete": not problems,
        "finished": not problems,
        "problems": problems,
        "shard_runs": _sum_runs(parts),
    }
    if labels is not None:
        summary["labels"] = {"file": LABELS, **labels}
    return summary


def announce(parts: list[Part], source: str, summary: dict[str, Any], out: Path) -> int:
    """What was merged, what is wrong with it, and the exit code that says so."""
    counts = summary["counts"]
    lines = summary["input_lines"] - summary["blank_lines_skipped"]
    print(f"merged {len(parts)} director{'y' if len(parts) == 1 else 'ies'} of {source}: "
          f"{lines} line(s), {counts['succeeded']} succeeded, {counts['failed']} failed"
          f" -> {out}", file=sys.stderr, flush=True)
    if summary["problems"]:
        for problem in summary["problems"]:
            print(f"tmbatch: merge: {problem}", file=sys.stderr, flush=True)
        print("tmbatch: merge: INCOMPLETE: not every line has exactly one outcome (exit 5)",
              file=sys.stderr, flush=True)
        return ExitCode.INCOMPLETE
    print("every line has exactly one outcome", file=sys.stderr, flush=True)
    return ExitCode.FAILED if counts["failed"] else ExitCode.OK


def _lines(lines: list[int], count: int) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOW])
    return shown + (f", ... ({count - SHOW} more in summary.json)" if count > SHOW else "")
