"""Prometheus metrics of a run: `/metrics` on `--metrics-port`, pushed to `--pushgateway`.

Most values are read when scraped, from the run's own counters (`RunStats`, its lanes, its
budget, the progress line's total), so they agree with summary.json by construction and cost
nothing per request. Only what the run does not count already is counted per answer, by a
wrapper around the one call that sends an attempt (`LineSender.transport`): requests by
(route, model, status), tokens by (model, kind) and the duration histogram. Labels come from
bounded sets: the routes, at most MAX_MODELS models (the rest are `other`), HTTP statuses
(`none`: no answer); never a custom_id, a prompt or a key.

The page is served on the run's own loop (aiohttp), not prometheus_client's thread: the
counters are plain Python objects the loop changes, and read on the loop they are never seen
half-changed. A CronJob's pod may end before any scrape: `--pushgateway` PUTs the same page
every PUSH_EVERY seconds and once more at exit, grouped by job and shard.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tmbatch.base.logs import public_url
from tmbatch.client.http import Answer
from tmbatch.journal.records import usage_tokens
from tmbatch.policy import AttemptFailed

log = logging.getLogger("tmbatch")

MAX_MODELS = 32  # distinct model label values; a file naming more shows the rest as `other`
PUSH_EVERY = 15.0  # seconds between pushes: a Prometheus scrape interval's usual worth
PUSH_TIMEOUT = 5.0  # a Pushgateway slower than this is skipped until the next push
# request duration buckets, seconds: from a fast tokenize to a long generation
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0)
MISSING_EXTRA = ("--metrics-port and --pushgateway need prometheus_client: "
                 "pip install 'tmbatch[fleet]'")

Transport = Callable[..., Awaitable[Answer]]


@dataclass
class Tally:
    """What the run does not count itself: per answer, by bounded labels."""

    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    tokens: Counter[tuple[str, str]] = field(default_factory=Counter)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    seconds: float = 0.0  # the histogram's sum
    models: set[str] = field(default_factory=set)

    def model(self, name: Any) -> str:
        """A bounded label: the first MAX_MODELS models as named, the rest `other`."""
        text = name if isinstance(name, str) and name else "none"
        if text in self.models:
            return text
        if len(self.models) >= MAX_MODELS:
            return "other"
        self.models.add(text)
        return text

    def wrap(self, send: Transport) -> Transport:
        """`send`, counted: its answer or its failure, never changed."""

        async def counted(session: Any, route: str, body: dict[str, Any],
                          headers: Any = None) -> Answer:
            try:
                answer = await send(session, route, body, headers)
            except AttemptFailed as exc:
                status = "none" if exc.status is None else str(exc.status)
                self.requests[(route, self.model(body.get("model")), status)] += 1
                raise
            model = self.model(body.get("model"))
            self.requests[(route, model, str(answer.status))] += 1
            used = usage_tokens(answer.body)
            if used is not None:
                self.tokens[(model, "prompt")] += used[0]
                self.tokens[(model, "completion")] += used[1]
            self.buckets[bisect.bisect_left(BUCKETS, answer.latency)] += 1
            self.seconds += answer.latency
            return answer

        return counted


@dataclass
class Sources:
    """Where the scraped values come from: the runner's parts, read at scrape time."""

    stats: Any  # run.summary.RunStats
    admission: Any  # limits.Admission
    budget: Any  # spend.budget.Budget
    pending: Callable[[], int | None]  # lines left to answer (None: not counted yet)


def _import_client() -> Any:
    """prometheus_client, which the resolver has checked is there (`check_installed`)."""
    import prometheus_client
    import prometheus_client.core

    return prometheus_client


