"""Ablations: what one change to tmbatch is worth in CPU µs per request, before editing the code.

    python bench/ablate.py --variants base,lean,noadmission,nobudget --n 20000 --repeats 3

Each variant runs `tmbatch run` in a fresh child process with a monkeypatch
applied (or none), against one `tmbatch sim` process; variants are interleaved
and the median of the repeats is printed. CPU is user+sys of the child alone
(os.wait4), so the number answers "how much client CPU does this save".

Variants (join several with "+"; all but base and uvloop are cost measurements
only and NOT safe: they take out part of what tmbatch does to see what that part costs):
  base        tmbatch as it is in the working tree
  bare        bench/bare_aiohttp.py on the same loop, for the ratio (not a patch)
  nodispatch  no journal write per dispatch
  noresult    no results/journal outcome records written (the line's state only)
  noreader    lines parsed by orjson.loads alone: no checks, no duplicate-id set
  noidset     no duplicate-id set (every custom_id taken as new)
  nofsync     no fsync (as --fsync never)
  nobudget    no spend tracking (Budget.track gives the free reservation)
  nosnapshot  spend tracked, but no spend snapshot in the journal writes after attempts end
  noadmission no admission: a permit that only carries the attempt's spend (no lane, pause,
              pace, slot or tokens, nothing learnt from answers)
  noheaders   no Idempotency-Key header, and an X-Request-Id as short as it gets
  nostats     no latency histogram
  nothing     LineSender.process cut to the send alone (no record, no admission, no
              outcome: the lines stay pending): the reader, the workers and aiohttp, which
              is what the bare loop does, through tmbatch's loop
  lean        LineSender.process cut to what every success needs: the dispatch record, the
              send, the result record (no admission, spend, retry bookkeeping, stats): what
              retry.py, limits/ and budget.py cost together on the common path
  uvloop      the uvloop event loop, when importable (the default when installed)

Earlier variants now in the code: `fastpath` (the first attempt without tenacity), `fasttask`
(the worker's task handed to the sender instead of asyncio.current_task()) and `gcfreeze`
(the start's objects frozen out of the collector's way, `cli._main`).

The children run on TMBATCH_LOOP (default uvloop), with bytecode cached outside the tree and
one untimed warm-up run of each variant first.
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


def patch_nodispatch() -> None:
    from tmbatch.journal import writer as w

    def dispatch(self: Any, line: int, attempt: int, custom_id: str,
                 reserved: Any = None) -> None:
        self.states.set(line, 1)

    w.Writer.dispatch = dispatch  # type: ignore[method-assign]


def patch_noresult() -> None:
    from tmbatch.journal import writer as w
    from tmbatch.journal.compact import OK

    def result(self: Any, record: Any, latency: Any = None, ttft: Any = None) -> None:
        self.states.set(record.line, OK)

    w.Writer.result = result  # type: ignore[method-assign]


def patch_noreader() -> None:
    import orjson

    from tmbatch.inputs import reader as rd

    def read_requests(f: Any, **kw: Any) -> Any:
        stats = kw.get("stats")
        for n, raw in enumerate(f, 1):
            if stats is not None:
                stats.lines = n
            obj = orjson.loads(raw)
            yield rd.Request(n, obj["custom_id"], obj["url"], obj["body"])

    rd.read_requests = read_requests
    from tmbatch.run import runner

    runner.read_requests = read_requests  # type: ignore[assignment]


def patch_noidset() -> None:
    from tmbatch.journal import compact

    compact.IdSet.add = lambda self, custom_id: True  # type: ignore[method-assign]


def patch_nofsync() -> None:
    from tmbatch.journal import writer as w

    w.Writer._fsync_fds = lambda self: None  # type: ignore[method-assign]


def patch_nobudget() -> None:
    from tmbatch.spend import budget as b

    b.Budget.track = lambda self, req: b.FREE  # type: ignore[method-assign]


def patch_nosnapshot() -> None:
    from tmbatch.spend import budget as b

    b.Budget.due = lambda self: None  # type: ignore[method-assign]


def patch_noadmission() -> None:
    from tmbatch.limits import admission as adm

    class SpendOnly:
        """The permit's contract without its gates: the spend is held, settled and ended."""

        __slots__ = ("admission", "sent_at", "spend")

        def __init__(self, admission: Any, req: Any) -> None:
            self.admission = admission
            self.spend = admission.budget.track(req)
            self.sent_at = 0.0

        async def __aenter__(self) -> Any:
            self.sent_at = self.admission.now()  # (the timeout sweep reads it)
            return self

        async def __aexit__(self, *exc: object) -> None:
            if not self.spend.settled:
                self.spend.end()

        def ok(self, body: Any, used: Any, tokens: int, headers: Any) -> None:
            self.spend.succeeded(body, used)

        def failed(self, failure: Any) -> None:
            self.spend.failed(failure)

    adm.Admission.permit = lambda self, req: SpendOnly(self, req)  # type: ignore[assignment]


