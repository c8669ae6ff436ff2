"""The response cache across runs (--cache): real SQLite files, real `tmbatch` processes, the
simulator on a real socket, and its counters as the proof of what was (not) sent.

The key and the rule for what may be stored are checked as functions; everything else is
checked end to end: a rerun sends only what was not stored, hits spend nothing, two processes
share one file, kill -9 never leaves an entry without its result line, and a bad cache file
stops the run with exit 2 before a byte is sent.
"""

from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    keyed_env,
    read_jsonl,
    run_cli,
    write_jsonl,
)
from tmbatch.journal.cache import CacheError, ResponseCache, cache_key, storable
from tmbatch.journal.format import OutcomeRecord, decode
from tmbatch.policy import Outcome
from tmbatch.tools.report import cache_cards
from tmbatch.tools.report_data import load_run

CHAT = "/v1/chat/completions"


def run_args(sim: Any, inp: Path, out: Path, cache: Path | None, *extra: str) -> list[str]:
    args = ["run", str(inp), "-o", str(out), "--base-url", sim.url]
    if cache is not None:
        args += ["--cache", str(cache)]
    return [*args, *extra]


def lines(n: int, truncated_every: int = 10) -> list[dict[str, Any]]:
    """n chat lines; every `truncated_every`-th asks for 2 tokens, which the simulator cuts
    (finish_reason "length"); 0: none does."""
    return [chat_line(i, max_tokens=2 if truncated_every and i % truncated_every == 0 else 64)
            for i in range(n)]


def by_id(out: Path) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in read_jsonl(out / "results.jsonl")}


def summary(out: Path) -> dict[str, Any]:
    return orjson.loads((out / "summary.json").read_bytes())


def entries(cache: Path) -> list[bytes]:
    """The stored bodies, read straight from the SQLite file."""
    conn = sqlite3.connect(cache)
    try:
        return [bytes(r[0]) for r in conn.execute("SELECT body FROM entries")]
    finally:
        conn.close()


# -- the key and what may be stored ------------------------------------------------------------
def test_the_key_is_server_route_body_without_stream_and_sample() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    k = cache_key("http://h:1", CHAT, body)
    assert len(k) == 32
    # key order, stream and stream_options, a trailing slash: the same answer
    same = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}], "model": "m"}
    assert cache_key("http://h:1/", CHAT, same) == k
    assert cache_key("http://h:1", CHAT, body, 0) == k  # sample 0 is the default
    # anything that can change the answer: another key
    assert cache_key("http://h:2", CHAT, body) != k
    assert cache_key("http://h:1", "/v1/completions", body) != k
    assert cache_key("http://h:1", CHAT, body, sample=1) != k
    assert cache_key("http://h:1", CHAT, {**body, "model": "n"}) != k
    assert cache_key("http://h:1", CHAT, {**body, "temperature": 0}) != k
    assert cache_key("http://h:1", CHAT, {**body, "max_tokens": 9}) != k


