"""summary.json as typed values: a run's (`Summary`) and a merge's (`MergedSummary`).

Each is built once, whole, and never changed: what a later step adds (the labels, a run
that had nothing to send keeping the last run's numbers) is a new value made with
`dataclasses.replace`. `as_dict` is the only place the file's shape is spelled, `read_summary`
the only place it is read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import orjson

from tmbatch.base.files import SUMMARY, atomic_write
from tmbatch.journal.compact import IN_FLIGHT, LineStates
from tmbatch.policy import FAILURE_CLASSES, Outcome


class ThisRun(TypedDict, total=False):
    """summary.json's `this_run`: what the last run that wrote it did (`build_summary`)."""

    attempts_sent: int
    succeeded: int
    failed_by_class: dict[str, int]
    failed_by_code: dict[str, int]
    retries: int
    rate_limited_429: int
    pauses: int
    paused_seconds: float
    admission: dict[str, Any] | None
    wall_seconds: float
    requests_per_second: float
    tokens: dict[str, float]  # prompt, completion, total, per_second
    latency_ms: dict[str, float | None]  # p50, p90, p99, max
    ttft_ms: dict[str, float | None]  # count, p50, p90, p99


@dataclass(frozen=True, slots=True)
class Counts:
    """The job's lines by outcome (every run's, as the journal has them).

    The one set of counts the progress line, the `done:` line, `status`, summary.json and
    the report all show, made by `Counts.of` from the line states: whatever mix of resumes,
    stops and merges made them, `succeeded + failed + unknown + pending == lines`.
    `failed` counts every failure class, `fatal` included (a fatal refusal is sent again
    when the run resumes, so it is not in `with_outcome`, which is what a resume skips)."""

    succeeded: int
    failed: int
    failed_by_class: dict[str, int]
    with_outcome: int
    unknown_outcome_in_flight: int | None = None  # a run's: dispatched, no outcome
    lines: int | None = None  # lines that need an outcome (non-blank, in the shard)
    pending: int | None = None  # of those, never sent or left pending (None: lines unknown)

    @classmethod
    def of(cls, states: LineStates, lines: int | None = None) -> Counts:
        """Count the line states; `lines`: how many the input has (None: not known)."""
        by_outcome = states.by_outcome()
        by_class = {c.value: by_outcome[c] for c in FAILURE_CLASSES}
        ok = by_outcome[Outcome.OK]
        failed = sum(by_class.values())
        final = ok + sum(by_outcome[c] for c in FAILURE_CLASSES if c.policy.final)
        unknown = states.counts()[IN_FLIGHT]
        pending = None if lines is None else max(0, lines - ok - failed - unknown)
        return cls(succeeded=ok, failed=failed, failed_by_class=by_class, with_outcome=final,
                   unknown_outcome_in_flight=unknown, lines=lines, pending=pending)

    @property
    def done(self) -> int:
        """Lines with an outcome shown as done: succeeded or failed (any class)."""
        return self.succeeded + self.failed

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lines": self.lines, "succeeded": self.succeeded,
                               "failed": self.failed, "failed_by_class": self.failed_by_class}
        if self.unknown_outcome_in_flight is not None:
            out["unknown_outcome_in_flight"] = self.unknown_outcome_in_flight
        out["pending"] = self.pending
        out["with_outcome"] = self.with_outcome
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counts:
        by_class = d["failed_by_class"]
        if not isinstance(by_class, dict):
            raise TypeError("failed_by_class")
        return cls(_int(d["succeeded"]), _int(d["failed"]), by_class, _int(d["with_outcome"]),
                   d.get("unknown_outcome_in_flight"), _opt_int(d.get("lines")),
                   _opt_int(d.get("pending")))


