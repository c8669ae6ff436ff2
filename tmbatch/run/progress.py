"""Progress for people (a tqdm bar on a TTY) and for machines (a plain line every few seconds).

Cron mail and `kubectl logs` do not render carriage returns, so a bar is only drawn when
stderr is a terminal. While it is drawn, log lines go through tqdm (its logging redirect),
which clears the bar, prints the line and draws the bar again below it: a warning written
straight to stderr would land in the middle of the bar. The bar's layout follows the
terminal's width, so an 80-column terminal still gets a bar rather than one cell of it.
tqdm is imported only once a bar is drawn: its import is ~10 ms of every start.

The bar and the progress lines count the whole job, read from the line states
(`summaries.Counts`, the numbers the `done:` line, `status`, summary.json and the report
show), with this run's share beside them. The rate and the ETA follow the recent pace
(`RecentRate`, the last minute), never faster than the pace admission holds the run to, and
add a pause that is open now (`eta`): a run that slowed to 0.1/s says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tmbatch.base.logs import REDACT
from tmbatch.journal.compact import LineStates
from tmbatch.run.config import RunConfig
from tmbatch.run.summaries import Counts
from tmbatch.run.summary import RunStats

if TYPE_CHECKING:
    from tqdm import tqdm

# Below WIDE columns the bar drops in-flight and tok/s; below NARROW it drops the bar itself.
WIDE, NARROW = 110, 60
# The pace the ETA follows: lines answered over the last this many seconds.
RATE_WINDOW = 60.0


def eta(left: int, rate: float | None, pace: float | None = None,
        pause_left: float = 0.0) -> float | None:
    """Seconds until `left` lines are answered: at the recent `rate` (lines/s), never faster
    than the `pace` admission holds the run to, after the pause open now. None: no rate to
    go by (nothing answered lately and no pace)."""
    if left <= 0:
        return 0.0
    if pace is not None and pace > 0:
        rate = pace if rate is None else min(rate, pace)
    if rate is None or rate <= 0:
        return None
    return max(0.0, pause_left) + left / rate


class RecentRate:
    """Lines answered per second over the last `window` seconds (since the first sample when
    the run is younger): the pace now, not the run's average, which a fast start keeps high
    long after the server slowed down."""

    def __init__(self, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])

    def add(self, done: int) -> float | None:
        """Record `done` now; the rate over the window (None until two samples apart)."""
        now = self.clock()
        samples = self._samples
        samples.append((now, done))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        t0, d0 = samples[0]
        span = now - t0
        return None if span <= 0 else max(0, done - d0) / span


def open_pause(admission: Any) -> float:
    """Seconds until the first of the admission's lanes may send again, when every lane is
    paused now (a Retry-After window); 0 when one of them may send."""
    lanes = list(getattr(admission, "lanes", {}).values())
    if not lanes:
        return 0.0
    now = asyncio.get_running_loop().time()
    return max(0.0, min(lane.pause_until for lane in lanes) - now)


def eta_text(seconds: float | None) -> str:
    """`?`, `45s`, `12m05s`, `3h20m`: for the bar and the line."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def layout(width: int, snap: dict[str, Any]) -> tuple[str, str]:
    """(tqdm bar_format, postfix) that fit `width` columns with a bar worth looking at.

    tqdm's default puts every statistic on the right and gives the bar what is left, which
    at 80 columns with a postfix is one cell; here the statistics shrink with the width.
    """
    failed = f"{snap['failed']:,} failed" if snap["failed"] else ""
    eta = eta_text(snap.get("eta_s"))  # ours (the recent pace, pauses), not tqdm's average
    if "cache_hits" in snap:  # --cache: what the cache answered, at any width
        failed = ", ".join(p for p in (failed, f"{snap['cache_hits']:,} cached") if p)
    if "spent_text" in snap:  # a budget: worth its place at any width
        failed = ", ".join(p for p in (failed, f"spent {snap['spent_text']}") if p)
    if snap["total"] is None:  # not counted yet (or stdin): no bar, no percentage
        fmt = "{n_fmt} done [{elapsed}, {rate_fmt}]{postfix}"
        return fmt, ", ".join(p for p in (failed, f"{snap['in_flight']} in flight") if p)
    if width >= WIDE:
        from tqdm import tqdm  # imported once a bar is drawn (module docstring)

        tok = tqdm.format_sizeof(snap["tok_per_s"]) + " tok/s"
        pace = f"pace {snap['pace_per_s']}/s" if "pace_per_s" in snap else ""
        postfix = ", ".join(p for p in (failed, f"{snap['in_flight']} in flight", tok, pace)
                            if p)
        return "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<" + eta + \
            ", {rate_fmt}]{postfix}", postfix
    if width >= NARROW:
        return "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {rate_fmt} eta " + eta + \
            "{postfix}", failed
    return "{n_fmt}/{total_fmt} {percentage:.0f}% eta " + eta + "{postfix}", failed