@pytest.mark.parametrize(("route", "body", "ok"), [
    (CHAT, {"choices": [{"finish_reason": "stop"}]}, True),
    (CHAT, {"choices": [{"finish_reason": "tool_calls"}]}, True),
    (CHAT, {"choices": [{"finish_reason": "length"}]}, False),
    (CHAT, {"choices": [{"finish_reason": "content_filter"}]}, False),
    (CHAT, {"choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]}, False),
    (CHAT, {"choices": [{"finish_reason": None}]}, False),
    (CHAT, {"choices": []}, False),
    ("/v1/completions", {"choices": [{"finish_reason": "stop"}]}, True),
    ("/v1/responses", {"status": "completed", "incomplete_details": None}, True),
    ("/v1/responses", {"status": "incomplete",
                       "incomplete_details": {"reason": "max_output_tokens"}}, False),
    ("/v1/responses", {"status": "failed"}, False),
    ("/tokenize", {"tokens": [1, 2]}, False),
], ids=lambda v: str(v)[:40])
def test_only_complete_answers_are_storable(route: str, body: Any, ok: bool) -> None:
    assert storable(route, body) is ok


def test_a_cached_outcome_is_an_ok_the_journal_reads_back() -> None:
    rec = OutcomeRecord(7, Outcome.OK, "cached", 1.5)
    back = decode(rec.to_json())
    assert back == rec and back.cached
    assert decode(b'["o",7,"ok","",1.5]\n').cached is False  # an answer that was sent


# -- a rerun ---------------------------------------------------------------------------------
def test_a_rerun_sends_only_what_was_truncated_and_writes_the_same_results(
        sim_factory: Any, tmp_path: Path) -> None:
    """1,000 lines, 100 of them truncated: the rerun with the cache sends exactly those 100
    (the simulator's counters), writes 1,000 results whose cached bodies and request ids are
    the first run's, spends and counts no tokens for the hits (a token budget smaller than
    the first run's spend is enough), and says what it saved."""
    sim = sim_factory(api_key=API_KEY)
    n = 1000
    inp = write_jsonl(tmp_path / "in.jsonl", lines(n))
    cache = tmp_path / "cache.sqlite"
    first = run_cli(run_args(sim, inp, tmp_path / "one", cache,
                             "--price", "tm-small=1.0:2.0"), env=keyed_env())
    assert first.returncode == 0, first.stderr
    one = by_id(tmp_path / "one")
    used = summary(tmp_path / "one")["this_run"]["tokens"]["total"]
    assert len(entries(cache)) == 900  # the 100 cut answers were not stored

    sim.reset()
    second = run_cli(run_args(sim, inp, tmp_path / "two", cache, "--price", "tm-small=1.0:2.0",
                              "--budget-tokens", str(used // 5)), env=keyed_env())
    assert second.returncode == 0, second.stderr
    stats = sim.stats()
    assert stats["completion_calls"] == 100
    two = by_id(tmp_path / "two")
    assert set(two) == set(one)
    for i in range(n):
        cid = f"req-{i}"
        if i % 10 == 0:  # sent again: a fresh answer, not marked
            assert "cached" not in two[cid]
            assert two[cid]["response"]["request_id"] != one[cid]["response"]["request_id"]
        else:
            assert two[cid]["cached"] is True
            assert two[cid]["response"] == one[cid]["response"]  # body and request id
    s = summary(tmp_path / "two")
    assert s["this_run"]["attempts_sent"] == 100
    saved = sum(r["response"]["body"]["usage"]["total_tokens"]
                for cid, r in one.items() if int(cid[4:]) % 10)
    assert s["cache"]["hits"] == 900 and s["cache"]["misses"] == 100
    assert s["cache"]["tokens_saved"]["total"] == saved
    assert s["this_run"]["tokens"]["total"] == sum(
        two[f"req-{i}"]["response"]["body"]["usage"]["total_tokens"] for i in range(0, n, 10))
    assert s["cache"]["usd_saved"] > 0
    assert "900 hit(s), 100 miss(es)" in second.stderr
    # the journal says which lines the cache answered; status counts them done
    ok_codes = [r[3] for r in read_jsonl(tmp_path / "two" / "journal.jsonl")
                if isinstance(r, list) and r[0] == "o"]
    assert ok_codes.count("cached") == 900
    st = orjson.loads(run_cli(["status", str(tmp_path / "two"), "--json"], env=keyed_env()).stdout)
    assert st["finished"] and st["succeeded"] == n and st["cached"] == 900
    text = run_cli(["status", str(tmp_path / "two")], env=keyed_env()).stdout
    assert f"succeeded:    {n} (900 from the response cache, never sent)" in text


def test_hits_take_no_permit_resume_and_merge_count_them_done(sim_factory: Any,
                                                             tmp_path: Path) -> None:
    """Shards of a rerun answered wholly from the cache: nothing is sent (no admission
    permit: the simulator receives no POST at all), a resume finds nothing to do, and merge
    joins the shards complete."""
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", lines(60, truncated_every=0))
    cache = tmp_path / "c.sqlite"
    assert run_cli(run_args(sim, inp, tmp_path / "first", cache), env=keyed_env()).returncode == 0
    sim.reset()
    for i in (0, 1):
        p = run_cli(run_args(sim, inp, tmp_path / f"s{i}", cache, "--shard", f"{i}/2",
                             "--rpm", "1"), env=keyed_env())  # 1 rpm: a permit would take minutes
        assert p.returncode == 0, p.stderr
        again = run_cli(run_args(sim, inp, tmp_path / f"s{i}", cache, "--shard", f"{i}/2"),
                        env=keyed_env())
        assert again.returncode == 0 and "nothing was left to send" in again.stderr
    stats = sim.stats()
    assert stats["completion_calls"] == 0
    assert all(v["received"] == 0 for route, v in stats["by_route"].items()
               if route.startswith("/v1/") and route != "/v1/models")
    page = cache_cards(load_run(tmp_path / "s0"), tmp_path / "s0")  # the report's cards
    assert "<b>30</b><span>lines answered from the cache" in page
    assert "<b>30 / 0</b><span>cache hits / misses" in page
    merged = run_cli(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o",
                      str(tmp_path / "all")], env=keyed_env())
    assert merged.returncode == 0, merged.stderr
    assert len(by_id(tmp_path / "all")) == 60
    assert all(r["cached"] for r in by_id(tmp_path / "all").values())


def test_streamed_answers_serve_unstreamed_reruns_and_modes(sim_factory: Any,
                                                           tmp_path: Path) -> None:
    """`stream` is not in the key; read-only never stores, write-only never reads, off
    ignores the file."""
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", lines(20, truncated_every=0))
    more = write_jsonl(tmp_path / "more.jsonl", lines(30, truncated_every=0))
    cache = tmp_path / "c.sqlite"
    assert run_cli(run_args(sim, inp, tmp_path / "a", cache, "--stream"),
                   env=keyed_env()).returncode == 0
    sim.reset()
    ro = run_cli(run_args(sim, more, tmp_path / "b", cache, "--cache-mode", "read-only"),
                 env=keyed_env())
    assert ro.returncode == 0, ro.stderr
    assert sim.stats()["completion_calls"] == 10  # the 20 streamed ones were hits
    assert summary(tmp_path / "b")["cache"]["stored"] == 0 and len(entries(cache)) == 20
    sim.reset()
    wo = run_cli(run_args(sim, more, tmp_path / "c", cache, "--cache-mode", "write-only"),
                 env=keyed_env())
    assert wo.returncode == 0 and sim.stats()["completion_calls"] == 30
    assert summary(tmp_path / "c")["cache"]["hits"] == 0 and len(entries(cache)) == 30
    sim.reset()
    off = run_cli(run_args(sim, more, tmp_path / "d", cache, "--cache-mode", "off"),
                  env=keyed_env())
    assert off.returncode == 0 and sim.stats()["completion_calls"] == 30
    assert "cache" not in summary(tmp_path / "d")
    sim.reset()  # the environment names the cache too
    by_env = run_cli(run_args(sim, more, tmp_path / "e", None),
                     env=keyed_env(TMBATCH_CACHE=str(cache)))
    assert by_env.returncode == 0 and sim.stats()["completion_calls"] == 0


# -- sharing and crashes ---------------------------------------------------------------------
def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tmbatch", *args], env=keyed_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_share_one_cache(sim_factory: Any, tmp_path: Path) -> None:
    """Two real processes storing into one file at once (each half of the input, answers
    slow enough that they overlap): both finish, every answer is kept, and a third run of
    the whole input sends nothing."""
    sim = sim_factory(api_key=API_KEY, latency=0.01)
    rows = lines(400, truncated_every=0)
    halves = [write_jsonl(tmp_path / f"h{i}.jsonl", rows[i::2]) for i in (0, 1)]
    whole = write_jsonl(tmp_path / "all.jsonl", rows)
    cache = tmp_path / "shared.sqlite"
    assert run_cli(["cache", "stats", str(cache)], env=keyed_env()).returncode == 2  # none yet
    procs = [start(run_args(sim, h, tmp_path / f"o{i}", cache, "-c", "4"))
             for i, h in enumerate(halves)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert len(entries(cache)) == 400
    sim.reset()
    third = run_cli(run_args(sim, whole, tmp_path / "o3", cache), env=keyed_env())
    assert third.returncode == 0, third.stderr
    assert sim.stats()["completion_calls"] == 0
    st = orjson.loads(run_cli(["cache", "stats", str(cache), "--json"], env=keyed_env()).stdout)
    assert st["entries"] == 400 and st["runs"][0]["hits"] == 400
    assert sorted(r["stored"] for r in st["runs"]) == [0, 200, 200]


def _open_fresh(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()  # both processes at the same moment
    try:
        ResponseCache.open(Path(path), "read-write").close()
        results.put("ok")
    except CacheError as exc:
        results.put(str(exc))


def test_two_processes_creating_one_cache_at_once_both_open_it(tmp_path: Path) -> None:
    """Two processes creating (and switching to WAL) one new file at the same moment: SQLite
    refuses one of them at once, without its busy wait, unless the open tries again."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    got = []
    for i in range(40):
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_open_fresh, args=(str(tmp_path / f"c{i}.sqlite"),
                                                        barrier, results)) for _ in (0, 1)]
        for p in procs:
            p.start()
        got += [results.get(timeout=30), results.get(timeout=30)]
        for p in procs:
            p.join(10)
    assert [g for g in got if g != "ok"] == []


def test_kill_9_never_leaves_an_entry_without_its_result(sim_factory: Any,
                                                         tmp_path: Path) -> None:
    """Killed mid-run: every stored answer is one whose result line is in results.jsonl;
    the resume finishes the job; a rerun elsewhere sends exactly the lines the cache lacks."""
    sim = sim_factory(api_key=API_KEY, latency=0.03)
    n = 600
    inp = write_jsonl(tmp_path / "in.jsonl", lines(n, truncated_every=0))
    cache, out = tmp_path / "c.sqlite", tmp_path / "out"
    proc = start(run_args(sim, inp, out, cache, "-c", "8"))
    deadline = time.monotonic() + 60
    while sim.stats()["completion_calls"] < 150:
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stored = entries(cache)
    bodies = {orjson.dumps(r["response"]["body"]) for r in read_jsonl(out / "results.jsonl")}
    assert stored and len(stored) < n
    assert {orjson.dumps(orjson.loads(b)) for b in stored} <= bodies
    resumed = run_cli(run_args(sim, inp, out, cache), env=keyed_env())
    assert resumed.returncode in (0, 1), resumed.stderr  # 1: lines in flight are ambiguous
    kept = len(entries(cache))
    sim.reset()
    rerun = run_cli(run_args(sim, inp, tmp_path / "again", cache), env=keyed_env())
    assert rerun.returncode == 0, rerun.stderr
    assert sim.stats()["completion_calls"] == n - kept
    assert len(by_id(tmp_path / "again")) == n


# -- a cache that cannot be used -------------------------------------------------------------
def refused(sim: Any, p: subprocess.CompletedProcess[str], out: Path, words: str) -> None:
    assert p.returncode == 2, p.stderr
    assert words in p.stderr and "Traceback" not in p.stderr
    assert sim.stats()["received"] == 0  # not even preflight
    assert not out.exists()  # a new job refused locally leaves nothing


def test_a_garbage_file_is_refused_before_anything_is_sent(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", lines(5))
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database\n" * 200)
    p = run_cli(run_args(sim, inp, tmp_path / "out", bad), env=keyed_env())
    refused(sim, p, tmp_path / "out", "not a tmbatch cache")
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    p = run_cli(run_args(sim, inp, tmp_path / "out", other), env=keyed_env())
    refused(sim, p, tmp_path / "out", "not a tmbatch cache (its tables: t)")
    assert bad.read_bytes().startswith(b"this is not")  # never overwritten


HOLD = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_locked_cache_is_refused_before_anything_is_sent(sim_factory: Any,
                                                           tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", lines(5))
    cache = tmp_path / "c.sqlite"
    assert run_cli(run_args(sim, inp, tmp_path / "first", cache), env=keyed_env()).returncode == 0
    sim.reset()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        p = run_cli(run_args(sim, inp, tmp_path / "out", cache), env=keyed_env())
        refused(sim, p, tmp_path / "out", "locked by another process")
    finally:
        holder.communicate(b"", timeout=10)
    ok = run_cli(run_args(sim, inp, tmp_path / "out", cache), env=keyed_env())
    assert ok.returncode == 0 and sim.stats()["completion_calls"] == 1  # the truncated one


def test_a_read_only_file_needs_read_only_mode(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", lines(5))
    cache = tmp_path / "c.sqlite"
    assert run_cli(run_args(sim, inp, tmp_path / "first", cache), env=keyed_env()).returncode == 0
    sim.reset()
    cache.chmod(0o444)
    p = run_cli(run_args(sim, inp, tmp_path / "out", cache), env=keyed_env(), as_plain_user=True)
    refused(sim, p, tmp_path / "out", "--cache-mode read-only")
    ro = run_cli(run_args(sim, inp, tmp_path / "out", cache, "--cache-mode", "read-only"),
                 env=keyed_env(), as_plain_user=True)
    assert ro.returncode == 0, ro.stderr
    assert sim.stats()["completion_calls"] == 1  # 4 hits, the truncated line sent
    assert summary(tmp_path / "out")["cache"]["hits"] == 4


# -- the cache command -----------------------------------------------------------------------
def test_cache_stats_and_prune(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", lines(40, truncated_every=0))
    cache = tmp_path / "c.sqlite"
    for name in ("a", "b"):
        assert run_cli(run_args(sim, inp, tmp_path / name, cache, "--price",
                                "tm-small=1:2"), env=keyed_env()).returncode == 0
    text = run_cli(["cache", "stats", str(cache)], env=keyed_env())
    assert text.returncode == 0 and "40 answer(s)" in text.stdout and "tm-small: 40" in text.stdout
    st = orjson.loads(run_cli(["cache", "stats", str(cache), "--json"], env=keyed_env()).stdout)
    assert st["entries"] == 40 and st["bytes"] > 0
    assert [(r["hits"], r["misses"], r["stored"]) for r in st["runs"]] == [(40, 0, 0),
                                                                        (0, 40, 40)]
    assert st["runs"][0]["tokens_saved"] > 0 and st["runs"][0]["usd_saved"] > 0
    conn = sqlite3.connect(cache)  # age half the answers by 40 days
    with conn:
        conn.execute("UPDATE entries SET created = created - 40 * 86400 "
                     "WHERE key IN (SELECT key FROM entries ORDER BY key LIMIT 15)")
    conn.close()
    pruned = run_cli(["cache", "prune", str(cache), "--older-than", "30d", "--json"],
                     env=keyed_env())
    assert pruned.returncode == 0, pruned.stderr
    assert orjson.loads(pruned.stdout) == {"path": str(cache), "removed": 15, "entries": 25}
    bad = run_cli(["cache", "prune", str(cache), "--older-than", "soon"], env=keyed_env())
    assert bad.returncode == 2 and "e.g. 30d" in bad.stderr