def check_installed() -> str | None:
    """The message naming the extra when prometheus_client is missing, else None."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return MISSING_EXTRA
    return None


class Collector:
    """One scrape's metric families, read from the run (see the module doc)."""

    def __init__(self, tally: Tally, sources: Sources) -> None:
        self.tally = tally
        self.sources = sources
        self.core = _import_client().core

    def collect(self) -> Iterator[Any]:
        c, t, s = self.core, self.tally, self.sources
        stats = s.stats
        lines = c.CounterMetricFamily("tmbatch_lines", "lines given an outcome by this run",
                                      labels=["outcome", "class"])
        lines.add_metric(["succeeded", "ok"], stats.ok)
        for cls, n in stats.failed.items():
            lines.add_metric(["failed", cls.value], n)
        yield lines
        requests = c.CounterMetricFamily("tmbatch_requests", "attempts answered or failed",
                                         labels=["route", "model", "status"])
        for (route, model, status), n in t.requests.items():
            requests.add_metric([route, model, status], n)
        yield requests
        tokens = c.CounterMetricFamily("tmbatch_tokens", "tokens in the answers' usage",
                                       labels=["model", "kind"])
        for (model, kind), n in t.tokens.items():
            tokens.add_metric([model, kind], n)
        yield tokens
        yield from self._lanes()
        yield c.CounterMetricFamily("tmbatch_spend_usd", "the job's spend as priced (USD)",
                                    value=float(getattr(s.budget, "spent_usd", 0.0)))
        yield c.GaugeMetricFamily("tmbatch_in_flight", "requests on the wire now",
                                  value=stats.in_flight)
        pending = s.pending()
        if pending is not None:
            yield c.GaugeMetricFamily("tmbatch_lines_pending", "lines with no outcome yet",
                                      value=pending)
        yield self._histogram()

    def _lanes(self) -> Iterator[Any]:
        c, t = self.core, self.tally
        refusals = c.CounterMetricFamily("tmbatch_refusals", "rate-limit refusals (429s)",
                                         labels=["model"])
        pace = c.GaugeMetricFamily("tmbatch_pace_requests_per_second",
                                   "each lane's pace (absent while unpaced)", labels=["model"])
        paused = c.GaugeMetricFamily("tmbatch_paused", "1 while a lane is paused (Retry-After)",
                                     labels=["model"])
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            now = None
        for lane in self.sources.admission.lanes.values():
            model = t.model(lane.key.model)
            refusals.add_metric([model], lane.refusals)
            if lane.rate is not None:
                pace.add_metric([model], lane.rate)
            paused.add_metric([model], 1.0 if now is not None and lane.pause_until > now
                              else 0.0)
        yield from (refusals, pace, paused)

    def _histogram(self) -> Any:
        t = self.tally
        running, buckets = 0, []
        for bound, n in zip((*BUCKETS, float("inf")), t.buckets, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return self.core.HistogramMetricFamily(
            "tmbatch_request_duration_seconds", "seconds from sending to the whole answer "
            "(successes)", buckets=buckets, sum_value=t.seconds)


class Metrics:
    """The registry, its page on --metrics-port and its pushes to --pushgateway."""

    def __init__(self, port: int | None, gateway: str | None, job: str,
                 shard: tuple[int, int] | None) -> None:
        self.port = port
        self.gateway = gateway.rstrip("/") if gateway else None
        self.job = job
        self.shard = "0" if shard is None else str(shard[0])
        self.tally = Tally()
        self.client = _import_client()
        self.registry = self.client.CollectorRegistry(auto_describe=False)
        self._site: web.AppRunner | None = None
        self._pusher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._push_warned = False

    def page(self) -> bytes:
        return bytes(self.client.generate_latest(self.registry))

    async def start(self, sources: Sources) -> None:
        self.registry.register(Collector(self.tally, sources))
        if self.port is not None:
            app = web.Application()
            app.router.add_get("/metrics", self._serve)
            self._site = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await self._site.setup()
            site = web.TCPSite(self._site, "0.0.0.0", self.port)  # any interface: scraped
            await site.start()
            port = self._site.addresses[0][1]
            log.info("metrics on http://0.0.0.0:%d/metrics", port,
                     extra={"event": "metrics", "port": port})
        if self.gateway is not None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT))
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page(),
                            headers={"Content-Type": self.client.CONTENT_TYPE_LATEST})

    @property
    def push_url(self) -> str:
        """PUT replaces the group: job and shard, the job's name base64-encoded (a name may
        hold a slash, which a path segment may not)."""
        job = base64.urlsafe_b64encode(self.job.encode()).decode()
        return f"{self.gateway}/metrics/job@base64/{job}/shard/{self.shard}"

    async def push(self) -> bool:
        """One PUT of the page; a failure is a warning (once), never the run's."""
        if self._session is None:
            return False
        try:
            async with self._session.put(self.push_url, data=self.page(), headers={
                    "Content-Type": self.client.CONTENT_TYPE_LATEST}) as r:
                if r.status < 300:
                    return True
                why = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            why = type(exc).__name__
        if not self._push_warned:
            self._push_warned = True
            log.warning("cannot push metrics to %s (%s); the run goes on, pushing again every "
                        "%gs", public_url(self.gateway or ""), why, PUSH_EVERY,
                        extra={"event": "pushgateway_failed"})
        return False

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(PUSH_EVERY)
            await self.push()

    async def close(self) -> None:
        """The last push (the run's final values), then the page goes."""
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
            self._pusher = None
            await self.push()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._site is not None:
            await self._site.cleanup()
            self._site = None


async def observe(runner: Any, sender: Any, progress: Any) -> Metrics:
    """The runner's one hook: count `sender`'s attempts, read the rest from `runner` and
    `progress`, and start serving and pushing. `runner.close` awaits `Metrics.close`."""
    fleet = runner.config.fleet
    metrics = Metrics(fleet.metrics_port, fleet.pushgateway, fleet.job or runner.header.job,
                      runner.config.shard)
    sender.transport = metrics.tally.wrap(sender.transport)

    def pending() -> int | None:
        if progress.total is None:
            return None
        s = runner.stats
        return max(0, progress.total - progress.done_before - s.ok - sum(s.failed.values()))

    await metrics.start(Sources(runner.stats, runner.admission, runner.budget, pending))
    return metrics
