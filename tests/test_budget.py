"""Budgets: a run never admits an attempt past `--budget-tokens` / `--budget-usd`.

Every case runs the real CLI against a real server on 127.0.0.1: the simulator (its answers
carry `usage`) or a small aiohttp app whose `usage` is above or below tmbatch's estimate. What
was billed is read back from results.jsonl's `usage` and compared with summary.json's spend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests import cuts
from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    clean_env,
    outcomes,
    read_jsonl_tolerant,
    run_cli,
    write_jsonl,
)
from tmbatch.base.exitcodes import ExitCode
from tmbatch.journal.format import DispatchRecord
from tmbatch.journal.reading import records
from tmbatch.spend.prices import Price
from tmbatch.spend.tokens import answer_text_tokens, output_ceiling, prompt_tokens

ENV = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)


def run(url: str, inp: Path, out: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(["run", str(inp), "-o", str(out), "--base-url", url, "--no-preflight",
                    "--progress-interval", "60", *args], env=ENV, **kw)


def summary(out: Path) -> dict[str, Any]:
    return orjson.loads((out / "summary.json").read_bytes())


def usage_total(records: list[dict[str, Any]]) -> int:
    total = 0
    for r in records:
        u = r["response"]["body"]["usage"]
        total += u["prompt_tokens"] + u["completion_tokens"]
    return total


def answer_server(serve: Any, prompt_tokens_: int | None, completion: int | None,
                  cached: int | None = None) -> Any:
    """Chat answers whose usage says `prompt_tokens_` + `completion` (None: no usage), of
    which `cached` prompt tokens were cached."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(request.headers.get("Idempotency-Key", ""))
        out: dict[str, Any] = {
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]}
        if prompt_tokens_ is not None and completion is not None:
            out["usage"] = {"prompt_tokens": prompt_tokens_, "completion_tokens": completion,
                            "total_tokens": prompt_tokens_ + completion}
            if cached is not None:
                out["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = serve(app)
    server.seen = seen
    return server


# -- a budget that stops a run, and the same command with a larger one -----------------------

def test_a_budget_stops_the_run_mid_way_and_a_larger_one_continues(sim: Any,
                                                                    tmp_path: Path) -> None:
    rows = [chat_line(i, max_tokens=16) for i in range(60)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    budget = 250  # about 30 of the 60 answers
    p = run(sim.url, inp, out, "--budget-tokens", str(budget), "-c", "4")
    assert p.returncode == ExitCode.BUDGET == 6, p.stderr
    assert "budget reached" in p.stderr and "larger budget" in p.stderr
    res, fail = outcomes(out)
    assert 0 < len(res) < 60 and not fail
    s = summary(out)
    spent = s["spend"]["spent"]["tokens"]
    assert spent == usage_total(list(res.values())) <= budget  # usage never exceeds it
    assert s["stopped"] == "budget" and s["spend"]["reached"]
    assert s["spend"]["budget"] == {"tokens": budget, "usd": None}
    assert s["spend"]["by_model"]["tm-small"]["spent"]["tokens"] == spent
    assert s["spend"]["reserved"]["tokens"] == 0  # everything in flight finished
    # it stopped because the next worst case did not fit, not earlier
    worst = max(prompt_tokens(r["body"]) + output_ceiling(r["body"]) for r in rows)
    assert spent + worst > budget
    stats = sim.stats()
    assert stats["processed_total"] == len(res)  # nothing billed that is not in results

    st = run_cli(["status", str(out), "--json"])
    status = orjson.loads(st.stdout)
    assert status["not_yet_sent"] == 60 - len(res) and not status["finished"]
    assert status["spend"]["tokens"] == spent and status["spend"]["budget"]["tokens"] == budget
    assert f"spent:        {spent:,} tokens of a budget of {budget:,}" in \
        run_cli(["status", str(out)]).stdout

    again = run(sim.url, inp, out, "--budget-tokens", str(budget))  # same budget: nothing sent
    assert again.returncode == 6 and sim.stats()["processed_total"] == len(res)

    p = run(sim.url, inp, out, "--budget-tokens", "100000", "-c", "4")
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(out)
    assert len(res) == 60 and not fail
    s = summary(out)
    assert s["spend"]["spent"]["tokens"] == usage_total(list(res.values()))
    this_run = s["spend"]["by_model"]["tm-small"]["this_run"]["tokens"]
    assert s["spend"]["spent"]["tokens"] == spent + this_run  # the earlier runs still count
    stats = sim.stats()
    assert stats["duplicates"] == 0 and stats["processed_total"] == 60


def test_a_budget_smaller_than_one_request_is_refused_before_sending(sim: Any,
                                                                     tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=64) for i in range(3)])
    out = tmp_path / "out"
    p = run(sim.url, inp, out, "--budget-tokens", "20")
    assert p.returncode == 2
    assert "--budget-tokens 20 is smaller than one request: line 1 (req-0) may use up to" in \
        p.stderr and "Traceback" not in p.stderr
    p = run(sim.url, inp, out, "--budget-usd", "0.000001", "--price", "tm-small=1:1")
    assert p.returncode == 2 and "--budget-usd 1e-06 is smaller than one request" in p.stderr
    assert sim.stats()["received"] == 0 and not out.exists()


