"""`tmbatch export out/ --ordered`: outputs in input order, in bounded memory.

Results are appended in completion order; users join them back to datasets by
position. An external merge sort keeps memory flat: runs of at most `chunk` records
are sorted and spilled to temporary files, then merged with heapq.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tmbatch.base.files import FAILURES, RESULTS, atomic_writer, make_dir
from tmbatch.journal.records import line_of

DEFAULT_CHUNK = 100_000


def _spill(batch: list[tuple[int, bytes]], tmpdir: str) -> str:
    batch.sort(key=lambda t: t[0])
    fd, path = tempfile.mkstemp(dir=tmpdir, suffix=".run")
    with os.fdopen(fd, "wb") as f:
        for line, raw in batch:
            f.write(b"%d\t" % line + raw)
    return path


def _read_run(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for raw in f:
        tab = raw.index(b"\t")
        yield int(raw[:tab]), raw[tab + 1 :]


def sorted_records(paths: list[Path], chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[int, bytes]]:
    """(line, raw record) from all `paths`, by input line; stable for equal lines."""
    with tempfile.TemporaryDirectory(prefix="tmbatch-export-") as tmpdir:
        runs: list[str] = []
        batch: list[tuple[int, bytes]] = []
        for path in paths:
            if not path.exists():
                continue
            with open(path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        continue  # a torn last line is never data
                    line = line_of(raw)
                    if line is None:
                        continue
                    batch.append((line, raw))
                    if len(batch) >= chunk:
                        runs.append(_spill(batch, tmpdir))
                        batch = []
        if not runs:
            batch.sort(key=lambda t: t[0])
            yield from batch
            return
        if batch:
            runs.append(_spill(batch, tmpdir))
        files = [open(p, "rb") for p in runs]  # noqa: SIM115 (closed below)
        try:
            yield from heapq.merge(*(_read_run(f) for f in files), key=lambda t: t[0])
        finally:
            for f in files:
                f.close()


def _write_sorted(sources: list[Path], dest: Path, chunk: int) -> int:
    n = 0
    with atomic_writer(dest) as out:
        for _, raw in sorted_records(sources, chunk):
            out.write(raw)
            n += 1
    return n


def export_ordered(out_dir: Path, dest_dir: Path | None = None, *, combined: bool = False,
                   chunk: int = DEFAULT_CHUNK) -> dict[str, int]:
    """Write results/failures (and optionally both together) sorted by input line."""
    dest = dest_dir or out_dir
    make_dir(dest)
    counts = {
        "results.ordered.jsonl": _write_sorted([out_dir / RESULTS],
                                               dest / "results.ordered.jsonl", chunk),
        "failures.ordered.jsonl": _write_sorted([out_dir / FAILURES],
                                                dest / "failures.ordered.jsonl", chunk),
    }
    if combined:
        counts["outcomes.ordered.jsonl"] = _write_sorted(
            [out_dir / RESULTS, out_dir / FAILURES], dest / "outcomes.ordered.jsonl", chunk)
    return counts
