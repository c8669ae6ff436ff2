"""Progress for people (a tqdm bar on a TTY) and for machines (a plain line every few seconds).

Cron mail and `kubectl logs` do not render carriage returns, so a bar is only drawn when
stderr is a terminal. While it is drawn, log lines go through tqdm (its logging redirect),
which clears the bar, prints the line and draws the bar again below it: a warning written
straight to stderr would land in the middle of the bar. The bar's layout follows the
terminal's width, so an 80-column terminal still gets a bar rather than one cell of it.
tqdm is imported only once a bar is drawn: its import is ~10 ms of every start.

After a resume the bar and the progress lines count the whole job (lines done before plus
this run's, of all lines), and the rate and ETA come from this run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tmbatch.base.logs import REDACT
from tmbatch.journal.compact import LineStates
from tmbatch.run.config import RunConfig
from tmbatch.run.summary import RunStats

if TYPE_CHECKING:
    from tqdm import tqdm

# Below WIDE columns the bar drops in-flight and tok/s; below NARROW it drops the bar itself.
WIDE, NARROW = 110, 60


def layout(width: int, snap: dict[str, Any]) -> tuple[str, str]:
    """(tqdm bar_format, postfix) that fit `width` columns with a bar worth looking at.

    tqdm's default puts every statistic on the right and gives the bar what is left, which
    at 80 columns with a postfix is one cell; here the statistics shrink with the width.
    """
    failed = f"{snap['failed']:,} failed" if snap["failed"] else ""
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
        return "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, " \
            "{rate_fmt}]{postfix}", postfix
    if width >= NARROW:
        return "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {rate_fmt} eta {remaining}" \
            "{postfix}", failed
    return "{n_fmt}/{total_fmt} {percentage:.0f}% eta {remaining}{postfix}", failed


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
    ) -> None:
        self.stats = stats
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
        done = sum(n for o, n in states.by_outcome().items() if o.policy.final)
        return cls(stats, None, done_before=done, **common)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        failed = sum(s.failed.values())
        now = s.ok + failed
        done = self.done_before + now
        elapsed = s.elapsed
        rate = now / elapsed
        left = None if not self.total or rate <= 0 else max(0.0, (self.total - done) / rate)
        return {
            "done": done, "done_before": self.done_before, "done_this_run": now,
            "succeeded": s.ok, "failed": failed, "in_flight": s.in_flight,
            "req_per_s": round(rate, 1),
            "tok_per_s": round((s.prompt_tokens + s.completion_tokens) / elapsed, 1),
            "eta_s": None if left is None else round(left),
            "total": self.total,
            **self._spend(),
            **self._cache(),
        }

    def _cache(self) -> dict[str, Any]:
        """--cache: this run's hits and misses, and the tokens the hits did not cost."""
        c = self.cache
        if c is None:
            return {}
        return {"cache_hits": c.hits, "cache_misses": c.misses,
                "cache_tokens_saved": c.prompt_saved + c.completion_saved}

    def _spend(self) -> dict[str, Any]:
        """Shown when the run has a budget or prices: tokens (and cost) spent of the budget;
        and the pace the run is sending at, when it has one."""
        out: dict[str, Any] = {}
        pace = self.pace() if self.pace is not None else None
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

    def tick(self) -> None:
        snap = self.snapshot()
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
            self.tick()
            self._bar.close()
        self._redirect.close()


def line(snap: dict[str, Any]) -> str:
    """The progress line for logs that are not a terminal (cron mail, kubectl logs)."""
    total = f"/{snap['total']}" if snap["total"] else ""
    eta = f", eta {snap['eta_s']}s" if snap["eta_s"] is not None else ""
    before = f" ({snap['done_before']} before this run)" if snap["done_before"] else ""
    pace = f" (paced at {snap['pace_per_s']}/s)" if "pace_per_s" in snap else ""
    spent = f", spent {snap['spent_text']}" if "spent_text" in snap else ""
    if "cache_hits" in snap:
        spent += (f", cache {snap['cache_hits']} hit(s) / {snap['cache_misses']} miss(es), "
                  f"{snap['cache_tokens_saved']} tokens saved")
    return (f"{time.strftime('%H:%M:%S')} progress: {snap['done']}{total} done{before}, "
            f"{snap['failed']} failed, {snap['in_flight']} in flight, "
            f"{snap['req_per_s']} req/s{pace}, {snap['tok_per_s']} tok/s{eta}{spent}")
