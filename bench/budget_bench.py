"""Budget benchmark: how close to its budget does a run get, and what does spend cost a resume?

    python bench/budget_bench.py            # ~3 minutes on 2 cores
    python bench/budget_bench.py --quick    # one repeat, smaller budgets, 200k-line replay

1. spend / budget with 64 in flight. The real `tmbatch run` (a subprocess) sends
   bench/gen.py's chat lines (max_tokens 64) to the simulator (its own process) with 100 ms
   ± 80 ms latency, so answers come back out of order, under `--budget-tokens B`. The
   simulator's answers use far less than their worst case (~25 of ~80 tokens), the usual
   case; "usage 3x prompt" is a server whose usage says every prompt is 3 times tmbatch's
   estimate and every answer uses all of max_tokens (more than the worst case reserved).
   Reported: spent / budget (from summary.json, checked against results.jsonl's usage),
   whether the budget was ever passed, lines answered, and what was left unused in units of
   one request's worst case.
2. Killed and resumed: the same run under `--budget-tokens B`, killed with a real SIGKILL
   at a random moment 1-2 s after each start, 10 times, then run to its end (exit 6).
   Reported: spent / budget by the server's count (the usage of every answer in
   results.jsonl, plus each request the simulator processed whose answer died with the
   process, at the mean usage of an answer) and by tmbatch's (summary.json), against the
   same run without kills.
3. Resume cost: `journal.load` of a fabricated 1,000,000-line journal (bench/gen.py) without
   spend records, with spend snapshots every 250 lines (as a run writes them at 1,000
   requests/s), and with those plus a budget's reservation in every dispatch record; each a
   fresh process, median of 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import orjson
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from gen import fabricate_resume, serve_chat, write_input  # noqa: E402

from tmbatch.sim.config import ROUTE_STATS  # noqa: E402
from tmbatch.spend.tokens import prompt_tokens  # noqa: E402

KEY = "tm-bench-key-00000000000000000000"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORMESH_")}
    env.update(TENSORMESH_INFERENCE_API_KEY=KEY, PYTHONPATH=str(ROOT))
    return env


def start_sim(port_file: Path) -> subprocess.Popen[bytes]:
    """The simulator in its own process (so its CPU is not the client's)."""
    code = ("import asyncio,sys\nfrom tmbatch.sim import SimConfig,start_sim\n"
            "async def main():\n"
            f"    s=await start_sim(SimConfig(latency=0.1,latency_jitter=0.08,api_key={KEY!r}))\n"
            f"    open({str(port_file)!r},'w').write(s.url)\n"
            "    await asyncio.Event().wait()\n"
            "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the simulator did not start")
        time.sleep(0.05)
    return proc


def run_budget(url: str, inp: Path, out: Path, budget: int) -> dict[str, Any]:
    t = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url", url,
         "-q", "--no-preflight", "-c", "64", "--budget-tokens", str(budget)],
        env=_env(), cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t
    if p.returncode not in (0, 6):
        raise SystemExit(f"tmbatch exited {p.returncode}: {p.stderr[-2000:]}")
    summary = orjson.loads((out / "summary.json").read_bytes())
    billed = 0
    with open(out / "results.jsonl", "rb") as f:
        for raw in f:
            u = orjson.loads(raw)["response"]["body"]["usage"]
            billed += u["prompt_tokens"] + u["completion_tokens"]
    spent = summary["spend"]["spent"]["tokens"]
    if spent != billed:
        raise SystemExit(f"summary says {spent} tokens, results.jsonl's usage {billed}")
    return {"budget": budget, "exit": p.returncode, "spent": spent,
            "ratio": spent / budget, "answered": summary["counts"]["succeeded"],
            "wall_s": round(wall, 2)}


async def heavy_server() -> tuple[web.AppRunner, str]:
    """Usage above the worst case: prompt 3x tmbatch's estimate, completion = max_tokens."""
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.1)
        p = 3 * prompt_tokens(body)
        c = body.get("max_tokens", 16)
        return web.json_response({
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})

    return await serve_chat(chat)


