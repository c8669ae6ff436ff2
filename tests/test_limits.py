"""Admission: token budgets that learn from usage, rate-limit headers, and the AIMD gate.

Rates are checked in virtual time (the bucket is pure arithmetic given `now`) or by counting
events, never with a wall clock: real-time figures are in bench/limits_bench.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, chat_line, clean_env, outcomes, run_cli, write_jsonl
from tmbatch.limits import (
    MAX_HOLD,
    START_IN_FLIGHT,
    Admission,
    TokenBucket,
    estimate_tokens,
    parse_duration,
)
from tmbatch.pacing import CALM, EVENT_GAP
from tmbatch.safety import classify_status


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


# -- the token bucket in virtual time --------------------------------------------------------

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


# -- Admission: learning, refunds, headers, AIMD ---------------------------------------------

def test_admission_learns_the_usage_ratio_and_charges_it() -> None:
    async def go() -> tuple[float, float]:
        adm = Admission(tpm=1e9, concurrency=4)
        for _ in range(300):
            ticket = await adm.admit(100)
            ticket.succeeded(None, 300)
            ticket.release()
        ticket = await adm.admit(100)
        return adm.ratio, ticket.charged

    ratio, charged = asyncio.run(go())
    assert ratio == pytest.approx(3.0, rel=0.01)
    assert charged == pytest.approx(300, rel=0.01)


def test_a_rejected_attempt_is_refunded() -> None:
    async def go() -> float:
        adm = Admission(tpm=60.0, concurrency=4)  # 1 token/s: a booking moves tat by 1 s
        assert adm.tpm is not None
        ticket = await adm.admit(1)
        booked = adm.tpm.tat
        ticket.failed(classify_status(429, {}, None, None))
        return booked - adm.tpm.tat

    assert asyncio.run(go()) == pytest.approx(1.0)  # the one token came back


@pytest.mark.parametrize("status,headers,refunded", [
    (408, {}, True),  # rejected: nothing generated, the token comes back
    (503, {"Retry-After": "1"}, True),  # rejected
    (503, {}, False),  # ambiguous: the server may have generated it, so it stays charged
    (500, {}, False),
])
def test_refund_follows_the_class_of_the_answer(status: int, headers: dict[str, str],
                                                refunded: bool) -> None:
    """Admission and the safety table must agree on what a status means: a 503 without
    Retry-After is ambiguous there, so it is not "nothing was generated" here either."""
    async def go() -> float:
        adm = Admission(tpm=60.0, concurrency=4)
        assert adm.tpm is not None
        ticket = await adm.admit(1)
        booked = adm.tpm.tat
        ticket.failed(classify_status(status, headers, None, None))
        return booked - adm.tpm.tat

    assert asyncio.run(go()) == pytest.approx(1.0 if refunded else 0.0)


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


def test_remaining_zero_holds_every_worker_until_reset() -> None:
    async def go() -> tuple[float, int, float]:
        adm = Admission(concurrency=4)
        loop = asyncio.get_running_loop()
        (await adm.admit(1)).succeeded({"x-ratelimit-remaining-requests": "3",
                                        "x-ratelimit-reset-requests": "20s"}, 0)
        assert adm.holds == 0
        (await adm.admit(1)).succeeded({"x-ratelimit-remaining-tokens": "0",
                                        "x-ratelimit-reset-tokens": "6m0s"}, 0)
        return adm.pause_until - loop.time(), adm.holds, adm.paused_seconds

    left, holds, paused = asyncio.run(go())
    assert holds == 1 and paused == 0.0  # a header hold is not a 429 pause
    assert MAX_HOLD - 1 < left <= MAX_HOLD  # "6m0s" parsed, then capped


def test_a_refusal_sets_a_pace_once_per_event_and_successes_raise_it() -> None:
    """The first refusal paces the run at what got through; refusals of requests sent before
    that cut are the same event; each success then ramps the pace up. After a later cut,
    growth waits until refusals have been quiet for CALM seconds."""
    async def go() -> None:
        adm = Admission(concurrency=10, adaptive=True)
        rejected = classify_status(429, {}, None, None)
        first = [await adm.admit(1) for _ in range(START_IN_FLIGHT)]
        assert adm.pace is None  # unpaced until the server says otherwise
        for ticket in first[:4]:
            ticket.succeeded({}, 0)
            ticket.release()
        for ticket in first[4:]:
            ticket.failed(rejected)  # one event: all sent before the cut
            ticket.release()
        assert adm.learner.cuts == 1
        pace = adm.pace
        assert pace is not None and 0 < pace <= 4  # what got through in the last second
        more = await adm.admit(1)
        more.succeeded({}, 0)
        more.release()
        assert adm.pace is not None and adm.pace > pace  # the ramp
        loop = asyncio.get_running_loop()
        until = loop.time() + EVENT_GAP + 0.05
        while loop.time() < until:  # successes at the pace, then a new event: a second cut
            ok = await adm.admit(1)
            ok.succeeded({}, 0)
            ok.release()
        refused = await adm.admit(1)
        refused.failed(rejected)
        refused.release()
        assert adm.learner.cuts == 2
        cut = adm.pace
        soon = await adm.admit(1)
        soon.succeeded({}, 0)
        soon.release()
        assert adm.pace == cut  # still being refused: no reason to speed up yet
        await asyncio.sleep(CALM + 0.05)
        later = await adm.admit(1)
        later.succeeded({}, 0)
        later.release()
        assert cut is not None and adm.pace is not None and adm.pace > cut

    asyncio.run(go())


def test_a_pace_spaces_the_attempts_and_a_pause_moves_them() -> None:
    """GCRA in virtual time: at 10 requests/s the bookings are 0.1 s apart after the burst,
    and a Retry-After pause restarts them at its end without a saved-up burst."""
    from tmbatch.pacing import Pacer

    p = Pacer(10.0)
    waits = [p.book(0.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    p.restart_at(10.0)
    assert p.book(10.0) == pytest.approx(0.0)
    assert p.book(10.0) == pytest.approx(0.1)


def test_a_pause_may_end_with_the_burst_its_refill_allows() -> None:
    """Virtual time: a pause that refilled the server's bucket ends with that many slots at
    once, then the pace; a credit given back by a worker that stopped is there for the next;
    a burst no bigger than the pace's own changes nothing."""
    from tmbatch.pacing import Pacer

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
    q = Pacer(10.0)
    q.restart_at(10.0, burst=1)
    assert [q.book(10.0) for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])


