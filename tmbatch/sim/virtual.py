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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from tmbatch.sim.limits import Capacity, FixedWindow, RequestBucket, TokenBudget
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


@dataclass
class _Limits:
    """One set of limits (the account's, or one model's)."""

    requests: RequestBucket | FixedWindow | None = None
    tokens: TokenBudget | None = None
    windows: list[tuple[float, float]] = field(default_factory=list)  # announced (from, to)


class VirtualServer:
    """Answers like `tmbatch sim` with the scenario's flags, on the loop's clock."""

    def __init__(self, sc: Scenario, seed: int) -> None:
        self.sc = sc
        self.cfg = sc.server
        self.rng = random.Random(seed)
        self.wall = self.rng.random()  # the fraction of a second the wall clock starts at
        self.log: list[Arrival] = []
        self.violations = 0
        self.refusal_wait = 0.0  # the Retry-After the random refusals announce
        self._limits: dict[str, _Limits] = {}
        cap = self.cfg.get("capacity")
        self.capacity = Capacity(cap) if cap else None

    def _limits_of(self, model: str, now: float) -> _Limits:
        key = model if self.cfg.get("limit_scope") == "model" else ""
        lim = self._limits.get(key)
        if lim is None:
            lim = self._limits[key] = _Limits()
            rate = self.cfg.get("rate_limit")
            if rate is not None:
                burst = self.cfg.get("rate_burst") or max(1.0, rate)
                lim.requests = RequestBucket(rate, burst, burst, now)
            elif self.cfg.get("window_limit") is not None:
                lim.requests = FixedWindow(self.cfg["window_limit"],
                                           self.cfg["window_seconds"], 0.0)
            tpm = self.cfg.get("tpm_limit")
            if tpm is not None:
                burst = self.cfg.get("tpm_burst") or max(1.0, tpm / 60.0)
                lim.tokens = TokenBudget(tpm / 60.0, burst, burst, now)
        self._follow_schedule(lim.requests, now)
        return lim

    def _follow_schedule(self, bucket: Any, now: float) -> None:
        if not isinstance(bucket, RequestBucket):
            return
        rate = self.cfg.get("rate_limit")
        for at, r in self.cfg.get("rate_schedule", ()):
            if now >= at:
                if bucket.rate != r and bucket.last < at:
                    bucket._refill(at)
                rate = r
        if bucket.rate != rate:
            bucket._refill(now)
            bucket.rate = rate

    def _hint(self, wait: float) -> tuple[dict[str, str], float | None]:
        """The headers a refusal carries and the wait they announce (as the sim's gate)."""
        fmt = self.cfg.get("retry_after_format", "seconds")
        fixed = self.cfg.get("retry_after")
        if fixed is not None:
            seconds = float(fixed)
        elif fmt == "ms":
            seconds = max(1, math.ceil(wait * 1000 - 1e-6)) / 1000.0
        else:
            seconds = float(max(1, math.ceil(wait - 1e-9)))
        if fmt == "none":
            return {}, None
        if fmt == "ms":
            return {"retry-after-ms": str(round(seconds * 1000))}, seconds
        if fmt == "llm-provider":
            return {"llm_provider-retry-after": f"{seconds:g}"}, seconds
        if fmt == "http-date":  # a whole second of the wall clock: up to a second more
            wall = self.wall + asyncio.get_running_loop().time()
            announced = math.ceil(wall + seconds) - wall
            return {"retry-after-ms": f"{announced * 1000:.3f}"}, announced
        return {"Retry-After": f"{seconds:g}"}, seconds

    def _violates(self, lim: _Limits, now: float) -> bool:
        return any(start < now < end for start, end in lim.windows)

    async def send(self, model: str, idempotency: str) -> tuple[int, CIMultiDict[str], float]:
        """One request: (status, headers, latency); refusals come back at once."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        lim = self._limits_of(model, now)
        if self._violates(lim, now):
            self.violations += 1
        status, wait, headers = 200, 0.0, CIMultiDict()
        fraction = self.cfg.get("refuse_fraction", 0.0)
        if model in self.sc.refuse_models:
            status = 429
        elif fraction and self.rng.random() < fraction:
            status = self.cfg.get("refuse_status", 429)
            wait = float(self.cfg.get("retry_after") or 1.0)
        else:
            limits = [x for x in (lim.requests, lim.tokens) if x is not None]
            for x in limits:
                wait = max(wait, x.wait(now))
            if wait > 0:
                status = 429
            else:
                for x in limits:
                    x.take(now)
        if self.cfg.get("ratelimit_headers"):
            for x in (lim.requests, lim.tokens):
                if x is not None:
                    headers.update(x.headers(now))
        if status != 200:
            if model not in self.sc.refuse_models:
                hint, announced = self._hint(wait)
                headers.update(hint)
                if announced is not None:
                    if fraction:
                        self.refusal_wait = announced
                    lim.windows.append((now + REFUSAL_RTT, now + announced))
            self.log.append(Arrival(now, model, status))
            await asyncio.sleep(REFUSAL_RTT)
            return status, headers, REFUSAL_RTT
        latency = float(self.cfg.get("latency", 0.0))
        if self.capacity is not None:
            await self.capacity.acquire()
            try:
                await asyncio.sleep(latency)
            finally:
                self.capacity.release()
        else:
            await asyncio.sleep(latency)
        done = loop.time()
        if lim.tokens is not None:
            lim.tokens.charge(done, TOKENS_PER_REQUEST)
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
    from tmbatch.client import Answer
    from tmbatch.compact import LineStates
    from tmbatch.config import Settings
    from tmbatch.limits import Admission
    from tmbatch.reader import Request
    from tmbatch.retry import LineSender
    from tmbatch.safety import Outcome, classify_status
    from tmbatch.stop import Stop
    from tmbatch.summary import RunStats
    from tmbatch.writer import Writer

    random.seed(seed)  # the retry backoff's jitter
    server = VirtualServer(sc, seed)
    loop = asyncio.get_running_loop()

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

    settings = Settings("serverless", "http://virtual", None, None, 600.0, 5, None)
    states = LineStates()
    writer = Writer(out, states, fsync="never")
    admission = Admission(sc.rpm, None, concurrency=sc.concurrency, adaptive=sc.rpm is None,
                          scope=sc.limit_scope, base_url=settings.base_url)
    stats = RunStats()
    sender = LineSender(settings, "virtual", admission, writer, stats, Stop(), None,  # type: ignore[arg-type]
                        patience=sc.patience)
    sender.transport = transport
    lines = iter([Request(i + 1, f"r{i + 1}", CHAT,
                          {"model": sc.models[i % len(sc.models)],
                           "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
                  for i in range(sc.lines)])

    async def work() -> None:
        for req in lines:
            await sender.process(req)

    start = loop.time()
    await asyncio.gather(*(work() for _ in range(sc.concurrency)))
    writer.close()
    log = server.log
    accepted = sum(1 for a in log if a.status == 200)
    seconds = loop.time() - (min(a.at for a in log) if log else start)
    return RowResult(
        sc.name, seed, score(sc, log, seconds, server.refusal_wait), accepted,
        sum(1 for a in log if a.status in (429, 503)), server.violations,
        stats.failed[Outcome.REJECTED], sum(stats.failed.values()), seconds,
        {m: lane["pace_requests_per_second"] for m, lane in admission.report()["lanes"].items()})


def run_matrix(scenarios: tuple[Scenario, ...] | list[Scenario], seeds: int = 3,
               echo: Callable[[str], None] | None = None) -> list[RowResult]:
    """Every row, `seeds` runs each; the median run (by share) of each row is returned."""
    out = []
    for sc in scenarios:
        runs = sorted((run_row(sc, seed) for seed in range(seeds)), key=lambda r: r.share)
        median = runs[len(runs) // 2]
        if echo is not None:
            echo(median.line() + "   [" + ", ".join(f"{r.share:.1%}" for r in runs) + "]")
        out.append(median)
    return out


if __name__ == "__main__":  # python -m tmbatch.sim.virtual [--seeds N] [row ...]
    import argparse

    from tmbatch.sim.scenarios import BY_NAME, SCENARIOS
    parser = argparse.ArgumentParser(prog="python -m tmbatch.sim.virtual")
    parser.add_argument("rows", nargs="*", choices=[[], *BY_NAME], metavar="ROW")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    chosen = [BY_NAME[n] for n in args.rows] or list(SCENARIOS)
    results = run_matrix(chosen, seeds=args.seeds, echo=print)
    raise SystemExit(0 if all(r.passed for r in results) else 1)
