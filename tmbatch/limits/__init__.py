"""How fast to send: admission (one permit per attempt), lanes, and each lane's controller.

May import `safety`, `budget`, `reader`, `stop`, `tokens`; nothing above them (the runner,
the line's attempt loop) imports back into it.
"""

from __future__ import annotations

from tmbatch.limits.admission import Admission, Permit
from tmbatch.limits.controller import Answer, Change, Controller, PaceConfig
from tmbatch.limits.headers import parse_duration
from tmbatch.limits.lanes import SCOPES, Lane, LaneKey
from tmbatch.limits.schedule import MIN_RATE, Pacer, TokenBucket

# The estimate lives in `tokens`, shared with budgets and `tmbatch estimate`; these names stay
# importable from here, where --tpm uses them.
from tmbatch.spend.tokens import DEFAULT_MAX_OUTPUT_TOKENS, estimate_tokens

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "MIN_RATE",
    "SCOPES",
    "Admission",
    "Answer",
    "Change",
    "Controller",
    "Lane",
    "LaneKey",
    "PaceConfig",
    "Pacer",
    "Permit",
    "TokenBucket",
    "estimate_tokens",
    "parse_duration",
]