def test_the_resume_burst_is_a_share_of_the_first_volley_and_what_the_pace_refilled() -> None:
    """What a Retry-After pause's end may send at once: nothing before the first cut, with
    --rpm, with a limit the headers state, or once a burst met a refusal; else the refill at
    the learnt pace, at most RESUME_SHARE of what the first volley got through (the server's
    burst; less what refilled while the volley was sent, a hundredth of a request here)."""
    from tmbatch.pacing import RESUME_SHARE, Pacer, RateLearner

    learner = RateLearner(Pacer(), learn=True)
    assert learner.paused(1.0, until=1.0) == 0  # nothing learnt yet
    for i in range(10):
        learner.success(0.01 + i / 1000, sent_at=0.0)
    learner.refused(0.03, sent_at=0.001, pause=1.0)  # the first cut: 10 got through
    learner.success(0.031, sent_at=0.002)  # the rest of its volley: 11 in all
    assert learner.volley == 11
    assert learner.rate is not None
    assert learner.paused(1.0, until=1.03) == int(min(RESUME_SHARE * 11, learner.rate))
    # a short pause refills less
    assert learner.paused(0.2, until=1.03) == int(learner.rate * 0.2)
    learner.refused(1.5, sent_at=1.2, pause=1.0)  # a paced request refused: bursts go on
    assert learner.paused(1.0, until=2.5) > 1
    learner.refused(2.6, sent_at=2.52, pause=1.0)  # one of that burst refused ...
    assert learner.paused(1.0, until=3.6) == 0  # ... the pace overstated the refill
    hinted = RateLearner(Pacer(), learn=True)
    for i in range(10):
        hinted.success(0.01 + i / 1000, sent_at=0.0)
    hinted.refused(0.03, sent_at=0.001, pause=1.0)
    hinted.hint(50.0)
    assert hinted.paused(1.0, until=1.03) == 0  # stated: the headers' remaining governs
    fixed = RateLearner(Pacer(20.0), learn=False)
    fixed.refused(1.0, sent_at=0.5, pause=1.0)
    assert fixed.paused(1.0, until=2.0) == 0


