"""When one lane learns the rate limit's verdict on a request: at its refusal, or once it has
been out longer than a refusal takes.

A rate limit decides before the model does any work: a refusal comes back in a round trip,
a success a latency later (a second or more for an LLM's answer). A request out for twice
the refusals' round trip, and SLACK more, was let through, and the controller hears of it
then (at a send, an answer, or the lane's timer for the next one due), not when its answer
comes. Otherwise every measure taken at a refusal reads the successes of a latency earlier
(sent at a lower pace while it ramped: a limit that halves and comes back read 80 % of a
client that knew the schedule, answering in a second), and every rule that waits for
answers waits a latency (a bare bucket's echo: 8 % refused).
Before a lane's first refusal there is no round trip to go by and nothing to decide:
answers are the verdicts. Where answers come within SLACK (the matrix's 20 ms), they still
are.

A request refused after it was counted through (a refusal slower than the round trips seen
so far) is a refusal as any other; the success counted for it stays, one in the record.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

TRIPS = 2.0  # a request out this many refusal round trips was let through ...
SLACK = 0.05  # ... and these seconds more: a refusal may wait its turn in a busy loop
DECAY = 0.8  # the round trip is the slowest refusal's, decaying by this each refusal
STALE = 3600.0  # seconds after which a request let through and never answered (a 500, a
STALE_AT = 1024  # timeout: only successes and refusals are told) is forgotten, past this many


class Verdicts:
    """The verdicts of one lane's requests (see the module doc). Send times identify the
    requests: the permit passes the same float to the send and to its answer."""

    __slots__ = ("early", "pending", "rtt", "through")

    def __init__(self) -> None:
        self.rtt: float | None = None  # refusals' round trip; None: none refused yet
        self.pending: deque[float] = deque()  # sends since, in order, no verdict yet
        self.early: Counter[float] = Counter()  # pending, and answered already
        self.through: Counter[float] = Counter()  # let through, answer still to come

    def refused_in(self, rtt: float, sends: Iterable[float], answered: Iterable[float]) -> None:
        """A refusal took `rtt` seconds. The first: from here on sends are followed, and the
        `sends` given (the lane keeps the last second's) that are not among the `answered`
        are too; one sent longer ago is heard of by its answer."""
        if self.rtt is not None:
            self.rtt = max(rtt, DECAY * self.rtt)
            return
        self.rtt = rtt
        done = Counter(answered)
        for t in sends:
            if done[t] > 0:
                done[t] -= 1
            else:
                self.pending.append(t)

    def verdict_in(self) -> float:
        """Seconds after its send by which a request not refused was let through (a closed
        lane's probe too: `Lane.probe_turn`)."""
        return TRIPS * (self.rtt or 0.0) + SLACK

    def next_due(self) -> float | None:
        """When the next request out may be heard of as let through (None: none is out)."""
        return self.pending[0] + self.verdict_in() if self.pending else None

    def sent(self, t: float) -> None:
        if self.rtt is not None:
            self.pending.append(t)

    def due(self, now: float) -> list[float]:
        """Send times of the requests let through by `now` that were not answered yet."""
        pending, rtt = self.pending, self.rtt
        if not pending or rtt is None:
            return []
        wait = self.verdict_in()  # (due when t + wait <= now: as `next_due` says it)
        out: list[float] = []
        early, through = self.early, self.through
        while pending and pending[0] + wait <= now:
            t = pending.popleft()
            if early[t]:
                early[t] -= 1
                if not early[t]:
                    del early[t]
                continue
            through[t] += 1
            out.append(t)
        if len(through) > STALE_AT:
            for t in [t for t in through if t + wait + STALE < now]:
                del through[t]
        return out

    def answered(self, sent: float) -> bool:
        """An answer to the request sent at `sent`: True when it was counted through already
        (its answer is no news to the pace)."""
        n = self.through.get(sent)
        if n:
            if n == 1:
                del self.through[sent]
            else:
                self.through[sent] = n - 1
            return True
        pending = self.pending
        if pending and sent >= pending[0]:
            self.early[sent] += 1
        return False
