"""Admission: one permit per attempt, lanes per model, the schedules and stated limits.

Timing is checked in virtual time (`tmbatch.sim.virtual.run_virtual`: the loop's clock jumps
to the next timer) or by counting events, never on the wall clock; the pace's rules are in
test_pacing.py and the scenario matrix in test_matrix.py. Real sockets at the end."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, chat_line, clean_env, outcomes, run_cli, write_jsonl
from tmbatch.client.classify import classify_status
from tmbatch.inputs.reader import Request
from tmbatch.limits import (
    Admission,
    Permit,
    TokenBucket,
    estimate_tokens,
    parse_duration,
)
from tmbatch.limits.admission import OPEN_EVERY, START_IN_FLIGHT
from tmbatch.limits.controller import PaceConfig
from tmbatch.limits.lanes import MAX_HOLD, LaneKey, make_lane
from tmbatch.limits.schedule import Pacer
from tmbatch.policy import AttemptFailed
from tmbatch.sim.virtual import VirtualLoop, run_virtual

CHAT = "/v1/chat/completions"
RA_1 = {"Retry-After": "1"}


def req(model: str = "m", line: int = 1) -> Request:
    return Request(line, f"r{line}", CHAT, {"model": model, "messages": [
        {"role": "user", "content": "x" * 40}], "max_tokens": 10})


def refusal(headers: dict[str, str] | None = None, status: int = 429) -> AttemptFailed:
    return classify_status(status, headers or {}, None, None)


async def enter(adm: Admission, model: str = "m") -> Permit:
    """A permit entered by hand (tests hold several at once; `async with` is the real use)."""
    return await adm.permit(req(model)).__aenter__()


async def leave(permit: Permit) -> None:
    await permit.__aexit__(None, None, None)


@pytest.mark.parametrize("text,want", [
    ("1s", 1.0), ("6m0s", 360.0), ("250ms", 0.25), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
    ("20ms", 0.02), ("1.5s", 1.5), ("3", 3.0), (" 2s ", 2.0), ("500us", 0.0005),
])
def test_parse_duration(text: str, want: float) -> None:
    assert parse_duration(text) == pytest.approx(want)


@pytest.mark.parametrize("text", [None, "", "soon", "1x", "-1s", "s", "1s2", "nan", "inf"])
def test_parse_duration_garbage_is_absent(text: str | None) -> None:
    assert parse_duration(text) is None


def test_estimate_counts_prompt_and_output_cap() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_tokens(body) == (400 + 4) // 4 + 1 + 50
    assert estimate_tokens({"prompt": "abcd"}) == 1 + 1 + 256  # no cap: the default


# -- the schedules -----------------------------------------------------------------------------

def simulate(tpm: float, estimate: int, actual: int, n: int, in_flight: int) -> float:
    """Send n requests back to back through a TokenBucket as the runner does, settling each
    `in_flight` requests later; return achieved tokens per minute (virtual time)."""
    b = TokenBucket(tpm)
    now = 0.0
    pending: list[float] = []
    sent_at = []
    for _ in range(n):
        now += b.reserve(estimate, now)
        sent_at.append(now)
        pending.append(estimate)
        if len(pending) > in_flight:
            b.adjust(actual - pending.pop(0))
    span = sent_at[-1] - sent_at[0]
    return actual * (n - 1) / span * 60.0


@pytest.mark.parametrize("estimate,actual", [(20, 100), (100, 20), (50, 50)])
def test_settling_reaches_the_target_whatever_the_estimate(estimate: int, actual: int) -> None:
    achieved = simulate(60_000, estimate, actual, n=5000, in_flight=16)
    assert achieved == pytest.approx(60_000, rel=0.02)


def test_without_settling_a_low_estimate_overshoots() -> None:
    """The check above can fail: the same run with no correction sends 5x the target."""
    b = TokenBucket(60_000)
    now = 0.0
    for _ in range(1000):
        now += b.reserve(20, now)
    achieved_if_actual_100 = 100 * 999 / now * 60.0
    assert achieved_if_actual_100 > 4 * 60_000


def test_bucket_booking_bigger_than_burst_waits_longer_not_forever() -> None:
    b = TokenBucket(60.0)  # 1 token/s, burst 1
    assert b.reserve(1, 0.0) == 0.0
    assert b.reserve(10, 0.0) == pytest.approx(10.0)
    b.adjust(5)  # debt
    assert b.reserve(1, 0.0) == pytest.approx(16.0)
    b.adjust(-100)  # credit beyond an empty bucket is dropped, not banked
    assert b.reserve(1, 1000.0) == 0.0


def test_a_stated_tokens_level_is_also_the_bucket_it_may_spend_at_once() -> None:
    """6,000 tokens a minute, and the server says it holds 1,000: ten requests of 100 go at
    once, as the server grants them, not one per second from the client's own half-second
    burst (over real sockets that cost 9 s of a 30 s run); after them, one a second."""
    b = TokenBucket(6000)
    b.at_most(1000, 0.0)
    assert [b.reserve(100, 0.0) for _ in range(10)] == [0.0] * 10
    assert b.reserve(100, 0.0) == pytest.approx(1.0)
    b.set_rate(6000)  # restated by the next answer: the capacity learnt stays
    b.at_most(0, 0.5)  # spent, says the server: the next booking waits for a refill
    assert b.reserve(100, 0.5) == pytest.approx(1.5)  # 12 s booked, less 10 s of burst


def test_a_pace_spaces_the_attempts_and_a_pause_moves_them() -> None:
    """GCRA: at 10 requests/s the bookings are 0.1 s apart, and a pause restarts them at its
    end without a saved-up burst."""
    p = Pacer(10.0)
    assert [p.book(0.0) for _ in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    p.restart_at(10.0)
    assert p.book(10.0) == pytest.approx(0.0)
    assert p.book(10.0) == pytest.approx(0.1)


def test_a_pause_may_end_with_the_burst_its_refill_allows() -> None:
    """A pause that refilled the server's bucket ends with that many slots at once, then the
    pace; a slot given back by a worker that stopped is there for the next."""
    p = Pacer(10.0)
    p.restart_at(10.0, burst=5)
    assert p.book(9.5) == pytest.approx(0.5)  # before the pause ends: no credit, its end
    assert [p.book(10.0) for _ in range(4)] == [0.0] * 4  # the credit, at once
    p.unbook()  # one of them is not sent after all: its slot is free again
    assert p.book(10.0) == 0.0
    assert p.book(10.0) == pytest.approx(0.1)  # then the pace
    assert p.book(10.0) == pytest.approx(0.2)
    p.unbook()
    assert p.book(10.0) == pytest.approx(0.2)  # a paced slot given back is the same slot


def test_a_slot_booked_before_a_pause_is_void_when_the_pace_restarts() -> None:
    """A worker booked its slot, then a Retry-After came: the pace restarts at the pause's
    end with the burst the refill allows, and the worker's slot, given back, adds nothing to
    it. It did: the burst was one more than the server refilled, the request after it was
    refused, and with whole-second hints that is a second lost (bucket-seconds over real
    sockets, 88 % of the limit)."""
    p = Pacer(50.0)  # fast enough for a pace's own burst of 2.5
    assert p.book(0.0) == 0.0
    assert p.book(0.0) == 0.0
    assert p.book(0.0) > 0.0  # the worker's slot, waited for
    p.restart_at(10.0, burst=5)
    p.unbook()  # it saw the pause: its slot is not sent
    waits = [p.book(10.0) for _ in range(7)]
    assert waits[:5] == [0.0] * 5 and min(waits[5:]) > 0.0, waits


def test_what_the_server_says_its_bucket_holds_goes_at_once_and_no_more() -> None:
    """`x-ratelimit-remaining` says the bucket holds 100: a hundred go at once, the next waits
    for the pace; a later answer saying it holds 3 leaves 3 at once (less than the schedule
    would), and a pause ends with the pace's own burst, not the allowance (it is not what
    refilled while paused)."""
    p = Pacer(10.0)
    p.at_most(100, 0.0)
    waits = [p.book(0.0) for _ in range(101)]
    assert waits[:100] == [0.0] * 100 and waits[100] > 0.0
    p = Pacer(10.0)
    p.at_most(100, 0.0)
    p.at_most(3, 0.0)
    assert [p.book(0.0) for _ in range(4)][3] > 0.0
    p.restart_at(5.0)
    assert sum(p.book(5.0) == 0.0 for _ in range(10)) == 1  # 10/s: a burst of 1 of its own


def test_a_refusal_after_a_stated_burst_ends_it() -> None:
    """A limit enforced over shorter spans than its headers state (OpenAI's may be: 60,000 a
    minute as 1,000 a second) refuses what its stated level allowed: from then on that level
    only holds the pace back, it is not spent at once."""
    lane = make_lane(LaneKey("", "m"), PaceConfig(), None, True, "")
    lane.controller.stated = 10.0  # (as the headers set it)
    lane.pacer.set_rate(10.0)
    lane.pacer.at_most(100, 0.0)
    assert lane.pacer.allowance == 100
    lane.refused(1.0, 0.5, None, None)
    assert lane.pacer.allowance == 0.0 and not lane.pacer.stated_burst
    lane.pacer.at_most(100, 2.0)
    assert [lane.pacer.book(2.0) for _ in range(3)][2] > 0.0


# -- the permit ----------------------------------------------------------------------------

def test_the_permit_learns_the_usage_ratio_and_charges_it() -> None:
    async def go() -> tuple[float, float]:
        adm = Admission(tpm=1e9, concurrency=4)
        for _ in range(300):
            async with adm.permit(req()) as permit:
                permit.ok({}, None, 3 * permit.tokens, None)
        async with adm.permit(req()) as permit:
            return adm.ratio, permit.charged / permit.tokens

    ratio, charged = run_virtual(go)
    assert ratio == pytest.approx(3.0, rel=0.01) and charged == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize("status,headers,refunded", [
    (429, {}, True),  # rejected: nothing generated, the tokens come back
    (408, {}, True),
    (503, RA_1, True),  # rejected
    (503, {}, False),  # ambiguous: the server may have generated it, so it stays charged
    (500, {}, False),
])
def test_refund_follows_the_class_of_the_answer(status: int, headers: dict[str, str],
                                                refunded: bool) -> None:
    """Admission and the safety table agree on what a status means: a 503 without
    Retry-After is ambiguous there, so it is not "nothing was generated" here either."""
    async def go() -> float:
        adm = Admission(tpm=600.0, concurrency=4)
        assert adm.tpm is not None
        async with adm.permit(req()) as permit:
            booked = adm.tpm.tat
            permit.failed(refusal(headers, status))
            return (booked - adm.tpm.tat) * adm.tpm.rate / permit.tokens

    assert run_virtual(go) == pytest.approx(1.0 if refunded else 0.0)


def test_a_permit_frees_its_slot_and_tokens_whatever_happens() -> None:
    """One slot per attempt, given back when the attempt ends by an answer, an exception or
    a cancellation; the tokens of an attempt that never left go back too."""
    async def go() -> None:
        adm = Admission(tpm=600.0, concurrency=2)
        assert adm.tpm is not None
        with pytest.raises(RuntimeError):
            async with adm.permit(req()):
                assert adm.in_flight == 1
                raise RuntimeError("the send blew up")
        assert adm.in_flight == 0
        holders = [await enter(adm) for _ in range(2)]
        before = adm.tpm.tat
        waiter = asyncio.ensure_future(enter(adm))
        await asyncio.sleep(0.01)
        waiter.cancel()  # cancelled while it waited for a slot: nothing was charged
        await asyncio.gather(waiter, return_exceptions=True)
        assert adm.in_flight == 2 and adm.tpm.tat == before
        for p in holders:
            await leave(p)
        assert adm.in_flight == 0

    run_virtual(go)


def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    async def go() -> None:
        adm = Admission(concurrency=1, adaptive=True)
        first = await enter(adm)
        a = asyncio.ensure_future(enter(adm))
        b = asyncio.ensure_future(enter(adm))
        await asyncio.sleep(0)
        await leave(first)  # wakes a ...
        a.cancel()  # ... which leaves before taking the slot
        await asyncio.gather(a, return_exceptions=True)
        await b  # so b gets it
        assert adm.in_flight == 1

    run_virtual(go)


def test_a_slot_freed_by_a_429_waits_out_its_pause() -> None:
    """Every slot taken, one attempt waiting for a slot; a 429 with a Retry-After frees one.
    The waiter sends only once the pause is over (it once sent at once: 59 requests in the
    15 ms after the first 429 at 20/s holding 5)."""
    async def go() -> None:
        adm = Admission(concurrency=2)
        loop = asyncio.get_running_loop()
        held = [await enter(adm) for _ in range(2)]
        waiter = asyncio.ensure_future(enter(adm))
        await asyncio.sleep(0)
        assert held[0].failed(refusal(RA_1)) == 1.0
        end = held[0].lane.pause_until
        await leave(held[0])
        permit = await waiter
        assert loop.time() >= end
        await leave(permit)
        await leave(held[1])

    run_virtual(go)


def test_the_slow_start_opens_by_the_clock_until_the_server_refuses() -> None:
    """Eight in flight at first; a slow server (no answer yet) still gets the ceiling within
    a few doublings of OPEN_EVERY, but once it has refused, only answers open the cap."""
    async def go() -> None:
        adm = Admission(concurrency=64, adaptive=True)
        held = [await enter(adm) for _ in range(START_IN_FLIGHT)]
        more = await asyncio.wait_for(enter(adm), timeout=40 * OPEN_EVERY)  # no answer came
        assert adm.cap > START_IN_FLIGHT
        for p in [*held, more]:
            await leave(p)

        refused = Admission(concurrency=64, adaptive=True)
        held = [await enter(refused) for _ in range(START_IN_FLIGHT)]
        held[0].failed(refusal({"Retry-After": "0"}))
        await leave(held[0])
        await enter(refused)  # the freed slot
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(enter(refused), timeout=6 * OPEN_EVERY)
        assert refused.cap == START_IN_FLIGHT

    run_virtual(go)


def test_once_every_lane_is_paced_the_cap_is_the_ceiling() -> None:
    """Paced, the pace governs: a worker that finds the slow start's cap full opens it to the
    ceiling, before any answer says how long answers take (grown by answers a second apart,
    the cap held a lane paced near 50/s to 16-30 in flight for seconds)."""
    async def go() -> None:
        adm = Admission(concurrency=64, adaptive=True)
        held = [await enter(adm) for _ in range(START_IN_FLIGHT)]
        held[0].ok({}, None, 0, None)
        await leave(held[0])
        held[1].failed(refusal(RA_1))  # a refusal after a success: the lane is paced
        await leave(held[1])
        assert adm.lane("m").rate is not None and adm.cap < adm.ceiling
        more = [await asyncio.wait_for(enter(adm), timeout=5.0) for _ in range(START_IN_FLIGHT)]
        assert adm.cap == adm.ceiling and adm.in_flight == 2 * START_IN_FLIGHT - 2
        for p in [*held[2:], *more]:
            await leave(p)

    run_virtual(go)


# -- lanes ---------------------------------------------------------------------------------

class _MillisecondLoop(VirtualLoop):
    """A loop whose clock counts whole milliseconds and says so, as uvloop's counts them, and
    whose timers fire as the clock reaches them (libuv's: the first moment of that
    millisecond), not a whole wait after the moment they were set."""

    def __init__(self) -> None:
        super().__init__()
        self._clock_resolution = 0.001
        select = self._virtual.select

        def on_the_clock(timeout: float | None = None) -> list[Any]:
            if timeout and timeout >= 0.001:  # a timer of whole ms: from the clock
                self._virtual.now = math.floor(self._virtual.now * 1000) / 1000
            return select(timeout)

        self._virtual.select = on_the_clock  # type: ignore[method-assign]

    def time(self) -> float:
        return math.floor(self._virtual.now * 1000 + 1e-9) / 1000


def test_a_pause_counted_on_a_coarse_clock_never_ends_inside_the_window() -> None:
    """uvloop's clock reads up to a millisecond behind: a Retry-After of 1 s read at 0.9 ms
    past a tick, paused to the tick + 1 s, ended 0.9 ms inside the server's window (one
    request in about ten runs of `halved` over real sockets). The pause is one step longer."""
    async def go(loop: _MillisecondLoop) -> tuple[float, float]:
        lane = make_lane(LaneKey("http://x", "m"), PaceConfig(), None, True, "")
        await asyncio.sleep(0.0005)
        while loop._virtual.now % 0.001 < 0.0009:
            await asyncio.sleep(0.0001)
        read = loop._virtual.now  # the refusal is read 0.9 ms past the clock's tick
        lane.pause(1.0, loop.time())
        await lane.wait_pause(loop)
        return read, loop._virtual.now

    loop = _MillisecondLoop()
    try:
        read, end = loop.run_until_complete(go(loop))
    finally:
        loop.close()
    assert loop.time() <= end and end >= read + 1.0, (read, end)


def test_a_refusal_pauses_and_paces_its_own_lane_only() -> None:
    """Two models: a Retry-After for one holds its requests for the whole pause and sets its
    pace; the other's requests go at once, unpaced, and may take the slots meanwhile."""
    async def go() -> None:
        adm = Admission(concurrency=4, adaptive=True)
        loop = asyncio.get_running_loop()
        a = await enter(adm, "a")
        a.ok({}, None, 0, None)
        await leave(a)
        a = await enter(adm, "a")
        a.failed(refusal(RA_1))
        await leave(a)
        start = loop.time()
        b = [await enter(adm, "b") for _ in range(4)]  # every slot, at once
        assert loop.time() == start
        assert adm.lane("b").rate is None and adm.lane("b").pause_until < start
        for p in b:
            await leave(p)
        a = await enter(adm, "a")
        assert loop.time() >= start + 1.0 - 1e-9  # the pause held "a" only
        await leave(a)
        assert adm.lane("a").rate is not None

    run_virtual(go)


