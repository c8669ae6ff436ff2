"""`tmbatch export OUT --format parquet|csv`: one row per outcome, flat columns.

results.jsonl and failures.jsonl keep the server's answer whole (nested JSON); a table for
pandas, DuckDB or a spreadsheet wants one row per input line with the answer's text, its
usage and the error as plain columns. The rows are written in input order (the external
merge sort of `export`), a batch at a time, so memory stays flat for any size. The columns
and their types are `COLUMNS`: documented (docs/data-in-buckets-and-tables.md) and stable,
so a query written against one run's table works on the next one's.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.files import FAILURES, RESULTS, atomic_writer, make_dir
from tmbatch.inputs.tables import require_pyarrow
from tmbatch.tools.export import DEFAULT_CHUNK, sorted_records

FORMATS = ("jsonl", "parquet", "csv")
BATCH = 4096  # rows per Parquet row-group batch written
# name -> Arrow type name, in column order. Append new columns at the end, never reorder.
COLUMNS: dict[str, str] = {
    "line": "int64", "custom_id": "string", "status": "string", "class": "string",
    "model": "string", "text": "string", "finish_reason": "string",
    "prompt_tokens": "int64", "completion_tokens": "int64", "cached_tokens": "int64",
    "status_code": "int64", "request_id": "string", "ttft_ms": "float64",
    "latency_ms": "float64", "attempts": "int64", "error_code": "string",
    "error_message": "string",
}


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def text_of(body: Any) -> tuple[str | None, str | None]:
    """(the answer's text, its finish reason) for chat, completions and responses."""
    if not isinstance(body, dict):
        return None, None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        message = first.get("message")
        text = message.get("content") if isinstance(message, dict) else first.get("text")
        return (text if isinstance(text, str) else None), first.get("finish_reason")
    if isinstance(body.get("output_text"), str):
        return body["output_text"], body.get("status")
    parts = [c.get("text") for item in body.get("output") or [] if isinstance(item, dict)
             for c in item.get("content") or [] if isinstance(c, dict)
             and isinstance(c.get("text"), str)]
    return ("".join(parts) if parts else None), body.get("status")


def _usage(body: Any) -> tuple[int | None, int | None, int | None]:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None, None, None
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return prompt, completion, cached


def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One results.jsonl or failures.jsonl record as the table's row."""
    response = rec.get("response") or {}
    body = response.get("body")
    error = rec.get("error") or {}
    text, finish = text_of(body)
    prompt, completion, cached = _usage(body)
    timing = rec.get("timing") or {}
    return {
        "line": rec.get("line"), "custom_id": rec.get("custom_id"),
        "status": "failed" if error else "succeeded", "class": error.get("class"),
        "model": body.get("model") if isinstance(body, dict) else None,
        "text": text, "finish_reason": finish if isinstance(finish, str) else None,
        "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached,
        "status_code": _int(response.get("status_code")),
        "request_id": response.get("request_id"),
        "ttft_ms": timing.get("ttft_ms"), "latency_ms": timing.get("total_ms"),
        "attempts": _int(rec.get("attempts")) if error else None,
        "error_code": error.get("code"), "error_message": error.get("message"),
    }


def outcome_rows(out_dir: Path, chunk: int = DEFAULT_CHUNK) -> Iterator[dict[str, Any]]:
    """Every outcome of OUT as a flat row, in input order."""
    for _, raw in sorted_records([out_dir / RESULTS, out_dir / FAILURES], chunk):
        yield flat_row(orjson.loads(raw))


def _write_csv(rows: Iterator[dict[str, Any]], dest: Path) -> int:
    n = 0
    with atomic_writer(dest) as out:
        lines: list[str] = []

        class _Sink:
            def write(self, text: str) -> None:
                lines.append(text)

        writer = csv.DictWriter(_Sink(), fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            n += 1
            if len(lines) >= BATCH:
                out.write("".join(lines).encode())
                lines.clear()
        out.write("".join(lines).encode())
    return n


def schema() -> Any:
    """The Parquet schema: `COLUMNS` as Arrow types."""
    require_pyarrow()
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])


def _write_parquet(rows: Iterator[dict[str, Any]], dest: Path) -> int:
    pq = require_pyarrow()
    import pyarrow as pa

    n = 0
    arrow_schema = schema()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # renamed over dest when whole
    try:
        with pq.ParquetWriter(str(tmp), arrow_schema) as writer:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                n += 1
                if len(batch) >= BATCH:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=arrow_schema))
                    batch.clear()
            if batch or n == 0:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=arrow_schema))
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return n


def export_table(out_dir: Path, fmt: str, dest_dir: Path | None = None,
                 chunk: int = DEFAULT_CHUNK) -> tuple[Path, int]:
    """Write OUT's outcomes as outcomes.parquet or outcomes.csv; (the file, its rows)."""
    dest = (dest_dir or out_dir) / f"outcomes.{fmt}"
    make_dir(dest.parent)
    if fmt == "parquet":
        require_pyarrow()  # before the sort: a missing extra is said at once
        return dest, _write_parquet(outcome_rows(out_dir, chunk), dest)
    return dest, _write_csv(outcome_rows(out_dir, chunk), dest)
