"""CPU of a rerun answered wholly from the response cache (`--cache`), per thousand lines.

    python bench/cache_rerun.py --sizes 1000,10000 --repeats 3

For each size: one `tmbatch run --sim --cache` fills a fresh cache, then `--repeats` reruns
into fresh output directories are timed (user+sys CPU of the child alone, os.wait4). The
marginal CPU per thousand lines is the slope between the smallest and the largest size, so
the interpreter's start (imports, preflight against the in-process simulator) is not counted
in it. The rerun must send nothing: the child's summary.json is checked for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def write_input(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        for i in range(n):
            body = {"model": "tm-small", "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"question {i}"}]}
            f.write(orjson.dumps({"custom_id": f"q{i}", "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + b"\n")


def cpu_of(args: list[str]) -> float:
    """User+sys seconds of one `tmbatch` child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tmbatch", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tmbatch {' '.join(args)} failed: {err}")
    return usage.ru_utime + usage.ru_stime


def measure(n: int, repeats: int, tmp: Path) -> float:
    inp, cache = tmp / f"in-{n}.jsonl", tmp / f"cache-{n}.sqlite"
    write_input(inp, n)
    cpu_of(["run", str(inp), "-o", str(tmp / f"fill-{n}"), "-q", "--sim", "--cache",
            str(cache)])
    times = []
    for r in range(repeats):
        out = tmp / f"rerun-{n}-{r}"
        times.append(cpu_of(["run", str(inp), "-o", str(out), "-q", "--sim", "--cache",
                             str(cache)]))
        summary = orjson.loads((out / "summary.json").read_bytes())
        assert summary["this_run"]["attempts_sent"] == 0, summary["this_run"]
        assert summary["cache"]["hits"] == n, summary["cache"]
        shutil.rmtree(out)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    sizes = sorted(int(s) for s in ns.sizes.split(","))
    with tempfile.TemporaryDirectory() as d:
        cpu = {n: measure(n, ns.repeats, Path(d)) for n in sizes}
    for n in sizes:
        print(f"{n:>8,} lines, all cached: {cpu[n]:.3f} s CPU (median of {ns.repeats}), "
              "0 requests sent")
    lo, hi = sizes[0], sizes[-1]
    if hi > lo:
        per_k = (cpu[hi] - cpu[lo]) / (hi - lo) * 1000
        print(f"marginal: {per_k * 1000:.0f} ms CPU per 1,000 cached lines")


if __name__ == "__main__":
    main()
