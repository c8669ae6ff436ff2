"""The simulator's limits as pure arithmetic on `now`: no socket and no clock, the way a
virtual-time harness drives them. The same behaviour over real sockets is in test_sim.py."""

from __future__ import annotations

import pytest

from tmbatch.sim import SimConfig
from tmbatch.sim.limits import (
    FixedWindow,
    RequestBucket,
    RetryWindows,
    ScheduledBucket,
    build_limit_set,
)


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


def test_scheduled_bucket_refills_at_the_old_rate_up_to_a_change_and_the_new_after() -> None:
    bucket = ScheduledBucket(2.0, 100.0, 0.0, 10.0, epoch=10.0,
                             schedule=((1.0, 10.0), (1.5, 1.0)))
    assert bucket.rate_at(10.5) == 2.0 and bucket.level == pytest.approx(1.0)
    # one call across both changes: 0.5 s more at 2, 0.5 s at 10, 1.5 s at 1
    assert bucket.rate_at(13.0) == 1.0
    assert bucket.level == pytest.approx(1.0 + 1.0 + 5.0 + 1.5)
    assert bucket.applied == 2


def test_scheduled_bucket_keeps_its_burst_and_announces_at_the_rate_in_force() -> None:
    bucket = ScheduledBucket(2.0, 1.0, 1.0, 0.0, epoch=0.0, schedule=((0.5, 20.0),))
    assert bucket.wait(0.0) == 0.0
    bucket.take(0.0)
    assert bucket.wait(0.1) == pytest.approx(0.4)  # at 2/s: the change is not foretold
    assert bucket.headers(0.1)["x-ratelimit-reset-requests"] == "400ms"
    assert bucket.wait(0.5) == 0.0  # at 2/s a token was due by 0.5 s anyway
    bucket.take(0.5)
    assert bucket.wait(0.5) == pytest.approx(0.05)  # now at 20/s
    assert bucket.headers(0.5)["x-ratelimit-reset-requests"] == "50ms"
    assert bucket.remaining(100.0) == 1  # the burst stays 1 whatever the rate


def test_build_limit_set_schedules_from_the_epoch() -> None:
    config = SimConfig(rate_limit=4, rate_schedule=((1, 40),))
    limits = build_limit_set(config, now=50.0)
    assert isinstance(limits.requests, ScheduledBucket)
    assert limits.requests.capacity == 4  # one second's worth of the first rate
    assert limits.requests.rate_at(50.99) == 4 and limits.requests.rate_at(51.0) == 40
    assert config.rate_schedule == ((1.0, 40.0),)
    unscheduled = build_limit_set(SimConfig(rate_limit=4), now=0.0).requests
    assert type(unscheduled) is RequestBucket


@pytest.mark.parametrize("schedule", [((0, 5),), ((2, 5), (1, 5)), ((1, 0),), ((1, -2),),
                                      ((float("inf"), 5),), ((1, float("nan")),), ((1,),),
                                      "15:20"])
def test_bad_rate_schedules_are_refused(schedule: object) -> None:
    with pytest.raises(ValueError, match="rate_schedule"):
        SimConfig(rate_limit=1, rate_schedule=schedule)  # type: ignore[arg-type]


def test_a_rate_schedule_needs_a_rate() -> None:
    with pytest.raises(ValueError, match="needs rate_limit"):
        SimConfig(rate_schedule=((1, 5),))
    with pytest.raises(ValueError, match="needs rate_limit"):
        SimConfig(tpm_limit=600, rate_schedule=((1, 5),))


def admitted(window: FixedWindow, at: float) -> int:
    """How many requests the window admits from `at` on, all sent at `at`."""
    n = 0
    while window.wait(at) == 0.0:
        window.take(at)
        n += 1
    return n