# -- usage above and below the estimate ----------------------------------------------------------

def test_usage_above_the_estimate_is_counted_and_later_reservations_follow_it(
        serve: Any, tmp_path: Path) -> None:
    """The server says each prompt is 200 tokens where tmbatch estimates ~4: the first answer
    overruns its reservation, the next ones reserve what usage showed, and the run stops
    where real usage says, not where the estimate would have let it go on."""
    server = answer_server(serve, 200, 16)
    rows = [chat_line(i, max_tokens=16) for i in range(50)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(server.url(), inp, out, "--budget-tokens", "1000", "-c", "1")
    assert p.returncode == 6, p.stderr
    assert "more than the" in p.stderr and "reserved for it" in p.stderr
    res, _ = outcomes(out)
    s = summary(out)["spend"]
    assert s["spent"]["tokens"] == 216 * len(res) == usage_total(list(res.values()))
    assert len(res) == 1000 // 216 and s["spent"]["tokens"] <= 1000
    assert s["prompt_estimate_factor"] > 10
    naive = 1000 // (prompt_tokens(rows[0]["body"]) + 16)
    assert naive > 20 > len(server.seen)  # the estimate alone would have sent far more


def test_usage_below_the_estimate_lets_the_run_get_close_to_the_budget(
        serve: Any, tmp_path: Path) -> None:
    server = answer_server(serve, 5, 1)  # far below prompt estimate + max_tokens 100
    rows = [chat_line(i, max_tokens=100) for i in range(300)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    budget = 600
    p = run(server.url(), inp, out, "--budget-tokens", str(budget), "-c", "8")
    assert p.returncode == 6, p.stderr
    res, _ = outcomes(out)
    spent = summary(out)["spend"]["spent"]["tokens"]
    worst = prompt_tokens(rows[0]["body"]) + 100
    assert spent == 6 * len(res) == len(server.seen) * 6
    # only about one worst case is left unused (its prompt part scaled by what usage showed)
    assert budget - worst - 5 < spent <= budget


# -- streams, retries, failures ------------------------------------------------------------------

def test_streamed_answers_count_what_arrived(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i, max_tokens=16, stream=True) for i in range(6)]
    for r in rows[3:]:  # no usage in these streams: the text that arrived is counted
        r["body"]["stream_options"] = {"include_usage": False}
    rows.append(chat_line(99, max_tokens=16, stream=True, sim={"cut_after": 2}))
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim.url, inp, out, "--price", "tm-small=1:1")
    assert p.returncode == 1, p.stderr  # the cut stream failed, ambiguous
    res, fail = outcomes(out)
    assert fail["req-99"]["error"]["class"] == "ambiguous"
    with_usage = [res[f"req-{i}"] for i in range(3)]
    without = [(rows[i]["body"], res[f"req-{i}"]) for i in range(3, 6)]
    assert all("usage" not in r["response"]["body"] for _, r in without)
    cut = rows[6]["body"]  # may have been billed whole: its worst case
    want = (usage_total(with_usage)
            + sum(prompt_tokens(b) + answer_text_tokens(r["response"]["body"]) for b, r in without)
            + prompt_tokens(cut) + 16)
    s = summary(out)["spend"]
    assert s["spent"]["tokens"] == want
    assert s["by_model"]["tm-small"]["spent"]["requests"] == 7
    assert s["spent"]["usd"] == pytest.approx(want / 1e6, abs=1e-6)


