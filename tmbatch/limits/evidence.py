"""What one lane has seen, and the measures the controller reads off it.

The controller decides; this keeps the record its decisions rest on: the answers of the last
`history` seconds (when each request left and when it answered), the refusals and pauses among
them, the server's allowance as the first volley showed it, and a few rates measured over that
record. Everything a success adds costs O(1); the measures that look at the whole record
(`granted`) run at a refusal, which is rare.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque

HISTORY_MAX = 120.0  # seconds the record keeps at most (a slow limit needs long spans)
MIN_SPAN = 0.25  # seconds: a shorter span says too little about a rate
DRY_ENDS = 8  # refusals a probe's measure ends its spans at (each costs a pass over the sends)


def wilson(k: int, n: int, z: float) -> float:
    """The Wilson score bound of a share k/n (z < 0: the lower one, z > 0: the upper)."""
    if n <= 0:
        return 0.0 if z < 0 else 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = abs(z) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, max(0.0, (centre + math.copysign(spread, z)) / (1 + z * z / n)))


class Evidence:
    """One lane's record (see the module doc). Times are the loop's clock."""

    def __init__(self, window: float, hold: float = 1.0) -> None:
        self.window = window
        self.hold = hold  # the least pause that announces a window (`windowed`)
        # successes: when each request left and when it answered (two deques of floats, not
        # one of tuples: no tuple to build, and for the collector to untrack, per success)
        self.ok_sent: deque[float] = deque()
        self.ok_at: deque[float] = deque()
        self.recent: deque[float] = deque()  # answer times of the last second's successes
        self.refusals: deque[float] = deque()  # answer times of refusals
        self.refused_sent: deque[float] = deque()  # and when each was sent
        self.sends: deque[float] = deque()  # send times of the last second
        # Retry-After pauses: (from, to, requests saved up to send at once when it ends)
        self.pauses: deque[tuple[float, float, int]] = deque()
        self.pause_from = self.pause_until = -math.inf
        self.first_ok: float | None = None
        self.total_ok = 0
        self.latency = 0.0  # of the last success (a refusal comes back at once)
        # the first volley: successes of requests sent before its first refusal was heard
        self.volley: int | None = None
        self.volley_until = -math.inf
        # the first and last send of its successes, and the first and last answer
        self.volley_first, self.volley_last = math.inf, -math.inf
        self.volley_answered_first, self.volley_answered_last = math.inf, -math.inf
        self.let_through: set[float] = set()  # before the volley: successes not answered
        self.first_rate = 0.0  # the first cut's pace (what refilled during the volley)

    # -- recording -----------------------------------------------------------------------
    def sent(self, t: float) -> None:
        sends = self.sends
        sends.append(t)
        while sends[0] < t - 1.0:
            sends.popleft()

    def succeeded(self, sent: float, now: float, answered: bool = True) -> None:
        """A success, `answered` or let through (`verdicts`: its answer is still to come,
        and says the latency)."""
        self.ok_sent.append(sent)
        self.ok_at.append(now)
        recent = self.recent
        recent.append(now)
        while recent[0] < now - 1.0:
            recent.popleft()
        self.total_ok += 1
        if answered:
            self.latency = now - sent
        if self.first_ok is None:
            self.first_ok = now
        if sent <= self.volley_until:
            self._in_volley(sent, now if answered else None)
        elif not answered and self.volley is None:
            self.let_through.add(sent)
        self._prune(now)

    def answered(self, sent: float, now: float) -> None:
        """The answer of a success let through before (`verdicts`): its latency, and its
        answer's time if it was one of the volley's."""
        self.latency = now - sent
        if sent <= self.volley_until:
            self._volley_answered(now)

    def refused(self, now: float, sent: float) -> None:
        self.refusals.append(now)
        self.refused_sent.append(sent)
        self._prune(now)

    @property
    def last_pause(self) -> float | None:
        """Seconds the last Retry-After pause held (None: none yet)."""
        return self.pause_until - self.pause_from if self.pause_until > -math.inf else None

    def windowed(self, wait: float | None) -> bool:
        """A pause of `hold` s or more announces a window, which pauses alone deal with (a
        mistake costs a pause every worker takes anyway); a shorter one is a bucket's next
        request (`retry-after-ms`), which every worker of an unpaced lane meets at once: a
        bucket of 20/s holding 200, its cut undone, was sent 1,260 refused requests a second."""
        return wait is not None and wait >= self.hold

    def paused(self, now: float, until: float, saved: int = 0) -> None:
        if now > self.pause_until:
            self.pause_from = now
            self.pauses.append((now, until, saved))
        elif until > self.pause_until:
            self.pauses[-1] = (self.pauses[-1][0], until, saved)
        self.pause_until = max(self.pause_until, until)

    def start_volley(self, heard: float) -> None:
        """The first refusal, heard at `heard`: what was sent until then is the volley (some
        still answering). The lane sent unpaced until it heard of it, all of it one burst,
        which the server meets in its own order: over real sockets a request stamped after
        the refused one got through (its connection was up first). Counted after the volley,
        it made a span over the pause that followed read 4/s for a limit of 20/s, and one of
        `two-models`' lanes sat 20 s at half its limit in three runs of eight (57-59 %)."""
        if self.volley is not None:
            return
        self.volley = 0
        self.volley_until = heard
        for sent, at in zip(self.ok_sent, self.ok_at, strict=True):
            if sent <= heard:
                self._in_volley(sent, None if sent in self.let_through else at)
        self.let_through.clear()

    def _in_volley(self, sent: float, at: float | None) -> None:
        """One of the volley's successes, answered at `at` (None: let through, its answer
        to come: the time it was heard of is no answer's)."""
        self.volley = (self.volley or 0) + 1
        self.volley_first = min(self.volley_first, sent)
        self.volley_last = max(self.volley_last, sent)
        if at is not None:
            self._volley_answered(at)

    def _volley_answered(self, at: float) -> None:
        self.volley_answered_first = min(self.volley_answered_first, at)
        self.volley_answered_last = max(self.volley_answered_last, at)

    @property
    def allowance(self) -> float | None:
        """The server's burst: the first volley's successes, less what refilled while they
        were sent (at the first pace, a lower bound of the server's rate). Netting the refill
        at the rate measured since reads it lower, and truer where the volley met the server
        over a long spread (a bucket of 100/s holding 20 read 23 here, and the burst a pause
        ended with was refused), but over real sockets the spread is read long, and pauses
        that end with less than the bucket refilled cost `halved` 4 % (docs/limits.md)."""
        if not self.volley:
            return None
        return max(1.0, self.volley - self.first_rate * self.spread)

    @property
    def spread(self) -> float:
        """Seconds over which the server met the first volley, as near as the client can
        tell: the smaller of the spreads of its sends and of its answers. A send's stamp
        comes before the connection it needs (a first volley opens one per request, some
        milliseconds each) and an answer's after the server's own jitter; each is late by
        its own amount, and the smaller spread is the nearer. Too long a spread reads the
        rate high (`granted` divides by the span less it), and a pace over the limit drains
        the allowance until a refusal: with whole-second Retry-After, a second lost."""
        if not self.volley:
            return 0.0
        sends = self.volley_last - self.volley_first
        answers = self.volley_answered_last - self.volley_answered_first
        return max(0.0, min(sends, answers) if answers >= 0 else sends)

    def _prune(self, now: float) -> None:
        horizon = now - (self.history if self.volley else self.window)  # (no volley: window)
        ok_at, refusals, pauses = self.ok_at, self.refusals, self.pauses
        while ok_at and ok_at[0] < horizon:
            ok_at.popleft()
            self.ok_sent.popleft()
        while refusals and refusals[0] < horizon:
            refusals.popleft()
            self.refused_sent.popleft()
        while pauses and pauses[0][1] < horizon:
            pauses.popleft()

    # -- measures ------------------------------------------------------------------------
    @property
    def history(self) -> float:
        """Seconds the record looks back: the window, or long enough for the allowance to
        refill four times at what got through on average (a slow limit with a big burst
        shows its rate only over a few refills)."""
        if not self.volley or self.first_ok is None or not self.ok_at:
            return self.window
        average = self.total_ok / max(1.0, self.ok_at[-1] - self.first_ok)
        return max(self.window, min(4.0 * self.volley / average, HISTORY_MAX))

    def granted(self, refused_sent: float, since: float | None = None) -> float | None:
        """The rate the server granted, as a bucket shows it: over any span, what got
        through is at most what it held at the start (at most the volley's v) plus its rate x
        the span, pauses and all; so rate >= (n - v) / t for every span of t seconds in which
        n requests that got through were sent, tight from where the bucket was last full. The
        volley also got what refilled while it was sent, over s seconds, so (n - v) / (t - s)
        is the rate itself, a token or two either way: the largest over every send since the
        volley. None when no span got more than the volley through: refused before that could
        be spent."""
        return self.granted_between(refused_sent, since)[0]

    def granted_between(self, refused_sent: float, since: float | None = None
                        ) -> tuple[float | None, float]:
        """`granted`, and the least rate at which the request sent at `refused_sent` would
        have got through too: the bucket ran dry over some span from one of the sends before
        it, so for that span n + 1 > v + rate x t, the rate below (n + 1 - v) / t (less the
        volley's spread, as the lower bound). The first is where the successes put the rate,
        the second where the refusal does: over few requests the two are a request apart,
        10/s reads 8.8 to 10.6 over a third of a second, and the lower bound alone, trusted
        for a plateau, is 12 % short of the limit. Both in one pass over the sends (the
        second 0.0 when no span says anything).

        `since`: a probe began then (the rate was not seen to fall since), so every span from
        a send after it is a bound too, and the tight ones end where the allowance ran dry:
        at the last success before each refused send. A bucket that holds one request grants
        half a pace over it (every other send finds it empty), so the spans that end at the
        last success read 39/s for a limit of 50/s that 44/s had met without a refusal.
        Only where those say something: alone, these would be a weak bound where there was
        none. And none across a pause, when the bucket refilled: the tight span starts after."""
        volley = self.volley
        if not volley:
            return None, 0.0
        spread = self.spread
        sent = sorted(t for t in self.ok_sent if self.volley_until < t <= refused_sent)
        low: float | None = None
        most = 0.0
        end = sent[-1] if sent else 0.0
        for i, t in enumerate(sent):
            got = len(sent) - i
            if got < volley:
                break
            if refused_sent - t - spread >= MIN_SPAN:
                most = max(most, (got + 1 - volley) / (refused_sent - t - spread))
            span = end - t - spread
            if got == volley or span < MIN_SPAN:
                continue
            m = (got - volley) / span
            low = m if low is None else max(low, m)
        if since is None or low is None:
            return low, most
        since = max(since, self.pause_until)
        for j in self._ran_dry(sent, since, refused_sent):
            for i in range(bisect_left(sent, since), j + 1 - volley):
                span = sent[j] - sent[i] - spread
                if span < MIN_SPAN:
                    break
                m = (j + 1 - i - volley) / span
                low = m if low is None else max(low, m)
        return low, most

    def _ran_dry(self, sent: list[float], since: float, until: float) -> list[int]:
        """Indices in `sent` of the last success before each refused send from `since` to
        `until`, the earliest DRY_ENDS (where a probe first found the allowance gone; the
        last one is `granted_between`'s own end)."""
        ends = {bisect_left(sent, r) - 1 for r in self.refused_sent if since <= r < until}
        return sorted(e for e in ends if 0 <= e < len(sent) - 1)[:DRY_ENDS]

    def counts(self, since: float | None = None) -> tuple[int, int]:
        """(refusals, answers) over the history, or of the requests sent from `since`."""
        if since is None:
            return len(self.refusals), len(self.ok_at) + len(self.refusals)
        refused = sum(1 for t in self.refused_sent if t >= since)  # (answers come in any
        return refused, refused + sum(1 for t in self.ok_sent if t >= since)  # order)

    def got_through(self, now: float) -> float:
        """Successes per second over the last second, or over the history when that says
        more (a window granted at its start and closed since)."""
        recent = self.recent
        while recent and recent[0] < now - 1.0:
            recent.popleft()
        return max(float(len(recent)), self.window_rate(now))

    def _held(self, now: float) -> float:
        """How much of the last second a pause held back."""
        return max(0.0, min(now, self.pause_until) - max(now - 1.0, self.pause_from))

    def sending(self, now: float) -> float:
        """Requests sent per second over the part of the last second no pause held back."""
        sends = self.sends
        while sends and sends[0] < now - 1.0:
            sends.popleft()
        return len(sends) / max(MIN_SPAN, 1.0 - self._held(now))

    def through_while_sending(self, now: float, span: float = 1.0) -> float:
        """Successes per second over the last `span` seconds of sending: the span reaches
        back past the pauses in it (a refusal just after a pause would find a second of
        nothing otherwise, and read it as the server's rate), and what a pause saved up to
        send at its end is left out: it was got while paused, and counted, pause after pause
        of a limit that fell would hold the floor near the old rate."""
        cursor, remaining = now, span  # sending time still to cover, back from the cursor
        saved = 0  # requests the pauses in the span saved up: sent at their ends, not paced
        for since, until, burst in reversed(self.pauses):
            end = min(until, cursor)
            if end <= cursor - remaining:
                break
            remaining -= cursor - end
            cursor = min(since, cursor)
            saved += burst
        start, covered = cursor - remaining, span
        horizon = now - self.history  # (the record reaches no further back)
        if start < horizon:
            start, covered = horizon, span - (horizon - start)
        n = 0
        for t in reversed(self.ok_at):
            if t < start:
                break
            n += 1
        return max(0, n - saved) / max(MIN_SPAN, covered)

    def window_rate(self, now: float) -> float:
        """Successes per second over the history, pauses and all."""
        if self.first_ok is None:
            return 0.0
        return len(self.ok_at) / min(self.history, max(1.0, now - self.first_ok))

    def average(self, now: float) -> float:
        """Successes per second since the first."""
        if self.first_ok is None:
            return 0.0
        return self.total_ok / max(1.0, now - self.first_ok)