def test_a_retry_after_pause_ends_with_the_learnt_burst_not_one_by_one() -> None:
    """Real loop time: after the first volley (6 through, 2 refused with Retry-After 1 s) the
    run waits the second out, then sends what the bucket refilled at once and paces the
    rest: the admissions after the pause are at the same instant, then an interval apart."""
    async def go() -> None:
        adm = Admission(concurrency=16, adaptive=True)
        loop = asyncio.get_running_loop()
        volley = [await adm.admit(1) for _ in range(START_IN_FLIGHT)]
        for ticket in volley[:6]:
            ticket.succeeded({}, 0)
            ticket.release()
        refusal = classify_status(429, {"Retry-After": "1"}, None, None)
        assert volley[6].failed(refusal) == 1.0
        for ticket in volley[6:]:
            ticket.release()
        end = adm.pause_until
        burst = adm.pacer.credit + 1  # what the pause's end may send at once
        assert burst >= 3  # min(0.8 x 6, pace 5.1/s x 1 s)
        times = []
        for _ in range(burst + 2):
            ticket = await adm.admit(1)
            times.append(loop.time())
            ticket.release()
        assert times[0] >= end  # nothing inside the window
        interval = 1.0 / adm.pace  # type: ignore[operator]
        assert times[burst - 1] - times[0] < interval / 2  # the burst, at once (no pacing)
        assert times[burst] - times[burst - 1] >= 0.9 * interval  # then the pace
        assert times[burst + 1] - times[burst] >= 0.9 * interval

    asyncio.run(go())


def _paced_against_a_bucket(rate: float, burst: int, seconds: float) -> list[float]:
    """Virtual time, no sockets: a learner paces sends against a token bucket of `rate` a
    second holding `burst` (20 ms to a success, 1 ms to a 429 with a whole-second
    Retry-After, honoured as Admission does: the pause, then its burst, then the pace),
    after an unpaced first volley of 20. The pace after each cut."""
    import heapq

    from tmbatch.pacing import Pacer, RateLearner

    pacer = Pacer()
    learner = RateLearner(pacer, learn=True)
    tokens, last, pause_until = float(burst), 0.0, 0.0
    answers: list[tuple[float, float, bool]] = []
    cuts: list[float] = []

    def send(at: float) -> None:
        nonlocal tokens, last
        tokens, last = min(burst, tokens + (at - last) * rate), at
        ok = tokens >= 1
        tokens -= ok
        heapq.heappush(answers, (at + (0.02 if ok else 0.001), at, ok))

    for i in range(20):
        send(i * 0.0015)
    now = 0.0
    while now < seconds:
        while answers and answers[0][0] <= now:
            at, sent, ok = heapq.heappop(answers)
            if ok:
                learner.success(at, sent)
                continue
            before = learner.cuts
            learner.refused(at, sent, 1.0)
            if learner.cuts > before:
                cuts.append(learner.rate)  # type: ignore[arg-type]
            if at + 1.0 > pause_until:
                pause_until = at + 1.0
                pacer.restart_at(pause_until, learner.paused(1.0, pause_until))
        if now < pause_until or pacer.rate is None:
            now = max(pause_until, answers[0][0] if answers else now + 0.01)
            continue
        wait = pacer.book(now)
        if answers and answers[0][0] < now + wait:
            pacer.unbook()  # an answer first: it may change the pace, or pause
            now = answers[0][0]
            continue
        now += wait
        send(now)
    return cuts


@pytest.mark.parametrize("rate,burst", [(50, 10), (20, 5), (100, 10)])
def test_the_second_cut_paces_at_the_rate_the_drained_bucket_showed(rate: int,
                                                                    burst: int) -> None:
    """The first volley shows the bucket's burst, the ramp after the pause drains it: the
    second cut paces within 4 % under the rate and not over it, and so does any later one (a
    probe that found the limit again). What got through in the last second was 4-5 % under
    at 50/s holding 10; and a refusal that came back before the pause's burst had answered
    once read as a closed window: the pace fell to what got through since the first success
    (a third of the limit at 100/s)."""
    cuts = _paced_against_a_bucket(rate, burst, 30.0)
    assert len(cuts) >= 2, cuts
    assert all(0.96 * rate <= cut <= rate for cut in cuts[1:]), cuts


