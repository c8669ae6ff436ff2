"""One set of counts: the progress line, the `done:` line, `tmbatch status`, summary.json and
the report say the same numbers for the whole job, after a budget stop, a re-run with the
budget still spent, a fatal stop, the resume that finishes the job, and a merge of shards.

Every view is read the way its reader gets it (the JSON log's events, `status --json`, the
file, the HTML page, the merge's own line), against the simulator on a real socket.
"""

from __future__ import annotations

import html
import importlib.util
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import chat_line, clean_env, run_cli, write_jsonl

KEY = "tm-counts-test-key-0000000000000000"
WRONG = "tm-counts-wrong-key-000000000000000"
# "200 lines: 103 succeeded, 8 failed (fatal 8), 2 of unknown outcome, 89 pending"
DONE = re.compile(r"done: (?:(?P<lines>\d+) lines?: )?(?P<succeeded>\d+) succeeded, "
                  r"(?P<failed>\d+) failed(?: \((?P<classes>[^)]*)\))?"
                  r"(?:, (?P<unknown>\d+) of unknown outcome)?(?:, (?P<pending>\d+) pending)?")
CARD = re.compile(r"<b>([\d,]+)</b><span>([^<]+)</span>")


def view(lines: int | None, succeeded: int, failed: int, by_class: dict[str, int],
         unknown: int | None, pending: int | None) -> dict[str, Any]:
    return {"lines": lines, "succeeded": succeeded, "failed": failed,
            "by_class": {k: v for k, v in by_class.items() if v},
            "unknown": unknown or 0, "pending": pending or 0}


def from_done(text: str) -> dict[str, Any]:
    m = DONE.search(text)
    assert m, text
    classes = dict((k, int(v)) for k, v in (p.split() for p in m["classes"].split(", "))) \
        if m["classes"] else {}
    return view(int(m["lines"]), int(m["succeeded"]), int(m["failed"]), classes,
                int(m["unknown"] or 0), int(m["pending"] or 0))


def from_progress(ev: dict[str, Any]) -> dict[str, Any]:
    return view(ev["total"], ev["succeeded"], ev["failed"], ev["failed_by_class"],
                ev["unknown_outcome"], ev["pending"])


def from_summary(out: Path) -> dict[str, Any]:
    c = orjson.loads((out / "summary.json").read_bytes())["counts"]
    return view(c["lines"], c["succeeded"], c["failed"], c["failed_by_class"],
                c.get("unknown_outcome_in_flight"), c["pending"])


def from_status(out: Path) -> dict[str, Any]:
    p = run_cli(["status", str(out), "--json"])
    assert p.returncode in (0, 1), p.stderr  # 1: not finished
    s = orjson.loads(p.stdout)
    return view(s["input_lines"], s["succeeded"], s["failed"], s["failed_by_class"],
                s["unknown_outcome"], s["not_yet_sent"])


def from_report(out: Path, tmp: Path) -> dict[str, Any]:
    p = run_cli(["report", str(out), "-o", str(tmp)])
    assert p.returncode == 0, p.stderr
    cards = {label: int(n.replace(",", ""))
             for n, label in CARD.findall((tmp / "index.html").read_text())}
    page = html.unescape((tmp / "index.html").read_text())
    by_class = {cls: sum(int(n.replace(",", "")) for n in re.findall(
        rf"</span>{cls}</td><td><code>[^<]*</code></td><td class=\"n\">([\d,]+)<", page))
        for cls in ("not_sent", "rejected", "ambiguous", "permanent", "fatal")}
    return view(cards["lines"], cards["succeeded"], cards["failed"], by_class,
                cards.get("unknown outcome"), cards.get("pending (not yet sent)"))


def run_job(args: list[str], key: str) -> tuple[int, dict[str, Any], dict[str, Any], str]:
    """A run with JSON logs: its exit code, its last progress event, its summary event."""
    p = run_cli(["run", *args, "--log-format", "json"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=key))
    events = [orjson.loads(x) for x in p.stderr.splitlines() if x.startswith("{")]
    progress = [e for e in events if e.get("event") == "progress"]
    summary = [e for e in events if e.get("event") == "summary"]
    assert progress and len(summary) == 1, p.stderr
    return p.returncode, progress[-1], summary[0], p.stderr


def agree(out: Path, tmp: Path, *runs: dict[str, Any]) -> dict[str, Any]:
    """Every view of `out` says the same numbers; returns them."""
    views = {"summary.json": from_summary(out), "status": from_status(out)}
    if importlib.util.find_spec("matplotlib") is not None:
        views["report"] = from_report(out, tmp)
    for i, v in enumerate(runs):
        views[f"run view {i}"] = v
    first = views["summary.json"]
    assert all(v == first for v in views.values()), views
    assert first["succeeded"] + first["failed"] + first["unknown"] + first["pending"] == \
        first["lines"], first
    return first


