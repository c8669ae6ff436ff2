"""K shards on one account: together-rate, requests inside announced windows, 429s; with and
without `--redis`.

    python bench/fleet_bench.py                      # 4 shards, 50 req/s, 1,200 lines, both
    python bench/fleet_bench.py --modes alone        # without --redis only
    python bench/fleet_bench.py --repeats 3 --limit 50 --lines 1200 --shards 4

The simulator (`tmbatch sim --sim-rate-limit LIMIT`: a token bucket of LIMIT req/s, burst one
second's worth, 429s announcing the real wait rounded up to whole seconds) runs as its own
process; K `tmbatch run --shard i/K` processes start together against it, each learning the
limit (no --rpm: the pace is unknown to them). With `--redis`, a `redis-server` of the
bench's own on a free port joins them (`--redis-prefix bench`).

Figures, from the simulator's own counts (`/_sim/stats`, reset before each mode):

* together-rate: successes / seconds from the first shard's start to the last shard's end;
* violations: requests that arrived inside a Retry-After window the simulator had announced
  (to any shard), past its 10 ms grace for requests already on their way;
* 429s: refusals.

Output: one table on stdout (median over the repeats, and each repeat).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gen import write_input  # noqa: E402
from run_bench import ROUTE, Sim, free_port  # noqa: E402

PY = sys.executable


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def run_mode(sim: Sim, inp: Path, work: Path, shards: int, redis: str | None,
             tag: str) -> dict[str, Any]:
    sim.reset()
    extra = ["--redis", redis, "--redis-prefix", f"bench-{tag}"] if redis else []
    started = time.monotonic()
    procs = [subprocess.Popen(
        [PY, "-m", "tmbatch", "run", str(inp), "-o", str(work / f"{tag}-{i}"), "--shard",
         f"{i}/{shards}", "--base-url", sim.url, "--quiet", "--no-preflight", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "TENSORMESH_INFERENCE_API_KEY": "tm-bench-key"})
        for i in range(shards)]
    errs = [p.communicate()[1].decode() for p in procs]
    wall = time.monotonic() - started
    st = sim.stats()
    ok = int(st["by_route"][ROUTE]["status_counts"].get("200", 0))
    codes = [p.returncode for p in procs]
    if any(codes):
        print(f"  {tag}: exit codes {codes}: {[e[-300:] for e in errs if e]}", flush=True)
    return {"mode": "redis" if redis else "alone", "wall_s": round(wall, 2), "ok": ok,
            "rate": round(ok / wall, 1), "violations": st["retry_after_violations"],
            "rejected_429": st["rejected_429"], "received": st["by_route"][ROUTE]["received"],
            "exit": codes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--limit", type=float, default=50.0)
    p.add_argument("--lines", type=int, default=1200)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default="alone,redis")
    p.add_argument("--keep", help="keep the shards' output directories here")
    a = p.parse_args()
    modes = a.modes.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tmbatch-fleet-") as w:
        work = Path(a.keep or w)
        work.mkdir(parents=True, exist_ok=True)
        inp = write_input(work / "in.jsonl", a.lines)
        sim = Sim(["--sim-rate-limit", f"{a.limit:g}"])
        redis = None
        try:
            if "redis" in modes:
                redis = start_redis(work)
            for r in range(a.repeats):
                for mode in modes:
                    url = redis[1] if (mode == "redis" and redis) else None
                    row = run_mode(sim, inp, work, a.shards, url, f"{mode}{r}")
                    row["repeat"] = r
                    rows.append(row)
                    print(f"  r{r} {mode:6s} {row['rate']:6.1f} req/s together "
                          f"({100 * row['rate'] / a.limit:.0f} % of {a.limit:g}), "
                          f"{row['violations']} inside announced windows, "
                          f"{row['rejected_429']} × 429, {row['ok']} ok of {row['received']} "
                          f"received, wall {row['wall_s']} s", flush=True)
        finally:
            sim.stop()
            if redis:
                redis[0].terminate()
                redis[0].wait(10)
    print(f"\n# {a.shards} shards, one {a.limit:g} req/s limit (whole-second Retry-After), "
          f"{a.lines:,} lines; median of {a.repeats}\n")
    print("| mode | together req/s | % of limit | requests inside announced windows | 429s |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        mine = [x for x in rows if x["mode"] == mode]
        med = {k: statistics.median(x[k] for x in mine)
               for k in ("rate", "violations", "rejected_429")}
        print(f"| {'--redis' if mode == 'redis' else 'alone'} | {med['rate']:.1f} | "
              f"{100 * med['rate'] / a.limit:.0f} % | {med['violations']:g} | "
              f"{med['rejected_429']:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
