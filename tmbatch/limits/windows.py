"""Rule 4: a lane closed (everything refused, no hint) holds and probes until it reopens, and
meets the window that closed it (N requests per W seconds counted afresh each window, as
most per-minute keys and LiteLLM's proxy count) with its N at each opening.

While closed the lane holds `PaceConfig.hold` s, then a quarter of the time closed, and
sends one request (a probe, `Lane.probe_turn`) at each hold's end; the first that gets
through reopens it. A pace is the wrong shape for a window: paced at N/W a lane spreads the
last window's N over W s where pausing sends them at once, and a pace measured across a
closure reads low by the hold's overshoot (200 per 60 s was paced at 2.7/s: 366 s for
1,000 lines, where the pauses alone took 250; bench/pause_only.py). So a lane that reopened
is unpaced: it sends at most what the last window let through (its allowance) from each
opening, then holds to the next opening's earliest estimate and probes from there. The
estimate is the opening found (the probe that got through) plus a lower bound of the
period: the longest span from an opening to a refusal in the same window, and from the
first opening to the last refusal over the windows between (the first opened before the
lane's first success); probes a second apart bracket each opening within a second, so k
windows bound the period within 1/k s. An opening found late makes the next estimate late
by as much, which a fixed window does not charge for (its allowance is whole until it
ends); one found early costs a refusal a second. Now and then one request past the
allowance asks whether the window grew: at each window while it did (a quarter more, then
doubling), else after 1, 2, 4 ... windows, `ASK_EVERY` s at most (a refusal each time it
did not). After a window that refused some of its allowance (at random: it was left
room), an opening most of whose allowance is refused was none: the probe met what was left
of that window (a lower bound of the period put the probe there), so the lane keeps its
allowance and its opening, whose period the refusals now bound. After a window used to the
full, or a refuted opening, it is a window that shrank, and the next opening measures it
(refuted, a window down from 40 to 10 took 209 s where the pauses alone take 130). A
refusal before the allowance is spent is heard out as rule 2 does, with no cut: nothing
through, the window shrank and closes there (the next opening counts it again); refusals
with successes among them are no window, and a pace governs the lane again. A lane that
knows others spend the same windows (a shard of K > 1, a fleet over Redis: `shared`) sees
neither all of a window's successes nor its own windows' ends, and meets windows with a
pace, as before (two shards each meeting it as its own got 42 % of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# seconds between two asks whether a window grew, at most: found within them and one window
# (rule 5 finds a rise within 10 s), at a refusal per ask that finds it the same
ASK_EVERY = 10.0


@dataclass(slots=True)
class Windows:
    """One lane's windows (see the module doc). Times are the loop's clock."""

    closed_since: float | None = None  # everything refused since (or the allowance spent)
    held_until: float = -math.inf  # the hold's end: a request sent from then is a probe
    allowance: int | None = None  # what a window lets through (None: no window met)
    opened: float | None = None  # the probe that found the window open
    first: float = 0.0  # a window opened before this ...
    count: int = 0  # ... and this many since
    fresh: bool = True  # no window met yet: the first opened before the lane's first success
    ok_before: int = 0  # the lane's successes before it opened
    sends: int = 0  # sent since it opened, or since the lane last held (the probe's count)
    refused: float = -math.inf  # the latest send of a refused request
    period: float = 0.0  # the period is longer than this
    expected: float = -math.inf  # where the lane held to at its allowance's end
    extra: int = 0  # requests past the allowance this window (asking whether it grew)
    gap: int = 1  # windows between two asks that found it the same
    # other processes spend the same windows (a shard of K > 1, a fleet over --redis): what
    # gets through and when a window opens are not the lane's to see, so a pace meets them
    shared: bool = False
    wait: int = 0  # windows until the next ask
    spent: float = math.inf  # when the allowance from the last opening was all sent
    # what the last reopening changed, while its allowance's refusals may refute it
    before: tuple[float | None, int, float, bool, int | None, int, int, int] | None = None
    burst_refused: int = 0  # refusals of the allowance sent from the last opening
    # a refuted opening's allowance, the next opening's too (which is then not refutable:
    # a window that shrank refuses the same way)
    kept: int | None = None

    @property
    def cap(self) -> float:
        """Sends from an opening before the lane holds (inf: no window met)."""
        return math.inf if self.allowance is None else self.allowance + self.extra

    def sent(self, t: float) -> float | None:
        """A request left, the lane closed or meeting a window: the seconds to hold when it
        spent the allowance."""
        self.sends += 1
        if self.closed_since is not None or self.sends < self.cap:
            return None
        self.spent = t
        return self.close(t, 0.0)  # (to the next opening; at once, if it may be open now)

    def close(self, now: float, least: float) -> float:
        """Everything refused since `closed_since` (or now), a probe refused, or the
        allowance spent: the seconds to hold before the next probe. A window met holds to its
        next opening's estimate; past it, or closed with none met, `least` at least, then a
        quarter of the time closed (from the estimate on)."""
        if self.closed_since is None:
            self.closed_since = now
        if self.allowance is not None and self.opened is not None:  # spent before its end
            self.expected = max(self.expected, self.opened + self.period)
        self.sends = 0
        if self.expected > now:
            hold = self.expected - now
        else:
            hold = max(least, (now - max(self.expected, self.closed_since)) / 4)
        self.held_until = now + hold
        return hold

    def refusal(self, sent: float) -> None:
        """A refusal of a request sent at `sent`: the window it met had not ended by then."""
        self.refused = max(self.refused, sent)
        before = self.before
        if self.opened is not None and self.opened < sent <= self.spent:
            self.burst_refused += 1
            if before is not None and 2 * self.burst_refused > self.cap:
                # most of the allowance sent from the opening was refused: the probe met what
                # was left of the window before (a refusal at random there left it room), so
                # the opening before is the last one, and this refusal met its window
                (self.opened, self.count, self.first, self.fresh, self.kept, self.extra,
                 self.gap, self.wait) = before
                self.before = None
        if self.opened is not None:
            self.period = max(self.period, sent - self.opened)

    def reopened(self, sent: float, ok: int, first_ok: float) -> int | None:
        """The probe sent at `sent` got through, the lane's `ok`-th success: a window opened.
        What the last let through, its allowance from now on (None: when the last opened is
        not known, after a pace governed; the next closure tells)."""
        self.closed_since = None
        # refutable only if the last window was left room (some of its allowance refused)
        # and was not itself a refuted opening's
        self.before = None
        if self.burst_refused and self.kept is None and self.allowance is not None:
            self.before = (self.opened, self.count, self.first, self.fresh, self.allowance,
                           self.extra, self.gap, self.wait)
        self.burst_refused, self.spent = 0, math.inf
        opened, self.opened = self.opened, sent
        ok_before, self.ok_before = self.ok_before, ok - 1
        if opened is not None:
            self.count += 1
            bound = max(self.refused - opened, (self.refused - self.first) / self.count)
        elif self.fresh:
            self.first, self.count, self.fresh = first_ok, 1, False
            bound = self.refused - first_ok
        else:
            self.first, self.count = sent, 0
            return None
        self.period = max(self.period, bound)
        through = ok - 1 - ok_before
        if self.kept is not None:
            through, self.kept = self.kept, None
        if self.allowance is not None and self.extra:
            if through >= self.allowance + self.extra:  # it grew: ask again, for more
                self.extra, self.gap = max(2 * self.extra, through // 4), 1
            else:
                most = max(1, int(ASK_EVERY / max(self.period, 1e-3)))
                self.extra, self.gap = 0, min(most, self.gap * 2)
                self.wait = self.gap
        elif self.wait > 0:
            self.wait -= 1
        else:
            self.extra = 1
        self.allowance = through
        return through

    def forget(self) -> None:
        """A pace governs the lane again (refusals and successes mixed: no window), and what
        was learnt of windows goes with it."""
        if self.opened is None:
            return  # (none met: the first window still opened before the first success)
        self.allowance = self.opened = self.before = self.kept = None
        self.expected, self.period, self.fresh = -math.inf, 0.0, False
