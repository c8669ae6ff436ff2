"""Every message reads as English written for a person: no Python type names, no `None`,
no reprs of lists. The hostile-input corpus checks the reader's own messages."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import chat_line, run_cli, write_jsonl
from tmbatch.words import json_type, setting


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