def test_a_refusal_of_a_pauses_burst_ends_the_bursts_but_does_not_cut_the_pace() -> None:
    """The burst at a pause's end emptied the bucket, not the pace: no more bursts, and the
    pace stays (at 100/s holding 10, pacing at 95/s, the request after the burst was refused
    and the cut took the pace to 37/s for the rest of the run)."""
    from tmbatch.pacing import Pacer, RateLearner

    learner = RateLearner(Pacer(), learn=True)
    for i in range(10):
        learner.success(0.02 + i / 1000, sent_at=0.001 * i)
    learner.refused(0.03, sent_at=0.011, pause=1.0)  # the first cut
    assert learner.paused(1.0, until=1.03) > 1
    pace = learner.rate
    assert learner.refused(1.04, sent_at=1.035, pause=1.0) is None  # just after the burst
    assert learner.rate == pace and learner.cuts == 1
    assert learner.paused(1.0, until=2.04) == 0


def test_a_slot_freed_by_a_429_waits_out_its_pause() -> None:
    """Real loop time: every slot taken, one attempt waiting for a slot; a 429 with a
    Retry-After frees one. The waiter gets the slot but sends only once the pause is over
    (it sent at once: 59 requests in the 15 ms after the first 429 at 20/s holding 5)."""
    async def go() -> None:
        adm = Admission(concurrency=2)
        loop = asyncio.get_running_loop()
        held = [await adm.admit(1) for _ in range(2)]
        waiter = asyncio.ensure_future(adm.admit(1))
        await asyncio.sleep(0)
        assert held[0].failed(classify_status(429, {"Retry-After": "1"}, None, None)) == 1.0
        end = adm.pause_until
        held[0].release()
        done, _ = await asyncio.wait({waiter}, timeout=0.3)
        assert not done  # inside the pause
        ticket = await waiter
        assert loop.time() >= end
        ticket.release()
        held[1].release()

    asyncio.run(go())


def test_x_ratelimit_headers_state_the_pace() -> None:
    """A server bucket of 10 refilling 50 a second, seen through its headers on answers a
    second apart (virtual time): `reset` is the time until full, `remaining` a whole number.
    The pace follows the refill rate, just under it, though each answer's remaining alone
    would say anything from 45 to 100."""
    adm = Admission(concurrency=4, adaptive=True)
    rate, tokens, now = 50.0, 6.7, 0.0
    for _ in range(6):
        headers = {"x-ratelimit-limit-requests": "10",
                   "x-ratelimit-remaining-requests": str(int(tokens)),
                   "x-ratelimit-reset-requests": f"{(10 - tokens) / rate * 1000:.0f}ms"}
        adm._from_headers(headers, now)
        sent = 49  # a second of answers: the bucket refilled 50, 49 were taken
        adm._consumed["requests"] += sent
        tokens = min(10.0, tokens + rate * 1.0 - sent)
        now += 1.0
    assert adm.pace is not None and 0.95 * rate <= adm.pace <= rate


def test_fixed_rpm_keeps_its_pace_on_429() -> None:
    async def go() -> tuple[float | None, int]:
        adm = Admission(rpm=6000, concurrency=4, adaptive=False)
        ticket = await adm.admit(1)
        ticket.failed(classify_status(429, {}, None, None))
        return adm.pace, adm.learner.cuts

    assert asyncio.run(go()) == (100.0, 0)


def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    async def go() -> None:
        adm = Admission(concurrency=1, adaptive=True)
        first = await adm.admit(1)
        a = asyncio.ensure_future(adm.admit(1))
        b = asyncio.ensure_future(adm.admit(1))
        await asyncio.sleep(0)
        first.release()  # wakes a ...
        a.cancel()  # ... which leaves before taking the slot
        await asyncio.gather(a, return_exceptions=True)
        await b  # so b gets it
        assert adm.in_flight == 1

    asyncio.run(go())


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


def test_tokenize_lines_are_not_charged_output_tokens() -> None:
    from tmbatch.limits import DEFAULT_MAX_OUTPUT_TOKENS, estimate_tokens

    body = {"model": "m", "prompt": "x" * 400}
    assert estimate_tokens(body) == 101 + DEFAULT_MAX_OUTPUT_TOKENS
    assert estimate_tokens(body, generates=False) == 101


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
    # a request sent after a 429 came back arrives inside its window: 20 ms of grace covers
    # only what was already on the wire (the default quarter second hid a bug)
    sim = sim_factory(api_key=API_KEY, latency=0.01, grace=0.02, **LIMIT_STYLES[style])
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
    assert adm["pace_cuts"] >= 1 and adm["pace_requests_per_second"] is not None  # ... learnt
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


