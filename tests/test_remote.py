"""Outputs in a bucket: the journal shipped as segments by group commit, a fresh pod that
resumes from the bucket, the lease, and the tools on an output URL.

A real S3 API (moto in server mode, a subprocess on 127.0.0.1, `tests.buckets`), the
simulator on a real socket (whose accounting says what the server processed, per
Idempotency-Key), real processes killed with real SIGKILL. Each run gets a fresh local
working directory, as a replacement pod with an empty disk would.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.buckets import bucket, moto_s3
from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    clean_env,
    kill_at_random,
    run_cli,
    wait_for_calls,
    write_jsonl,
)
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
        wait_for_calls(sim, 1, first)
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
    return kill_at_random(
        lambda i: subprocess.Popen(cmd(sim, inp, url, tmp_path / f"w{i}", "--concurrency", "8"),
                                   env=env(s3env), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL),
        planned, 20261206, (0.8, 2.0))


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


def test_resend_export_and_merge_on_output_urls(sim: Any, tmp_path: Path,
                                                s3: dict[str, str]) -> None:
    """resend on a URL sends exactly the chosen lines once and republishes; export puts its
    ordered files in the bucket; merge joins shards at URLs into a URL."""
    fs = bucket(s3)
    rows = [chat_line(i) for i in range(10)]
    for i in (2, 5):
        rows[i]["body"]["sim"] = {"status": 500, "times": 1}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    url = "s3://bkt/tools"
    assert run_cli(cmd(sim, inp, url, tmp_path / "w1")[3:], env=env(s3)).returncode == 1
    ids = [f"req-{i}" for i in range(10)]
    res, fail = one_outcome_each(fs, "bkt/tools", ids)
    assert set(fail) == {"req-2", "req-5"}
    before = sim.stats()["processed"]
    p = run_cli(["resend", url, "--base-url", sim.url, "-q", "--class", "ambiguous", "--yes"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY,
                              TMBATCH_WORK_DIR=str(tmp_path / "w2"), **s3))
    assert p.returncode == 0, p.stderr
    after = sim.stats()["processed"]
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {idempotency_key(JOB, "req-2"), idempotency_key(JOB, "req-5")}
    res, fail = one_outcome_each(fs, "bkt/tools", ids)
    assert not fail and len(res) == 10
    ex = run_cli(["export", url], env=env(s3))
    assert ex.returncode == 0, ex.stderr
    ordered = bucket_jsonl(fs, "bkt/tools/results.ordered.jsonl")
    assert [r["custom_id"] for r in ordered] == ids
    shards = []
    for k in (0, 1):
        shard_url = f"s3://bkt/sharded/shard-{k}"
        r = run_cli(cmd(sim, inp, shard_url, tmp_path / f"s{k}", "--shard", f"{k}/2")[3:],
                    env=env(s3))
        assert r.returncode in (0, 1), r.stderr
        shards.append(shard_url)
    m = run_cli(["merge", *shards, "-o", "s3://bkt/sharded/all"], env=env(s3))
    assert m.returncode == 0, m.stderr  # every line one outcome (the 500s were spent above)
    merged, _ = one_outcome_each(fs, "bkt/sharded/all", ids)
    assert len(merged) == 10
    st = orjson.loads(run_cli(["status", "s3://bkt/sharded/all", "--json"], env=env(s3)).stdout)
    assert st["succeeded"] == 10


def test_a_file_url_output_and_restart(sim: Any, tmp_path: Path) -> None:
    """file:// is a bucket too (a mounted volume); --restart moves the objects aside."""
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    url = (tmp_path / "bucket" / "out").as_uri()
    e = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    assert run_cli(cmd(sim, inp, url, tmp_path / "w1")[3:], env=e).returncode == 0
    published = tmp_path / "bucket" / "out"
    assert len((published / "results.jsonl").read_bytes().splitlines()) == 5
    segs = list((published / "segments").iterdir())  # compacted into one base segment
    assert len(segs) == 1 and segs[0].suffix == ".base"
    assert b'"base":true' in segs[0].read_bytes().split(b"\n", 1)[0]
    again = run_cli(cmd(sim, inp, url, tmp_path / "w2", "--restart")[3:], env=e)
    assert again.returncode == 0, again.stderr
    aside = [p for p in published.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "results.jsonl").exists()
    assert sim.stats()["completion_calls"] == 10  # started over: sent again, on purpose


