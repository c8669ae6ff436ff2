"""`tmbatch merge`: join the output directories of a sharded run into one.

A merge is only worth trusting if it proves coverage: every non-blank line of
the input has exactly one outcome across the shards. Merge first checks that the
directories are the shards of one run (`merge_checks`), then joins their outputs,
labels and journals (`merge_join`), and reports missing and duplicated lines by
number with a non-zero exit instead of writing a plausible-looking partial result.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import LABELS, make_dir
from tmbatch.journal.journal import load
from tmbatch.run.summaries import Counts, MergedSummary, write_summary
from tmbatch.spend.usage import spend_status
from tmbatch.tools.merge_checks import Part, find_input, load_parts, scan_input, shard_problems
from tmbatch.tools.merge_join import Tally, merge_labels, merge_outputs, write_journal


def merge(dirs: list[str], out_dir: str, input_path: str | None = None) -> int:
    """Check that the directories are the shards of one run, join their outputs, prove
    coverage, and leave a directory that `status`, `export` and `report` can read."""
    out = Path(out_dir)
    parts = load_parts(dirs, out)
    source = find_input(parts, input_path)
    wanted, blank = scan_input(source)
    make_dir(out)
    tally = merge_outputs(parts, wanted, out)
    labels = merge_labels(parts, out)
    if labels is None:
        (out / LABELS).unlink(missing_ok=True)  # left by an earlier merge into `out`
    books = write_journal(parts, tally.owner, out)
    # the spend as `status` reads the merged journal: answers a killed shard left past its
    # journal's last mark are in the books at their worst case, and a read adopts them at
    # their usage (`journal.load`), as a resume of that shard would have
    spend = spend_status(load(out, repair=False)) if books.last else None
    summary = merged_summary(parts, wanted, blank, tally, labels, spend)
    write_summary(out, summary)
    return announce(parts, source, summary, out)


def merged_summary(parts: list[Part], wanted: bytearray, blank: int, tally: Tally,
                   labels: Counter[str] | None, spend: dict[str, Any] | None
                   ) -> MergedSummary:
    failed = tally.failed_total
    return MergedSummary(
        input=parts[0].header.input,
        fingerprint=parts[0].header.fingerprint,
        shards=[{"dir": str(p.path), "shard": list(p.shard) if p.shard else None,
                 "job_id": p.header.job, "finished": p.summary.finished if p.summary else None}
                for p in parts],
        input_lines=len(wanted) - 1,
        blank_lines_skipped=blank,
        counts=Counts(succeeded=tally.succeeded, failed=failed,
                      failed_by_class=dict(tally.failed), with_outcome=tally.succeeded + failed,
                      lines=wanted.count(1), pending=tally.missing_count),
        missing_lines={"count": tally.missing_count, "lines": tally.missing},
        duplicated_lines={"count": tally.duplicated_count, "lines": tally.duplicated},
        problems=shard_problems(parts) + tally.problems(),
        shard_runs=_sum_runs(parts),
        labels=None if labels is None else {"file": LABELS, **labels},
        spend=spend,
    )


def _sum_runs(parts: list[Part]) -> dict[str, Any]:
    total: Counter[str] = Counter()
    wall = 0.0
    for p in parts:
        run: Any = p.summary.this_run if p.summary else {}
        for key in ("attempts_sent", "retries", "rate_limited_429"):
            total[key] += int(run.get(key) or 0)
        tokens = run.get("tokens") or {}
        for key in ("prompt", "completion", "total"):
            total[f"tokens_{key}"] += int(tokens.get(key) or 0)
        wall = max(wall, float(run.get("wall_seconds") or 0.0))
    return {**total, "max_wall_seconds": wall}


def announce(parts: list[Part], source: str, summary: MergedSummary, out: Path) -> int:
    """What was merged, what is wrong with it, and the exit code that says so."""
    counts = summary.counts
    lines = summary.input_lines - summary.blank_lines_skipped
    print(f"merged {len(parts)} director{'y' if len(parts) == 1 else 'ies'} of {source}: "
          f"{lines} line(s), {counts.succeeded} succeeded, {counts.failed} failed"
          f" -> {out}", file=sys.stderr, flush=True)
    if summary.problems:
        for problem in summary.problems:
            print(f"tmbatch: merge: {problem}", file=sys.stderr, flush=True)
        print("tmbatch: merge: INCOMPLETE: not every line has exactly one outcome (exit 5)",
              file=sys.stderr, flush=True)
        return ExitCode.INCOMPLETE
    print("every line has exactly one outcome", file=sys.stderr, flush=True)
    return ExitCode.FAILED if counts.failed else ExitCode.OK
