"""Side-by-side benchmark: tmbatch vs the bare aiohttp lower bound vs the openai SDK.

    python bench/run_bench.py [--quick] [--scenarios a,b,c,d,e,f] [--out bench/results]

Every client and the simulator run as separate processes on 127.0.0.1, so a
client's CPU (user+sys from os.wait4 of that child alone) and peak RSS
(ru_maxrss) are its own. Clients are interleaved (the order rotates each
repeat) and the median of the repeats is reported, because the machine is
shared and a single run can be off by 30 %.

Time to the first request: the driver notes time.monotonic() just before it
spawns the client, and a thread polls GET /_sim/stats every 10 ms until
`received` moves; that poll gives the time to +-10 ms. The sim's own log
(arrival times from time.monotonic() in the sim process) gives a second figure;
on Linux both processes read the same CLOCK_MONOTONIC, which the driver checks
against the sim's `time_now` once per simulator, so that figure is exact.

Outputs: OUT/results.md (tables, targets met or missed) and OUT/results.json
(every run, medians, machine facts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gen import fabricate_resume, write_input  # noqa: E402

CLIENTS = ("tmbatch", "bare", "openai")
# Event loop for tmbatch and the bare loop alike (TMBATCH_LOOP): "auto" = uvloop when installed.
LOOP = ["auto"]
ROUTE = "/v1/chat/completions"
PY = sys.executable


@dataclass
class Scenario:
    key: str
    title: str
    input_lines: int
    concurrency: int
    sim_flags: list[str]
    stream: bool = False
    tm_flags: list[str] = field(default_factory=list)
    bare_flags: list[str] = field(default_factory=list)
    latency: float = 0.0
    rate_limit: float | None = None
    cap_seconds: float | None = None  # stop the client (SIGTERM) after this long
    clients: tuple[str, ...] = CLIENTS
    resume_done: int = 0  # (e): fabricate this many done lines before each run


def scenarios(quick: bool, full_1m: bool) -> dict[str, Scenario]:
    q = quick
    cap_d = None if full_1m else (6.0 if q else 20.0)
    return {
        "s": Scenario("s", "startup: one request (import, setup, exit)", 1, 64, []),
        "a": Scenario("a", "chat, zero latency, no limits (client overhead)",
                      5_000 if q else 20_000, 64, []),
        "b": Scenario("b", "200 ms latency, concurrency 256 (Little's law)",
                      2_000 if q else 5_000, 256, ["--sim-latency", "0.2"], latency=0.2),
        "c": Scenario("c", "server limit 200 req/s, tmbatch --rpm 12000",
                      1_000 if q else 3_000, 64, ["--sim-rate-limit", "200"],
                      tm_flags=["--rpm", "12000"], bare_flags=["--rps", "200"],
                      rate_limit=200.0),
        "d": Scenario("d", "1,000,000-line input (RSS, time to first request)"
                      + ("" if cap_d is None else f", stopped after {cap_d:g} s"),
                      1_000_000, 64, [], cap_seconds=cap_d,
                      clients=("tmbatch", "bare", "openai") if cap_d else ("tmbatch",)),
        "e": Scenario("e", "resume of the 1M-line job with 999,000 lines done",
                      1_000_000, 64, [], clients=("tmbatch",), resume_done=999_000),
        "f": Scenario("f", "streaming, 64 chunks per answer",
                      1_000 if q else 5_000, 64, ["--sim-stream-chunks", "64"], stream=True),
    }


# -- the simulator ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sim:
    """`tmbatch sim` as a child process; reset between client runs so counts are per run."""

    def __init__(self, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PY, "-m", "tmbatch", "sim", "--port", str(self.port), *flags],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                before = time.monotonic()
                now = self.stats()["time_now"]
                after = time.monotonic()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.05)
        self.same_clock = before <= now <= after

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return orjson.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self.get("/_sim/stats")

    def received(self) -> int:
        return int(self.stats()["by_route"][ROUTE]["received"])

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_sim/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- one client run --------------------------------------------------------------------------


def tmbatch_help() -> str:
    return subprocess.run([PY, "-m", "tmbatch", "run", "--help"], cwd=ROOT,
                          capture_output=True, text=True).stdout


def client_cmd(client: str, sc: Scenario, inp: Path, out: Path, url: str,
               has_no_preflight: bool) -> list[str]:
    if client == "tmbatch":
        cmd = [PY, "-m", "tmbatch", "run", str(inp), "-o", str(out), "-c", str(sc.concurrency),
               "--quiet", "--base-url", url, *sc.tm_flags]
        if has_no_preflight:
            cmd.append("--no-preflight")
        return cmd
    if client == "bare":
        return [PY, str(HERE / "bare_aiohttp.py"), str(inp), str(out), url,
                str(sc.concurrency), *sc.bare_flags]
    return [PY, str(HERE / "openai_client.py"), str(inp), str(out), url, str(sc.concurrency)]


def poll_first_request(sim: Sim, proc: subprocess.Popen[bytes], t0: float,
                       box: dict[str, float]) -> None:
    """Time from spawn to the first request the sim sees, to +-10 ms (see module doc)."""
    while proc.poll() is None:
        try:
            if sim.received() > 0:  # billable route only: preflight GETs do not count
                box["first_request_s"] = time.monotonic() - t0
                return
        except OSError:
            pass
        time.sleep(0.01)


def sample_rss(pid: int, results: Path, stop: threading.Event, t0: float,
               trace: list[tuple[float, float, int]], hwm: list[float]) -> None:
    """(seconds, RSS MB, bytes of results so far) every 0.05 s: memory against progress.

    The peak is VmHWM of the child's own address space. ru_maxrss from wait4 is not
    used: on Linux it starts from the driver's RSS at fork, so once the driver holds a
    big stats reply every child would report at least that.
    """
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for ln in status.read_text().splitlines():
                if ln.startswith("VmHWM:"):
                    hwm.append(int(ln.split()[1]) / 1024)
                if ln.startswith("VmRSS:"):
                    rss = int(ln.split()[1]) / 1024
                    size = results.stat().st_size if results.exists() else 0
                    trace.append((round(time.monotonic() - t0, 2), round(rss, 1), size))
        except (OSError, ValueError):
            pass
        stop.wait(0.05)


def run_client(client: str, sc: Scenario, inp: Path, work: Path, sim: Sim,
               has_no_preflight: bool, template: Path | None) -> dict[str, Any]:
    out = work / f"{sc.key}-{client}"
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if template is not None:
        shutil.copytree(template, out)
    results = out / "results.jsonl" if client == "tmbatch" else out
    base_results = results.stat().st_size if results.exists() else 0
    sim.reset()
    # Bytecode cached as an installed package would have it, outside the source tree.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(TENSORMESH_INFERENCE_API_KEY="tm-bench-key", OPENAI_API_KEY="sk-bench",
               PYTHONPYCACHEPREFIX=str(work / "pycache"), TMBATCH_LOOP=LOOP[0])
    cmd = client_cmd(client, sc, inp, out, sim.url, has_no_preflight)
    box: dict[str, float] = {}
    trace: list[tuple[float, float, int]] = []
    hwm: list[float] = [0.0]
    stop = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    poller = threading.Thread(target=poll_first_request, args=(sim, proc, t0, box), daemon=True)
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, results, stop, t0, trace, hwm),
                               daemon=True)
    poller.start()
    sampler.start()
    timer = None
    if sc.cap_seconds is not None:
        timer = threading.Timer(sc.cap_seconds, lambda: proc.poll() is None
                                and proc.send_signal(signal.SIGTERM))
        timer.start()
    # stdout/stderr are small (a line or a summary); drain them so the child never blocks.
    drained: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        drained[name] = stream.read()

    drains = [threading.Thread(target=drain, args=(n, s), daemon=True)
              for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for d in drains:
        d.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timer is not None:
        timer.cancel()
    stop.set()
    for th in (poller, sampler, *drains):
        th.join(5)
    stats = sim.stats()
    log = [e for e in stats.get("log") or [] if e[1] == ROUTE]
    route = stats["by_route"][ROUTE]
    n = route["received"]
    ok = route["status_counts"].get("200", 0)
    cpu = ru.ru_utime + ru.ru_stime
    done_bytes = (results.stat().st_size if results.exists() else 0) - base_results
    row: dict[str, Any] = {
        "client": client, "exit": proc.returncode, "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3), "user_s": round(ru.ru_utime, 3), "sys_s": round(ru.ru_stime, 3),
        "peak_rss_mb": round(max(hwm), 1) if max(hwm) else round(ru.ru_maxrss / 1024, 1),
        "ru_maxrss_mb": round(ru.ru_maxrss / 1024, 1), "received": n, "ok": ok,
        "rejected_429": stats["rejected_429"], "duplicates": stats["duplicates"],
        "status_counts": stats["status_counts"],
        "cpu_us_per_req": round(1e6 * cpu / ok, 1) if ok else None,
        "req_per_s": round(ok / wall, 1) if wall else None,
        "first_request_s": box.get("first_request_s"),
        "results_bytes": done_bytes,
        "stderr_tail": drained.get("err", b"")[-600:].decode("utf-8", "replace"),
    }
    if log and sim.same_clock:
        row["first_request_s_log"] = round(log[0][0] - t0, 4)
    if log and len(log) >= 2 and stats.get("log_overflow", 0) == 0:
        arrivals = [e[0] for e in log]
        span = arrivals[-1] - arrivals[0] + sc.latency
        row["active_req_per_s"] = round(ok / span, 1) if span > 0 else None
        if sc.rate_limit or sc.latency:
            # Steady state. With a limit, skip the first 2 s (the one-second burst both
            # buckets allow) and the last second; with latency, the first and last 0.5 s
            # (connections being opened, the last wave draining).
            head, tail = (2.0, 1.0) if sc.rate_limit else (0.5, 0.5)
            lo, hi = arrivals[0] + head, arrivals[-1] - tail
            mid = [e for e in log if lo <= e[0] <= hi and e[3] == 200]
            row["steady_ok_per_s"] = round(len(mid) / (hi - lo), 1) if hi > lo else None
    if trace and sc.key == "d":
        row["rss_trace"] = trace
    return row


# -- aggregation and report ------------------------------------------------------------------

NUMERIC = ("wall_s", "cpu_s", "cpu_us_per_req", "marginal_us_per_req", "req_per_s",
           "peak_rss_mb", "first_request_s",
           "first_request_s_log", "active_req_per_s", "steady_ok_per_s", "rejected_429", "ok")


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"client": rows[0]["client"], "runs": len(rows)}
    for k in NUMERIC:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(statistics.median(vals), 4) if vals else None
    return out


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def table(sc: Scenario, med: dict[str, dict[str, Any]]) -> list[str]:
    bare = med.get("bare", {})
    lines = [
        f"### ({sc.key}) {sc.title}: {sc.input_lines:,} lines, concurrency {sc.concurrency}",
        "",
        "| client | wall s | CPU s | CPU µs/req | marginal µs/req | req/s | active req/s "
        "| peak RSS MB | first req s | 429s | ok | CPU/req vs bare | wall vs bare "
        "| RSS vs bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sc.clients:
        m = med.get(c)
        if not m:
            continue
        first = m.get("first_request_s_log") or m.get("first_request_s")
        lines.append(
            f"| {c} | {fmt(m['wall_s'], 2)} | {fmt(m['cpu_s'], 2)} | {fmt(m['cpu_us_per_req'], 0)} "
            f"| {fmt(m['marginal_us_per_req'], 0)} | {fmt(m['req_per_s'], 0)} "
            f"| {fmt(m['active_req_per_s'], 0)} "
            f"| {fmt(m['peak_rss_mb'], 1)} | {fmt(first, 3)} | {fmt(m['rejected_429'], 0)} "
            f"| {fmt(m['ok'], 0)} | {ratio(m['cpu_us_per_req'], bare.get('cpu_us_per_req'))} "
            f"| {ratio(m['wall_s'], bare.get('wall_s'))} "
            f"| {ratio(m['peak_rss_mb'], bare.get('peak_rss_mb'))} |"
        )
    return lines


def targets(scs: dict[str, Scenario], med: dict[str, dict[str, dict[str, Any]]],
            runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Issue 5's targets, each with the figure that decides it."""
    out = ["| target | figure | met |", "|---|---|---|"]

    def row(name: str, figure: str, ok: bool | None) -> None:
        out.append(f"| {name} | {figure} | {'–' if ok is None else ('yes' if ok else 'NO')} |")

    def get(s: str, c: str, k: str) -> Any:
        return med.get(s, {}).get(c, {}).get(k)

    if "a" in med:
        tm, bare, oa = (get("a", c, "cpu_us_per_req") for c in CLIENTS)
        if tm and bare:
            row("(a) CPU/req ≤ 1.3 × bare aiohttp", f"{tm:.0f} / {bare:.0f} µs = {tm / bare:.2f}×",
                tm <= 1.3 * bare)
        if tm and oa:
            row("(a) CPU/req ≥ 3 × less than openai SDK", f"{oa:.0f} / {tm:.0f} µs = "
                f"{oa / tm:.1f}× less", oa >= 3 * tm)
    if "b" in med:
        sc = scs["b"]
        bound = sc.concurrency / sc.latency
        for k, label in (("steady_ok_per_s", "steady state (first and last 0.5 s out)"),
                         ("active_req_per_s", "from first to last request"),
                         ("req_per_s", "whole process, startup included")):
            v = get("b", "tmbatch", k)
            if v:
                row(f"(b) ≥ 95 % of Little's bound ({bound:.0f}/s), {label}",
                    f"{v:.0f}/s = {100 * v / bound:.1f} %", v >= 0.95 * bound)
    if "c" in med:
        v = get("c", "tmbatch", "steady_ok_per_s")
        if get("c", "bare", "steady_ok_per_s"):
            row("(c) bare aiohttp with the same limit, for reference",
                f"{get('c', 'bare', 'steady_ok_per_s'):.1f}/s, "
                f"{get('c', 'bare', 'rejected_429'):.0f} 429s", None)
        lim = scs["c"].rate_limit or 0
        if v:
            row("(c) achieved rate within 2 % of the limit (steady state)",
                f"{v:.1f}/s vs {lim:.0f}/s ({100 * (v - lim) / lim:+.1f} %)",
                abs(v - lim) <= 0.02 * lim)
        n429 = get("c", "tmbatch", "rejected_429")
        if n429 is not None:
            row("(c) zero 429s with --rpm", f"{n429:.0f} (max over runs "
                f"{max(r['rejected_429'] for r in runs.get('c:tmbatch', [{'rejected_429': 0}]))})",
                n429 == 0)
    if "d" in med:
        rss, first = get("d", "tmbatch", "peak_rss_mb"), (
            get("d", "tmbatch", "first_request_s_log") or get("d", "tmbatch", "first_request_s"))
        if rss:
            row("(d) peak RSS ≤ 150 MB", f"{rss:.1f} MB", rss <= 150)
        if first is not None:
            row("(d) first request ≤ 1 s", f"{first:.3f} s", first <= 1.0)
        flat = runs.get("d:tmbatch", [{}])[-1].get("rss_flat")
        if flat:
            row("(d) RSS flat (at ~10k requests vs at the end)", flat["text"], flat["ok"])
    if "e" in med:
        rss = get("e", "tmbatch", "peak_rss_mb")
        first = get("e", "tmbatch", "first_request_s_log") or get("e", "tmbatch",
                                                                   "first_request_s")
        if first is not None:
            row("(e) first new request ≤ 5 s", f"{first:.2f} s", first <= 5.0)
        if rss:
            row("(e) peak RSS ≤ 150 MB", f"{rss:.1f} MB", rss <= 150)
    if "f" in med and "a" in med:
        for k, label in (("marginal_us_per_req", "startup taken out"),
                         ("cpu_us_per_req", "raw, startup included")):
            s, a = get("f", "tmbatch", k), get("a", "tmbatch", k)
            if s and a:
                row(f"(f) streamed CPU/req ≤ 1.5 × non-streamed, {label}",
                    f"{s:.0f} / {a:.0f} µs = {s / a:.2f}×", s <= 1.5 * a)
    return out