def terminal_width(default: int = 80) -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return default


class Progress:
    def __init__(
        self,
        stats: RunStats,
        total: int | None,
        *,
        quiet: bool = False,
        interval: float = 10.0,
        emit: Callable[[str, dict[str, Any]], None] | None = None,
        tty: bool | None = None,
        done_before: int = 0,
        budget: Any = None,
        states: LineStates | None = None,
    ) -> None:
        self.stats = stats
        self.states = states  # the job's line states: the whole job's counts (None: this run's)
        self._counts: Counts | None = None
        self._counted_at = -1.0
        self.rate = RecentRate()
        self.total = total
        self.done_before = done_before  # lines that had an outcome when this run started
        self.quiet = quiet
        self.interval = interval
        self.emit = emit
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar: tqdm | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_done = done_before
        self._redirect = contextlib.ExitStack()
        self.budget = budget  # a budget.Budget: spend (and the budget) on every line
        self.pace: Callable[[], float | None] | None = None  # the admission's pace
        self.pause_left: Callable[[], float] | None = None  # seconds of a pause open now
        self.cache: Any = None  # a run.cached.RunCache (--cache): hits and misses shown

    @classmethod
    def for_run(cls, stats: RunStats, states: LineStates, opts: RunConfig,
                **kwargs: Any) -> Progress:
        """A run or a resume counts the whole job (its total is counted later, in a thread);
        a resend counts the lines it was given."""
        common: dict[str, Any] = {"quiet": opts.quiet, "interval": opts.progress_interval,
                                  **kwargs}
        if opts.only_lines is not None:
            return cls(stats, len(opts.only_lines), **common)
        # before this run: what it skips (a `fatal` line is sent again, so it is this run's)
        done = Counts.of(states).with_outcome
        return cls(stats, None, done_before=done, states=states, **common)

    def job_counts(self, fresh: bool = False) -> Counts | None:
        """The whole job's counts from the line states: counted at most once a second (a
        pass over a byte a line: ~4 ms at a million lines), or now when `fresh`."""
        if self.states is None:
            return None
        now = time.monotonic()
        if fresh or self._counts is None or now - self._counted_at >= 1.0:
            self._counts, self._counted_at = Counts.of(self.states, self.total), now
        return self._counts

    def snapshot(self, fresh: bool = False) -> dict[str, Any]:
        s = self.stats
        failed_now = sum(s.failed.values())
        now = s.ok + failed_now
        job = self.job_counts(fresh)
        done, succeeded, failed = (self.done_before + now, s.ok, failed_now) if job is None \
            else (job.done, job.succeeded, job.failed)
        elapsed = s.elapsed
        recent = self.rate.add(now)
        pace = self.pace() if self.pace is not None else None
        pause = self.pause_left() if self.pause_left is not None else 0.0
        left = None if not self.total else eta(self.total - done, recent, pace, pause)
        job_part: dict[str, Any] = {} if job is None else {
            "failed_by_class": {k: v for k, v in job.failed_by_class.items() if v},
            "unknown_outcome": job.unknown_outcome_in_flight, "pending": job.pending}
        return {
            **job_part,
            "done": done, "done_before": self.done_before, "done_this_run": now,
            "succeeded": succeeded, "failed": failed, "failed_this_run": failed_now,
            "in_flight": s.in_flight,
            "req_per_s": round(now / elapsed, 1),
            "recent_per_s": None if recent is None else round(recent, 2),
            "tok_per_s": round((s.prompt_tokens + s.completion_tokens) / elapsed, 1),
            "eta_s": None if left is None else round(left),
            "total": self.total,
            **self._spend(pace),
            **self._cache(),
        }

    def _cache(self) -> dict[str, Any]:
        """--cache: this run's hits and misses, and the tokens the hits did not cost."""
        c = self.cache
        if c is None:
            return {}
        return {"cache_hits": c.hits, "cache_misses": c.misses,
                "cache_tokens_saved": c.prompt_saved + c.completion_saved}

    def _spend(self, pace: float | None) -> dict[str, Any]:
        """Shown when the run has a budget or prices: tokens (and cost) spent of the budget;
        and the pace the run is sending at, when it has one."""
        out: dict[str, Any] = {}
        if pace is not None:
            out["pace_per_s"] = round(pace, 1)
        b = self.budget
        if b is not None and (b.enforcing or b.prices):
            out.update(b.progress(), spent_text=b.progress_text())
        return out

    def set_total(self, total: int) -> None:
        """Known once a background thread has counted the input's lines."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def start(self) -> None:
        if self.quiet and self.emit is None:
            return
        if self.tty and not self.quiet:
            from tqdm import tqdm  # module docstring

            fmt, postfix = layout(terminal_width(), self.snapshot())
            self._bar = tqdm(total=self.total, initial=self.done_before, unit="req",
                             dynamic_ncols=True, file=sys.stderr,
                             smoothing=0.1, bar_format=fmt, postfix=postfix or None)
            self._redirect_logs()
            self._task = asyncio.get_running_loop().create_task(self._loop(0.25))
        else:
            self._task = asyncio.get_running_loop().create_task(self._loop(self.interval))

    def _redirect_logs(self) -> None:
        """Log records go through tqdm.write while the bar is drawn; tqdm's handler copies
        the formatter but not the filters, so the key filter is put back on it."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        logger = logging.getLogger("tmbatch")
        self._redirect.enter_context(logging_redirect_tqdm(loggers=[logger]))
        for handler in logger.handlers:
            if REDACT not in handler.filters:
                handler.addFilter(REDACT)

    async def _loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.tick()

    def tick(self, fresh: bool = False) -> None:
        snap = self.snapshot(fresh)
        if self._bar is not None:
            self._draw(snap)
            return
        if self.emit is not None:
            self.emit("progress", snap)
        if not self.quiet and self.emit is None:
            print(line(snap), file=sys.stderr, flush=True)

    def _draw(self, snap: dict[str, Any]) -> None:
        assert self._bar is not None
        self._bar.bar_format, postfix = layout(terminal_width(), snap)
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(snap["done"] - self._last_done)
        self._last_done = snap["done"]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bar is not None:
            self.tick(fresh=True)
            self._bar.close()
        elif self._task is not None and self.emit is not None:
            self.tick(fresh=True)  # scripts get the last numbers, as the bar draws them
        self._redirect.close()


