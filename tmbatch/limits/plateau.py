"""Rule 5's clock: how long a lane sits at the rate it measured before it probes above it.

A probe above a limit that has not moved is refused, and the refusal costs what it costs: a
few milliseconds with `retry-after-ms` or a bare 429, a second or two with whole-second
`Retry-After`. The plateau is long enough that failed probes cost `overhead` of the time at
most (cost / overhead seconds, `plateau` at least). A rate measured by one drain, or a limit
that fell, is trusted less: the plateau is `plateau` s, and the second probe comes as soon as
the first; from then on each probe that finds the same limit doubles it, until it is as long
as the trusted one. A limit that fell may come back, so a probe below its old value (`peak`)
goes back up to it at once.

The controller (`controller`) asks `growth` for the pace's relative growth per second once
the pace has come up to the measured rate, and tells this what happens: a cut (`restart`,
`lost`), a success after one (`regained`), a new measure (`measured`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tmbatch.limits.probation import FELL

if TYPE_CHECKING:
    from tmbatch.limits.controller import PaceConfig

log = logging.getLogger("tmbatch")


@dataclass(slots=True)
class Plateau:
    """One lane's plateau and probes (see the module doc). Times are the loop's clock."""

    reached: float = math.inf  # when the pace came up to the limit (the plateau's clock)
    cost: float = 0.0  # seconds a rate-caused refusal cost: to the next success ...
    lost_from: float | None = None  # ... counted from here
    # probes that confirmed a limit measured from one drain or fallen (None: trusted)
    trust: int | None = None
    peak: float | None = None  # the limit before it last fell

    def restart(self) -> None:
        """A cut: the pace is below the limit again, the plateau starts when it gets there."""
        self.reached = math.inf

    def restart_from(self, now: float) -> None:
        """Another process of the fleet was refused (--redis): the fleet probes as one, so a
        plateau under way starts again from now."""
        if self.reached != math.inf:
            self.reached = now

    def counted(self) -> None:
        """What was lost is counted already (a closure's hold): the cut that ends it costs
        nothing more."""
        self.lost_from = None

    def lost(self, now: float) -> None:
        """A refusal the rate caused: what it costs is counted from here to the next success."""
        if self.lost_from is None:
            self.lost_from = now

    def regained(self, sent: float, now: float) -> None:
        """A success of a request sent after the loss: the cost is known, halving at most per
        event (a refusal with no hint costs little, but the window it closed may cost seconds
        next time). It is the time to that request's send, not to its answer: the latency is
        no loss (answers of a second made every refusal cost a second, and the plateau 20 s)."""
        if self.lost_from is not None and sent > self.lost_from:
            self.cost = max(sent - self.lost_from, self.cost / 2)
            self.lost_from = None

    def measured(self, old: float | None, limit: float, near: float, overshot: bool) -> None:
        """A new measure of the server's rate, `limit`, after `old`. One well under the last,
        met while the lane sat at it, is a limit that fell, unless the last was refused at
        its own pace from the start (`overshot`: it was read over the limit, and this
        corrects it; read as a fall, a bucket of 5/s measured 5.8, then 5.0, sat 5 s at
        each measure after, 84 % of it); one `near` it confirms it."""
        if old is not None and self.reached != math.inf and limit < FELL * old and not overshot:
            self.trust = 0
            self.peak = max(self.peak or 0.0, old)
        elif old is not None and near * old <= limit <= old / near and self.trust is not None:
            self.trust += 1
        if self.peak is not None and limit >= near * self.peak:
            self.peak = None  # it came back

    def length(self, cfg: PaceConfig) -> float:
        """Seconds at the measured rate before probing above it. After a fall the second probe
        comes as soon as the first: most falls are another job's while, and a limit restored
        15 s after it fell was found 9 s late with the plateau doubled at once."""
        trusted = max(cfg.plateau, self.cost / cfg.overhead)
        fallen = cfg.plateau * 2 ** max(0, (self.trust or 0) - 1)
        if self.trust is not None and fallen < trusted:
            return fallen
        self.trust = None
        return trusted

    def growth(self, cfg: PaceConfig, rate: float, now: float) -> float:
        """Relative growth per second of a pace at the measured rate: none on the plateau,
        then a probe (back to a fallen limit at once, else from twice the margin's worth a
        second, doubling each second). From s a second, a doubled limit is reached after
        log2(1 + ln(2)^2 / s) s: 4.6 s from 2 %, so a limit that doubles is found within the
        5 s plateau and that, under 10 s wherever the rise falls in the plateau. From the
        margin's worth (1 %) it took 5.6 s, and a rise just after a cut was found 10.0 s on."""
        length = self.length(cfg)
        if self.reached == math.inf:
            self.reached = now
            log.debug("plateau: %.3g s at %.3g (cost %.3g, trust %s)", length, rate,
                      self.cost, self.trust)
        probing = now - self.reached - length
        if probing < 0:
            return 0.0
        if self.peak is not None and rate < cfg.margin * self.peak:
            return cfg.ramp  # back to what it allowed before it fell, at once
        return min(cfg.ramp, (1.0 - cfg.margin) * 2.0 ** (probing + 1.0))
