"""How fast to send when nobody says: a pace learnt from 429s, their hints and successes.

Most users do not know their account's rate limit. Concurrency alone cannot express a rate
(at 20 ms latency one request in flight is already 50 a second), and living on Retry-After
(every 429 stops every worker for a second) wastes most of the limit. So requests are paced
by a GCRA scheduler (`Pacer`) whose rate a `RateLearner` sets:

* `x-ratelimit-limit/remaining/reset-*` headers state the limit: the bucket refills
  (limit - remaining) in `reset` seconds, so that is the pace, a little under it.
* Otherwise the rate is learnt. Unpaced at first, sends ramp up until the first refusal.
  A refusal (a 429, a 503 with Retry-After, a 408: what `safety` calls rejected) is one
  congestion event per round trip: the pace becomes what the server actually accepted over
  the last seconds (it accepts at its limit while refusing the rest) and never more than a
  cut of the old pace. After the first cut the pace ramps up fast (that first measure is a
  lower bound: the server's burst hid its rate); after later ones each success raises it a
  little once refusals have been quiet for CALM (a probe, so a limit that grows is found
  again), faster far below the pace last refused. A refusal before anything got through is
  no measure: the run stays unpaced (the pause or the backoff hold it) until something has.
  Only answers to requests sent after the last cut grow the pace: the rest of the volley
  the server cut off still answers after the cut (the first cut's measure counts them).
* A server that refuses everything with no hint (two requests sent at the new pace refused
  and none through, or nothing through for a few intervals of the pace: a window granted at
  its start and closed since) is not probed at any pace: `refused` returns a hold for every
  worker, 1 s doubling to MAX_CLOSED_HOLD, and the pace becomes what got through since the
  first success, however deep a cut that is (over LONG seconds a window longer than that
  shows nothing once it has closed).
* A bucket that drained shows its rate: the volley met it full, so it holds about what the
  volley got through; what got through from where it was last full to the refusal, less
  that, over the time it took, is its rate (`_drained_rate`, within one request over the
  stretch). A cut goes no lower than that, a little under it. The cut's own measure, what
  got through in the last second, held part of the burst and is 4-5 % under.
* "Nothing through" is judged only once what was sent after the cut or the pause could
  have answered: a refusal comes at once, a success a latency later.
* A Retry-After pause ends with a burst: what the server's bucket refilled meanwhile at the
  learnt pace, up to RESUME_SHARE of the burst the first volley showed (`paused`,
  `Pacer.restart_at`). A refusal of it ends the bursts but does not cut the pace: the burst
  emptied the bucket, not the pace.
* `--rpm` fixes the pace instead; nothing is learnt.

aiolimiter's buckets have a fixed rate: a pace that changes under the waiters needs its own
scheduler, and GCRA is a few lines (the same as `limits.TokenBucket`'s). Every Retry-After
window is still honoured for every worker by `limits.Admission`'s shared pause.
"""

from __future__ import annotations

import logging
import math
from collections import deque

log = logging.getLogger("tmbatch")