def line(snap: dict[str, Any]) -> str:
    """The progress line for logs that are not a terminal (cron mail, kubectl logs)."""
    total = f"/{snap['total']}" if snap["total"] else ""
    eta = f", eta {eta_text(snap['eta_s'])}" if snap["eta_s"] is not None else ""
    before = f" ({snap['done_before']} before this run)" if snap["done_before"] else ""
    this_run = f" ({snap['failed_this_run']} this run)" \
        if snap["done_before"] and snap["failed_this_run"] != snap["failed"] else ""
    pace = f" (paced at {snap['pace_per_s']}/s)" if "pace_per_s" in snap else ""
    recent = snap.get("recent_per_s")
    rate = f"{snap['req_per_s']} req/s" if recent is None else f"{recent} req/s now"
    spent = f", spent {snap['spent_text']}" if "spent_text" in snap else ""
    if "cache_hits" in snap:
        spent += (f", cache {snap['cache_hits']} hit(s) / {snap['cache_misses']} miss(es), "
                  f"{snap['cache_tokens_saved']} tokens saved")
    return (f"{time.strftime('%H:%M:%S')} progress: {snap['done']}{total} done{before}, "
            f"{snap['failed']} failed{this_run}, {snap['in_flight']} in flight, "
            f"{rate}{pace}, {snap['tok_per_s']} tok/s{eta}{spent}")
