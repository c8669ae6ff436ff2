"""Lanes shared through a real `redis-server` (`--redis`): a pause one process is told of holds
for the others, the pods' paces add up in one schedule, and Redis down or restarted never
blocks a run or loses a line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import chat_line, clean_env, read_stderr_until, write_jsonl
from tests.daemons import Redis, free_port
from tmbatch.limits.controller import PaceConfig
from tmbatch.limits.lanes import LaneKey, make_lane

pytest.importorskip("redis")
from tmbatch.limits.shared import RedisLanes


def lane(model: str = "m", rpm: float | None = None):  # type: ignore[no-untyped-def]
    return make_lane(LaneKey("http://x", model), PaceConfig(), rpm, rpm is None, "")


@pytest.fixture
def redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Redis(tmp_path).start()
    yield r
    r.stop()


def test_a_retry_after_one_process_is_told_holds_for_the_others(redis: Redis) -> None:
    async def main() -> None:
        a, b = RedisLanes(redis.url, "job1"), RedisLanes(redis.url, "job1")
        other = RedisLanes(redis.url, "job2")  # another job's lanes are its own
        la, lb, lo = lane(), lane(), lane()
        loop = asyncio.get_running_loop()
        try:
            assert await b.take(lb, loop.time()) == 0.0  # nothing announced: go
            a.announce(la, 5.0)
            await asyncio.gather(*a._tasks)
            wait = await b.take(lb, loop.time())
            assert 4.0 < wait <= 5.0  # Redis's clock: what is left of the window
            assert lb.pause_until > loop.time() + 4.0  # b's lane is paused too
            assert await other.take(lo, loop.time()) == 0.0
            assert await b.take(lane("n"), loop.time()) == 0.0  # another model's lane
        finally:
            for s in (a, b, other):
                await s.close()

    asyncio.run(main())


def test_the_pods_paces_add_up_in_one_schedule(redis: Redis) -> None:
    async def main() -> None:
        a, b = RedisLanes(redis.url, "pace"), RedisLanes(redis.url, "pace")
        la, lb = lane(rpm=30.0), lane(rpm=30.0)  # 0.5 req/s each: 1 a second together
        loop = asyncio.get_running_loop()
        try:
            waits = [await s.take(x, loop.time()) for s, x in ((a, la), (b, lb), (a, la))]
            # a alone books its slot 2 s long; with b's pace added the schedule runs at 1 a
            # second and 2 slots ahead at most: b goes, the third waits ~1 s (at a's pace
            # alone, 2 s a slot and 4 s ahead, it would go)
            assert waits[:2] == [0.0, 0.0]
            assert 0.5 < waits[2] <= 1.0
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_redis_unreachable_is_one_warning_and_never_a_wait(caplog: pytest.LogCaptureFixture,
                                                           ) -> None:
    async def main() -> None:
        s = RedisLanes(f"redis://127.0.0.1:{free_port()}/0", "down")
        la = lane()
        loop = asyncio.get_running_loop()
        try:
            for _ in range(3):
                assert await s.take(la, loop.time()) == 0.0
            s.announce(la, 2.0)  # down: not even tried until RETRY has passed
            assert not s._tasks
        finally:
            await s.close()

    asyncio.run(main())
    assert sum("does not answer" in r.getMessage() for r in caplog.records) == 1


def test_redis_killed_and_restarted_mid_run_loses_no_line(tmp_path: Path, sim) -> None:  # type: ignore[no-untyped-def]
    redis = Redis(tmp_path).start()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(300)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url",
         sim.url, "--no-preflight", "--rpm", "3000", "-c", "4", "--redis", redis.url,
         "--redis-prefix", "killed", "--progress-interval", "0.2"],
        env=clean_env(TENSORMESH_INFERENCE_API_KEY="tm-test-key-0123456789abcdef-SECRET"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_stderr_until(proc, b"progress:")  # sending
        redis.kill()
        read_stderr_until(proc, b"does not answer")
        redis.start()  # the same port again
        _, err = proc.communicate(timeout=120)
    finally:
        redis.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["counts"]["succeeded"] == 300
    ids = [orjson.loads(x)["custom_id"] for x in (out / "results.jsonl").read_bytes().split(
        b"\n") if x]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(300))  # each exactly once
    assert sim.stats()["duplicates"] == 0  # nothing billed twice


def test_a_refusal_that_lands_during_the_fleet_check_holds_the_send(redis: Redis) -> None:
    """The fleet's say is the last check before a send, and it is a round trip: a refusal
    of this process's that arrives meanwhile pauses the lane, and the send waits it out."""
    from tests.test_limits import refusal, req
    from tmbatch.limits.admission import Admission

    async def main() -> None:
        store = RedisLanes(redis.url, "recheck")
        adm = Admission(concurrency=4)
        adm.shared = store
        try:
            first = await adm.permit(req()).__aenter__()  # nothing announced: it goes
            real, paused_until = store.take, []

            async def take(lane, now):  # type: ignore[no-untyped-def]
                wait = await real(lane, now)  # Redis says go ...
                if not paused_until:  # ... while the first attempt's 429 lands
                    first.failed(refusal({"Retry-After": "1"}))
                    paused_until.append(lane.pause_until)
                return wait

            store.take = take  # type: ignore[method-assign]
            second = await adm.permit(req(line=2)).__aenter__()
            assert paused_until and paused_until[0] > first.sent_at
            assert second.sent_at >= paused_until[0]  # not inside the window it was told of
        finally:
            await store.close()

    asyncio.run(main())
