"""Crash safety: kill -9 at random moments, SIGTERM drains, torn lines, explicit resend.

Every check is on real processes killed with real signals, against the simulator, whose
accounting says what the server actually processed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import cuts
from tests.conftest import (
    ROOT,
    chat_line,
    clean_env,
    keyed_env,
    kill_at_random,
    read_jsonl,
    read_stderr_until,
    run_cli,
    wait_for_calls,
    write_jsonl,
)
from tmbatch.client.http import idempotency_key
from tmbatch.journal.compact import LineStates
from tmbatch.journal.journal import SpendRecord
from tmbatch.journal.records import Response, ResultRecord
from tmbatch.journal.writer import Writer

JOB = "resumejob01"


def cmd(sim: Any, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "-q",
            "--base-url", sim.url, "--job-id", JOB, *extra]


def start(sim: Any, inp: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd(sim, inp, out, *extra), env=keyed_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def all_lines_parse(out: Path) -> None:
    for name in ("results.jsonl", "failures.jsonl", "journal.jsonl"):
        data = (out / name).read_bytes()
        assert data == b"" or data.endswith(b"\n"), name
        for raw in data.splitlines():
            orjson.loads(raw)


def one_outcome_each(out: Path, ids: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    res = read_jsonl(out / "results.jsonl")
    fail = read_jsonl(out / "failures.jsonl")
    count = Counter([r["custom_id"] for r in res] + [f["custom_id"] for f in fail])
    assert set(count) == set(ids)
    assert [c for c, n in count.items() if n != 1] == []
    return {r["custom_id"]: r for r in res}, {f["custom_id"]: f for f in fail}


@pytest.mark.parametrize("planned", [4, pytest.param(40, marks=pytest.mark.slow)],
                         ids=["4-kills", "40-kills-soak"])
def test_torture_kill_9_at_random_moments(sim_factory: Any, tmp_path: Path,
                                          planned: int) -> None:
    """Killed at random moments (real processes, real SIGKILL: the moments are what is
    random, so they stay on the wall clock), then finished by one run: every line has one
    outcome, none was processed twice. Four kills by default; the 40-kill soak runs with
    TMBATCH_SLOW=1."""
    sim = sim_factory(latency=0.05, latency_jitter=0.04)
    n = 170 * planned  # ~1 s of work per kill at 8 x 50 ms: more than the kills can finish
    ids = [f"req-{i}" for i in range(n)]
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(n)])
    out = tmp_path / "out"
    kills = kill_at_random(lambda _: start(sim, inp, out, "--concurrency", "8"), planned,
                           20261123, (0.4, 1.4))
    assert kills >= planned - planned // 6
    final = run_cli(cmd(sim, inp, out, "--concurrency", "32")[3:], env=keyed_env(), timeout=120)
    assert final.returncode in (0, 1), final.stderr
    all_lines_parse(out)
    res, fail = one_outcome_each(out, ids)
    stats = sim.stats()
    assert stats["duplicates"] == 0, stats["duplicate_keys"][:5]
    for f in fail.values():  # the only failures a crash may leave
        assert f["error"]["code"] == "unknown_outcome_after_crash"
        assert f["error"]["class"] == "ambiguous"
    dispatched = {r[3] for r in read_jsonl(out / "journal.jsonl")
                  if isinstance(r, list) and r[0] == "d"}
    assert set(fail) <= dispatched  # every unknown outcome was indeed dispatched
    for cid in res:
        assert stats["processed"][idempotency_key(JOB, cid)] == 1
    status = run_cli(["status", str(out), "--json"], env=keyed_env())
    st = orjson.loads(status.stdout)
    assert st["finished"] and st["succeeded"] == len(res) and st["not_yet_sent"] == 0


def test_sigterm_drains_in_flight_and_resume_sends_only_the_rest(
    sim_factory: Any, tmp_path: Path
) -> None:
    sim = sim_factory()
    ids = [f"req-{i}" for i in range(20)]
    rows = [chat_line(i) for i in range(20)]
    for row in rows[:4]:  # the four in flight when the signal comes; the rest answer at once
        row["body"]["sim"] = {"sleep": 2.0}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    proc = start(sim, inp, out, "--concurrency", "4")
    wait_for_calls(sim, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert b"run the same command again" in err
    res = read_jsonl(out / "results.jsonl")
    assert len(res) == 4  # the four in flight finished during the drain
    assert sim.stats()["completion_calls"] == 4
    again = run_cli(cmd(sim, inp, out, "--concurrency", "8")[3:], env=keyed_env(), timeout=60)
    assert again.returncode == 0, again.stderr
    res, fail = one_outcome_each(out, ids)
    assert not fail
    stats = sim.stats()
    assert stats["completion_calls"] == 20 and stats["duplicates"] == 0


def test_second_signal_stops_at_once_and_leaves_unknown_outcomes(
    sim_factory: Any, tmp_path: Path
) -> None:
    sim = sim_factory()
    rows = [chat_line(i) for i in range(6)]
    for row in rows[:3]:
        row["body"]["sim"] = {"sleep": 30}  # in flight when the signals come
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    proc = start(sim, inp, out, "--concurrency", "3")
    wait_for_calls(sim, 3)
    proc.send_signal(signal.SIGINT)
    read_stderr_until(proc, b"no new requests")  # the first one is being handled: draining
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 130
    again = run_cli(cmd(sim, inp, out)[3:], env=keyed_env(), timeout=60)
    assert again.returncode == 1, again.stderr
    res, fail = one_outcome_each(out, [f"req-{i}" for i in range(6)])
    assert len(fail) == 3 and len(res) == 3
    assert {f["error"]["code"] for f in fail.values()} == {"unknown_outcome_after_crash"}
    assert "ambiguous" in again.stderr
    assert sim.stats()["duplicates"] == 0


def test_torn_last_lines_are_repaired_on_resume(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i) for i in range(8)]
    rows[3]["body"]["sim"] = {"status": 400}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    first = run_cli(cmd(sim, inp, out)[3:], env=keyed_env())
    assert first.returncode == 1
    for name in ("results.jsonl", "failures.jsonl", "journal.jsonl"):
        with open(out / name, "ab") as f:
            f.write(b'{"id": "torn-by-a-crash", "cust')
    again = run_cli([*cmd(sim, inp, out)[3:], "-v"], env=keyed_env())
    assert again.returncode == 1, again.stderr
    assert again.stderr.count("torn last line") == 3
    for name in ("results.jsonl", "failures.jsonl", "journal.jsonl"):
        side = list(out.glob(name + ".torn-*"))
        assert len(side) == 1 and side[0].read_bytes() == b'{"id": "torn-by-a-crash", "cust'
    all_lines_parse(out)
    one_outcome_each(out, [f"req-{i}" for i in range(8)])
    assert sim.stats()["completion_calls"] == 8  # nothing was sent twice


def test_a_different_input_is_refused_and_restart_keeps_old_files(
    sim: Any, tmp_path: Path
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    other = write_jsonl(tmp_path / "other.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out"
    assert run_cli(cmd(sim, inp, out)[3:], env=keyed_env()).returncode == 0
    refused = run_cli(cmd(sim, other, out)[3:], env=keyed_env())
    assert refused.returncode == 2
    assert "different input" in refused.stderr and "--restart" in refused.stderr
    restarted = run_cli([*cmd(sim, other, out)[3:], "--restart"], env=keyed_env())
    assert restarted.returncode == 0, restarted.stderr
    previous = list(out.glob("previous-*"))
    assert len(previous) == 1 and len(read_jsonl(previous[0] / "results.jsonl")) == 3
    assert len(read_jsonl(out / "results.jsonl")) == 4


def test_resend_sends_exactly_the_selected_lines_once(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i) for i in range(10)]
    for i in (2, 5):
        rows[i]["body"]["sim"] = {"status": 500, "times": 1}
    rows[7]["body"]["sim"] = {"status": 400}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli(cmd(sim, inp, out)[3:], env=keyed_env()).returncode == 1
    before = sim.stats()["processed"]
    base = ["resend", str(out), "--base-url", sim.url, "-q"]
    refused = run_cli([*base, "--class", "ambiguous"], env=keyed_env())
    assert refused.returncode == 2 and "--yes" in refused.stderr  # no terminal, no --yes
    dry = run_cli([*base, "--class", "ambiguous", "--dry-run"], env=keyed_env())
    assert "2 line(s) to send again" in dry.stderr and "nothing was sent" in dry.stderr
    assert "req-2" in dry.stderr and "req-5" in dry.stderr and "req-7" not in dry.stderr
    assert sim.stats()["processed"] == before
    p = run_cli([*base, "--class", "ambiguous", "--yes"], env=keyed_env())
    assert p.returncode == 0, p.stderr
    after = sim.stats()["processed"]
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {idempotency_key(JOB, "req-2"), idempotency_key(JOB, "req-5")}
    assert all(after[k] == 2 for k in changed)
    res, fail = one_outcome_each(out, [f"req-{i}" for i in range(10)])
    assert set(fail) == {"req-7"} and "req-2" in res and "req-5" in res
    st = orjson.loads(run_cli(["status", str(out), "--json"], env=keyed_env()).stdout)
    assert st["succeeded"] == 9 and st["failed"] == 1 and st["finished"]
    ids = tmp_path / "ids.txt"
    ids.write_text("req-7\n")
    p = run_cli([*base, "--ids", str(ids), "--yes"], env=keyed_env())
    assert p.returncode == 1  # it fails again (400), still one outcome
    one_outcome_each(out, [f"req-{i}" for i in range(10)])
    assert sim.stats()["processed"][idempotency_key(JOB, "req-7")] == 2


def test_lines_refused_by_401_are_sent_on_resume(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key="tm-the-right-key-0000000000000000")
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    out = tmp_path / "out"
    p = run_cli(cmd(sim, inp, out, "--concurrency", "2")[3:], env=keyed_env())
    assert p.returncode == 3
    fixed = clean_env(TENSORMESH_INFERENCE_API_KEY="tm-the-right-key-0000000000000000")
    p = run_cli(cmd(sim, inp, out)[3:], env=fixed)
    assert p.returncode == 0, p.stderr
    res, fail = one_outcome_each(out, [f"req-{i}" for i in range(5)])
    assert len(res) == 5 and not fail  # the 401 failures were superseded


def test_status_and_ordered_export(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i) for i in range(40)]
    rows[10]["body"]["sim"] = {"status": 422}
    rows[30]["body"]["sim"] = {"sleep": 0.3}  # finishes last: completion order != input order
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli(cmd(sim, inp, out, "--ordered")[3:], env=keyed_env()).returncode == 1
    res_lines = [r["line"] for r in read_jsonl(out / "results.jsonl")]
    assert res_lines != sorted(res_lines)
    ordered = [r["line"] for r in read_jsonl(out / "results.ordered.jsonl")]
    assert ordered == sorted(res_lines) and len(ordered) == 39
    p = run_cli(["export", str(out), "--combined", "--to", str(tmp_path / "exp")], env=keyed_env())
    assert p.returncode == 0, p.stderr
    combined = read_jsonl(tmp_path / "exp" / "outcomes.ordered.jsonl")
    assert [r["line"] for r in combined] == list(range(1, 41))
    assert combined[10]["error"]["code"] == "http_422"
    text = run_cli(["status", str(out)], env=keyed_env())
    assert text.returncode == 0
    assert "succeeded:    39" in text.stdout and "permanent 1" in text.stdout


def test_export_external_sort_with_tiny_chunks(tmp_path: Path) -> None:
    from tmbatch.tools.export import export_ordered

    out = tmp_path / "out"
    out.mkdir()
    lines = list(range(1, 501))
    random.Random(3).shuffle(lines)
    write_jsonl(out / "results.jsonl", [{"custom_id": str(i), "line": i} for i in lines])
    (out / "failures.jsonl").write_bytes(b"")
    export_ordered(out, chunk=7)  # 72 spilled runs merged
    got = [r["line"] for r in read_jsonl(out / "results.ordered.jsonl")]
    assert got == list(range(1, 501))
    assert os.stat(out / "results.ordered.jsonl").st_mode & 0o077 == 0


@pytest.mark.parametrize("first", ["pending", "spend", "result"])
def test_a_dispatch_record_is_on_disk_when_dispatch_returns(tmp_path: Path, first: str) -> None:
    """Writer.dispatch writes its record before it returns, inside the loop tick. Queued
    records whose place matters (a retried line's `pending`, a spend snapshot) go out before
    it; a queued result of another line may follow it at the end of the tick, after its own
    results.jsonl line."""

    async def tick() -> list[Any]:
        w = Writer(tmp_path, LineStates())
        if first == "pending":
            w.pending(1)
        elif first == "spend":
            w.spend(SpendRecord(1.0, {"m": [1, 2, 0, 1]}))
        else:
            w.result(ResultRecord("batch_req_x", "b", 2, Response(200, "r", {"x": 1})))
        w.dispatch(1, 2, "a")
        on_disk = read_jsonl(tmp_path / "journal.jsonl")
        await asyncio.sleep(0)  # the end of the tick: the queued outcomes are flushed
        w.close()
        return on_disk

    on_disk = asyncio.run(tick())
    journal = read_jsonl(tmp_path / "journal.jsonl")
    if first == "pending":
        assert on_disk == [["o", 1, "pending", ""], ["d", 1, 2, "a"]]
    elif first == "spend":
        assert on_disk == [["s", 1.0, {"m": [1, 2, 0, 1]}, {}, 0], ["d", 1, 2, "a"]]
    else:
        assert on_disk == [["d", 1, 2, "a"]]
        assert [r[0] for r in journal] == ["d", "o", "m"]  # the result, then its mark
        assert read_jsonl(tmp_path / "results.jsonl")[0]["custom_id"] == "b"


@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_every_state_a_kill_can_leave_resumes_to_one_outcome_per_line(
        sim_factory: Any, tmp_path: Path, fsync: str) -> None:
    """The torture test above kills at random moments; this one makes every state a kill can
    leave (tests/cuts.py: the finished run's journal cut at the start of each of its writes,
    the outputs as that moment leaves them) and resumes each against a fresh server. Every
    line ends with one outcome; a line the cut journal shows dispatched is never sent again,
    its outcome the one its output line holds, or `unknown_outcome_after_crash` if the kill
    left none; a line it does not show dispatched is sent once; and `status` agrees."""
    rows = [chat_line(i, "tm-nope" if i % 7 == 3 else "tm-small") for i in range(24)]
    ids = [r["custom_id"] for r in rows]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    done = tmp_path / "done"
    first = sim_factory(latency=0.03)
    p = run_cli(cmd(first, inp, done, "-c", "4", "--fsync", fsync, "--no-preflight")[3:],
                env=keyed_env())
    assert p.returncode == 1, p.stderr  # the 404s
    states = cuts.cuts((done / "journal.jsonl").read_bytes())
    ahead = [c for c in states if c.outputs_ahead]
    assert len(states) >= 30 and len(ahead) >= 6, states  # 4 in flight: 6 flushes at least
    # every outputs-ahead state, and every fourth of the others (the suite's time)
    chosen = ahead + [c for c in states if not c.outputs_ahead][::4]
    for n, cut in enumerate(chosen):
        out = tmp_path / f"cut{n}"
        cuts.make(done, out, cut)
        journal = read_jsonl(out / "journal.jsonl")
        dispatched = {r[3] for r in journal if isinstance(r, list) and r[0] == "d"}
        written = {r["custom_id"]: r for r in read_jsonl(out / "results.jsonl")
                   + read_jsonl(out / "failures.jsonl")}
        sim = sim_factory(latency=0.0)
        again = run_cli(cmd(sim, inp, out, "-c", "4", "--no-preflight")[3:], env=keyed_env())
        assert again.returncode in (0, 1), (n, cut, again.stderr)
        all_lines_parse(out)
        res, fail = one_outcome_each(out, ids)
        stats = sim.stats()  # answers by key; with the 404s, by count
        processed = stats["processed"]
        sent = {cid for cid in ids if processed.get(idempotency_key(JOB, cid))}
        unsent = set(ids) - dispatched
        assert sent == {cid for cid in unsent if int(cid[4:]) % 7 != 3}, (n, cut)
        assert all(processed[idempotency_key(JOB, cid)] == 1 for cid in sent)
        assert stats["by_route"]["/v1/chat/completions"]["received"] == len(unsent), (n, cut)
        for cid in dispatched:
            kept = res.get(cid) or fail[cid]
            if cid in written:
                assert kept == written[cid], (n, cut, cid)
            else:
                assert fail[cid]["error"]["code"] == "unknown_outcome_after_crash", (n, cid)
        st = orjson.loads(run_cli(["status", str(out), "--json"], env=keyed_env()).stdout)
        assert st["succeeded"] == len(res) and st["not_yet_sent"] == 0, (n, st)