MIN_RATE = 0.05  # requests/s: a pace never falls below one request in 20 s
BURST_SECONDS = 0.05  # a pace's burst: 50 ms worth, at least one request and at most four
MAX_BURST = 4.0
HINT_MARGIN = 0.99  # pace a little under a limit the server states (measured over a second)
CUT = 0.9  # after a refusal, at most this much of the old pace ...
ACCEPTED_MARGIN = 0.85  # ... and at most this much of what the server accepted last second
# (that second may include what the server's burst absorbed: its accept rate is lower)
DEEPEST_CUT = 0.5  # ... but never less than half of it in one step
EVENT_GAP = 1.0  # seconds: one refusal event at most this often (its answers come together)
# Growth of the pace, relative, per second of successes: fast after the first refusal (the
# estimate there is a lower bound: the server's burst hid its rate), then slow near the pace
# that was last refused (so 429s stay rare), faster again far below it.
RAMP_GROWTH = 3.0
NEAR_GROWTH = 0.005
FAR_GROWTH = 0.3
NEAR = 0.8  # "near": within this fraction of the pace last refused
NEAR_CUT = 0.97  # a probe that found the limit again: the pace it was refused at is precise
# A probe that meets the limit costs the pause the refusal announces (a whole-second
# Retry-After stops every worker for a second): near the limit it grows slower by this much
# per second of that pause, so the costlier a refusal, the rarer.
PAUSE_COST = 3.0
# The pace may lead what is actually accepted by this much, and no more: when something else
# holds the sends back (concurrency, latency), a pace that grew on would burst when it lets go.
LEAD = 1.5
LONG = 5.0  # seconds: a server that grants in windows (N per W s) shows its rate over this
MAX_CLOSED_HOLD = 8.0  # seconds: the longest hold while a server refuses everything
CLOSED_AFTER = 0.25  # seconds (and 3 intervals of the pace) of refusals, nothing through:
# the server refuses everything (an event of its own) ...
CLOSED_REFUSALS = 2  # ... or this many refusals of requests sent after the last cut and none
# of them through (the first may still meet the bucket the volley before the cut emptied)
CALM = 0.5  # seconds without a refusal before the pace may grow
LOG_CHANGE = 0.2  # a pace change of 20 % is worth a log line
# After a Retry-After pause the server's bucket has refilled: that much is sent at once when
# the pause ends, up to this share of the burst the first volley showed (`_volley_burst`: what
# it got through, less what the bucket refilled while it was sent)
RESUME_SHARE = 0.8
# A refusal after a bucket drained shows its rate (`_drained_rate`): the pace may go up to
# that, a little under it for the jitter of the send times it rests on
DRAINED_MARGIN = 0.98
DRAIN_MIN = 0.25  # seconds: a shorter stretch says too little about a rate
BURST_SPREAD = 0.1  # seconds after the pause within which its burst is sent (a busy loop)


class Pacer:
    """GCRA: each request books the next slot; the wait is how far the booking is ahead."""

    __slots__ = ("credit", "credit_from", "credited", "interval", "rate", "tat", "tolerance")

    def __init__(self, rate: float | None = None) -> None:
        self.rate: float | None = None
        self.interval = 0.0
        self.tolerance = 0.0
        self.tat = -math.inf
        self.credit = 0  # slots free at once from credit_from (a pause's refilled bucket)
        self.credit_from = math.inf
        self.credited = False  # the last booking was a credit (unbook gives it back)
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        if rate is None:
            return
        self.interval = 1.0 / rate
        burst = min(MAX_BURST, max(1.0, rate * BURST_SECONDS))
        self.tolerance = (burst - 1.0) * self.interval

    def book(self, now: float) -> float:
        """Seconds to wait before sending; the slot is taken either way."""
        if self.rate is None:
            return 0.0
        if self.credit and now >= self.credit_from:
            self.credit -= 1
            self.credited = True
            return 0.0
        self.credited = False
        start = max(self.tat, now - self.tolerance)
        self.tat = start + self.interval
        return max(0.0, start - now)

    def unbook(self) -> None:
        """A booked request that will not be sent (its worker stopped): give the slot back."""
        if self.rate is None:
            return
        if self.credited:
            self.credit += 1
        else:
            self.tat -= self.interval

    def restart_at(self, when: float, burst: int = 0) -> None:
        """After a pause: the first slot is when the pause ends, with no burst saved up
        before it; `burst` slots are free at once then (what the server's bucket refilled
        during the pause, as the learner estimates it), else only the pace's own burst."""
        if self.rate is not None and burst > 1 + self.tolerance / self.interval:
            self.credit = burst - 1
            self.credit_from = when
            self.tat = max(self.tat, when)
        else:
            self.credit = 0
            self.tat = max(self.tat, when - self.tolerance)


