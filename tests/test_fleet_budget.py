"""The job's budget shared by its shards through a real `redis-server` (`--redis` with
`--budget-tokens`): together they never spend past it, even with shards killed -9 and
resumed, and a shard that finishes early leaves its share to the others."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import API_KEY, chat_line, clean_env, read_stderr_until, write_jsonl
from tests.daemons import Redis

pytest.importorskip("redis")

PROMPT, COMPLETION = 3, 9  # what the server bills each answer (worst case reserved: > 16)


def billing_server(serve: Any, latency: float) -> Any:
    """A chat server that counts what it bills the moment it takes a request (a request the
    client is killed waiting for is billed all the same)."""
    billed: list[int] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        billed.append(PROMPT + COMPLETION)
        await asyncio.sleep(latency)
        return web.json_response({
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok " * COMPLETION}}],
            "usage": {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION,
                      "total_tokens": PROMPT + COMPLETION}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = serve(app)
    server.billed = billed
    return server


def shard(i: int, inp: Path, out: Path, url: str, redis: Redis, budget: int,
          *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out / f"s{i}"),
         "--base-url", url, "--no-preflight", "--shard", f"{i}/4", "-c", "4",
         "--redis", redis.url, "--redis-prefix", "budget-job", "--budget-tokens", str(budget),
         "--progress-interval", "0.2", *extra],
        env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Redis(tmp_path).start()
    yield r
    r.stop()


def test_four_shards_killed_and_resumed_never_spend_past_the_shared_budget(
        tmp_path: Path, serve: Any, redis: Redis) -> None:
    server = billing_server(serve, latency=0.15)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(240)])
    out, budget = tmp_path / "out", 1500  # ~125 of the 240 answers
    procs = [shard(i, inp, out, server.url(), redis, budget) for i in range(4)]
    try:
        for p in procs[:2]:
            read_stderr_until(p, b"progress:")  # sending, with attempts in flight
            os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=120)
        assert [p.returncode for p in procs[:2]] == [-signal.SIGKILL] * 2
        assert {p.returncode for p in procs[2:]} <= {0, 6}
        again = [shard(i, inp, out, server.url(), redis, budget) for i in range(2)]
        for p in again:
            _, err = p.communicate(timeout=120)
            assert p.returncode in (0, 6), err.decode()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    billed = sum(server.billed)
    assert billed <= budget  # the server's own count, kills included
    # the shards' own books agree: each shard's spend (its journal's) adds up to the billing
    spent = [orjson.loads((out / f"s{i}" / "summary.json").read_bytes())["spend"]
             for i in range(4)]
    assert sum(s["spent"]["tokens"] for s in spent) >= billed - 4 * 16  # worst cases counted
    # shared, not split: the job used most of it (a static share is 375 tokens a shard)
    assert billed > budget - 4 * 4 * (PROMPT + 16)
    assert any(s["spent"]["tokens"] > budget // 4 for s in spent) or billed > budget * 0.9


def test_a_shard_that_spends_nothing_leaves_its_share_to_the_others(
        tmp_path: Path, serve: Any, redis: Redis) -> None:
    server = billing_server(serve, latency=0.0)
    # shard 0 spends nothing (it never runs): a static share would strand its quarter
    rows = [chat_line(i) for i in range(400)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out, budget = tmp_path / "out", 2400
    procs = [shard(i, inp, out, server.url(), redis, budget) for i in (1, 2, 3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 6), err.decode()[-2000:]
    billed = sum(server.billed)
    assert billed <= budget
    spent = [orjson.loads((out / f"s{i}" / "summary.json").read_bytes())["spend"]["spent"]
             ["tokens"] for i in (1, 2, 3)]
    # shard 0 never ran: its quarter went to the three that did
    assert sum(spent) > 3 * budget // 4
    assert max(spent) > budget // 4


def test_print_config_says_the_budget_is_shared_and_the_share_is_the_fallback(
        tmp_path: Path) -> None:
    from tests.conftest import run_cli

    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--shard", "1/4",
                 "--budget-tokens", "1000", "--redis", "redis://:s3cret@127.0.0.1:1/0",
                 "--redis-prefix", "x", "--print-config"])
    assert p.returncode == 0, p.stderr
    (row,) = [r for r in p.stdout.splitlines() if r.strip().startswith("budget_tokens")]
    assert "250" in row and "shared by its shards through Redis" in row
    assert "1/4 for shard 1/4 while Redis is down" in row
    assert "s3cret" not in p.stdout + p.stderr
