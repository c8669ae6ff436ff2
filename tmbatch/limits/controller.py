"""How fast one lane sends: a controller of its pace, told what the lane sends and what answers.

AIMD as in TCP and Netflix's concurrency-limits (a cut on a congestion event, growth while
answers succeed), GCRA for the schedule (`schedule.Pacer`), a stated limit as a hard ceiling.
The server is modelled as an allowance refilling at a rate up to a burst (a token bucket; N
per W seconds grants alike) that decides at once: a request out longer than a refusal takes
was let through, a success from then on, whenever its answer comes (`verdicts`). Refusals at
random are told apart from it by experiment. The rules, each a named test in
tests/test_pacing.py:

1. A lane starts unpaced (concurrency governs). Its first refusal, or the first success after
   one that came before any, paces it at what got through in the last second (a lower
   bound); the first volley's successes are the allowance, and the pace never bursts past
   it. A bare refusal before anything answered paces it too (rule 2's echo measures it):
   unpaced, each slot a fast refusal frees would send another line into the same allowance.
2. A later refusal of a request sent after the last cut is an event. With a Retry-After it
   cuts to the rate granted: the middle of what got through beyond the allowance per second
   and of that with the refused one (each over its best span since the volley; a probe's
   also over those since it began that end where the allowance ran dry), never below
   `deepest` x what got through over SAMPLE answers' worth of sending (pauses, and the bursts
   they saved up, are not sending). With no hint, the round trip after the next decides (the
   next meets a server still drained): two refused, the pace is what got through.
3. A cut is on probation. Refusals at about the share before it (as far as both samples
   tell), at a pace lower by FELL, successes between: they come at random, so the cut is
   undone (unpaced where pauses of `hold` s or more announce windows, which pauses alone deal
   with; a probe's cut to the measure before it); the share over all such trials is the noise
   floor (its lower bound; its upper for windows), under which refusals only pause (a
   probe's, over what it sent). Three times the share: fell, cut again, to at most what got
   through. A pace grown past the cut's measure ends its trial, kept.
4. Nothing through, no hint (a window closed): the lane holds, probing with one request, and
   once one gets through it meets the window unpaced: what the last let through at each
   opening, then a hold to the next (`windows`; paced if a limit is stated, or if shards or
   a fleet share it).
5. Once a cut's own sends are heard of, while sends keep up, successes raise the pace: by
   `ramp` per second up to the rate measured, then a plateau, then a probe (back to a fallen
   limit at once, else from twice the margin's worth a second, doubling each second). The
   plateau makes a failed probe's cost `overhead` of the time at most; after a fall (not a
   cut refused at its own pace: a correction) `plateau` s, doubled by each probe that finds it.
6. A Retry-After pauses the lane (`lanes`) and ends with what refilled meanwhile, sent at once.
7. `x-ratelimit-*` headers state the limit: the pace is `margin` under it, nothing learnt goes
   above it, refusals only pause, and a tokens budget in debt holds the lane until repaid.
   What they say the bucket holds goes at once, until a refusal after it. `--rpm` fixes the pace.
8. `--redis`: another process's pause restarts the plateau and ends a probe or a ramp, and an
   unpaced process joins a paced fleet at its mean as measured (`fleet`; `shared`'s 3, 4).

The controller decides; rule 2's echo (`echo`), rule 3's probation (`probation`), rule 4's
windows (`windows`), rule 5's plateau (`plateau`) and rule 6's bursts (`bursts`) keep their own
state and verdicts, and every rule reads the lane's record (`evidence`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tmbatch.limits.bursts import Bursts
from tmbatch.limits.echo import Echo
from tmbatch.limits.evidence import Evidence
from tmbatch.limits.plateau import Plateau
from tmbatch.limits.probation import SAMPLE, Probation
from tmbatch.limits.schedule import MIN_RATE
from tmbatch.limits.verdicts import Verdicts
from tmbatch.limits.windows import Windows

log = logging.getLogger("tmbatch")

LOG_CHANGE = 0.2  # a pace change of 20 % is worth a log line
LEAD = 1.5  # the pace may lead the sends by this much; past it, something else holds them


@dataclass(frozen=True, slots=True)
class PaceConfig:
    """The controller's knobs, each with why it has the value it has."""

    # pace this much under a rate measured or stated: send times jitter by a few per cent
    margin: float = 0.99
    # one cut goes no deeper than this share of what got through while sending: refusals at
    # random make a drained allowance a poor measure, and a cut undone late costs time
    deepest: float = 0.5
    # seconds the measures look back at least: a window of N per W s shows its rate over W
    window: float = 5.0
    # relative growth per second below the rate measured: a lower bound grows ×20 a second
    ramp: float = 3.0
    # seconds at a rate measured by one drain, or fallen, before probing above it
    plateau: float = 5.0
    # share of the time probing may cost: a probe refused with a one-second pause waits 20 s
    overhead: float = 0.05
    # seconds a lane holds while all is refused with no hint (a probe a second costs one
    # refusal and finds a window reopening within it); the least pause a window announces
    hold: float = 1.0