def test_retries_count_nothing_until_answered_and_ambiguous_counts_its_worst_case(
        sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i, max_tokens=16, sim={"status": 429, "times": 2, "retry_after": 0})
            for i in range(5)]
    rows.append(chat_line(7, max_tokens=16, sim={"status": 500}))
    rows.append(chat_line(8, max_tokens=16, sim={"status": 400}))
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim.url, inp, out, "--budget-tokens", "100000", "-c", "2")
    assert p.returncode == 1, p.stderr
    res, _ = outcomes(out)
    assert len(res) == 5 and summary(out)["this_run"]["retries"] == 10
    s = summary(out)["spend"]
    # 429s and a 400 did no work (their policy refunds); the 500 may have been billed whole
    assert s["spent"]["tokens"] == usage_total(list(res.values())) + \
        prompt_tokens(rows[5]["body"]) + 16
    assert s["by_model"]["tm-small"]["spent"]["requests"] == 6


def test_resend_counts_against_the_same_budget(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i, max_tokens=16) for i in range(4)]
    rows += [chat_line(i, max_tokens=16, sim={"status": 500, "times": 1}) for i in range(4, 6)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run(sim.url, inp, out).returncode == 1
    spent = summary(out)["spend"]["spent"]["tokens"]
    res, _ = outcomes(out)
    worst = prompt_tokens(rows[4]["body"]) + 16
    assert spent == usage_total(list(res.values())) + 2 * worst  # the 500s: worst case
    before = sim.stats()["processed_total"]
    resend = ["resend", str(out), "--class", "ambiguous", "--yes", "--base-url", sim.url, "-q"]
    p = run_cli([*resend, "--budget-tokens", str(spent + worst - 1)], env=ENV)
    assert p.returncode == 6, p.stderr  # the job's earlier spend counts: not even one fits
    assert sim.stats()["processed_total"] == before
    p = run_cli([*resend, "--budget-tokens", str(spent + 2 * worst)], env=ENV)
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(out)
    assert len(res) == 6 and not fail
    s = summary(out)["spend"]
    assert s["spent"]["tokens"] == spent + s["by_model"]["tm-small"]["this_run"]["tokens"]
    assert s["spent"]["tokens"] <= spent + 2 * worst


# -- prices ------------------------------------------------------------------------------------

def test_every_route_and_cached_tokens_are_counted_at_their_price(sim: Any, serve: Any,
                                                                  tmp_path: Path) -> None:
    rows = [chat_line(0, max_tokens=8),
            {"custom_id": "c", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tm-small", "prompt": "once upon a time", "max_tokens": 8}},
            {"custom_id": "r", "method": "POST", "url": "/v1/responses",
             "body": {"model": "tm-small", "input": "hello there", "max_output_tokens": 8}},
            {"custom_id": "t", "method": "POST", "url": "/tokenize",
             "body": {"model": "tm-small", "prompt": "not billed"}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run(sim.url, inp, out, "--budget-tokens", "1000").returncode == 0
    res, _ = outcomes(out)
    billed = 0
    for cid in ("req-0", "c", "r"):  # chat/completions and responses spell usage differently
        u = res[cid]["response"]["body"]["usage"]
        billed += u.get("prompt_tokens", u.get("input_tokens")) + \
            u.get("completion_tokens", u.get("output_tokens"))
    s = summary(out)["spend"]
    assert s["spent"]["tokens"] == billed and s["by_model"]["tm-small"]["spent"]["requests"] == 3

    server = answer_server(serve, 200, 10, cached=150)
    out = tmp_path / "cached"
    inp = write_jsonl(tmp_path / "chat.jsonl", [chat_line(i, max_tokens=10) for i in range(4)])
    assert run(server.url(), inp, out, "--price", "tm-small=2:4:0.5").returncode == 0
    s = summary(out)["spend"]
    assert s["by_model"]["tm-small"]["spent"]["cached"] == 4 * 150
    assert s["spent"]["usd"] == pytest.approx(4 * Price(2, 4, 0.5).cost(200, 10, 150))


def test_a_usd_budget_holds_at_the_given_prices(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=16) for i in range(80)])
    out = tmp_path / "out"
    prices = tmp_path / "prices.json"
    prices.write_text('{"tm-small": {"input": 100, "output": 300}}')
    p = run(sim.url, inp, out, "--budget-usd", "0.05", "--prices", str(prices), "-c", "4")
    assert p.returncode == 6, p.stderr
    res, _ = outcomes(out)
    price = Price(100, 300)
    cost = sum(price.cost(r["response"]["body"]["usage"]["prompt_tokens"],
                          r["response"]["body"]["usage"]["completion_tokens"])
               for r in res.values())
    s = summary(out)["spend"]
    assert s["spent"]["usd"] == pytest.approx(cost, abs=1e-6) and cost <= 0.05
    assert s["by_model"]["tm-small"]["spent"]["usd"] == pytest.approx(cost, abs=1e-6)


def test_a_model_without_a_price(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i, max_tokens=8) for i in range(3)]
    rows += [chat_line(i, model="tm-large", max_tokens=8) for i in range(3, 5)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim.url, inp, out, "--budget-usd", "1", "--price", "tm-small=1:1")
    assert p.returncode == 2, p.stderr  # a USD budget cannot hold a model it cannot price
    assert "--budget-usd needs a price for every model" in p.stderr
    assert "'tm-large' (line 4)" in p.stderr and sim.stats()["received"] == 0

    p = run(sim.url, inp, out, "--price", "tm-small=1:1")  # prices alone: a warning
    assert p.returncode == 0, p.stderr
    assert "no price for model 'tm-large': cost figures exclude it" in p.stderr
    assert "excludes tm-large: no price" in p.stderr
    res, _ = outcomes(out)
    s = summary(out)["spend"]
    small = usage_total([res[f"req-{i}"] for i in range(3)])
    assert s["usd_excludes_models"] == ["tm-large"]
    assert s["spent"]["usd"] == pytest.approx(small / 1e6, abs=1e-9)
    assert s["by_model"]["tm-large"]["spent"]["usd"] is None
    assert s["spent"]["tokens"] == usage_total(list(res.values()))


def test_a_job_file_carries_the_budget_and_prices(sim: Any, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=16) for i in range(40)])
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\nbudget_usd = 0.0004\n'
                   '[prices."tm-small"]\ninput = 1.0\noutput = 2.0\n')
    p = run_cli(["run", str(job), "--base-url", sim.url, "--no-preflight", "-q"], env=ENV,
                cwd=tmp_path)
    assert p.returncode == 6, p.stderr
    s = summary(tmp_path / "job.out")["spend"]
    assert s["budget"]["usd"] == 0.0004 and 0 < s["spent"]["usd"] <= 0.0004
    assert s["prices"] == {"tm-small": {"input": 1.0, "output": 2.0}}