def test_the_slow_start_opens_by_the_clock_until_the_server_refuses() -> None:
    """Eight in flight at first; a slow server (no answer yet) still gets the ceiling within
    a few doublings of OPEN_EVERY, but once it has refused, only answers open the cap."""
    from tmbatch.limits import OPEN_EVERY

    async def go() -> None:
        adm = Admission(concurrency=64, adaptive=True)
        held = [await adm.admit(1) for _ in range(START_IN_FLIGHT)]
        assert adm.admit_now(1) is None  # the cap is reached: this one would wait
        more = await asyncio.wait_for(adm.admit(1), timeout=40 * OPEN_EVERY)  # no answer came
        assert adm.cap > START_IN_FLIGHT
        for t in [*held, more]:
            t.release()

        refused = Admission(concurrency=64, adaptive=True)
        held = [await refused.admit(1) for _ in range(START_IN_FLIGHT)]
        held[0].failed(classify_status(429, {"Retry-After": "0"}, None, None))
        held[0].release()
        await refused.admit(1)  # the freed slot
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(refused.admit(1), timeout=6 * OPEN_EVERY)
        assert refused.cap == START_IN_FLIGHT

    asyncio.run(go())


def _learner_at_the_limit(pause_cost: float) -> Any:
    """A learner that has found a limit of 50/s before (its third cut is behind it) and has
    been sending at 49.5/s for five seconds since: virtual time, no sockets."""
    from tmbatch.pacing import Pacer, RateLearner

    learner = RateLearner(Pacer(49.5), learn=True)
    learner.cuts, learner.refused_at, learner.pause_cost = 3, 50.0, pause_cost
    learner.first_accepted = 0.0
    for i in range(int(5 * 49.5)):
        learner.accepted_long.append(i / 49.5)
        if i / 49.5 >= 4.0:
            learner.accepted.append(i / 49.5)
    return learner


def test_a_probe_grows_slower_when_a_refusal_costs_a_pause() -> None:
    """Near the limit, a probe that meets it again costs every worker the pause the refusal
    announces: a whole-second Retry-After makes the probe slower, a millisecond one does not."""
    cheap, costly = _learner_at_the_limit(0.02), _learner_at_the_limit(1.0)
    cheap.success(5.0, sent_at=4.98)
    costly.success(5.0, sent_at=4.98)
    assert cheap.rate is not None and costly.rate is not None
    assert 49.5 < costly.rate < cheap.rate
    assert (cheap.rate - 49.5) > 3 * (costly.rate - 49.5)


def test_a_probe_that_finds_the_limit_again_is_cut_shallow() -> None:
    """The pace had found the limit before and crept up to it: what got through over the last
    five seconds is the limit, so the cut is 3 %, not the 15 % of a first measure."""
    learner = _learner_at_the_limit(0.0)
    learner.refused(5.0, 5.0)
    assert learner.rate == pytest.approx(49.5 * 0.97, rel=0.01)


def test_the_slow_start_clock_does_not_double_on_top_of_fast_answers() -> None:
    """A fast server's answers open the cap as they come (one more per second answer); the
    clock doubling on top of that would send a volley bigger than any the server answered
    (against a window of 20 it made 31 refusals at once instead of about ten)."""
    from tmbatch.limits import OPEN_EVERY

    async def go() -> None:
        adm = Admission(concurrency=64, adaptive=True)
        held = [await adm.admit(1) for _ in range(START_IN_FLIGHT)]
        waiting = asyncio.ensure_future(adm.admit(1))  # starts the clock
        await asyncio.sleep(0)
        for t in held:  # every answer back within the tick
            t.succeeded(None, 0)
            t.release()
        await asyncio.sleep(1.5 * OPEN_EVERY)
        assert adm.cap == START_IN_FLIGHT + START_IN_FLIGHT // 2  # answers, not the clock
        (await waiting).release()

    asyncio.run(go())


