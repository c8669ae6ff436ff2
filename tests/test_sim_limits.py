"""The simulator's limits as pure arithmetic on `now`: no socket and no clock, the way a
virtual-time harness drives them. The same behaviour over real sockets is in test_sim.py."""

from __future__ import annotations

import pytest

from tmbatch.sim import SimConfig
from tmbatch.sim.limits import RequestBucket, RetryWindows, build_limit_set


def test_retry_windows_count_arrivals_inside_after_the_grace() -> None:
    windows = RetryWindows(grace=0.1)
    windows.open(10.0, 11.0)  # announced at 10 s, a pause until 11 s
    windows.open(10.2, 10.25)  # shorter than the grace: never counts anything
    assert not windows.arrive(10.05)  # already on the wire
    assert windows.arrive(10.5)
    assert not windows.arrive(11.0)  # the pause is over
    assert not windows.arrive(12.0)


def test_limit_set_takes_nothing_when_one_limit_refuses() -> None:
    limits = build_limit_set(SimConfig(rate_limit=1, rate_burst=2, tpm_limit=60, tpm_burst=5),
                             now=100.0)
    assert isinstance(limits.requests, RequestBucket) and limits.tokens is not None
    assert limits.admit(100.0) == (0.0, "")
    limits.charge(100.0, 10)  # the budget is 5 in debt: refills at 1 token/s
    wait, kind = limits.admit(100.0)
    assert kind == "tokens" and wait == pytest.approx(5.0, abs=1e-3)
    assert limits.requests.remaining(100.0) == 1  # the tokens refusal cost no request
    headers, ends = limits.headers(100.0)
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert ends == [pytest.approx(105.0, abs=1e-3)]  # remaining 0 announces the wait


def test_limit_set_without_limits_admits_everything() -> None:
    limits = build_limit_set(SimConfig(), now=0.0)
    assert limits.active == ()
    assert all(limits.admit(0.0) == (0.0, "") for _ in range(100))
    assert limits.headers(0.0) == ({}, [])
