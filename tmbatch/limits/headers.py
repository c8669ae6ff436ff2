"""What `x-ratelimit-*` headers say about a lane's limit: its rate, and when it is spent.

OpenAI's `x-ratelimit-reset-*` is the time until the bucket is FULL again (llmock: `60s` with
a limit of 120/min, where its own 429 says `retry-after: 20`), and the bucket refills evenly:
it refills (limit - remaining) in `reset`, so with nothing remaining the next request fits
after reset / (limit - remaining), not after all of it. Without a limit header, reset is all
there is, so the hold is the whole of it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

KINDS = ("requests", "tokens")
_NAMES = tuple((kind, f"x-ratelimit-remaining-{kind}", f"x-ratelimit-limit-{kind}",
                f"x-ratelimit-reset-{kind}") for kind in KINDS)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_SCALE = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Seconds from an OpenAI-style reset header: "1s", "6m0s", "250ms", "1h2m3.5s", "0.5".

    Anything else counts as absent: a header we cannot read must not stall the run.
    """
    if not text:
        return None
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _SCALE[m.group(2)]
        pos = m.end()
    return total if pos == len(s) and pos > 0 else None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(float(raw))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Hold:
    """A stated limit is spent: nothing of the lane fits for `seconds` (`why` says so)."""

    seconds: float
    why: str


@dataclass
class StatedLimits:
    """One lane's reading of its `x-ratelimit-*` headers over the run.

    The refill rate comes from how `reset` moves: reset = deficit / rate, so between two
    answers reset grows by consumed / rate and shrinks by the time passed, and rate =
    consumed / (reset' - reset + elapsed). `remaining` alone would do ((limit - remaining) /
    reset), but it is a whole number: with a small limit that is off by a token in ten. So
    it is sampled a second apart and smoothed; a bucket within two of full says nothing (it
    stops refilling when full, and may have between two samples), nor an empty one (a budget
    charged after the answer goes into debt, and `remaining` stops at 0): either restarts
    the measurement."""

    consumed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    rates: dict[str, float] = field(default_factory=dict)  # per second, per kind
    # the last answer's state per kind, (limit, remaining, reset): a budget charged after
    # the answer goes into debt, which only `reset` shows (remaining stops at 0)
    last: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    _anchors: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    _measured: set[str] = field(default_factory=set)

    def level(self, kind: str) -> float | None:
        """What the server's bucket of `kind` held at the last answer, a debt below 0: the
        limit less what refills over `reset` at the rate measured (None: not known)."""
        last, rate = self.last.get(kind), self.rates.get(kind)
        if last is None or rate is None:
            return None
        limit, remaining, reset = last
        return float(remaining) if remaining > 0 else min(0.0, limit - reset * rate)

    def read(self, headers: Mapping[str, str], now: float) -> Hold | None:
        """Learn from one answer's headers; the longest hold they announce, if any."""
        hold: Hold | None = None
        for kind, remaining_name, limit_name, reset_name in _NAMES:
            if remaining_name not in headers:  # most servers: no call at all
                continue
            remaining = _int_header(headers, remaining_name)
            if remaining is None:
                continue
            limit = _int_header(headers, limit_name)
            reset = parse_duration(headers.get(reset_name))
            if limit is not None and reset is not None:
                self.last[kind] = (limit, remaining, reset)
                self._learn(kind, limit, remaining, reset, now)
            if remaining > 0 or not reset:
                continue
            if limit is not None and limit > remaining:
                # one more unit fits in reset / limit, if the bucket refills at limit / reset;
                # a budget in debt (charged after admission) takes longer: all but one unit
                # of reset, at the rate measured, is still the debt's
                rate = self.rates.get(kind)
                seconds = max(reset / (limit - remaining),
                              reset - (limit - 1) / rate if rate else 0.0)
                why = (f"x-ratelimit-remaining-{kind}: 0 (limit {limit}, full again in "
                       f"{reset:g}s: one more fits in {seconds:.3g}s)")
            else:
                seconds = reset
                why = f"x-ratelimit-remaining-{kind}: 0 (reset in {reset:g}s, no limit header)"
            if hold is None or seconds > hold.seconds:
                hold = Hold(seconds, why)
        return hold

    def _learn(self, kind: str, limit: int, remaining: int, reset: float, now: float) -> None:
        consumed = self.consumed[kind]
        if limit - remaining < 2 or remaining <= 0:
            # (nearly) full: it stopped refilling, and may have stopped since the anchor, so
            # a rate measured across this would be low; measure afresh from the next answer
            self._anchors.pop(kind, None)
            return
        anchor = self._anchors.get(kind)
        if anchor is None or now - anchor[0] < 1.0:
            if anchor is None:
                self._anchors[kind] = (now, reset, consumed)
            deficit = limit - remaining
            if kind in self._measured or deficit < max(2, limit / 4) or reset <= 0:
                return
            # until a second has been measured: this answer's own ratio, its whole-number
            # `remaining` corrected by half a token on average, on a deficit big enough
            rate = (deficit - 0.5) / reset
            old = self.rates.get(kind)
            rate = rate if old is None else 0.8 * old + 0.2 * rate
        else:
            t0, reset0, consumed0 = anchor
            self._anchors[kind] = (now, reset, consumed)
            refill = reset - reset0 + (now - t0)
            if refill <= 0 or consumed <= consumed0:
                return
            rate = (consumed - consumed0) / refill
            old = self.rates.get(kind) if kind in self._measured else None
            rate = rate if old is None else 0.5 * old + 0.5 * rate
            self._measured.add(kind)
        self.rates[kind] = rate
