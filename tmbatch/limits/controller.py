"""How fast one lane sends: a controller of its pace, fed what the lane sends and what answers.

The server is modelled as an allowance that refills at a rate up to a burst (a token bucket;
N requests per W seconds is the same with a burst of N), and that may also refuse at random.
The pace is a GCRA schedule (`schedule.Pacer`) whose rate this sets, AIMD-style as in TCP and
Netflix's concurrency-limits: a cut on a congestion event, growth while answers succeed, a
stated limit as a hard ceiling. The rules, each a named test in tests/test_pacing.py:

1. A lane starts unpaced (concurrency governs). Its first refusal, once something got through,
   sets the pace to what got through in the last second, a lower bound; the successes of that
   first volley are the server's allowance (its burst).
2. Later, a refusal of a request sent after the last cut is a congestion event. It cuts the
   pace to the rate the server granted: what got through since the allowance was last full
   (the end of a pause that refilled it), less the allowance, per second of sending; no
   deeper than half the pace in one step, and a little under (`margin`). Pauses do not count
   as sending, so the pace never falls below what got through while sending.
3. A cut is a hypothesis: "the rate caused it". If at the lower pace refusals keep coming at
   the share they came at before, the rate did not cause them (random overload): the cut is
   undone and that share becomes the lane's noise floor; later refusals cut only when their
   share is above twice it. Pauses alone deal with the others.
4. Refusals with no hint while nothing at all gets through (a window granted at its start and
   closed since): the lane holds, 1 s doubling up to `max_hold`, and paces at what got
   through since its first success.
5. After `calm` seconds without a refusal, while the sends keep up with the pace, each
   success raises it: by `ramp` per second up to near the rate last refused, then not at all
   for `plateau` seconds for each second of pause a refusal announces (a probe that finds
   the limit costs that pause), then by `ramp` again: a limit that rose is found again.
6. Every Retry-After is honoured by the lane (`lanes`); when a pause ends, what the allowance
   refilled meanwhile at the pace (at most the allowance) is sent at once, not paced.
7. `x-ratelimit-*` headers state the limit: the pace is `margin` under it and nothing learnt
   goes above it. `--rpm` fixes the pace and nothing is learnt.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

from tmbatch.limits.schedule import MIN_RATE

log = logging.getLogger("tmbatch")

LOG_CHANGE = 0.2  # a pace change of 20 % is worth a log line
TRIAL_MAX = 100  # answers at most a cut is on probation for ...
TRIAL_MIN = 8  # ... and at least, before it is undone
ECHO_ANSWERS = 20  # answers at least an echo is made of ...
CLOSED_RUN = 3  # ... unless this many in a row were refused and none got through
HISTORY_MAX = 120.0  # seconds the measures look back at most


@dataclass(frozen=True, slots=True)
class PaceConfig:
    """The controller's knobs, each with why it has the value it has."""

    # pace this much under a rate measured or stated: send times jitter by a few per cent
    margin: float = 0.98
    # one cut goes no deeper than half what got through while sending: refusals at random
    # make a drained allowance a poor measure, and a cut undone late costs time
    deepest: float = 0.5
    # seconds the measures look back: a window of N per W s shows its rate over one W
    window: float = 5.0
    # seconds without a refusal before the pace grows: a cut's volley answers meanwhile
    calm: float = 0.5
    # relative growth per second far from any limit: a lower bound doubles in a quarter second
    ramp: float = 3.0
    # seconds near the rate last refused per second of pause a refusal costs, before probing
    plateau: float = 5.0
    # share of the time probing may cost: a probe refused with a one-second pause waits 20 s
    overhead: float = 0.05
    # seconds a lane holds while everything is refused with no hint: a probe a second costs
    # one refusal (nothing is billed) and finds a window reopening within a second
    hold: float = 1.0
    # the pace may lead what the lane sends by this much: past it, sends do not follow
    lead: float = 1.5


