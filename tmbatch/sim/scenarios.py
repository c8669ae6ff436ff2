"""The scenario matrix: servers the pace was not tuned on, each with the band it must hold.

Every change to pacing must pass every row. The rows run twice from this one table: in virtual
time against the simulator's own limits, in-process (`tmbatch.sim.virtual`, the test suite,
well under a minute for the table), and over real sockets against `tmbatch sim` with the same
flags (`bench/matrix_bench.py`, figures in `bench/baselines/`). A row names the server (the
`SimConfig` fields, which are also the `--sim-*` flags), the client's options and the input,
how its share is scored from what the server saw, and its band.

How a share is scored (`score`), always from the server's side:

  limit     accepted rate while sending, net of the burst a full bucket grants at once:
            (accepted - burst) / (last - burst-th accepted), over the limit; several models
            with their own limits: the sum of their rates over the sum of their limits
  window    accepted / (windows touched x window) over N / W
  schedule  the time a client that knew the schedule needs for the same accepted requests
            (burst at once, then exactly the rate of the moment), over the time taken
  tokens    tokens accepted while sending, net of the budget's burst, over the limit
  capacity  requests generated per second over slots / latency (the best fixed concurrency)
  random    (1.25 x refusals x their Retry-After + 5 s) over the time taken: a client
            that paused once per refusal and sent at full speed otherwise scores >= 1
  quota     how long the lines of the healthy model took, over how long they take alone
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tmbatch.sim.limits import FixedWindow

CHAT = "/v1/chat/completions"
LATENCY = 0.02  # seconds: the token-bucket rows' answer time (the bench's since issue 13)
TOKENS_PER_REQUEST = 100  # the virtual server's usage per answer (tokens rows)


@dataclass(frozen=True)
class Band:
    """What a row must hold: a share of its score at least `share`, refusals (429 and 503)
    at most `refused` of the accepted requests, no request inside an announced window, and
    exactly `rejected` lines ending `rejected` (only a row built to exhaust --patience has
    any)."""

    share: float
    refused: float = 1.0
    rejected: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    server: dict[str, Any]  # SimConfig fields (each one a `--sim-*` flag)
    score: str
    band: Band
    lines: int = 1000
    concurrency: int = 64
    models: tuple[str, ...] = ("tm-small",)  # the lines name these in turn
    rpm: float | None = None
    patience: float = 600.0
    limit_scope: str = "model"
    adaptive: bool = True  # False: --no-adaptive, the pauses alone (bench/pause_only.py)
    refuse_models: tuple[str, ...] = ()  # models the server refuses always (429, no hint)
    note: str = ""
    tags: tuple[str, ...] = field(default=())

    def sim_flags(self) -> list[str]:
        """The server as `tmbatch sim` flags."""
        out: list[str] = []
        for key, value in self.server.items():
            flag = "--sim-" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    out.append(flag)
                continue
            if key == "rate_schedule":
                value = ",".join(f"{t:g}:{r:g}" for t, r in value)
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return out

    def client_flags(self) -> list[str]:
        """The client's options as `tmbatch run` flags."""
        out = ["--concurrency", str(self.concurrency), "--patience", f"{self.patience:g}"]
        if self.rpm is not None:
            out += ["--rpm", f"{self.rpm:g}"]
        if self.limit_scope != "model":
            out += ["--limit-scope", self.limit_scope]
        if not self.adaptive:
            out.append("--no-adaptive")
        return out


def _bucket(fmt: str, **extra: Any) -> dict[str, Any]:
    return {"rate_limit": 50.0, "rate_burst": 10.0, "latency": LATENCY,
            "retry_after_format": fmt, **extra}


def random_server(share: float, fmt: str, status: int = 429) -> dict[str, Any]:
    server: dict[str, Any] = {"refuse_fraction": share, "latency": 0.01,
                              "retry_after_format": fmt}
    if status != 429:
        server["refuse_status"] = status
    return server


