"""Parquet and CSV inputs: a table's rows read as JSONL records, streamed in batches.

A data engineer's labelling set is a Parquet file or a CSV, not JSONL. Rather than teach every
reader of the input (the labelling templates, `validate`, `estimate`, the join back into
labels.jsonl) a second format, `files.open_input` hands them a table as a byte stream of JSON
objects, one line per row: row N of the table is line N of the stream, so every number the
rest of tmbatch prints is a row number (the messages say "row", `unit_of`). Rows are read in
batches (`pyarrow.parquet.ParquetFile.iter_batches`; the csv module, one row at a time), so
memory stays flat whatever the table's size.

A row that cannot be a record at all (a CSV row with more values than the header has names,
a binary cell that is not UTF-8 text) stops the reading with a `TableError` naming the row
and the column: the file is malformed, and that is said before anything is sent. A record
whose *content* is wrong (a template's field missing) is the templates' business, row by row.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
from collections.abc import Iterator
from typing import IO, Any

import orjson

from tmbatch.inputs.files import InputError

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
BATCH_ROWS = 4096  # rows per Parquet batch: a few MB at most, whatever the file's size
MAX_CELL_BYTES = 32 * 1024 * 1024  # a CSV field may be as long as an input line may be
PARQUET_EXTRA = "parquet"


class TableError(InputError):
    """A table that cannot be read as records; the message names the row and the column."""


def table_kind(path: str) -> str | None:
    """'parquet', 'csv' or None (a JSONL file, or stdin), by the file's suffix."""
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def refuse_bare_table(path: str, command: str) -> None:
    """`validate`/`estimate` of a table without a job file: its rows are neither Batch lines
    nor records until a [label] table or --body-column says which, so say that rather than
    call every row a line without a custom_id."""
    if table_kind(path) is not None:
        raise TableError(
            f"{path} is a table: {command} reads a table through a labelling job file (one "
            "that names it as `input`, with a [label] table); a table of request bodies "
            f"(--body-column) is not read by {command} yet, only by run")


def unit_of(f: Any) -> str:
    """What the input's numbers count: "row" for a table, "line" for JSONL."""
    return str(getattr(f, "unit", "line"))


def require_pyarrow() -> Any:
    """pyarrow.parquet, or a message naming the extra that brings it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(
            "reading or writing Parquet needs pyarrow: pip install 'tmbatch[parquet]'"
        ) from None
    return pq


def _cell(value: Any) -> Any:
    """What orjson does not write itself: decimals as text (exact), durations in seconds,
    binary as UTF-8 text (else the caller names the row and column)."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    raise TypeError(type(value).__name__)


def _row_json(path: str, row: int, record: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(record, default=_cell, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, UnicodeDecodeError, orjson.JSONEncodeError):
        for column, value in record.items():
            try:
                orjson.dumps(value, default=_cell, option=orjson.OPT_NON_STR_KEYS)
            except (TypeError, UnicodeDecodeError, orjson.JSONEncodeError):
                shown = base64.b64encode(bytes(value))[:24].decode() if isinstance(
                    value, bytes) else type(value).__name__
                raise TableError(
                    f"{path}: row {row}, column `{column}`: a value that is not text or a "
                    f"number ({shown}...); cast the column to a string") from None
        raise


def parquet_rows(path: str, source: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file, a batch at a time."""
    pq = require_pyarrow()
    try:
        pf = pq.ParquetFile(source)
    except Exception as exc:  # pyarrow's errors are ArrowInvalid, OSError, ...: all one answer
        raise TableError(f"{path}: not a readable Parquet file ({exc})") from None
    # One row group at a time, without threads: pyarrow's threaded reader reads ahead across
    # row groups, and its peak memory then grows with the file (measured: +40 MB per 800k
    # rows); this way it stays at one row group's pages and one batch.
    for group in range(pf.num_row_groups):
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group],
                                     use_threads=False):
            yield from batch.to_pylist()


def csv_rows(path: str, source: IO[bytes]) -> Iterator[dict[str, Any] | None]:
    """The data rows of a CSV with a header, as {column: text}; None for a blank row."""
    csv.field_size_limit(MAX_CELL_BYTES)
    text = io.TextIOWrapper(source, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    row = 0
    try:
        header = next(reader, None)
        if not header:
            raise TableError(f"{path}: no header row; the first row must name the columns")
        _check_header(path, header)
        for values in reader:
            row += 1
            if not values:
                yield None
                continue
            if len(values) != len(header):
                raise TableError(
                    f"{path}: row {row}: {len(values)} value(s), the header names "
                    f"{len(header)} column(s); quote a value that holds a comma, or fix the row")
            yield dict(zip(header, values, strict=True))
    except UnicodeDecodeError:
        raise TableError(f"{path}: row {row + 1}: not valid UTF-8 text; save the file as "
                         "UTF-8") from None
    except csv.Error as exc:
        raise TableError(f"{path}: row {row + 1}: {exc}") from None


def _check_header(path: str, header: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(header, 1):
        if not name.strip():
            raise TableError(f"{path}: header column {i} has no name; name every column")
        if name in seen:
            raise TableError(f"{path}: header names column `{name}` twice; names must be unique")
        seen.add(name)


class _RowBytes(io.RawIOBase):
    """The rows as JSONL bytes, produced as they are read."""

    def __init__(self, path: str, source: IO[bytes], kind: str) -> None:
        self.path, self.source = path, source
        self.rows = parquet_rows(path, source) if kind == "parquet" else csv_rows(path, source)
        self.pending = b""
        self.row = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            record = next(self.rows, StopIteration)
            if record is StopIteration:
                return 0
            self.row += 1
            self.pending = b"\n" if record is None else _row_json(
                self.path, self.row, record) + b"\n"
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.source.close()
        super().close()


class TableLines(io.BufferedReader):
    """A table read as JSONL: line N is row N (`unit` says so to the messages)."""

    unit = "row"

    def seekable(self) -> bool:
        return False


def open_table(path: str, source: IO[bytes], kind: str) -> IO[bytes]:
    """`source` (the table file, opened) as the JSONL of its rows."""
    if kind == "parquet":
        require_pyarrow()
    return TableLines(_RowBytes(path, source, kind), buffer_size=1 << 20)