@dataclass(frozen=True, slots=True)
class Summary:
    """A run's summary.json: the job's counts, what this run did, how it ended."""

    input: str | None
    fingerprint: str | None
    job_id: str | None
    input_lines: int
    blank_lines_skipped: int
    counts: Counts
    this_run: ThisRun
    stopped: str | None = None  # why the run stopped early (`Stop.reason`), None: it ended
    fatal: str | None = None
    io_error: str | None = None
    spend: dict[str, Any] | None = None  # `Budget.report`
    labels: dict[str, Any] | None = None  # a labelling job's counts by status
    nothing_sent: dict[str, Any] | None = None  # this run had nothing to send: when, how long
    cache: dict[str, Any] | None = None  # --cache: this run's hits, misses, spend avoided

    @property
    def finished(self) -> bool:
        return self.stopped is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input": self.input, "fingerprint": self.fingerprint, "job_id": self.job_id,
            "input_lines": self.input_lines, "blank_lines_skipped": self.blank_lines_skipped,
            "counts": self.counts.as_dict(), "this_run": self.this_run,
            "stopped": self.stopped, "finished": self.finished,
        }
        for key in ("fatal", "io_error"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        out["spend"] = self.spend
        for key in ("labels", "nothing_sent", "cache"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        this_run = d.get("this_run") or {}
        if not isinstance(this_run, dict):
            raise TypeError("this_run")
        return cls(d.get("input"), d.get("fingerprint"), d.get("job_id"),
                   _int(d.get("input_lines") or 0), _int(d.get("blank_lines_skipped") or 0),
                   Counts.from_dict(d["counts"]), this_run,
                   d.get("stopped"), d.get("fatal"), d.get("io_error"), d.get("spend"),
                   d.get("labels"), d.get("nothing_sent"), d.get("cache"))


@dataclass(frozen=True, slots=True)
class MergedSummary:
    """`tmbatch merge`'s summary.json: the shards' lines joined, and what is wrong with them."""

    input: str | None
    fingerprint: str | None
    shards: list[dict[str, Any]]  # dir, shard, job_id, finished
    input_lines: int
    blank_lines_skipped: int
    counts: Counts
    missing_lines: dict[str, Any]  # count, lines (up to a thousand)
    duplicated_lines: dict[str, Any]
    problems: list[str]
    shard_runs: dict[str, Any]  # the shards' last runs added up
    labels: dict[str, Any] | None = None
    spend: dict[str, Any] | None = None  # the shards' books summed; None: none kept any

    @property
    def finished(self) -> bool:
        """Complete: every line of the input has exactly one outcome."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "merged": True, "input": self.input, "fingerprint": self.fingerprint,
            "shards": self.shards, "input_lines": self.input_lines,
            "blank_lines_skipped": self.blank_lines_skipped, "counts": self.counts.as_dict(),
            "missing_lines": self.missing_lines, "duplicated_lines": self.duplicated_lines,
            "complete": self.finished, "finished": self.finished, "problems": self.problems,
            "shard_runs": self.shard_runs,
        }
        if self.labels is not None:
            out["labels"] = self.labels
        if self.spend is not None:
            out["spend"] = self.spend
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergedSummary:
        return cls(d.get("input"), d.get("fingerprint"), list(d.get("shards") or []),
                   _int(d.get("input_lines") or 0), _int(d.get("blank_lines_skipped") or 0),
                   Counts.from_dict(d["counts"]), dict(d.get("missing_lines") or {}),
                   dict(d.get("duplicated_lines") or {}), list(d.get("problems") or []),
                   dict(d.get("shard_runs") or {}), d.get("labels"), d.get("spend"))


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"{v!r} is not a count")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def read_summary(out_dir: Path) -> Summary | MergedSummary | None:
    """OUT/summary.json, or None when there is none or it is not one tmbatch wrote."""
    try:
        d = orjson.loads((out_dir / SUMMARY).read_bytes())
        if not isinstance(d, dict):
            return None
        return MergedSummary.from_dict(d) if d.get("merged") else Summary.from_dict(d)
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def write_summary(out_dir: Path, summary: Summary | MergedSummary) -> None:
    """Replace OUT/summary.json in one step (a crash leaves the old or the new file)."""
    atomic_write(out_dir / SUMMARY,
                 orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
