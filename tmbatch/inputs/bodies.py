"""A table's rows as request bodies (`--body-column`): staged into OUTPUT/requests.jsonl.

As with labelling (`templates`), the table never reaches the runner: each row becomes one
OpenAI Batch line of OUTPUT/requests.jsonl (row N is line N), with the body from one column (a
JSON object as text, or a Parquet struct) and the custom_id from `--id-column` (else
`row-N`). The runner then sends that file with every safety rule, and resume recognises it
by its bytes: the same table and options give the same file, other ones are refused.

A row whose body cell is not a JSON object is not dropped: its line carries the cell as it
is, so the reader fails it `permanent` ("body is a string; expected a JSON object"), and the
warning here says why, naming the row and the column.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.files import make_dir
from tmbatch.inputs.files import open_input
from tmbatch.inputs.lines import numbered_lines
from tmbatch.inputs.reader import MAX_CUSTOM_ID
from tmbatch.inputs.templates import REQUESTS, Digest, write_staged

log = logging.getLogger("tmbatch")
SHOWN = 5  # bad rows named one by one in the warnings; the rest are counted


@dataclass(frozen=True)
class BodyTable:
    """A table whose rows are request bodies: where they are and how to read them."""

    path: str
    body_column: str
    id_column: str | None
    route: str  # the normalized endpoint every row is sent to


def _body(cell: Any) -> tuple[Any, str | None]:
    """(the body, None) or (the cell as it is, why it is not a body)."""
    if isinstance(cell, dict):
        return cell, None
    if isinstance(cell, str):
        try:
            value = orjson.loads(cell)
        except orjson.JSONDecodeError as exc:
            return cell, f"not valid JSON ({exc})"
        if isinstance(value, dict):
            return value, None
        return cell, "JSON, but not an object"
    return cell, "empty (null)" if cell is None else f"a {type(cell).__name__}, not JSON text"


def _custom_id(table: BodyTable, record: dict[str, Any], row: int) -> tuple[str, str | None]:
    if table.id_column is None:
        return f"row-{row}", None
    value = record.get(table.id_column)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return f"row-{row}", "is empty or not a string or an integer"
    cid = str(value)
    if len(cid) > MAX_CUSTOM_ID:
        return cid[:MAX_CUSTOM_ID], f"is {len(cid)} characters; at most {MAX_CUSTOM_ID}"
    return cid, None


def row_line(table: BodyTable, raw: bytes, row: int) -> tuple[bytes, str | None]:
    """One row (as `tables` writes it: a JSON object) -> (its Batch line, a problem or None)."""
    record = orjson.loads(raw)
    if table.body_column not in record:
        raise ConfigError(f"{table.path}: no column `{table.body_column}` (--body-column); "
                          f"its columns: {', '.join(record)}")
    if table.id_column is not None and table.id_column not in record:
        raise ConfigError(f"{table.path}: no column `{table.id_column}` (--id-column); its "
                          f"columns: {', '.join(record)}")
    cid, id_problem = _custom_id(table, record, row)
    body, problem = _body(record[table.body_column])
    line = {"custom_id": cid, "method": "POST", "url": table.route, "body": body}
    if id_problem is not None:  # the id stays unsent: a body-less line fails alone
        line["body"], problem = None, f"column `{table.id_column}` {id_problem}"
    elif problem is not None:
        problem = f"column `{table.body_column}` is {problem}"
    return orjson.dumps(line) + b"\n", problem


def _stage_into(table: BodyTable, out: Any) -> tuple[int, list[str]]:
    rows, problems = 0, []
    with contextlib.closing(open_input(table.path)) as f:
        for row, raw, _ in numbered_lines(f):
            if raw is None or not raw.strip():
                out.write(b"\n")
                continue
            line, problem = row_line(table, raw, row)
            rows += 1
            if problem is not None:
                problems.append(f"{table.path}: row {row}: {problem}")
            out.write(line)
    return rows, problems


def stage_bodies(table: BodyTable, out_dir: Path, restart: bool) -> Path:
    """Write OUTPUT/requests.jsonl from the table, unless it holds those bytes already."""
    make_dir(out_dir)
    target = out_dir / REQUESTS
    digest = Digest()
    rows, problems = _stage_into(table, digest)
    for message in problems[:SHOWN]:
        log.warning("%s; the row fails unsent", message)
    if len(problems) > SHOWN:
        log.warning("%s: %d more row(s) have no request body (listed in failures.jsonl)",
                    table.path, len(problems) - SHOWN)
    write_staged(target, digest, lambda out: _stage_into(table, out), restart=restart,
                 changed="another table or other --body-column / --id-column / --endpoint",
                 source=str(table.path))
    log.info("%s: %d row(s) -> %s", table.path, rows, target)
    return target
