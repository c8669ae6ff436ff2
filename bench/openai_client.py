"""What most users would write instead of tmbatch: AsyncOpenAI, a semaphore, a results file.

SDK defaults throughout (httpx pool, retries with Retry-After), except max_retries
raised to 8 so the rate-limit scenario completes instead of failing lines.

    python bench/openai_client.py INPUT OUTPUT BASE_URL CONCURRENCY
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, BinaryIO

from openai import AsyncOpenAI


async def one(client: AsyncOpenAI, raw: bytes, out: BinaryIO, counts: dict[str, int]) -> None:
    line = json.loads(raw)
    body: dict[str, Any] = line["body"]
    try:
        if body.get("stream"):
            parts: list[str] = []
            last: Any = None
            stream = await client.chat.completions.create(**body)
            async for chunk in stream:
                last = chunk
                for c in chunk.choices:
                    parts.append(c.delta.content or "")
            result = {**(last.model_dump() if last else {}), "content": "".join(parts)}
        else:
            resp = await client.chat.completions.create(**body)
            result = resp.model_dump()
    except Exception as exc:  # what a user's loop does: note it and go on
        counts["failed"] += 1
        result = {"error": repr(exc)}
    else:
        counts["ok"] += 1
    out.write(json.dumps({"custom_id": line["custom_id"], "response": result}).encode() + b"\n")


async def main(inp: str, outp: str, base_url: str, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "failed": 0}
    tasks: set[asyncio.Task[None]] = set()
    async with AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="sk-bench",
                           max_retries=8) as client:
        with open(inp, "rb") as f, open(outp, "wb") as out:
            for raw in f:
                await sem.acquire()
                t = asyncio.create_task(one(client, raw, out, counts))
                tasks.add(t)
                t.add_done_callback(lambda t: (tasks.discard(t), sem.release()))
            if tasks:
                await asyncio.gather(*tasks)
    print(json.dumps(counts))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("base_url")
    p.add_argument("concurrency", type=int)
    a = p.parse_args()
    asyncio.run(main(a.input, a.output, a.base_url, a.concurrency))
