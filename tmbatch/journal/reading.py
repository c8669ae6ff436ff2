"""The one reader of a journal file: its header, then its records typed by `format`'s decoder.

Apart from the decoder it is the only code that opens `journal.jsonl` to read it: resume,
status, merge and the report all read through it, so a torn last line and a corrupt one are
told apart in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

import orjson

from tmbatch.base.files import JOURNAL
from tmbatch.journal.format import (
    FIX_HINT,
    DispatchRecord,
    Header,
    JournalError,
    OutcomeRecord,
    Record,
    RecordError,
    decode_header,
    decode_lines,
)

Position = int  # the byte offset just after a record


class JournalReader:
    """One journal, read-only, record by record: `header` (its first line), then iterating
    gives every later record, typed. `at`: start just after a record another reader was at
    (its `position()`), without the header. Use it as a context manager (it closes the file)."""

    def __init__(self, path: Path, at: Position | None = None) -> None:
        self.path = path
        self.header: Header | None = None
        try:
            self._f: IO[bytes] = open(path, "rb", buffering=1 << 20)  # noqa: SIM115
        except FileNotFoundError:
            raise JournalError(f"{path.parent} has no {path.name}: not a tmbatch output "
                               "directory") from None
        try:
            if at is None:
                self.header = self._read_header()
            else:
                self._f.seek(at)
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> Header:
        first = self._f.readline()
        try:
            return decode_header(orjson.loads(first))
        except (orjson.JSONDecodeError, RecordError):
            raise JournalError(f"{self.path}: the first line is not a tmbatch journal header; "
                               "use another --output directory or --restart") from None

    def __iter__(self) -> Iterator[Record]:
        """The records after the header (or after `at`)."""
        try:
            yield from decode_lines(self._f)
        except RecordError as exc:
            if not exc.raw.endswith(b"\n"):
                return  # a torn last line (a crash, or a run still writing): never data
            raise self._error(exc) from None

    def _error(self, exc: RecordError) -> JournalError:
        """What is wrong with the line just read, which line of the file it is (counted only
        now: the loop does not), and what to do."""
        offset = self._f.tell() - len(exc.raw)
        with open(self.path, "rb") as f:
            line = 1 + f.read(offset).count(b"\n")
        return JournalError(f"{self.path}, line {line}: {exc}: {exc.raw[:80]!r}; {FIX_HINT}")

    def position(self) -> Position:
        """Where the last record read ends: a later reader can start there (`at`)."""
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def records(path: Path, at: Position | None = None) -> Iterator[Record]:
    """The journal's records after its header (or after `at`), typed; see `JournalReader`."""
    with JournalReader(path, at) as reader:
        yield from reader


def read_header(out_dir: Path) -> Header:
    """The header of OUT/journal.jsonl; a JournalError when OUT is not a tmbatch directory."""
    with JournalReader(out_dir / JOURNAL) as reader:
        assert reader.header is not None
        return reader.header


def nothing_sent(out_dir: Path) -> bool:
    """True when the journal holds no line's record at all: the last run stopped (or was
    refused at preflight) before sending or recording anything, so there is nothing to resume."""
    return not any(type(rec) is DispatchRecord or type(rec) is OutcomeRecord
                   for rec in records(out_dir / JOURNAL))
