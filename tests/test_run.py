"""`tmbatch run` end to end over real sockets: every route, both surfaces, and the safety
contract measured on the server side (what the simulator actually received and processed)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    clean_env,
    journal_records,
    keyed_env,
    outcomes,
    read_jsonl,
    run_cli,
    write_jsonl,
)
from tmbatch.client.http import idempotency_key
from tmbatch.sim import SimConfig, start_sim

JOB = "testjob0001"
USER = "0b7e4c1e-2f6d-4a8e-9a1c-3d5b6e7f8a90"


def run(sim: Any, inp: Path, out: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(
        # Preflight has its own tests: here the server must see only the batch itself.
        ["run", str(inp), "-o", str(out), "--base-url", sim.url, "--job-id", JOB, "-q",
         "--no-preflight", *args],
        env=env or keyed_env(), timeout=timeout,
    )


def key(cid: str) -> str:
    return idempotency_key(JOB, cid)


def test_every_route_serverless_end_to_end(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    rows = [
        chat_line(1),
        {"custom_id": "cmp", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tm-small", "prompt": "Once upon a time", "max_tokens": 8}},
        {"custom_id": "rsp", "method": "POST", "url": "/v1/responses",
         "body": {"model": "tm-large", "input": "Say hi", "max_output_tokens": 8}},
        {"custom_id": "tok", "method": "POST", "url": "/tokenize",
         "body": {"model": "tm-small", "prompt": "three small words"}},
        {"custom_id": "detok", "method": "POST", "url": "/detokenize",
         "body": {"model": "tm-small", "tokens": [1, 2, 3]}},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim, inp, out)
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(out)
    assert fail == {}
    assert set(res) == {"req-1", "cmp", "rsp", "tok", "detok"}
    assert res["req-1"]["response"]["body"]["object"] == "chat.completion"
    assert res["cmp"]["response"]["body"]["object"] == "text_completion"
    assert res["rsp"]["response"]["body"]["object"] == "response"
    assert res["tok"]["response"]["body"]["count"] == 3
    assert "prompt" in res["detok"]["response"]["body"]
    for r in res.values():  # the OpenAI Batch output shape
        assert set(r) >= {"id", "custom_id", "response", "error"}
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["request_id"]
    stats = sim.stats()
    assert stats["auth"]["bearer_ok"] == 5 and stats["auth"]["bearer_wrong"] == 0
    assert stats["auth"]["user_ids"] == []  # serverless never sends X-User-Id
    # Billed routes carry a stable Idempotency-Key; the idempotent ones need none.
    assert {key("req-1"), key("cmp"), key("rsp")} <= set(stats["processed"])
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["counts"]["succeeded"] == 5
    assert summary["this_run"]["tokens"]["total"] > 0
    assert summary["this_run"]["latency_ms"]["p50"] is not None


def test_on_demand_sends_user_id_on_every_request(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY, user_id=USER)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(6)])
    out = tmp_path / "out"
    p = run_cli(
        ["run", str(inp), "-o", str(out), "--surface", "on-demand", "-q", "--no-preflight"],
        env=keyed_env(TENSORMESH_ON_DEMAND_BASE_URL=sim.url,
                         TENSORMESH_ON_DEMAND_USER_ID=USER),
    )
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(out)
    assert len(res) == 6 and not fail
    stats = sim.stats()
    assert stats["auth"]["user_ids"] == [USER]
    assert stats["auth"]["bearer_ok"] == 6


def test_bare_bodies_with_endpoint_and_model_fill(sim: Any, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(3)]
    rows.append({"model": "tm-large", "messages": [{"role": "user", "content": "x"}]})
    inp = write_jsonl(tmp_path / "bare.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim, inp, out, "--endpoint", "chat", "--model", "tm-small")
    assert p.returncode == 0, p.stderr
    res, _ = outcomes(out)
    assert set(res) == {"line-1", "line-2", "line-3", "line-4"}
    assert res["line-1"]["response"]["body"]["model"] == "tm-small"
    assert res["line-4"]["response"]["body"]["model"] == "tm-large"  # kept, not overwritten


def _retry_after_case(sim_factory: Any, tmp_path: Path, fmt: str) -> None:
    sim = sim_factory(retry_after_format=fmt)
    rows = [chat_line(i) for i in range(30)]
    rows[5]["body"]["sim"] = {"status": 429, "times": 1, "retry_after": 2}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim, inp, out, "--concurrency", "4")
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(out)
    assert len(res) == 30 and not fail  # every line still answered
    stats = sim.stats()
    assert stats["rejected_429"] == 1
    assert stats["retry_after_violations"] == 0
    t429 = next(e[0] for e in stats["log"] if e[3] == 429)
    later = [e[0] - t429 for e in stats["log"] if e[0] > t429]
    # Only requests already in flight when the 429 left may arrive just after it; then
    # nothing until the window closes, and the rest of the batch after it.
    inside = [d for d in later if 0.25 < d < 2.0]
    assert inside == []
    assert any(d >= 2.0 for d in later)
    assert stats["duplicates"] == 0


def test_429_retry_after_seconds_pauses_every_worker(sim_factory: Any, tmp_path: Path) -> None:
    _retry_after_case(sim_factory, tmp_path, "seconds")


def test_429_retry_after_http_date_pauses_every_worker(sim_factory: Any, tmp_path: Path) -> None:
    _retry_after_case(sim_factory, tmp_path, "http-date")


def test_ambiguous_failures_are_never_resent(sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(i) for i in range(12)]
    rows[2]["body"]["sim"] = {"status": 500}
    rows[4]["body"]["sim"] = {"drop": True}
    rows[6]["body"]["sim"] = {"sleep": 5}
    rows[8]["body"]["sim"] = {"status": 502}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim, inp, out, "--timeout", "1", "--max-retries", "5")
    assert p.returncode == 1, p.stderr
    res, fail = outcomes(out)
    assert len(res) == 8
    assert set(fail) == {"req-2", "req-4", "req-6", "req-8"}
    codes = {cid: f["error"]["code"] for cid, f in fail.items()}
    assert codes == {"req-2": "http_500", "req-4": "server_disconnected",
                     "req-6": "read_timeout", "req-8": "http_502"}
    for f in fail.values():
        assert f["error"]["class"] == "ambiguous"
        assert f["attempts"] == 1
        assert isinstance(f["line"], int)
    assert fail["req-2"]["response"]["status_code"] == 500
    processed = sim.stats()["processed"]
    for cid in fail:
        assert processed[key(cid)] == 1, cid  # received exactly once: nothing re-sent
    assert sim.stats()["duplicates"] == 0


def test_idempotent_route_may_retry_ambiguous(sim: Any, tmp_path: Path) -> None:
    rows = [{"custom_id": "t1", "method": "POST", "url": "/tokenize",
             "body": {"model": "tm-small", "prompt": "a b", "sim": {"drop": True, "times": 1}}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim, inp, out)
    assert p.returncode == 0, p.stderr
    res, _ = outcomes(out)
    assert res["t1"]["response"]["body"]["count"] == 2
    assert sim.stats()["by_route"]["/tokenize"]["received"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_retried_until_the_server_comes_up(tmp_path: Path) -> None:
    port = _free_port()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "-q",
         "--base-url", f"http://127.0.0.1:{port}", "--max-retries", "10", "--job-id", JOB,
         "--no-preflight"],  # preflight stops at a refused port (test_preflight_unreachable)
        env=keyed_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # the first attempts find nobody listening: wait until one has been retried
    deadline = time.monotonic() + 30
    while not any(r[2] >= 2 for r in journal_records(out, "d")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no attempt was retried"
        time.sleep(0.02)
    assert proc.poll() is None
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        async def boot() -> None:
            holder["srv"] = await start_sim(SimConfig(), port=port)
            ready.set()
        loop.run_until_complete(boot())
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        res, fail = outcomes(out)
        assert len(res) == 5 and not fail
        journal = read_jsonl(out / "journal.jsonl")
        attempts = [r for r in journal if isinstance(r, list) and r[0] == "d"]
        assert len(attempts) > 5  # some attempts were refused and retried
        stats = holder["srv"].stats()
        assert stats["duplicates"] == 0 and stats["processed_keys"] == 5
    finally:
        asyncio.run_coroutine_threadsafe(holder["srv"].stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def test_401_stops_the_run_early(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key="tm-the-right-key-0000000000000000", latency=0.05)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(200)])
    out = tmp_path / "out"
    p = run(sim, inp, out, "--concurrency", "4")
    assert p.returncode == 3, p.stderr
    assert "TENSORMESH_INFERENCE_API_KEY" in p.stderr
    assert API_KEY not in p.stderr and API_KEY not in p.stdout
    stats = sim.stats()
    assert 1 <= stats["completion_calls"] <= 4
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["stopped"] == "fatal" and "401" in summary["fatal"]


def test_unknown_model_everywhere_fails_its_lines_unsent(sim: Any, tmp_path: Path) -> None:
    """Without preflight: after 8 404s on (route, model) and no answer, the other lines of
    that pair fail `permanent` without being sent (a final outcome: no resume sends them
    again and stops again)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, model="no-such") for i in range(100)])
    out = tmp_path / "out"
    p = run(sim, inp, out, "--concurrency", "2")
    assert p.returncode == 1, p.stderr
    assert "`tmbatch models` lists served models" in p.stderr
    _, fail = outcomes(out)
    assert len(fail) == 100 and {f["error"]["class"] for f in fail.values()} == {"permanent"}
    assert {f["error"]["code"] for f in fail.values()} == {"not_found", "not_served"}
    assert sim.stats()["completion_calls"] < 20


