"""The simulator in virtual time: a scenario row run in-process, in seconds of CPU.

A pacing rule is only as good as the servers it was tried on, and a row of the matrix takes
minutes of wall time over real sockets. Here the same limits the simulator enforces
(`tmbatch.sim.limits`) answer the real client (the line's attempt loop, admission, the
controller) through its transport seam, on an event loop whose clock jumps to the next timer
instead of sleeping: a 60-second row runs in a fraction of a second, and the same seed gives
the same run. What crosses a real socket is the bench's and the other tests' business.
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from tmbatch.sim.config import SimConfig
from tmbatch.sim.gate import hint_headers, hint_seconds
from tmbatch.sim.limits import Capacity, LimitSet, build_limit_set
from tmbatch.sim.overload import RandomRefusal
from tmbatch.sim.scenarios import CHAT, TOKENS_PER_REQUEST, Arrival, Scenario, score

REFUSAL_RTT = 0.001  # seconds a refusal takes to come back (nothing is generated)


class _VirtualSelector(selectors.DefaultSelector):
    """Polls the real selector without blocking; when nothing is ready, the clock jumps by
    the timeout the loop asked for instead of sleeping it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled: only real I/O (a thread) can wake it
            return super().select(None)
        self.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: `time()` moves only when every task waits."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Callable[[], Any]) -> Any:
    """Run the coroutine function `main` to its end on a fresh virtual loop."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# -- the server ----------------------------------------------------------------------------


class VirtualServer:
    """Answers like `tmbatch sim` with the scenario's flags, on the loop's clock: the same
    SimConfig, limits (one set for the account or one per model), refusals at random and
    hints. An HTTP date is announced as the wait it makes a client take (a whole second of
    a wall clock whose phase the seed sets), since the client reads dates off the real one."""

    def __init__(self, sc: Scenario, seed: int) -> None:
        self.sc = sc
        self.config = SimConfig(**{**sc.server, "seed": seed, "grace": REFUSAL_RTT})
        self.rng = random.Random(seed)  # latency jitter
        self.wall = self.rng.random()  # the fraction of a second the wall clock starts at
        self.log: list[Arrival] = []
        self.violations = 0
        self.refusal_wait = 0.0  # the Retry-After the random refusals announce
        self._scopes: dict[str, LimitSet] = {}
        cfg = self.config
        self.refusal = RandomRefusal(cfg.refuse_fraction, seed) if cfg.refuse_fraction else None
        self.capacity = Capacity(cfg.capacity) if cfg.capacity else None

    def _limits(self, model: str) -> LimitSet:
        scope = model if self.config.limit_scope == "model" else ""
        limits = self._scopes.get(scope)
        if limits is None:
            limits = self._scopes[scope] = build_limit_set(self.config, 0.0)
        return limits

    def _refuse(self, limits: LimitSet, status: int, wait: float, now: float,
                headers: CIMultiDict[str]) -> float | None:
        """A refusal's hint, and the window it opens (as gate.rejection): the wait announced."""
        cfg = self.config
        seconds = hint_seconds(cfg, wait)
        fmt = cfg.retry_after_format
        hint, announced = hint_headers("ms" if fmt == "http-date" else fmt, seconds, 0.0)
        if fmt == "http-date":
            wall = self.wall + now
            announced = math.ceil(wall + seconds) - wall
            hint = {"retry-after-ms": f"{announced * 1000:.3f}"}
        headers.update(hint)
        if announced is not None:
            limits.windows.open(now, now + announced)
        return announced

    async def send(self, model: str, key: str) -> tuple[int, CIMultiDict[str], float]:
        """One request: (status, headers, latency); refusals come back at once."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        cfg, limits = self.config, self._limits(model)
        if limits.windows.arrive(now):
            self.violations += 1
        headers: CIMultiDict[str] = CIMultiDict()
        status = 200
        if model in self.sc.refuse_models:  # a per-model quota: refused, with no hint
            status = 429
        elif self.refusal is not None and self.refusal.refuses(key):
            status = cfg.refuse_status
            self.refusal_wait = self._refuse(limits, status, 1.0, now, headers) or 0.0
        else:
            wait, _ = limits.admit(now)
            if wait > 0:
                status = 429
                self._refuse(limits, status, wait, now, headers)
            else:  # booked at admission, as `tmbatch sim` does (its answer is known then)
                limits.charge(now, TOKENS_PER_REQUEST)
        if cfg.ratelimit_headers:
            stated, ends = limits.headers(now)
            headers.update(stated)
            for end in ends:
                limits.windows.open(now, end)
        if status != 200:
            self.log.append(Arrival(now, model, status))
            await asyncio.sleep(REFUSAL_RTT)
            return status, headers, REFUSAL_RTT
        latency = cfg.latency + (2 * self.rng.random() - 1) * cfg.latency_jitter
        if self.capacity is not None:
            await self.capacity.acquire()
            try:
                await asyncio.sleep(latency)
            finally:
                self.capacity.release()
        else:
            await asyncio.sleep(latency)
        done = loop.time()
        self.log.append(Arrival(now, model, 200, TOKENS_PER_REQUEST, done))
        return 200, headers, done - now


# -- a run ---------------------------------------------------------------------------------


@dataclass
class RowResult:
    """What one run of a row did, as the server saw it."""

    name: str
    seed: int
    share: float
    accepted: int
    refused: int
    violations: int
    rejected: int
    failed: int
    seconds: float  # virtual: first arrival to last answer
    paces: dict[str, Any] = field(default_factory=dict)  # each lane's pace at the end
    lanes: dict[str, Any] = field(default_factory=dict)  # each lane's report at the end
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, class) each
    arrivals: list[Arrival] = field(default_factory=list, repr=False)  # the server's log
    passed: bool = False
    why: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return (f"{mark} {self.name:<18} share {self.share:6.1%}  accepted {self.accepted:5d}  "
                f"refused {self.refused:4d} ({self.refused / max(1, self.accepted):5.1%})  "
                f"in windows {self.violations}  rejected {self.rejected}  "
                f"{self.seconds:7.1f}s  {self.why}")


def judge(sc: Scenario, r: RowResult) -> RowResult:
    band = sc.band
    why = []
    if r.share < band.share:
        why.append(f"share {r.share:.3f} < {band.share}")
    if r.refused > band.refused * max(1, r.accepted):
        why.append(f"refused {r.refused} > {band.refused:.0%}")
    if r.violations:
        why.append(f"{r.violations} inside a window")
    if r.rejected != band.rejected:
        why.append(f"{r.rejected} rejected (band {band.rejected})")
    if r.failed != r.rejected:
        why.append(f"{r.failed - r.rejected} other failures")
    r.passed, r.why = not why, "; ".join(why)
    return r


def run_row(sc: Scenario, seed: int = 0) -> RowResult:
    """One run of a row in virtual time, judged against its band."""
    with tempfile.TemporaryDirectory(prefix="tmbatch-virtual-") as tmp:
        return judge(sc, run_virtual(lambda: _drive(sc, seed, Path(tmp))))


async def _drive(sc: Scenario, seed: int, out: Path) -> RowResult:
    """One run of a row: the real client sends its lines to the virtual server."""
    from tmbatch.inputs.reader import Request

    random.seed(seed)  # the retry backoff's jitter
    server = VirtualServer(sc, seed)
    loop = asyncio.get_running_loop()
    client = _Client(sc, server, out)
    lines = iter([Request(i + 1, f"r{i + 1}", CHAT,
                          {"model": sc.models[i % len(sc.models)],
                           "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
                  for i in range(sc.lines)])
    start = loop.time()
    await client.send(lines, sc.concurrency)
    return _result(sc, seed, server, client, loop.time(), start)


def _transport(server: VirtualServer) -> Callable[..., Any]:
    """The client's transport seam: what `client.http` makes of the virtual server's answer."""
    from tmbatch.client.classify import classify_status
    from tmbatch.client.http import Answer

    async def transport(session: Any, url: str, body: dict[str, Any],
                        headers: dict[str, str] | None) -> Answer:
        key = (headers or {}).get("Idempotency-Key", "")
        status, answer_headers, latency = await server.send(body["model"], key)
        if status != 200:
            raise classify_status(status, answer_headers, None, None)
        usage = {"prompt_tokens": TOKENS_PER_REQUEST // 2,
                 "completion_tokens": TOKENS_PER_REQUEST - TOKENS_PER_REQUEST // 2,
                 "total_tokens": TOKENS_PER_REQUEST}
        return Answer(200, "req", {"object": "chat.completion", "choices": [],
                                   "usage": usage}, latency, None, answer_headers)

    return transport


class _Client:
    """The real client of a row, as `tmbatch run` builds it (the line's attempt loop,
    admission, the journal's writer), sending to the virtual server; it notes when each
    failure came, on the loop's clock."""

    def __init__(self, sc: Scenario, server: VirtualServer, out: Path) -> None:
        from tmbatch.base.config import Settings
        from tmbatch.base.stop import Stop
        from tmbatch.journal.compact import LineStates
        from tmbatch.journal.writer import Writer
        from tmbatch.limits import Admission
        from tmbatch.run.attempts import LineSender
        from tmbatch.run.summary import RunStats

        loop = asyncio.get_running_loop()
        transport = _transport(server)
        settings = Settings("serverless", "http://virtual", None, None, 600.0, 5, None)
        self.writer = Writer(out, LineStates(), fsync="never")
        self.admission = Admission(sc.rpm, None, concurrency=sc.concurrency,
                                   adaptive=sc.adaptive and sc.rpm is None,
                                   scope=sc.limit_scope,
                                   base_url=settings.base_url)
        self.stats = RunStats()
        self.sender = sender = LineSender(settings, "virtual", self.admission, self.writer,
                                          self.stats, Stop(), None,  # type: ignore[arg-type]
                                          patience=sc.patience)
        sender.transport = transport
        self.failures: list[tuple[float, str]] = []
        record = sender.record_failure

        def record_failure(rec: Any) -> None:
            self.failures.append((loop.time(), str(rec.outcome)))
            record(rec)

        sender.record_failure = record_failure  # type: ignore[method-assign]

    async def send(self, lines: Iterator[Any], concurrency: int) -> None:
        """Every line, `concurrency` at a time, then the journal closed."""
        async def work() -> None:
            for req in lines:
                await self.sender.process(req)

        await asyncio.gather(*(work() for _ in range(concurrency)))
        self.writer.close()


def _result(sc: Scenario, seed: int, server: VirtualServer, client: _Client, end: float,
            start: float) -> RowResult:
    """What the run did, as the server saw it (and each lane's pace at the end)."""
    from tmbatch.policy import Outcome

    log, stats = server.log, client.stats
    accepted = sum(1 for a in log if a.status == 200)
    seconds = end - (min(a.at for a in log) if log else start)
    lanes = client.admission.report()["lanes"]
    return RowResult(
        sc.name, seed, score(sc, log, seconds, server.refusal_wait), accepted,
        sum(1 for a in log if a.status in (429, 503)), server.violations,
        stats.failed[Outcome.REJECTED], sum(stats.failed.values()), seconds,
        {m: lane["pace_requests_per_second"] for m, lane in lanes.items()}, lanes,
        client.failures, log)


def run_matrix(scenarios: tuple[Scenario, ...] | list[Scenario], seeds: int = 3,
               echo: Callable[[str], None] | None = None,
               markdown: bool = False) -> list[RowResult]:
    """Every row, `seeds` runs each; the median run (by share) of each row is returned.
    `markdown` echoes the README's table instead of the plain lines."""
    out = []
    if echo is not None and markdown:
        echo("| row | the server | band: share ≥, 429s ≤ | share (median; "
             f"{seeds} seeds) | 429s (of accepted) |\n|---|---|---|---|---|")
    for sc in scenarios:
        runs = sorted((run_row(sc, seed) for seed in range(seeds)), key=lambda r: r.share)
        median = runs[len(runs) // 2]
        if echo is not None:
            echo(_markdown(sc, median, runs) if markdown else median.line() + "   ["
                 + ", ".join(f"{r.share:.1%}" for r in runs) + "]")
        out.append(median)
    return out


def _markdown(sc: Scenario, median: RowResult, runs: list[RowResult]) -> str:
    band = f"{sc.band.share:.0%}" + (f", {sc.band.refused:.0%}" if sc.band.refused < 1 else "")
    shares = ", ".join(f"{r.share:.0%}" for r in runs)
    refused = f"{median.refused} ({median.refused / max(1, median.accepted):.1%})"
    mark = "" if median.passed else f" FAIL: {median.why}"
    return (f"| {sc.name} | {sc.title} | {band} | **{median.share:.1%}** ({shares}){mark} | "
            f"{refused} |")


if __name__ == "__main__":  # python -m tmbatch.sim.virtual [--seeds N] [--markdown] [row ...]
    import argparse

    from tmbatch.sim.scenarios import BY_NAME, SCENARIOS
    parser = argparse.ArgumentParser(prog="python -m tmbatch.sim.virtual")
    parser.add_argument("rows", nargs="*", choices=[[], *BY_NAME], metavar="ROW")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="the README's table")
    args = parser.parse_args()
    chosen = [BY_NAME[n] for n in args.rows] or list(SCENARIOS)
    results = run_matrix(chosen, seeds=args.seeds, echo=print, markdown=args.markdown)
    raise SystemExit(0 if all(r.passed for r in results) else 1)
