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
import heapq
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from tmbatch.exitcodes import ExitCode
from tmbatch.files import (
    FAILURES,
    JOURNAL,
    LABELS,
    RESULTS,
    SUMMARY,
    atomic_write,
    atomic_writer,
    make_dir,
)
from tmbatch.journal import JournalError, read_header
from tmbatch.lines import is_blank, numbered_lines
from tmbatch.reader import fingerprint, open_input

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
            diff = ", ".join(f"{k} {theirs.get(k)!r} vs {mine.get(k)!r}"
                             for k in sorted(set(mine) | set(theirs))
                             if mine.get(k) != theirs.get(k))
            raise JournalError(f"{p.path} and {first.path} were run with different options "
                               f"({diff}); merge only the shards of one run")


def shard_problems(parts: list[Part]) -> list[str]:
    """What the shard options alone say is wrong, before any line is read."""
    problems = []
    counts = {p.shard[1] if p.shard else 1 for p in parts}
    if len(counts) > 1:
        problems.append("the directories were run with different shard counts: "
                        + ", ".join(p.name for p in parts))
        return problems
    n = counts.pop()
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
    failed: Counter[str] | None = None
    missing: list[int] | None = None
    missing_count: int = 0
    duplicated: list[int] | None = None
    duplicated_count: int = 0
    foreign: int = 0  # outcomes for lines the input does not have


def merge_outputs(parts: list[Part], wanted: bytearray, out: Path) -> Tally:
    """Write merged results/failures: the first outcome of each line, in shard order."""
    size = len(wanted)
    claims = bytearray(size)  # how many directories hold an outcome for the line (capped)
    written = bytearray(size)
    tally = Tally(failed=Counter(), missing=[], duplicated=[])
    with atomic_writer(out / RESULTS) as res_out, atomic_writer(out / FAILURES) as fail_out:
        for part in parts:
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
    if not dirs:
        raise JournalError("merge needs at least one shard output directory")
    out = Path(out_dir)
    paths = [Path(d) for d in dirs]
    for p in paths:
        if p.resolve() == out.resolve():
            raise JournalError(f"-o {out} is one of the directories being merged; give a new "
                               "directory")
    if len({p.resolve() for p in paths}) != len(paths):
        raise JournalError("the same directory is named twice; name each shard once")
    if (out / JOURNAL).exists():
        raise JournalError(f"{out} holds a run ({JOURNAL}); merge into a new directory")
    parts = [load_part(p) for p in paths]
    check_parts(parts)
    parts.sort(key=lambda p: p.shard[0] if p.shard else -1)
    problems = shard_problems(parts)
    source = find_input(parts, input_path)
    wanted, blank = scan_input(source)
    make_dir(out)
    tally = merge_outputs(parts, wanted, out)
    labels = merge_labels(parts, out)
    assert tally.failed is not None and tally.missing is not None and tally.duplicated is not None
    if tally.missing_count:
        problems.append(f"{tally.missing_count} line(s) have no outcome in any shard: "
                        + _lines(tally.missing, tally.missing_count))
    if tally.duplicated_count:
        problems.append(f"{tally.duplicated_count} line(s) have an outcome in more than one "
                        "shard (the first was kept): "
                        + _lines(tally.duplicated, tally.duplicated_count))
    if tally.foreign:
        problems.append(f"{tally.foreign} outcome(s) name a line the input does not have")
    failed_total = sum(tally.failed.values())
    summary: dict[str, Any] = {
        "merged": True,
        "input": parts[0].header.get("input"),
        "fingerprint": parts[0].header.get("fingerprint"),
        "shards": [{"dir": str(p.path), "shard": list(p.shard) if p.shard else None,
                    "job_id": p.header.get("job"),
                    "finished": (p.summary or {}).get("finished")} for p in parts],
        "input_lines": len(wanted) - 1,
        "blank_lines_skipped": blank,
        "counts": {"succeeded": tally.succeeded, "failed": failed_total,
                   "failed_by_class": dict(tally.failed),
                   "with_outcome": tally.succeeded + failed_total},
        "missing_lines": {"count": tally.missing_count, "lines": tally.missing},
        "duplicated_lines": {"count": tally.duplicated_count, "lines": tally.duplicated},
        "complete": not problems,
        "problems": problems,
        "shard_runs": _sum_runs(parts),
    }
    if labels is not None:
        summary["labels"] = {"file": LABELS, **labels}
    atomic_write(out / SUMMARY, orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"merged {len(parts)} director{'y' if len(parts) == 1 else 'ies'} of {source}: "
          f"{len(wanted) - 1 - blank} line(s), {tally.succeeded} succeeded, {failed_total} failed"
          f" -> {out}", file=sys.stderr, flush=True)
    if problems:
        for problem in problems:
            print(f"tmbatch: merge: {problem}", file=sys.stderr, flush=True)
        print("tmbatch: merge: INCOMPLETE: not every line has exactly one outcome (exit 5)",
              file=sys.stderr, flush=True)
        return ExitCode.INCOMPLETE
    print("every line has exactly one outcome", file=sys.stderr, flush=True)
    return ExitCode.FAILED if failed_total else ExitCode.OK


def _lines(lines: list[int], count: int) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOW])
    return shown + (f", ... ({count - SHOW} more in summary.json)" if count > SHOW else "")