class RateLearner:
    """Sets the pacer's rate from what the server says and does (see the module doc)."""

    def __init__(self, pacer: Pacer, *, learn: bool) -> None:
        self.pacer = pacer
        self.learn = learn
        # success times of the last second, and of the last LONG seconds: counted as lengths,
        # so a success costs the same at 5 or 5,000 a second
        self.accepted: deque[float] = deque()
        self.accepted_long: deque[float] = deque()
        self.sent_long: deque[float] = deque()  # send times of those of the last LONG seconds
        self.volley_first: float | None = None
        self.volley_last = -math.inf
        self.first_accepted: float | None = None
        self.total_accepted = 0
        self.last_cut = -math.inf
        self.through_since_cut = True  # a request sent after the last cut got through
        self.refused_since_cut = 0  # ... and how many of them were refused
        self.refused_at: float | None = None  # the pace the last refusal happened at
        self.cuts = 0
        self.closed_hold = 0.0  # the last hold while everything was refused (see refused)
        self.last_refusal = -math.inf
        self.pause_cost = 0.0  # seconds of pause the last refusal event announced
        self.hinted = False
        self.volley: int | None = None  # successes of requests sent before the first cut
        self.burst_at = math.inf  # when the last pause's burst was sent (see paused)
        self.burst_refused = False
        self.pause_from = self.pause_until = -math.inf  # the last Retry-After pause
        self.latency = 0.0  # of the last success (a refusal comes at once)
        self.since_pause = 0  # successes of requests sent since it ended ...
        self.since_pause_last = -math.inf  # ... and the last of their sends
        self.source = "fixed (--rpm)" if pacer.rate is not None else "unpaced"
        self._logged: float | None = pacer.rate
        self.lowest: float | None = pacer.rate

    @property
    def rate(self) -> float | None:
        return self.pacer.rate

    def success(self, now: float, sent_at: float) -> None:
        """An answer: counted in what got through; the pace grows only on answers to
        requests sent at it (one sent before the last cut says nothing about the new pace:
        the answers of a volley the server cut off still arrive after the cut)."""
        if not self.learn:
            return
        self.accepted.append(now)
        self.accepted_long.append(now)
        self.sent_long.append(sent_at)
        if sent_at >= self.pause_until:
            self.since_pause += 1
            self.since_pause_last = max(self.since_pause_last, sent_at)
        self.total_accepted += 1
        self.latency = now - sent_at
        if self.first_accepted is None:
            self.first_accepted = now
        self._prune(now)
        rate = self.pacer.rate
        after_cut = sent_at > self.last_cut  # not in the cut's own clock tick (uvloop: 1 ms)
        if after_cut:
            self.through_since_cut = True
        if rate is None or self.hinted:
            return  # unpaced or stated: nothing to learn
        if not after_cut:
            if self.cuts == 1 and self.refused_at is None:
                if self.volley is not None:
                    self.volley += 1
                    self._volley_sent(sent_at)
                # the first cut's measure, completed by the rest of its volley's answers
                measured = ACCEPTED_MARGIN * self._got_through(now)
                if measured > rate:
                    self._set(measured, "learnt from refusals")
            return  # sent before the last cut: says nothing about the new pace
        if self.cuts > 1 and now - self.last_refusal < CALM:
            return  # past the first ramp and still being refused: no reason to speed up
        if rate > LEAD * max(self._got_through(now), self._unpaused_rate(now)):
            return  # sends have not followed the pace up yet
        if self.cuts == 1:
            growth = RAMP_GROWTH
        elif self.refused_at is not None and rate >= NEAR * self.refused_at:
            growth = NEAR_GROWTH / (1.0 + PAUSE_COST * self.pause_cost)
        else:
            growth = FAR_GROWTH
        # per success, so that the growth per second is `growth` at this pace
        self._set(rate * (1.0 + growth / max(rate, 1.0)), "probing")

    def refused(self, now: float, sent_at: float, pause: float = 0.0) -> float | None:
        """A rejection. One cut per congestion event: refusals of requests sent before the
        last cut, or within EVENT_GAP of it, were already reacted to.

        Returns seconds every worker should hold when the server said nothing about when:
        while it refuses everything (a window granted at its start and closed since),
        sending at any pace is only more refusals, so the run holds, one second, then two,
        up to MAX_CLOSED_HOLD, until something gets through again."""
        if not self.learn:
            return None
        self.last_refusal = now
        if sent_at <= self.last_cut:  # <=: uvloop's clock ticks in milliseconds
            return None
        if self.burst_at <= sent_at <= self.burst_at + BURST_SPREAD:
            # the refill was less than the pace said: no more bursts, and no cut (the burst
            # emptied the bucket, not the pace: at 100/s holding 10, pacing at 95/s, the
            # request after the burst was refused and the cut took the pace to 37/s)
            self.burst_refused = True
            return None
        # closed: paced, and nothing got through since the last cut (this refusal is of a
        # request sent after it), or nothing at all for a few of the pace's intervals. Not
        # before what was sent when sending resumed (at the cut, or when the pause since
        # ended) could have answered: a refusal comes at once, a success a latency later
        # (at 100/s holding 10, the paced sends after a pause's burst were refused before
        # the burst's successes came back, and the pace fell to a third of the limit)
        rate = self.pacer.rate
        quiet = max(CLOSED_AFTER, 3.0 / rate) if rate else math.inf
        self.refused_since_cut += 1
        answerable = max(self.last_cut, self.pause_until) + self.latency
        none_since_cut = (rate is not None and not self.through_since_cut
                          and self.refused_since_cut >= CLOSED_REFUSALS and now >= answerable)
        through = max(self.accepted[-1] if self.accepted else -math.inf,
                      self.pause_until + self.latency)
        closed = rate is not None and (none_since_cut or through <= now - quiet)
        since = now - self.last_cut
        if since < EVENT_GAP and not (closed and (none_since_cut or since >= quiet)):
            return None  # the same event
        self._prune(now)
        if rate is None and not self.hinted and not self.accepted_long:
            return None  # nothing got through yet: no measure (the pause, or backoff, holds)
        self.last_cut = now
        self.through_since_cut = False
        self.refused_since_cut = 0
        self.cuts += 1
        self.pause_cost = min(pause, 10.0)
        if self.hinted:
            return None  # the headers state the limit: a refusal is jitter, the pause handles it
        if closed:
            self.closed_hold = min(MAX_CLOSED_HOLD, max(1.0, 2 * self.closed_hold))
        else:
            self.closed_hold = 0.0
        got_through = self._got_through(now)
        granted = self._long_rate(now)
        if closed:
            # A window longer than LONG (LiteLLM's are a minute) shows nothing over LONG
            # seconds once it has closed, and the pace fell to MIN_RATE and stayed there.
            # What got through since the first success is what it grants, whatever the
            # window's length (from above: its first grant is in it).
            got_through = granted = self._average_rate(now) or got_through
        accepted = got_through * ACCEPTED_MARGIN
        if rate is None:  # the first: all we know is what got through
            self.volley = len(self.accepted_long)
            for sent in self.sent_long:
                self._volley_sent(sent)
            new = accepted
        elif self.refused_at is not None and rate >= NEAR * self.refused_at:
            # a probe found the limit again: what got through over LONG seconds (no burst
            # in it, nor a window's grant; since the first success when closed) is the
            # limit, so the cut can be shallow
            self.refused_at = max(min(rate, granted), MIN_RATE)
            new = self.refused_at * NEAR_CUT
            if not closed:
                new = max(new, self._drained_pace(sent_at))
        else:
            # what the server let through when it said no: the rate to stay near
            self.refused_at = max(got_through, MIN_RATE)
            # (not below half the old pace in one step: a second's measure is noisy; but
            # when nothing gets through, what got through over LONG seconds is all there is)
            new = min(rate * CUT, accepted)
            if not closed:
                new = max(rate * DEEPEST_CUT, new, self._drained_pace(sent_at))
        self._set(max(MIN_RATE, new), "learnt from refusals")
        return self.closed_hold or None

    def paused(self, pause: float, until: float) -> int:
        """A Retry-After pause of `pause` seconds until `until`: noted (the ramp after it and
        the drained measure count from its end), and how many requests to send at once when it
        ends: what the server's bucket refilled meanwhile, at the learnt pace (a lower bound
        of its rate), up to RESUME_SHARE of its burst. Sending them at once wins back what
        the pause banked (a fifth of a second per pause at 50 a second, burst 10); pacing
        them would leave the bucket full and waste its refill. Nothing while unlearnt,
        fixed (--rpm) or stated by headers, and never again once a burst met a refusal: the
        pace was above the server's rate then (a slow limit with a big burst: its first
        measure is mostly the burst), and bursting after every pause would only be refused."""
        if until - pause > self.pause_until:
            self.pause_from = until - pause
        self.pause_until = until
        self.since_pause, self.since_pause_last = 0, -math.inf
        rate = self.pacer.rate
        if (not self.learn or self.hinted or rate is None or not self.volley
                or self.burst_refused):
            return 0
        burst = int(min(RESUME_SHARE * self._volley_burst(), rate * pause))
        if burst > 1:
            self.burst_at = until
        return burst

    def _volley_sent(self, sent: float) -> None:
        if self.volley_first is None or sent < self.volley_first:
            self.volley_first = sent
        self.volley_last = max(self.volley_last, sent)

    @property
    def volley_spread(self) -> float:
        """Seconds between the first and the last send the volley got through."""
        return 0.0 if self.volley_first is None else self.volley_last - self.volley_first

    def _volley_burst(self) -> float:
        """The server's burst as the volley shows it: what got through, less what the
        bucket refilled while the volley was sent (at the learnt pace, under its rate)."""
        return (self.volley or 0) - (self.pacer.rate or 0.0) * self.volley_spread

    def _drained_pace(self, refused_sent: float) -> float:
        """The pace a drained bucket shows (`_drained_rate`), 0 when nothing does; never
        above the pace that was just refused (a refusal does not speed the run up)."""
        drained = self._drained_rate(refused_sent)
        rate = self.pacer.rate or 0.0
        return 0.0 if drained is None else min(rate, drained * DRAINED_MARGIN)

    def _drained_rate(self, refused_sent: float) -> float | None:
        """A token bucket's rate, from how long it took to drain. The volley met a full
        bucket and left it empty, so its burst is about volley - rate x spread (of the
        volley's sends). A stretch of n successes over t seconds from where the bucket was
        last full to the refusal has n = burst + rate x t, so rate = (n - volley) /
        (t - spread), to one request over the stretch (the parts of a request left in the
        bucket at either end). Where it was last full is not known, but any other start
        gives less (still draining there, or full and wasting its refill at a lower pace):
        the largest over the stretches is the one. Candidates: the end of the last pause
        (a pause refills the bucket) and every send of the last LONG seconds. The second
        cut's plain measure, what got through in the last second, is 3-5 % under the rate
        (85 % of a second that held part of a burst); this is within 2 %."""
        if not self.volley or self.volley_first is None:
            return None
        volley, spread = self.volley, self.volley_spread
        stretches = []  # (successes, seconds)
        if self.pause_until > self.volley_last:
            stretches.append((self.since_pause, self.since_pause_last - self.pause_until))
        sent = sorted(s for s in self.sent_long if self.volley_last < s < refused_sent)
        stretches.extend((len(sent) - i, sent[-1] - start) for i, start in enumerate(sent))
        # never above a stretch's own rate: a volley slower than the stretch was no full
        # bucket emptied at once
        rates = [min((n - volley) / (span - spread), n / span)
                 for n, span in stretches if span - spread >= DRAIN_MIN]
        return max(rates, default=None)

    def _prune(self, now: float) -> None:
        acc, long = self.accepted, self.accepted_long
        while acc and acc[0] < now - 1.0:
            acc.popleft()
        while long and long[0] < now - LONG:
            long.popleft()
        sent = self.sent_long
        while sent and sent[0] < now - LONG:
            sent.popleft()

    def _got_through(self, now: float) -> float:
        """What the server let through, per second: over the last second, or over the last
        LONG seconds when that says more (a window granted at its start, closed since)."""
        self._prune(now)
        return max(len(self.accepted), self._long_rate(now))

    def _unpaused_rate(self, now: float) -> float:
        """Successes per second over the part of the last second no pause held back (a
        quarter of a second at least): after a pause the last second's count is low because
        nothing could be sent, not because the pace outran the sends."""
        held = max(0.0, min(now, self.pause_until) - max(now - 1.0, self.pause_from))
        return len(self.accepted) / max(0.25, 1.0 - held)

    def _long_rate(self, now: float) -> float:
        """Successes per second over the last LONG seconds (or since the first, if sooner)."""
        if self.first_accepted is None:
            return 0.0
        return len(self.accepted_long) / min(LONG, max(1.0, now - self.first_accepted))

    def _average_rate(self, now: float) -> float:
        """Successes per second since the first (over a second at least)."""
        if self.first_accepted is None:
            return 0.0
        return self.total_accepted / max(1.0, now - self.first_accepted)

    def hint(self, rate: float) -> None:
        """The server stated its limit (x-ratelimit headers): pace just under it."""
        if not self.learn or rate <= 0:
            return
        self.hinted = True
        self._set(max(MIN_RATE, rate * HINT_MARGIN), "stated by x-ratelimit headers")

    def _set(self, rate: float, why: str) -> None:
        self.pacer.set_rate(rate)
        self.source = why
        self.lowest = rate if self.lowest is None else min(self.lowest, rate)
        logged = self._logged
        if logged is None or abs(rate - logged) > LOG_CHANGE * logged:
            self._logged = rate
            log.info("pace: %.3g requests/s (%s)", rate, why,
                     extra={"event": "pace", "requests_per_second": round(rate, 3),
                            "source": why})
