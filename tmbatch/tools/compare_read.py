"""What `tmbatch compare` reads: which directories are runs, and each run's answers per unit.

A run is a tmbatch output directory (it has a journal). A directory without one whose
subdirectories are runs (what `run --models` writes under `-o`: one per model) stands for
them all. The journal is read through `report_data.load_run` (the journal's one reader:
counts, latencies, spend, prices); results.jsonl and failures.jsonl give each unit's answer
or failure class; labels.jsonl, when the run is a finished labelling job, its labels and the
records' gold labels.

A unit is (custom_id, sample): the `sample` field of an outcome line (`run --samples`), 0
where there is none, so the same sample of the same line is matched across runs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.files import FAILURES, JOURNAL, LABELS, RESULTS
from tmbatch.inputs.files import InputError, fingerprint
from tmbatch.journal.records import usage_tokens
from tmbatch.policy import Outcome
from tmbatch.tools.compare_stats import answer_key, label_key
from tmbatch.tools.report_data import RunData, load_run
from tmbatch.tools.tables import text_of

Unit = tuple[str, int]  # (custom_id, sample)
MAX_DEPTH = 3  # how deep under a parent directory runs are looked for
MODELS_FILE = "models.json"  # `run --models`: OUT/models.json, each model's directory


class CompareError(ValueError):
    """The runs cannot be compared as asked; a ValueError, so the CLI answers with exit 2."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One unit's outcome in one run: its answer (a digest of the normalised text) when it
    succeeded, its failure class when it failed."""

    failure: Outcome | None
    line: int  # the input line: the order units are listed in
    text: bytes | None = None
    finish: str | None = None


@dataclass
class Run:
    """One output directory as compare sees it."""

    path: Path
    label: str
    model: str | None
    data: RunData  # the journal's: counts, latencies, spend and prices
    input: str = ""  # what the run read, as an identity: equal for runs of the same input
    answers: dict[Unit, Answer] = field(default_factory=dict)
    finish: Counter[str] = field(default_factory=Counter)  # finish reasons of the successes
    usage: list[int] = field(default_factory=lambda: [0, 0, 0])  # results' prompt, out, cached
    labels: dict[Unit, str | None] | None = None  # labels.jsonl: None where not a valid label
    gold: dict[Unit, str] = field(default_factory=dict)  # the records' gold labels


def find_runs(paths: Sequence[str]) -> list[Path]:
    """The run directories PATHS name: each one a run, or a parent of runs (`--models`)."""
    runs: list[Path] = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise CompareError(f"{text}: no such directory; give the output directory of a "
                               "`tmbatch run` (its -o)")
        if not path.is_dir():
            raise CompareError(f"{text} is a file, not an output directory; give the directory "
                               "that holds journal.jsonl and results.jsonl")
        found = [path] if (path / JOURNAL).is_file() else runs_under(path)
        if not found:
            raise CompareError(
                f"{text} is not a tmbatch output directory (it has no {JOURNAL}), and no "
                "directory under it is one; give the output directories of `tmbatch run` (-o), "
                "or the -o of a run with --models")
        runs.extend(found)
    seen: dict[Path, Path] = {}
    for run in runs:
        real = run.resolve()
        if real in seen:
            raise CompareError(f"{run} is given twice (as {seen[real]} too); give each run once")
        seen[real] = run
    if len(runs) < 2:
        raise CompareError(
            f"compare needs at least two runs; {paths[0]} is one run ({runs[0]}); give another "
            "output directory, or the -o of a run with --models (one directory per model)")
    return runs


def runs_under(parent: Path) -> list[Path]:
    """The run directories below `parent`, sorted, not descending into a run (its report/)."""
    found: list[Path] = []
    base = len(parent.parts)
    for root, dirs, files in os.walk(parent):
        here = Path(root)
        if JOURNAL in files and here != parent:
            found.append(here)
            dirs.clear()
        elif len(here.parts) - base >= MAX_DEPTH:
            dirs.clear()
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    order = {d: i for i, d in enumerate(_listed_dirs(parent))}  # `--models`' order, then names
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p))


def _listed(parent: Path) -> list[dict[str, Any]]:
    """`run --models` lists in OUT/models.json which directory holds which model (a name such
    as org/model is percent-encoded in its directory's): {"models": [{"model", "dir"}]}, in
    the order given. Only names and an order to show: a file of another shape is ignored."""
    try:
        listed = orjson.loads((parent / MODELS_FILE).read_bytes()).get("models")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return []
    return [e for e in listed if isinstance(e, dict) and isinstance(e.get("dir"), str)
            and isinstance(e.get("model"), str)] if isinstance(listed, list) else []


def _listed_dirs(parent: Path) -> list[str]:
    return [e["dir"] for e in _listed(parent)]


def load(path: Path, sample: int | None) -> Run:
    """One run: its journal's figures, then its outcomes and labels, unit by unit."""
    data = load_run(path)  # a JournalError (exit 2) when the journal is not one
    run = Run(path, path.name, _model(path, data), data, _input_identity(path, data))
    _read_outcomes(run, sample)
    _read_labels(run, sample)
    return run


def _model(path: Path, data: RunData) -> str | None:
    """The run's model: the one its header says (--model), else the one `run --models` wrote
    this directory for (the parent's models.json), else the one its spend was booked to."""
    model = data.header.options.get("model")
    if isinstance(model, str) and model:
        return model
    model = _listed_model(path)
    if model is not None:
        return model
    booked = sorted(data.spend[-1].spent) if data.spend else []
    return "+".join(booked) if booked else None


def _input_identity(path: Path, data: RunData) -> str:
    """The journal's fingerprint of the input; for a model's directory of `run --models`
    (whose input is its own units file, the model written in), the fingerprint of the input
    models.json names, so the models of one run, and a plain run of the same file, match."""
    parent = path.parent
    if any(e["dir"] == path.name for e in _listed(parent)):
        try:
            source = orjson.loads((parent / MODELS_FILE).read_bytes()).get("input")
            if isinstance(source, str):
                return fingerprint(source)
        except (OSError, InputError, orjson.JSONDecodeError, AttributeError):
            pass
    return data.header.fingerprint


def _listed_model(path: Path) -> str | None:
    """The model `run --models` wrote this directory for, from its parent's models.json."""
    for entry in _listed(path.parent):
        if entry["dir"] == path.name:
            return str(entry["model"])
    return None


def label_runs(runs: list[Run]) -> None:
    """Each run's name in every table: its model, or its directory's name when the runs do
    not all have distinct models; its path when even those collide."""
    for pick in (lambda r: r.model or r.path.name, lambda r: r.path.name, lambda r: str(r.path)):
        names = [pick(r) for r in runs]
        if len(set(names)) == len(names):
            break
    for run, name in zip(runs, names, strict=True):
        run.label = name


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL output file; a torn last line (a run still writing,
    or killed) is not a record; any other line that is not a JSON object is an error."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CompareError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if not raw.endswith(b"\n"):
                    return
                raise CompareError(f"{path}, line {n}: not JSON; {path.name} is written by "
                                   "tmbatch only: restore it, or compare other runs") from None
            if not isinstance(rec, dict):
                raise CompareError(f"{path}, line {n}: not a JSON object")
            yield n, rec


def _unit(rec: dict[str, Any], id_key: str) -> tuple[Unit, int]:
    """The unit a record is about, and its sample index."""
    sample = rec.get("sample")
    sample = sample if type(sample) is int else 0
    cid = rec.get(id_key)
    if isinstance(cid, int) and not isinstance(cid, bool):
        cid = str(cid)
    if not isinstance(cid, str):
        cid = f"line-{rec.get('line')}"  # a bad input line has no custom_id: its line number
    return (cid, sample), sample


def _line(rec: dict[str, Any]) -> int:
    line = rec.get("line")
    return line if type(line) is int else 0


def _read_outcomes(run: Run, sample: int | None) -> None:
    """Failures first, then results: a result beats any failure of its unit (a resend that
    succeeded), and a later failure replaces an earlier one (failures.jsonl is appended to)."""
    for n, rec in _records(run.path / FAILURES):
        unit, s = _unit(rec, "custom_id")
        if sample is not None and s != sample:
            continue
        error = rec.get("error")
        try:
            cls = Outcome(error.get("class")) if isinstance(error, dict) else None
        except ValueError:
            cls = None
        if cls is None or not cls.policy.failure:
            raise CompareError(f"{run.path / FAILURES}, line {n}: no failure class in "
                               "`error.class`; it is not a tmbatch failures file")
        run.answers[unit] = Answer(cls, _line(rec))
    for _, rec in _records(run.path / RESULTS):
        unit, s = _unit(rec, "custom_id")
        if sample is not None and s != sample:
            continue
        response = rec.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        text, finish = text_of(body)
        run.answers[unit] = Answer(None, _line(rec), answer_key(text),
                                   finish if isinstance(finish, str) else None)
        run.finish[finish if isinstance(finish, str) else "(none)"] += 1
        used = usage_tokens(body) if isinstance(body, dict) else None
        if used is not None:
            for i, v in enumerate(used):
                run.usage[i] += v


def _read_labels(run: Run, sample: int | None) -> None:
    """labels.jsonl (a finished labelling job): each unit's label, None where the answer was
    not a valid label or the line failed; and the record's gold label when it has one."""
    path = run.path / LABELS
    if not path.is_file():
        return
    labels: dict[Unit, str | None] = {}
    for _, row in _records(path):
        unit, s = _unit(row, "id")
        if sample is not None and s != sample:
            continue
        ok = row.get("status") == "ok" and row.get("label") is not None
        labels[unit] = label_key(row["label"]) if ok else None
        if row.get("gold") is not None:
            run.gold[unit] = label_key(row["gold"])
    run.labels = labels
