"""A family of limits that fall and come back, none of them a matrix row: how the pace follows.

    python bench/falls.py [--seeds 3]

`halved` (40/s, 20/s from 15 s, 40/s again from 30 s) is one matrix row; a rule tuned on it
could hold there and nowhere else. Each row here is a bucket of 40/s holding 10 (whole-second
Retry-After) that falls at 15 s to 10, 20 or 30/s for 5, 10, 15 or 30 s, then returns; the
share is against a client that knew the schedule (`scenarios.score`), in virtual time
(`tmbatch.sim.virtual`, about 10 s for the whole family). Figures are in docs/limits.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tmbatch.sim import virtual
from tmbatch.sim.scenarios import BY_NAME, Scenario

FALLS_TO = (10.0, 20.0, 30.0)
LASTING = (5.0, 10.0, 15.0, 30.0)


def falls() -> list[Scenario]:
    base = BY_NAME["halved"]
    rows = []
    for to in FALLS_TO:
        for lasts in LASTING:
            lines = int(40 * 15 + to * lasts + 40 * 15)  # 15 s before the fall, 15 s after
            rows.append(replace(base, name=f"fall{to:g}-{lasts:g}s", lines=lines,
                                title=f"40/s, {to:g}/s from 15 s for {lasts:g} s",
                                server={**base.server,
                                        "rate_schedule": ((15.0, to), (15.0 + lasts, 40.0))}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    shares = [r.share for r in virtual.run_matrix(falls(), args.seeds, echo=print)]
    print(f"\nmean {statistics.mean(shares):.1%}, lowest {min(shares):.1%} "
          f"(median of {args.seeds} seeds; band as `halved`'s)")


if __name__ == "__main__":
    main()