# -- crashes ------------------------------------------------------------------------------------

def test_after_kill_9_a_resumed_job_counts_at_least_what_was_billed(sim_factory: Any,
                                                                   tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY, latency=0.3)
    rows = [chat_line(i, max_tokens=16) for i in range(200)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url",
            sim.url, "--no-preflight", "-q", "-c", "16", "--budget-tokens", "1000000"]
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(read_jsonl_tolerant(out / "results.jsonl")) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # requests the server had already taken finish there (latency 0.3 s): every one it
    # received is answered (into a closed socket) and counted in its status counts
    deadline = time.monotonic() + 30
    while True:
        chat = (stats := sim.stats())["by_route"]["/v1/chat/completions"]
        if sum(chat["status_counts"].values()) == chat["received"]:
            break
        assert time.monotonic() < deadline, chat
        time.sleep(0.02)
    billed = stats["processed_total"]
    assert 40 <= billed < 200
    worst = prompt_tokens(rows[0]["body"]) + 16
    got = read_jsonl_tolerant(out / "results.jsonl")
    least = min(usage_total([r]) for r in got)
    st = orjson.loads(run_cli(["status", str(out), "--json"]).stdout)["spend"]
    # never less than the server billed (answers lost with the process included) ...
    assert st["tokens"] >= usage_total(got) + (billed - len(got)) * least
    # ... and more only by worst cases: 16 in flight plus a quarter second of attempts
    assert st["tokens"] <= usage_total(got) + 64 * worst
    assert st["unknown_attempts"] == 0

    p = run_cli(args[3:], env=ENV)
    assert p.returncode == 1, p.stderr  # the cut-off requests are ambiguous, not re-sent
    s = summary(out)["spend"]
    assert s["spent"]["tokens"] == st["tokens"] + s["by_model"]["tm-small"]["this_run"]["tokens"]
    res, fail = outcomes(out)
    assert {f["error"]["code"] for f in fail.values()} <= {"unknown_outcome_after_crash"}
    # every answer at least at its usage, every unknown outcome at its worst case
    assert s["spent"]["tokens"] >= usage_total(list(res.values())) + len(fail) * worst
    assert sim.stats()["duplicates"] == 0


