"""--timeout: every request's whole answer is due within it, kept by one sweep (`run.inflight`).

The run's session arms no aiohttp timer per request; the runner's poll cancels what is
overdue. These check it against a real server on 127.0.0.1 that hangs before answering and in
the middle of a stream, and the sweep's rules on real asyncio tasks: its cancellation becomes
`read_timeout` (ambiguous, never sent again on its own), anyone else's stays a cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

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
from tmbatch.policy import Outcome
from tmbatch.run.inflight import InFlight


def stalling_app(arrived: dict[str, list[float]]) -> web.Application:
    """`metadata.mode`: ok, slow (0.4 s, under the timeout), hang (never answers), stall (a
    stream that sends two chunks and then nothing)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = body["metadata"]["mode"]
        arrived.setdefault(mode, []).append(time.monotonic())
        if mode == "slow":
            await asyncio.sleep(0.4)
        if mode in ("ok", "slow"):
            return web.json_response(chat_answer(mode))
        if mode == "hang":
            await asyncio.sleep(3600)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("Tea ", "is "):
            chunk = {"id": "s", "object": "chat.completion.chunk", "model": "tm-small",
                     "choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await asyncio.sleep(3600)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    return app


def test_an_answer_past_the_timeout_is_cut_off_once_and_not_sent_again(
        serve: Callable[..., AppThread], tmp_path: Path) -> None:
    arrived: dict[str, list[float]] = {}
    server = serve(stalling_app(arrived))
    modes = ["ok", "hang", "slow", "stall", "ok"]
    rows = [chat_line(i, metadata={"mode": m}, **({"stream": True} if m == "stall" else {}))
            for i, m in enumerate(modes)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url(), "--no-preflight",
                 "--timeout", "1", "--max-retries", "3", "-c", "4", "-q"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY), timeout=60)
    ended = time.monotonic()
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    ok = {r["line"] for r in read_jsonl(out / "results.jsonl")}
    assert ok == {1, 3, 5}, "answers within the timeout are kept, the slow one too"
    failed = {f["line"]: f["error"] for f in read_jsonl(out / "failures.jsonl")}
    assert set(failed) == {2, 4}
    for line in (2, 4):
        assert (failed[line]["class"], failed[line]["code"]) == (Outcome.AMBIGUOUS.value,
                                                                 "read_timeout")
    # ambiguous: each was sent once, and cut off no sooner than the timeout
    assert len(arrived["hang"]) == 1 and len(arrived["stall"]) == 1
    assert ended - max(arrived["hang"][0], arrived["stall"][0]) >= 1.0


async def _hung(flight: InFlight, outcome: list[object]) -> None:
    """A worker's send that never gets its answer: what `LineSender.process` does with it."""
    task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
    flight.add(task, asyncio.get_running_loop().time())
    try:
        await asyncio.get_running_loop().create_future()
    except asyncio.CancelledError as caught:
        outcome.append(flight.failure(caught, task))
    finally:
        flight.discard(task)


def test_the_sweep_cuts_off_only_what_is_overdue_as_a_timeout() -> None:
    async def main() -> None:
        flight, cut, kept = InFlight(0.05), [], []
        late = asyncio.create_task(_hung(flight, cut))
        await asyncio.sleep(0.1)
        young = InFlight(60.0)
        fresh = asyncio.create_task(_hung(young, kept))
        await asyncio.sleep(0)
        assert late in flight and fresh in young and len(flight) == 1
        now = asyncio.get_running_loop().time()
        assert young.sweep(now) == 0 and flight.sweep(now) == 1
        await late
        assert len(cut) == 1 and late not in flight
        assert (cut[0].cls, cut[0].code) == (Outcome.AMBIGUOUS, "read_timeout")  # type: ignore
        assert late.cancelling() == 0, "the timeout is the attempt's failure, not a cancel"
        fresh.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fresh  # a cancellation that is not the sweep's goes on
        assert kept == []

    asyncio.run(main())


def test_a_stop_that_cancels_a_swept_request_too_is_still_a_cancellation() -> None:
    async def main() -> None:
        flight, seen = InFlight(0.0), []
        task = asyncio.create_task(_hung(flight, seen))
        await asyncio.sleep(0)
        flight.sweep(asyncio.get_running_loop().time() + 1)
        task.cancel()  # the runner's, at the end of a drain
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == []

    asyncio.run(main())