def test_answers_sent_before_a_cut_do_not_grow_the_new_pace() -> None:
    """The answers of the volley a refusal cut off still arrive after the cut: they complete
    the first cut's measure of what got through, but do not ramp the new pace up, and after
    a later cut they change nothing (the cut's own clock tick counts as before it: uvloop's
    clock ticks in milliseconds)."""
    from tmbatch.pacing import ACCEPTED_MARGIN, Pacer, RateLearner

    learner = RateLearner(Pacer(), learn=True)
    for i in range(10):
        learner.success(0.01 + i * 0.001, sent_at=0.0)
    learner.refused(0.03, sent_at=0.01)  # the first cut: the pace is what got through
    assert learner.rate == pytest.approx(ACCEPTED_MARGIN * 10)
    learner.success(0.031, sent_at=0.02)  # sent before the cut
    learner.success(0.032, sent_at=0.03)  # sent in the cut's own clock tick
    assert learner.rate == pytest.approx(ACCEPTED_MARGIN * 12)  # measured, not ramped
    learner.success(0.2, sent_at=0.15)  # sent at the new pace: the ramp starts
    ramped = learner.rate
    assert ramped > ACCEPTED_MARGIN * 12

    learner.refused(2.0, sent_at=1.9)  # the end of the ramp: a second cut
    second = learner.rate
    assert second is not None and second < ramped
    learner.success(2.01, sent_at=1.95)
    learner.success(2.02, sent_at=2.0)
    assert learner.rate == second


def test_two_refusals_after_a_cut_with_nothing_through_hold_every_worker() -> None:
    """A window granted at its start and closed since: once two requests sent at the new
    pace are refused and none got through, the run holds instead of probing on (one alone
    may still meet the bucket the volley before the cut emptied)."""
    from tmbatch.pacing import Pacer, RateLearner

    learner = RateLearner(Pacer(), learn=True)
    for i in range(20):
        learner.success(0.01 + i * 0.001, sent_at=0.0)
    assert learner.refused(0.04, sent_at=0.02) is None  # the first cut: a pace, no hold
    assert learner.rate is not None and learner.cuts == 1
    assert learner.refused(0.10, sent_at=0.06) is None  # one refusal at the new pace
    assert learner.refused(0.16, sent_at=0.12) == 1.0  # two, nothing through: hold 1 s
    assert learner.cuts == 2

    bucket = RateLearner(Pacer(), learn=True)  # the same, but the second one got through
    for i in range(20):
        bucket.success(0.01 + i * 0.001, sent_at=0.0)
    bucket.refused(0.04, sent_at=0.02)
    assert bucket.refused(0.10, sent_at=0.06) is None
    bucket.success(0.18, sent_at=0.12)
    assert bucket.refused(0.24, sent_at=0.2) is None and bucket.cuts == 1


def test_a_closed_window_is_paced_at_what_got_through_since_the_first_success() -> None:
    """Nothing gets through: the cut is what got through since the first success, even
    below half the old pace (20 granted at the start of a window, then nothing for 3 s: the
    window's rate is far under the 17/s its first second suggested)."""
    from tmbatch.pacing import ACCEPTED_MARGIN, Pacer, RateLearner

    learner = RateLearner(Pacer(), learn=True)
    for i in range(20):
        learner.success(0.01 + i * 0.001, sent_at=0.0)
    learner.refused(0.04, sent_at=0.02)
    learner.refused(0.10, sent_at=0.06)
    assert learner.refused(0.16, sent_at=0.12) == 1.0  # closed: hold
    before = learner.rate
    assert before is not None
    assert learner.refused(3.3, sent_at=3.2) == 2.0  # still closed after the hold
    assert learner.rate == pytest.approx(ACCEPTED_MARGIN * 20 / 3.3, rel=0.01)
    assert learner.rate < before / 2


def test_a_window_longer_than_five_seconds_is_paced_at_its_grant_not_the_floor() -> None:
    """A window of 30 per 15 s (LiteLLM's are per minute) granted at once, then closed for
    longer than the five seconds the usual measure looks back: the run is still paced at
    about what the window granted so far (30 in 7.4 s), not at one request in 20 s (what
    got through over the last five seconds is nothing, and the pace stayed at that floor)."""
    from tmbatch.pacing import ACCEPTED_MARGIN, MIN_RATE, Pacer, RateLearner

    learner = RateLearner(Pacer(), learn=True)
    for i in range(30):
        learner.success(0.02 + i * 0.001, sent_at=0.0)
    learner.refused(0.05, sent_at=0.01)  # the first volley's end: the first cut
    for t in (0.4, 1.4, 3.4, 7.4):  # each hold's probes refused, nothing through
        learner.refused(t, sent_at=t - 0.02)
        learner.refused(t + 0.001, sent_at=t - 0.01)
    assert learner.rate is not None
    assert ACCEPTED_MARGIN * 30 / 7.4 <= learner.rate <= 30 / 7.4
    assert learner.rate > 40 * MIN_RATE

