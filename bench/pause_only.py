"""The learnt pace against the pauses alone: is tmbatch ever slower than honouring each window?

    python bench/pause_only.py                 # the matrix, held-out, deep and mixed rows (106)
    python bench/pause_only.py --rows random-10-seconds,halved --seeds 5
    python bench/pause_only.py --markdown      # the table for docs/limits.md

Issue 22 asks for a pace that is "never slower than pausing for each window would be". The
client that only pauses is `tmbatch run --no-adaptive`: concurrency and every Retry-After,
nothing learnt. Each row (`tmbatch.sim.scenarios` and `bench/heldout.py`, its `--mixed`
rows included) runs both ways in virtual time over the same seeds; the figure is the median
time to the last answer, and a row is SLOWER when the learnt pace takes more than 2 % longer
than the pauses alone. The pauses alone pay in refusals instead (nothing billed, but a
server hammered): the table shows both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import heldout

from tmbatch.sim import virtual
from tmbatch.sim.scenarios import SCENARIOS, Scenario

SLOWER = 1.02  # the learnt pace may take this much longer than the pauses alone


def measure(sc: Scenario, seeds: int) -> tuple[float, float, float]:
    """(median seconds to the last answer, median share, median refusals) over the seeds."""
    runs = [virtual.run_row(sc, seed) for seed in range(seeds)]
    return (statistics.median(r.seconds for r in runs), statistics.median(r.share for r in runs),
            statistics.median(r.refused for r in runs))


def compare(rows: list[Scenario], seeds: int, markdown: bool) -> list[str]:
    """Each row with the learnt pace and with the pauses alone, printed as it is measured
    (a markdown table's rows, or lines); the names of the rows that were slower."""
    if markdown:
        print("| row | share | learnt pace s | refused | pauses alone s | refused | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    slower = []
    for sc in rows:
        learnt = measure(sc, seeds)
        alone = measure(replace(sc, adaptive=False), seeds)
        ratio = learnt[0] / alone[0] if alone[0] else 1.0
        verdict = "SLOWER" if ratio > SLOWER else ""
        if verdict:
            slower.append(sc.name)
        if markdown:
            mark = f"**{ratio:.2f}**" if verdict else f"{ratio:.2f}"
            print(f"| {sc.name} | {learnt[1]:.1%} | {learnt[0]:.1f} | {learnt[2]:.0f} | "
                  f"{alone[0]:.1f} | {alone[2]:.0f} | {mark} |")
        else:
            print(f"{sc.name:26s} share {learnt[1]:6.1%}  learnt {learnt[0]:7.1f} s  refused "
                  f"{learnt[2]:5.0f}  | pauses alone {alone[0]:7.1f} s  refused "
                  f"{alone[2]:6.0f}  x{ratio:5.2f} {verdict}", flush=True)
    return slower


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--markdown", action="store_true", help="a table for the docs")
    args = ap.parse_args()
    rows = list(SCENARIOS) + heldout.banded() + heldout.mixed()
    if args.rows:
        wanted = args.rows.split(",")
        rows = [r for r in rows if r.name in wanted]
        missing = set(wanted) - {r.name for r in rows}
        if missing:
            sys.exit(f"no such row: {', '.join(sorted(missing))} (see --help)")
    slower = compare(rows, args.seeds, args.markdown)
    print(f"\n{len(slower)} of {len(rows)} rows slower than the pauses alone (median of "
          f"{args.seeds} seeds, more than {SLOWER - 1:.0%} longer): {', '.join(slower) or '-'}")

if __name__ == "__main__":
    main()
