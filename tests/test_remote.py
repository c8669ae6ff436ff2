"""Outputs in a bucket: the journal shipped as segments by group commit, a fresh pod that
resumes from the bucket, the lease, and the tools on an output URL.

A real S3 API (moto in server mode, a subprocess on 127.0.0.1, `tests.buckets`), the
simulator on a real socket (whose accounting says what the server processed, per
Idempotency-Key), real processes killed with real SIGKILL. Each run gets a fresh local
working directory, as a replacement pod with an empty disk would.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.buckets import bucket, moto_s3
from tests.conftest import API_KEY, ROOT, chat_line, clean_env, run_cli, write_jsonl
from tmbatch.client.http import idempotency_key

pytest.importorskip("s3fs")
s3 = moto_s3  # the fixture, under the name the tests take
JOB = "remotejob01"


def env(s3env: dict[str, str]) -> dict[str, str]:
    return clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY, **s3env)


def cmd(sim: Any, inp: Path, url: str, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", url, "-q",
            "--work-dir", str(work), "--base-url", sim.url, "--job-id", JOB, *extra]


def bucket_jsonl(fs: Any, key: str) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in fs.cat(key).splitlines()]


def one_outcome_each(fs: Any, prefix: str, ids: list[str]) -> tuple[dict[str, Any],
                                                                    dict[str, Any]]:
    """The bucket's published results.jsonl and failures.jsonl: one outcome per line."""
    res = bucket_jsonl(fs, f"{prefix}/results.jsonl")
    fail = bucket_jsonl(fs, f"{prefix}/failures.jsonl")
    count = Counter([r["custom_id"] for r in res] + [f["custom_id"] for f in fail])
    assert set(count) == set(ids)
    assert [c for c, n in count.items() if n != 1] == []
    return {r["custom_id"]: r for r in res}, {f["custom_id"]: f for f in fail}


def test_a_run_to_s3_publishes_and_a_fresh_pod_resumes(sim: Any, tmp_path: Path,
                                                       s3: dict[str, str]) -> None:
    fs = bucket(s3)
    n = 60
    ids = [f"req-{i}" for i in range(n)]
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(n)])
    url = "s3://bkt/run1/"
    r = run_cli(cmd(sim, inp, url, tmp_path / "w1")[3:], env=env(s3))
    assert r.returncode == 0, r.stderr
    res, fail = one_outcome_each(fs, "bkt/run1", ids)
    assert len(res) == n and not fail
    assert orjson.loads(fs.cat("bkt/run1/summary.json"))["counts"]["succeeded"] == n
    assert not fs.exists("bkt/run1/lock.json")  # the lease is let go at the end
    segs = fs.ls("bkt/run1/segments", detail=False)
    assert len(segs) == 1  # compacted into one base segment
    sent = sim.stats()["completion_calls"]
    assert sent == n
    # a fresh pod (an empty working directory): the bucket says it is done, nothing is sent
    again = run_cli(cmd(sim, inp, url, tmp_path / "w2")[3:], env=env(s3))
    assert again.returncode == 0, again.stderr
    assert sim.stats()["completion_calls"] == sent
    assert len(bucket_jsonl(fs, "bkt/run1/results.jsonl")) == n
    # status on the URL reads the bucket
    st = run_cli(["status", url, "--json"], env=env(s3))
    assert st.returncode == 0, st.stderr
    got = orjson.loads(st.stdout)
    assert got["finished"] and got["succeeded"] == n


def test_a_second_run_on_a_live_output_url_is_refused(sim_factory: Any, tmp_path: Path,
                                                      s3: dict[str, str]) -> None:
    """The lease: a run on a URL another live run holds stops before it reads or sends."""
    fs = bucket(s3)
    sim = sim_factory(latency=0.5)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(40)])
    url = "s3://bkt/live/"
    first = subprocess.Popen(cmd(sim, inp, url, tmp_path / "w1", "--concurrency", "2"),
                             env=env(s3), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while sim.stats()["completion_calls"] < 1:
            assert time.monotonic() < deadline and first.poll() is None, "never sent"
            time.sleep(0.05)
        before = sim.stats()["completion_calls"]
        second = run_cli(cmd(sim, inp, url, tmp_path / "w2")[3:], env=env(s3))
        assert second.returncode == 2, second.stderr
        assert "another tmbatch process is using s3://bkt/live" in second.stderr
        assert "Traceback" not in second.stderr
        assert sim.stats()["completion_calls"] <= before + 2  # only the first run's own
        assert fs.exists("bkt/live/lock.json")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)


def kill_runs(sim: Any, inp: Path, url: str, tmp_path: Path, s3env: dict[str, str],
              planned: int) -> int:
    """Start runs and kill -9 each at a random moment, each with a fresh working directory."""
    rng = random.Random(20261206)
    kills = 0
    for i in range(3 * planned):
        proc = subprocess.Popen(cmd(sim, inp, url, tmp_path / f"w{i}", "--concurrency", "8"),
                                env=env(s3env), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.8, 2.0))  # a random moment to kill at, not a wait
        if proc.poll() is not None:
            break  # it finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        if kills >= planned:
            break
    return kills


@pytest.mark.parametrize("planned", [3, pytest.param(20, marks=pytest.mark.slow)],
                         ids=["3-kills", "20-kills-soak"])
def test_kill_9_with_an_empty_disk_each_time(sim_factory: Any, tmp_path: Path,
                                             s3: dict[str, str], planned: int) -> None:
    """Killed at random moments, each run on an empty working directory: the bucket alone
    carries the job. Every line has exactly one outcome in the published files, nothing was
    processed twice, and the only failures are the unknown outcomes a crash may leave.
    Three kills by default; the 20-kill soak runs with TMBATCH_SLOW=1."""
    fs = bucket(s3)
    sim = sim_factory(latency=0.05, latency_jitter=0.04)
    n = 150 * planned
    ids = [f"req-{i}" for i in range(n)]
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(n)])
    url = f"s3://bkt/kill{planned}/"
    kills = kill_runs(sim, inp, url, tmp_path, s3, planned)
    assert kills >= planned - planned // 6
    final = run_cli(cmd(sim, inp, url, tmp_path / "final", "--concurrency", "32")[3:],
                    env=env(s3), timeout=300)
    assert final.returncode in (0, 1), final.stderr
    res, fail = one_outcome_each(fs, f"bkt/kill{planned}", ids)
    stats = sim.stats()
    assert stats["duplicates"] == 0, stats["duplicate_keys"][:5]
    for f in fail.values():
        assert f["error"]["code"] == "unknown_outcome_after_crash"
        assert f["error"]["class"] == "ambiguous"
    for cid in res:
        assert stats["processed"][idempotency_key(JOB, cid)] == 1
    assert len(res) > n // 2  # the crashes cost a few lines' outcomes, not the job
    st = orjson.loads(run_cli(["status", url, "--json"], env=env(s3)).stdout)
    assert st["finished"] and st["succeeded"] == len(res) and st["not_yet_sent"] == 0