def test_a_scheduled_fixed_window_admits_the_rate_in_force_when_it_begins() -> None:
    """40 per 4 s, 5/s (20 a window) from 10 s, 10/s (40) from 25 s: a window takes the
    rate in force when it begins, whole, whatever changes within it."""
    config = SimConfig(window_limit=40, window_seconds=4, rate_schedule=((10, 5), (25, 10)))
    window = build_limit_set(config, now=100.0).requests
    assert isinstance(window, FixedWindow)
    got = {start: admitted(window, 100.0 + start) for start in (0, 8, 12, 20, 24, 28)}
    assert got == {0: 40, 8: 40, 12: 20, 20: 20, 24: 20, 28: 40}
    assert window.limit_of(3) == 20 and window.limit_of(7) == 40


def test_a_fixed_window_counts_from_the_servers_clock_not_its_start() -> None:
    """window_start: the server starts 3 s into a window of 4 s, so its first window ends a
    second after the start, with its whole allowance (nobody used it before)."""
    window = build_limit_set(SimConfig(window_limit=5, window_seconds=4, window_start=3),
                             now=10.0).requests
    assert isinstance(window, FixedWindow)
    assert admitted(window, 10.0) == 5 and window.wait(10.0) == pytest.approx(1.0)
    assert admitted(window, 11.0) == 5 and window.wait(11.0) == pytest.approx(4.0)


@pytest.mark.parametrize("start", [-1.0, 4.0, 9.0])
def test_a_window_start_outside_the_window_is_refused(start: float) -> None:
    with pytest.raises(ValueError, match="window_start"):
        SimConfig(window_limit=5, window_seconds=4, window_start=start)


def test_model_scope_gives_each_model_its_own_limits_and_windows() -> None:
    from tmbatch.sim.gate import limits_for
    from tmbatch.sim.state import new_state

    config = SimConfig(rate_limit=2, rate_schedule=((1, 4),), tpm_limit=60, capacity=2,
                       limit_scope="model")
    state = new_state(config)
    small, large = limits_for(state, "tm-small"), limits_for(state, "tm-large")
    assert small is not None and large is not None and small is not large
    assert isinstance(small.requests, ScheduledBucket)
    assert small.requests is not large.requests and small.tokens is not large.tokens
    assert small.windows is not large.windows
    assert limits_for(state, None) is None and limits_for(state, "nope") is None
    assert state.account is None and state.capacity is not None  # capacity: the account's
    account = new_state(SimConfig(rate_limit=2))
    assert limits_for(account, "tm-small") is limits_for(account, "tm-large") is not None
    assert limits_for(account, None) is account.account


def test_the_virtual_server_counts_every_arrival_once_the_refusal_is_back() -> None:
    """The virtual harness's checker has no grace but the refusal's own flight (REFUSAL_RTT):
    a request sent while the 429 is on its way back is not counted, one sent at the instant
    it is back (the same event-loop tick) is not either, and one a microsecond later is."""
    import asyncio

    from tmbatch.sim.scenarios import Band, Scenario
    from tmbatch.sim.virtual import REFUSAL_RTT, VirtualServer, run_virtual

    sc = Scenario("t", "t", {"rate_limit": 0.01, "rate_burst": 1, "retry_after": 5.0}, "limit",
                  Band(1.0))

    async def go() -> list[int]:
        server = VirtualServer(sc, seed=0)
        counted = []
        assert (await server.send("tm-small", "a"))[0] == 200
        refused = asyncio.ensure_future(server.send("tm-small", "b"))
        await asyncio.sleep(REFUSAL_RTT / 2)  # the 429 is on its way: this one crossed it
        crossed = asyncio.ensure_future(server.send("tm-small", "c"))
        await asyncio.sleep(0)
        counted.append(server.violations)
        status, headers, _ = await refused
        assert status == 429 and headers["Retry-After"] == "5"
        await server.send("tm-small", "d")  # the same tick the 429 came back in
        counted.append(server.violations)
        await asyncio.sleep(1e-6)
        await server.send("tm-small", "e")
        counted.append(server.violations)
        await crossed
        return counted

    assert run_virtual(go) == [0, 0, 1]
