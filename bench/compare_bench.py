"""CPU and memory of `tmbatch compare` on two real runs, per thousand lines.

    python bench/compare_bench.py --sizes 1000,20000 --repeats 3

For each size, two `tmbatch run --sim` of the same N chat lines (the second cuts every fifth
answer at 3 tokens, so a fifth of the lines differ) are made once; then `tmbatch compare A B
--json` is timed `--repeats` times (user+sys CPU and peak RSS of the child alone, os.wait4).
The marginal CPU per thousand lines is the slope between the smallest and the largest size,
so the interpreter's start and imports are not counted in it. The comparison is checked:
every line answered by both, the truncated fifth counted as different.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def write_input(path: Path, n: int, cut: bool) -> None:
    with open(path, "wb") as f:
        for i in range(n):
            body = {"model": "tm-small", "max_tokens": 3 if cut and i % 5 == 0 else 64,
                    "messages": [{"role": "user", "content": f"question number {i}"}]}
            f.write(orjson.dumps({"custom_id": f"q{i}", "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + b"\n")


def child(args: list[str]) -> tuple[float, float, bytes]:
    """(user+sys seconds, peak RSS in MiB, stdout) of one `tmbatch` child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tmbatch", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tmbatch {' '.join(args)} failed: {err}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def measure(n: int, repeats: int, tmp: Path) -> tuple[float, float]:
    runs = []
    for name, cut in (("a", False), ("b", True)):
        inp = tmp / f"{name}-{n}.jsonl"
        write_input(inp, n, cut)
        out = tmp / f"{name}-{n}"
        child(["run", str(inp), "-o", str(out), "-q", "--sim", "-c", "64"])
        runs.append(str(out))
    cpu, rss = [], []
    for _ in range(repeats):
        seconds, mib, out = child(["compare", *runs, "--json"])
        c = orjson.loads(out)
        assert c["units_in_all"] == n and c["all_agree"]["agree"] == n - (n + 4) // 5, c
        cpu.append(seconds)
        rss.append(mib)
    return statistics.median(cpu), max(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,20000")
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    sizes = [int(s) for s in ns.sizes.split(",")]
    figures = {}
    with tempfile.TemporaryDirectory(prefix="compare-bench-") as tmp:
        for n in sizes:
            figures[n] = measure(n, ns.repeats, Path(tmp))
            cpu, rss = figures[n]
            print(f"{n:>8,} lines x 2 runs: compare CPU {cpu:.3f} s (median of {ns.repeats}), "
                  f"peak RSS {rss:.0f} MiB", flush=True)
    lo, hi = min(sizes), max(sizes)
    if hi > lo:
        slope = (figures[hi][0] - figures[lo][0]) / (hi - lo) * 1000
        print(f"marginal: {slope * 1000:.1f} ms of CPU per 1,000 lines (two runs)")


if __name__ == "__main__":
    main()