@dataclass(frozen=True, slots=True)
class Answer:
    """What the controller needs of one answer."""

    sent: float  # when its request left (the loop's clock)
    at: float  # when the answer came
    ok: bool  # a success; else a refusal (a `rejected` outcome)
    wait: float | None = None  # the pause a refusal announced, seconds (None: no hint)
    stated: float | None = None  # requests/s the answer's headers state
    governed: bool = False  # headers state a limit (of requests or tokens) for the lane


@dataclass(frozen=True, slots=True)
class Change:
    """What an answer changes: the pace, a hold for the whole lane, the burst a pause ends with."""

    rate: float | None
    hold: float = 0.0
    burst: int = 0


@dataclass(slots=True)
class _Trial:
    """A cut on probation (rule 3): the refusal share before it, and what answered since."""

    before: float | None  # the pace before the cut
    limit: float | None  # the rate last refused before the cut
    at: float
    pace: float  # the pace it cut to
    share: float
    need: int
    answers: int = 0
    refused: int = 0
    # the cut went to a drained measure above its strict bound: refusals at it may be the
    # measure's error, not refusals at random, so they cut again instead of undoing it
    hopeful: bool = False


@dataclass(slots=True)
class _Echo:
    """A refusal with no hint, and the round trip after it: what the server did with what
    was sent meanwhile (a drained bucket refuses nearly all of it, refusals at random few)."""

    start: float  # when it came back
    until: float  # answers of requests sent from start to here are the echo
    before: float | None  # the pace, and the rate last refused, before it
    limit: float | None
    ok: int = 0
    refused: int = 0
    last: float = -math.inf  # the last send counted


def _wilson(k: int, n: int, z: float) -> float:
    """The Wilson score bound of a share k/n (z < 0: the lower one, z > 0: the upper)."""
    if n <= 0:
        return 0.0 if z < 0 else 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = abs(z) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    bound = (centre + math.copysign(spread, z)) / (1 + z * z / n)
    return min(1.0, max(0.0, bound))


