"""The journal's format: every record kind the writer produces decodes to a typed value and
encodes back to the same bytes; a line that is no record stops every reader (resume, status,
merge, report) with one clear error; and no module but `journal.format` parses the tags."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import orjson
import pytest

import tmbatch
from tests.conftest import run_cli, write_jsonl
from tmbatch.base.files import JOURNAL
from tmbatch.inputs.files import fingerprint
from tmbatch.journal.compact import LineStates
from tmbatch.journal.format import (
    BudgetRecord,
    DispatchRecord,
    Header,
    JournalError,
    MarkRecord,
    OutcomeRecord,
    PauseRecord,
    Record,
    RecordError,
    ResumeRecord,
    SpendRecord,
    decode,
    decode_header,
)
from tmbatch.journal.journal import load
from tmbatch.journal.reading import read_header, records
from tmbatch.journal.records import FailureRecord, Response, ResultRecord
from tmbatch.journal.writer import Writer
from tmbatch.policy import Outcome

HEADER = Header(input="/x/in.jsonl", fingerprint="f" * 64, job="j0b",
                options={"endpoint": None, "model": None, "stream": None, "shard": None},
                t=1.7e9, tmbatch="0.0")
KINDS = set(typing.get_args(Record))


def _written(out: Path) -> list[bytes]:
    """A journal the real writer wrote, with every kind of record it writes."""
    out.mkdir()
    w = Writer(out, LineStates(), fsync="never")
    w.header(HEADER)
    w.header(ResumeRecord(1.7e9 + 60, resend=2))
    w.header({"e": "budget", "t": 1.7e9 + 61, "tokens": 5000, "usd": None,
              "prices": {"m": {"input": 1.0, "output": 2.0}}})  # as `spend.budget` hands it
    w.dispatch(1, 1, "a")
    w.dispatch(2, 1, "b", ["m", 40, 16])
    w.dispatch(3, 2, "c", ["m", 40, 16])
    w.result(ResultRecord("batch_req_a", "a", 1, Response(200, "r", {"x": 1})), 0.1234, 0.05)
    w.result(ResultRecord("batch_req_b", "b", 2, Response(200, "r", {"x": 2})))
    w.failure(FailureRecord.of("j0b", 3, "c", Outcome.PERMANENT, "http_400", "bad", 2))
    w.pending(4)
    w.pause(2.5)
    w.spend(SpendRecord(1.7e9 + 62, {"m": [40, 16, 0, 1]}, {"m": [40, 16, 1]}, 1))
    w.close()
    return (out / JOURNAL).read_bytes().splitlines(keepends=True)


def test_every_kind_the_writer_writes_decodes_typed_and_encodes_to_the_same_bytes(
        tmp_path: Path) -> None:
    lines = _written(tmp_path / "out")
    assert read_header(tmp_path / "out") == HEADER
    assert HEADER.to_json() == lines[0]
    decoded = [decode(raw) for raw in lines[1:]]
    assert {type(r) for r in decoded} | {Header} == KINDS  # every kind, each typed
    for raw, rec in zip(lines[1:], decoded, strict=True):
        assert rec.to_json() == raw, rec
    assert decoded == list(records(tmp_path / "out" / JOURNAL))  # one reader, one decoder
    d2 = next(r for r in decoded if isinstance(r, DispatchRecord) and r.line == 2)
    assert d2.reserved == ("m", 40, 16)
    ok = next(r for r in decoded if isinstance(r, OutcomeRecord) and r.line == 1)
    assert ok.outcome is Outcome.OK and ok.latency_ms == 123.4 and ok.ttft_ms == 50.0


SAMPLES: list[Record] = [
    HEADER, dataclasses.replace(HEADER, merged=[{"dir": "a", "shard": [0, 2], "job": "x"}]),
    ResumeRecord(5.0), ResumeRecord(5.0, resend=3),
    BudgetRecord(6.0), BudgetRecord(6.0, 100, 1.5, {"m": {"input": 1.0, "output": 2.0}}),
    DispatchRecord(7, 1, "id"), DispatchRecord(7, 3, "id", ("m", 1, 2)),
    OutcomeRecord(7, Outcome.PENDING), OutcomeRecord(7, Outcome.AMBIGUOUS, "http_500", 8.0),
    OutcomeRecord(7, Outcome.OK, "", 8.0, 12.5, None),
    OutcomeRecord(7, Outcome.OK, "", 8.0, None, 3.0),
    PauseRecord(9.0, 30), MarkRecord(0, 0), MarkRecord(123, 45),
    SpendRecord(10.0, {}), SpendRecord(10.0, {"m": [1, 2, 3, 4]}, {"m": [5, 6, 1]}, 2),
]


@pytest.mark.parametrize("rec", SAMPLES, ids=lambda r: type(r).__name__)
def test_each_record_round_trips(rec: Record) -> None:
    raw = rec.to_json()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    if isinstance(rec, Header):
        assert decode_header(orjson.loads(raw)) == rec
    else:
        assert decode(raw) == rec


def test_journals_an_older_tmbatch_wrote_still_decode() -> None:
    """Outcomes without the time fields (and the oldest without the code)."""
    assert decode(b'["o",1,"ok"]\n') == OutcomeRecord(1, Outcome.OK)
    assert decode(b'["o",2,"permanent","http_400"]\n') == \
        OutcomeRecord(2, Outcome.PERMANENT, "http_400")
    assert decode(b'["d",3,1,"c"]\n') == DispatchRecord(3, 1, "c")
    assert decode(b'{"e":"resume","t":1}\n') == ResumeRecord(1)


BAD = [
    (b'["d", 5, 1, "e"', "a corrupt line (not a torn last line)"),
    (b'["x", 1, 2]', 'an unknown record kind "x"'),
    (b"[]", "neither a record list nor an event object"),
    (b'{"e": "restart", "t": 1}', 'an unknown event "restart"'),
    (b'{"e": "start", "job": "j", "input": "-", "fingerprint": "f"}', "a second journal header"),
    (b'["d", "5", 1, "e"]', "a dispatch is"),
    (b'["d", -5, 1, "e"]', "a dispatch is"),
    (b'["d", 5, 1, "e", ["m", "forty", 16]]', "a dispatch is"),
    (b'["o", 5, "great", ""]', 'an unknown outcome "great"'),
    (b'["o", 5, "ok", "", "noon"]', "an outcome is"),
    (b'["m", 10]', "a mark is"),
    (b'["p", 1.0, null]', "a pause is"),
    (b'["s", 1.0, [], {}, 0]', "a spend snapshot is"),
    (b"42", "neither a record list nor an event object"),
]


def _journal_with(out: Path, bad: bytes, header: Header = HEADER) -> Path:
    """A run's directory whose journal's fourth line is `bad`."""
    out.mkdir()
    write_jsonl(out / JOURNAL, [orjson.loads(header.to_json()), ["d", 1, 1, "a"],
                                ["o", 1, "ok", "", 1.7e9]])
    with open(out / JOURNAL, "ab") as f:
        f.write(bad + b"\n" + b'["m",0,0]\n')
    for name in ("results.jsonl", "failures.jsonl"):
        (out / name).touch()
    return out


@pytest.mark.parametrize(("bad", "why"), BAD, ids=[b.decode()[:24] for b, _ in BAD])
def test_a_line_that_is_no_record_is_one_clear_error_for_resume_and_status(
        tmp_path: Path, bad: bytes, why: str) -> None:
    out = _journal_with(tmp_path / "out", bad)
    with pytest.raises(RecordError, match=re.escape(why)):
        decode(bad + b"\n")
    for repair in (True, False):  # resume; status (read-only, while a run may write)
        with pytest.raises(JournalError) as err:
            load(out, repair=repair)
        message = str(err.value)
        assert message.startswith(f"{out / JOURNAL}, line 4: {why}")
        assert repr(bad + b"\n") in message and "--restart" in message


def test_merge_report_and_status_stop_at_the_same_error(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"line": 1}])
    header = dataclasses.replace(HEADER, input=str(inp), fingerprint=fingerprint(str(inp)))
    out = _journal_with(tmp_path / "out", b'["o", 5, "great", ""]', header)
    expected = f"{out / JOURNAL}, line 4: an unknown outcome \"great\""
    for args in (["status", str(out)], ["report", str(out)],
                 ["merge", str(out), "-o", str(tmp_path / "merged")]):
        p = run_cli(args)
        assert p.returncode == 2, (args, p.stderr)
        assert expected in p.stderr, (args, p.stderr)


def test_a_torn_last_line_is_never_data_and_never_an_error(tmp_path: Path) -> None:
    out = _journal_with(tmp_path / "out", b'["m", 0, 0]')
    with open(out / JOURNAL, "ab") as f:
        f.write(b'["d", 7, 1, "g", ["m", 1')
    assert [type(r) for r in records(out / JOURNAL)] == \
        [DispatchRecord, OutcomeRecord, MarkRecord, MarkRecord]
    assert load(out, repair=False).attempts_done == 1


def test_a_directory_without_a_journal_header_is_refused(tmp_path: Path) -> None:
    (tmp_path / JOURNAL).write_bytes(b'["d", 1, 1, "a"]\n')
    with pytest.raises(JournalError, match="the first line is not a tmbatch journal header"):
        read_header(tmp_path)
    with pytest.raises(JournalError, match="not a tmbatch output directory"):
        read_header(tmp_path / "nothing")


# -- no module but journal.format parses journal tags -------------------------------------------
ROOT = Path(tmbatch.__file__).parent
FORMAT = ROOT / "journal" / "format.py"
TAGS = {"d", "o", "p", "m", "s"}


def _is_tag(node: ast.AST) -> bool:
    """A tag constant, or a tuple/list/set of them."""
    if isinstance(node, ast.Constant):
        return node.value in TAGS
    return isinstance(node, ast.Tuple | ast.List | ast.Set) and bool(node.elts) and all(
        isinstance(e, ast.Constant) and e.value in TAGS for e in node.elts)


def _first_item(node: ast.AST) -> bool:
    """`x[0]`: where a journal list keeps its tag."""
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
        and node.slice.value == 0


def tag_parsing(source: str) -> list[tuple[int, str]]:
    """(line, what) for each place the source reads a journal record's tag itself: compares
    an item 0 with a tag, reads an object's "e", or matches a journal line's raw bytes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_first_item(s) for s in sides) and any(_is_tag(s) for s in sides):
                found.append((node.lineno, "compares item 0 with a journal tag"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "get" and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "e":
            found.append((node.lineno, 'reads "e"'))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and node.slice.value == "e":
            found.append((node.lineno, 'reads ["e"]'))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bytes) \
                and node.value[:3] in {b'["' + t.encode() for t in TAGS}:
            found.append((node.lineno, "matches a journal line's bytes"))
    return found


def test_the_check_sees_the_ways_journal_tags_were_parsed_before() -> None:
    old = '''
rec = orjson.loads(raw)
if rec.get("e") == "resume": pass
if rec[0] == "o": pass
elif rec[0] in ("d", "o"): pass
if raw.startswith((b'["d"', b'["o"')): pass
'''
    assert sorted({line for line, _ in tag_parsing(old)}) == [3, 4, 5, 6]


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py") if p != FORMAT),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_journal_format_parses_journal_tags(path: Path) -> None:
    found = tag_parsing(path.read_text())
    assert not found, f"{path.relative_to(ROOT)} parses journal records itself (" + \
        ", ".join(f"line {n}: {what}" for n, what in found) + \
        "); read them with journal.reading.records / JournalReader"


def test_readers_read_through_the_one_reader() -> None:
    """Resume, status, merge and report name the reader, and none of them orjson-loads a
    journal line."""
    users = {"journal/journal.py": "JournalReader", "tools/merge_join.py": "JournalReader",
             "tools/report_data.py": "JournalReader", "tools/status.py": "load"}
    for rel, name in users.items():
        assert name in (ROOT / rel).read_text(), rel

