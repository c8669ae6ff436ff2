"""CPU per request as instructions, counted by valgrind's callgrind: repeatable on a busy machine.

Wall-clock CPU figures (bench/run_bench.py) swing by 30 % on a shared 2-core machine; an
instruction count does not, so this is the figure to compare a change against. Each client
runs under callgrind twice, on N and on 2N lines, against the simulator (a separate, native
process on 127.0.0.1); the difference divided by N is the marginal cost of one request, with
start-up taken out. tmbatch and the bare aiohttp loop run on the same event loop.

    python bench/instructions.py                      # chat, streamed chat; asyncio and uvloop
    python bench/instructions.py --lines 1000 --loops asyncio --kinds chat

Output: a table of instructions per request and tmbatch / bare, and OUT/instructions.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gen import write_input  # noqa: E402

PY = sys.executable
TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sim(chunks: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "tmbatch", "sim", "--port", str(port),
                             "--sim-stream-chunks", str(chunks)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def client_cmd(client: str, inp: Path, out: Path, url: str, concurrency: int) -> list[str]:
    if client == "tmbatch":
        return [PY, "-m", "tmbatch", "run", str(inp), "-o", str(out), "-c", str(concurrency),
                "--quiet", "--no-preflight", "--base-url", url]
    return [PY, str(HERE / "bare_aiohttp.py"), str(inp), str(out), url, str(concurrency)]


def instructions(cmd: list[str], loop: str, tmp: Path,
                 env: dict[str, str] | None = None) -> int:
    """Total instructions of one client process, under callgrind (`env`: more variables)."""
    out_file = tmp / f"cg.{time.monotonic_ns()}"
    env = {**os.environ, "TMBATCH_LOOP": loop, "TENSORMESH_INFERENCE_API_KEY": "bench-key",
           **(env or {})}
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                           *cmd], cwd=ROOT, env=env, capture_output=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {done.stderr[-2000:].decode(errors='replace')}")
    found = TOTALS.search(out_file.read_bytes())
    out_file.unlink()
    if found is None:
        raise RuntimeError("no totals in the callgrind output")
    return int(found.group(1))


def marginal(client: str, loop: str, kind: str, n: int, url: str, tmp: Path,
             concurrency: int) -> float:
    counts = []
    for size in (n, 2 * n):
        inp = write_input(tmp / f"{kind}-{size}.jsonl", size, stream=kind == "stream")
        out = tmp / f"out-{client}-{loop}-{kind}-{size}-{time.monotonic_ns()}"
        target = out if client == "tmbatch" else out.with_suffix(".jsonl")
        counts.append(instructions(client_cmd(client, inp, target, url, concurrency), loop, tmp))
    return (counts[1] - counts[0]) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=2000, help="N (the runs use N and 2N)")
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument("--kinds", default="chat,stream", help="chat and/or stream (64 chunks)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--clients", default="tmbatch,bare",
                   help="tmbatch and/or bare (the ratio needs both)")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tmbatch-instr-") as d:
        tmp = Path(d)
        for kind in a.kinds.split(","):
            sim, url = start_sim(64 if kind == "stream" else 8)
            try:
                for loop in a.loops.split(","):
                    per = {c: marginal(c, loop, kind, a.lines, url, tmp, a.concurrency)
                           for c in a.clients.split(",")}
                    row: dict[str, object] = {"kind": kind, "loop": loop, **per}
                    text = "  ".join(f"{c} {v:>10,.0f}" for c, v in per.items())
                    if "tmbatch" in per and "bare" in per:
                        row["ratio"] = per["tmbatch"] / per["bare"]
                        text += f"  instructions/request  ratio {row['ratio']:.2f}"
                    rows.append(row)
                    print(f"{kind:7} {loop:8} {text}", flush=True)
            finally:
                sim.terminate()
                sim.wait(10)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "instructions.json").write_bytes(orjson.dumps(
        {"lines": a.lines, "concurrency": a.concurrency, "rows": rows},
        option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