def test_one_lane_for_the_account_when_the_scope_says_so() -> None:
    async def go() -> None:
        adm = Admission(concurrency=4, adaptive=True, scope="account")
        loop = asyncio.get_running_loop()
        a = await enter(adm, "a")
        a.failed(refusal(RA_1))
        await leave(a)
        start = loop.time()
        b = await enter(adm, "b")
        assert loop.time() >= start + 1.0 - 1e-9  # "b" waited out "a"'s pause
        await leave(b)
        assert adm.lane("a") is adm.lane("b")

    run_virtual(go)


def test_the_report_names_each_lane() -> None:
    async def go() -> dict[str, Any]:
        adm = Admission(concurrency=4, adaptive=True)
        for model in ("a", "b"):
            async with adm.permit(req(model)) as p:
                p.ok({}, None, 0, None)
        async with adm.permit(req("a")) as p:
            p.failed(refusal(RA_1))
        return adm.report()

    report = run_virtual(go)
    assert set(report["lanes"]) == {"a", "b"} and report["limit_scope"] == "model"
    assert report["lanes"]["a"]["refusals"] == 1 and report["lanes"]["b"]["refusals"] == 0
    assert report["refusals"] == 1


# -- stated limits -------------------------------------------------------------------------

def test_remaining_zero_holds_the_lane_until_reset() -> None:
    async def go() -> tuple[float, int, float]:
        adm = Admission(concurrency=4)
        loop = asyncio.get_running_loop()
        async with adm.permit(req()) as p:
            p.ok({}, None, 0, {"x-ratelimit-remaining-requests": "3",
                               "x-ratelimit-reset-requests": "20s"})
        lane = adm.lane("m")
        assert lane.holds == 0
        async with adm.permit(req()) as p:
            p.ok({}, None, 0, {"x-ratelimit-remaining-tokens": "0",
                               "x-ratelimit-reset-tokens": "6m0s"})
        return lane.pause_until - loop.time() - (lane.clock_step or 0.0), lane.holds, \
            lane.paused_seconds

    left, holds, paused = run_virtual(go)
    assert holds == 1 and paused == 0.0  # a header hold is not a 429 pause
    assert MAX_HOLD - 1 < left <= MAX_HOLD  # "6m0s" parsed, then capped (less the clock's step)