def budgets_part(tmp: Path, budgets: list[int], repeats: int) -> list[dict[str, Any]]:
    inp = write_input(tmp / "in.jsonl", 20_000)
    worst = 0
    with open(inp, "rb") as f:
        body = orjson.loads(f.readline())["body"]
        worst = prompt_tokens(body) + body["max_tokens"]
    rows = []
    sim = start_sim(tmp / "port")
    url = (tmp / "port").read_text()
    try:
        for budget in budgets:
            runs = [run_budget(url, inp, tmp / f"out-{budget}-{r}", budget)
                    for r in range(repeats)]
            rows.append(_row("simulator (usage < estimate)", budget, runs, worst))
            print(_fmt(rows[-1]), flush=True)
    finally:
        sim.kill()
        sim.wait()

    async def heavy() -> list[dict[str, Any]]:
        runner, hurl = await heavy_server()
        try:
            out = []
            for budget in budgets:
                runs = [await asyncio.to_thread(run_budget, hurl, inp,
                                                tmp / f"heavy-{budget}-{r}", budget)
                        for r in range(repeats)]
                out.append(_row("usage 3x prompt, full max_tokens", budget, runs, worst))
                print(_fmt(out[-1]), flush=True)
            return out
        finally:
            await runner.cleanup()

    return rows + asyncio.run(heavy())


def _row(server: str, budget: int, runs: list[dict[str, Any]], worst: int) -> dict[str, Any]:
    ratios = [r["ratio"] for r in runs]
    return {"server": server, "budget": budget, "repeats": len(runs),
            "ratio_median": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
            "ratio_max": round(max(ratios), 4), "over_budget_runs": sum(r > 1 for r in ratios),
            "answered_median": statistics.median(r["answered"] for r in runs),
            "unused_in_worst_cases": round(
                statistics.median(r["budget"] - r["spent"] for r in runs) / worst, 2),
            "all_exit_6": all(r["exit"] == 6 for r in runs)}


def _fmt(r: dict[str, Any]) -> str:
    return (f"  {r['server']:34s} budget {r['budget']:>9,}: spent/budget median "
            f"{r['ratio_median']:.4f} (min {r['ratio_min']:.4f}, max {r['ratio_max']:.4f}), "
            f"{r['answered_median']:,} answered, {r['unused_in_worst_cases']} worst cases "
            f"unused, over budget in {r['over_budget_runs']}/{r['repeats']}")


def replay_part(tmp: Path, lines: int) -> list[dict[str, Any]]:
    inp = write_input(tmp / f"in-{lines}.jsonl", lines)
    variants = {"no spend records (before)": {"spend_every": 0},
                "snapshots every 250 lines": {"spend_every": 250},
                "snapshots + budget reservations": {"spend_every": 250, "reservations": True}}
    rows = []
    for name, kw in variants.items():
        d = tmp / f"resume-{kw.get('spend_every')}-{kw.get('reservations', False)}"
        fabricate_resume(inp, d, lines, **kw)
        code = ("import sys,time\nfrom pathlib import Path\n"
                "from tmbatch.journal.journal import load\n"
                f"t=time.perf_counter(); s=load(Path({str(d)!r}), repair=False)\n"
                "print(time.perf_counter()-t, s.spend is not None)\n")
        times = []
        for _ in range(3):
            p = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT,
                               capture_output=True, text=True, check=True)
            times.append(float(p.stdout.split()[0]))
        size = (d / "journal.jsonl").stat().st_size
        rows.append({"journal": name, "lines": lines, "journal_mb": round(size / 1e6, 1),
                     "load_s_median": round(statistics.median(times), 3)})
        print(f"  {name:34s} {size / 1e6:6.1f} MB  load {rows[-1]['load_s_median']:.3f} s",
              flush=True)
    return rows


