"""Inputs at URLs through fsspec: a real S3 API (moto in server mode, a subprocess on
127.0.0.1 reached through AWS_ENDPOINT_URL, the way a user points at MinIO or R2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.buckets import bucket, moto_s3
from tests.conftest import ROOT, clean_env, read_jsonl, run_cli

s3fs = pytest.importorskip("s3fs")
s3 = moto_s3  # the fixture, under the name the tests take


def test_a_jsonl_in_a_bucket_runs_and_resumes(tmp_path: Path, s3: dict[str, str]) -> None:
    fs = bucket(s3)
    fs.put(str(ROOT / "samples/chat.jsonl"), "bkt/in.jsonl")
    out = tmp_path / "out"
    env = clean_env(**s3)
    r = run_cli(["run", "s3://bkt/in.jsonl", "--sim", "-o", str(out), "-q"], env=env)
    assert r.returncode == 0, r.stderr
    local = run_cli(["run", str(ROOT / "samples/chat.jsonl"), "--sim", "-o",
                     str(tmp_path / "local"), "-q"])
    assert local.returncode == 0, local.stderr
    got = sorted((x["custom_id"], x["line"]) for x in read_jsonl(out / "results.jsonl"))
    assert got == sorted((x["custom_id"], x["line"])
                         for x in read_jsonl(tmp_path / "local" / "results.jsonl"))
    again = run_cli(["run", "s3://bkt/in.jsonl", "--sim", "-o", str(out), "-q"], env=env)
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(out / "results.jsonl")) == len(got)  # nothing sent twice
    fs.pipe("bkt/in.jsonl", b'{"custom_id":"x","url":"/v1/chat/completions","body":{}}\n')
    changed = run_cli(["run", "s3://bkt/in.jsonl", "--sim", "-o", str(out), "-q"], env=env)
    assert changed.returncode == 2, changed.stderr  # another input: refused, not mixed in


def test_a_parquet_in_a_bucket_is_a_table(tmp_path: Path, s3: dict[str, str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    fs = bucket(s3)
    body = {"model": "tm-small", "messages": [{"role": "user", "content": "hi"}]}
    with fs.open("bkt/t.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist([{"req": body}] * 3), f)
    out = tmp_path / "out"
    r = run_cli(["run", "s3://bkt/t.parquet", "--body-column", "req", "--endpoint", "chat",
                 "--sim", "-o", str(out), "-q"], env=clean_env(**s3))
    assert r.returncode == 0, r.stderr
    assert sorted(x["custom_id"] for x in read_jsonl(out / "results.jsonl")) == [
        "row-1", "row-2", "row-3"]


def test_a_missing_object_is_one_clear_error(tmp_path: Path, s3: dict[str, str]) -> None:
    bucket(s3)
    r = run_cli(["run", "s3://bkt/nope.jsonl", "--sim", "-o", str(tmp_path / "o")],
                env=clean_env(**s3))
    assert r.returncode == 2
    assert "s3://bkt/nope.jsonl: no such object" in r.stderr and "Traceback" not in r.stderr


def test_without_the_filesystem_the_message_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['fsspec'] = None; from tmbatch.cli.main import main; "
            "sys.argv[0] = 'tmbatch'; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, "run", "gs://bkt/in.jsonl", "--sim", "-o",
                        str(tmp_path / "o")], capture_output=True, text=True,
                       env=clean_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "pip install 'tmbatch[gcs]'" in r.stderr and "Traceback" not in r.stderr


def test_shards_of_a_bucket_input_merge(tmp_path: Path, s3: dict[str, str]) -> None:
    """merge reads the input the shards ran from its URL, to check every line's outcome."""
    fs = bucket(s3)
    fs.put(str(ROOT / "samples/chat.jsonl"), "bkt/shards.jsonl")
    env = clean_env(**s3)
    for i in range(2):
        r = run_cli(["run", "s3://bkt/shards.jsonl", "--shard", f"{i}/2", "--sim", "-o",
                     str(tmp_path / f"s{i}"), "-q"], env=env)
        assert r.returncode == 0, r.stderr
    m = run_cli(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o",
                 str(tmp_path / "all")], env=env)
    assert m.returncode == 0, m.stderr
    lines = (ROOT / "samples/chat.jsonl").read_bytes().splitlines()
    assert len(read_jsonl(tmp_path / "all" / "results.jsonl")) == sum(
        1 for x in lines if x.strip())
