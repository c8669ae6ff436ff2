"""How tmbatch numbers the lines of an input: one rule for the reader, status, merge, labels.

Line numbers are physical and 1-based (`sed -n 42p input.jsonl` shows line 42), a UTF-8
byte-order mark on the first line is not content, and a blank line (empty or only white
space) is numbered but needs no outcome. A shard takes every Nth line. If two modules
counted differently, merge would call a complete run incomplete, or status a finished one
unfinished, so they all count here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO

BOM = b"\xef\xbb\xbf"
Shard = tuple[int, int]  # (index I, count N): lines I+1, I+1+N, ... (0-based I)


def in_shard(line: int, shard: Shard | None) -> bool:
    """True when 1-based `line` belongs to `shard` (every line without one)."""
    return shard is None or (line - 1) % shard[1] == shard[0]


def numbered_lines(f: IO[bytes], max_bytes: int | None = None,
                   ) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, content without its line ending, bytes read) for every physical line.

    The content is None for a line over `max_bytes`: it is skipped without being held in
    memory, so one absurd line cannot exhaust it.
    """
    readline = f.readline
    limit = -1 if max_bytes is None else max_bytes + 1
    n = 0
    while True:
        raw = readline(limit)
        if not raw:
            return
        n += 1
        if max_bytes is not None and len(raw) > max_bytes and not raw.endswith(b"\n"):
            total = len(raw)
            while True:  # skip the rest of the oversized line without keeping it
                more = readline(1 << 20)
                total += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield n, None, total
            continue
        length = len(raw)
        if n == 1 and raw.startswith(BOM):
            raw = raw[3:]
        yield n, raw.rstrip(b"\r\n"), length


def is_blank(content: bytes | None) -> bool:
    """A line that needs no outcome (an over-long line does: it is a failure)."""
    return content is not None and not content.strip()


def count_lines(path: str, shard: Shard | None = None) -> int | None:
    """Lines of `path` (in `shard`) that need an outcome; None when it is not a readable file."""
    if path == "-" or not os.path.isfile(path):
        return None
    n = 0
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            for line, content, _ in numbered_lines(f):
                if in_shard(line, shard) and not is_blank(content):
                    n += 1
    except OSError:
        return None
    return n
