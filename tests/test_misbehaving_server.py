"""Servers that answer badly: each answer lands in the right class, with a clear message,
and the run goes on with the other lines.

The server is a real aiohttp app on 127.0.0.1 in a thread; what it does for a line is
chosen by the line's `metadata.mode`, so one run covers every misbehaviour at once.

Decision recorded here (and in docs/safety-contract.md): a 2xx whose body is a JSON object but
lacks the expected fields (a chat answer without `choices`) is a **success**. The
server accepted, processed and billed the request; the record keeps exactly what it
said. Calling it ambiguous would invite a re-send that pays twice for the same
answer, and tmbatch does not second-guess response schemas it does not own (they
differ across routes and server versions). A 2xx body that is not a JSON object at
all is `ambiguous` / invalid_response_body: the work may have been done, but there
is no answer to keep.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import (
    API_KEY,
    AppThread,
    chat_answer,
    chat_line,
    clean_env,
    read_jsonl,
    run_cli,
    write_jsonl,
)
from tmbatch.policy import MAX_RETRY_AFTER, parse_retry_after

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the misbehaving server ------------------------------------------------------------

HUGE = 70 * 1024 * 1024  # over client.MAX_BODY_BYTES (64 MiB)
BIG_OK = 3 * 1024 * 1024
A_YEAR = 365 * 24 * 3600


def misbehaving_app(seen: dict[str, int]) -> web.Application:
    """One handler, many faults; `seen` counts arrivals per mode (retries show up there)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = body.get("metadata", {}).get("mode", "ok")
        seen[mode] = seen.get(mode, 0) + 1
        if mode == "ok":
            return web.json_response(chat_answer(f"r-{seen[mode]}"))
        if mode == "not_json":
            return web.Response(status=200, text="<html>gateway says hi</html>",
                                content_type="text/html")
        if mode == "json_array":
            return web.json_response([1, 2, 3])
        if mode == "no_choices":
            return web.json_response({"id": "x", "object": "chat.completion"})
        if mode == "big_ok":  # legal, but spans many TCP reads
            big = chat_answer("big")
            big["choices"][0]["message"]["content"] = "y" * BIG_OK
            return web.json_response(big)
        if mode in ("huge_declared", "huge_chunked"):
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            if mode == "huge_declared":
                resp.content_length = HUGE
            await resp.prepare(request)
            chunk = b" " * (1 << 20)
            try:
                for _ in range(HUGE // len(chunk)):
                    await resp.write(chunk)
            except (ConnectionResetError, RuntimeError):
                pass  # the client hung up once it had seen enough: that is the point
            return resp
        if mode.startswith("retry_after_"):  # 429 with a hostile Retry-After, then fine
            if seen[mode] == 1:
                value = {"retry_after_negative": "-30", "retry_after_garbage": "soon-ish",
                         "retry_after_year": str(A_YEAR)}[mode]
                return web.json_response({"error": {"message": "slow down"}}, status=429,
                                         headers={"Retry-After": value})
            return web.json_response(chat_answer("after-429"))
        if mode == "hang":
            await asyncio.sleep(3600)  # accept, read, never answer
        raise AssertionError(mode)

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/chat/completions", handle)
    return app


def test_retry_after_parsing_is_bounded() -> None:
    """Negative and garbage count as absent; a year (seconds or a date) is capped."""
    assert parse_retry_after({"Retry-After": "-30"}) is None
    assert parse_retry_after({"Retry-After": "soon-ish"}) is None
    assert parse_retry_after({"Retry-After": "nan"}) is None
    assert parse_retry_after({"Retry-After": "inf"}) is None
    assert parse_retry_after({"Retry-After": str(A_YEAR)}) == MAX_RETRY_AFTER
    assert parse_retry_after({"Retry-After": "Fri, 31 Dec 2100 23:59:59 GMT"}) == MAX_RETRY_AFTER
    assert parse_retry_after({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after-ms": "-5", "Retry-After": "2"}) == 2.0
    assert parse_retry_after({"Retry-After": "1.5"}) == 1.5


def test_a_retry_after_date_counts_in_the_servers_clock() -> None:
    """A date is in the server's clock: counted from this machine's clock while the answer's
    Date agrees with it (to its whole second), else from that Date: a clock 30 s ahead would
    otherwise send at once, inside the window, and one 30 s behind would wait 32 s."""
    date = {"Retry-After": formatdate(1_000_002, usegmt=True),
            "Date": formatdate(1_000_000, usegmt=True)}
    assert parse_retry_after(date, now=1_000_000.3) == pytest.approx(1.7)  # clocks agree
    assert parse_retry_after(date, now=1_000_030.3) == 2.0  # this clock ahead: the Date's
    assert parse_retry_after(date, now=999_970.3) == 2.0  # behind: no longer than it can be
    no_date = {"Retry-After": date["Retry-After"]}
    assert parse_retry_after(no_date, now=1_000_030.3) == 0.0  # nothing to tell: this clock
    garbled = {**date, "Date": "yesterday"}
    assert parse_retry_after(garbled, now=1_000_000.3) == pytest.approx(1.7)


def test_a_server_whose_clock_is_behind_is_not_sent_to_inside_its_window(
        serve: Callable[..., AppThread], tmp_path: Path) -> None:
    """Over a real socket, a server 40 s behind this machine refuses the first request with
    Retry-After as a date in its own clock (1 to 2 s on) and its own Date: the retry arrives
    after that window, not at once (this clock would say the date passed 38 s ago)."""
    arrivals: list[float] = []
    window_end: list[float] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        arrivals.append(time.time())
        if len(arrivals) == 1:
            server_now = time.time() - 40.0
            until = math.ceil(server_now + 1.0)
            window_end.append(time.time() + (until - server_now))
            return web.json_response(
                {"error": {"message": "slow down", "type": "rate_limit"}}, status=429,
                headers={"Retry-After": formatdate(until, usegmt=True),
                         "Date": formatdate(math.floor(server_now), usegmt=True)})
        return web.json_response(chat_answer("ok-1"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    server = serve(app)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", server.url(),
                 "--no-preflight", "--log-format", "json"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert p.returncode == 0, p.stderr
    assert len(arrivals) == 2 and arrivals[1] >= window_end[0], (arrivals, window_end)
    pauses = [orjson.loads(x) for x in p.stderr.splitlines() if '"rate_limit_pause"' in x]
    assert pauses and 1.0 <= pauses[0]["retry_after"] <= 2.0, p.stderr


def test_misbehaving_server_run(serve: Callable[..., AppThread], tmp_path: Path) -> None:
    seen: dict[str, int] = {}
    server = serve(misbehaving_app(seen))
    modes = ["ok", "not_json", "json_array", "no_choices", "huge_declared", "huge_chunked",
             "big_ok", "retry_after_negative", "retry_after_garbage", "hang", "ok"]
    rows = [chat_line(i, metadata={"mode": m}) for i, m in enumerate(modes)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    proc = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url(),
                    "--no-preflight", "--timeout", "2", "--max-retries", "2", "-q"],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    results = {r["line"]: r for r in read_jsonl(out / "results.jsonl")}
    failures = {f["line"]: f for f in read_jsonl(out / "failures.jsonl")}
    by_mode = {m: (results.get(i + 1), failures.get(i + 1)) for i, m in enumerate(modes)}
    assert len(results) + len(failures) == len(modes)  # one outcome each, the run went on

    def failed(mode: str) -> dict[str, Any]:
        res, fail = by_mode[mode]
        assert res is None and fail is not None, mode
        return fail["error"]

    assert by_mode["ok"][0] is not None and results[len(modes)]["response"]["status_code"] == 200
    err = failed("not_json")
    assert (err["class"], err["code"]) == ("ambiguous", "invalid_response_body")
    assert "not a JSON object" in err["message"] and "gateway says hi" in err["message"]
    err = failed("json_array")
    assert (err["class"], err["code"]) == ("ambiguous", "invalid_response_body")
    kept = by_mode["no_choices"][0]
    assert kept is not None, "a 2xx JSON object is what the server said: a success"
    assert kept["response"]["body"] == {"id": "x", "object": "chat.completion"}
    for mode in ("huge_declared", "huge_chunked"):
        err = failed(mode)
        assert (err["class"], err["code"]) == ("ambiguous", "response_too_large")
        assert "over 67108864 bytes" in err["message"]
    big = by_mode["big_ok"][0]
    assert big is not None, by_mode["big_ok"][1]
    assert len(big["response"]["body"]["choices"][0]["message"]["content"]) == BIG_OK
    for mode in ("retry_after_negative", "retry_after_garbage"):
        assert by_mode[mode][0] is not None, f"{mode}: 429 is retried, the pause is not absurd"
        assert seen[mode] == 2
    err = failed("hang")
    assert (err["class"], err["code"]) == ("ambiguous", "read_timeout")
    assert "timeout" in err["message"]
    # ambiguous answers to a billed route are never sent twice automatically
    for mode in ("not_json", "json_array", "huge_declared", "huge_chunked", "hang",
                 "no_choices"):
        assert seen[mode] == 1, mode
    assert orjson.loads((out / "summary.json").read_bytes())["counts"]["failed"] == 5


def test_retry_after_a_year_is_capped(serve: Callable[..., AppThread], tmp_path: Path) -> None:
    """A Retry-After of a year pauses MAX_RETRY_AFTER, not a year; SIGTERM during the pause
    stops cleanly and the refused line is sent on resume (429: nothing was processed)."""
    seen: dict[str, int] = {}
    server = serve(misbehaving_app(seen))
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1, metadata={"mode": "retry_after_year"})])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url",
           server.url(), "--no-preflight", "--drain-timeout", "1"]
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    lines = []
    try:
        assert proc.stderr is not None
        for text in proc.stderr:
            lines.append(text)
            if "Retry-After" in text:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(lines)
    assert f"pauses {MAX_RETRY_AFTER:.1f}s" in stderr, stderr
    assert proc.returncode == 143, stderr
    assert seen["retry_after_year"] == 1 and read_jsonl(out / "results.jsonl") == []
    # the 429'd line is pending, not ambiguous; the window is journaled, and a resume honours
    # what is left of it (tests/test_stops.py resumes through a short one)
    journal = read_jsonl(out / "journal.jsonl")
    assert ["o", 1, "pending", ""] in journal
    assert any(r[0] == "p" and r[2] == MAX_RETRY_AFTER for r in journal if isinstance(r, list))
    status = orjson.loads(run_cli(["status", str(out), "--json"]).stdout)
    assert status["not_yet_sent"] == 1 and status["failed"] == 0