def patch_noheaders() -> None:
    from tmbatch.client import http as client
    from tmbatch.run import attempts as retry

    original = client.send

    async def send(session: Any, route: str, body: Any, headers: Any = None) -> Any:
        return await original(session, route, body, None)

    post_init = retry.LineSender.__post_init__

    def __post_init__(self: Any) -> None:
        post_init(self)
        self.transport = send  # (the field's default is bound when the class is made)

    retry.LineSender.__post_init__ = __post_init__  # type: ignore[method-assign]
    client._ID_PREFIX = ""  # the X-Request-Id stays, as short as it gets


def patch_nostats() -> None:
    from tmbatch.run import summary

    summary.Histogram.add = lambda self, seconds: None  # type: ignore[method-assign]


def patch_lean() -> None:
    from tmbatch.run import attempts as r

    async def process(self: Any, req: Any, task: Any = None) -> None:
        headers = None
        if not req.idempotent:
            headers = {"Idempotency-Key": r.idempotency_key(self.job_id, req.custom_id)}
        self.writer.dispatch(req.line, 1, req.custom_id)
        answer = await self.transport(self.session, req.url, req.body, headers)
        self.stats.ok += 1
        self.writer.result(r.ResultRecord(
            r.record_id(self.job_id, req.custom_id), req.custom_id, req.line,
            r.RecordedResponse(answer.status, answer.request_id, answer.body), None,
            answer.raw), answer.latency, answer.ttft)

    r.LineSender.process = process  # type: ignore[method-assign]


def patch_nothing() -> None:
    from tmbatch.run import attempts as r

    async def process(self: Any, req: Any, task: Any = None) -> None:
        await self.transport(self.session, req.url, req.body, None)
        self.stats.ok += 1

    r.LineSender.process = process  # type: ignore[method-assign]


PATCHES = {"nodispatch": patch_nodispatch, "nothing": patch_nothing,
           "noresult": patch_noresult, "noreader": patch_noreader, "noidset": patch_noidset,
           "nofsync": patch_nofsync,
           "nobudget": patch_nobudget, "nosnapshot": patch_nosnapshot,
           "noadmission": patch_noadmission, "noheaders": patch_noheaders,
           "nostats": patch_nostats, "lean": patch_lean}


def child(variant: str, argv: list[str]) -> int:
    extra = os.environ.get("ABLATE_EXTRA")  # a file of more patch_NAME functions
    if extra:
        ns: dict[str, Any] = {}
        exec(compile(Path(extra).read_text(), extra, "exec"), ns)
        PATCHES.update({k[6:]: f for k, f in ns.items() if k.startswith("patch_")})
    for v in variant.split("+"):
        if v in PATCHES:
            PATCHES[v]()
        elif v == "uvloop":
            import uvloop

            uvloop.install()
    from tmbatch.cli.main import main

    sys.argv = ["tmbatch", *argv]
    return main()  # as the command runs it (its own process: the start's objects frozen)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="base,lean")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--data", default="/tmp/tmbatch-bench")
    p.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(TENSORMESH_INFERENCE_API_KEY="tm-bench-key", TMBATCH_LOOP=a.loop,
               PYTHONPYCACHEPREFIX=str(Path(a.data) / "pycache"))
    try:
        for rep in range(-1, a.repeats):  # -1: the untimed warm-up
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                out = Path(a.data) / f"ablate-{v}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                sim.reset()
                t0 = time.monotonic()
                if v == "bare":
                    cmd = [sys.executable, str(HERE / "bare_aiohttp.py"), str(inp), str(out),
                           sim.url, str(a.concurrency)]
                else:
                    cmd = [sys.executable, __file__, "--child", v, "run", str(inp), "-o",
                           str(out), "-c", str(a.concurrency), "-q", "--no-preflight",
                           "--base-url", sim.url]
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
                _, _status, ru = os.wait4(proc.pid, 0)
                wall = time.monotonic() - t0
                ok = sim.stats()["by_route"]["/v1/chat/completions"]["status_counts"].get("200")
                us = 1e6 * (ru.ru_utime + ru.ru_stime) / a.n
                if rep < 0:
                    continue
                cpu[v].append(us)
                print(f"{v:24s} r{rep} {us:7.0f} µs/req  wall {wall:6.2f}s  ok {ok}  "
                      f"rss {ru.ru_maxrss / 1024:.0f} MB", flush=True)
    finally:
        sim.stop()
    base = statistics.median(cpu[variants[0]])
    print(f"\nmedian CPU µs/req over {a.repeats} ({a.n:,} requests, c={a.concurrency}):")
    bare = statistics.median(cpu["bare"]) if "bare" in cpu else None
    for v in variants:
        m = statistics.median(cpu[v])
        # each repeat's variant against the first variant of the same repeat: a slow spell of
        # the machine moves both
        paired = statistics.median(x / y for x, y in zip(cpu[v], cpu[variants[0]], strict=True))
        print(f"  {v:24s} {m:7.0f}  ({100 * (m - base) / base:+.1f} % vs {variants[0]}, paired "
              f"{100 * (paired - 1):+.1f} %" + (f", {m / bare:.3f}x bare)" if bare else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
