"""Benchmark inputs, and a fabricated half-done (well, 99.9 %-done) tmbatch output directory.

Inputs are generated rather than checked in: a million-line file is ~250 MB. The
resume state of scenario (e) is fabricated in the journal format of
tmbatch/journal/journal.py, because producing it honestly (sending 999,000 requests)
would take longer than the whole benchmark is allowed to.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ("the moon", "tea", "rivers", "owls", "granite", "jazz", "tides", "bread")


def request_line(i: int, stream: bool = False) -> bytes:
    """One OpenAI Batch line shaped like samples/chat.jsonl (a realistic small chat body)."""
    body: dict[str, object] = {
        "model": "tm-small",
        "messages": [
            {"role": "system", "content": "You are concise."},
            {"role": "user", "content": f"Tell me one fact about {TOPICS[i % len(TOPICS)]} "
                                        f"(variant {i})."},
        ],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps({"custom_id": f"req-{i}", "method": "POST",
                         "url": "/v1/chat/completions", "body": body}) + b"\n"


def write_input(path: Path, n: int, stream: bool = False) -> Path:
    """Write n lines unless an identical file is already there (the 1M file takes seconds)."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            count = sum(1 for _ in f)
        if count == n:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb", buffering=1 << 20) as f:
        chunk: list[bytes] = []
        for i in range(1, n + 1):
            chunk.append(request_line(i, stream))
            if len(chunk) == 10_000:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))
    os.replace(tmp, path)
    return path


def fabricate_resume(input_path: Path, out_dir: Path, done: int, *, spend_every: int = 250,
                     reservations: bool = False) -> None:
    """An output directory in which lines 1..done finished `ok` and nothing is in flight.

    Journal: the header tmbatch writes (same fingerprint and options record as a plain
    `tmbatch run INPUT -o OUT`), then per line a dispatch and an outcome, with a size mark
    every 1,000 lines as the writer does, and a spend snapshot every `spend_every` lines (a
    run writes one at most every 0.25 s: every 250 lines at 1,000 requests/s; 0 for none, as
    before spend was journaled). `reservations`: dispatch records carry the reservation a
    run under a budget writes. results.jsonl holds one small stub record per done line (real
    bodies are ~400 bytes; resume never reads results it has marks for), so the directory is
    consistent with the format but smaller than a real one.
    """
    # Imported here, not at the top: writing inputs must not depend on tmbatch's internal
    # layout, so benchmarks can measure any tmbatch, including one being restructured.
    from tmbatch import __version__
    from tmbatch.inputs.files import fingerprint

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("journal.jsonl", "results.jsonl", "failures.jsonl", "summary.json"):
        (out_dir / name).unlink(missing_ok=True)
    header = {
        "e": "start", "v": 1, "tmbatch": __version__, "input": os.path.abspath(input_path),
        "fingerprint": fingerprint(str(input_path)),
        "options": {"endpoint": None, "model": None, "stream": None, "shard": None},
        "job": secrets.token_hex(8), "t": time.time(),
    }
    res_size = 0
    with open(out_dir / "journal.jsonl", "wb", buffering=1 << 20) as j, \
            open(out_dir / "results.jsonl", "wb", buffering=1 << 20) as r:
        j.write(orjson.dumps(header) + b"\n")
        jour: list[bytes] = []
        res: list[bytes] = []
        for line in range(1, done + 1):
            cid = f"req-{line}"
            rec = orjson.dumps({"id": f"batch_req_stub{line}", "custom_id": cid,
                                "response": {"status_code": 200, "request_id": None,
                                             "body": {"stub": True}},
                                "error": None, "line": line}) + b"\n"
            res.append(rec)
            res_size += len(rec)
            if reservations:
                jour.append(orjson.dumps(["d", line, 1, cid, ["tm-small", 40, 64]]) + b"\n")
            else:
                jour.append(orjson.dumps(["d", line, 1, cid]) + b"\n")
            jour.append(orjson.dumps(["o", line, "ok"]) + b"\n")
            if spend_every and line % spend_every == 0:
                jour.append(orjson.dumps(["s", time.time(), {"tm-small": [
                    30 * line, 25 * line, 0, line]}, {}, 0]) + b"\n")
            if line % 1000 == 0 or line == done:
                jour.append(orjson.dumps(["m", res_size, 0]) + b"\n")
                j.write(b"".join(jour))
                r.write(b"".join(res))
                jour.clear()
                res.clear()
    (out_dir / "failures.jsonl").touch(mode=0o600)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write a benchmark input file")
    p.add_argument("path")
    p.add_argument("n", type=int)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--resume-dir", help="also fabricate a resume directory here")
    p.add_argument("--done", type=int, default=0)
    a = p.parse_args()
    write_input(Path(a.path), a.n, a.stream)
    if a.resume_dir:
        fabricate_resume(Path(a.path), Path(a.resume_dir), a.done)


async def serve_chat(chat: Any) -> tuple[Any, str]:
    """A one-route aiohttp server on 127.0.0.1 (a free port) answering chat completions with
    `chat`, for benchmarks that need answers the simulator does not give."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
