"""How long a resume spends reading its journal: `journal.load` of a fabricated journal.

Resume reads the whole journal before it sends anything, so its cost per million lines is
the wait a user sees after a crash of a large job. Three journals, all with every line done:
without spend records, with a spend snapshot every 250 lines (a run at 1,000 requests/s),
and with snapshots plus a budget's reservation in every dispatch record. Each is loaded
`--repeat` times in this process; the median is printed, with the file's size.

    .venv/bin/python bench/journal_load.py            # 1,000,000 lines, median of 3
    .venv/bin/python bench/journal_load.py --lines 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gen import fabricate_resume, write_input

VARIANTS = (
    ("no spend records", {"spend_every": 0}),
    ("spend snapshots every 250 lines", {"spend_every": 250}),
    ("snapshots + a reservation in every dispatch record",
     {"spend_every": 250, "reservations": True}),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from tmbatch.journal.journal import load
    from tmbatch.policy import Outcome

    with tempfile.TemporaryDirectory(prefix="tmbatch-journal-load-") as tmp:
        inp = write_input(Path(tmp) / "in.jsonl", a.lines)
        print(f"| journal ({a.lines:,} lines done) | size | `journal.load`, median of "
              f"{a.repeat} |\n|---|---|---|")
        for name, kw in VARIANTS:
            out = Path(tmp) / "out"
            fabricate_resume(inp, out, a.lines, **kw)  # type: ignore[arg-type]
            size = (out / "journal.jsonl").stat().st_size / 1e6
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                state = load(out, repair=False)
                times.append(time.perf_counter() - t0)
            done = state.states.by_outcome().get(Outcome.OK, 0)
            assert done == a.lines, f"the fabricated journal loaded {done:,} lines as done"
            print(f"| {name} | {size:.1f} MB | {statistics.median(times):.2f} s |", flush=True)


if __name__ == "__main__":
    main()