def test_bad_lines_are_failures_and_good_lines_are_answered(sim: Any, tmp_path: Path) -> None:
    good = [chat_line(i) for i in range(4)]
    lines: list[Any] = [
        good[0],
        b"{not json",
        b"[1, 2, 3]",
        b'"a string"',
        {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "tm-small"}},
        {"custom_id": 7, "method": "POST", "url": "/v1/chat/completions", "body": {}},
        {"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}},
        {"custom_id": "g", "method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}},
        {"custom_id": "h", "method": "POST", "url": "https://evil.example/v1/chat/completions",
         "body": {"model": "m"}},
        good[1],
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": [1]},
        {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m"}, "extra": 1},
        {**good[0]},  # duplicate custom_id of line 1
        {"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tm-small", "stream": "yes"}},
        {"custom_id": "uuid", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "123e4567-e89b-12d3-a456-426614174000"}},
        b"",
        {"custom_id": "nomodel", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        good[2],
        b"\xff\xfe not utf8",
        good[3],
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    p = run(sim, inp, out)
    assert p.returncode == 1, p.stderr
    res, _ = outcomes(out)
    assert set(res) == {"req-0", "req-1", "req-2", "req-3"}
    fails = {f["line"]: f for f in read_jsonl(out / "failures.jsonl")}
    expected = {
        2: "invalid_json", 3: "not_an_object", 4: "not_an_object", 5: "invalid_custom_id",
        6: "invalid_custom_id", 7: "unsupported_url", 8: "invalid_method", 9: "invalid_url",
        11: "invalid_body", 12: "unknown_field", 13: "duplicate_custom_id",
        14: "invalid_stream", 15: "model_is_uuid", 17: "missing_model", 19: "invalid_utf8",
    }
    assert {line: f["error"]["code"] for line, f in fails.items()} == expected
    for line, f in fails.items():
        assert f["error"]["class"] == "permanent"
        assert f"line {line}" in f["error"]["message"]
        assert f["attempts"] == 0 and f["response"] is None
    assert sim.stats()["completion_calls"] == 4
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["blank_lines_skipped"] == 1
    assert summary["counts"]["failed_by_class"]["permanent"] == len(expected)


def test_validate_checks_without_sending(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1), b"{oops", chat_line(2)])
    p = run_cli(["validate", str(inp)])
    assert p.returncode == 1
    assert f"{inp}:2: invalid_json" in p.stdout
    assert "3 lines, 2 valid" in p.stdout
    ok = write_jsonl(tmp_path / "ok.jsonl", [chat_line(1)])
    assert run_cli(["validate", str(ok)]).returncode == 0


