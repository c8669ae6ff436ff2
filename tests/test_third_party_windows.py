"""A fixed window nobody here wrote: the LiteLLM proxy (tests/requirements-litellm.txt, run
only with TMBATCH_LITELLM=1, as CI does) limiting a deployment to `rpm` requests a minute
with no database: `rpm:` in its `litellm_params`, `simple-shuffle` routing with
`enable_pre_call_checks`. Read off LiteLLM 1.106.12 by hand (2026-12-07): the count opens
with the first request after the last window ended and lasts 60 s (a key with a 60-s ttl,
`Router._update_usage`), admits exactly `rpm`, does not count refusals, and refuses with a
bare 429 (`No deployments available for selected model.`, no Retry-After of any spelling,
no `x-ratelimit-*`). Its other per-minute limit, `usage-based-routing-v2`, counts per
clock minute but admits rpm - 1 and says `llm_provider-retry-after: 60` whatever is left
of the minute: a pause of a minute, honoured (docs/limits.md).

The simulator's windows (tmbatch/sim/limits.py) are our own reading of a fixed window; this
checks rule 4's windows (tmbatch/limits/windows.py) where the window is someone else's:
minutes of wall time, so one run of three windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import LITELLM_MOCK_MODEL, SERVER_KEY, ServerProcess, litellm_process
from tests.test_conformance import row, run_batch

RPM = 2
LINES = 5  # three windows: 2, 2 and 1
CONFIG = """\
model_list:
""" + LITELLM_MOCK_MODEL + """\
      rpm: {rpm}
general_settings:
  master_key: {key}
router_settings:
  routing_strategy: simple-shuffle
  enable_pre_call_checks: true
  num_retries: 0
litellm_settings:
  num_retries: 0
"""


@pytest.fixture
def windowed(tmp_path: Path) -> Iterator[ServerProcess]:
    """LiteLLM with a window of RPM requests a minute (tests/servers.py starts the proxy the
    other tests share, with no limit)."""
    config = tmp_path / "litellm-windowed.yaml"
    config.write_text(CONFIG.format(rpm=RPM, key=SERVER_KEY))
    server = litellm_process(config, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# (`server_name` makes tests/conftest.py treat it as a LiteLLM test: skipped unless asked)
@pytest.mark.parametrize("server_name", ["litellm"])
def test_a_litellm_window_is_met_with_its_allowance_and_probed_not_hammered(
        server_name: str, windowed: ServerProcess, tmp_path: Path) -> None:
    """Five lines, two a minute, four workers: the first volley finds the window (two
    through, the rest refused), the lane holds and probes until one gets through (a window
    opened), and from then on sends what the last window let through at each opening, then
    holds to the next. Three windows, the answers in three groups a minute apart, and a
    refusal a second at most while the window is closed (unpaced, --no-adaptive meets one
    per worker per backoff: hundreds over three minutes)."""
    rows = [row(f"w{i}", "/v1/chat/completions",
                {"model": "tm-mock", "messages": [{"role": "user", "content": f"hi {i}"}]})
            for i in range(LINES)]
    run = run_batch(windowed, rows, tmp_path, "-c", "4", timeout=400)
    assert run.code == 0 and len(run.results) == LINES, run.stderr[-3000:]
    admission = run.summary["this_run"]["admission"]
    assert admission["window_allowance"] == RPM, admission
    assert admission["pace_requests_per_second"] is None, admission
    created = sorted(run.body(f"w{i}")["created"] for i in range(LINES))
    groups: list[list[int]] = []  # the answers' `created` (the proxy's clock, whole seconds)
    for t in created:
        if groups and t - groups[-1][-1] < 30:
            groups[-1].append(t)
        else:
            groups.append([t])
    assert [len(g) for g in groups] == [2, 2, 1], created
    assert all(b[0] - a[0] >= 59 for a, b in itertools.pairwise(groups)), created
    assert admission["refusals"] <= (created[-1] - created[0]) + 4, admission