SCENARIOS: tuple[Scenario, ...] = (
    *(Scenario(f"random-{round(p * 100):02d}-{name}",
               f"{round(p * 100)} % of requests refused at random, {hint}; no limit",
               random_server(p, fmt), "random", Band(1.0), lines=200, concurrency=16,
               tags=("random",))
      for p in (0.05, 0.10, 0.30)
      for name, fmt, hint in (("seconds", "seconds", "429 + Retry-After: 1"),
                              ("none", "none", "a bare 429"))),
    Scenario("overload-503", "10 % refused at random with 503 + Retry-After: 1 (overload)",
             random_server(0.10, "seconds", 503), "random", Band(1.0), lines=200, concurrency=16,
             tags=("random",)),
    Scenario("bucket-seconds", "token bucket 50/s holding 10, Retry-After in whole seconds",
             _bucket("seconds"), "limit", Band(0.90, 0.05), tags=("bucket",)),
    Scenario("bucket-llm", "token bucket 50/s holding 10, llm_provider-retry-after (LiteLLM)",
             _bucket("llm-provider"), "limit", Band(0.90, 0.05), tags=("bucket",)),
    # an HTTP date has whole seconds of the wall clock: a pause it announces is up to 2 s
    Scenario("bucket-date", "token bucket 50/s holding 10, Retry-After as an HTTP date",
             _bucket("http-date"), "limit", Band(0.85, 0.05), tags=("bucket",)),
    Scenario("bucket-ms", "token bucket 50/s holding 10, retry-after-ms",
             _bucket("ms"), "limit", Band(0.95, 0.05), tags=("bucket",)),
    Scenario("bucket-none", "token bucket 50/s holding 10, a bare 429",
             _bucket("none"), "limit", Band(0.95, 0.05), tags=("bucket",)),
    Scenario("bucket-xratelimit", "token bucket 50/s holding 10, a bare 429, x-ratelimit-*",
             _bucket("none", ratelimit_headers=True), "limit", Band(0.95, 0.05),
             tags=("bucket",)),
    Scenario("window-40-4", "fixed window of 40 requests per 4 s, a bare 429",
             {"window_limit": 40, "window_seconds": 4.0, "latency": LATENCY,
              "retry_after_format": "none"}, "window", Band(0.90, 0.05), lines=400,
             tags=("window",)),
    # the first window's close refuses what is in flight and a round trip's sends (about 25
    # at concurrency 64): 8 % of 300 lines before the pace is learnt, none after
    Scenario("window-30-15", "fixed window of 30 requests per 15 s, a bare 429",
             {"window_limit": 30, "window_seconds": 15.0, "latency": LATENCY,
              "retry_after_format": "none"}, "window", Band(0.85, 0.12), lines=300,
             tags=("window",)),
    Scenario("halved", "token bucket 40/s holding 10, 20/s from 15 s, 40/s again from 30 s",
             {"rate_limit": 40.0, "rate_burst": 10.0, "latency": LATENCY,
              "rate_schedule": ((15.0, 20.0), (30.0, 40.0))},
             "schedule", Band(0.85, 0.05), lines=1200, tags=("schedule",)),
    Scenario("two-models", "two models, each its own bucket of 20/s holding 10; lines "
             "alternate", {"rate_limit": 20.0, "rate_burst": 10.0, "latency": LATENCY,
                           "limit_scope": "model"},
             "limit", Band(0.85, 0.05), lines=800, models=("tm-small", "tm-large"),
             tags=("lanes",)),
    Scenario("tokens", "6,000 tokens per minute (100 tokens a request: 1 request/s), "
             "stated in x-ratelimit-*-tokens, Retry-After in whole seconds",
             {"tpm_limit": 6000.0, "tpm_burst": 1000.0, "latency": LATENCY,
              "ratelimit_headers": True}, "tokens", Band(0.85, 0.10), lines=120,
             tags=("tokens",)),
    # nothing states the tokens: the budget admits while above zero, so a pause's end is
    # let through and what follows it is refused, each refusal announcing the debt's time.
    # Each pause is honoured and refusals are not billed; pacing by requests cannot see
    # tokens, so refusals stay frequent (rule 2's floor: what got through while sending)
    Scenario("tokens-unstated", "the same, with no x-ratelimit headers: paced as requests",
             {"tpm_limit": 6000.0, "tpm_burst": 1000.0, "latency": LATENCY},
             "tokens", Band(0.85, 0.90), lines=120, tags=("tokens",)),
    Scenario("capacity", "no 429 at all: 16 generated at once, 200 ms each, the rest queue",
             {"capacity": 16, "latency": 0.2}, "capacity", Band(0.90, 0.0), lines=400,
             tags=("capacity",)),
    Scenario("rpm", "--rpm at the true limit (token bucket 50/s holding 50)",
             {"rate_limit": 50.0, "latency": LATENCY}, "limit", Band(0.98, 0.0), lines=1000,
             rpm=3000.0, tags=("rpm",)),
    Scenario("quota", "one model always refused (429, no hint: a per-model quota) among "
             "199 lines of another", {"latency": 0.01}, "quota", Band(0.5, 1.0, rejected=1),
             lines=200, concurrency=16,
             models=("tm-small",) * 99 + ("tm-large",) + ("tm-small",) * 100,
             refuse_models=("tm-large",), patience=30.0, tags=("lanes",)),
)

