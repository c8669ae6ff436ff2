"""Fixed windows nobody tuned rule 4 on, each against the pauses alone, in virtual time.

    python bench/windows.py              # every variant, 3 seeds
    python bench/windows.py --seeds 5 --markdown

The matrix has two windows (40 per 4 s, 30 per 15 s) and the held-out rows four more sizes,
all counted from the client's first request, fixed for the whole run, at concurrency 64
with answers of 20 ms. Servers differ: a per-minute key counts from the clock's minute (the
run starts part-way into a window: `window_start`), another job takes a share of each
window for a while and stops (`rate_schedule`), answers take half a second, a few workers
cannot spend a window at once. Each variant runs with the learnt pace and with
`--no-adaptive` over the same seeds (`bench/pause_only.py`'s measure): the share of what
the touched windows admit, the refusals, the time to the last answer, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pause_only import SLOWER, compare

from tmbatch.sim.scenarios import BY_NAME, Band, Scenario


def variant(name: str, lines: int, concurrency: int = 64, **server: Any) -> Scenario:
    base = BY_NAME["window-40-4"]
    return replace(base, name=name, lines=lines, concurrency=concurrency,
                   server={**base.server, **server}, band=Band(0.9, 0.05))


def variants() -> list[Scenario]:
    return [
        variant("w40-4-start1", 400, window_start=1.0),
        variant("w40-4-start2.5", 400, window_start=2.5),
        variant("w40-4-start3.9", 400, window_start=3.9),
        variant("w30-15-start7", 300, window_limit=30, window_seconds=15.0, window_start=7.0),
        variant("w200-60-start35", 1000, window_limit=200, window_seconds=60.0,
                window_start=35.0),
        variant("w40-4-shared", 400, rate_schedule=((10.0, 5.0), (25.0, 10.0))),
        variant("w100-10-shared", 1000, window_limit=100, window_seconds=10.0,
                rate_schedule=((20.0, 5.0), (50.0, 10.0))),
        variant("w40-4-grows", 600, rate_schedule=((12.0, 20.0),)),
        variant("w40-4-lat500-start2", 400, latency=0.5, window_start=2.0),
        variant("w40-4-c8-lat100", 400, concurrency=8, latency=0.1),
        variant("w1000-60-c8-lat100", 3000, concurrency=8, latency=0.1, window_limit=1000,
                window_seconds=60.0),
        variant("w5-1", 100, window_limit=5, window_seconds=1.0),
        variant("w3-30", 12, window_limit=3, window_seconds=30.0),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="a table for the docs")
    args = ap.parse_args()
    rows = variants()
    slower = compare(rows, args.seeds, args.markdown)
    print(f"\n{len(slower)} of {len(rows)} variants slower than the pauses alone (median of "
          f"{args.seeds} seeds, more than {SLOWER - 1:.0%} longer): {', '.join(slower) or '-'}")

if __name__ == "__main__":
    main()
