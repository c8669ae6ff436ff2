"""CPU seconds of the whole `tmbatch run` process against the bare aiohttp loop, same run.

    python bench/cpu_bench.py                          # 20,000 chat lines, 5 repeats, uvloop
    python bench/cpu_bench.py --repeats 7 --strace     # + syscalls per request (strace -c -f)
    python bench/cpu_bench.py --tree before=/tmp/tmbatch-before   # another checkout, same run
    python bench/cpu_bench.py --metrics    # + tmbatch with --metrics-port 0 (the fleet extra)

The simulator (`tmbatch sim`, zero latency) runs as its own process on 127.0.0.1. Each
client runs as a child process on the same 20,000 chat lines (bench/gen.py) at the same
concurrency, on uvloop (TMBATCH_LOOP=uvloop, which bench/bare_aiohttp.py honours too):

* `tmbatch run IN -o OUT -c 64 --quiet --no-preflight`: journal on, the default `--fsync`
  (interval), as bench/run_bench.py runs it;
* `bench/bare_aiohttp.py IN OUT URL 64`: the lower bound of this stack.

The clients are interleaved over the repeats, the order rotating each repeat, after one
untimed warm-up run of each (bytecode and page caches). A client's CPU is the user + system
seconds of that child alone (os.wait4, so the simulator and this driver are not in it); wall
time runs from spawning to reaping; peak RSS is the child's VmHWM. The figure is the median
of the per-repeat ratios tmbatch / bare (each repeat's two runs are neighbours in time on a
shared machine), next to the ratio of the medians.

Every run must do the same work: the simulator's count of 200s on the chat route and the
lines written must both equal the input's line count, for every client, or the run is
reported as invalid and the driver exits 1.

`--strace` adds, after the timed repeats, one run of each client under `strace -c -f`
(slower; not timed): syscalls per request, by name. `--tree NAME=DIR` adds another tmbatch
checkout (`python -m tmbatch` with DIR first on sys.path) as one more client, so a change
can be compared with the code before it in the same run.

Output: a table on stdout, and OUT/cpu.json with every run, the medians and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gen import write_input  # noqa: E402
from run_bench import ROUTE, Sim  # noqa: E402

PY = sys.executable


def client_cmd(client: str, trees: dict[str, Path], inp: Path, out: Path, url: str,
               concurrency: int) -> tuple[list[str], Path, dict[str, str]]:
    """(argv, cwd, extra environment) of one client run."""
    if client == "bare":
        return ([PY, str(HERE / "bare_aiohttp.py"), str(inp), str(out), url, str(concurrency)],
                ROOT, {})
    tree = trees.get(client, ROOT)
    env = {"PYTHONPATH": str(tree)} if client in trees else {}
    extra = ["--metrics-port", "0"] if client == "metrics" else []  # the per-answer tally
    return ([PY, "-m", "tmbatch", "run", str(inp), "-o", str(out), "-c", str(concurrency),
             "--quiet", "--no-preflight", "--base-url", url, *extra], tree, env)


def peak_rss(pid: int, stop: threading.Event, hwm: list[float]) -> None:
    """The child's VmHWM, polled every 20 ms until it exits (ru_maxrss from wait4 would
    start from the driver's RSS at fork)."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for ln in status.read_text().splitlines():
                if ln.startswith("VmHWM:"):
                    hwm.append(int(ln.split()[1]) / 1024)
                    break
        except (OSError, ValueError):
            pass
        stop.wait(0.02)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_once(client: str, trees: dict[str, Path], inp: Path, work: Path, sim: Sim,
             loop: str, concurrency: int, wrap: list[str] | None = None) -> dict[str, Any]:
    out = work / f"out-{client}"
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    sim.reset()
    cmd, cwd, extra = client_cmd(client, trees, inp, out, sim.url, concurrency)
    if wrap:
        cmd = [*wrap, *cmd]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    env.update(TENSORMESH_INFERENCE_API_KEY="tm-bench-key", TMBATCH_LOOP=loop,
               PYTHONPYCACHEPREFIX=str(work / "pycache"), **extra)
    hwm: list[float] = [0.0]
    stop = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sampler = threading.Thread(target=peak_rss, args=(proc.pid, stop, hwm), daemon=True)
    sampler.start()
    drained: dict[str, bytes] = {}
    drains = [threading.Thread(target=lambda n=n, s=s: drained.__setitem__(n, s.read()),
                               daemon=True)
              for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for d in drains:
        d.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    stop.set()
    for th in (sampler, *drains):
        th.join(5)
    code = os.waitstatus_to_exitcode(status)
    stats = sim.stats()["by_route"].get(ROUTE, {})
    written = count_lines(out / "results.jsonl" if client != "bare" else out)
    cpu = ru.ru_utime + ru.ru_stime
    return {
        "client": client, "exit": code, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "user_s": round(ru.ru_utime, 3), "sys_s": round(ru.ru_stime, 3),
        "peak_rss_mb": round(max(hwm), 1),
        "ok": stats.get("status_counts", {}).get("200", 0), "received": stats.get("received", 0),
        "written": written,
        "minflt": ru.ru_minflt, "vol_ctx": ru.ru_nvcsw, "invol_ctx": ru.ru_nivcsw,
        "stderr": drained.get("err", b"")[-2000:].decode("utf-8", "replace"),
        "stdout": drained.get("out", b"")[-500:].decode("utf-8", "replace"),
    }


STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def strace_counts(client: str, trees: dict[str, Path], inp: Path, work: Path, sim: Sim,
                  loop: str, concurrency: int) -> dict[str, Any]:
    """One untimed run under `strace -c -f`: calls of each syscall, all threads."""
    out_file = work / f"strace-{client}.txt"
    row = run_once(client, trees, inp, work, sim, loop, concurrency,
                   wrap=["strace", "-c", "-f", "-o", str(out_file)])
    calls: dict[str, int] = {}
    for ln in out_file.read_text().splitlines():
        m = STRACE_LINE.match(ln)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
    return {"ok": row["ok"], "calls": calls}


def median(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--tree", action="append", default=[],
                   help="NAME=DIR: another tmbatch checkout to run as client NAME")
    p.add_argument("--strace", action="store_true", help="syscalls per request, one run each")
    p.add_argument("--metrics", action="store_true",
                   help="add client `metrics`: tmbatch with --metrics-port 0 (what metrics cost)")
    p.add_argument("--data", default="/tmp/tmbatch-bench")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    trees = {}
    for spec in a.tree:
        name, _, d = spec.partition("=")
        trees[name] = Path(d).resolve()
    clients = ["tmbatch", *(["metrics"] if a.metrics else []), *trees, "bare"]
    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    inp = write_input(data / f"in-{a.lines}.jsonl", a.lines)
    runs: list[dict[str, Any]] = []
    invalid: list[str] = []
    started = time.monotonic()
    sim = Sim([])
    with tempfile.TemporaryDirectory(prefix="tmbatch-cpu-", dir=data) as w:
        work = Path(w)
        try:
            for c in clients:  # warm-up, untimed
                run_once(c, trees, inp, work, sim, a.loop, a.concurrency)
            for r in range(a.repeats):
                order = clients[r % len(clients):] + clients[:r % len(clients)]
                for c in order:
                    row = run_once(c, trees, inp, work, sim, a.loop, a.concurrency)
                    row["repeat"] = r
                    runs.append(row)
                    good = row["exit"] == 0 and row["ok"] == a.lines == row["written"]
                    if not good:
                        invalid.append(f"{c} r{r}: exit {row['exit']}, ok {row['ok']}, "
                                       f"written {row['written']}: {row['stderr'][-300:]}")
                    print(f"  r{r} {c:10s} cpu {row['cpu_s']:6.3f}s (user {row['user_s']:6.3f} "
                          f"sys {row['sys_s']:5.3f})  wall {row['wall_s']:6.2f}s  rss "
                          f"{row['peak_rss_mb']:5.1f}MB  minflt {row['minflt']}  ok {row['ok']}"
                          f"  written {row['written']}{'' if good else '  INVALID'}", flush=True)
            syscalls = {c: strace_counts(c, trees, inp, work, sim, a.loop, a.concurrency)
                        for c in clients} if a.strace and shutil.which("strace") else {}
        finally:
            sim.stop()
    elapsed = time.monotonic() - started

    by: dict[str, list[dict[str, Any]]] = {c: [r for r in runs if r["client"] == c]
                                           for c in clients}
    med = {c: {k: round(median([r[k] for r in rows]), 3)
               for k in ("cpu_s", "user_s", "sys_s", "wall_s", "peak_rss_mb")}
           for c, rows in by.items()}
    ratios: dict[str, dict[str, Any]] = {}
    for c in clients:
        if c == "bare":
            continue
        per = {k: [t[k] / b[k] for t, b in zip(by[c], by["bare"], strict=True) if b[k]]
               for k in ("cpu_s", "user_s", "sys_s")}
        ratios[c] = {
            "cpu_ratio_median_of_repeats": round(median(per["cpu_s"]), 3),
            "cpu_ratio_range": [round(min(per["cpu_s"]), 3), round(max(per["cpu_s"]), 3)],
            "cpu_ratio_of_medians": round(med[c]["cpu_s"] / med["bare"]["cpu_s"], 3),
            "user_ratio_median_of_repeats": round(median(per["user_s"]), 3),
            "sys_ratio_median_of_repeats": round(median(per["sys_s"]), 3),
        }

    lines = [f"# CPU: tmbatch run vs the bare aiohttp loop ({a.loop}, {a.lines:,} chat lines, "
             f"zero latency, concurrency {a.concurrency}, median of {a.repeats})", "",
             f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs;"
             f" {time.strftime('%Y-%m-%d %H:%M')}; {elapsed:.0f} s. Command: `python "
             f"bench/cpu_bench.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "| run | " + " | ".join(f"{c} CPU s (user + sys)" for c in clients)
             + " | " + " | ".join(f"{c} / bare" for c in ratios) + " |",
             "|---|" + "---:|" * (len(clients) + len(ratios))]
    for r in range(a.repeats):
        row = {x["client"]: x for x in runs if x["repeat"] == r}
        cells = [f"{row[c]['cpu_s']:.2f} ({row[c]['user_s']:.2f} + {row[c]['sys_s']:.2f})"
                 for c in clients]
        cells += [f"{row[c]['cpu_s'] / row['bare']['cpu_s']:.3f}×" for c in ratios]
        lines.append(f"| r{r} | " + " | ".join(cells) + " |")
    cells = [f"**{med[c]['cpu_s']:.2f}** ({med[c]['user_s']:.2f} + {med[c]['sys_s']:.2f})"
             for c in clients]
    cells += [f"**{ratios[c]['cpu_ratio_median_of_repeats']:.3f}×** "
              f"({ratios[c]['cpu_ratio_range'][0]:.2f}–{ratios[c]['cpu_ratio_range'][1]:.2f})"
              for c in ratios]
    lines.append("| median | " + " | ".join(cells) + " |")
    lines += ["", "| client | CPU s | user s | sys s | µs/request | wall s | peak RSS MB | "
              "CPU / bare (median of repeats) | user / bare | sys / bare |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in clients:
        m = med[c]
        rt = ratios.get(c)
        lines.append(
            f"| {c} | {m['cpu_s']:.3f} | {m['user_s']:.3f} | {m['sys_s']:.3f} | "
            f"{1e6 * m['cpu_s'] / a.lines:.0f} | {m['wall_s']:.2f} | {m['peak_rss_mb']:.1f} | "
            + (f"{rt['cpu_ratio_median_of_repeats']:.3f}× | "
               f"{rt['user_ratio_median_of_repeats']:.3f}× | "
               f"{rt['sys_ratio_median_of_repeats']:.3f}× |" if rt else "1 | 1 | 1 |"))
    if syscalls:
        names = sorted({n for s in syscalls.values() for n in s["calls"]},
                       key=lambda n: -max(s["calls"].get(n, 0) for s in syscalls.values()))
        lines += ["", "Syscalls per request (`strace -c -f`, one run each, all threads):", "",
                  "| syscall | " + " | ".join(clients) + " |",
                  "|---|" + "---:|" * len(clients)]
        for n in names:
            per = [syscalls[c]["calls"].get(n, 0) / max(syscalls[c]["ok"], 1) for c in clients]
            if max(per) >= 0.01:
                lines.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in per) + " |")
        tot = [sum(syscalls[c]["calls"].values()) / max(syscalls[c]["ok"], 1) for c in clients]
        lines.append("| **total** | " + " | ".join(f"{v:.2f}" for v in tot) + " |")
    if invalid:
        lines += ["", "INVALID runs (not the same work):", *(f"* {x}" for x in invalid)]
    text = "\n".join(lines)
    print()
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.md").write_text(text + "\n")
    (out / "cpu.json").write_bytes(orjson.dumps({
        "lines": a.lines, "repeats": a.repeats, "concurrency": a.concurrency, "loop": a.loop,
        "elapsed_s": round(elapsed, 1), "command": ["bench/cpu_bench.py", *sys.argv[1:]],
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "trees": {k: str(v) for k, v in trees.items()},
        "median": med, "ratios": ratios, "runs": runs, "syscalls": syscalls,
        "invalid": invalid,
    }, option=orjson.OPT_INDENT_2))
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
