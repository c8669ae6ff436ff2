"""The workers with a request on the wire, and the one sweep that holds each to `--timeout`.

aiohttp's `ClientTimeout(total=...)` arms a loop timer for every request and cancels it at the
answer: 22,000 instructions of the 600,000 a request cost the run (bench/instructions.py,
2026-12-07). A run has at most `--concurrency` requests on the wire, all with the same
timeout, so the runner's 0.2 s poll (`Runner._wait_workers`) finds every one that is overdue,
for the price of one dict entry a request. A request is cut off between `timeout` and
`timeout + 0.2` seconds after it was dispatched (aiohttp rounds a deadline over 5 s up to
the next whole second, too). The cut is aiohttp's own: the worker's task is cancelled, and the
attempt ends as `read_timeout` (ambiguous: never sent again on its own) instead of the
cancellation. A stop that cancels the task as well wins: the cancellation goes on.
"""

from __future__ import annotations

import asyncio

from tmbatch.client.classify import classify_exception
from tmbatch.policy import AttemptFailed


class InFlight:
    """Worker tasks with a request on the wire, each with the loop time its whole answer is
    due by. A stop lets these finish and cancels the other workers (`Runner._cancel_idle`)."""

    __slots__ = ("_cut", "due", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.due: dict[asyncio.Task[None], float] = {}
        self._cut: set[asyncio.Task[None]] = set()  # cancelled by `sweep`, not yet told

    def add(self, task: asyncio.Task[None], now: float) -> None:
        self.due[task] = now + self.timeout

    def discard(self, task: asyncio.Task[None]) -> None:
        self.due.pop(task, None)

    def __contains__(self, task: object) -> bool:
        return task in self.due

    def __len__(self) -> int:
        return len(self.due)

    def sweep(self, now: float) -> int:
        """Cancel every request whose answer is overdue; how many were."""
        late = [task for task, due in self.due.items() if due <= now]
        for task in late:
            del self.due[task]
            self._cut.add(task)
            task.cancel()
        return len(late)

    def failure(self, caught: BaseException, task: asyncio.Task[None]) -> AttemptFailed:
        """What ended the send, as the attempt's failure: `caught` itself, or the timeout
        when it is `sweep`'s cancellation. Any other cancellation is raised again."""
        if isinstance(caught, AttemptFailed):
            return caught
        if task not in self._cut:
            raise caught
        self._cut.discard(task)
        if task.uncancel() > 0:  # cancelled by someone else too (a stop): that goes on
            raise caught
        return classify_exception(TimeoutError())
