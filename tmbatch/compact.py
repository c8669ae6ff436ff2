"""Compact per-line state, so a million-line job's bookkeeping costs megabytes.

A Python set of a million strings costs ~100 MB; these cost 1 byte per line and
16 bytes per custom_id.
"""

from __future__ import annotations

import hashlib
from array import array

# Per-line states, one byte each. Order matters: >= OK means "has an outcome".
UNSEEN, IN_FLIGHT, OK = 0, 1, 2
FAILED_BASE = 3  # + index in safety.CLASSES
FATAL_STATE = FAILED_BASE + 4  # refused before any work (401/403): sent again on resume


class LineStates:
    """One byte per input line number (1-based): unseen, in flight, ok, or a failure class."""

    __slots__ = ("_b",)

    def __init__(self) -> None:
        self._b = bytearray()

    def get(self, line: int) -> int:
        return self._b[line] if line < len(self._b) else UNSEEN

    def set(self, line: int, state: int) -> None:
        if line >= len(self._b):
            self._b.extend(bytes(max(line + 1 - len(self._b), len(self._b), 1024)))
        self._b[line] = state

    def __contains__(self, line: int) -> bool:
        """True when the line has a final outcome, so the reader skips it."""
        if line >= len(self._b):
            return False
        s = self._b[line]
        return s >= OK and s != FATAL_STATE

    def counts(self) -> list[int]:
        """How many lines are in each state, indexed by state."""
        return [self._b.count(bytes([i])) for i in range(16)]

    def lines_in(self, state: int) -> list[int]:
        out, b, start = [], self._b, 0
        needle = bytes([state])
        while True:
            i = b.find(needle, start)
            if i < 0:
                return out
            out.append(i)
            start = i + 1

    @property
    def nbytes(self) -> int:
        return len(self._b)


def id_hash(custom_id: str) -> int:
    """64 bits of blake2b: a collision among a million ids has odds of ~3e-8."""
    digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    h = int.from_bytes(digest, "little")
    return h if h > _TOMB else h + 2  # 0 marks an empty slot, 1 a removed one


_TOMB = 1


class IdSet:
    """An open-addressing set of 64-bit custom_id hashes in one flat array."""

    __slots__ = ("_mask", "_slots", "_tombs", "count")

    def __init__(self, capacity: int = 1024) -> None:
        size = 1024
        while size < capacity * 2:
            size *= 2
        self._slots = array("Q", bytes(8 * size))
        self._mask = size - 1
        self.count = 0
        self._tombs = 0

    def add(self, custom_id: str) -> bool:
        """Insert; True if the id was new (so False means a duplicate)."""
        return self.add_hash(id_hash(custom_id))

    def add_hash(self, h: int) -> bool:
        if (self.count + self._tombs + 1) * 2 > len(self._slots):
            self._grow()
        slots, mask = self._slots, self._mask
        i = h & mask
        free = -1
        while True:
            cur = slots[i]
            if cur == 0:
                if free >= 0:
                    slots[free] = h
                    self._tombs -= 1
                else:
                    slots[i] = h
                self.count += 1
                return True
            if cur == h:
                return False
            if cur == _TOMB and free < 0:
                free = i
            i = (i + 1) & mask

    def discard(self, custom_id: str) -> None:
        """Forget an id (a line refused before any work, to be read again on resume)."""
        h = id_hash(custom_id)
        slots, mask = self._slots, self._mask
        i = h & mask
        while True:
            cur = slots[i]
            if cur == 0:
                return
            if cur == h:
                slots[i] = _TOMB
                self.count -= 1
                self._tombs += 1
                return
            i = (i + 1) & mask

    def __contains__(self, custom_id: str) -> bool:
        h = id_hash(custom_id)
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
        old = self._slots
        self._slots = array("Q", bytes(16 * len(old)))
        self._mask = len(self._slots) - 1
        self.count = 0
        self._tombs = 0
        for h in old:
            if h > _TOMB:
                self.add_hash(h)

    def __len__(self) -> int:
        return self.count
