"""`tmbatch merge`'s checks: which directories are the shards of one run, and its input.

The shards' journals name the input (path and fingerprint) and the shard option, so the
directories are refused (exit 2) before anything is written unless they belong together;
the input is then read once to learn which of its lines need an outcome.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tmbatch.base.files import JOURNAL
from tmbatch.base.words import setting
from tmbatch.inputs.files import fingerprint, open_input, url_scheme
from tmbatch.inputs.lines import is_blank, numbered_lines
from tmbatch.journal.format import Header, JournalError
from tmbatch.journal.reading import read_header
from tmbatch.run.summaries import Summary, read_summary


@dataclass(frozen=True)
class Part:
    """One shard's output directory as its journal header (and its last summary) describe it."""

    path: Path
    header: Header
    summary: Summary | None  # the shard's last run's, if it wrote one

    @property
    def shard(self) -> tuple[int, int] | None:
        return self.header.shard

    @property
    def name(self) -> str:
        return f"{self.path} (shard {self.shard[0]}/{self.shard[1]})" if self.shard else \
            f"{self.path} (not sharded)"


def load_part(path: Path) -> Part:
    header = read_header(path)  # read-only: merge never repairs or rewrites a shard
    summary = read_summary(path)
    return Part(path, header, summary if isinstance(summary, Summary) else None)


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
    if (out / JOURNAL).exists() and read_header(out).merged is None:
        raise JournalError(f"{out} holds a run ({JOURNAL}); merge into a new directory")
    parts = [load_part(p) for p in paths]
    for p in parts:
        if p.header.merged is not None:
            raise JournalError(f"{p.path} is itself a merged directory; merge the shard "
                               "directories it was made from")
    check_parts(parts)
    parts.sort(key=lambda p: p.shard[0] if p.shard else -1)
    return parts


def check_parts(parts: list[Part]) -> None:
    """Shards of different inputs or options cannot be merged at all: that is a usage error."""
    first = parts[0]
    for p in parts[1:]:
        if p.header.fingerprint != first.header.fingerprint:
            raise JournalError(
                f"{p.path} ran a different input ({p.header.input}) than {first.path} "
                f"({first.header.input}): the fingerprints differ; merge only the shards "
                "of one run"
            )
        mine = {k: v for k, v in p.header.options.items() if k != "shard"}
        theirs = {k: v for k, v in first.header.options.items() if k != "shard"}
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
    fp = parts[0].header.fingerprint
    candidates = [given] if given else [p.header.input for p in parts]
    for c in candidates:
        if c and c != "-" and (os.path.isfile(c) or url_scheme(c) is not None):
            if fingerprint(c) == fp:
                return c
            if given:
                raise JournalError(f"--input {c} is not the input the shards ran (fingerprint "
                                   f"{fingerprint(c)[:12]}, the shards have {fp[:12]})")
    raise JournalError(
        f"the input the shards ran ({parts[0].header.input}) is not readable here; "
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
