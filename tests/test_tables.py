"""Parquet and CSV inputs: rows as labelling records or as request bodies, row numbers in
every message, a malformed table refused before anything is sent. Real files, real
subprocesses, the simulator on a real socket."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, clean_env, read_jsonl, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

LABEL_JOB = """input = "{input}"
model = "tm-small"
[label]
id_field = "id"
template = "Review: {{text}}\\nAllowed labels: positive, negative, neutral"
labels = ["positive", "negative", "neutral"]
"""


def reviews() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (ROOT / "samples/reviews.jsonl").read_bytes()
            .splitlines() if line.strip()]


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def chat(text: str) -> dict[str, Any]:
    return {"model": "tm-small", "messages": [{"role": "user", "content": text}],
            "max_tokens": 5}


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_table_labels_like_its_jsonl(tmp_path: Path, kind: str) -> None:
    """The same records as Parquet, CSV and JSONL give the same requests and labels."""
    rows = reviews()
    table = tmp_path / f"reviews.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        write_csv(table, rows, ["id", "text"])
    outs = {}
    for name, source in (("table", table), ("jsonl", ROOT / "samples/reviews.jsonl")):
        job = tmp_path / f"{name}.toml"
        job.write_text(LABEL_JOB.format(input=source))
        out = tmp_path / f"{name}.out"
        r = run_cli(["run", str(job), "--sim", "-o", str(out), "-q"])
        assert r.returncode in (0, 1), r.stderr
        outs[name] = out
    assert (outs["table"] / "requests.jsonl").read_bytes() == (
        outs["jsonl"] / "requests.jsonl").read_bytes()
    labels = read_jsonl(outs["table"] / "labels.jsonl")
    assert [(x["id"], x["line"]) for x in labels] == [(r["id"], i) for i, r in
                                                      enumerate(rows, 1)]
    assert labels == read_jsonl(outs["jsonl"] / "labels.jsonl")


def test_an_unrenderable_record_names_its_row(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": None}, {"id": "c", "text": "ok"}]
    table = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    job = tmp_path / "j.toml"
    job.write_text(LABEL_JOB.format(input=table))
    out = tmp_path / "out"
    r = run_cli(["run", str(job), "--sim", "-o", str(out), "-q"])
    assert r.returncode == 1, r.stderr
    assert "record row 2: field `text`" in r.stderr
    bad = [x for x in read_jsonl(out / "labels.jsonl") if x["status"] == "failed"]
    assert [(x["id"], x["line"]) for x in bad] == [("b", 2)]
    assert bad[0]["error"]["message"].startswith("record row 2: field `text`")


def test_body_column_sends_each_row_and_fails_a_bad_cell_by_row(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "body": orjson.dumps(chat(f"hi {i}")).decode()} for i in range(1, 6)]
    rows[2]["body"] = "{not json"
    table = tmp_path / "b.csv"
    write_csv(table, rows, ["id", "body"])
    out = tmp_path / "out"
    args = ["run", str(table), "--body-column", "body", "--id-column", "id",
            "--endpoint", "chat", "--sim", "-o", str(out), "-q"]
    r = run_cli(args)
    assert r.returncode == 1, r.stderr
    assert "row 3: column `body` is not valid JSON" in r.stderr
    results = read_jsonl(out / "results.jsonl")
    assert sorted((x["custom_id"], x["line"]) for x in results) == [
        ("q1", 1), ("q2", 2), ("q4", 4), ("q5", 5)]
    sent = {x["custom_id"]: x["response"]["body"]["model"] for x in results}
    assert set(sent.values()) == {"tm-small"}
    [failure] = read_jsonl(out / "failures.jsonl")
    assert (failure["custom_id"], failure["line"]) == ("q3", 3)
    assert failure["error"]["message"] == "row 3: body is a string; expected a JSON object"
    again = run_cli(args)  # resume: the same table is recognised, nothing sent twice
    assert again.returncode == 1, again.stderr
    assert len(read_jsonl(out / "results.jsonl")) == 4


def test_parquet_structs_are_bodies_and_ids_default_to_row_n(tmp_path: Path) -> None:
    table = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"req": chat(f"x{i}")} for i in range(3)]), table)
    out = tmp_path / "out"
    r = run_cli(["run", str(table), "--body-column", "req", "--endpoint", "chat", "--sim",
                 "-o", str(out), "-q"])
    assert r.returncode == 0, r.stderr
    assert sorted(x["custom_id"] for x in read_jsonl(out / "results.jsonl")) == [
        "row-1", "row-2", "row-3"]


def test_a_changed_table_is_not_mixed_into_a_run(tmp_path: Path) -> None:
    table = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"req": chat("a")}]), table)
    out = tmp_path / "out"
    args = ["run", str(table), "--body-column", "req", "--endpoint", "chat", "--sim",
            "-o", str(out), "-q"]
    assert run_cli(args).returncode == 0
    pq.write_table(pa.Table.from_pylist([{"req": chat("b")}]), table)
    r = run_cli(args)
    assert r.returncode == 2 and "was started from another table" in r.stderr


@pytest.mark.parametrize(("content", "args", "needle"), [
    (b"id,body\nq1,{}\nq2,{},extra\n", ["--body-column", "body", "--endpoint", "chat"],
     "b.csv: row 2: 3 value(s), the header names 2 column(s)"),
    (b"id,body\nq1,\xff\xfe\n", ["--body-column", "body", "--endpoint", "chat"],
     "b.csv: row 1: not valid UTF-8 text"),
    (b"id,,body\n", ["--body-column", "body", "--endpoint", "chat"],
     "header column 2 has no name"),
    (b"id,body\nq1,{}\n", ["--body-column", "nope", "--endpoint", "chat"],
     "no column `nope` (--body-column); its columns: id, body"),
    (b"id,body\nq1,{}\n", ["--endpoint", "chat"], "give --body-column COLUMN"),
    (b"id,body\nq1,{}\n", ["--body-column", "body"], "--body-column needs --endpoint"),
])
def test_a_malformed_table_is_refused_before_anything_is_sent(
        tmp_path: Path, sim: Any, content: bytes, args: list[str], needle: str) -> None:
    table = tmp_path / "b.csv"
    table.write_bytes(content)
    env = clean_env(TENSORMESH_INFERENCE_API_KEY="sk-test")
    r = run_cli(["run", str(table), *args, "--base-url", sim.url, "-o",
                 str(tmp_path / "out")], env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert sim.stats()["received"] == 0


def test_a_binary_cell_is_named_by_row_and_column(tmp_path: Path) -> None:
    table = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": b"ok"},
                                         {"id": "b", "text": b"\xff\x00"}]), table)
    job = tmp_path / "j.toml"
    job.write_text(LABEL_JOB.format(input=table))
    r = run_cli(["run", str(job), "--sim", "-o", str(tmp_path / "out")])
    assert r.returncode == 2, r.stderr
    assert "r.parquet: row 2, column `text`" in r.stderr


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so a child of the
# test process would report the test's own peak (it holds the table it wrote).
MEMORY_PROBE = """
import sys
from tmbatch.inputs.bodies import BodyTable, stage_bodies
from pathlib import Path
stage_bodies(BodyTable(sys.argv[1], "body", "id", "/v1/chat/completions"), Path(sys.argv[2]),
             False)
hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) // 1024)
"""


@pytest.mark.parametrize("rows", [20_000, 400_000])
def test_staging_a_table_keeps_memory_flat(tmp_path: Path, rows: int) -> None:
    """Peak RSS of staging a table stays within 150 MB (the issue's bound), whatever its
    size (measured ~100 MB, most of it pyarrow's import, for 20k rows and for 1M)."""
    ids = pa.array([f"id-{i}" for i in range(rows)])
    body = pa.array([orjson.dumps(chat(f"text {i} " * 8)).decode() for i in range(rows)])
    table = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": ids, "body": body}), table, row_group_size=10_000)
    del ids, body
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(table), str(tmp_path / "o")],
                       capture_output=True, text=True, env=clean_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    staged = (tmp_path / "o" / "requests.jsonl").read_bytes().count(b"\n")
    assert staged == rows
    peak = int(r.stdout.split()[-1])
    assert peak < 150, f"peak RSS {peak} MB staging {rows} rows"


def test_without_pyarrow_the_message_names_the_extra(tmp_path: Path) -> None:
    """pyarrow made unimportable in the child, as on an install without [parquet]."""
    table = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"req": chat("a")}]), table)
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None; "
            "from tmbatch.cli.main import main; sys.argv[0] = 'tmbatch'; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, "run", str(table), "--body-column", "req",
                        "--endpoint", "chat", "--sim", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=clean_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "pip install 'tmbatch[parquet]'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["validate", "estimate"])
def test_validate_and_estimate_of_a_bare_table_say_how(tmp_path: Path, command: str) -> None:
    table = tmp_path / "b.csv"
    table.write_text("id,body\nq1,{}\n")
    r = run_cli([command, str(table)])
    assert r.returncode == 2, r.stderr
    assert f"{command} reads a table through a labelling job file" in r.stderr
