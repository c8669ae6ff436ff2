"""Admission benchmark: do --rpm, adaptive mode and --tpm hold the rates they promise?

    python bench/limits_bench.py            # all scenarios, ~2 minutes
    python bench/limits_bench.py --quick    # 10 s scenarios

Each scenario runs the real `tmbatch run` as a subprocess against a server in this process,
and measures on the server's side (arrival times), never the client's word for it:

  rpm       the simulator limits at R requests/s; tmbatch --rpm R*60 must provoke no 429
  adaptive  the same server, no --rpm: the success rate it settles at, against R (goal 15 %)
  tpm-high  a server whose usage is 5x tmbatch's estimate: tokens/min against --tpm (10 %)
  tpm-low   usage 1/5 of the estimate: the run must not idle below --tpm (10 %)

Rates are measured after a warm-up (the first quarter of the run), over the arrivals until
the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gen import serve_chat  # noqa: E402

from tmbatch.sim import SimConfig, start_sim  # noqa: E402

KEY = "tm-bench-key-00000000000000000000"


def chat_rows(n: int) -> list[bytes]:
    return [orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "tm-small", "max_tokens": 16,
                 "messages": [{"role": "user", "content": f"question {i}"}]},
    }) for i in range(n)]


async def run_tmbatch(url: str, rows: list[bytes], tmp: Path, *args: str) -> dict[str, Any]:
    inp = tmp / "in.jsonl"
    inp.write_bytes(b"\n".join(rows) + b"\n")
    out = tmp / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORMESH_")}
    env.update(TENSORMESH_INFERENCE_API_KEY=KEY, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url", url,
        "-q", "--no-preflight", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"tmbatch exited {proc.returncode}: {err.decode()[-2000:]}")
    return orjson.loads((out / "summary.json").read_bytes())


def steady_rate(times: list[float], weights: list[float] | None = None) -> float:
    """Per-second rate of events after the first quarter of the run."""
    if len(times) < 4:
        return 0.0
    pairs = sorted(zip(times, weights or [1.0] * len(times), strict=True))
    start = pairs[0][0] + (pairs[-1][0] - pairs[0][0]) / 4
    rest = [(t, w) for t, w in pairs if t >= start]
    span = rest[-1][0] - rest[0][0]
    return sum(w for _, w in rest[1:]) / span if span > 0 else 0.0


async def rpm_scenario(rate: float, seconds: float, tmp: Path) -> dict[str, Any]:
    server = await start_sim(SimConfig(rate_limit=rate, latency=0.05, api_key=KEY))
    try:
        summary = await run_tmbatch(server.url, chat_rows(int(rate * seconds)), tmp,
                                    "--rpm", str(rate * 60), "--concurrency", "64")
        stats = server.stats()
    finally:
        await server.stop()
    ok = [e[0] for e in stats["log"] if e[3] == 200 and e[1] == "/v1/chat/completions"]
    return {"scenario": "rpm", "server_limit_rps": rate, "rpm": rate * 60,
            "server_429": stats["rejected_429"], "achieved_rps": round(steady_rate(ok), 2),
            "wall_s": summary["this_run"]["wall_seconds"], "pass": stats["rejected_429"] == 0}


async def adaptive_scenario(rate: float, seconds: float, tmp: Path) -> dict[str, Any]:
    server = await start_sim(SimConfig(rate_limit=rate, latency=0.2, api_key=KEY))
    try:
        summary = await run_tmbatch(server.url, chat_rows(int(rate * seconds)), tmp,
                                    "--concurrency", "64")
        stats = server.stats()
    finally:
        await server.stop()
    ok = [e[0] for e in stats["log"] if e[3] == 200 and e[1] == "/v1/chat/completions"]
    achieved = steady_rate(ok)
    adm = summary["this_run"]["admission"]
    return {"scenario": "adaptive", "server_limit_rps": rate,
            "achieved_rps_server_side": round(achieved, 2),
            "settled_rps_reported": adm["settled_requests_per_second"],
            "concurrency_final": adm.get("concurrency_final"),
            "concurrency_min": adm.get("concurrency_min"), "decreases": adm.get("decreases"),
            "server_429": stats["rejected_429"],
            "failed": summary["counts"]["failed"],
            "within_15pct": abs(achieved - rate) <= 0.15 * rate,
            "pass": abs(achieved - rate) <= 0.15 * rate and summary["counts"]["failed"] == 0}


async def usage_server(usage_total: int) -> tuple[web.AppRunner, str, list[tuple[float, int]]]:
    """An OpenAI-shaped chat server that reports `usage_total` tokens per answer."""
    seen: list[tuple[float, int]] = []
    prompt = max(1, usage_total // 4)

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        seen.append((time.monotonic(), usage_total))
        await asyncio.sleep(0.05)
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": "tm-small",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": usage_total - prompt,
                      "total_tokens": usage_total},
        })

    runner, url = await serve_chat(chat)
    return runner, url, seen


async def tpm_scenario(name: str, tpm: float, usage: int, seconds: float,
                       tmp: Path) -> dict[str, Any]:
    from tmbatch.limits import estimate_tokens

    rows = chat_rows(1)
    estimate = estimate_tokens(orjson.loads(rows[0])["body"])
    n = int(tpm / 60.0 / usage * seconds)
    runner, url, seen = await usage_server(usage)
    try:
        summary = await run_tmbatch(url, chat_rows(n), tmp, "--tpm", str(tpm),
                                    "--rpm", "1000000", "--concurrency", "32")
    finally:
        await runner.cleanup()
    per_min = steady_rate([t for t, _ in seen], [float(u) for _, u in seen]) * 60.0
    span = seen[-1][0] - seen[0][0]
    whole = sum(u for _, u in seen[1:]) / span * 60.0 if span > 0 else 0.0
    return {"scenario": name, "tpm": tpm, "estimate_per_request": estimate,
            "usage_per_request": usage, "requests": n,
            "achieved_tpm_server_side": round(per_min),
            "error_pct": round((per_min - tpm) / tpm * 100, 1),
            "whole_run_tpm": round(whole),
            "learnt_ratio": summary["this_run"]["admission"].get("usage_to_estimate_ratio"),
            "wall_s": summary["this_run"]["wall_seconds"],
            "pass": abs(per_min - tpm) <= 0.10 * tpm}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 s scenarios instead of 30 s")
    ap.add_argument("--rate", type=float, default=20.0, help="server limit R, requests/s")
    ap.add_argument("--only", choices=["rpm", "adaptive", "tpm-high", "tpm-low"])
    ns = ap.parse_args()
    seconds = 10.0 if ns.quick else 30.0
    results = []
    with TemporaryDirectory() as d:
        for i, (name, make) in enumerate([
            ("rpm", lambda t: rpm_scenario(ns.rate, seconds, t)),
            ("adaptive", lambda t: adaptive_scenario(ns.rate, seconds, t)),
            ("tpm-high", lambda t: tpm_scenario("tpm-high", 60_000, 100, seconds, t)),
            ("tpm-low", lambda t: tpm_scenario("tpm-low", 12_000, 4, seconds, t)),
        ]):
            if ns.only and name != ns.only:
                continue
            tmp = Path(d) / str(i)
            tmp.mkdir()
            r = await make(tmp)
            results.append(r)
            print(orjson.dumps(r).decode(), flush=True)
    ok = all(r["pass"] for r in results)
    print("all pass" if ok else "SOME FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
