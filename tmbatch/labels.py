"""Labelling jobs: raw records + a prompt template in, `labels.jsonl` out.

The template never reaches the runner. Records are turned into ordinary Batch
request lines in OUTPUT/requests.jsonl, one line per record line (blank where
a record cannot be rendered), so line N of the requests is line N of the
records; the normal runner sends them with every safety rule and resume
fingerprints intact. After the run the answers are joined back to the records
by line number, streaming, and each one is parsed: an answer that is not an
allowed label or does not parse is listed as such, never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import string
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from tmbatch.config import ConfigError
from tmbatch.exitcodes import ExitCode
from tmbatch.files import (
    FAILURES,
    FILE_MODE,
    JOURNAL,
    LABELS,
    RESULTS,
    SUMMARY,
    atomic_writer,
    make_dir,
)
from tmbatch.lines import Shard, in_shard, numbered_lines
from tmbatch.reader import MAX_CUSTOM_ID, InputError, open_input
from tmbatch.records import line_of
from tmbatch.summary import write_summary
from tmbatch.tomlcheck import TableChecker, unknown_key

log = logging.getLogger("tmbatch")

REQUESTS = "requests.jsonl"
CHAT = "/v1/chat/completions"
STATUSES = ("ok", "invalid_label", "unparsable", "failed")
LABEL_KEYS = ("id_field", "template", "system", "labels", "schema", "schema_file",
              "max_tokens", "temperature")
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


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
            raise ConfigError(f"{c.path}: key `{c.prefix}{key}`: unknown JSON type {_q(kind)}; "
                              "expected one of " + ", ".join(JSON_TYPES))
    for sub in (schema.get("properties") or {}).values():
        _check_schema_shape(c, key, sub)
    if isinstance(schema.get("items"), dict):
        _check_schema_shape(c, key, schema["items"])
    return schema


def _q(value: Any) -> str:
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
    )


# -- records -> requests ---------------------------------------------------------------------
def iter_records(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(physical line number, stripped line); blank lines included so numbering stays exact."""
    for n, raw, _ in numbered_lines(f):
        yield n, (raw or b"").strip()


def _fill(pieces: tuple[Piece, ...], record: dict[str, Any], line: int,
          what: str) -> str | RecordError:
    out = []
    for piece in pieces:
        out.append(piece.literal)
        if piece.field is None:
            continue
        value = record.get(piece.field)
        if value is None:
            state = "is null" if piece.field in record else "is missing"
            return RecordError("missing_field", f"record line {line}: field `{piece.field}` "
                               f"(used by the {what} as {{{piece.field}}}) {state}; add it to "
                               "the record or change the template")
        out.append(value if isinstance(value, str) else orjson.dumps(value).decode())
    return "".join(out)


def record_id(spec: LabelSpec, record: dict[str, Any], line: int) -> str | RecordError:
    value = record.get(spec.id_field)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        state = "is missing" if value is None else f"is {_q(value)}"
        return RecordError("invalid_id", f"record line {line}: id field `{spec.id_field}` "
                           f"{state}; each record needs a unique non-empty string or integer "
                           "id (set label.id_field to the field that holds it)")
    cid = str(value)
    if len(cid) > MAX_CUSTOM_ID:
        return RecordError("invalid_id", f"record line {line}: id is {len(cid)} characters; "
                           f"at most {MAX_CUSTOM_ID}")
    return cid


def parse_record(raw: bytes, line: int) -> dict[str, Any] | RecordError:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return RecordError("invalid_json", f"record line {line}: not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return RecordError("not_an_object", f"record line {line}: expected a JSON object")
    return obj


def render(spec: LabelSpec, raw: bytes, line: int, model: str) -> dict[str, Any] | RecordError:
    """One record -> one Batch request line, or the reason it cannot be one."""
    record = parse_record(raw, line)
    if isinstance(record, RecordError):
        return record
    cid = record_id(spec, record, line)
    if isinstance(cid, RecordError):
        return cid
    messages = []
    if spec.system is not None:
        system = _fill(spec.system, record, line, "system prompt")
        if isinstance(system, RecordError):
            return system
        messages.append({"role": "system", "content": system})
    prompt = _fill(spec.template, record, line, "template")
    if isinstance(prompt, RecordError):
        return prompt
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"model": model, "messages": messages,
                            "max_tokens": spec.max_tokens, "temperature": spec.temperature}
    if spec.schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "label", "schema": spec.schema, "strict": True}}
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": body}


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    digests = []
    for p in (a, b):
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digests.append(h.digest())
    return digests[0] == digests[1]


@dataclass
class Prepared:
    path: Path
    records: int
    errors: int