BY_NAME = {s.name: s for s in SCENARIOS}


# -- scoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One request as the server saw it."""

    at: float  # arrival time, seconds
    model: str
    status: int
    tokens: int = 0
    finished: float | None = None  # when its answer left (capacity rows)


def _bucket_rate(accepted: list[float], burst: float) -> float | None:
    b = max(1, int(burst))
    if len(accepted) <= b:
        return None
    span = accepted[-1] - accepted[b - 1]
    return (len(accepted) - b) / span if span > 0 else None


def _schedule_time(n: int, burst: float, rate: float,
                   schedule: tuple[tuple[float, float], ...], start: float) -> float:
    """Seconds a client that knew the schedule needs for n requests from `start` (the
    server's epoch is 0): the burst at once, then the rate of the moment."""
    left, t = n - burst, start
    steps = [(at, r) for at, r in schedule if at > start]
    current = rate
    for at, r in schedule:
        if at <= start:
            current = r
    for at, r in steps:
        can = (at - t) * current
        if can >= left:
            return t + left / current - start
        left -= can
        t, current = at, r
    return t + left / current - start


def score(sc: Scenario, log: list[Arrival], wall: float, refusal_wait: float) -> float:
    """The row's share (see the module doc); 0.0 when nothing was accepted."""
    ok = [a for a in log if a.status == 200]
    if not ok:
        return 0.0
    server = sc.server
    refused = sum(1 for a in log if a.status in (429, 503))
    if sc.score == "random":
        return (1.25 * refused * refusal_wait + 5.0) / max(wall, 1e-9)
    if sc.score == "capacity":
        first = min(a.at for a in ok)
        last = max(a.finished or a.at for a in ok)
        return len(ok) / (last - first) / (server["capacity"] / server["latency"])
    if sc.score == "quota":
        healthy = [a.at for a in ok if a.model not in sc.refuse_models]
        n = len(healthy)
        alone = n / sc.concurrency * server["latency"]
        return alone / max(healthy[-1] - min(a.at for a in log), 1e-9) if n else 0.0
    groups = ([[a for a in ok if a.model == m] for m in dict.fromkeys(sc.models)]
              if server.get("limit_scope") == "model" else [ok])
    groups = [g for g in groups if g]
    if sc.score == "window":  # what got through of what the windows it touched admit
        w, start = server["window_seconds"], server.get("window_start", 0.0)
        window = FixedWindow(server["window_limit"], w, -start,
                             schedule=server.get("rate_schedule", ()))
        shares = []
        for g in groups:
            touched = {math.floor((a.at + start) / w) for a in g}
            shares.append(len(g) / sum(window.limit_of(i) for i in touched))
        return sum(shares) / len(shares)
    if sc.score == "tokens":
        times = sorted(a.at for a in ok)
        burst = server["tpm_burst"] / TOKENS_PER_REQUEST
        rate = _bucket_rate(times, burst)
        return 0.0 if rate is None else rate * TOKENS_PER_REQUEST * 60 / server["tpm_limit"]
    burst = server.get("rate_burst") or server["rate_limit"]
    if sc.score == "schedule":
        times = sorted(a.at for a in ok)
        ideal = _schedule_time(len(times), burst, server["rate_limit"],
                               server["rate_schedule"], times[0])
        return ideal / (times[-1] - times[0])
    rates = [_bucket_rate(sorted(a.at for a in g), burst) for g in groups]
    if any(r is None for r in rates):
        return 0.0
    return sum(rates) / (server["rate_limit"] * len(groups))  # type: ignore[arg-type]
