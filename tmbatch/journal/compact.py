"""Compact per-line state, so a million-line job's bookkeeping costs megabytes.

A Python set of a million strings costs ~100 MB; these cost 1 byte per line and
16 bytes per custom_id.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

from tmbatch.policy import Outcome

# Per-line states, one byte each: these two, or the `state` of an Outcome's policy.
UNSEEN, IN_FLIGHT = 0, 1
OK = Outcome.OK.policy.state
N_STATES = 16
# state byte -> its outcome, and whether that outcome is final (the reader skips the line)
OUTCOME_OF: dict[int, Outcome] = {o.policy.state: o for o in Outcome if o is not Outcome.PENDING}
_FINAL = bytes(1 if s in OUTCOME_OF and OUTCOME_OF[s].policy.final else 0
               for s in range(N_STATES))
_FAILED = bytes(1 if s in OUTCOME_OF and OUTCOME_OF[s].policy.failure else 0
                for s in range(N_STATES))


class LineStates:
    """One byte per input line number (1-based): unseen, in flight, ok, or a failure class."""

    __slots__ = ("_b",)

    def __init__(self, raw: bytearray | None = None) -> None:
        self._b = bytearray() if raw is None else raw

    def get(self, line: int) -> int:
        return self._b[line] if line < len(self._b) else UNSEEN

    def outcome(self, line: int) -> Outcome | None:
        """The line's current outcome (None: unseen or in flight)."""
        return OUTCOME_OF.get(self.get(line))

    def set(self, line: int, state: int) -> None:
        if line >= len(self._b):
            self._b.extend(bytes(max(line + 1 - len(self._b), len(self._b), 1024)))
        self._b[line] = state

    def replace(self, line: int, state: int) -> bool:
        """`set`, and whether the state it replaced was a failure (`failed` before it): the
        writer asks both once per dispatch and once per answer, in one call."""
        b = self._b
        if line < len(b):
            was = _FAILED[b[line]] == 1
            b[line] = state
            return was
        self.set(line, state)
        return False

    def __contains__(self, line: int) -> bool:
        """True when the line has a final outcome, so the reader skips it."""
        return line < len(self._b) and _FINAL[self._b[line]] == 1

    def failed(self, line: int) -> bool:
        """True when the line's current outcome is a failure (a later one supersedes it)."""
        return line < len(self._b) and _FAILED[self._b[line]] == 1

    def counts(self) -> list[int]:
        """How many lines are in each state, indexed by state."""
        return [self._b.count(bytes([i])) for i in range(N_STATES)]

    def by_outcome(self) -> dict[Outcome, int]:
        """How many lines have each outcome."""
        counts = self.counts()
        return {o: counts[s] for s, o in OUTCOME_OF.items()}


def id_hash(custom_id: str) -> int:
    """64 bits of the interpreter's string hash (SipHash): a collision among a million ids
    has odds of ~3e-8. Per process only, which is all an in-memory set needs; it is cached on
    the str and about ten times cheaper than a hashlib digest."""
    h = hash(custom_id)
    return h if h != 0 else 1  # 0 marks an empty slot


class IdSet:
    """custom_id hashes: a sorted frozen tier (the journal's, built in one C-speed sort on
    resume) plus an open-addressing table in one flat array for ids seen in this run."""

    __slots__ = ("_frozen", "_mask", "_slots", "count")

    def __init__(self, capacity: int = 1024) -> None:
        size = 1024
        while size < capacity * 2:
            size *= 2
        self._slots = array("q", bytes(8 * size))
        self._mask = size - 1
        self.count = 0
        self._frozen = array("q")

    def freeze(self, hashes: array) -> None:
        """Take a bulk of raw `hash(custom_id)` values (may repeat) as the frozen tier."""
        if 0 in hashes:  # the id_hash() mapping of the empty-slot value
            hashes = array("q", (h if h != 0 else 1 for h in hashes))
        self._frozen = array("q", sorted(hashes))
        self.count += len(self._frozen)

    def _in_frozen(self, h: int) -> bool:
        fz = self._frozen
        if not fz:
            return False
        i = bisect_left(fz, h)
        return i < len(fz) and fz[i] == h

    def add(self, custom_id: str) -> bool:
        """Insert; True if the id was new (so False means a duplicate). Once per line:
        id_hash inlined, and the frozen tier searched only when there is one."""
        h = hash(custom_id)
        if h == 0:
            h = 1  # id_hash
        if self._frozen and self._in_frozen(h):
            return False
        return self.add_hash(h)

    def add_hash(self, h: int) -> bool:
        if (self.count - len(self._frozen) + 1) * 2 > len(self._slots):
            self._grow()
        slots, mask = self._slots, self._mask
        i = h & mask
        while True:
            cur = slots[i]
            if cur == 0:
                slots[i] = h
                self.count += 1
                return True
            if cur == h:
                return False
            i = (i + 1) & mask

    def __contains__(self, custom_id: str) -> bool:
        h = id_hash(custom_id)
        if self._in_frozen(h):
            return True
        slots, mask = self._slots, self._mask
        i = h & mask
        while True:
            cur = slots[i]
            if cur == 0:
                return False
            if cur == h:
                return True
            i = (i + 1) & mask

    def _grow(self) -> None:
        """Twice the slots, every hash inserted again in the old order (as add_hash would
        place it: the ids are distinct, so only empty slots are probed for), the empty old
        slots skipped in C: growing costs a little per id, not a call per slot."""
        old = self._slots
        slots = self._slots = array("q", bytes(16 * len(old)))
        mask = self._mask = len(slots) - 1
        for h in filter(None, old):
            i = h & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = h

    def __len__(self) -> int:
        return self.count
