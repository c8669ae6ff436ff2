"""The arithmetic of `tmbatch compare`: answers normalised, agreement, Cohen's kappa, confusion.

Small and pure (no files, no I/O) so each figure can be checked against a hand-computed
example; `compare` feeds it the answers it read. Kappa is written out rather than taken from
scikit-learn: it is a few lines, and a dependency of hundreds of megabytes for one formula
would be the wrong trade.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


def normalise(text: str) -> str:
    """What "the same answer" means: equal after collapsing runs of whitespace (and trimming
    it) and folding case. "Paris." and "paris" still differ: punctuation can be the answer."""
    return " ".join(text.split()).casefold()


def answer_key(text: str | None) -> bytes | None:
    """A short digest of the normalised answer: comparing answers needs equality only, and
    16 bytes a line keep a long run's answers in little memory. None: no text to compare."""
    if text is None:
        return None
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def label_key(value: Any) -> str:
    """A label as one category: a string as it is; a structured label (a schema's JSON
    object) as its canonical JSON, so equal objects are one category whatever the key order."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True, slots=True)
class Agreement:
    """How often two sets of answers are the same, over the units both have one for."""

    agree: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.total if self.total else None


def agreement(pairs: Iterable[tuple[Hashable, Hashable]]) -> Agreement:
    agree = total = 0
    for a, b in pairs:
        total += 1
        agree += a == b
    return Agreement(agree, total)


def contingency(pairs: Iterable[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """(rater A's category, rater B's) -> how many units: the agreement matrix, and from
    gold and a model's answers, the confusion matrix."""
    return Counter(pairs)


def cohen_kappa(table: Counter[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters from their contingency table: (p_o - p_e) / (1 - p_e),
    p_o the observed agreement, p_e the agreement expected by chance from each rater's own
    rates. None when it is undefined: no units, or both raters always gave one and the same
    category (p_e = 1), where chance alone explains everything and 0/0 says nothing."""
    n = sum(table.values())
    if n == 0:
        return None
    rows: Counter[str] = Counter()
    cols: Counter[str] = Counter()
    observed = 0
    for (a, b), count in table.items():
        rows[a] += count
        cols[b] += count
        if a == b:
            observed += count
    p_o = observed / n
    p_e = sum(rows[k] * cols[k] for k in rows) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def matrix(table: Counter[tuple[str, str]], rows: Sequence[str],
           cols: Sequence[str]) -> list[list[int]]:
    """The table as a list of rows (rows x cols), zeros where no unit fell."""
    return [[table.get((r, c), 0) for c in cols] for r in rows]


def categories(table: Counter[tuple[str, str]], first: Sequence[str] = ()) -> list[str]:
    """Every category the table uses, `first` (e.g. the job's allowed labels) in their
    order, the rest sorted."""
    seen = {k for pair in table for k in pair}
    return [c for c in first if c in seen] + sorted(seen.difference(first))