def test_a_long_retry_after_is_honoured_whole_while_a_hold_is_capped() -> None:
    """A Retry-After of 120 s is a window: nobody sends for 120 s (only one over 600 s is
    capped, where it is read). A hold (a reset header, no window announced) stops at
    MAX_HOLD."""
    async def go() -> tuple[float, float]:
        adm = Admission(concurrency=4)
        loop = asyncio.get_running_loop()
        async with adm.permit(req()) as p:
            p.failed(refusal({"Retry-After": "120"}))
        paused = adm.lane("m").pause_until - loop.time()
        async with adm.permit(req("h")) as p:
            p.ok({}, None, 0, {"x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": "10m"})
        h = adm.lane("h")
        return paused, h.pause_until - loop.time() - (h.clock_step or 0.0)

    paused, held = run_virtual(go)
    assert paused == pytest.approx(120.0)
    assert MAX_HOLD - 1 < held <= MAX_HOLD  # (less the loop clock's step)


def test_a_tokens_budget_in_debt_holds_the_lane_until_it_is_repaid() -> None:
    """A budget charged after the answer goes into debt, and `remaining` stops at 0: only
    `reset` shows how deep (18 s to full at 100 tokens/s, limit 1,000: 800 in debt). The
    lane's tokens bucket takes the server's level, so the next request waits the debt out
    (8 s and its own tokens) instead of the second `remaining: 0` alone would suggest."""
    async def go() -> float:
        adm = Admission(concurrency=4, adaptive=True)
        loop = asyncio.get_running_loop()
        async with adm.permit(req()) as p:  # half the budget used: the rate is 100/s
            p.ok({}, None, 50, {"x-ratelimit-limit-tokens": "1000",
                                "x-ratelimit-remaining-tokens": "500",
                                "x-ratelimit-reset-tokens": "5s"})
        async with adm.permit(req()) as p:
            p.ok({}, None, 50, {"x-ratelimit-limit-tokens": "1000",
                                "x-ratelimit-remaining-tokens": "0",
                                "x-ratelimit-reset-tokens": "18s"})
        start = loop.time()
        async with adm.permit(req()):
            return loop.time() - start

    waited = run_virtual(go)
    assert 8.0 <= waited <= 9.5


