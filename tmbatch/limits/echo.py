"""Rule 2 of the pace with no hint (`controller`): the echo of a bare refusal.

A refusal without a Retry-After does not say how long the server stays drained. What is sent
within the round trip after it meets a server still drained by what was in flight, so the
echo listens after that round trip, to the answers of what is sent over the next span and to
SAMPLE answers at least (a run of refusals with nothing through is enough: the server is
closed). A drained bucket refuses nearly all of it, refusals at random few; what got through
meanwhile is what the controller cuts to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tmbatch.limits.probation import SAMPLE

CLOSED_RUN = 3  # refusals in a row, none through, that say the server is closed
WAIT = 60.0  # seconds after its span the echo waits at most for what it sent to answer


@dataclass(slots=True)
class Echo:
    """A refusal with no hint, and the round trip after it: what the server did with what was
    sent meanwhile (a drained bucket refuses nearly all of it, refusals at random few)."""

    start: float
    until: float  # answers of requests sent from start to here are the echo ...
    before: float | None  # ... heard at a pace; the pace and the rate before it
    limit: float | None
    ok: int = 0
    refused: int = 0
    last: float = -math.inf  # the last send counted
    sent: int = 0  # requests sent from start to until ...
    heard: int = 0  # ... and answered

    @classmethod
    def after(cls, now: float, rtt: float, pace: float | None, before: float | None,
              limit: float | None) -> Echo:
        """The echo of a refusal answered at `now` after `rtt` s on the way, heard at `pace`
        (None: unpaced); `before` and `limit` are the pace and the server's rate before the
        refusal."""
        start = now + rtt
        span = max(0.1, 2.0 * rtt, 4.0 / (pace or 1.0))
        return cls(start, start + span, before, limit)

    def listening(self, sent: float, refused: bool, now: float) -> bool:
        """Count the answer of a request sent at `sent` (after `start`). False, counting
        nothing, once the echo has its round trip and SAMPLE answers (or a closed run), and
        what it sent in its span has answered: a refusal comes back at once, a success
        after the server's latency (answers of a second: twenty refusals came back before
        the first success, and the echo took a server granting 50/s for closed). At most
        WAIT s after the span: an answer lost to a timeout or a 500 never comes."""
        closed = self.ok == 0 and self.refused >= CLOSED_RUN
        if sent <= self.until or (self.ok + self.refused < SAMPLE and not closed):
            self.heard += sent <= self.until
            self.ok += not refused
            self.refused += refused
            self.last = max(self.last, sent)
            return True
        return self.heard < self.sent and now < self.until + WAIT

    @property
    def answers(self) -> int:
        return self.ok + self.refused

    def delivered(self) -> float:
        """Requests per second that got through while it listened."""
        return self.ok / max(self.last - self.start, self.until - self.start)
