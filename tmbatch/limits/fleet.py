"""Rule 8 of the pace (`controller`): a lane that the job's other processes share (--redis).

The fleet's sends are one sum (`shared`), so what another process is told is this
controller's news too: a pause anywhere restarts the plateau and ends a probe or a ramp,
and an unpaced process joins a paced fleet at its mean, as measured. These are the only
ways other processes change a controller; everything else it learns from its own answers.
"""

from __future__ import annotations

from tmbatch.limits.controller import Change, Controller
from tmbatch.limits.schedule import MIN_RATE


def paused_elsewhere(c: Controller, now: float) -> Change | None:
    """Another process sharing the lane was told to pause: a refusal anywhere is this pace's
    too. The plateau restarts (the fleet probes as one, not once per process), a probe above
    the measured rate ends (the refusal it caused may have landed on another process), and a
    ramp from a lower bound stops where it is: the fleet was refused at the sum."""
    rate, limit = c.rate, c.limit
    if not c.learn or rate is None or c.stated is not None:
        return None
    c.plateau.restart_from(now)
    if limit is None:
        c.limit = rate / c.cfg.margin  # ramping from a lower bound: it was reached
        return None
    if rate <= c.cfg.margin * limit:
        return None
    c.set_pace(c.cfg.margin * limit, "a probe ended by another process's refusal")
    return Change(c.rate)


def join(c: Controller, rate: float) -> Change | None:
    """Unpaced, in a fleet already paced: start at `rate` (the paced processes' mean), taken
    as measured (rule 5: a plateau, then probes), not as a lower bound to ramp from: K
    processes ramping at once would overshoot the fleet's limit K times as fast."""
    if not c.learn or c.rate is not None or c.stated is not None:
        return None
    c.set_pace(max(MIN_RATE, rate), "the mean of the job's other processes")
    c.limit = (c.rate or rate) / c.cfg.margin  # a measure (theirs): plateau, then probe
    return Change(c.rate)
