"""The scenario matrix (tmbatch/sim/scenarios.py) in virtual time: every row, median of three
seeds, within its band. Any change to pacing must keep this green; the same rows over real
sockets are bench/matrix_bench.py's, with figures in bench/baselines/."""

from __future__ import annotations

import pytest

from tmbatch.sim.scenarios import SCENARIOS, Scenario
from tmbatch.sim.virtual import run_matrix


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_row_holds_its_band(sc: Scenario) -> None:
    (median,) = run_matrix([sc], seeds=3)
    assert median.passed, median.line()


def test_a_row_without_the_learnt_pace_is_the_pauses_alone() -> None:
    """`bench/pause_only.py` runs each row as `--no-adaptive` too: nothing learnt (no lane is
    ever paced), every window still honoured, the refusals the pace saves paid instead."""
    from dataclasses import replace

    from tmbatch.sim.scenarios import BY_NAME
    from tmbatch.sim.virtual import run_row

    row = replace(BY_NAME["bucket-ms"], lines=300)
    alone = replace(row, adaptive=False)
    assert "--no-adaptive" in alone.client_flags() and "--no-adaptive" not in row.client_flags()
    learnt, paused = run_row(row), run_row(alone)
    assert learnt.accepted == paused.accepted == 300
    assert paused.violations == learnt.violations == 0
    assert learnt.lanes["tm-small"]["pace_cuts"] >= 1
    assert paused.lanes["tm-small"]["pace_cuts"] == 0
    assert paused.lanes["tm-small"]["pace_requests_per_second"] is None
    assert paused.refused > 10 * learnt.refused