def test_shards_split_the_jobs_budget(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=16) for i in range(10)])
    out = tmp_path / "out"
    p = run(sim.url, inp, out, "--shard", "1/4", "--budget-tokens", "1000", "--budget-usd", "2",
            "--price", "tm-small=1:1")
    assert p.returncode == 0, p.stderr
    assert "shard 1/4 takes 1/4 of the job's budget" in p.stderr
    assert summary(out)["spend"]["budget"] == {"tokens": 250, "usd": 0.5}


def _kill_after(args: list[str], out: Path, answers: int) -> None:
    """Start `args`, kill -9 it once results.jsonl holds `answers` lines (or after 60 s)."""
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while (len(read_jsonl_tolerant(out / "results.jsonl")) < answers
               and time.monotonic() < deadline and proc.poll() is None):
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _settled(sim: Any) -> int:
    """How many requests the server billed, once every one it received has been answered."""
    deadline = time.monotonic() + 30
    while True:
        chat = (stats := sim.stats())["by_route"]["/v1/chat/completions"]
        if sum(chat["status_counts"].values()) == chat["received"]:
            return int(stats["processed_total"])
        assert time.monotonic() < deadline, chat
        time.sleep(0.02)


@pytest.mark.parametrize("budget", [[], ["--budget-tokens", "10000000"]],
                         ids=["no-budget", "budget"])
def test_spend_after_several_kill_9s_is_billed_at_least_and_worst_case_at_most(
        sim_factory: Any, tmp_path: Path, budget: list[str]) -> None:
    """Three real kill -9s, each followed by `status`: the job's spend is never below what the
    server billed, and above it only by the worst case of attempts with no outcome in the
    journal; an answer in results.jsonl counts its usage, not its worst case (issue 24)."""
    sim = sim_factory(api_key=API_KEY, latency=0.3)
    rows = [chat_line(i, max_tokens=64) for i in range(240)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url",
            sim.url, "--no-preflight", "-q", "-c", "16", *budget]
    worst = prompt_tokens(rows[0]["body"]) + 64
    for kill in range(3):
        _kill_after(args, out, 40 * (kill + 1))
        billed = _settled(sim)
        got = read_jsonl_tolerant(out / "results.jsonl")
        least = min(usage_total([r]) for r in got)
        fail = read_jsonl_tolerant(out / "failures.jsonl") \
            if (out / "failures.jsonl").exists() else []
        st = orjson.loads(run_cli(["status", str(out), "--json"]).stdout)["spend"]
        assert st["unknown_attempts"] == 0
        # never less than billed: every answer's usage, every other billed request at least
        # the smallest usage seen
        assert st["tokens"] >= usage_total(got) + (billed - len(got)) * least, (kill, billed)
        # at most the answers' usage plus the worst case of every attempt that has none (the
        # cut-off ones, the ambiguous failures of earlier kills): answered attempts are not
        # counted at their worst case
        open_attempts = sim.stats()["received"] - len(got)
        assert st["tokens"] <= usage_total(got) + (open_attempts + 16) * worst, \
            (kill, st["tokens"], usage_total(got), open_attempts, len(fail))
    p = run_cli(args[3:], env=ENV)
    assert p.returncode == 1, p.stderr  # the cut-off requests are ambiguous, not re-sent
    res, fail_by_line = outcomes(out)
    # the worst case as journaled: the estimate, scaled up by the usage seen so far
    worst = max(r.reserved[1] + r.reserved[2] for r in records(out / "journal.jsonl")
                if isinstance(r, DispatchRecord) and r.reserved is not None)
    s = summary(out)["spend"]
    billed = _settled(sim)
    assert s["spent"]["tokens"] >= usage_total(list(res.values())) + (billed - len(res)) * least
    assert s["spent"]["tokens"] <= usage_total(list(res.values())) + len(fail_by_line) * worst
    st = orjson.loads(run_cli(["status", str(out), "--json"]).stdout)["spend"]
    assert st["tokens"] == s["spent"]["tokens"]
    assert sim.stats()["duplicates"] == 0


