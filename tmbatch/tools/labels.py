"""Labelling outputs: the answers joined back to their records, `labels.jsonl` out.

After the run the answers are joined back to the records by line number, streaming, and each
one is parsed: an answer that is not an allowed label or does not parse is listed as such,
never dropped. The records became requests in `inputs.templates`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import (
    FAILURES,
    LABELS,
    RESULTS,
    atomic_writer,
)
from tmbatch.inputs.files import InputError, open_input
from tmbatch.inputs.lines import Shard, in_shard
from tmbatch.inputs.tables import unit_of
from tmbatch.inputs.templates import (
    JSON_TYPES,
    LabelSpec,
    RecordError,
    iter_records,
    load_spec,
    parse_record,
    prepare_requests,
    quoted,
    render,
)
from tmbatch.journal.records import line_of
from tmbatch.run.config import RunConfig
from tmbatch.run.summaries import read_summary, write_summary

log = logging.getLogger("tmbatch")

STATUSES = ("ok", "invalid_label", "unparsable", "failed")


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
            return f"{where} is {quoted(value)}, not of type {'/'.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is {quoted(value)}, not one of {quoted(schema['enum'])}"
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
        unit = unit_of(f)
        for line, raw in iter_records(f):
            if not raw or not in_shard(line, shard):
                continue
            row = _label_row(spec, raw, line, where, files, unit)
            counts[row["status"]] += 1
            out.write(orjson.dumps(row) + b"\n")
    return counts


def _label_row(spec: LabelSpec, raw: bytes, line: int, where: array,
               files: dict[str, IO[bytes]], unit: str = "line") -> dict[str, Any]:
    record = parse_record(raw, line, unit)
    rid: Any = None
    if isinstance(record, dict):
        value = record.get(spec.id_field)
        rid = value if isinstance(value, str | int) and not isinstance(value, bool) else None
    row: dict[str, Any] = {"id": rid, "line": line}
    if isinstance(record, dict) and record.get(spec.gold_field) is not None:
        row["gold"] = record[spec.gold_field]  # the known answer: `tmbatch compare` scores it
    problem = render(spec, raw, line, "-", unit)
    if isinstance(problem, RecordError):
        row.update(label=None, status="failed",
                   error={"code": problem.code, "message": problem.message})
        return row
    pos = where[line] if line < len(where) else 0
    if pos == 0:
        row.update(label=None, status="failed", error={
            "code": "no_outcome", "message": f"record {unit} {line} has no outcome in "
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
    """summary.json, as the run wrote it, with a `labels` block: a new summary, replaced
    atomically like the runner writes it."""
    summary = read_summary(out_dir)
    if summary is None:
        return
    labels = {"file": LABELS, **{s: counts[s] for s in STATUSES}}
    write_summary(out_dir, replace(summary, labels=labels))


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


def setup(job_path: Path, table: dict[str, Any], config: RunConfig) -> LabelRun:
    """For a job with a [label] table: write the requests the run reads (`config.input`,
    OUTPUT/requests.jsonl, as `cli.resolve` decided) from its records (`config.records`)."""
    spec = load_spec(job_path, table)
    records = config.records
    assert records is not None, "a labelling job's config names its records"
    prepared = prepare_requests(spec, records, config.out_dir, config.model, config.shard,
                                config.restart)
    assert str(prepared.path) == config.input, (prepared.path, config.input)
    log.info("%s: %d record(s) -> %s", records, prepared.records, prepared.path)
    return LabelRun(spec, records, config.out_dir, config.shard, config.quiet)
