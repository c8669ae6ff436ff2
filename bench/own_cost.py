"""tmbatch's own work per request, in instructions, part by part: where the CPU over the bare
loop goes, without the network, the simulator or aiohttp in the count.

    python bench/own_cost.py                                  # base and the usual parts
    python bench/own_cost.py --variants base,nobudget,lean --lines 2000
    python bench/own_cost.py --tree before=/tmp/old-checkout  # base of another checkout too

`tmbatch run` runs as it does for a user (the reader, admission, the journal, the writer),
except that each line's send is answered at once by a stand-in for `client.send`: one yield to
the loop, as a zero-latency server costs, and a canned chat answer with its usage. What is left
is tmbatch's own per-request work plus that stand-in (the `nothing` variant: the reader and the
stand-in alone). Each variant runs under valgrind's callgrind on N and 2N lines; the
difference over N is the marginal instructions of one request, start-up taken out. Counts
repeat to within about 0.5 % on a busy machine, where CPU seconds swing by 30 %: this finds
what a part costs, and bench/cpu_bench.py says what that is worth in CPU seconds.

Variants are bench/ablate.py's (each takes a part out, which is NOT safe: a cost measurement
only), joined with "+", plus:
  base     the tree as it is
(ablate's `nothing`, the sender doing no more than call the stand-in and count the answer,
is the reader's cost and the stand-in's).
The result: a table on stdout (instructions/request, and against base).

`--cpu` measures the same runs in CPU seconds instead (user + sys of each child, no
callgrind; N and 2N lines, the median of `--repeats` interleaved runs of each): what a part
costs when it runs on its own, next to `bench/ablate.py`'s figures for the same variants over
real sockets, where aiohttp runs between its steps.
"""

from __future__ import annotations

import argparse
import os
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
from instructions import instructions  # noqa: E402

PY = sys.executable


def child(variant: str, inp: str, out: str) -> int:
    """One `tmbatch run` with the stand-in transport and `variant`'s patches applied."""
    import asyncio

    import ablate  # (puts this checkout first on sys.path: the tree measured goes before it)

    sys.path.insert(0, os.environ["OWN_COST_TREE"])

    import orjson
    from multidict import CIMultiDict, CIMultiDictProxy

    from tmbatch.client.http import Answer
    from tmbatch.run import attempts

    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json",
                                            "x-request-id": "own-cost"}))
    answered = [0]

    async def answer(session: Any, route: str, body: Any, hdrs: Any = None) -> Answer:
        await asyncio.sleep(0)  # a zero-latency server: the request goes, the answer comes
        answered[0] += 1
        raw = orjson.dumps({
            "id": f"chatcmpl-{answered[0]}", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Tea is a "
                         "drink."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})
        return Answer(200, "own-cost", orjson.loads(raw), 0.0004, None, headers, raw)

    post_init = attempts.LineSender.__post_init__

    def __post_init__(self: Any) -> None:
        post_init(self)
        self.transport = answer

    attempts.LineSender.__post_init__ = __post_init__  # type: ignore[method-assign]
    for v in variant.split("+"):
        if v != "base":
            ablate.PATCHES[v]()
    from tmbatch.cli.main import main as tmbatch_main

    os.environ["TENSORMESH_INFERENCE_API_KEY"] = "own-cost-key"
    rc = tmbatch_main(["run", inp, "-o", out, "-c", "64", "--quiet", "--no-preflight",
                       "--base-url", "http://127.0.0.1:9"])  # (nothing is sent there)
    if rc != 0 or answered[0] == 0:
        print(f"own_cost: exit {rc}, {answered[0]} answered", file=sys.stderr)
        return 1
    return 0


def count(variant: str, tree: Path, inp: Path, tmp: Path) -> int:
    """Instructions of one `--child` run of `variant` on `inp`, `tree`'s tmbatch imported."""
    out = tmp / f"out.{time.monotonic_ns()}"
    cmd = [PY, str(Path(__file__).resolve()), "--child", variant, str(inp), str(out)]
    return instructions(cmd, "uvloop", tmp, {"OWN_COST_TREE": str(tree)})


def cpu_seconds(variant: str, tree: Path, inp: Path, tmp: Path) -> float:
    """User + sys CPU seconds of one `--child` run of `variant` on `inp`, no callgrind."""
    out = tmp / f"out.{time.monotonic_ns()}"
    env = {**os.environ, "TMBATCH_LOOP": "uvloop", "OWN_COST_TREE": str(tree)}
    proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--child", variant, str(inp),
                             str(out)], cwd=ROOT, env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{variant}: the child exited with status {status}")
    return ru.ru_utime + ru.ru_stime


def cpu_rows(runs: list[tuple[str, str]], trees: dict[str, Path], inputs: list[Path],
             tmp: Path, n: int, repeats: int) -> list[tuple[str, float]]:
    """µs a request per variant: (median at 2N - median at N) / N, runs interleaved."""
    took: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(repeats):
        for variant, tree in runs:
            for i, inp in enumerate(inputs):
                took.setdefault((variant, tree, i), []).append(
                    cpu_seconds(variant, trees[tree], inp, tmp))
    rows = []
    for variant, tree in runs:
        small, big = (statistics.median(took[(variant, tree, i)]) for i in (0, 1))
        label = f"{variant} ({tree})" if tree else variant
        rows.append((label, 1e6 * (big - small) / n))
        print(f"  {label:<40} {rows[-1][1]:>10,.1f} CPU µs/request", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="base,nothing,lean,nobudget,noadmission,noreader,"
                   "noresult,nodispatch,nostats")
    p.add_argument("--lines", type=int, default=2000, help="N (the runs use N and 2N)")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="also the base of another checkout (DIR holds its tmbatch/)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU seconds instead of instructions (use --lines 10000 or more)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each, with --cpu")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    trees = {"": ROOT}
    for spec in a.tree:
        name, _, d = spec.partition("=")
        trees[name] = Path(d).resolve()
    runs = [(v, "") for v in a.variants.split(",")] + [("base", n) for n in trees if n]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tmbatch-own-") as d:
        tmp = Path(d)
        inputs = [write_input(tmp / f"in-{n}.jsonl", n) for n in (a.lines, 2 * a.lines)]
        if a.cpu:
            rows = cpu_rows(runs, trees, inputs, tmp, a.lines, a.repeats)
        else:
            for variant, tree in runs:
                small, big = (count(variant, trees[tree], inp, tmp) for inp in inputs)
                label = f"{variant} ({tree})" if tree else variant
                rows.append((label, (big - small) / a.lines))
                print(f"  {label:<40} {rows[-1][1]:>10,.0f} instructions/request", flush=True)
    base = dict(rows).get("base")
    unit = "CPU µs/request" if a.cpu else "instructions/request"
    print(f"\n| variant | {unit} | against base |\n|---|---:|---:|")
    for label, n in rows:
        vs = f"{n - base:+,.{1 if a.cpu else 0}f}" if base is not None else ""
        print(f"| {label} | {n:,.{1 if a.cpu else 0}f} | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
