"""Labelling inputs: raw records and a prompt template become ordinary Batch request lines.

The template never reaches the runner. Records are turned into OUTPUT/requests.jsonl, one
line per record line (blank where a record cannot be rendered), so line N of the requests is
line N of the records; the normal runner sends them with every safety rule and resume
fingerprints intact (`tools.labels` joins the answers back after the run).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.files import (
    JOURNAL,
    LABELS,
    atomic_writer,
    make_dir,
)
from tmbatch.base.redact import SECRETS
from tmbatch.base.tomlcheck import TableChecker, unknown_key
from tmbatch.inputs.files import open_input
from tmbatch.inputs.lines import Shard, in_shard, numbered_lines
from tmbatch.inputs.reader import MAX_CUSTOM_ID
from tmbatch.inputs.tables import unit_of

log = logging.getLogger("tmbatch")

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}

REQUESTS = "requests.jsonl"


CHAT = "/v1/chat/completions"


LABEL_KEYS = ("id_field", "template", "system", "labels", "schema", "schema_file",
              "max_tokens", "temperature", "gold_field")


@dataclass(frozen=True)
class Piece:
    literal: str
    field: str | None


@dataclass(frozen=True)
class LabelSpec:
    id_field: str
    template: tuple[Piece, ...]
    system: tuple[Piece, ...] | None
    labels: tuple[str, ...] | None
    schema: dict[str, Any] | None
    max_tokens: int
    temperature: float
    # The record field holding the known right label, when the dataset has one: copied into
    # labels.jsonl as `gold` (never sent), for `tmbatch compare`'s accuracy and confusion.
    gold_field: str = "gold"


@dataclass(frozen=True)
class RecordError:
    code: str
    message: str


def parse_template(c: TableChecker, key: str, value: Any) -> tuple[Piece, ...]:
    """Only plain {field} placeholders: format-spec tricks would be surprises, not features."""
    text = c.string(key, value)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{c.path}: key `{c.prefix}{key}`: {exc}; write a literal brace as "
                          "{{ or }}") from None
    pieces = []
    for literal, field, spec, conversion in parsed:
        if field is not None and (not field.isidentifier() or spec or conversion):
            raise ConfigError(
                f"{c.path}: key `{c.prefix}{key}`: placeholder {{{field}"
                f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not a "
                "plain field name; use {field} with a top-level field of the record, and {{ }} "
                "for literal braces"
            )
        pieces.append(Piece(literal, field))
    return tuple(pieces)


def _check_schema_shape(c: TableChecker, key: str, schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise c.fail(key, "a JSON schema object", schema)
    kinds = schema.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind is not None and kind not in JSON_TYPES:
            raise ConfigError(f"{c.path}: key `{c.prefix}{key}`: unknown JSON type {quoted(kind)}; "
                              "expected one of " + ", ".join(JSON_TYPES))
    for sub in (schema.get("properties") or {}).values():
        _check_schema_shape(c, key, sub)
    if isinstance(schema.get("items"), dict):
        _check_schema_shape(c, key, schema["items"])
    return schema


def quoted(value: Any) -> str:
    return orjson.dumps(value).decode()[:80]


def load_spec(job_path: Path, table: dict[str, Any]) -> LabelSpec:
    """Check the [label] table of a job file."""
    c = TableChecker(job_path, "label.")
    for key in table:
        if key not in LABEL_KEYS:
            raise unknown_key(job_path, key, list(LABEL_KEYS), "label.")
    if "template" not in table:
        raise ConfigError(f"{job_path}: key `label.template` is missing; give the prompt with "
                          "the record's fields as placeholders, e.g. "
                          '"Review: {text}\\nAllowed labels: positive, negative"')
    labels = c.string_list("labels", table["labels"]) if "labels" in table else None
    if "schema" in table and "schema_file" in table:
        raise ConfigError(f"{job_path}: give either `label.schema` or `label.schema_file`, "
                          "not both")
    schema = None
    if "schema" in table:
        schema = _check_schema_shape(c, "schema", table["schema"])
    elif "schema_file" in table:
        spath = Path(c.path_value("schema_file", table["schema_file"]))
        try:
            loaded = orjson.loads(spath.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{job_path}: key `label.schema_file`: cannot read {spath} "
                              f"({exc.strerror})") from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{job_path}: key `label.schema_file`: {spath} is not valid JSON "
                              f"({exc})") from None
        schema = _check_schema_shape(c, "schema_file", loaded)
    if labels is not None and schema is not None:
        raise ConfigError(f"{job_path}: give either `label.labels` or a schema, not both (put "
                          "the allowed values in the schema as an enum)")
    default_tokens = 16 if labels is not None else 512
    return LabelSpec(
        id_field=c.string("id_field", table.get("id_field", "id")),
        template=parse_template(c, "template", table["template"]),
        system=parse_template(c, "system", table["system"]) if "system" in table else None,
        labels=tuple(labels) if labels is not None else None,
        schema=schema,
        max_tokens=c.pos_int("max_tokens", table.get("max_tokens", default_tokens)),
        temperature=c.number("temperature", table.get("temperature", 0)),
        gold_field=c.string("gold_field", table.get("gold_field", "gold")),
    )


def iter_records(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(physical line number, stripped line); blank lines included so numbering stays exact."""
    for n, raw, _ in numbered_lines(f):
        yield n, (raw or b"").strip()


