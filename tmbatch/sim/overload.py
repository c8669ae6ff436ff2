"""Refusals at random: an overloaded provider or a flaky gateway refuses a share of arrivals
whatever the rate (`--sim-refuse-fraction`), each decided by a draw of its own so that a
seed replays the same refusals in any order of arrival."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


def refusal_draw(seed: int, key: str, arrival: int) -> float:
    """A uniform in [0, 1) from (seed, key, arrival count of that key), on its own stream: it
    shares nothing with the draws of the processing faults (state.draws), so a refusal never
    decides whether the same request is later dropped or answered 500."""
    digest = hashlib.blake2b(f"refuse\0{seed}\0{key}\0{arrival}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") / 18446744073709551616.0


@dataclass
class RandomRefusal:
    """Refuse each arrival with probability `fraction`, independently per arrival, the same
    for a given seed whatever the order of arrival: the n-th arrival of a key is refused when
    refusal_draw(seed, key, n) < fraction. Timeless, so it needs no `now`."""

    fraction: float
    seed: int
    arrivals: dict[str, int] = field(default_factory=dict)

    def refuses(self, key: str) -> bool:
        n = self.arrivals.get(key, 0)
        self.arrivals[key] = n + 1
        return refusal_draw(self.seed, key, n) < self.fraction