def rss_flatness(row: dict[str, Any]) -> dict[str, Any] | None:
    """RSS when ~10k results were written vs at the end, from the sampled trace."""
    trace = row.get("rss_trace") or []
    ok = row.get("ok") or 0
    total = row.get("results_bytes") or 0
    if not trace or not ok or not total:
        return None
    per_line = total / ok
    at10k = next((rss for _, rss, size in trace if size / per_line >= 10_000), None)
    end = max(rss for _, rss, _ in trace)
    if at10k is None:
        return None
    return {"at_10k_mb": at10k, "max_mb": end, "lines_at_end": ok,
            "text": f"{at10k:.0f} MB at 10k results, {end:.0f} MB max by {ok:,} results",
            "ok": end <= at10k * 1.15 + 5}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one repeat, smaller inputs (~2 min)")
    p.add_argument("--scenarios", default="s,a,b,c,d,e,f",
                   help="s measures each client's startup CPU, taken out of 'marginal µs/req'")
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--repeats", type=int, default=None, help="default 3, or 1 with --quick")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--data", default="/tmp/tmbatch-bench",
                   help="generated inputs and client outputs (the 1M file is ~260 MB)")
    p.add_argument("--full-1m", action="store_true",
                   help="(d): send all 1,000,000 requests with tmbatch alone (~7 min) instead "
                        "of stopping each client after 20 s")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="event loop of tmbatch and the bare loop (TMBATCH_LOOP); auto = uvloop "
                   "when installed")
    a = p.parse_args()
    LOOP[0] = a.loop
    repeats = a.repeats or (1 if a.quick else 3)
    scs = scenarios(a.quick, a.full_1m)
    chosen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    wanted_clients = set(a.clients.split(","))
    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_no_preflight = "--no-preflight" in tmbatch_help()
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {}
    # Warm-up: one untimed run of each client, so bytecode caches and the page cache are
    # warm before anything is measured (the first run of a client would pay compilation).
    warm = scs["s"]
    warm_inp = write_input(data / "in-1.jsonl", 1)
    sim = Sim([])
    try:
        for client in CLIENTS:
            if client in wanted_clients:
                run_client(client, warm, warm_inp, data, sim, has_no_preflight, None)
    finally:
        sim.stop()
    med: dict[str, dict[str, dict[str, Any]]] = {}
    for key in chosen:
        sc = scs[key]
        sc.clients = tuple(c for c in sc.clients if c in wanted_clients)
        inp = write_input(data / f"in-{sc.input_lines}{'-stream' if sc.stream else ''}.jsonl",
                          sc.input_lines, sc.stream)
        template = None
        if sc.resume_done:
            template = data / f"resume-{sc.resume_done}"
            marker = template / ".complete-spend"  # fabricated with spend snapshots
            if not marker.exists():
                t = time.monotonic()
                fabricate_resume(inp, template, sc.resume_done)
                marker.touch()
                print(f"  fabricated {template} in {time.monotonic() - t:.1f} s", flush=True)
        sim = Sim(sc.sim_flags)
        print(f"({key}) {sc.title} [sim {' '.join(sc.sim_flags) or 'defaults'}]", flush=True)
        try:
            for r in range(repeats):
                order = list(sc.clients[r % len(sc.clients):] + sc.clients[:r % len(sc.clients)])
                for client in order:
                    row = run_client(client, sc, inp, data, sim, has_no_preflight, template)
                    if key == "d" and client == "tmbatch":
                        row["rss_flat"] = rss_flatness(row)
                    row["repeat"] = r
                    runs.setdefault(f"{key}:{client}", []).append(row)
                    print(f"  {client:8s} r{r} wall {row['wall_s']:7.2f}s cpu {row['cpu_s']:6.2f}s"
                          f" {fmt(row['cpu_us_per_req'], 0):>6} µs/req rss "
                          f"{row['peak_rss_mb']:6.1f}MB first {fmt(row['first_request_s'], 3)}s"
                          f" ok {row['ok']} 429 {row['rejected_429']} exit {row['exit']}",
                          flush=True)
                    if row["exit"] not in (0, 130, 143, -2, -15) or (row["ok"] == 0):
                        print("    stderr: " + row["stderr_tail"].strip()[-400:], flush=True)
        finally:
            sim.stop()
        med[key] = {c: median_row(runs[f"{key}:{c}"]) for c in sc.clients
                    if f"{key}:{c}" in runs}
        for c, m in med[key].items():
            start = med.get("s", {}).get(c, {}).get("cpu_s")
            if start is not None and m.get("ok") and key != "s":
                m["marginal_us_per_req"] = round(1e6 * (m["cpu_s"] - start) / m["ok"], 1)
    elapsed = time.monotonic() - started
    md = [f"# tmbatch benchmark ({'quick' if a.quick else 'full'}, median of {repeats})", "",
          f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"total {elapsed:.0f} s. Command: `python bench/run_bench.py "
          f"{' '.join(sys.argv[1:])}`".rstrip(), ""]
    for key in chosen:
        md += [*table(scs[key], med[key]), ""]
    md += ["## Targets (issue 5)", "", *targets(scs, med, runs), ""]
    text = "\n".join(md)
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_bytes(orjson.dumps({
        "quick": a.quick, "repeats": repeats, "elapsed_s": round(elapsed, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "scenarios": {k: asdict(scs[k]) for k in chosen}, "median": med, "runs": runs,
    }, option=orjson.OPT_INDENT_2))
    print()
    print(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