def prepare_requests(spec: LabelSpec, records: str, out_dir: Path, model: str | None,
                     shard: Shard | None, restart: bool) -> Prepared:
    """Write OUTPUT/requests.jsonl; the same records and job give the same bytes, so resume
    recognises its input, and changed ones are refused rather than mixed in."""
    if not model:
        raise ConfigError("a labelling job needs a model: set `model` in the job file or pass "
                          "--model")
    make_dir(out_dir)
    target = out_dir / REQUESTS
    tmp = out_dir / f".{REQUESTS}.{os.getpid()}.tmp"
    count = errors = 0
    shown: list[str] = []
    f = open_input(records)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            for line, raw in iter_records(f):
                if not raw:
                    out.write(b"\n")
                    continue
                item = render(spec, raw, line, model)
                if isinstance(item, RecordError):
                    out.write(b"\n")  # nothing to send; labels.jsonl lists it as failed
                    if in_shard(line, shard):
                        errors += 1
                        if len(shown) < 5:
                            shown.append(item.message)
                    continue
                count += 1
                out.write(orjson.dumps(item) + b"\n")
    finally:
        f.close()
    for message in shown:
        log.warning("%s: %s", records, message)
    if errors > len(shown):
        log.warning("%s: %d more record(s) cannot be rendered (listed in %s)", records,
                    errors - len(shown), LABELS)
    if target.exists() and _same_file(target, tmp):
        tmp.unlink()
    elif target.exists() and (out_dir / JOURNAL).exists() and not restart:
        tmp.unlink()
        raise ConfigError(
            f"{out_dir} was started from other records or another label template / model "
            f"({target} differs from what {records} gives now); use another --output, or "
            "--restart to start over (old files are kept aside)"
        )
    else:
        os.replace(tmp, target)
    return Prepared(target, count, errors)