def lines_with_bad_ones(tmp: Path, n: int = 40) -> Path:
    rows: list[Any] = [chat_line(i) for i in range(n)]
    rows.insert(3, b"{not json")  # two lines that fail where they stand (permanent)
    rows.insert(30, b'{"custom_id": "x", "method": "POST"}')
    return write_jsonl(tmp / "in.jsonl", rows)


def test_counts_agree_after_a_budget_stop_a_fatal_stop_and_the_resume(
        sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=KEY)
    inp = lines_with_bad_ones(tmp_path)
    out = tmp_path / "out"
    base = [str(inp), "-o", str(out), "--base-url", sim.url, "-c", "4"]

    # 1. a budget stop: some lines answered, the rest pending
    code, prog, done, _ = run_job([*base, "--budget-tokens", "150"], KEY)
    assert code == 6
    first = agree(out, tmp_path / "r1", from_progress(prog), from_done(done["msg"]))
    assert first["pending"] > 0 and first["lines"] == 42
    assert f"budget reached: {first['pending']} pending; raise --budget-tokens" in done["msg"]

    # 2. the same command again: the budget is still spent, so nothing is sent, and it says
    # why (the issue saw "nothing was left to send: every line already has an outcome")
    code, prog, done, _ = run_job([*base, "--budget-tokens", "150"], KEY)
    assert code == 6
    assert "nothing was left to send" not in done["msg"]
    assert "this run sent nothing; budget reached" in done["msg"], done["msg"]
    again = agree(out, tmp_path / "r2", from_progress(prog), from_done(done["msg"]))
    assert again == first

    # 3. a fatal stop (the server refuses the key): the refused lines count as failed
    # (fatal) in every view; `status` used to show "failed: 0" here
    code, prog, done, _ = run_job([*base, "--budget-tokens", "100000", "--no-preflight"], WRONG)
    assert code == 3
    fatal = agree(out, tmp_path / "r3", from_progress(prog), from_done(done["msg"]))
    assert fatal["by_class"].get("fatal", 0) > 0

    # 4. the resume that finishes: the job's counts, not this run's alone
    code, prog, done, _ = run_job([*base, "--budget-tokens", "100000"], KEY)
    assert code == 1  # the two bad lines
    last = agree(out, tmp_path / "r4", from_progress(prog), from_done(done["msg"]))
    assert last == view(42, 40, 2, {"permanent": 2}, 0, 0)
    assert done["this_run"]["succeeded"] < 40  # this run's share is beside the job's


def test_counts_agree_after_a_merge_of_shards(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=KEY)
    inp = lines_with_bad_ones(tmp_path)
    shards = []
    for i, budget in ((0, "100000"), (1, "80")):  # the second stops at its budget
        out = tmp_path / f"shard{i}"
        code, prog, done, _ = run_job([str(inp), "-o", str(out), "--base-url", sim.url,
                                       "--shard", f"{i}/2", "--budget-tokens", budget], KEY)
        assert code == (1 if i == 0 else 6)
        agree(out, tmp_path / f"r{i}", from_progress(prog), from_done(done["msg"]))
        shards.append(str(out))
    merged = tmp_path / "merged"
    p = run_cli(["merge", *shards, "-o", str(merged)])
    assert p.returncode == 5, p.stderr  # lines without an outcome: incomplete
    m = re.search(r"(\d+) line\(s\), (\d+) succeeded, (\d+) failed", p.stderr)
    assert m, p.stderr
    counts = agree(merged, tmp_path / "rm")
    assert (counts["lines"], counts["succeeded"], counts["failed"]) == tuple(map(int, m.groups()))
    assert counts["pending"] > 0


@pytest.mark.parametrize("budget", ["--budget-usd"])
def test_a_spent_dollar_budget_names_its_flag(sim_factory: Any, tmp_path: Path,
                                             budget: str) -> None:
    sim = sim_factory(api_key=KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(30)])
    out = tmp_path / "out"
    code, _, done, _ = run_job([str(inp), "-o", str(out), "--base-url", sim.url, budget,
                                "0.0002", "--price", "tm-small=2:8"], KEY)
    assert code == 6
    pending = from_summary(out)["pending"]
    assert pending > 0
    assert f"budget reached: {pending} pending; raise --budget-usd" in done["msg"]
