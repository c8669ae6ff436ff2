"""Progress for people (a tqdm bar on a TTY) and for machines (a plain line every few seconds).

Cron mail and `kubectl logs` do not render carriage returns, so a bar is only
drawn when stderr is a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from tmbatch.summary import RunStats


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
        budget: Any = None,
    ) -> None:
        self.stats = stats
        self.total = total
        self.quiet = quiet
        self.interval = interval
        self.emit = emit
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar: tqdm | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_done = 0
        self.budget = budget  # a budget.Budget: spend (and the budget) on every line

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        failed = sum(s.failed.values())
        done = s.ok + failed
        elapsed = s.elapsed
        rate = done / elapsed
        left = None if not self.total or rate <= 0 else max(0.0, (self.total - done) / rate)
        return {
            "done": done, "succeeded": s.ok, "failed": failed, "in_flight": s.in_flight,
            "req_per_s": round(rate, 1),
            "tok_per_s": round((s.prompt_tokens + s.completion_tokens) / elapsed, 1),
            "eta_s": None if left is None else round(left),
            "total": self.total,
            **self._spend(),
        }

    def _spend(self) -> dict[str, Any]:
        """Shown when the run has a budget or prices: tokens (and cost) spent of the budget."""
        b = self.budget
        if b is None or not (b.enforcing or b.prices):
            return {}
        return b.progress()

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
            self._bar = tqdm(total=self.total, unit="req", dynamic_ncols=True, file=sys.stderr,
                             smoothing=0.1)
            self._task = asyncio.get_running_loop().create_task(self._loop(0.25))
        else:
            self._task = asyncio.get_running_loop().create_task(self._loop(self.interval))

    async def _loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.tick()

    def tick(self) -> None:
        snap = self.snapshot()
        if self._bar is not None:
            self._bar.update(snap["done"] - self._last_done)
            self._last_done = snap["done"]
            self._bar.set_postfix(
                failed=snap["failed"], inflight=snap["in_flight"], tok_s=snap["tok_per_s"],
                refresh=False, **({"spent": self.budget.progress_text()}
                                  if "spent_tokens" in snap else {}),
            )
            return
        if self.emit is not None:
            self.emit("progress", snap)
        if not self.quiet and self.emit is None:
            total = f"/{snap['total']}" if snap["total"] else ""
            eta = f", eta {snap['eta_s']}s" if snap["eta_s"] is not None else ""
            print(
                f"{time.strftime('%H:%M:%S')} progress: {snap['done']}{total} done, "
                f"{snap['failed']} failed, {snap['in_flight']} in flight, "
                f"{snap['req_per_s']} req/s, {snap['tok_per_s']} tok/s{eta}"
                + (f", spent {self.budget.progress_text()}" if "spent_tokens" in snap else ""),
                file=sys.stderr, flush=True,
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bar is not None:
            self.tick()
            self._bar.close()