class Controller:
    """One lane's pace (see the module doc). `rate` is None while the lane is unpaced."""

    def __init__(self, cfg: PaceConfig | None = None, *, rate: float | None = None,
                 learn: bool = True) -> None:
        self.cfg = cfg or PaceConfig()
        self.learn = learn
        self.rate = rate
        self.source = "fixed (--rpm)" if rate is not None else "unpaced"
        self.stated: float | None = None
        self.governed = False  # stated limits govern: refusals only pause the lane
        self.oks: deque[tuple[float, float]] = deque()  # (sent, answered) over the window
        self.refusals: deque[float] = deque()  # answer times over the window
        self.sends: deque[float] = deque()  # send times over the last second
        self.first_ok: float | None = None
        self.total_ok = 0
        self.latency = 0.0
        self.volley: int | None = None  # what the first volley got through (rule 1) ...
        self.volley_first, self.volley_last = math.inf, -math.inf  # ... sent over this span
        self.volley_until = -math.inf  # (the first refused request's send)
        self.first_rate = 0.0
        self._allowance: float | None = None
        self.last_cut = -math.inf
        self.cuts = 0
        self.through_since_cut = True
        self.refused_run = 0  # refusals in a row
        self.limit: float | None = None  # the rate the last rate-caused refusal came at
        self.reached = math.inf  # when the pace came near it (the plateau's clock)
        self.cost = 0.0  # seconds the lane lost to the last rate-caused refusal ...
        self.lost_from: float | None = None  # ... counted from here to the next success
        # how many probes found the limit where it was since it was measured from one drain
        # (a token or two off) or last fell (it may come back): the plateau doubles with each;
        # None: a measure to trust (a window's grant, or a drain confirmed)
        self.trust: int | None = None
        self.peak: float | None = None  # the limit before it last fell
        self.cut_from = math.inf  # the pace the last cut was made at
        self.trial: _Trial | None = None
        self.echo: _Echo | None = None
        self.chain: _Trial | None = None  # a trial that found the limit fell: its pace before
        self.noise = 0.0
        self.closed_since: float | None = None  # everything refused since (rule 4)
        self.held_until = -math.inf
        self.pause_from = self.pause_until = -math.inf
        self.pauses: deque[tuple[float, float]] = deque()  # (from, to) over the window
        self.burst_at = math.inf
        self.burst_refused = False
        self.lowest = rate
        self._logged = rate

    # -- the interface -------------------------------------------------------------------
    def on_sent(self, t: float) -> None:
        sends = self.sends
        sends.append(t)
        while sends[0] < t - 1.0:
            sends.popleft()

    def on_answer(self, a: Answer) -> Change | None:
        """Learn from one answer; what changes, if anything."""
        if not self.learn:
            return None
        before = self.rate
        if a.stated is not None:
            self._stated(a.stated)
        self.governed = self.governed or a.governed
        if a.ok:
            self._success(a)
            hold = burst = 0
        else:
            hold, burst = self._refused(a)
        if self.rate == before and not hold and not burst:
            return None
        return Change(self.rate, hold, burst)

    # -- successes -----------------------------------------------------------------------
    def _success(self, a: Answer) -> None:
        cfg, now = self.cfg, a.at
        if self.lost_from is not None and a.sent > self.lost_from:
            # a pause, a closed window: what a probe costs (halving at most at each event:
            # a refusal with no hint costs little, the window it ended may cost seconds)
            self.cost = max(now - self.lost_from, self.cost / 2)
            self.lost_from = None
        self.oks.append((a.sent, now))
        self.refused_run = 0
        self.total_ok += 1
        self.latency = now - a.sent
        if self.first_ok is None:
            self.first_ok = now
        self._prune(now)
        if self.closed_since is not None:
            self._reopened(now)
        self._judge(a, refused=False)
        self._listen(a, refused=False)
        rate = self.rate
        after_cut = a.sent > self.last_cut
        if after_cut:
            self.through_since_cut = True
        if a.sent <= self.volley_until:
            self._in_volley(a.sent)
        if rate is None or self.stated is not None:
            return
        if not after_cut:
            # the cut's measure, completed by the answers of what was in flight when it came
            if self.cuts == 1 and self.limit is None:
                measured = cfg.margin * self._got_through(now)
            else:
                granted = self._granted(self.last_cut) if self.limit is not None else None
                measured = 0.0 if granted is None else cfg.margin * min(granted[1],
                                                                          self.cut_from)
                if measured > rate:
                    self.limit = measured / cfg.margin
            if measured > rate:
                self._set(measured, "learnt from refusals")
            return
        if now - self.last_cut < cfg.calm:
            return
        if rate > cfg.lead * self._sending(now):
            return  # the sends have not followed the pace up: something else holds them
        self._set(rate * (1.0 + self._growth(now) / max(rate, 1.0)), "probing")

    def _growth(self, now: float) -> float:
        """Relative growth per second (rule 5): `ramp` up to near the rate last refused, then
        nothing for the plateau, then a probe: at `ramp` back up to the limit before it last
        fell (the server allowed it once), then from the margin's worth a second doubling
        every second (a limit that rose is found in a few seconds, and one that did not is
        met gently, the allowance absorbing the first of it)."""
        cfg, rate, limit = self.cfg, self.rate or 0.0, self.limit
        if limit is None:
            return cfg.ramp
        if rate < cfg.margin * limit:
            return min(cfg.ramp, max(0.0, cfg.margin * limit / rate - 1.0) * max(rate, 1.0))
        if self.reached == math.inf:
            self.reached = now
            log.debug("plateau: %.3g s at %.3g (cost %.3g, trust %s)", self._plateau(), rate,
                      self.cost, self.trust)
        probing = now - self.reached - self._plateau()
        if probing < 0:
            return 0.0
        if self.peak is not None and rate < cfg.margin * self.peak:
            return cfg.ramp  # back to what it allowed before it fell, at once
        return min(cfg.ramp, (1.0 - cfg.margin) * 2.0 ** probing)

    def _plateau(self) -> float:
        """Seconds at the rate last refused before probing above it: long enough that the
        pause a probe's refusal costs is at most `overhead` of the time; after the limit
        fell, `plateau` doubled by each probe since that found it where it was."""
        cfg = self.cfg
        trusted = max(cfg.plateau, self.cost / cfg.overhead)
        if self.trust is None:
            return trusted
        if cfg.plateau * 2 ** self.trust >= trusted:
            self.trust = None
            return trusted
        return cfg.plateau * 2 ** self.trust

    # -- refusals ------------------------------------------------------------------------
    def _refused(self, a: Answer) -> tuple[float, int]:
        """A refusal: (seconds the lane holds, requests its pause ends with)."""
        now = a.at
        self.refusals.append(now)
        self.refused_run += 1
        self._prune(now)
        if self.burst_at <= a.sent <= self.burst_at + 0.1:
            log.debug("burst refused")
            self.burst_refused = True  # the burst emptied the allowance, not the pace
            hold = 0.0
        else:
            self._judge(a, refused=True)
            hold = self._listen(a, refused=True) or self._event(a)
        return hold, self._paused(a) if a.wait else 0

    def _event(self, a: Answer) -> float:
        """Rules 1-4 for a refusal: the seconds the lane holds (rule 4), if it does."""
        now = a.at
        if self.closed_since is not None:  # a probe of a closed server, refused
            return self._close(now) if a.sent >= self.held_until else 0.0
        if self.governed or a.sent <= self.last_cut:
            return 0.0  # the headers state the limit; or the event was met already
        rate = self.rate
        if rate is None and not self.oks:
            self._start_volley(a.sent)  # the volley is what was sent before this
            return 0.0  # nothing got through yet: no measure (the pause holds)
        if rate is not None and now - self.last_cut < 2.0 / rate:
            return 0.0  # the new pace has not sent enough to be judged yet
        trial = self.trial
        if trial is not None:
            if rate is None or rate <= 2.0 * trial.pace:
                return 0.0  # one hypothesis at a time: this refusal is evidence for its verdict
            self.trial = self.chain = None  # the pace grew out of it: kept
        if self._within_noise(*self._counts()):
            return 0.0  # within the lane's noise floor: the pause deals with it
        if a.wait is None:  # no hint: the round trip after it says what it was (rule 2)
            if self.echo is None:
                before, limit = rate, self.limit
                if self.volley is None or rate is None:
                    self._start_volley(a.sent)
                    # a lower bound to listen at (the server's burst hid its rate), but one
                    # that hears enough answers within a second
                    self._cut(now, max(self.cfg.margin * self._got_through(now),
                                       float(ECHO_ANSWERS)), None)
                span = max(0.1, 2.0 * self.latency, 4.0 / (self.rate or 1.0))
                self.echo = _Echo(now, now + span, before, limit)
            return 0.0
        if self.volley is None or rate is None:
            self._start_volley(a.sent)
            self._probation(rate, now, *self._counts())
            # a lower bound: the server's burst hid its rate
            self._cut(now, self.cfg.margin * self._got_through(now), a.wait)
            return 0.0
        granted = self._granted(a.sent)
        self._probation(rate, now, *self._counts())
        if granted is None:
            # refused before the allowance could be spent: a slow limit whose pauses refill
            # little, or refusals at random; what it granted over the history, pauses and
            # all, tells them apart on probation (rule 3)
            self._learn(min(rate, self._window_rate(now)))
            self._cut(now, self.cfg.margin * self.limit, a.wait)
        else:
            # the drained bound is under the rate already (no margin on top), but no deeper
            # than half what got through while sending (pauses left out): a drained allowance
            # explains a refusal, but at random the explanation is a poor one
            bound, measure = granted
            self._learn(min(rate, max(measure, self.cfg.deepest * self._unpaused(now))),
                        drained=True)
            self._cut(now, self.cfg.margin * min(self.limit, rate), a.wait)
            if self.trial is not None:
                self.trial.hopeful = (self.rate or 0.0) > bound
        return 0.0

    def _listen(self, a: Answer, refused: bool) -> float:
        """Count an answer into the open echo; once one comes of a request sent after its
        round trip, cut to what got through meanwhile (nothing: closed). The hold, if any."""
        e = self.echo
        if e is None or a.sent <= e.start:
            return 0.0
        closed = e.ok == 0 and e.refused >= CLOSED_RUN
        if a.sent <= e.until or (e.ok + e.refused < ECHO_ANSWERS and not closed):
            e.ok += not refused
            e.refused += refused
            e.last = max(e.last, a.sent)
            return 0.0
        self.echo = None
        now, rate = a.at, self.rate
        if e.ok == 0:
            self.closed_since = now
            return self._close(now)
        if e.refused == 0 or self._within_noise(e.refused, e.ok + e.refused):
            return 0.0  # the pace it listened at was not refused (beyond the noise): ramp on
        share = e.refused / (e.ok + e.refused)
        delivered = e.ok / max(e.last - e.start, e.until - e.start)
        self.rate, self.limit = e.before, e.limit  # (for the probation's sake)
        self._probation(e.before, now, e.refused, e.ok + e.refused)
        self._learn(delivered if rate is None else min(rate, delivered))
        self._cut(now, self.cfg.margin * self.limit if rate is None else
                  min(rate, self.cfg.margin * self.limit), None)
        return 0.0

    def _probation(self, rate: float | None, now: float, refused: int, answers: int) -> None:
        """Rule 3: the cut about to be made is on trial, for long enough that refusals at the
        share seen before it (its lower bound, to be safe) would show four times over."""
        chain = self.chain
        share = refused / answers if answers else 0.0
        low = _wilson(refused, answers, -1.64)
        self.trial = _Trial(rate if chain is None else chain.before,
                            self.limit if chain is None else chain.limit, now, math.inf, share,
                            min(TRIAL_MAX, max(TRIAL_MIN, math.ceil(4.0 / max(low, 1e-3)))))

    def _start_volley(self, refused_sent: float) -> None:
        if self.volley is not None:
            return
        self.volley_until = refused_sent
        for sent, _ in self.oks:
            if sent <= refused_sent:
                self._in_volley(sent)

    def _cut(self, now: float, new: float, pause: float | None) -> None:
        cfg, rate = self.cfg, self.rate
        first = self.cuts == 0
        self.last_cut = now
        self.reached = math.inf
        self.through_since_cut = False
        self.cuts += 1
        if self.lost_from is None:
            self.lost_from = now
        self.cut_from = rate or math.inf
        log.debug("cut: %s -> %.3g (allowance %s, volley %s)", rate, new, self.allowance,
                  self.volley)
        self._set(max(MIN_RATE, new), "learnt from refusals")
        if self.trial is not None and self.trial.at == now:
            self.trial.pace = self.rate or math.inf
        if first:
            self.first_rate = self.rate or 0.0
            self._in_volley(None)

    def _learn(self, limit: float, drained: bool = False) -> None:
        """A new measure of the server's rate. One well under the last, met while the lane
        sat at it, is a limit that fell: it may come back, so the plateau starts short again
        and doubles with every probe that finds it where it was (`trust`)."""
        old, near = self.limit, self.cfg.margin ** 2
        if old is not None and self.reached != math.inf and limit < near * near * old:
            self.trust = 0  # it fell
            self.peak = max(self.peak or 0.0, old)
        elif old is not None and near * old <= limit <= old / near:
            if self.trust is not None:
                self.trust += 1  # found where it was
        elif drained:
            self.trust = 0  # one drain's measure
        if self.peak is not None and limit >= near * self.peak:
            self.peak = None  # it came back
        self.limit = limit

    def _close(self, now: float) -> float:
        """Rule 4: everything is refused and nothing says until when: hold, then probe; a
        second at first, then a quarter of the time it has been closed (the reopening is
        found within a quarter of a long closure, at a few probes)."""
        self.trial = self.chain = self.echo = None
        self.last_cut = now
        if self.lost_from is None:
            self.lost_from = now
        since = self.closed_since if self.closed_since is not None else now
        hold = max(self.cfg.hold, (now - since) / 4)
        self.held_until = now + hold
        return hold

    def _reopened(self, now: float) -> None:
        """Rule 4: the first success after a closure. A window of N per W grants N per W
        whatever else happened, so the pace is what got through since the first success."""
        self.closed_since = None
        self._learn(max(self._average(now), MIN_RATE))
        self._cut(now, self.cfg.margin * (self.limit or MIN_RATE), None)
        self.lost_from = None  # (the closure's cost is counted: this cut loses nothing)

    def _in_volley(self, sent: float | None) -> None:
        """A success of the first volley (sent before its first refused request): counted in
        the allowance, whenever it answers."""
        if sent is not None:
            self.volley = (self.volley or 0) + 1
            self.volley_first = min(self.volley_first, sent)
            self.volley_last = max(self.volley_last, sent)
        spread = max(0.0, self.volley_last - self.volley_first)
        self._allowance = max(1.0, (self.volley or 0) - self.first_rate * spread)

    def _judge(self, a: Answer, refused: bool) -> None:
        """Rule 3: once enough answers came at the lower pace, keep the cut or undo it."""
        t = self.trial
        if t is None or a.sent <= t.at:
            return
        t.answers += 1
        t.refused += refused
        share = t.refused / t.answers
        # refusals at over three times the share before: the limit fell, and the refusal at
        # hand cuts again, on probation from the same pace as this one; at about the share
        # before, with successes between them: not the rate
        worse = (t.refused >= 2 and share > 3.0 * t.share) or (t.hopeful and t.refused > 0)
        same = (t.refused >= 2 and t.answers >= TRIAL_MIN and t.answers > t.refused
                and share >= t.share / 2 and not worse)
        if t.answers < t.need and not worse and not same:
            return
        self.trial = None
        log.debug("trial: %d/%d refused after the cut, %.3g before", t.refused, t.answers,
                  t.share)
        if worse:
            self.chain = t
            return
        self.chain = None
        if same:  # the rate did not cause them: undo, and forget the rate they were taken
            # (refusals at random tell of no rate) and note their share, to the evidence
            self.noise = max(self.noise, _wilson(t.refused, t.answers, -1.64))
            self.limit = None
            self._set(t.before, "refusals at random: pace restored")

    def _paused(self, a: Answer) -> int:
        """A Retry-After pause: noted (a pause that refills the allowance starts a new
        stretch), and what to send at once when it ends (rule 6)."""
        wait = a.wait or 0.0
        until = a.at + wait
        if a.at > self.pause_until:
            self.pause_from = a.at
            self.pauses.append((a.at, until))
        elif until > self.pause_until:
            self.pauses[-1] = (self.pauses[-1][0], until)
        self.pause_until = max(self.pause_until, until)
        rate, allowance = self.rate, self.allowance
        if rate is None or not allowance or self.burst_refused or self.stated is not None:
            return 0
        # a request short of it, and short of what the pace sends at once after it
        burst = int(min(allowance * self.cfg.margin, rate * wait)) - 1
        if burst > 1:
            self.burst_at = until
        return max(0, burst)

    def _stated(self, rate: float) -> None:
        self.stated = rate
        self._set(max(MIN_RATE, rate * self.cfg.margin), "stated by x-ratelimit headers")

    # -- measures ------------------------------------------------------------------------
    @property
    def allowance(self) -> float | None:
        """The server's burst: what the first volley got through, less what refilled while
        it was sent (at the first pace, a lower bound of the server's rate)."""
        return self._allowance

    def _granted(self, refused_sent: float) -> tuple[float, float] | None:
        """The rate the server granted, as a bucket shows it (rule 2): over any span, what got
        through is at most what it held at the start (at most the allowance v, the first
        volley's successes) plus the rate x the span, pauses and all; so rate >= (n - v) / t
        for every span of t seconds in which n requests that got through were sent. The
        largest over every send since the volley is the best bound, tight from where the
        bucket was last full (the end of a pause that refilled it, or of a stretch paced
        under its rate). Returns (that bound, the measure): the volley also got what refilled
        while it was sent, over s seconds, so (n - v) / (t - s) is the measure itself, a
        token or two either way. None when no span got more than the allowance through:
        refused before it could have been spent."""
        if self.volley is None:
            return None
        volley, spread = self.volley, max(0.0, self.volley_last - self.volley_first)
        sent = sorted(t for t, _ in self.oks if self.volley_until < t <= refused_sent)
        bound = measure = None
        end = sent[-1] if sent else 0.0
        for i, t in enumerate(sent):
            got = len(sent) - i
            if got <= volley:
                break
            span = end - t
            if span - spread < 0.25:  # a shorter span says too little about a rate
                continue
            b, m = (got - volley) / span, (got - volley) / (span - spread)
            bound = b if bound is None else max(bound, b)
            measure = m if measure is None else max(measure, m)
        return None if bound is None or measure is None else (bound, measure)

    def _within_noise(self, refused: int, answers: int) -> bool:
        """Refusals no more frequent than twice the lane's noise floor, to the evidence."""
        noise = self.noise
        if not noise:
            return False
        within = _wilson(refused, answers, -1.64) <= 2.0 * noise
        if within:
            log.debug("within noise %.3g: %d of %d refused", noise, refused, answers)
        return within

    def _counts(self) -> tuple[int, int]:
        """(refusals, answers) over the history."""
        return len(self.refusals), len(self.oks) + len(self.refusals)

    def _share(self) -> float:
        answers = len(self.oks) + len(self.refusals)
        return len(self.refusals) / answers if answers else 0.0

    def _prune(self, now: float) -> None:
        horizon = now - self.history
        oks, refusals = self.oks, self.refusals
        while oks and oks[0][1] < horizon:
            oks.popleft()
        while refusals and refusals[0] < horizon:
            refusals.popleft()
        pauses = self.pauses
        while pauses and pauses[0][1] < horizon:
            pauses.popleft()

    def _got_through(self, now: float) -> float:
        """Successes per second over the last second, or over the window when that says
        more (a window granted at its start and closed since)."""
        last = sum(1 for _, at in reversed(self.oks) if at >= now - 1.0) if self.oks else 0
        return max(float(last), self._window_rate(now))

    def _sending(self, now: float) -> float:
        """Requests sent per second over the part of the last second no pause held back."""
        sends = self.sends
        while sends and sends[0] < now - 1.0:
            sends.popleft()
        held = max(0.0, min(now, self.pause_until) - max(now - 1.0, self.pause_from))
        return len(sends) / max(0.25, 1.0 - held)

    def _unpaused(self, now: float) -> float:
        """Successes per second over the part of the last second no pause held back."""
        held = max(0.0, min(now, self.pause_until) - max(now - 1.0, self.pause_from))
        last = sum(1 for _, at in reversed(self.oks) if at >= now - 1.0)
        return last / max(0.25, 1.0 - held)

    def _window_rate(self, now: float) -> float:
        if self.first_ok is None:
            return 0.0
        return len(self.oks) / min(self.history, max(1.0, now - self.first_ok))

    @property
    def history(self) -> float:
        """Seconds the measures look back: the window, or long enough for the allowance to
        refill four times at what got through on average (a slow limit with a big burst
        shows its rate only over a few refills)."""
        allowance, first = self._allowance, self.first_ok
        if allowance is None or first is None or not self.total_ok or not self.oks:
            return self.cfg.window
        average = self.total_ok / max(1.0, self.oks[-1][1] - first)
        return max(self.cfg.window, min(4.0 * allowance / average, HISTORY_MAX))

    def _average(self, now: float) -> float:
        if self.first_ok is None:
            return 0.0
        return self.total_ok / max(1.0, now - self.first_ok)

    def _set(self, rate: float | None, why: str) -> None:
        if self.stated is not None and rate is not None:
            rate = min(rate, self.stated * self.cfg.margin)
        self.rate = rate
        self.source = why if rate is not None else "unpaced"
        if rate is None:
            return
        self.lowest = rate if self.lowest is None else min(self.lowest, rate)
        logged = self._logged
        if logged is None or abs(rate - logged) > LOG_CHANGE * logged:
            self._logged = rate
            log.info("pace: %.3g requests/s (%s)", rate, why,
                     extra={"event": "pace", "requests_per_second": round(rate, 3),
                            "source": why})