def test_x_ratelimit_headers_state_the_pace() -> None:
    """A server bucket of 10 refilling 50 a second, seen through its headers on answers a
    second apart: `reset` is the time until full, `remaining` a whole number. The pace
    follows the refill rate, just under it, though each answer's remaining alone would say
    anything from 45 to 100."""
    async def go() -> float | None:
        adm = Admission(concurrency=4, adaptive=True)
        loop = asyncio.get_running_loop()
        lane = adm.lane("m")
        tokens = 6.7
        for _ in range(6):
            headers = {"x-ratelimit-limit-requests": "10",
                       "x-ratelimit-remaining-requests": str(int(tokens)),
                       "x-ratelimit-reset-requests": f"{(10 - tokens) / 50 * 1000:.0f}ms"}
            lane.stated.consumed["requests"] += 48  # the rest of a second of answers
            lane.succeeded(loop.time(), loop.time() - 0.02, headers, 0)
            tokens = min(10.0, tokens + 50 - 49)
            await asyncio.sleep(1.0)
        return lane.rate

    pace = run_virtual(go)
    assert pace is not None and 0.95 * 50 <= pace <= 50


def test_fixed_rpm_keeps_its_pace_on_429() -> None:
    async def go() -> tuple[float | None, int]:
        adm = Admission(rpm=6000, concurrency=4, adaptive=False)
        async with adm.permit(req()) as p:
            p.failed(refusal())
        return adm.pace, adm.lane("m").controller.cuts

    assert run_virtual(go) == (100.0, 0)


