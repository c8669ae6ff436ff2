"""Rule 3 of the pace (`controller`): a cut on probation, and the lane's noise floor.

A cut says the refusals came from the pace. Until enough answers came at the lower pace that
is a hypothesis on trial: refusals at about the share seen before the cut, with successes
between, say they come at random (the verdict undoes the cut, and the share over every such
trial is the lane's noise floor); three times that share or more say the limit fell (the next
event cuts again, on probation from the same pace and against the same share). This keeps
the trial, the verdicts and the floor; what a verdict does to the pace is the controller's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tmbatch.limits.evidence import wilson

log = logging.getLogger("tmbatch")

SAMPLE = 20  # answers a verdict rests on at least (a round trip's echo, a probation's max/5)
FELL = 0.9  # a measure this far under the last, where the lane sat, is a limit that fell


@dataclass(slots=True)
class Trial:
    """A cut on probation: the pace and rate before it, and what answered since."""

    before: float | None
    limit: float | None
    at: float
    share: float  # of refusals, before the cut
    low: float  # the least that share can be, to the evidence (its Wilson lower bound)
    need: int  # answers to confirm it
    sample: int = 0  # answers that share was measured on
    pace: float = math.inf  # what it cut to
    answers: int = 0
    refused: int = 0
    bursts: int = 0  # refusals of a pause's burst

    def held(self, margin: float) -> float | None:
        """The pace an undo restores: the one the cut was made from, or, where that was a
        probe's (above the limit measured before it), the measure's: a probe's pace never
        held, and restored it was refused again at once; weighed against a share diluted by
        the history, its refusals passed for noise while a bucket of 20/s holding 200 was
        sent 53/s (1,257 refused for 1,000 lines; 308 now)."""
        if self.limit is None or self.before is None:
            return self.before
        return min(self.before, margin * self.limit)


def _need(low: float) -> int:
    """Answers a trial needs: refusals at `low`, the share before the cut, would show 4 times."""
    return min(5 * SAMPLE, max(SAMPLE // 2, math.ceil(4.0 / max(low, 1e-3))))


class Probation:
    """One lane's cut on trial, if any, the trial it chains from, and its noise floor."""

    __slots__ = ("chain", "noise", "overshot", "random", "trial")

    def __init__(self) -> None:
        self.trial: Trial | None = None
        self.chain: Trial | None = None  # a trial that found the limit fell: its pace before
        self.noise = 0.0  # the share of refusals that come at random (a lower bound) ...
        self.random = [0, 0]  # ... over every trial that found them so: refused, answers
        # the last verdict kept a cut refused at its own pace (less than a fall): it was
        # read a little over the limit, so the next measure corrects it (`Plateau.measured`)
        self.overshot = False

    def within_noise(self, refused: int, answers: int, paused: bool = False) -> bool:
        """Refusals no more frequent than twice the lane's noise floor, to the evidence. The
        floor is as low as the verdicts' refusals allow where a refusal taken for noise when
        the rate caused it would send at once into a drained limit (bare 429s, and pauses
        shorter than a window's: `Evidence.windowed`), and as high as they allow where the
        refusals announce windows (`paused`): then a mistake costs a pause every worker
        takes anyway, and the lower bound of a few verdicts' refusals (2 of 41: 2 %) took
        later refusals at random for a limit, and each cut paced the lane under the pauses
        alone (`random-30-seconds`: 2.7 times their time; 1.25 now)."""
        floor = self.noise
        if paused and self.random[1]:
            floor = max(floor, wilson(*self.random, 1.64))
        if not floor or wilson(refused, answers, -1.64) > 2.0 * floor:
            return False
        log.debug("within the noise floor %.3g: %d of %d refused", floor, refused, answers)
        return True

    def start(self, rate: float | None, limit: float | None, now: float, refused: int,
              answers: int) -> None:
        """The cut about to be made from `rate` (the server's `limit` as measured) is on
        trial, long enough that refusals at the share seen before it (its lower bound, to be
        safe) would show four times over. A chained trial keeps the pace it started from and
        the share before it: the refusals since are the ones its verdict blamed on the rate,
        and a share that counted them would take a limit fallen further for noise."""
        chain = self.chain
        if chain is None:
            share, low = refused / answers if answers else 0.0, wilson(refused, answers, -1.64)
            self.trial = Trial(rate, limit, now, share, low, _need(low), answers)
        else:
            self.trial = Trial(chain.before, chain.limit, now, chain.share, chain.low,
                               chain.need, chain.sample)

    def cut(self, now: float, pace: float) -> None:
        """The cut made at `now` went to `pace`: the trial started with it records it."""
        if self.trial is not None and self.trial.at == now:
            self.trial.pace = pace

    def burst_refused(self, sent: float) -> None:
        """A pause's burst sent after the cut was refused: less allowance than thought, which
        counts towards a worse verdict, never towards refusals at random."""
        if self.trial is not None and sent > self.trial.at:
            self.trial.bursts += 1

    def weighs(self, rate: float | None) -> bool:
        """A trial under way takes a refusal as evidence for its verdict (one hypothesis at a
        time); a pace grown past twice the cut has outgrown it: the cut is kept, the trial
        ends, and the refusal may be an event of its own."""
        t = self.trial
        if t is None:
            return False
        if rate is None or rate <= 2.0 * t.pace:
            return True
        self.trial = self.chain = None
        return False

    def fallen_to(self) -> float:
        """At most what the server grants when the last trial found the limit fell (inf
        otherwise): refusals three times as frequent as before the cut are the rate's, so
        what got through the trial's pace is what it grants. The measures over spans can read
        far higher where the allowance is seconds' worth of the rate (a bucket of 20/s
        holding 200 was cut from 210/s 1 % at a time, 8 of 10 refused after each cut)."""
        c = self.chain
        if c is None or not c.answers or c.pace == math.inf:
            return math.inf
        return c.pace * max(0, c.answers - c.refused) / (c.answers + c.bursts)

    def end(self) -> None:
        self.trial = self.chain = None

    def outgrown(self) -> None:
        """The pace grew past the limit the cut measured (rule 5's probe) with the trial
        undecided: the cut held at its own pace, and what a probe above it meets is no
        evidence about it (a probe's two refusals, among 85 answers at the cut's pace, made
        a trial read the share before it as the same and undo a cut that held)."""
        log.debug("probation: the pace outgrew the limit the cut measured; kept")
        self.trial = self.chain = None
        self.overshot = False

    def judge(self, sent: float, refused: bool) -> Trial | None:
        """Count an answer into the trial; once enough answers came at the lower pace, keep
        the cut or undo it. The trial whose cut this answer undid (refusals at random), or
        None."""
        t = self.trial
        if t is None or sent <= t.at:
            return None
        t.answers += 1
        t.refused += refused
        share = t.refused / t.answers
        refusals = t.refused + t.bursts
        worse = (refusals >= 2 and t.answers >= SAMPLE // 2
                 and refusals > 3.0 * t.share * t.answers)
        lower = t.before is None or t.pace < FELL * t.before  # (else nothing to tell apart)
        # about the same share: at least half of it, or, once the trial has heard as many
        # answers as it was measured on, not below it to the evidence (one measured on a few
        # answers before the cut may be far off; a few answers after it may be far off too,
        # and a cut of a small limit, undone on them, is refused at the old share again)
        alike = share >= t.share / 2 or (t.answers >= t.sample
                                         and wilson(t.refused, t.answers, 1.64) >= t.low)
        same = (lower and t.refused >= 2 and t.answers >= SAMPLE // 2
                and t.answers > t.refused and not worse and alike)
        if t.answers < t.need and not worse and not same:
            return None
        self.trial = None
        log.debug("probation: %d of %d refused after the cut, %.3g before", t.refused,
                  t.answers, t.share)
        self.overshot = t.refused > 0 and not worse and not same
        if worse:
            self.chain = t  # the next event cuts again, on probation from the same pace
            return None
        self.chain = None
        if not same:
            return None
        # the rate did not cause them: the cut is undone by the controller
        self.random[0] += t.refused
        self.random[1] += t.answers
        self.noise = max(self.noise, wilson(*self.random, -1.64))
        return t
