"""Held-out servers: the scenario matrix's rows varied in ways the pace was never tuned on.

    python bench/heldout.py              # 63 rows x 5 seeds in virtual time, about two minutes
    python bench/heldout.py --seeds 3
    python bench/heldout.py --sizes      # only the limits of other sizes (25 rows)
    python bench/heldout.py --slow       # only the answers of a second (6 rows)
    python bench/heldout.py --mixed      # limits behind refusals at random (21 rows)
    python bench/heldout.py --deep       # buckets holding seconds of their rate (15 rows)

The matrix (tmbatch/sim/scenarios.py) is what pacing changes are checked against, so it is
also what they were tuned on. These rows are not in it and no test runs them (but two deep
rows, found here and mended, in tests/test_pacing.py): a share of
refusals the matrix does not have (2 %, 20 %, 50 % at random, each with the three hint
formats), the matrix's limit rows at a lower concurrency (16) and a longer round trip
(100 ms), and limits of other sizes than its one bucket (50/s holding 10) and two windows:
buckets from 5/s to 200/s, with no burst and with a second's worth, each with whole-second,
millisecond and no hints, and fixed windows from 10 per second to 200 per minute. Each row
keeps the band of the row it varies, so a FAIL here is a finding to explain, not a band to
tune to. Two exceptions, by arithmetic: at a share p refused at random every attempt is
refused with probability p, so the refusals per accepted request are p / (1 - p) whatever
the client does (1.0 at 50 %), and a random row's refusal bound is 1.5 times that, at least
the matrix's 100 %; and a lane starts unpaced (rule 1), so its first volley, `concurrency`
requests at once, is refused but for the limit's burst, and a size row's refusal bound is at
least that share of its lines. The last rows give the matrix's limit rows answers of a
second, as an LLM's short answers take (the matrix's take 20 ms): the concurrency, 64, still
allows each limit (50/s at most) with a second in flight. Figures in docs/limits.md
("Servers it was not tuned on").

`--deep` gives buckets the burst per-minute limits have: a bucket that holds 10 s, 20 s or
a minute of its rate (OpenAI's and most gateways' RPM limits refill continuously up to the
minute's worth), with each hint. A lane starts unpaced, and a bucket holding more than the
concurrency runs dry with `concurrency` requests in flight, all refused: a deep row's
refusal bound is the row's own plus that share of its lines.

`--mixed` puts a limit behind a gateway that also refuses at random: the matrix's limit
rows with 2, 5 and 10 % of requests refused at random besides (with the row's own hint).
No client reaches the limit's share there, since every refusal's pause is the contract's:
at 10 % with whole-second hints a refusal every ten requests costs the lane a second. So
these rows are judged against the pauses alone (`bench/pause_only.py`, which runs them too),
not by a band.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tmbatch.sim import virtual
from tmbatch.sim.scenarios import BY_NAME, Band, Scenario, random_server

SHARES = (0.02, 0.20, 0.50)
# (rate/s, burst): the matrix's bucket is (50, 10)
BUCKETS = ((5, 2), (10, 5), (20, 5), (100, 20), (200, 50), (50, 1), (50, 50))
BUCKET_HINTS = {"seconds": "bucket-seconds", "ms": "bucket-ms", "none": "bucket-none"}
WINDOWS = ((10, 1.0), (20, 2.0), (100, 10.0), (200, 60.0))  # (N, W s): N per W, a bare 429
HINTS = {"seconds": "429 + Retry-After: 1", "none": "a bare 429", "ms": "429 + retry-after-ms"}
SLOW = ("bucket-seconds", "bucket-ms", "bucket-none", "halved", "two-models", "window-40-4")
VARIED = ("halved", "two-models", "window-40-4", "bucket-none")
MIXED = ("bucket-seconds", "bucket-ms", "bucket-none", "halved", "two-models", "window-40-4",
         "tokens")
NOISE = (0.02, 0.05, 0.10)  # shares refused at random in front of a limit
# (rate/s, burst, lines): buckets holding 20 s, 10 s and a minute of their rate
DEEP = ((5, 100, 300), (20, 200, 1000), (50, 500, 2500), (10, 600, 1200), (50, 3000, 6000))


def held_out() -> list[Scenario]:
    """The rows: each built from a matrix row by changing one thing about the server."""
    rows = []
    base = BY_NAME["random-10-seconds"]
    for share in SHARES:
        for fmt, hint in HINTS.items():
            rows.append(replace(base, name=f"random-{share:.0%}-{fmt}",
                                title=f"{share:.0%} refused at random, {hint}; no limit",
                                server=random_server(share, fmt),
                                band=Band(base.band.share, max(1.0, 1.5 * share / (1 - share)))))
    for name in VARIED:
        row = BY_NAME[name]
        rows.append(replace(row, name=f"{name}-c16", concurrency=16,
                            title=f"{row.title}; concurrency 16"))
        rows.append(_answers_in(row, 0.1, "100 ms latency"))
    return rows


def _first_volley(row: Scenario, burst: float) -> Band:
    """The row's band, its refusal bound at least the first volley's refused share."""
    return Band(row.band.share, max(row.band.refused, (row.concurrency - burst) / row.lines))


def _bucket(fmt: str, rate: int, burst: int, name: str, lines: int) -> Scenario:
    """The matrix's bucket row with the hint `fmt`, its limit `rate`/s holding `burst`."""
    base = BY_NAME[BUCKET_HINTS[fmt]]
    return replace(base, name=name, lines=lines,
                   title=base.title.replace("50/s holding 10", f"{rate}/s holding {burst}"),
                   server={**base.server, "rate_limit": float(rate), "rate_burst": float(burst)})


