"""Every message reads as English written for a person: no Python type names, no `None`,
no reprs of lists. The hostile-input corpus checks the reader's own messages."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import chat_line, run_cli, write_jsonl
from tmbatch.base.words import json_type, setting


def test_json_types_are_named_as_json_names_them() -> None:
    assert [json_type(v) for v in (None, True, 3, 2.5, "x", [1], {"a": 1})] == [
        "null", "a boolean", "a number", "a number", "a string", "an array", "an object"]


def test_option_values_are_spelled_as_on_the_command_line() -> None:
    assert [setting(v) for v in (None, True, False, [0, 4], "tm-large")] == [
        "not set", "on", "off", "0/4", "'tm-large'"]


def test_a_resume_with_other_options_names_them_in_english(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    out = tmp_path / "out"
    assert run_cli(["run", str(inp), "-o", str(out), "--sim", "-q"]).returncode == 0
    p = run_cli(["run", str(inp), "-o", str(out), "--sim", "-q", "--model", "tm-large",
                 "--stream", "--shard", "0/1"])
    assert p.returncode == 2
    assert "model was not set, now 'tm-large'" in p.stderr
    assert "stream was not set, now on" in p.stderr and "shard was not set, now 0/1" in p.stderr
    assert "None" not in p.stderr


def _duplicates(data: bytes) -> dict[int, str]:
    import io

    from tmbatch.inputs.reader import BadLine, read_requests

    return {item.line: item.message for item in read_requests(io.BytesIO(data))
            if isinstance(item, BadLine)}


def test_a_duplicate_custom_id_names_the_line_that_used_it_first() -> None:
    import orjson

    rows = [orjson.dumps(chat_line(i)) for i in range(5)]
    rows.append(b'{"custom_id":"req-\\u0032","method":"POST","url":"/v1/chat/completions",'
                b'"body":{"model":"tm-small","messages":[]}}')  # req-2, spelled with an escape
    rows.append(orjson.dumps(chat_line(2)))
    rows.append(orjson.dumps({**chat_line(9), "custom_id": 9}))  # bad: not a first use
    rows.append(orjson.dumps(chat_line(4)))
    got = _duplicates(b"\n".join(rows) + b"\n")
    assert 'custom_id "req-2" was already used by line 3;' in got[6]
    assert "already used by line 3;" in got[7]
    assert "already used by line 5;" in got[9]


def test_first_use_lookups_are_bounded() -> None:
    import orjson

    from tmbatch.inputs.reader import FIRST_USE_LOOKUPS

    n = FIRST_USE_LOOKUPS + 5
    rows = [orjson.dumps(chat_line(i)) for i in range(n)] * 2  # the file twice over
    got = _duplicates(b"\n".join(rows) + b"\n")
    assert len(got) == n
    named = [m for m in got.values() if "by line" in m]
    assert len(named) == FIRST_USE_LOOKUPS  # then "an earlier line": no rescans without end
    assert all("by an earlier line" in m for m in got.values() if m not in named)
