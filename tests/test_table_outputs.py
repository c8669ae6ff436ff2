"""Parquet and CSV outputs: `run --output-format` and `export --format` write one flat row per
outcome in input order, and read back with pyarrow and the csv module they hold the values
of results.jsonl and failures.jsonl."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import read_jsonl, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def make_run(tmp_path: Path, fmt: str) -> Path:
    """A run with successes, a bad row (failure) and unicode, commas and newlines in text."""
    bodies = [{"model": "tm-small", "messages": [{"role": "user", "content": f"é, \"q\"\n{i}"}],
               "max_tokens": 6} for i in range(7)]
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": b} for i, b in enumerate(bodies)]
    lines[3]["body"] = "not an object"
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    out = tmp_path / "out"
    r = run_cli(["run", str(src), "--sim", "-o", str(out), "-q", "--output-format", fmt])
    assert r.returncode == 1, r.stderr
    return out


def expected(out: Path) -> list[dict[str, Any]]:
    """What the JSONL outputs say, by line: the values the table's columns must hold."""
    rows = []
    for rec in read_jsonl(out / "results.jsonl") + read_jsonl(out / "failures.jsonl"):
        body = (rec.get("response") or {}).get("body") or {}
        error = rec.get("error") or {}
        choice = (body.get("choices") or [{}])[0]
        rows.append({
            "line": rec["line"], "custom_id": rec["custom_id"],
            "status": "failed" if error else "succeeded", "class": error.get("class"),
            "model": body.get("model"), "text": (choice.get("message") or {}).get("content"),
            "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": (body.get("usage") or {}).get("prompt_tokens"),
            "completion_tokens": (body.get("usage") or {}).get("completion_tokens"),
            "request_id": (rec.get("response") or {}).get("request_id"),
            "error_code": error.get("code"), "error_message": error.get("message")})
    return sorted(rows, key=lambda x: x["line"])


def test_run_output_format_parquet_round_trips(tmp_path: Path) -> None:
    out = make_run(tmp_path, "parquet")
    table = pq.read_table(out / "outcomes.parquet")
    assert table.schema.field("line").type == pa.int64()
    assert table.schema.field("prompt_tokens").type == pa.int64()
    got = [{k: row[k] for k in expected(out)[0]} for row in table.to_pylist()]
    assert got == expected(out)
    assert [r["line"] for r in got] == list(range(1, 8))
    assert got[3]["status"] == "failed" and got[3]["class"] == "permanent"


def test_run_output_format_csv_round_trips(tmp_path: Path) -> None:
    out = make_run(tmp_path, "csv")
    with open(out / "outcomes.csv", newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    want = expected(out)
    assert len(got) == len(want) == 7
    for row, exp in zip(got, want, strict=True):  # CSV has text only: None is ""
        assert {k: row[k] for k in exp} == {k: "" if v is None else str(v)
                                            for k, v in exp.items()}


def test_export_format_writes_the_same_table_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    out = make_run(tmp_path, "csv")
    first = (out / "outcomes.csv").read_bytes()
    r = run_cli(["export", str(out), "--format", "csv", "--to", str(tmp_path / "x")])
    assert r.returncode == 0, r.stderr
    assert "7 row(s)" in r.stderr
    assert (tmp_path / "x" / "outcomes.csv").read_bytes() == first
    r = run_cli(["export", str(out), "--format", "parquet"])
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out / "outcomes.parquet").num_rows == 7
    bad = run_cli(["export", str(out), "--format", "xlsx"])
    assert bad.returncode == 2 and "invalid choice: 'xlsx'" in bad.stderr
    assert "usage: tmbatch export" in bad.stderr