def _fill(pieces: tuple[Piece, ...], record: dict[str, Any], line: int,
          what: str, unit: str = "line") -> str | RecordError:
    out = []
    for piece in pieces:
        out.append(piece.literal)
        if piece.field is None:
            continue
        value = record.get(piece.field)
        if value is None:
            state = "is null" if piece.field in record else "is missing"
            return RecordError("missing_field", f"record {unit} {line}: field `{piece.field}` "
                               f"(used by the {what} as {{{piece.field}}}) {state}; add it to "
                               "the record or change the template")
        out.append(value if isinstance(value, str) else orjson.dumps(value).decode())
    return "".join(out)


def record_id(spec: LabelSpec, record: dict[str, Any], line: int,
              unit: str = "line") -> str | RecordError:
    value = record.get(spec.id_field)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        state = "is missing" if value is None else f"is {quoted(value)}"
        return RecordError("invalid_id", f"record {unit} {line}: id field `{spec.id_field}` "
                           f"{state}; each record needs a unique non-empty string or integer "
                           "id (set label.id_field to the field that holds it)")
    cid = str(value)
    if len(cid) > MAX_CUSTOM_ID:
        return RecordError("invalid_id", f"record {unit} {line}: id is {len(cid)} characters; "
                           f"at most {MAX_CUSTOM_ID}")
    return cid


def parse_record(raw: bytes, line: int, unit: str = "line") -> dict[str, Any] | RecordError:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return RecordError("invalid_json", f"record {unit} {line}: not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return RecordError("not_an_object", f"record {unit} {line}: expected a JSON object")
    return obj


def render(spec: LabelSpec, raw: bytes, line: int, model: str,
           unit: str = "line") -> dict[str, Any] | RecordError:
    """One record -> one Batch request line, or the reason it cannot be one. `unit`: what
    `line` counts in the messages ("row" for a Parquet or CSV table, `tables.unit_of`)."""
    record = parse_record(raw, line, unit)
    if isinstance(record, RecordError):
        return record
    cid = record_id(spec, record, line, unit)
    if isinstance(cid, RecordError):
        return cid
    messages = []
    if spec.system is not None:
        system = _fill(spec.system, record, line, "system prompt", unit)
        if isinstance(system, RecordError):
            return system
        messages.append({"role": "system", "content": system})
    prompt = _fill(spec.template, record, line, "template", unit)
    if isinstance(prompt, RecordError):
        return prompt
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"model": model, "messages": messages,
                            "max_tokens": spec.max_tokens, "temperature": spec.temperature}
    if spec.schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "label", "schema": spec.schema, "strict": True}}
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": body}


class Digest:
    """A sink that keeps only the digest of what would be written (secrets dropped, as the
    file's writer drops them)."""

    def __init__(self) -> None:
        self.h = hashlib.blake2b(digest_size=16)

    def write(self, data: bytes) -> int:
        self.h.update(SECRETS.data(data) if SECRETS else data)
        return len(data)


def file_digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def write_staged(target: Path, digest: Digest, write: Callable[[Any], object], *,
                 restart: bool, changed: str, source: str) -> None:
    """A staged input (requests.jsonl from records or a table, a model's units.jsonl) written
    by `write(sink)` only when it would not hold the bytes `digest` saw, so resume finds the
    same input; one that differs under a started journal is refused rather than mixed in
    (`changed`: what may have changed), unless --restart moves the old run aside."""
    out_dir = target.parent
    if target.exists() and file_digest(target) == digest.h.digest():
        return
    if target.exists() and (out_dir / JOURNAL).exists() and not restart:
        raise ConfigError(
            f"{out_dir} was started from {changed} ({target} differs from what {source} gives "
            "now); use another --output, or --restart to start over (old files are kept aside)")
    with atomic_writer(target) as out:
        write(out)


@dataclass
class Prepared:
    path: Path
    records: int
    errors: int
    shown: list[str]


def _render_all(spec: LabelSpec, records: str, model: str, shard: Shard | None,
                out: Any) -> Prepared:
    """One request line (or a blank line) per record line, into `out`."""
    count = errors = 0
    shown: list[str] = []
    with contextlib.closing(open_input(records)) as f:
        unit = unit_of(f)
        for line, raw in iter_records(f):
            item = render(spec, raw, line, model, unit) if raw else None
            if isinstance(item, RecordError):  # nothing to send; labels.jsonl lists it
                if in_shard(line, shard):
                    errors += 1
                    if len(shown) < 5:
                        shown.append(f"{records}: {item.message}")
                item = None
            if item is None:
                out.write(b"\n")
                continue
            count += 1
            out.write(orjson.dumps(item) + b"\n")
    return Prepared(Path(), count, errors, shown)


def prepare_requests(spec: LabelSpec, records: str, out_dir: Path, model: str | None,
                     shard: Shard | None, restart: bool) -> Prepared:
    """Write OUTPUT/requests.jsonl; the same records and job give the same bytes, so resume
    recognises its input, and changed ones are refused rather than mixed in. The records
    are rendered once to learn what the file would hold, and written (atomically) only when
    that differs from what is there."""
    if not model:
        raise ConfigError("a labelling job needs a model: set `model` in the job file or pass "
                          "--model")
    make_dir(out_dir)
    target = out_dir / REQUESTS
    digest = Digest()
    done = _render_all(spec, records, model, shard, digest)
    for message in done.shown:
        log.warning("%s", message)
    if done.errors > len(done.shown):
        log.warning("%s: %d more record(s) cannot be rendered (listed in %s)", records,
                    done.errors - len(done.shown), LABELS)
    write_staged(target, digest, lambda out: _render_all(spec, records, model, shard, out),
                 restart=restart, changed="other records or another label template / model",
                 source=records)
    return Prepared(target, done.records, done.errors, done.shown)
