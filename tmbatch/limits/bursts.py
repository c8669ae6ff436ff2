"""Rule 6: a Retry-After pause ends with what refilled meanwhile, sent at once.

A bucket refills while a lane pauses, and a paced lane would send what it saved up over
the pause's length at its pace anyway: sent as the pause ends, it reaches the server while
the allowance is there. At most the allowance the first volley showed (less the margin),
and never again once such a burst was refused: then the allowance, not the pace, emptied
(a window, or another client's share), and a burst only meets it again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("tmbatch")

SPREAD = 0.1  # seconds a burst takes to leave: a refusal of a request sent within is its


@dataclass(slots=True)
class Bursts:
    """One lane's bursts at a pause's end. Times are the loop's clock."""

    at: float = math.inf  # the last pause's burst was sent here
    refused: bool = False  # one was: no more

    def size(self, rate: float | None, allowance: float | None, ends: float,
             wait: float, margin: float) -> int:
        """Requests to send at once when a pause of `wait` s ends at `ends` (0: none)."""
        burst = 0
        if rate and allowance and not self.refused:
            burst = int(min(allowance * margin, rate * wait)) - 1
        if burst <= 1:
            return 0
        self.at = ends
        return burst

    def met(self, sent: float) -> bool:
        """A refusal of a request sent at `sent`: True when it was of the burst."""
        if not self.at <= sent <= self.at + SPREAD:
            return False
        log.debug("the burst a pause ended with was refused: no more bursts")
        self.refused = True
        return True
