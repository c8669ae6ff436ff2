"""Ablations: what one change to tmbatch is worth in CPU µs per request, before editing the code.

    python bench/ablate.py --variants base,fastpath,uvloop --n 20000 --repeats 3

Each variant runs `tmbatch run` in a fresh child process with a monkeypatch
applied (or none), against one `tmbatch sim` process; variants are interleaved
and the median of the repeats is printed. CPU is user+sys of the child alone
(os.wait4), so the number answers "how much client CPU does this save".

Variants:
  base       tmbatch as it is in the working tree
  fastpath   first attempt without tenacity; tenacity only after a failure
  nodispatch no journal write per dispatch (a cost measurement only, NOT safe)
  gcfreeze   gc.freeze() after imports (startup objects out of every collection)
  uvloop     the uvloop event loop, when importable
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def patch_fastpath() -> None:
    """Runner.process: the common case (first attempt succeeds) skips tenacity entirely.

    A failed first attempt is replayed into the same AsyncRetrying loop as attempt 1,
    so the predicate, stop conditions, attempt numbers and waits are those of the
    unpatched code.
    """
    from tmbatch import runner as r

    original = r.Runner.process

    async def process(self: Any, req: Any) -> None:
        tokens = r.estimate_tokens(req.body)
        headers = None
        if not req.idempotent:
            headers = {"Idempotency-Key": r.idempotency_key(self.header["job"], req.custom_id)}
        counter = [0]
        try:
            answer = await self._attempt(req, tokens, headers, counter)
        except (r.Stopped, r.AttemptFailed):
            return await original(self, req)  # measurement only: the real fix replays
        self._succeed(req, answer, tokens, counter[0])

    r.Runner.process = process  # type: ignore[method-assign]


def patch_nodispatch() -> None:
    from tmbatch import writer as w

    def dispatch(self: Any, line: int, attempt: int, custom_id: str) -> None:
        self.states.set(line, 1)

    w.Writer.dispatch = dispatch  # type: ignore[method-assign]


def child(variant: str, argv: list[str]) -> int:
    for v in variant.split("+"):
        if v == "fastpath":
            patch_fastpath()
        elif v == "nodispatch":
            patch_nodispatch()
        elif v == "uvloop":
            import uvloop

            uvloop.install()
    from tmbatch.cli import main

    if "gcfreeze" in variant:
        import gc

        gc.freeze()
    return main(argv)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="base,fastpath")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--data", default="/tmp/tmbatch-bench")
    p.add_argument("--child", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1:])
    from gen import write_input
    from run_bench import Sim

    inp = write_input(Path(a.data) / f"in-{a.n}{'-stream' if a.stream else ''}.jsonl", a.n,
                      a.stream)
    sim = Sim(["--sim-stream-chunks", "64"] if a.stream else [])
    variants = a.variants.split(",")
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    env = {**os.environ, "TENSORMESH_INFERENCE_API_KEY": "tm-bench-key"}
    try:
        for rep in range(a.repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                out = Path(a.data) / f"ablate-{v}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                sim.reset()
                t0 = time.monotonic()
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--child", v, "run", str(inp), "-o", str(out),
                     "-c", str(a.concurrency), "-q", "--no-preflight", "--base-url", sim.url],
                    cwd=ROOT, env=env)
                _, _status, ru = os.wait4(proc.pid, 0)
                wall = time.monotonic() - t0
                ok = sim.stats()["by_route"]["/v1/chat/completions"]["status_counts"].get("200")
                us = 1e6 * (ru.ru_utime + ru.ru_stime) / a.n
                cpu[v].append(us)
                print(f"{v:24s} r{rep} {us:7.0f} µs/req  wall {wall:6.2f}s  ok {ok}  "
                      f"rss {ru.ru_maxrss / 1024:.0f} MB", flush=True)
    finally:
        sim.stop()
    base = statistics.median(cpu[variants[0]])
    print(f"\nmedian CPU µs/req over {a.repeats} ({a.n:,} requests, c={a.concurrency}):")
    for v in variants:
        m = statistics.median(cpu[v])
        print(f"  {v:24s} {m:7.0f}  ({100 * (m - base) / base:+.1f} % vs {variants[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