def sizes() -> list[Scenario]:
    """Limits of other sizes: each a matrix row with the limit's numbers changed, and as many
    lines as 20 s at the limit (at least 200), or 5 to 10 windows."""
    rows = []
    for rate, burst in BUCKETS:
        for fmt in BUCKET_HINTS:
            row = _bucket(fmt, rate, burst, f"bucket-{rate}-{burst}-{fmt}", max(200, 20 * rate))
            rows.append(replace(row, band=_first_volley(row, burst)))
    base = BY_NAME["window-40-4"]
    for n, w in WINDOWS:
        row = replace(base, name=f"window-{n}-{w:g}",
                      title=f"fixed window of {n} requests per {w:g} s, a bare 429",
                      server={**base.server, "window_limit": n, "window_seconds": w},
                      lines=n * (10 if w <= 15 else 5))
        rows.append(replace(row, band=_first_volley(row, n)))
    return rows


def slow() -> list[Scenario]:
    """The matrix's limit rows with answers that take a second."""
    return [_answers_in(BY_NAME[name], 1.0, "answers of 1 s") for name in SLOW]


def deep() -> list[Scenario]:
    """Buckets holding seconds of their rate, each hint (`--deep`)."""
    rows = []
    for rate, burst, lines in DEEP:
        for fmt in BUCKET_HINTS:
            row = _bucket(fmt, rate, burst, f"deep-{rate}-{burst}-{fmt}", lines)
            rows.append(replace(row, band=Band(row.band.share,
                                               row.band.refused + row.concurrency / lines)))
    return rows


def banded() -> list[Scenario]:
    """Every held-out row judged by a band: all but `mixed`'s."""
    return held_out() + sizes() + slow() + deep()


def mixed() -> list[Scenario]:
    """The matrix's limit rows behind refusals at random (`--mixed`)."""
    return [replace(row, name=f"{name}+r{round(p * 100)}",
                    title=f"{row.title}; {p:.0%} more refused at random",
                    server={**row.server, "refuse_fraction": p})
            for name in MIXED for row in (BY_NAME[name],) for p in NOISE]


def _answers_in(row: Scenario, seconds: float, said: str) -> Scenario:
    """`row` with its answers taking `seconds` (named -latMS, `said` in the title)."""
    return replace(row, name=f"{row.name}-lat{round(seconds * 1000)}",
                   server={**row.server, "latency": seconds}, title=f"{row.title}; {said}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="a table for the docs")
    ap.add_argument("--sizes", action="store_true", help="only the limits of other sizes")
    ap.add_argument("--slow", action="store_true", help="only the answers of a second")
    ap.add_argument("--deep", action="store_true",
                    help="only the buckets holding seconds of their rate")
    ap.add_argument("--mixed", action="store_true",
                    help="limits behind refusals at random, against the pauses alone")
    args = ap.parse_args()
    if args.mixed:
        import pause_only  # (it imports this module)

        rows = mixed()
        slower = pause_only.compare(rows, args.seeds, args.markdown)
        print(f"\n{len(slower)} of {len(rows)} rows slower than the pauses alone (median of "
              f"{args.seeds} seeds): {', '.join(slower) or '-'}")
        return
    rows = (sizes() if args.sizes else slow() if args.slow else deep() if args.deep
            else banded())
    results = virtual.run_matrix(rows, args.seeds, echo=print, markdown=args.markdown)
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} of {len(results)} held-out rows in band "
          f"(median of {args.seeds} seeds)")


if __name__ == "__main__":
    main()
