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