def test_restore_stops_at_the_first_gap(tmp_path: Path) -> None:
    """Segments past a gap (their upload raced a crash) are not read, and are deleted."""
    from tmbatch.journal.remote import encode, restore, seg_name
    from tmbatch.journal.store import Store

    store = Store((tmp_path / "b").as_uri())
    for seq, data in ((0, b"a\n"), (1, b"b\n"), (3, b"d\n")):
        store.put(seg_name(seq), encode(seq, [data, b"", b""]))
    work = tmp_path / "w"
    work.mkdir()
    nxt, sizes = restore(store, work)
    assert sizes == [4, 0, 0]
    assert (work / "journal.jsonl").read_bytes() == b"a\nb\n"
    # 3 is gone; 0 and 1 are folded into one base segment, the next start reads one object
    assert nxt == 3
    assert sorted(p.name for p in (tmp_path / "b" / "segments").iterdir()) == [
        "000000000002.base"]
    again = tmp_path / "w2"
    again.mkdir()
    assert restore(store, again) == (3, [4, 0, 0])
    assert (again / "journal.jsonl").read_bytes() == b"a\nb\n"


def test_an_unreachable_store_is_one_clear_error(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    from tests.buckets import free_port

    e = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY,
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="x",
                  AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1",
                  AWS_MAX_ATTEMPTS="1")
    r = run_cli(cmd(sim, inp, "s3://bkt/none", tmp_path / "w")[3:], env=e)
    assert r.returncode == 4, r.stderr
    assert "s3://bkt/none" in r.stderr and "Traceback" not in r.stderr
    assert sim.stats()["completion_calls"] == 0


def test_no_request_arrives_before_its_dispatch_record_is_in_the_bucket(
        serve: Any, tmp_path: Path, s3: dict[str, str]) -> None:
    """The contract, seen from the server: when a request arrives, the bucket already holds
    a segment with its dispatch record (read from moto by the server as it answers)."""
    from aiohttp import web

    from tmbatch.journal.remote import decode

    fs = bucket(s3)
    n = 40
    ids = [f"req-{i}" for i in range(n)]
    by_key = {idempotency_key(JOB, cid): cid for cid in ids}
    seen: list[str] = []
    missing: list[str] = []
    bad: list[str] = []

    listing = threading.Lock()  # one s3fs listing cache, read by several handlers' threads

    def dispatched() -> set[str]:
        with listing:
            return _dispatched()

    def _dispatched() -> set[str]:
        fs.invalidate_cache()
        out: set[str] = set()
        if not fs.exists("bkt/contract/segments"):
            return out
        for path in fs.find("bkt/contract/segments"):
            got = decode(fs.cat(path))
            if got is None:
                bad.append(path)
                continue
            for raw in got[1][0].splitlines():
                rec = orjson.loads(raw)
                if isinstance(rec, list) and rec[0] == "d":
                    out.add(rec[3])
        return out

    async def chat(request: web.Request) -> web.Response:
        cid = by_key[request.headers["Idempotency-Key"]]
        seen.append(cid)
        import asyncio

        if cid not in await asyncio.to_thread(dispatched):
            missing.append(cid)
        return web.json_response({
            "id": f"c-{cid}", "object": "chat.completion", "created": 0, "model": "tm-small",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = serve(app)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(n)])
    r = run_cli(["run", str(inp), "-o", "s3://bkt/contract", "-q", "--work-dir",
                 str(tmp_path / "w"), "--base-url", server.url(), "--job-id", JOB,
                 "--no-preflight", "--concurrency", "8"], env=env(s3))
    assert r.returncode == 0, r.stderr
    assert sorted(seen) == sorted(ids)
    assert missing == [] and bad == []


def test_a_base_then_segments_and_a_damaged_base(tmp_path: Path) -> None:
    """A start reads the last base (streamed) and the segments after it; an older base left
    by a crash is ignored and deleted; a damaged base is an error, never read as less."""
    from tmbatch.journal.remote import encode, restore, seg_name
    from tmbatch.journal.store import Store, StoreError

    store = Store((tmp_path / "b").as_uri())
    store.put(seg_name(0, True), encode(0, [b"old\n", b"", b""], base=True))
    store.put(seg_name(4, True), encode(4, [b"h\n", b"r1\n", b"f1\n"], base=True))
    store.put(seg_name(5), encode(5, [b"d\n", b"r2\n", b""]))
    work = tmp_path / "w"
    work.mkdir()
    assert restore(store, work, tidy=False) == (6, [4, 6, 3])
    assert (work / "results.jsonl").read_bytes() == b"r1\nr2\n"
    assert (work / "journal.jsonl").read_bytes() == b"h\nd\n"
    assert len(list((tmp_path / "b" / "segments").iterdir())) == 3  # read-only: kept
    assert restore(store, work) == (7, [4, 6, 3])
    assert [p.name for p in (tmp_path / "b" / "segments").iterdir()] == ["000000000006.base"]
    (tmp_path / "b" / "segments" / "000000000006.base").write_bytes(
        b'{"seq":6,"base":true,"sizes":[4,6,30]}\nh\nd\nr1\nr2\nf1\n')
    with pytest.raises(StoreError, match="damaged"):
        restore(store, work)