# -- answers -> labels -----------------------------------------------------------------------
def answer_text(body: Any) -> str | None:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def check_value(value: Any, schema: dict[str, Any], where: str = "answer") -> str | None:
    """The JSON Schema subset labelling needs (type, enum, required, properties,
    additionalProperties: false, items): enough to reject a wrong label without a dependency."""
    kinds = schema.get("type")
    if kinds is not None:
        names = kinds if isinstance(kinds, list) else [kinds]
        ok = any(isinstance(value, JSON_TYPES[k]) and not (
            k in ("integer", "number") and isinstance(value, bool)) for k in names)
        if not ok:
            return f"{where} is {_q(value)}, not of type {'/'.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is {_q(value)}, not one of {_q(schema['enum'])}"
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                return f"{where} lacks required key `{key}`"
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return f"{where} has unexpected key(s) {', '.join(extra)}"
        for key, sub in props.items():
            if key in value and isinstance(sub, dict):
                problem = check_value(value[key], sub, f"{where}.{key}")
                if problem:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = check_value(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    return None


def _strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```") and t.endswith("```") and len(t) >= 6:
        t = t[3:-3]
        first, _, rest = t.partition("\n")
        t = rest if first.strip().isalpha() or not first.strip() else t
    return t.strip()


def parse_answer(spec: LabelSpec, text: str | None) -> tuple[str, Any, str | None]:
    """(status, label, why): labels are matched case-insensitively, ignoring quotes and a
    trailing full stop, and reported in the spelling of the job file."""
    if text is None or not text.strip():
        return "unparsable", None, "empty answer"
    if spec.schema is not None:
        try:
            value = orjson.loads(_strip_fence(text))
        except orjson.JSONDecodeError:
            return "unparsable", None, "answer is not JSON"
        problem = check_value(value, spec.schema)
        if problem:
            return "invalid_label", None, problem
        return "ok", value, None
    cleaned = text.strip().strip("\"'`.").strip()
    if spec.labels is None:
        return "ok", cleaned, None
    for label in spec.labels:
        if cleaned.casefold() == label.casefold():
            return "ok", label, None
    return "invalid_label", None, f"not one of {', '.join(spec.labels)}"


def _index_outcomes(out_dir: Path) -> array:
    """Per input line, where its outcome is: +offset+1 in results, -(offset+1) in failures.
    Eight bytes a line and no answers held, whatever the size of the run."""
    where = array("q")

    def put(line: int, value: int) -> None:
        if line >= len(where):
            where.frombytes(bytes(8 * (line + 1 - len(where) + 1024)))
        where[line] = value

    for name, sign in ((RESULTS, 1), (FAILURES, -1)):
        path = out_dir / name
        if not path.exists():
            continue
        with open(path, "rb") as f:
            pos = 0
            for raw in f:
                line = line_of(raw)
                if line is not None and line > 0:
                    current = where[line] if line < len(where) else 0
                    if sign > 0 or current <= 0:  # a result beats any failure of the line
                        put(line, sign * (pos + 1))
                pos += len(raw)
    return where


def _read_at(f: IO[bytes], offset: int) -> dict[str, Any]:
    f.seek(offset)
    return orjson.loads(f.readline())


def build_labels(spec: LabelSpec, records: str, out_dir: Path,
                 shard: Shard | None) -> Counter[str]:
    """Write OUTPUT/labels.jsonl in record order: one line per record of this shard."""
    where = _index_outcomes(out_dir)
    counts: Counter[str] = Counter({s: 0 for s in STATUSES})
    with contextlib.ExitStack() as stack:
        files = {n: stack.enter_context(open(out_dir / n, "rb"))
                 for n in (RESULTS, FAILURES) if (out_dir / n).exists()}
        f = stack.enter_context(open_input(records))
        out = stack.enter_context(atomic_writer(out_dir / LABELS))
        for line, raw in iter_records(f):
            if not raw or not in_shard(line, shard):
                continue
            row = _label_row(spec, raw, line, where, files)
            counts[row["status"]] += 1
            out.write(orjson.dumps(row) + b"\n")
    return counts


def _label_row(spec: LabelSpec, raw: bytes, line: int, where: array,
               files: dict[str, IO[bytes]]) -> dict[str, Any]:
    record = parse_record(raw, line)
    rid: Any = None
    if isinstance(record, dict):
        value = record.get(spec.id_field)
        rid = value if isinstance(value, str | int) and not isinstance(value, bool) else None
    row: dict[str, Any] = {"id": rid, "line": line}
    problem = render(spec, raw, line, "-")
    if isinstance(problem, RecordError):
        row.update(label=None, status="failed",
                   error={"code": problem.code, "message": problem.message})
        return row
    pos = where[line] if line < len(where) else 0
    if pos == 0:
        row.update(label=None, status="failed", error={
            "code": "no_outcome", "message": f"record line {line} has no outcome in "
            f"{RESULTS} or {FAILURES}; run the job again to resume"})
        return row
    if pos < 0:
        err = _read_at(files[FAILURES], -pos - 1).get("error") or {}
        row.update(label=None, status="failed", error={
            "code": err.get("code"), "message": err.get("message"), "class": err.get("class")})
        return row
    rec = _read_at(files[RESULTS], pos - 1)
    text = answer_text((rec.get("response") or {}).get("body"))
    status, label, why = parse_answer(spec, text)
    row.update(label=label, status=status)
    if status != "ok":
        row.update(raw=text, reason=why)
    return row


def add_to_summary(out_dir: Path, counts: Counter[str]) -> None:
    """summary.json gains a `labels` block, replaced atomically like the runner writes it."""
    path = out_dir / SUMMARY
    try:
        summary = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return
    summary["labels"] = {"file": LABELS, **{s: counts[s] for s in STATUSES}}
    write_summary(out_dir, summary)


def finish(spec: LabelSpec, records: str, out_dir: Path, shard: Shard | None,
           code: int, quiet: bool = False) -> int:
    """After the run: labels.jsonl when the run finished; exit 1 when some label is not ok."""
    if code not in (ExitCode.OK, ExitCode.FAILED):
        log.info("%s is written when a run of this job finishes (run the same command again)",
                 LABELS)
        return code
    try:
        counts = build_labels(spec, records, out_dir, shard)
    except InputError as exc:
        raise ConfigError(f"cannot build {LABELS}: {exc}") from None
    add_to_summary(out_dir, counts)
    if not quiet:
        parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
        print(f"labels: {parts} -> {out_dir / LABELS}", flush=True, file=sys.stderr)
    bad = sum(counts[s] for s in STATUSES if s != "ok")
    return ExitCode.FAILED if bad and code == ExitCode.OK else code


@dataclass
class LabelRun:
    """What `run` needs to remember between preparing the requests and building labels."""

    spec: LabelSpec
    records: str
    out_dir: Path
    shard: Shard | None
    quiet: bool

    def finish(self, code: int) -> int:
        return finish(self.spec, self.records, self.out_dir, self.shard, code, self.quiet)


def setup(job_path: Path, table: dict[str, Any], ns: argparse.Namespace,
          out_dir: Path) -> LabelRun:
    """For a job with a [label] table: write the requests and point the run at them."""
    if ns.endpoint:
        raise ConfigError(f"{job_path}: a labelling job builds its chat requests itself; remove "
                          "`endpoint` from the job file (and --endpoint)")
    spec = load_spec(job_path, table)
    records = ns.input
    prepared = prepare_requests(spec, records, out_dir, ns.model, ns.shard, ns.restart)
    log.info("%s: %d record(s) -> %s", records, prepared.records, prepared.path)
    ns.input = str(prepared.path)
    return LabelRun(spec, records, out_dir, ns.shard, bool(getattr(ns, "quiet", False)))