def test_tokenize_lines_are_not_charged_output_tokens() -> None:
    from tmbatch.limits import DEFAULT_MAX_OUTPUT_TOKENS

    body = {"model": "m", "prompt": "x" * 400}
    assert estimate_tokens(body) == 101 + DEFAULT_MAX_OUTPUT_TOKENS
    assert estimate_tokens(body, generates=False) == 101


def test_ambiguous_503s_do_not_slow_the_run(serve: Any, tmp_path: Path) -> None:
    """A 503 without Retry-After is an ambiguous failure (the server may have done the work),
    not a rate-limit signal: the run records the lines and sets no pace."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = serve(app)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(12)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", server.url(),
                 "-q", "--no-preflight", "-c", "4"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert p.returncode == 1, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert not res and len(fail) == 12
    assert {f["error"]["class"] for f in fail.values()} == {"ambiguous"}
    adm = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())["this_run"]["admission"]
    assert adm["mode"] == "adaptive" and adm["pace_cuts"] == 0
    assert adm["pace_requests_per_second"] is None and adm["refusals"] == 0


# -- end to end ------------------------------------------------------------------------------

def _run(sim: Any, inp: Path, out: Path, *args: str) -> Any:
    return run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q",
                    "--no-preflight", *args],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))


def test_adaptive_run_against_a_rate_limited_server(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY, rate_limit=20, latency=0.05, ratelimit_headers=True)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(100)])
    p = _run(sim, inp, tmp_path / "out", "--concurrency", "32")
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert len(res) == 100 and not fail
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    adm = summary["this_run"]["admission"]
    assert adm["mode"] == "adaptive" and adm["concurrency_ceiling"] == 32
    stats = sim.stats()
    assert stats["duplicates"] == 0 and stats["retry_after_violations"] == 0
    # the pace comes from the x-ratelimit headers (20/s); the only 429s are the first
    # second's, before a second of headers has been seen
    assert adm["pace_source"] == "stated by x-ratelimit headers", adm
    assert 15 < adm["pace_requests_per_second"] <= 20, adm
    assert stats["rejected_429"] <= 25, (stats["rejected_429"], adm)


def test_fixed_rpm_run_reports_fixed_mode(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    p = _run(sim, inp, tmp_path / "out", "--rpm", "60000", "--tpm", "1000000")
    assert p.returncode == 0, p.stderr
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    adm = summary["this_run"]["admission"]
    assert adm["mode"] == "fixed" and adm["tpm_target"] == 1_000_000
    assert 0 < adm["usage_to_estimate_ratio"] < 1  # max_tokens 16 > the short answers


def test_no_adaptive_keeps_the_run_unpaced_under_429s(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY, rate_limit=20, latency=0.05)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(40)])
    p = _run(sim, inp, tmp_path / "out", "--concurrency", "32", "--no-adaptive",
             "--max-retries", "20")
    assert p.returncode == 0, p.stderr
    adm = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())["this_run"]["admission"]
    assert adm["mode"] == "fixed" and adm["pace_requests_per_second"] is None
    assert "pace_cuts" not in adm
    assert sim.stats()["rejected_429"] > 0 and sim.stats()["duplicates"] == 0


# Each way a real server limits a client, over real sockets (the simulator): whatever the
# style, every line is answered, none twice, nothing inside an announced window, and the pace
# is learnt from what the server did. How close to the limit it gets is a figure for
# bench/adaptive_bench.py, not an assertion here.
LIMIT_STYLES = {
    "retry-after seconds": {"rate_limit": 20, "rate_burst": 4},
    "retry-after-ms": {"rate_limit": 20, "rate_burst": 4, "retry_after_format": "ms"},
    "retry-after date": {"rate_limit": 20, "rate_burst": 4, "retry_after_format": "http-date"},
    "llm_provider-retry-after": {"rate_limit": 20, "rate_burst": 4,
                                 "retry_after_format": "llm-provider"},
    "no hint": {"rate_limit": 20, "rate_burst": 4, "retry_after_format": "none"},
    "fixed window, no hint": {"window_limit": 8, "window_seconds": 1.0,
                              "retry_after_format": "none"},
}


@pytest.mark.parametrize("style", list(LIMIT_STYLES))
def test_a_learnt_pace_against_each_limit_style(style: str, sim_factory: Any,
                                                  tmp_path: Path) -> None:
    # a request sent after a 429 came back arrives inside its window: the simulator's default
    # 10 ms of grace covers only what crossed the 429 on the wire (a quarter second hid a bug)
    sim = sim_factory(api_key=API_KEY, latency=0.01, **LIMIT_STYLES[style])
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(50)])
    p = _run(sim, inp, tmp_path / "out", "--concurrency", "32", "--max-retries", "2")
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert len(res) == 50 and not fail  # refusals are retried past --max-retries
    stats = sim.stats()
    assert stats["duplicates"] == 0 and stats["retry_after_violations"] == 0
    assert stats["rejected_429"] > 0  # the limit was met ...
    adm = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())["this_run"]["admission"]
    assert adm["refusals"] == stats["rejected_429"]
    assert adm["pace_cuts"] >= 1  # ... and learnt: a pace, or a window's allowance
    if "window_limit" in LIMIT_STYLES[style]:  # sent at each opening, unpaced
        assert adm["window_allowance"] == 8 and adm["pace_requests_per_second"] is None, adm
    else:
        assert adm["pace_requests_per_second"] is not None and adm["window_allowance"] is None
    # an unpaced run meets one refusal per request or so; a paced one far fewer
    assert stats["rejected_429"] < 50, (stats["rejected_429"], adm)


def test_nothing_is_sent_inside_the_first_volleys_window(sim_factory: Any,
                                                       tmp_path: Path) -> None:
    """Real sockets: a bucket of 5 refuses most of the first volley at once, while its
    successes take 200 ms. A slot a 429 frees must wait out the Retry-After like every other
    (the waiters took them and sent at once, each refusal freeing the next, until the first
    success set a pace: the simulator counted them inside the window)."""
    # 5 ms of grace: only the first eight were on the wire when the first 429 left
    sim = sim_factory(api_key=API_KEY, latency=0.2, rate_limit=20, rate_burst=5, grace=0.005)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(40)])
    p = _run(sim, inp, tmp_path / "out", "--concurrency", "32")
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert len(res) == 40 and not fail
    stats = sim.stats()
    assert stats["rejected_429"] > 0 and stats["retry_after_violations"] == 0, stats


def test_a_server_that_refuses_everything_is_held_off_not_probed(sim_factory: Any,
                                                                  tmp_path: Path) -> None:
    """A window of 5 per 3 s, granted at its start, bare 429s after: once the pace is set and
    nothing gets through, every worker holds (a header-less refusal cannot say for how long)
    instead of sending at the pace into a closed window."""
    sim = sim_factory(api_key=API_KEY, latency=0.01, window_limit=5, window_seconds=3.0,
                      retry_after_format="none")
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(15)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", sim.url,
                 "--no-preflight", "--concurrency", "8", "--log-format", "json"],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert p.returncode == 0, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert len(res) == 15 and not fail
    events = [orjson.loads(x) for x in p.stderr.splitlines() if x.startswith("{")]
    holds = [e for e in events if e.get("event") == "rate_limit_hold"]
    assert holds and "every request refused" in holds[0]["msg"], p.stderr[-3000:]
    adm = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())["this_run"]["admission"]
    assert adm["header_holds"] >= 1
    # 15 lines in 3 windows: the first volley is refused, then a handful at each closed window
    assert sim.stats()["rejected_429"] < 30, sim.stats()["rejected_429"]