def _server_billed(url: str, out: Path) -> tuple[int, int, int]:
    """(tokens the server billed, requests it processed, answers in results.jsonl): every
    answer's usage, and each processed request whose answer was lost at the mean usage."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + ROUTE_STATS) as r:
        processed = int(orjson.loads(r.read())["processed_total"])
    used = answers = 0
    with open(out / "results.jsonl", "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                u = orjson.loads(raw)["response"]["body"]["usage"]
                used += u["prompt_tokens"] + u["completion_tokens"]
                answers += 1
    lost = max(0, processed - answers)
    return used + round(lost * used / max(answers, 1)), processed, answers


def killed_run(tmp: Path, inp: Path, budget: int, kills: int, seed: int) -> dict[str, Any]:
    """One job under `budget`, killed `kills` times (real SIGKILL), then run to its end."""
    import random

    rnd = random.Random(seed)
    sim = start_sim(tmp / f"port-k{kills}-{seed}")
    url = (tmp / f"port-k{kills}-{seed}").read_text()
    out = tmp / f"out-k{kills}-{seed}"
    args = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url", url,
            "-q", "--no-preflight", "-c", "64", "--budget-tokens", str(budget)]
    try:
        for _ in range(kills):
            proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=rnd.uniform(1.0, 2.0))
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL
                proc.wait()
            time.sleep(0.5)  # the simulator answers what it had taken (into closed sockets)
        p = subprocess.run(args, env=_env(), cwd=ROOT, capture_output=True, text=True,
                           check=False)
        if p.returncode not in (0, 1, 6):
            raise SystemExit(f"tmbatch exited {p.returncode}: {p.stderr[-2000:]}")
        time.sleep(0.5)
        billed, processed, answers = _server_billed(url, out)
    finally:
        sim.kill()
        sim.wait()
    spent = orjson.loads((out / "summary.json").read_bytes())["spend"]["spent"]["tokens"]
    return {"kills": kills, "budget": budget, "exit": p.returncode, "server_billed": billed,
            "server_ratio": round(billed / budget, 4), "tmbatch_spent": spent,
            "tmbatch_ratio": round(spent / budget, 4), "processed": processed,
            "answered": answers}


def kills_part(tmp: Path, budget: int, repeats: int) -> list[dict[str, Any]]:
    inp = write_input(tmp / "in-kills.jsonl", 20_000)
    rows = []
    for kills in (0, 10):
        for seed in range(repeats):
            row = killed_run(tmp, inp, budget, kills, seed)
            rows.append(row)
            print(f"  {kills:>2} kills, budget {budget:,}: server billed {row['server_billed']:,} "
                  f"({100 * row['server_ratio']:.1f} %), tmbatch counts {row['tmbatch_spent']:,}"
                  f" ({100 * row['tmbatch_ratio']:.1f} %), exit {row['exit']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kills-only", action="store_true",
                    help="only part 2: 10 kill -9s and resumes under a budget")
    ap.add_argument("--out", default=str(HERE / "results" / "budget.json"))
    a = ap.parse_args()
    budgets = [20_000, 100_000] if a.quick else [20_000, 100_000, 400_000]
    repeats = 1 if a.quick else 3
    budget_rows: list[dict[str, Any]] = []
    replay_rows: list[dict[str, Any]] = []
    with TemporaryDirectory(prefix="tmbatch-budget-") as tmp:
        if not a.kills_only:
            print("spend / budget, 64 in flight:", flush=True)
            budget_rows = budgets_part(Path(tmp), budgets, repeats)
        print("killed and resumed 10 times, 64 in flight:", flush=True)
        kill_rows = kills_part(Path(tmp), 200_000, 1 if a.quick else 2)
        if not a.kills_only:
            print("journal replay (resume):", flush=True)
            replay_rows = replay_part(Path(tmp), 200_000 if a.quick else 1_000_000)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_bytes(orjson.dumps(
        {"budgets": budget_rows, "kills": kill_rows, "replay": replay_rows},
        option=orjson.OPT_INDENT_2))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