@dataclass(frozen=True, slots=True)
class Answer:
    """What the controller needs of one answer."""

    sent: float  # when its request left (the loop's clock)
    at: float  # when the answer came
    ok: bool  # a success; else a refusal (a `rejected` outcome)
    wait: float | None = None  # the pause a refusal announced, seconds (None: no hint)
    stated: float | None = None  # requests/s the answer's headers state
    governed: bool = False  # headers state a limit (of requests or tokens) for the lane
    passed: bool = False  # let through, its answer still to come (`verdicts`)


@dataclass(frozen=True, slots=True)
class Change:
    """What an answer changes: the pace, a hold for the whole lane, the burst a pause ends with."""

    rate: float | None
    hold: float = 0.0
    burst: int = 0
    why: str = "every request refused, with no Retry-After"  # the hold's


class Controller:
    """One lane's pace (see the module doc). `rate` is None while the lane is unpaced."""

    def __init__(self, cfg: PaceConfig | None = None, *, rate: float | None = None,
                 learn: bool = True) -> None:
        self.cfg = cfg = cfg or PaceConfig()
        self.learn = learn
        self.rate = rate
        self.source = "fixed (--rpm)" if rate is not None else "unpaced"
        self.seen = Evidence(cfg.window, cfg.hold)
        self.verdicts = Verdicts()  # successes heard of before their answers come
        self.stated: float | None = None
        self.governed = False  # stated limits govern: refusals only pause the lane
        self.limit: float | None = None  # the server's rate, as last measured
        self.last_cut = -math.inf
        self.cut_from = math.inf  # the pace the last cut was made at
        self.cuts = 0
        self.plateau = Plateau()  # rule 5: how long at the rate measured, then probes
        self.probation = Probation()  # rule 3: a cut on trial, and the noise floor
        self.echo: Echo | None = None  # rule 2 with no hint
        self.refused_run = 0  # refusals in a row
        self.windows = Windows()  # rule 4: closed, and the window that closed it
        self.volley_unmeasured = False  # refused with a hint before any success answered
        self.bursts = Bursts()  # rule 6
        self.lowest = rate
        self._logged = rate
        # when the pace last rose above every measure (a probe, or the ramp before the first):
        # the rate was not seen to fall since, so each span from then on measures it (rule 2)
        self.probe_from: float | None = None
        self.measure_from: float | None = None  # the last cut's, for its completion

    # -- the interface -------------------------------------------------------------------
    def on_sent(self, t: float) -> Change | None:
        """A request left; the requests let through by now, if any, change the pace."""
        self.seen.sent(t)
        e = self.echo
        if e is not None and e.start < t <= e.until:
            e.sent += 1
        w = self.windows
        hold = w.sent(t) if w.closed_since is not None or w.allowance is not None else None
        v, change = self.verdicts, None
        if v.rtt is not None and self.learn:
            v.sent(t)
            change = self.hear(t)
        if hold is None:
            return change
        self.echo = None  # (what it listens to is the window's end)
        return Change(self.rate, hold, why="the window's allowance is spent")

    def hear(self, now: float) -> Change | None:
        """The requests let through by `now` (`verdicts`), heard of: what changes, if anything.
        At every send and answer, and when the next is due (`Lane`)."""
        before = self.rate
        self._hear(now)
        return None if self.rate == before else Change(self.rate)

    def on_answer(self, a: Answer) -> Change | None:
        """Learn from one answer; what changes, if anything."""
        if not self.learn:
            return None
        before = self.rate
        if a.stated is not None:
            self.stated = a.stated
            self.set_pace(max(MIN_RATE, a.stated * self.cfg.margin),
                          "stated by x-ratelimit headers")
        self.governed = self.governed or a.governed
        v = self.verdicts
        if not a.ok:
            seen = self.seen
            v.refused_in(a.at - a.sent, seen.sends, seen.ok_sent)
        self._hear(a.at)
        hold = burst = 0
        if v.answered(a.sent) and a.ok:
            self.seen.answered(a.sent, a.at)  # (its success was heard of already)
        elif a.ok:
            self._success(a)
        else:
            hold, burst = self._refused(a)
        if self.rate == before and not hold and not burst:
            return None
        return Change(self.rate, hold, burst)

    def _hear(self, now: float) -> None:
        """The requests let through by `now` are successes (`verdicts`)."""
        for t in self.verdicts.due(now):
            self._success(Answer(t, now, True, passed=True))

    def on_success(self, sent: float, now: float, stated: float | None,
                   governed: bool) -> Change | None:
        """`on_answer` of a success. Unpaced with nothing under way (no trial, echo, closure or
        cost counted) and no limit stated, a success only adds to the record: no Answer is
        built on the common path."""
        if not self.learn:
            return None
        if (self.rate is None and stated is None and self.probation.trial is None
                and self.echo is None and self.windows.closed_since is None
                and self.plateau.lost_from is None and not self.volley_unmeasured
                and self.verdicts.rtt is None):
            self.governed = self.governed or governed
            self.seen.succeeded(sent, now)
            self.refused_run = 0
            return None  # (`_success` adds nothing more here, and the rate stays None)
        return self.on_answer(Answer(sent, now, True, stated=stated, governed=governed))

    @property
    def probing(self) -> bool:
        """Above the limit last measured (rule 5's probe): what it meets is news of it."""
        return self.limit is not None and self.rate is not None and self.rate > self.limit

    # -- successes -----------------------------------------------------------------------
    def _success(self, a: Answer) -> None:
        now = a.at
        self.plateau.regained(a.sent, now)
        self.seen.succeeded(a.sent, now, answered=not a.passed)
        self.refused_run = 0
        if (closed := self.windows.closed_since) is not None and a.sent > closed:
            self._reopened(now, a.sent)  # (a request sent before it was found closed: no news)
        self._judge(a, refused=False)
        self._listen(a, refused=False)
        if self.volley_unmeasured and a.sent <= self.seen.volley_until:
            self._first_cut(now)  # the volley's first success: it measures at last
        rate = self.rate
        if rate is None or self.stated is not None:
            return
        if a.sent <= self.last_cut:
            self._complete(now, rate)
        elif (now - self.last_cut >= self.verdicts.verdict_in()
              and rate <= LEAD * self.seen.sending(now)):
            self.set_pace(rate * (1.0 + self._growth(now) / max(rate, 1.0)), "probing")
            if self.probe_from is None and (self.limit is None or self.probing):
                self.probe_from = now
            if self.probing and self.probation.trial:
                self.probation.outgrown()  # a probe's refusals say nothing of the cut's pace

    def _complete(self, now: float, rate: float) -> None:
        """The last cut's measure, completed by the answers of what was in flight then."""
        cfg = self.cfg
        if self.cuts == 1 and self.limit is None:
            measured = cfg.margin * self.seen.got_through(now)
        elif self.limit is not None and (
                granted := self.seen.granted(self.last_cut, self.measure_from)):
            measured = cfg.margin * min(granted, self.cut_from)
        else:
            return
        if measured > rate:
            if self.limit is not None:
                self.limit = measured / cfg.margin
            # (at DEBUG: under LOG_CHANGE no INFO line; this sets the pace a plateau keeps)
            log.debug("cut completed by the answers in flight: %.4g -> %.4g", rate, measured)
            self.set_pace(measured, "learnt from refusals")
            self.probation.cut(self.last_cut, self.rate or measured)  # (the cut's pace)

    def _growth(self, now: float) -> float:
        """Relative growth per second (rule 5)."""
        cfg, rate, limit = self.cfg, self.rate or 0.0, self.limit
        if limit is None:
            return cfg.ramp
        if rate < cfg.margin * limit:
            return min(cfg.ramp, max(0.0, cfg.margin * limit / rate - 1.0) * max(rate, 1.0))
        return self.plateau.growth(cfg, rate, now)

    # -- refusals ------------------------------------------------------------------------
    def _refused(self, a: Answer) -> tuple[float, int]:
        """A refusal: (seconds the lane holds, requests its pause ends with)."""
        self.seen.refused(a.at, a.sent)
        self.windows.refusal(a.sent)
        self.refused_run += 1
        if self.bursts.met(a.sent):
            self.probation.burst_refused(a.sent)
            hold = 0.0
        elif self._judge(a, refused=True):
            hold = 0.0  # it made the verdict that refusals come at random: no event
        else:
            hold = self._listen(a, refused=True) or self._event(a)
        if not a.wait:
            return hold, 0
        burst = 0 if self.stated is not None else self.bursts.size(  # rule 6
            self.rate, self.seen.allowance, a.at + a.wait, a.wait, self.cfg.margin)
        self.seen.paused(a.at, a.at + a.wait, burst)
        return hold, burst

    def _event(self, a: Answer) -> float:
        """Rules 1-4 for a refusal: the seconds the lane holds (rule 4), if it does."""
        now, rate, seen = a.at, self.rate, self.seen
        if self.windows.closed_since is not None:  # a probe of a closed server, refused
            return self._close(now) if a.sent >= self.windows.held_until else 0.0
        if self.governed or a.sent <= self.last_cut:
            return 0.0  # the headers state the limit; or the event was met already
        if rate is None and not seen.ok_at and a.wait is not None:
            seen.start_volley(a.at)
            self.volley_unmeasured = True  # the pause holds; the volley's answers measure
            return 0.0
        if rate is not None and now - self.last_cut < 2.0 / rate:
            return 0.0  # the new pace has not sent enough to be judged yet
        if self.probation.weighs(rate):
            return 0.0  # one hypothesis at a time: this is evidence for its verdict
        since = self.probe_from if self.probing else None  # (a probe's: over what it sent)
        if self.probation.within_noise(*seen.counts(since), paused=seen.windowed(a.wait)):
            return 0.0
        if a.wait is None:
            self._listen_from(now, a.sent)
            return 0.0
        if seen.volley is None or rate is None:
            seen.start_volley(now)
            self._first_cut(now)
            return 0.0
        fell = self.probation.fallen_to()
        self.probation.start(rate, self.limit, now, *seen.counts())
        granted, most = seen.granted_between(a.sent, self.probe_from)
        # (over SAMPLE answers' worth of sending at least: at a low pace a second holds few)
        span = min(self.cfg.window, max(1.0, SAMPLE / rate))
        floor = self.cfg.deepest * seen.through_while_sending(now, span)
        if granted is None:
            # refused before the allowance could be spent: a slow limit whose pauses refill
            # little, or refusals at random; what it granted over the history, pauses and
            # all, tells them apart on probation
            self._learn(min(rate, max(seen.window_rate(now), floor), fell))
            self._cut(now, self.cfg.margin * (self.limit or MIN_RATE))
            return 0.0
        granted = (granted + max(granted, most)) / 2  # the middle of the two bounds
        self._learn(min(rate, max(granted, floor), fell))
        self._cut(now, self.cfg.margin * min(self.limit or MIN_RATE, rate))
        return 0.0

    def _first_cut(self, now: float) -> None:
        """Rule 1: pace at what got through, on trial (rule 3), completed later (`_complete`)."""
        self.volley_unmeasured = False
        self.probation.start(self.rate, self.limit, now, *self.seen.counts())
        self._cut(now, self.cfg.margin * self.seen.got_through(now))

    def _listen_from(self, now: float, refused_sent: float) -> None:
        """Rule 2, no hint: open the echo (the first refusal: at a lower bound of the rate that
        hears enough answers within a second), listening from the refusal's round trip on: a
        success's latency is the server's work (answers of 1 s kept it deaf for 3, to 465/s)."""
        if self.echo is not None:
            return
        rate, limit, seen = self.rate, self.limit, self.seen
        if (seen.volley is None or rate is None) and self.windows.allowance is None:
            seen.start_volley(now)
            self._cut(now, max(self.cfg.margin * seen.got_through(now), float(SAMPLE)))
        self.echo = Echo.after(now, now - refused_sent, self.rate, rate, limit)

    def _listen(self, a: Answer, refused: bool) -> float:
        """Count an answer into the open echo; once it has its round trip and SAMPLE answers,
        cut to what got through meanwhile (nothing: closed). The hold, if any."""
        e = self.echo
        if e is None or a.sent <= e.start or e.listening(a.sent, refused, a.at):
            return 0.0
        self.echo = None
        now, rate = a.at, self.rate
        if e.ok == 0:
            return self._close(now)
        if e.refused < 2 or self.probation.within_noise(e.refused, e.answers):
            return 0.0  # the pace it listened at was not refused (beyond the noise): ramp on
        delivered = e.delivered()
        self.rate, self.limit = e.before, e.limit  # the probation starts from before it
        self.probation.start(e.before, self.limit, now, e.refused, e.answers)
        self._learn(delivered if rate is None else min(rate, delivered))
        target = self.cfg.margin * (self.limit or MIN_RATE)
        self._cut(now, target if rate is None else min(rate, target))
        return 0.0

    def _judge(self, a: Answer, refused: bool) -> bool:
        """Rule 3: an answer for the cut on trial. True when it undid the cut: the rate did not
        cause the refusals, so the rate they were taken for is forgotten (`Trial.held`)."""
        if (t := self.probation.judge(a.sent, refused)) is None:
            return False
        # refusals that announce windows are met by pausing for them alone: a pace only
        # spreads them out, a window each, where unpaced sends share one (bench/pause_only.py)
        windows = self.stated is None and self.seen.windowed(self.seen.last_pause)
        held = None if windows else t.held(self.cfg.margin)
        self.limit = t.limit if held is not None and held != t.before else None
        self.set_pace(held, "refusals at random: pace restored")
        return True

    def _close(self, now: float) -> float:
        """Rule 4: hold, then probe."""
        self.probation.end()
        self.echo = None
        self.last_cut = now
        self.plateau.lost(now)
        return self.windows.close(now, self.cfg.hold)

    def _reopened(self, now: float, sent: float) -> None:
        """Rule 4: the first success after a closure, sent at `sent`: a window opened."""
        n = self.windows.reopened(sent, (seen := self.seen).total_ok, seen.first_ok or sent)
        if self.stated is None and not self.windows.shared:
            self.probation.end()
            self.echo = None
            self.set_pace(None, "unpaced")
            self.source = "unpaced" if n is None else f"a window of {n}"
            log.debug("reopened: a window of %s, the next in %.3g s", n, self.windows.period)
        else:
            self._learn(max(seen.average(now), MIN_RATE))
            self._cut(now, self.cfg.margin * (self.limit or MIN_RATE))
        self.plateau.counted()

    # -- the pace ------------------------------------------------------------------------
    def _learn(self, limit: float) -> None:
        """A new measure of the server's rate: the plateau reads a fall, or a confirmation,
        off it (rule 5)."""
        self.plateau.measured(self.limit, limit, self.cfg.margin ** 2, self.probation.overshot)
        self.limit = limit

    def _cut(self, now: float, new: float) -> None:
        first = self.cuts == 0
        self.windows.forget()
        self.measure_from, self.probe_from = self.probe_from, None
        self.cut_from = self.rate or math.inf
        self.last_cut = now
        self.plateau.restart()
        self.cuts += 1
        self.plateau.lost(now)
        log.debug("cut: %s -> %.3g (allowance %s)", self.rate, new, self.seen.allowance,
                  extra={"event": "pace_cut", "requests_per_second": round(new, 3)})
        self.set_pace(max(MIN_RATE, new), "learnt from refusals")
        self.probation.cut(now, self.rate or math.inf)
        if first:
            self.seen.first_rate = self.rate or 0.0

    def set_pace(self, rate: float | None, why: str) -> None:
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