@pytest.mark.parametrize("fsync", ["interval", "always"])
@pytest.mark.parametrize("budget", [[], ["--budget-tokens", "10000000"]],
                         ids=["no-budget", "budget"])
def test_an_outcome_written_before_a_kill_cut_its_journal_records_counts_as_it_ended(
        sim_factory: Any, tmp_path: Path, budget: list[str], fsync: str) -> None:
    """A kill -9 between a flush's write of results.jsonl (or failures.jsonl) and its write of
    the journal leaves outcomes past the last mark: a resume adopts them, and the spend counts
    an answer at its usage and a 404 at nothing, not at the worst case their dispatch records
    carry (a CI run of the three-kill test above counted answers at their worst case: 5,420
    tokens where usage and the open attempts allow 4,960). Each such state is made exactly: a
    finished run's journal cut at the start of a write, its outputs written (tests/cuts.py);
    `status` must count every answer at its usage, every 404 at nothing and
    every attempt without an outcome at its dispatch record's worst case, to the token."""
    sim = sim_factory(api_key=API_KEY, latency=0.05)
    rows = [chat_line(i, "tm-nope" if i % 5 == 3 else "tm-small", max_tokens=64)
            for i in range(30)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    done = tmp_path / "done"
    p = run(sim.url, inp, done, "-c", "4", "--fsync", fsync, *budget)
    assert p.returncode == 1, p.stderr  # the 404s
    assert len(outcomes(done)[1]) == 6
    ahead = [c for c in cuts.cuts((done / "journal.jsonl").read_bytes()) if c.outputs_ahead]
    assert len(ahead) >= 4, ahead
    for n, cut in enumerate(ahead):
        out = tmp_path / f"cut{n}"
        cuts.make(done, out, cut)
        answered = read_jsonl_tolerant(out / "results.jsonl")
        failed = read_jsonl_tolerant(out / "failures.jsonl") \
            if (out / "failures.jsonl").exists() else []
        got = {r["line"] for r in answered + failed}
        last: dict[int, Any] = {}
        ended: set[int] = set()
        for rec in records(out / "journal.jsonl"):
            if isinstance(rec, DispatchRecord):
                last[rec.line] = rec.reserved
                ended.discard(rec.line)
            elif getattr(rec, "outcome", None) is not None:
                ended.add(rec.line)
        assert got - ended, f"cut {n}: no outcome past the last mark"
        open_worst = sum(r[1] + r[2] for line, r in last.items() if line not in got | ended)
        st = orjson.loads(run_cli(["status", str(out), "--json"]).stdout)["spend"]
        assert st["tokens"] == usage_total(answered) + open_worst, (n, sorted(got - ended))
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--no-preflight",
                 "--progress-interval", "60", "-c", "4", *budget], env=ENV)
    assert p.returncode == 1, p.stderr
    res, _ = outcomes(out)
    assert summary(out)["spend"]["spent"]["tokens"] == \
        usage_total(list(res.values())) + open_worst