def test_no_key_and_no_sim_says_how_to_fix(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out")])
    assert p.returncode == 2
    assert "TENSORMESH_INFERENCE_API_KEY" in p.stderr and "--sim" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_sim_demo_needs_no_credentials(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_cli(["run", str(ROOT / "samples" / "chat.jsonl"), "-o", str(out), "--sim"])
    assert p.returncode == 0, p.stderr
    assert "done: 10 lines: 10 succeeded" in p.stderr
    res, _ = outcomes(out)
    assert len(res) == 10


def test_help_documents_exit_codes_and_examples() -> None:
    p = run_cli(["run", "--help"])
    assert p.returncode == 0
    for needle in ("exit codes:", "130", "143", "examples:", "--sim", "--rpm", "--tpm"):
        assert needle in p.stdout


def test_missing_input_is_one_clear_line_and_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_cli(["run", str(tmp_path / "nope.jsonl"), "-o", str(out), "--sim"])
    assert p.returncode == 2
    assert "no such file" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_event_loop_choice(tmp_path: Path) -> None:
    """uvloop when installed (the test extra has it), the standard loop on request."""
    sample = str(ROOT / "samples" / "chat.jsonl")
    for loop in ("asyncio", "uvloop"):
        out = tmp_path / loop
        p = run_cli(["run", sample, "-o", str(out), "--sim", "-q"],
                    env=clean_env(TMBATCH_LOOP=loop))
        assert p.returncode == 0, p.stderr
        assert len(read_jsonl(out / "results.jsonl")) == 10
    p = run_cli(["run", sample, "-o", str(tmp_path / "x"), "--sim"],
                env=clean_env(TMBATCH_LOOP="tokio"))
    assert p.returncode == 2 and "TMBATCH_LOOP" in p.stderr


# Run in the tmbatch process: every write of request bytes to a socket first reads
# journal.jsonl from disk and counts that line's dispatch records (one per attempt so far).
WIRE_SPY = """
import asyncio.selector_events as se, re, sys, orjson
journal, problems, keys = sys.argv[1], sys.argv[2], orjson.loads(open(sys.argv[3], "rb").read())
seen = {}
write = se._SelectorSocketTransport.write
def spy(self, data):
    m = re.search(rb"Idempotency-Key: ([^\\r]+)", bytes(data), re.I)
    if m:
        cid = keys[m.group(1).decode()]
        seen[cid] = seen.get(cid, 0) + 1
        with open(journal, "rb") as f:
            n = sum(1 for raw in f if raw.startswith(b'["d"') and orjson.loads(raw)[3] == cid)
        if n < seen[cid]:
            with open(problems, "a") as f:
                f.write(f"{cid}: attempt {seen[cid]} on the wire, {n} journaled\\n")
    return write(self, data)
se._SelectorSocketTransport.write = spy
from tmbatch.cli.main import main
sys.exit(main(sys.argv[4:]))
"""


def test_every_attempt_is_journaled_before_its_bytes_leave(sim: Any, tmp_path: Path) -> None:
    """At the socket: when an attempt's bytes are handed to the transport, its dispatch record
    is already in journal.jsonl on disk (a write(2) done, not a buffer), for first attempts
    and for retries after a 429 (whose `pending` record goes first), at concurrency 16."""
    n = 120
    rows = [chat_line(i) for i in range(n)]
    for row in rows[::7]:
        row["body"]["sim"] = {"status": 429, "retry_after": 0, "times": 1}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out, problems = tmp_path / "out", tmp_path / "problems.txt"
    keys = tmp_path / "keys.json"
    keys.write_bytes(orjson.dumps({key(f"req-{i}"): f"req-{i}" for i in range(n)}))
    p = subprocess.run(
        [sys.executable, "-c", WIRE_SPY, str(out / "journal.jsonl"), str(problems), str(keys),
         "run", str(inp), "-o", str(out), "--base-url", sim.url, "--job-id", JOB, "-q",
         "--no-preflight", "-c", "16"],
        env=keyed_env(TMBATCH_LOOP="asyncio"), cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert p.returncode == 0, p.stderr
    assert not problems.exists(), problems.read_text()[:500]
    res, fail = outcomes(out)
    assert len(res) == n and not fail
    journal = read_jsonl(out / "journal.jsonl")
    assert sum(1 for r in journal if isinstance(r, list) and r[0] == "d") == n + len(rows[::7])
    for i in range(0, n, 7):  # a refused line: its `pending` before its second dispatch
        line = i + 1
        seq = [r[0] + (r[2] if r[0] == "o" else str(r[2])) for r in journal
               if isinstance(r, list) and r[0] in ("d", "o") and r[1] == line]
        assert seq == ["d1", "opending", "d2", "ook"], (line, seq)
