"""`tmbatch run --dry-run`: the input checked, its estimate at the prices given and doctor's
checks, with nothing billed (the simulator's own counters say so) and no output directory;
a priced run says its estimate as it starts; dollars to four significant digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chat_line, clean_env, run_cli, write_jsonl
from tmbatch.spend.usage import money

KEY = "tm-dry-run-test-key-000000000000000"
NOT_BILLED = {"/health", "/version", "/v1/models", "/tokenize"}


def billed_nothing(sim: Any) -> None:
    stats = sim.stats()
    assert stats["completion_calls"] == 0 and stats["processed_total"] == 0, stats
    received = {route for route, info in stats["by_route"].items() if info["received"]}
    assert received <= NOT_BILLED, stats["by_route"]


def test_dry_run_validates_estimates_and_checks_the_server_billing_nothing(
        sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(30)])
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--dry-run",
                 "--price", "tm-small=0.20:0.60"], env=clean_env(TENSORMESH_INFERENCE_API_KEY=KEY))
    assert p.returncode == 0, p.stderr
    assert f"{inp}: 30 lines, 30 valid, 0 invalid" in p.stdout  # validated
    total = next(x for x in p.stdout.splitlines() if x.startswith("total"))
    assert "$0.0000" not in total and "$0.00 " not in total, total  # four significant digits
    assert "ok    auth" in p.stdout and "doctor: all good" in p.stdout  # doctor ran, for real
    assert "dry run: the run would start; nothing was sent to a billed route" in p.stderr
    assert not out.exists()
    billed_nothing(sim)
    assert sim.stats()["by_route"]["/tokenize"]["received"] >= 1  # the key was checked


def test_dry_run_lists_bad_lines_and_a_refused_key(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0), b"{oops", chat_line(2)])
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--dry-run"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=KEY))
    assert p.returncode == 1, p.stderr + p.stdout  # a bad line: the run would start
    assert f"{inp}:2: invalid_json" in p.stdout, p.stdout
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--dry-run"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY="tm-wrong-key-00000000000000000"))
    assert p.returncode == 3, p.stderr + p.stdout  # doctor: the key is refused
    assert "the run would be refused" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    billed_nothing(sim)


def test_a_priced_run_says_its_estimate_as_it_starts(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--sim",
                 "--price", "tm-small=0.20:0.60"])
    assert p.returncode == 0, p.stderr
    first = p.stderr.splitlines()[0]
    assert first.startswith("estimate: 5 billed line(s) of the whole input"), p.stderr
    assert "expected" in first and "at most" in first and "$0.00 " not in first
    plain = run_cli(["run", str(inp), "-o", str(tmp_path / "out2"), "--sim"])
    assert "estimate:" not in plain.stderr  # no prices: nothing to say about cost


@pytest.mark.parametrize(("usd", "text"), [
    (0.0, "$0.00"), (0.05, "$0.05"), (0.001234, "$0.001234"), (0.0012345678, "$0.001235"),
    (12.3456, "$12.35"), (123.456, "$123.5"), (1999.7, "$2,000"), (0.1, "$0.10"),
    (-0.5, "-$0.50"),
])
def test_money_has_four_significant_digits(usd: float, text: str) -> None:
    assert money(usd) == text
