"""The smallest honest aiohttp loop doing what `tmbatch run` does: the lower bound of this stack.

One session, a semaphore, orjson, results appended to a file. It reads the input
lazily (memory bounded by the semaphore), streams when a body asks for it and
joins the deltas, and on a 429 waits Retry-After and tries again. No journal, no
safety classes, no retries beyond 429: everything tmbatch adds costs CPU measured
against this.

    python bench/bare_aiohttp.py INPUT OUTPUT BASE_URL CONCURRENCY [--rps R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any, BinaryIO

import aiohttp
import orjson
from aiolimiter import AsyncLimiter


async def one(session: aiohttp.ClientSession, raw: bytes, out: BinaryIO,
              limiter: AsyncLimiter | None, counts: dict[str, int]) -> None:
    line = orjson.loads(raw)
    body: dict[str, Any] = line["body"]
    data = orjson.dumps(body)
    for _ in range(20):
        if limiter is not None:
            await limiter.acquire()
        async with session.post(line["url"], data=data,
                                headers={"Content-Type": "application/json"}) as resp:
            if resp.status == 429:
                counts["429"] += 1
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            if body.get("stream"):
                parts: list[str] = []
                last: dict[str, Any] = {}
                async for ln in resp.content:
                    if ln.startswith(b"data: ") and not ln.startswith(b"data: [DONE]"):
                        last = orjson.loads(ln[6:])
                        for c in last.get("choices", ()):
                            parts.append(c.get("delta", {}).get("content") or "")
                result: Any = {**last, "content": "".join(parts)}
            else:
                result = orjson.loads(await resp.read())
            status = resp.status
        counts["ok" if status == 200 else "failed"] += 1
        out.write(orjson.dumps({"custom_id": line["custom_id"],
                                "response": {"status_code": status, "body": result}}) + b"\n")
        return
    counts["failed"] += 1


async def main(inp: str, outp: str, base_url: str, concurrency: int, rps: float | None) -> None:
    sem = asyncio.Semaphore(concurrency)
    limiter = AsyncLimiter(rps, 1.0) if rps else None
    counts = {"ok": 0, "failed": 0, "429": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(base_url, connector=connector) as session:
        with open(inp, "rb") as f, open(outp, "wb") as out:
            for raw in f:
                await sem.acquire()
                t = asyncio.create_task(one(session, raw, out, limiter, counts))
                tasks.add(t)
                t.add_done_callback(lambda t: (tasks.discard(t), sem.release()))
            if tasks:
                await asyncio.gather(*tasks)
    print(orjson.dumps(counts).decode())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("base_url")
    p.add_argument("concurrency", type=int)
    p.add_argument("--rps", type=float, default=None, help="client-side limit, when known")
    a = p.parse_args()
    coro = main(a.input, a.output, a.base_url, a.concurrency, a.rps)
    # The same event loop tmbatch runs on (uvloop when installed, TMBATCH_LOOP=asyncio to
    # force the standard one), so the ratio compares the code, not the loop.
    if os.environ.get("TMBATCH_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    else:
        asyncio.run(coro)
