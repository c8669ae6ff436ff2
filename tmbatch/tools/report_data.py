"""What `tmbatch report` draws, gathered from the journal through its one reader.

The journal already knows every outcome, when it happened, how long it took, and every 429
pause; only the tokens come from results.jsonl (its answers' `usage`).
"""

from __future__ import annotations

import bisect
import contextlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tmbatch.base.files import JOURNAL, RESULTS
from tmbatch.journal.format import (
    CACHED,
    BudgetRecord,
    Header,
    OutcomeRecord,
    PauseRecord,
    ResumeRecord,
    SpendRecord,
)
from tmbatch.journal.journal import load
from tmbatch.journal.reading import JournalReader
from tmbatch.journal.records import usage_tokens
from tmbatch.policy import Outcome
from tmbatch.run.summaries import Counts
from tmbatch.run.summary import RunStats
from tmbatch.tools.status import is_running, job_counts


@dataclass
class RunData:
    """What the charts need, in flat arrays so a million-line journal stays small."""

    header: Header
    run_starts: list[float] = field(default_factory=list)
    ok_t: array = field(default_factory=lambda: array("d"))
    fail_t: array = field(default_factory=lambda: array("d"))
    latency_ms: array = field(default_factory=lambda: array("d"))
    ttft_ms: array = field(default_factory=lambda: array("d"))
    pauses: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    final: dict[int, tuple[Outcome, str]] = field(default_factory=dict)  # line -> (cls, code)
    untimed_outcomes: int = 0
    tokens: int = 0  # from the usage of every result
    spend: list[SpendRecord] = field(default_factory=list)  # the job's spend over time
    budget: BudgetRecord | None = None  # the last run's: its limits and prices
    counts: Counts | None = None  # the job's, as `status` and the `done:` line count them

    @property
    def failures(self) -> Counter[tuple[Outcome, str]]:
        return Counter(v for v in self.final.values() if v[0].policy.failure)

    @property
    def cached(self) -> int:
        """Lines answered from the response cache (--cache): nothing was sent for them."""
        return sum(1 for o, code in self.final.values() if code == CACHED and o is Outcome.OK)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for v in self.final.values() if v[0] is outcome)

    def active_seconds(self) -> float:
        """Time spent sending: within each run, first to last outcome. Hours between a run
        and a later resend are idle, not slow, and must not dilute the rates."""
        starts = sorted(self.run_starts)
        spans: dict[int, tuple[float, float]] = {}
        for t in (*self.ok_t, *self.fail_t):
            run = bisect.bisect_right(starts, t)
            lo, hi = spans.get(run, (t, t))
            spans[run] = (min(lo, t), max(hi, t))
        return sum(hi - lo for lo, hi in spans.values())

    def pause_spans(self) -> list[tuple[float, float]]:
        """(start, end) of the time the workers were paused: the union of the pauses, which
        overlap when several 429s arrive in one window (each journals its own Retry-After)."""
        spans: list[tuple[float, float]] = []
        for t, secs in sorted(self.pauses):
            if spans and t <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], t + secs))
            else:
                spans.append((t, t + secs))
        return spans

    def paused_seconds(self) -> float:
        return sum(end - start for start, end in self.pause_spans())


def result_tokens(out_dir: Path) -> int:
    """Tokens of every success in results.jsonl (its `usage`), whichever run answered it."""
    stats = RunStats()
    try:
        with open(out_dir / RESULTS, "rb") as f:
            for raw in f:
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                    body = (orjson.loads(raw).get("response") or {}).get("body")
                    if isinstance(body, dict):
                        stats.add_usage(usage_tokens(body))
    except OSError:
        return 0
    return stats.prompt_tokens + stats.completion_tokens


def load_run(out_dir: Path) -> RunData:
    """Read the journal without changing it (a run may still be writing; a torn tail is skipped)."""
    with JournalReader(out_dir / JOURNAL) as reader:
        assert reader.header is not None
        data = RunData(header=reader.header)
        if data.header.t is not None:
            data.run_starts.append(float(data.header.t))
        for rec in reader:
            kind = type(rec)
            if kind is OutcomeRecord:
                _outcome(data, rec)
            elif kind is PauseRecord:
                data.pauses.append((float(rec.t), float(rec.seconds)))
            elif kind is SpendRecord:
                data.spend.append(rec)
            elif kind is ResumeRecord:
                data.run_starts.append(float(rec.t))
            elif kind is BudgetRecord:
                data.budget = rec
    data.tokens = result_tokens(out_dir)
    data.counts = job_counts(load(out_dir, repair=False), out_dir, is_running(out_dir))
    return data


def _outcome(data: RunData, rec: OutcomeRecord) -> None:
    if rec.outcome is Outcome.PENDING:  # refused while stopping: read again later
        return
    data.final[rec.line] = (rec.outcome, rec.code)
    if rec.t is None or rec.code == "unknown_outcome_after_crash":
        data.untimed_outcomes += 1  # adopted or recovered on resume: when it ended is unknown
        return
    (data.ok_t if rec.outcome is Outcome.OK else data.fail_t).append(rec.t)
    if rec.latency_ms is not None:
        data.latency_ms.append(rec.latency_ms)
    if rec.ttft_ms is not None:
        data.ttft_ms.append(rec.ttft_ms)
