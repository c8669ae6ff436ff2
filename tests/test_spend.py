"""Spend in the journal, the stop it causes, and where people see it (progress, status).

Journals here are real files in the format `tmbatch.journal.journal` documents; replay is the same
`journal.load` a resume runs."""

from __future__ import annotations

import io
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, chat_line, clean_env, run_cli, write_jsonl
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.stop import Stop, StopReason
from tmbatch.journal.format import (
    BudgetRecord,
    DispatchRecord,
    OutcomeRecord,
    RecordError,
    SpendRecord,
    decode,
)
from tmbatch.journal.journal import load
from tmbatch.journal.reading import records
from tmbatch.run.progress import Progress
from tmbatch.run.summary import RunStats
from tmbatch.spend.budget import Budget, BudgetSpec
from tmbatch.spend.prices import Price, Prices
from tmbatch.spend.usage import render_spend


def _journal(tmp_path: Path, records: list[Any], torn: bytes = b"") -> Path:
    out = tmp_path / "out"
    out.mkdir()
    header = {"e": "start", "v": 1, "input": "-", "fingerprint": "stdin", "options": {},
              "job": "j", "t": 1.0}
    write_jsonl(out / "journal.jsonl", [header, *records])
    with open(out / "journal.jsonl", "ab") as f:
        f.write(torn)
    for name in ("results.jsonl", "failures.jsonl"):
        (out / name).touch()
    return out


def test_replay_takes_the_last_snapshot_and_counts_what_it_may_have_missed(
        tmp_path: Path) -> None:
    out = _journal(tmp_path, [
        {"e": "budget", "t": 1.0, "tokens": 5000, "usd": None,
         "prices": {"m": {"input": 1.0, "output": 2.0}}},
        ["s", 1.0, {}, {}, 0],
        ["d", 1, 1, "a", ["m", 10, 20]], ["o", 1, "ok", ""],
        ["d", 2, 1, "b", ["m", 10, 20]],
        ["s", 2.0, {"m": [8, 5, 0, 1]}, {"m": [10, 20, 1]}, 0],  # line 2 still in flight
        ["o", 2, "ok", ""],  # after the snapshot: its worst case stays counted (via in_flight)
        ["d", 3, 1, "c", ["m", 10, 20]], ["o", 3, "rejected", "rate_limited"],  # refunded
        ["d", 4, 1, "d", ["m", 10, 20]],  # cut off by the crash: its worst case
        ["d", 5, 1, "e", ["x", 1, 2]], ["o", 5, "ambiguous", "http_500"],  # may be billed
        ["d", 6, 1, "f"],  # a run without a budget: no estimate, unknown
    ], torn=b'["d", 7, 1, "g", ["m", 10')  # a torn last line is not data
    state = load(out, repair=False)
    assert state.spend == {"m": [8 + 10 + 10, 5 + 20 + 20, 0, 1 + 1 + 1], "x": [1, 2, 0, 1]}
    assert state.spend_unknown == 1
    assert state.budget is not None and state.budget.tokens == 5000
    rendered = render_spend(run_status(out))
    assert "76 tokens of a budget of 5,000" in rendered and "1 cut-off attempt(s)" in rendered
    assert "excludes x: no price" in rendered


def run_status(out: Path) -> dict[str, Any]:
    from tmbatch.tools.status import status

    return status(out)["spend"]


def test_a_journal_without_snapshots_has_unknown_spend(tmp_path: Path) -> None:
    out = _journal(tmp_path, [["d", 1, 1, "a"], ["o", 1, "ok", ""]])
    assert load(out, repair=False).spend is None
    assert "unknown" in render_spend(None)


def test_a_snapshot_record_round_trips_and_junk_is_not_one() -> None:
    rec = SpendRecord(1.5, {"m": [1, 2, 3, 4]}, {"m": [5, 6, 1]}, 2)
    assert decode(rec.to_json()) == rec
    for junk in (["s", 1.0], ["s", "x", {}, {}, 0]):
        with pytest.raises(RecordError, match="a spend snapshot is"):
            decode(orjson.dumps(junk))


def test_dispatch_records_carry_the_reservation_with_or_without_a_budget(
        sim: Any, tmp_path: Path) -> None:
    """A crash counts a cut-off attempt's worst case from its dispatch record, budget or not;
    every outcome is followed by a snapshot that counts it (its usage, not its worst case)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=16) for i in range(3)])
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    for name, extra in (("plain", []), ("budget", ["--budget-tokens", "10000"])):
        out = tmp_path / name
        p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--no-preflight",
                     "-q", *extra], env=env)
        assert p.returncode == 0, p.stderr
        journal = list(records(out / "journal.jsonl"))
        dispatches = [r for r in journal if isinstance(r, DispatchRecord)]
        snaps = [r for r in journal if isinstance(r, SpendRecord)]
        assert len(dispatches) == 3 and len(snaps) >= 2  # one at the start, one after answers
        assert all(r.reserved is not None and r.reserved[0] == "tm-small"
                   and r.reserved[2] == 16 for r in dispatches)
        assert any(isinstance(r, BudgetRecord) for r in journal) == bool(extra)
        last_outcome = max(i for i, r in enumerate(journal) if isinstance(r, OutcomeRecord))
        assert any(isinstance(r, SpendRecord) for r in journal[last_outcome:])
        assert snaps[-1].spent["tm-small"][3] == 3 and not snaps[-1].in_flight


def test_the_budget_stop_and_its_exit_code() -> None:
    stop = Stop()
    assert stop.on_budget("spent 10 of 10") and not stop.on_budget("again")
    assert stop.reason is StopReason.BUDGET and stop.exit_code(0) == ExitCode.BUDGET == 6
    assert StopReason.BUDGET.label == "budget"
    stop.on_signal(signal.SIGINT)  # a budget says more than a Ctrl-C during its drain
    assert stop.reason is StopReason.BUDGET
    stop.on_fatal("401")
    assert stop.reason is StopReason.FATAL


def test_the_progress_line_shows_spend_and_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    spec = BudgetSpec(tokens=50_000, usd=2.0, prices=Prices({"m": Price(1.0, 1.0)}))
    budget = Budget(spec, prior={"m": [12_000, 300, 0, 40]})
    progress = Progress(RunStats(), 100, tty=False, budget=budget)
    progress.tick()
    line = capsys.readouterr().err
    assert "spent 12.3k tok / 50k tok, $0.0123 / $2.00" in line  # 4 significant digits
    snap = progress.snapshot()
    assert snap["spent_tokens"] == 12_300 and snap["budget_tokens"] == 50_000
    assert snap["spent_usd"] == pytest.approx(0.0123) and snap["budget_usd"] == 2.0
    plain = Progress(RunStats(), 100, tty=False, budget=Budget())
    assert "spent_tokens" not in plain.snapshot()  # no budget, no prices: nothing added


def test_the_bar_shows_spend_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    budget = Budget(BudgetSpec(tokens=1000), prior={"m": [100, 20, 0, 2]})

    async def go() -> None:
        progress = Progress(RunStats(), 10, tty=True, budget=budget)
        progress.start()
        await progress.stop()

    asyncio.run(go())
    assert "spent 120 tok / 1k tok" in err.getvalue()
