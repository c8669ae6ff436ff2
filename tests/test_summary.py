"""What a run reports: latency percentiles from the constant-memory histogram, the last
line, the advice about failed lines, and summary.json after a re-run with nothing to do."""

from __future__ import annotations

import dataclasses
import random
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import chat_line, run_cli, write_jsonl
from tmbatch.policy import Outcome
from tmbatch.run.summaries import (
    Counts,
    MergedSummary,
    Summary,
    ThisRun,
    read_summary,
    write_summary,
)
from tmbatch.run.summary import Histogram, final_line, percentile


def test_histogram_percentiles_within_half_a_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-2.0, 1.0) for _ in range(50_000)] + [0.00001, 7200.0]
    h = Histogram()
    for v in values:
        h.add(v)
    exact = sorted(values)
    for q in (50, 90, 99, 99.9):
        want = percentile(exact, q)
        got = h.percentile(q)
        assert want is not None and got is not None
        assert abs(got - want) / want < 0.005, (q, got, want)
    assert h.count == len(values) and h.max == 7200.0


def test_empty_histogram() -> None:
    h = Histogram()
    assert h.percentile(50) is None and h.max is None and len(h) == 0


# -- the end of a run: its last line, what to do about failures, a re-run with nothing to do ----
def _run(inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["run", str(inp), "-o", str(out), "--sim", "--max-retries", "0",
                    "--patience", "1", *extra])


def test_failed_lines_end_with_where_they_are_and_the_command_per_class(
        tmp_path: Path) -> None:
    rows: list[Any] = [chat_line(i) for i in range(6)]
    rows[1]["body"]["sim"] = {"status": 500}  # ambiguous
    rows[2]["body"]["sim"] = {"status": 429, "retry_after": 0}  # rejected: --patience is over
    rows[3] = {"custom_id": 7}  # permanent: a bad line
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out dir"
    p = _run(inp, out)
    assert p.returncode == 1, p.stderr
    assert f"failed lines are in {out / 'failures.jsonl'}" in p.stderr
    for cls in (Outcome.AMBIGUOUS, Outcome.REJECTED, Outcome.PERMANENT):
        assert f"1 {cls}: {cls.policy.meaning}" in p.stderr  # worded by the policy
    for cls in (Outcome.AMBIGUOUS, Outcome.REJECTED):
        assert f"tmbatch resend '{out}' --class {cls}" in p.stderr  # quoted for the shell
    # a bad line sent as it is would fail the same way: its code's fix says --input instead
    assert f"tmbatch resend '{out}' --class permanent" not in p.stderr
    assert "1 invalid_custom_id (permanent), e.g. line 4" in p.stderr
    assert f"tmbatch resend '{out}' --input retry.jsonl" in p.stderr
    assert "not_sent" not in p.stderr.split("failed lines are in")[1]  # only classes present
    p = _run(inp, tmp_path / "json", "--log-format", "json")
    events = [orjson.loads(line) for line in p.stderr.splitlines()]
    steps = next(e for e in events if e["event"] == "next_steps")
    assert {c["class"]: c["lines"] for c in steps["classes"]} == \
        {"ambiguous": 1, "rejected": 1, "permanent": 1}
    assert steps["failures_file"] == str(tmp_path / "json" / "failures.jsonl")


def test_a_run_with_no_failure_gives_no_advice(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    p = _run(inp, tmp_path / "out")
    assert p.returncode == 0 and "failed lines are in" not in p.stderr


def test_a_rerun_with_nothing_to_send_keeps_the_numbers_of_the_run_that_sent(
        tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    out = tmp_path / "out"
    assert _run(inp, out).returncode == 0
    first = orjson.loads((out / "summary.json").read_bytes())
    p = _run(inp, out)
    assert p.returncode == 0, p.stderr
    again = orjson.loads((out / "summary.json").read_bytes())
    assert again["this_run"] == first["this_run"]  # not overwritten with zeros and nulls
    assert again["this_run"]["latency_ms"]["p50"] is not None
    assert again["nothing_sent"]["at"] and again["counts"] == first["counts"]
    assert "nothing was left to send" in p.stderr
    assert "None" not in p.stderr


def test_final_line_never_shows_none() -> None:
    this_run: ThisRun = {
        "requests_per_second": 0.0, "tokens": {"per_second": 0.0},
        "latency_ms": {"p50": None, "p90": None, "p99": None},
        "ttft_ms": {"count": 0}, "wall_seconds": 0.01, "admission": None}
    summary = Summary(None, None, None, 2, 0, Counts(0, 2, {"permanent": 2}, 2), this_run)
    line = final_line(summary)
    assert "None" not in line and "latency" not in line  # only bad lines: nothing measured
    assert line.startswith("done: 0 succeeded, 2 failed (permanent 2)")
    adaptive = {  # every request refused: no settled rate
        "mode": "adaptive", "decreases": 2, "concurrency_final": 30,
        "settled_requests_per_second": None}
    line = final_line(replace(summary, this_run={**this_run, "attempts_sent": 8,
                                                 "admission": adaptive}))
    assert "None" not in line and "adaptive: settled at 30 in flight," in line
    # nothing sent (only bad lines, found locally): no rate at all, not "0.0 req/s" or a
    # rate of lines that never left (the issue saw "this run 527.62 req/s")
    local = final_line(replace(summary, this_run={**this_run, "requests_per_second": 527.62}))
    assert "req/s" not in local and "this run: 0 sent" in local, local


def test_summary_json_round_trips_as_a_frozen_value(tmp_path: Path) -> None:
    run = Summary("/x/in.jsonl", "f", "job", 3, 1, Counts(1, 1, {"permanent": 1}, 2, 1),
                  {"attempts_sent": 3}, stopped="SIGTERM", spend=None,
                  labels={"file": "labels.jsonl", "ok": 1})
    merged = MergedSummary("/x/in.jsonl", "f", [{"dir": "a", "shard": [0, 2]}], 3, 1,
                           Counts(2, 0, {}, 2), {"count": 0, "lines": []},
                           {"count": 0, "lines": []}, [], {"attempts_sent": 2})
    for summary in (run, merged):
        write_summary(tmp_path, summary)
        assert read_summary(tmp_path) == summary
        with pytest.raises(dataclasses.FrozenInstanceError):
            summary.counts = Counts(0, 0, {}, 0)  # type: ignore[misc]
    assert orjson.loads((tmp_path / "summary.json").read_bytes())["finished"] is True
    assert not run.finished and run.as_dict()["stopped"] == "SIGTERM"
    (tmp_path / "summary.json").write_bytes(b'{"counts": "none"}')
    assert read_summary(tmp_path) is None  # not one tmbatch wrote: as if there were none
