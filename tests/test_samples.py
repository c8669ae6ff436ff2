"""Every shipped sample runs end to end on the simulator: they are the examples of the README
and docs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, outcomes, run_cli

SAMPLES = {
    "chat.jsonl": [],
    "completions.jsonl": [],
    "responses.jsonl": [],
    "tokenize.jsonl": [],
    "detokenize.jsonl": [],
    "stream-chat.jsonl": [],
    "bare-prompts.jsonl": ["--endpoint", "chat", "--model", "tm-small"],
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_runs_on_the_simulator(name: str, tmp_path: Path) -> None:
    sample = ROOT / "samples" / name
    lines = [x for x in sample.read_bytes().splitlines() if x.strip()]
    out = tmp_path / "out"
    p = run_cli(["run", str(sample), "-o", str(out), "--sim", "-q", *SAMPLES[name]])
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(out)
    assert len(res) == len(lines) and not fail
    if name.startswith("stream"):
        assert all("timing" in r for r in res.values())
