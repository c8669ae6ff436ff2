"""The pace's rules (tmbatch/limits/controller.py), each a named test, in virtual time.

Runs go through the real attempt loop, admission and controller against the simulator's own
limits (`tmbatch.sim.virtual`): no sockets, no wall clock, the same seed the same run. The
scenario matrix (test_matrix.py) holds the figures; these hold the rules on servers built
for each."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import pytest

from tmbatch.limits import fleet
from tmbatch.limits.controller import Answer, Controller, PaceConfig
from tmbatch.limits.evidence import Evidence, wilson
from tmbatch.limits.lanes import Lane, LaneKey, make_lane
from tmbatch.limits.plateau import Plateau
from tmbatch.limits.probation import Probation, Trial
from tmbatch.limits.schedule import Pacer
from tmbatch.limits.verdicts import STALE, STALE_AT, Verdicts
from tmbatch.limits.windows import Windows
from tmbatch.sim.limits import RequestBucket
from tmbatch.sim.scenarios import BY_NAME, Band, Scenario
from tmbatch.sim.virtual import RowResult, run_row, run_virtual

BUCKET = BY_NAME["bucket-seconds"]


def row(base: Scenario, name: str, lines: int | None = None, **server: Any) -> Scenario:
    return replace(base, name=name, server={**base.server, **server},
                   lines=lines or base.lines, band=Band(0.0, 1.0, base.band.rejected))


def by_share(sc: Scenario, seeds: int) -> list[RowResult]:
    """The row's runs on seeds 0..seeds-1, lowest share first (the median is the middle)."""
    return sorted((run_row(sc, seed) for seed in range(seeds)), key=lambda r: r.share)


def lane(r: RowResult, model: str = "tm-small") -> dict[str, Any]:
    return r.lanes[model]


@pytest.mark.parametrize("fmt", ["seconds", "ms", "llm-provider", "http-date"])
@pytest.mark.parametrize("base", ["bucket-seconds", "random-10-seconds", "two-models"])
def test_every_window_is_honoured_by_every_worker_of_its_lane(fmt: str, base: str) -> None:
    """64 workers (16 for random refusals), each hint's spelling: no request of a lane is
    sent inside a window announced to that lane, from the moment the refusal came back."""
    for seed in range(2):
        r = run_row(row(BY_NAME[base], f"{base}-{fmt}", lines=300, retry_after_format=fmt),
                    seed)
        assert r.refused > 0 and r.violations == 0, r.line()


def test_a_window_for_one_model_does_not_hold_another() -> None:
    """Two models limited on their own: each lane pauses for its own refusals only, so both
    run near their own limit (a shared pause gave 73 % of the sum)."""
    r = run_row(BY_NAME["two-models"], 0)
    assert r.violations == 0 and r.share >= 0.85, r.line()
    assert all(lane(r, m)["pauses"] >= 1 for m in ("tm-small", "tm-large"))


@pytest.mark.parametrize("fmt", ["seconds", "none"])
def test_refusals_at_random_leave_the_pace_where_successes_put_it(fmt: str) -> None:
    """10 % refused at random, whatever the pace: the cuts the first refusals made are
    undone once refusals come at the same share at the lower pace, and the lane ends well
    above the rate the first cut found (a run whose refusals happened to thin out after a
    cut keeps it a while, as a limit would: it is probing back up by the end), with a noise
    floor, and the median run no slower than pausing for each refusal; a token bucket's
    refusals keep their cut."""
    random = row(BY_NAME["random-10-seconds"], "random", lines=400, retry_after_format=fmt)
    ends, shares = [], []
    for seed in range(8):
        r = run_row(random, seed)
        end = lane(r)
        assert end["noise_share"] > 0, r.line()
        ends.append(end["pace_requests_per_second"] or math.inf)
        shares.append(r.share)
    # one run in eight may end under 50/s: a run whose very first request is refused starts
    # from a volley of eight (rule 1) and climbs through refusals a second apart (one of
    # sixteen seeds, with `seconds`, before verdicts came in and after, a different one)
    assert sorted(ends)[1] > 50 and sorted(ends)[2] > 100, ends
    assert sorted(shares)[3] >= 1.0, shares
    bucket = run_row(row(BUCKET, "bucket", retry_after_format=fmt), 0)
    # kept: near the limit of 50/s (a probe above it may be under way), far from full speed
    assert lane(bucket)["noise_share"] == 0 and bucket.paces["tm-small"] < 55, bucket.line()


def test_refusals_at_random_that_announce_windows_leave_the_lane_unpaced() -> None:
    """Rule 3 with windows: refusals at random that each announce a Retry-After are met by
    pausing for them alone. A paced lane spreads its sends, so each such refusal comes on
    its own and costs a window of its own, where unpaced sends meet several in one: a
    verdict that refusals come at random leaves the lane unpaced. 10 % refused with
    `Retry-After: 1`, 400 lines, eight seeds, against the same row with `--no-adaptive`
    (`bench/pause_only.py`): the tree before ended seven runs of eight paced (at 75-224/s)
    and took a median 2.04 times as long as the pauses alone; now 1.44, every run unpaced."""
    sc = replace(BY_NAME["random-10-seconds"], lines=400)
    learnt = [run_row(sc, seed) for seed in range(8)]
    alone = [run_row(replace(sc, adaptive=False), seed) for seed in range(8)]
    ratios = sorted(a.seconds / b.seconds for a, b in zip(learnt, alone, strict=True))
    unpaced = [lane(r)["pace_requests_per_second"] is None for r in learnt]
    assert sum(unpaced) >= 6 and all(lane(r)["noise_share"] > 0 for r in learnt), unpaced
    assert (ratios[3] + ratios[4]) / 2 <= 1.6, ratios
    assert all(r.violations == 0 and r.accepted == 400 for r in learnt)


def test_the_noise_floor_is_as_high_as_the_evidence_allows_where_refusals_pause() -> None:
    """Trials found 3 refusals of 40 at random. Bare 429s are weighed against the floor's
    lower bound (a mistake would send at once into a drained limit), refusals that announce
    pauses against its upper bound (a mistake costs a pause every worker takes anyway)."""
    p = Probation()
    p.random = [3, 40]
    p.noise = wilson(3, 40, -1.64)
    assert p.noise < 0.04
    assert not p.within_noise(6, 40) and p.within_noise(6, 40, paused=True)
    assert not p.within_noise(24, 40, paused=True)  # most refused: more than any noise


def test_a_pause_under_a_second_is_a_buckets_next_request_not_a_window() -> None:
    """Rule 3: a Retry-After of `hold` s or more announces a window, which pauses alone deal
    with, so a cut undone for refusals at random leaves the lane unpaced and the noise floor
    is as high as the evidence allows. A shorter one (`retry-after-ms`) is the time to a
    bucket's next request, which every worker of an unpaced lane meets at once. A bucket of
    50/s holding 500 (10 s of its rate; per-minute limits hold a minute's), 2,500 lines: a
    cut that landed over the limit was taken for refusals at random and undone to unpaced,
    the floor at its upper bound (3 of 10 refused: 56 %) let every refusal after it pass for
    noise, and the server refused 9,177 requests, 3.7 for each success (1,248 with this rule
    alone, 19,057 with rule 3's fall alone; 293 with both)."""
    seen = Evidence(5.0, hold=1.0)
    assert seen.windowed(1.0) and not seen.windowed(0.05) and not seen.windowed(None)
    r = run_row(row(BY_NAME["bucket-ms"], "deep-50-500-ms", lines=2500, rate_burst=500.0), 0)
    assert r.refused <= 0.15 * r.accepted, r.line()
    assert r.accepted == 2500 and r.violations == 0 and r.share >= 0.95, r.line()


def test_a_limit_found_fallen_is_cut_to_at_most_what_got_through_its_trial() -> None:
    """Rule 3: refusals three times as frequent after a cut as before it say the limit fell,
    and the next cut goes no higher than what got through the trial's pace. The measures
    over spans read far higher where the allowance is seconds of the rate: a bucket of 10/s
    holding 600 (a minute's worth), 1,200 lines with `retry-after-ms`, took a volley of 600
    for the rate, and each of the chained cuts after it took 1 % off 600/s, 8 of 10 refused
    each time: 1,602 refused; 220 now."""
    p = Probation()
    assert p.fallen_to() == math.inf
    p.chain = Trial(200.0, None, 0.0, 0.01, 0.0, 10, answers=10, refused=8, pace=200.0)
    assert p.fallen_to() == pytest.approx(40.0)
    sc = row(BY_NAME["bucket-ms"], "deep-10-600-ms", lines=1200, rate_limit=10.0,
             rate_burst=600.0)
    r = run_row(sc, 0)
    assert r.refused <= 0.25 * r.accepted, r.line()
    assert r.accepted == 1200 and r.violations == 0 and r.share >= 0.95, r.line()


def test_an_undone_probe_restores_the_measure_before_it_not_the_probes_pace() -> None:
    """Rule 3: a cut undone for refusals at random restores the pace it was made from,
    unless that was a probe's (above the limit measured before it): then the measure's, kept
    as the limit, since the probe's pace never held. A bucket of 20/s holding 200 (10 s of
    its rate), 1,000 lines with `retry-after-ms`: a probe's cut, undone, restored 53/s, and
    its refusals, weighed against a share the history diluted, passed for noise for the
    rest of the run: 1,257 refused; 308 now."""
    assert Trial(53.7, 20.0, 0.0, 0.2, 0.1, 10).held(0.99) == pytest.approx(19.8)
    assert Trial(15.0, 20.0, 0.0, 0.2, 0.1, 10).held(0.99) == 15.0
    assert Trial(53.7, None, 0.0, 0.2, 0.1, 10).held(0.99) == 53.7
    assert Trial(None, 20.0, 0.0, 0.2, 0.1, 10).held(0.99) is None
    r = run_row(row(BY_NAME["bucket-ms"], "deep-20-200-ms", lines=1000, rate_limit=20.0,
                    rate_burst=200.0), 0)
    assert r.refused <= 0.5 * r.accepted, r.line()
    assert r.accepted == 1000 and r.violations == 0 and r.share >= 0.95, r.line()


def test_refusals_at_random_that_announce_pauses_cost_about_what_the_pauses_alone_do() -> None:
    """30 % refused at random with `Retry-After: 1`, eight seeds, against `--no-adaptive`.
    With the floor at its lower bound (2 of 41 refused: 2 %) later refusals at random were
    taken for a limit and cut the pace: a median 2.7 times the pauses alone's time (2.3 to
    3.0 in the middle two runs). At its upper bound: 1.25 (1.07 to 1.35 in all eight)."""
    sc = BY_NAME["random-30-seconds"]
    ratios = sorted(run_row(sc, seed).seconds / run_row(replace(sc, adaptive=False), seed).seconds
                    for seed in range(8))
    assert (ratios[3] + ratios[4]) / 2 <= 1.4, ratios


def test_the_pace_never_falls_below_half_what_got_through_while_sending() -> None:
    """A lane paced at 40/s that got 40 a second through while sending, with a second's
    pause between stretches: a refusal cuts to no less than half of 40, however little got
    through per second of the wall clock (the pauses), and however poor the drained measure
    (refusals at random drain nothing)."""
    c = Controller(PaceConfig())
    t = 0.0
    c.on_answer(Answer(0.0, 0.01, True))
    c.on_answer(Answer(0.0, 0.011, False, wait=1.0))  # the first refusal: a volley of one
    c.rate = 40.0
    t = 1.0
    for _stretch in range(3):  # 1 s of sending at 40/s, then a second's pause
        for _ in range(40):
            c.on_sent(t)
            c.on_answer(Answer(t, t + 0.01, True))
            t += 0.025
        c.rate = 40.0
        t += 1.0
    c.on_sent(t)
    c.on_answer(Answer(t, t + 0.001, False, wait=1.0))
    assert c.rate is not None and c.rate >= 0.5 * 40 * PaceConfig().margin - 1e-9


def drain(c: Controller, bucket: RequestBucket, sends: list[float], late: list[float],
          latency: float = 0.02) -> Answer | None:
    """Send at client times `sends`, each met by the bucket `late[i]` s after it was stamped;
    answers in order of arrival. The first refusal, if any (sending stops there)."""
    for t, d in sorted(zip(sends, late, strict=True), key=lambda p: p[0] + p[1]):
        c.on_sent(t)
        ok = bucket.wait(t + d) == 0.0
        if ok:
            bucket.take(t + d)
        a = Answer(t, t + d + latency, ok, wait=None if ok else 1.0)
        c.on_answer(a)
        if not ok:
            return a
    return None


def test_a_first_volley_is_timed_by_the_nearer_of_its_sends_and_its_answers() -> None:
    """Over real sockets a first volley's sends are stamped before their connections open, so
    they look spread out where the server met them at once (here: stamped 3 ms apart, all
    met when the connections are up at 30 ms). A later drain's rate is read net of what
    refilled during the volley; read over the sends' spread it comes out high (51.4/s for a
    bucket of 50 over real sockets), the pace sits above the limit, and a second is lost
    when the allowance runs out. The answers' spread is the nearer one: what got through
    beyond the allowance reads the limit, not above it. (The cut takes the middle between
    that and the refusal's bound, 50.6 here: a pace 0.2 % over, refused once in 111 s and
    measured again over that span.)"""
    bucket = RequestBucket(50.0, 10.0, 10.0, 0.0)
    c = Controller(PaceConfig())
    volley = [0.003 * i for i in range(16)]
    assert drain(c, bucket, volley, [max(0.001, 0.03 - t) for t in volley]) is not None
    assert c.seen.volley == 10 and c.seen.spread < 0.001, (c.seen.volley, c.seen.spread)
    # the pause; then a probe at 80/s from a full bucket, sends met 1 ms after their stamps
    probe = [1.05 + i / 80 for i in range(200)]
    refused = drain(c, bucket, probe, [0.001] * len(probe))
    assert refused is not None
    low = c.seen.granted(refused.sent)
    assert low is not None and 49.0 <= low <= 50.0 + 1e-9, low  # (the sends' spread: 58.8)
    assert c.limit is not None and 45.0 <= c.limit <= 51.0, c.limit


def test_a_volley_is_what_was_sent_before_its_first_refusal_was_heard() -> None:
    """Over real sockets a first volley's requests are met in another order than they were
    stamped: here the one stamped at 3.0 ms is met 11th and refused, the one at 4.5 ms
    10th, and gets through. Counted after the volley (sent after the refused one), that
    success made every span from it, over the second's pause that followed, read the bucket
    of 20/s as 11/s at the ramp's refusal; over sockets one of `two-models`' lanes sat at
    half its limit for 20 s in three runs of eight. The lane sent unpaced until it heard of the
    refusal: all of that is the volley, and the ramp reads the limit."""
    c = Controller(PaceConfig())
    bucket = RequestBucket(20.0, 10.0, 10.0, 0.0)
    stamped = [0.0003 * i for i in range(16)]
    met = [*stamped[:9], stamped[15], stamped[10], stamped[9], *stamped[11:15]]
    answers = []
    for k, t in enumerate(met):
        ok = bucket.wait(0.006 + 0.0001 * k) == 0.0
        if ok:
            bucket.take(0.006 + 0.0001 * k)
        answers.append(Answer(t, (0.027 if ok else 0.008) + 0.0001 * k, ok,
                              None if ok else 1.0))
    for t in stamped:
        c.on_sent(t)
    for a in sorted(answers, key=lambda a: a.at):
        c.on_answer(a)
    assert c.seen.volley == 10, c.seen.volley  # (9 counted by the refused one's stamp)
    refused = None
    for t in [1.008] * 7 + [1.08 + 0.02 * i for i in range(14)]:  # the pause's burst, a ramp
        c.on_sent(t)
        ok = bucket.wait(t) == 0.0
        if ok:
            bucket.take(t)
        c.on_answer(Answer(t, t + (0.02 if ok else 0.002), ok, None if ok else 1.0))
        if not ok:
            refused = t
            break
    assert refused is not None and c.rate is not None and c.rate >= 18.0, (refused, c.rate)


def test_a_short_drain_is_read_between_what_got_through_and_what_the_refusal_shows() -> None:
    """A bucket of 10/s holding 5, met by a pause's burst and a pace ramping past it (the
    sends of a trace of `bucket-10-5-seconds`): 8 got through in 0.34 s and the ninth, 36 ms
    later, was refused. What got through says the rate is at least 8.8/s; the refusal says
    it is under 10.6/s (one more would have needed that). The lower bound alone, trusted for
    a 20 s plateau, left the lane 12 % under the limit; the cut takes the middle."""
    bucket = RequestBucket(10.0, 5.0, 5.0, 0.0)
    c = Controller(PaceConfig())
    assert drain(c, bucket, [0.0001 * i for i in range(16)], [0.001] * 16) is not None
    ramp = [2.002, 2.002, 2.002, 2.103, 2.204, 2.257, 2.303, 2.343, 2.379, 2.41]
    refused = drain(c, bucket, ramp, [0.001] * len(ramp))
    assert refused is not None and refused.sent == 2.379
    low, high = c.seen.granted_between(refused.sent)
    assert low is not None and low < 9.0 and high > 10.0, (low, high)
    assert c.limit == pytest.approx((low + high) / 2) and 9.5 <= c.limit <= 10.0, c.limit
    r = run_row(row(BUCKET, "bucket-5-2", 200, rate_limit=5.0, rate_burst=2.0), 0)
    assert r.share >= 0.9 and r.violations == 0, r.line()  # (the lower bound alone: 82 %)


def test_a_server_with_no_burst_of_its_own_gets_none_from_the_pace() -> None:
    """A limit of 50/s with no burst (nginx's limit_req without `burst`, a GCRA with no
    tolerance) refuses any two requests closer than 20 ms. The pace's own burst (50 ms'
    worth, two requests at 45/s) is capped by the allowance the first volley showed, here
    one: paced at 45/s the lane was refused every second anyway and sank to 18 % of the
    limit; capped, it sends one at a time and is not refused below the limit."""
    c = Controller(PaceConfig())
    bucket = RequestBucket(50.0, 1.0, 1.0, 0.0)
    assert drain(c, bucket, [0.0001 * i for i in range(16)], [0.001] * 16) is not None
    assert c.seen.allowance == 1.0
    pacer = Pacer()
    pacer.set_rate(45.0)
    assert pacer.book(5.0) == 0.0 and pacer.book(5.0) == 0.0  # its own burst: two at once
    pacer = Pacer()
    pacer.set_rate(45.0, c.seen.allowance)
    assert pacer.book(5.0) == 0.0 and pacer.book(5.0) == pytest.approx(1 / 45.0)
    r = run_row(row(BUCKET, "bucket-50-1", rate_burst=1.0), 0)
    assert r.share >= 0.6 and r.refused <= 20 and r.violations == 0, r.line()


def _probe_of_a_bucket_holding_one(seen: Evidence) -> list[float]:
    """A bucket of 50/s holding one request, met by a volley (one got through), then by a
    probe: 44/s for a second, then 52.6/s. The send times of its refusals."""
    bucket = RequestBucket(50.0, 1.0, 1.0, 0.0)
    volley = [0.0001 * i for i in range(16)]
    probe = [1.0 + i / 44 for i in range(44)] + [2.0 + i / 52.6 for i in range(1, 22)]
    refused: list[float] = []
    for t in volley + probe:
        seen.sent(t)
        if bucket.wait(t) == 0.0:
            bucket.take(t)
            seen.succeeded(t, t + 0.02)
        else:
            seen.refused(t + 0.001, t)
            refused.append(t)
            if t < 1.0 and seen.volley is None:
                seen.start_volley(t)
    return [t for t in refused if t >= 1.0]


def test_a_probe_of_a_bucket_holding_one_request_is_read_where_it_ran_dry() -> None:
    """A limit of 50/s with no burst (nginx's limit_req without `burst`) grants half a pace
    over it: every other send finds it empty. Over the spans that end at the last success
    before the refusal, a probe that met it at 44/s for a second and then at 52.6/s reads
    39/s. A probe began from a pace the server was not seen to refuse, so every span since
    then bounds the rate too, and the tight ones end where the bucket first ran dry: 43/s.
    With bare 429s, at a limit of 50/s holding one, the lane sent at 77 % of it; now 89 %."""
    seen = Evidence(5.0)
    refused = _probe_of_a_bucket_holding_one(seen)
    assert len(refused) > 5 and seen.volley == 1, refused
    low, _ = seen.granted_between(refused[-1])
    probed, _ = seen.granted_between(refused[-1], 1.0)
    assert low is not None and low < 40.0, low
    assert probed is not None and 43.0 <= probed <= 50.0, probed  # a bound: never above it
    r = run_row(row(BY_NAME["bucket-none"], "bucket-50-1-none", 1000, rate_burst=1.0), 0)
    assert r.share >= 0.85 and r.violations == 0, r.line()


def test_a_refusal_just_after_a_pause_reads_the_sending_before_the_pause() -> None:
    """Stretches of a second at 40/s, each ended by a refusal with `Retry-After: 1`; the
    last refusal is of a request sent as a pause ended. The last second of the wall clock
    was all pause, so the measure reaches back past it: the cut goes no lower than half of
    40 (reading the pause as the rate cut it to nothing, a ratchet on refusals at random)."""
    c = Controller(PaceConfig())
    c.on_answer(Answer(0.0, 0.01, True))
    c.on_answer(Answer(0.0, 0.011, False, wait=1.0))  # the first refusal: a volley of one
    t = 1.02
    for _stretch in range(3):
        c.rate = 40.0
        for _ in range(40):
            c.on_sent(t)
            c.on_answer(Answer(t, t + 0.01, True))
            t += 0.025
        c.on_sent(t)
        c.on_answer(Answer(t, t + 0.01, False, wait=1.0))  # a pause of 1 s from t + 0.01
        t += 1.02
    c.rate = 40.0
    assert c.seen.through_while_sending(t) >= 39
    c.on_sent(t)
    c.on_answer(Answer(t, t + 0.01, False, wait=1.0))
    assert c.rate is not None and c.rate >= 0.5 * 40 * PaceConfig().margin - 1e-9, c.rate


def test_the_drain_a_bare_refusal_left_is_not_read_as_the_pace() -> None:
    """Unpaced at 100/s with 20 ms answers, a bare 429: what is sent within the round trip
    after it meets a server still drained by what was in flight, and is refused too. The
    echo that decides starts after that round trip; what follows gets through at the
    lower bound's pace, so the lane ramps on from it with no limit learnt (read as the
    pace, the drain kept a bucket of 50/s at 23/s for ten seconds over real sockets)."""
    c = Controller(PaceConfig())
    t, lat = 0.0, 0.02
    for _ in range(50):
        c.on_sent(t)
        c.on_answer(Answer(t, t + lat, True))
        t += 0.01
    c.on_sent(t)
    c.on_answer(Answer(t, t + lat, False))  # the first bare refusal, answered at t + lat
    now = t + lat
    assert c.rate is not None and c.echo is not None
    pace = c.rate
    for tail in (0.005, 0.01):  # the drain's tail: two, so its refusals would count
        c.on_sent(now + tail)
        c.on_answer(Answer(now + tail, now + tail + lat, False))
    t = now + 0.015
    for _ in range(30):
        c.on_sent(t)
        c.on_answer(Answer(t, t + lat, True))
        t += 1.0 / pace
    assert c.echo is None and c.limit is None and c.rate >= pace, (c.rate, c.limit)


def test_a_bare_refusal_before_any_answer_paces_the_lane() -> None:
    """Rule 1 with no hint and nothing answered yet (100 ms answers, a refusal in 1 ms): the
    refusal paces the lane at once and listens for the round trip after, instead of waiting
    for a success to measure. Left unpaced, every slot a refusal freed went to a new line
    into the same empty bucket: 58 refused in the first tenth of a second, 8.9 % of the
    run of the held-out row bucket-none-lat100. Checked here at 150 ms, so the held-out
    row stays one no test tunes to."""
    slow = row(BY_NAME["bucket-none"], "bucket-none-lat150", latency=0.15)
    for seed in range(2):
        r = run_row(slow, seed)
        assert r.accepted == 1000 and r.refused <= 0.05 * r.accepted, r.line()
        assert r.share >= 0.95, r.line()
    c = Controller(PaceConfig())
    for i in range(16):
        c.on_sent(i * 0.001)
    c.on_answer(Answer(0.015, 0.016, False))  # refused before any of the first 8 answered
    assert c.rate is not None and c.echo is not None, (c.rate, c.echo)


def test_a_refused_line_backs_off_with_its_lanes_refusals_in_a_row_not_its_own() -> None:
    """40 % refused at random with a bare 429 (a share no matrix or held-out row uses): once
    probation finds them random the lane is unpaced, and a line refused again and again while
    other lines get through is not facing a closed server. Its backoff grows with the lane's
    refusals in a row, so no line is left waiting seconds at the end of the run (a line's
    own streak took two seeds of four to 54 % and 36 % of the time pausing for each refusal
    would take). A lane refusing everything still backs off: its streak is everyone's.
    Forty seeds, and a quarter may be under 80 %: the first four were all over it, by luck
    (on 40 seeds 9 runs were under it, as low as 13 %, at 6b31884; 8, as low as 25 %, after
    a refusal drained the pace's schedule). The tail is rule 3's: 2 of 15 refused after a
    cut, 45 % before, is the cut working to the evidence, and is what 40 % at random gives
    once in forty trials (docs/limits.md, "What it does not do yet")."""
    forty = row(BY_NAME["random-10-seconds"], "random-40-none", lines=200,
                refuse_fraction=0.4, retry_after_format="none")
    shares = sorted(run_row(forty, seed).share for seed in range(40))
    assert shares[10] >= 0.8 and shares[20] >= 0.9, shares
    from tmbatch.limits.lanes import LaneKey, make_lane

    lane = make_lane(LaneKey("http://x", "m"), PaceConfig(), None, True, "")
    for _ in range(6):
        lane.refused(1.0, 0.5, None, None)
    assert lane.streak(3) == 3 and lane.streak(9) == 6  # nothing through: the line's own
    lane.succeeded(1.1, 1.0, None, 0)
    lane.refused(1.2, 1.15, None, None)
    assert lane.streak(8) == 1  # another line got through since: the first wait again
    fixed = make_lane(LaneKey("http://x", "m"), PaceConfig(), None, False, "")
    fixed.succeeded(1.1, 1.0, None, 0)
    assert fixed.streak(8) == 8  # --no-adaptive: the backoff alone spaces a line's tries


def _trial(refused_before: int, answers_before: int) -> tuple[Probation, list[Trial]]:
    """A cut from 50/s to 20/s on trial, then 100 answers at the lower pace, 3 refused."""
    p, undone = Probation(), []
    p.start(50.0, None, 0.0, refused_before, answers_before)
    p.cut(0.0, 20.0)
    for i in range(100):
        t = p.judge(1.0 + i, i % 33 == 5)
        if t is not None:
            undone.append(t)
    return p, undone


def test_a_share_measured_on_few_answers_before_a_cut_is_weighed_within_its_uncertainty() -> None:
    """Refusals at 3 % after a cut, 1 in 5 before it: on five answers 20 % may well be 3 %,
    and refusals that go on at the lower pace say the rate did not cause them: the cut is
    undone and the noise floor set. 20 in 100 before is a share known well enough that 3 %
    after is the cut working: kept. Rule 3 judged the first by half the share before alone,
    kept the cut, and a run with 10 % refused at random, no hint, took 2.2 times the
    issue's bound (random-10-none, seed 11: 11.2 s)."""
    few, undone = _trial(1, 5)
    assert len(undone) == 1 and few.noise > 0
    known, undone = _trial(20, 100)
    assert undone == [] and known.noise == 0
    for name, seeds in (("random-05-none", 12), ("random-10-none", 12)):
        worst = by_share(BY_NAME[name], seeds)[0]
        assert worst.share >= 0.85, worst.line()


def test_a_few_answers_after_a_cut_do_not_undo_it() -> None:
    """The other side of the same rule: 11 in 20 refused before a cut (a lane sending at three
    times a small limit), then 2 of the first 10 after it (the cut landed a little above the
    limit). On ten answers 20 % may be 55 %, but it may as well be nothing: the trial waits
    until it has heard as many answers as the share before was measured on. Undone on those
    ten, the lane went back to sending at three times the limit, refused at 55 % again, cut,
    and undid the cut again: a bucket of 10/s holding 5, a bare 429, 200 lines, had 149
    refusals; it has the 26 it had before the rule weighed shares within their uncertainty."""
    p = Probation()
    p.start(32.0, None, 0.0, 11, 20)
    p.cut(0.0, 10.5)
    verdicts = [p.judge(1.0 + i / 10, i in (3, 7)) for i in range(10)]
    assert verdicts == [None] * 10 and p.trial is not None and p.noise == 0
    r = run_row(row(BY_NAME["bucket-none"], "bucket-10-5-none", lines=200, rate_limit=10.0,
                    rate_burst=5.0), 0)
    assert r.refused <= 40 and r.share >= 0.95 and r.violations == 0, r.line()


@pytest.mark.parametrize("share", [0.2, 0.3])
def test_refusals_at_random_with_a_hint_do_not_ratchet_the_pace_down(share: float) -> None:
    """20 and 30 % refused at random with `Retry-After: 1`, five seeds each (rows the
    matrix does not hold). A cut is never deeper than half what got through over twenty
    answers of sending, and the noise floor pools every trial that found refusals at
    random, so cuts do not stack: no run is under 90 % of a careful client (pause, then
    full speed), the median is at least as fast (a measure of one second at a low pace, or
    of a second that was all pause, once took a run to 0.1/s and 44 %). Ten seeds, and one
    run may be under 90 %: a run whose first requests are refused starts from a volley of
    eight (rule 1) and climbs through refusals a second apart (on 30 seeds one run at 20 %
    and one at 30 %, 0.80 and 0.70; before verdicts, one at 20 %, 0.71: the same tail)."""
    base = BY_NAME["random-10-seconds"]
    random = row(base, f"random-{share}", refuse_fraction=share)
    runs = by_share(random, 10)
    assert runs[1].share >= 0.9 and runs[5].share >= 1.0, [r.line() for r in runs]
    assert all(r.violations == 0 for r in runs)


def test_a_refusal_drains_the_schedule_of_the_slots_booked_at_the_faster_pace() -> None:
    """A refusal says the server's allowance is spent: the pace's next slot is one interval
    after the last request sent, and a slot booked at the faster pace and still waited for
    is booked again at the pace the refusal left. The cut's slower pace took effect only
    after those slots, which went into the drained bucket: two refused after every cut of a
    10/s bucket holding 5 (bare 429s), the trial judging the cut read 2 of its first 10 as
    the share before, undid the cut, and the noise floor it set let a probe's refusals pass
    for noise: 197 refused for 1,000 lines at 6b31884, 97 now."""
    p = Pacer(20.0)
    assert p.book(0.0) == 0.0
    p.last_sent = 0.0
    assert p.book(0.0) == pytest.approx(0.05)  # waited for, at 20/s
    epoch = p.epoch
    p.set_rate(10.0)  # cut at a refusal heard at 10 ms
    unpaced = Pacer()
    unpaced.drained(0.01)  # (an unpaced lane has no schedule to drain)
    assert unpaced.book(0.01) == 0.0
    p.drained(0.01)
    assert p.epoch == epoch + 1  # the waiter books again ...
    assert p.book(0.05) == pytest.approx(0.05)  # ... one interval of 10/s after the last send
    assert p.book(0.1) == pytest.approx(0.1)
    sc = row(BY_NAME["bucket-none"], "bucket-10-5-none", lines=1000, rate_limit=10.0,
             rate_burst=5.0)
    r = run_row(sc, 0)
    assert r.refused <= 120 and r.share >= 0.95 and r.violations == 0, r.line()


async def _slot_after(rise: Callable[[Lane, float], None]) -> float:
    """A lane paced at 5/s sends at 0; its next slot, waited for, is at 0.2. At 0.05 `rise`
    raises its pace: when the waiter gets its slot."""
    loop = asyncio.get_running_loop()
    lane = make_lane(LaneKey("http://x", "m"), PaceConfig(), None, True, "")
    lane.controller.set_pace(5.0, "test")
    lane._pace(loop.time())
    await lane.paced(loop)
    waiter = asyncio.ensure_future(lane.paced(loop))
    await asyncio.sleep(0.05)
    rise(lane, loop.time())
    await waiter
    return loop.time()


def test_a_faster_pace_brings_the_slot_waited_for_forward() -> None:
    """Each slot is booked at the pace of the moment the one before it went: a lane whose
    pace rose with every success sent at the pace of a success before, a ramp from 5 to
    29/s went out at 5/s, and the refusal that ended it measured a bucket of 10/s as 7
    (`bucket-10-5-ms`, 89 %). A faster pace moves the slot waited for to one new interval
    after the slot before it, and wakes its waiter; with no slot waited for, the next is one
    new interval after the last."""
    p = Pacer(5.0)
    assert p.book(0.0) == 0.0
    assert p.book(0.0) == pytest.approx(0.2)  # waited for
    epoch = p.epoch
    assert p.repace(10.0, None, 0.05)
    assert p.epoch == epoch + 1  # its waiter books again: 0.1 s after the slot before
    assert p.book(0.05) == pytest.approx(0.05)
    idle = Pacer(5.0)
    assert idle.book(0.0) == 0.0
    assert not idle.repace(10.0, None, 0.01)  # nothing waited for: the next slot is sooner
    assert idle.book(0.01) == pytest.approx(0.09)
    assert not idle.repace(5.0, None, 0.02)  # slower: the slots booked stand
    first = Pacer()
    first.last_sent = 0.0
    assert not first.repace(5.0, None, 0.0)  # paced at last: no slot before it to move
    assert first.book(0.0) == 0.0
    paused = Pacer(5.0)
    paused.restart_at(1.0, 3)  # a pause's burst of 3 is still to be sent at 1.0
    assert not paused.repace(10.0, None, 0.5) and paused.credit == 2  # it stands

    def faster(lane: Lane, now: float) -> None:
        lane.controller.set_pace(10.0, "test")
        lane._pace(now)

    def floor(lane: Lane, now: float) -> None:
        lane.share(10.0)  # the fleet's mean (--redis) is the floor: the same, from there

    for rise in (faster, floor):
        assert run_virtual(partial(_slot_after, rise)) == pytest.approx(0.1), rise.__name__


def test_a_cut_grows_once_its_own_sends_are_heard_of() -> None:
    """The pace grows after a cut once the cut's own sends are heard of (twice the
    refusals' round trip and 50 ms: `verdicts`), not a fixed half second after it: that
    half second, at every cut of a lane refused at random, took `random-10-none` to 2.5
    times a careful client's time where it is now 3.3 (higher is faster), and left 7 runs
    of 84 on the random rows out of band."""
    c = Controller(PaceConfig())
    for i in range(8):
        c.on_sent(i * 0.001)
    c.on_answer(Answer(0.0, 0.02, True))
    c.on_answer(Answer(0.001, 0.021, False, wait=0.0))  # refused: the lane is paced
    due = 0.021 + c.verdicts.verdict_in() + 0.001
    c.hear(due)  # the rest of the volley, let through: they complete the cut's measure
    cut = c.rate
    assert cut is not None
    c.on_sent(due)
    c.on_answer(Answer(due, due + 0.02, True))  # the cut's first send, answered
    assert c.rate is not None and c.rate > cut, (cut, c.rate)


def test_a_probe_refusal_is_news_when_what_the_probe_sent_is_refused_beyond_the_noise() -> None:
    """The noise floor is the share of refusals that come at random at a pace found safe.
    A probe above the limit measured asks whether the limit rose, and refusals beyond that
    share among what it sent are the answer: taken for noise, a 10/s bucket's probes climbed
    to 28/s through 13 refusals each (197 refused for 1,000 lines, bare 429s). But a refusal
    as frequent as the noise is noise, probe or not: behind a gateway that refuses 10 % at
    random every probe's first refusal cut a 50/s bucket's pace, to 2/s
    (`bench/heldout.py --mixed`). A pace that grows past the cut's measure also ends that
    cut's trial, kept: a probe's refusals, among 85 answers at the cut's pace, made the
    trial read the share before as the same and undo it."""
    c = Controller(PaceConfig())
    c.probation.noise = 0.2  # a lane that found a fifth of its refusals at random
    c.limit = 10.0
    c.set_pace(9.9, "test")
    for i in range(40):
        c.on_sent(i * 0.1)
        c.on_answer(Answer(i * 0.1, i * 0.1 + 0.02, True))
    c.on_sent(4.0)
    c.on_answer(Answer(4.0, 4.02, False, wait=0.0))  # at the limit: within the noise
    assert c.rate == pytest.approx(9.9) and c.cuts == 0
    c.set_pace(12.0, "probing")
    c.probe_from = 4.5
    t = 4.5
    for ok in [True] * 9 + [False]:  # one in ten refused: as often as at random
        c.on_sent(t)
        c.on_answer(Answer(t, t + 0.02, ok, wait=0.0))
        t += 0.08
    assert c.cuts == 0 and c.rate is not None and c.rate >= 12.0
    refused = 0
    while c.cuts == 0 and refused < 20:  # then refused again and again: it found the limit
        c.on_sent(t)
        c.on_answer(Answer(t, t + 0.02, False, wait=0.0))
        t, refused = t + 0.08, refused + 1
    assert c.cuts == 1 and c.rate is not None and c.rate < 12.0 and refused <= 13, refused
    c.probation.start(12.0, 10.0, 5.0, 1, 20)
    c.probation.outgrown()
    assert c.probation.trial is None and not c.probation.overshot


def test_a_cut_refused_at_its_own_pace_is_corrected_not_read_as_a_fall() -> None:
    """A bucket of 5/s holding 2 with whole-second hints: a first measure over a short
    drain read 5.8, the trial saw a refusal at that pace, and the next measure, 5.0, was
    read as a limit that fell: from then on the lane sat 5 s at each measure (a fallen
    limit's plateau) and paused a second at each probe, 84 % of the limit. A cut whose
    trial kept it with refusals at its own pace was read a little high, and the measure
    after corrects it: the plateau stays the trusted one. A fall after a cut that held is
    still a fall."""
    held, overshot = Plateau(), Plateau()
    for plateau, was in ((held, False), (overshot, True)):
        plateau.reached = 1.0  # the lane sat at the old measure
        plateau.measured(5.8, 5.0, 0.98, was)
    assert held.trust == 0 and held.peak == 5.8
    assert overshot.trust is None and overshot.peak is None
    p = Probation()
    p.start(14.0, None, 0.0, 7, 13)
    p.cut(0.0, 5.8)
    for i in range(13):
        p.judge(1.0 + i / 5, i == 4)
    assert p.trial is None and p.overshot  # kept, with a refusal at its pace
    r = run_row(row(BUCKET, "bucket-5-2-seconds", 200, rate_limit=5.0, rate_burst=2.0), 0)
    assert r.share >= 0.9 and r.violations == 0, r.line()


class Paces(logging.Handler):
    """The pace of each change the controller logs, at the loop's time: the INFO lines (a
    change of 20 % or more) and the DEBUG line of every cut (event `pace_cut`), each with
    its `requests_per_second`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        rate = getattr(record, "requests_per_second", None)
        if rate is not None:
            self.seen.append((asyncio.get_running_loop().time(), rate))


def paced_run(sc: Scenario) -> tuple[RowResult, list[tuple[float, float]]]:
    """The row, seed 0, with every pace the lane took and when."""
    paces = Paces()
    log = logging.getLogger("tmbatch")
    level = log.level
    log.addHandler(paces)
    log.setLevel(logging.DEBUG)
    try:
        r = run_row(sc, 0)
    finally:
        log.removeHandler(paces)
        log.setLevel(level)
    return r, paces.seen


@pytest.mark.parametrize("fmt,within", [("ms", 10.0), ("none", 10.0), ("seconds", 22.0),
                                        ("http-date", 36.0)])
@pytest.mark.parametrize("at", [8.0, 16.0, 24.0])
def test_a_limit_that_rises_is_found_again(fmt: str, within: float, at: float) -> None:
    """A bucket of 20/s that goes to 40/s at `at` s: the lane paces within 10 % of 40/s
    `within` s after the rise, whenever it comes. A probe above a limit that stayed where it
    was costs what its refusal costs, and the plateau keeps that to 5 % of the time (rule
    5): with hints to the millisecond or bare 429s a few milliseconds, so the rise is found
    within 10 s; with whole-second Retry-After a second, so a plateau of 20 s; an HTTP date
    counts up to two seconds, so up to 40 s. (Measured: seconds 4.5-20.5 s, HTTP date
    15.3-31.3 s, by when the rise came in the plateau.)"""
    sc = row(BUCKET, f"rise-{fmt}", lines=2400, rate_limit=20.0, retry_after_format=fmt,
             rate_schedule=((at, 40.0),))
    r, seen = paced_run(sc)
    found = next(t for t, rate in seen if t > at and rate >= 0.9 * 40)
    assert found <= at + within, (found, r.line())
    assert r.paces["tm-small"] >= 0.9 * 40 and r.violations == 0, r.line()


@pytest.mark.parametrize("burst,lines", [(300.0, 600), (600.0, 800)])
def test_an_allowance_the_headers_state_is_spent_at_once(burst: float, lines: int) -> None:
    """A bucket of `burst` refilling at 50/s that states its level in x-ratelimit-* headers:
    what it holds goes at once, then the pace; within half as long again as a client that
    knew the schedule (the burst at once, then 50/s). Paced at the stated rate from the
    first answer it took 10.4 s and 12.2 s (1.7 and 3 times that; llmock --rpm 600: 54 s
    for 700 lines, 11.5 s now)."""
    sc = row(BY_NAME["bucket-xratelimit"], f"allowance-{int(burst)}", lines=lines,
             rate_burst=burst)
    r = run_row(sc, 0)
    ideal = (lines - burst) / 50.0
    assert r.seconds <= 1.5 * ideal, (r.seconds, ideal, r.line())
    assert r.refused == 0 and r.violations == 0, r.line()


@pytest.mark.parametrize("fmt,band", [("none", 0.95), ("seconds", 0.90)])
def test_a_limit_enforced_over_shorter_spans_than_its_headers_state(fmt: str,
                                                                    band: float) -> None:
    """The headers state a bucket of 600 at 50/s; the one enforced holds 10 (a per-minute
    limit enforced per second, as OpenAI's may be). What the headers say is only a burst
    the pace may use, never a reason to send past what the server grants: the lane keeps to
    the bands of the same bucket stated truly (bucket-xratelimit, bucket-seconds), as it did
    before stated levels were spent (97.8 % and 91.3 % both ways)."""
    sc = row(BY_NAME["bucket-xratelimit"], f"quantized-{fmt}", ratelimit_stated_burst=600.0,
             retry_after_format=fmt)
    runs = by_share(sc, 3)
    r = runs[1]
    assert r.share >= band and r.refused <= 0.05 * r.accepted, r.line()
    assert all(x.violations == 0 and x.rejected == 0 for x in runs), [x.line() for x in runs]


def test_a_limit_that_falls_is_followed_within_seconds() -> None:
    """A bucket of 40/s that falls to 20/s at 15 s, whole-second Retry-After: within 7 s the
    pace is within 5 % of 20/s. It took 9 s in four cuts, the last ones of 1 %: the burst
    each pause ends with was counted as got through while sending, and kept rule 2's floor
    near the old rate, pause after pause."""
    sc = row(BY_NAME["halved"], "fall", lines=1000, rate_schedule=((15.0, 20.0),))
    r, seen = paced_run(sc)
    down = next(t for t, rate in seen if t > 15.0 and rate <= 1.05 * 20)
    assert down <= 15.0 + 7.0, (down, seen, r.line())


@pytest.mark.parametrize("lasts", [15.0, 30.0])
def test_a_limit_restored_after_a_fall_is_found_again_within_10_s(lasts: float) -> None:
    """A bucket of 40/s at 20/s from 15 s for `lasts` s, whole-second Retry-After: the pace is
    back within 10 % of 40/s within 10 s of the limit's return. With the plateau doubled by
    the first probe that found the limit still fallen (5 s, then 10 s), a fall of 30 s was
    found back 20 s late."""
    back = 15.0 + lasts
    sc = row(BY_NAME["halved"], f"fall-{lasts:g}", lines=int(600 + 20 * lasts + 600),
             rate_schedule=((15.0, 20.0), (back, 40.0)))
    r, seen = paced_run(sc)
    found = next(t for t, rate in seen if t > back and rate >= 0.9 * 40)
    assert found <= back + 10.0, (found, r.line())
    assert r.violations == 0 and r.rejected == 0, r.line()


@pytest.mark.parametrize("to,share,refused", [(10.0, 0.8, 30), (25.0, 0.75, 25)])
def test_a_limit_that_falls_and_stays_down_is_followed_not_refused_again_and_again(
        to: float, share: float, refused: int) -> None:
    """A bucket of 40/s that falls for good at 15 s (another job took the rest). When a cut
    is found too shallow (refusals at three times the share before it), the next trial
    compares with the share before the fall, not with the refusals it just blamed on the
    rate: compared with those, the next cut's refusals looked like noise, the cut was undone,
    and the lane was refused every second or so to the end (75 refusals for a fall to 10/s,
    67 % for a fall to 25/s)."""
    base = BY_NAME["halved"]
    sc = row(base, f"fall-{to:g}", lines=1200, rate_schedule=((15.0, to),))
    r = run_row(sc, 0)
    assert r.refused <= refused and r.share >= share, r.line()
    assert r.violations == 0 and r.rejected == 0, r.line()

def test_nothing_ends_rejected_before_patience() -> None:
    """A model always refused with no hint (a per-model quota) among healthy lines: its
    line is retried until nothing has succeeded on its lane for --patience, then ends
    `rejected`; the healthy lines are not held up."""
    sc = BY_NAME["quota"]
    r = run_row(sc, 0)
    assert r.rejected == 1 and r.failed == 1, r.line()
    (at, cls), = r.failures
    assert cls == "rejected" and at >= sc.patience, r.failures
    assert r.share >= sc.band.share, r.line()  # the healthy lines, at their own speed


@pytest.mark.parametrize("hint", ["none", "seconds"])
def test_patience_holds_to_the_second(hint: str) -> None:
    """--patience 10 ends a refused line 10 s after its lane's last progress, not after the
    backoff or Retry-After pause that outlasts it and one more refusal (issue 24: 15.3 s).
    A bare 429 (backoff growing to 10 s: it ended at 13.2 s) and a Retry-After of 6 s on
    every request (it ended at 12 s): in virtual time, at 10 s."""
    if hint == "none":
        sc = replace(BY_NAME["quota"], patience=10.0)
        began = 0.1  # line 100 of tm-large is sent within the first 0.1 s
    else:
        sc = Scenario("refused-6", "every request refused, Retry-After: 6",
                      {"refuse_fraction": 1.0, "retry_after": 6.0,
                       "retry_after_format": "seconds", "latency": 0.01},
                      "random", Band(0.0, 1.0, rejected=2), lines=2, concurrency=2,
                      patience=10.0)
        began = 0.0
    r = run_row(sc, 0)
    assert r.failures and all(cls == "rejected" for _, cls in r.failures), r.failures
    for at, _ in r.failures:
        assert 10.0 <= at <= 10.0 + began + 0.01, r.failures


def test_a_closed_window_is_probed_not_hammered() -> None:
    """A window of 30 per 15 s with bare 429s: while it is closed the lane holds and probes
    a few times (a second, then a quarter of the time closed), then meets the window with
    its 30 at each opening, unpaced: every window it sends in admits 30 and takes 30, and
    from the first reopening on a window costs a refusal at most (an early probe, or an ask
    whether it grew)."""
    r = run_row(BY_NAME["window-30-15"], 0)
    assert r.share == 1.0 and r.paces["tm-small"] is None, r.line()
    assert lane(r)["pace_source"] == "a window of 30", lane(r)
    reopened = min(a.at for a in r.arrivals if a.status == 200 and a.at > 1.0)
    later = [a.at for a in r.arrivals if a.status != 200 and a.at > reopened]
    assert len(later) <= len({math.floor(a.at / 15.0) for a in r.arrivals}), later


def window_row(name: str, lines: int, **server: Any) -> Scenario:
    """window-40-4 (40 per 4 s, a bare 429) with `server` changed."""
    return row(BY_NAME["window-40-4"], name, lines, **server)


def against_the_pauses_alone(sc: Scenario, seed: int = 0) -> tuple[RowResult, RowResult]:
    return run_row(sc, seed), run_row(replace(sc, adaptive=False), seed)


@pytest.mark.parametrize(("n", "w", "lines"), [(200, 60.0, 1000), (30, 15.0, 300),
                                               (100, 10.0, 1000), (10, 1.0, 100)])
def test_a_window_is_sent_its_allowance_at_each_opening_not_spread_by_a_pace(
        n: int, w: float, lines: int) -> None:
    """Fixed windows of N per W s with bare 429s: paced at N/W the lane spread the last
    window's N over W s, and the pace measured across the first closure read low by the
    hold's overshoot (200 per 60 s: 2.7/s, 366 s for 1,000 lines, where the pauses alone
    took 250). Sent N at each opening, it touches no more windows than the lines need and
    takes no longer than the pauses alone, at a few per cent of their refusals."""
    sc = window_row(f"window-{n}-{w:g}", lines, window_limit=n, window_seconds=w)
    learnt, alone = against_the_pauses_alone(sc)
    assert learnt.share == 1.0 and learnt.violations == 0, learnt.line()
    assert learnt.seconds <= 1.02 * alone.seconds, (learnt.line(), alone.line())
    assert learnt.refused <= alone.refused / 10, (learnt.line(), alone.line())


@pytest.mark.parametrize("start", [1.0, 2.5, 3.9])
def test_a_window_counted_from_the_clock_is_found_whenever_the_run_starts(start: float) -> None:
    """Per-minute keys count from the clock's minute, not from the client's first request:
    the run starts `start` s into a window of 40 per 4 s. At 3.9 the first volley spans two
    windows, and the first closure counts 80 through: the next opening's burst is refused
    past 40, the lane closes there, and the opening after it counts 40 again (one window's
    refusals, once)."""
    sc = window_row(f"window-40-4-start{start:g}", 400, window_start=start)
    learnt, alone = against_the_pauses_alone(sc)
    assert learnt.share == 1.0 and learnt.violations == 0, learnt.line()
    assert learnt.seconds <= alone.seconds, (learnt.line(), alone.line())
    assert lane(learnt)["pace_source"] == "a window of 40", lane(learnt)
    assert learnt.refused <= 70, learnt.line()


def test_a_window_that_grows_is_found_by_asking_for_more() -> None:
    """40 per 4 s, then 80 from 12 s on (another job on the key stopped): now and then one
    request past the allowance asks whether the window grew, and from the first that gets
    through the asks grow (a quarter more, doubling) until one is refused: the lane ends
    sending 80 a window, and no slower than the pauses alone."""
    sc = window_row("window-40-4-grows", 600, rate_schedule=((12.0, 20.0),))
    learnt, alone = against_the_pauses_alone(sc)
    assert lane(learnt)["pace_source"] == "a window of 80", lane(learnt)
    assert learnt.seconds <= alone.seconds and learnt.violations == 0, learnt.line()


def test_a_window_that_shrinks_is_met_with_what_it_lets_through() -> None:
    """40 per 4 s, 20 from 10 s to 25 s (another job takes half of each window for a while):
    the burst at the first shrunk opening is refused past 20, the lane closes there, and the
    next opening counts 20; asks find the 40 again. No slower than the pauses alone."""
    sc = window_row("window-40-4-shared", 400, rate_schedule=((10.0, 5.0), (25.0, 10.0)))
    learnt, alone = against_the_pauses_alone(sc)
    assert learnt.seconds <= alone.seconds and learnt.violations == 0, (learnt.line(),
                                                                         alone.line())
    assert lane(learnt)["pace_source"] == "a window of 40", lane(learnt)


def test_the_send_that_spends_a_windows_allowance_is_followed_like_any_other() -> None:
    """The send that spends the allowance holds the lane to the next opening, and is still
    a send the verdicts follow: let through, it is a success heard of in time like the rest
    (it once returned the hold before the verdicts saw it)."""
    c = Controller()
    c.verdicts.refused_in(0.01, [], [])
    c.windows.refusal(0.5)
    assert c.windows.reopened(4.0, 3, 0.01) == 2  # a window of 2, opened at 4.0 ...
    assert c.windows.cap == 3  # ... and one more asks whether it grew
    assert c.on_sent(4.001) is None and c.on_sent(4.002) is None
    change = c.on_sent(4.003)
    assert change is not None and change.hold == pytest.approx(4.49 - 4.003)
    assert list(c.verdicts.pending) == [4.001, 4.002, 4.003]


def test_a_window_met_again_after_a_pace_governed_is_measured_afresh() -> None:
    """The window's record goes when refusals with successes among them make a pace govern
    the lane (`Windows.forget`): the next closure's opening is not known, so its reopening
    measures nothing, and the one after it measures the window again."""
    c = Controller()
    w = c.windows
    w.refusal(0.5)
    assert w.reopened(4.0, 41, 0.01) == 40 and w.allowance == 40
    assert w.period == pytest.approx(0.49)
    w.forget()
    assert w.allowance is None and w.opened is None and w.period == 0.0
    assert w.reopened(30.0, 90, 0.01) is None  # (when the window that closed opened: unknown)
    w.refusal(33.0)
    assert w.reopened(34.0, 130, 0.01) == 40 and w.period == pytest.approx(3.0)


def test_an_opening_whose_allowance_is_refused_was_the_window_before() -> None:
    """A refusal at random leaves a window under-used; the next probe, sent at the period's
    lower bound, can land in what is left of it and get through. The allowance sent after
    it is refused but one: that was no opening. Counted as one, the window that followed
    let 1 through, and the lane sent 1, 2, 3, 5 ... a window while asks found the 40 again
    (`bench/heldout.py --mixed`: 40 per 4 s behind 5 % refused at random, 1.5-2.6 x the
    pauses alone). The lane keeps the window's opening and allowance, the refusals bound
    its period, and the next opening sends the 40."""
    w = Windows()
    w.refusal(0.5)  # the first window, opened before the first success at 0.01
    assert w.reopened(4.0, 41, 0.01) == 40
    for i in range(40):
        w.sent(4.0 + i * 1e-4)
    w.refusal(4.001)  # one at random: 39 got through, one place left
    assert w.reopened(7.6, 80, 0.01) == 39  # the probe met that place
    for _ in range(39):
        w.sent(7.62)
    for _ in range(38):
        w.refusal(7.62)
    assert w.opened == 4.0 and w.period == pytest.approx(3.62)
    assert w.reopened(8.3, 82, 0.01) == 40 and w.cap >= 40


def test_an_opening_after_a_window_used_to_the_full_is_measured_not_refuted() -> None:
    """The probe can only meet what is left of the window before when that window was left
    room: some of its allowance refused (at random). After a window used to the full, an
    opening most of whose allowance is refused is a window that shrank, and the next opening
    counts it. (Refuted too, the lane kept the old opening, and a refused probe a window
    later bounded the period at two of them: 40 per 4 s down to 10 took 209 s where the
    pauses alone take 130.)"""
    w = Windows()
    w.refusal(0.5)
    assert w.reopened(4.0, 41, 0.01) == 40
    for _ in range(40):
        w.sent(4.0)  # all 40 through: the window used to the full
    assert w.reopened(8.05, 81, 0.01) == 40
    for _ in range(40):
        w.sent(8.06)
    for _ in range(30):
        w.refusal(8.06)  # 10 through: the window shrank
    assert w.opened == 8.05 and w.period < 4.0
    assert w.reopened(12.1, 91, 0.01) == 10


@pytest.mark.parametrize("n", [15, 5])
def test_a_window_that_shrinks_past_half_is_no_slower_than_the_pauses_alone(n: int) -> None:
    """40 per 4 s, then `n` from 10 s on (another job takes most of each window)."""
    sc = window_row(f"window-40-4-to{n}", 400, rate_schedule=((10.0, n / 4),))
    learnt, alone = against_the_pauses_alone(sc)
    assert learnt.violations == 0 and learnt.seconds <= alone.seconds, (learnt.line(),
                                                                         alone.line())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_window_behind_refusals_at_random_is_no_slower_than_the_pauses_alone(
        seed: int) -> None:
    """40 per 4 s with 5 % refused at random besides (a bare 429 both): refuted openings
    (above) keep the window's allowance (the tree before took 76-125 s, the pauses alone
    48-61)."""
    sc = window_row("window-40-4-random5", 400, refuse_fraction=0.05)
    learnt, alone = against_the_pauses_alone(sc, seed)
    assert learnt.violations == 0 and learnt.seconds <= alone.seconds, (learnt.line(),
                                                                         alone.line())


def test_a_closed_window_is_probed_one_request_at_a_time() -> None:
    """A window of 100 per 10 s with bare 429s, 64 workers, paced near 100/s when it closes:
    each probe of the closed window is one request, one refusal, a hold apart. The workers
    that come out of the hold with it wait for its answer (they went at the pace, and four
    went before the first refusal came back)."""
    r = run_row(row(BY_NAME["window-40-4"], "window-100-10", 1000, window_limit=100,
                    window_seconds=10.0), 0)
    refused = [a.at for a in r.arrivals if a.status != 200]
    reopened = min(a.at for a in r.arrivals if a.status == 200 and a.at > 0.5)
    probes = [t for t in refused if 0.5 < t < reopened]  # (the first volley's end at 0.25)
    assert len(probes) >= 5, refused
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(probes)), probes
    assert r.share >= 0.9, r.line()


def test_an_answer_sent_before_the_window_closed_does_not_reopen_it() -> None:
    """A window of 40 per 4 s with bare 429s and answers that take half a second: the first
    volley's refusals close the lane before its 40 successes answer. Those successes were
    sent before it closed, and say nothing of when it reopens: taken for a reopening, the
    pace was what got through since the first of them, 1/s, for a window granting 10/s.
    The probe that finds it open takes half a second to answer, and the rest do not wait
    for it: a refusal would have come back within its round trip."""
    r = run_row(row(BY_NAME["window-40-4"], "window-40-4-lat500", latency=0.5), 0)
    assert lane(r)["pace_lowest"] >= 5.0 and r.share >= 0.8, (r.line(), lane(r))
    sends = sorted(a.at for a in r.arrivals)
    probe = min(a.at for a in r.arrivals if a.status == 200 and a.at > 0.5)
    assert sends[sends.index(probe) + 1] < probe + 0.1, sends


@functools.cache
def bucket_answering_in_a_second() -> RowResult:
    """`bucket-seconds` with answers of a second, seed 0: the run three rules read."""
    return run_row(row(BUCKET, "bucket-seconds-lat1000", latency=1.0), 0)


def test_a_paced_lane_is_not_held_under_its_pace_by_the_slow_start() -> None:
    """A bucket of 50/s holding 10, answers that take a second: 50 must be in flight. The
    slow start's cap (8, doubled until the first refusal, then one more per four answers)
    grew by answers a second apart and held the lane to 16-30 in flight for seconds: 58 %
    of the limit. Once every lane is paced the pace governs, and the cap opens to the
    ceiling (test_limits.py has the rule itself)."""
    r = bucket_answering_in_a_second()
    assert r.share >= 0.85 and r.refused <= 0.05 * r.accepted, r.line()


def test_a_volley_refused_before_anything_answered_is_measured_by_its_answers() -> None:
    """Rule 1. Answers of a second and a whole-second Retry-After: the first refusal came
    back before any success, with nothing to measure, the lane left the pause unpaced and
    sent all the slots it had at once into a bucket holding 10: nine refused, and a second
    pause. The volley's answers, in during the pause, pace the lane now; on trial, as any
    first cut, at the pace its answers completed (a trial that kept the first answer's
    1/s took the completed 7/s for a pace grown past twice the cut and ended: a refusal
    at random then cut again, and one run of 20 % refused at random took 1.6 times as
    long as pausing for each refusal)."""
    refused = [a.at for a in bucket_answering_in_a_second().arrivals if a.status == 429]
    assert not [t for t in refused if 0.5 < t < 1.5], refused
    c = Controller(PaceConfig())
    c.on_answer(Answer(0.0, 0.001, False, wait=1.0))  # refused before anything answered
    assert c.rate is None
    for _ in range(7):
        c.on_answer(Answer(0.0, 0.01, True))  # the volley's answers, during the pause
    assert c.rate == pytest.approx(7 * c.cfg.margin)
    assert c.probation.trial is not None and c.probation.trial.pace == c.rate


def test_a_request_out_longer_than_a_refusal_takes_was_let_through() -> None:
    """A rate limit refuses at once: from a lane's first refusal on, a request out twice the
    refusals' round trip and 50 ms more is a success, heard of then, and its answer a
    latency later is no second one; one answered first is not counted again when its time
    comes (`verdicts`)."""
    v = Verdicts()
    v.sent(0.0)
    assert not v.pending  # no refusal yet: answers are the verdicts
    v.refused_in(0.001, sends=[0.0, 0.0, 0.5], answered=[0.0])
    v.sent(0.6)
    v.sent(0.7)
    assert v.verdict_in() == pytest.approx(0.052)
    assert v.due(0.55) == [0.0]
    assert v.answered(0.0) and not v.answered(0.0)  # its answer; then no such request out
    assert not v.answered(0.6)  # answered before its verdict: a success as any
    assert v.due(0.75) == [0.5]  # (0.6 was answered: no second success)
    assert v.answered(0.5)  # refused after all (a slower refusal): the controller's business
    for i in range(STALE_AT + 1):
        v.sent(1.0 + i * 1e-4)
    v.due(2.0)
    assert len(v.through) > STALE_AT
    v.sent(2.0 + STALE)
    v.due(2.0 + STALE)
    assert not v.through  # never answered (a 500, a timeout: no verdict comes): forgotten


def test_a_request_let_through_is_heard_of_when_due_not_at_the_next_send() -> None:
    """At a low pace the next send or answer is a second away: a lane hears of a request let
    through when its verdict is due (`Lane`), by a timer. Over real sockets a first volley
    went out over tens of milliseconds; its first refusal heard of one success, paced the
    lane at 1/s and heard of the rest only when their answers came, a second later."""
    async def go() -> int:
        lane = make_lane(LaneKey("http://x", "m"), PaceConfig(), None, True, "")
        lane.sent_at(0.0)
        lane.sent_at(0.0)
        await asyncio.sleep(0.001)
        lane.refused(0.001, 0.0, None, None)  # a bare 429 in a millisecond; one still out
        await asyncio.sleep(0.2)  # nothing else is sent or answered meanwhile
        return lane.controller.seen.total_ok

    assert run_virtual(go) == 1


def test_answers_of_a_second_are_judged_by_the_requests_let_through() -> None:
    """The matrix's rows with answers of a second (held-out rows, bench/heldout.py --slow):
    at a refusal, the successes the lane had heard of were sent a second earlier, at a lower
    pace while it ramped, and every rule that waits for answers waited a second: a limit
    that halves and comes back reached 80 % of a client that knew the schedule, and a bare
    bucket 82 % with 8 % refused. Heard of when let through, both are in their bands."""
    halved = run_row(row(BY_NAME["halved"], "halved-lat1000", latency=1.0), 0)
    assert halved.share >= 0.85 and halved.refused <= 0.05 * halved.accepted, halved.line()
    bare = bare_bucket_answering_in_a_second()
    assert bare.share >= 0.95 and bare.refused <= 0.05 * bare.accepted, bare.line()


@functools.cache
def bare_bucket_answering_in_a_second() -> RowResult:
    """`bucket-none` with answers of a second, seed 0: the run two of the echo's rules read."""
    return run_row(row(BY_NAME["bucket-none"], "bucket-none-lat1000", latency=1.0), 0)


def test_an_echo_waits_for_the_successes_it_sent_before_it_calls_the_server_closed() -> None:
    """A bucket of 50/s holding 10, bare 429s, answers that take a second. The echo of the
    first refusal heard twenty refusals (back at once) before the first success (back a
    second later), took the server for closed and held the lane; then everything waiting
    went at once, into the empty bucket, again and again: 69 % refused. It waits for what
    it sent in its span to answer now."""
    r = bare_bucket_answering_in_a_second()
    assert r.refused <= 0.1 * r.accepted and lane(r)["header_holds"] == 0, (r.line(), lane(r))


def test_what_a_refusal_cost_is_counted_to_the_next_success_sent_not_answered() -> None:
    """The plateau is long enough that a failed probe costs `overhead` of the time: a bare
    refusal's retry goes at once, so it costs the plateau's least, however long the answer
    then takes (counted to the answer, answers of a second made every refusal cost a second
    and the plateau 20 s at a pace 35 % under the limit)."""
    cfg = PaceConfig()
    p = Plateau()
    p.lost(10.0)
    p.regained(10.01, 11.01)  # sent 10 ms after the refusal, answered a second later
    assert p.cost == pytest.approx(0.01) and p.length(cfg) == cfg.plateau
    p.lost(20.0)
    p.regained(21.0, 21.02)  # a Retry-After of a second: that second is lost
    assert p.cost == pytest.approx(1.0) and p.length(cfg) == pytest.approx(1.0 / cfg.overhead)


def test_an_echo_listens_from_the_refusals_round_trip_not_the_successes_latency() -> None:
    """A bucket of 50/s holding 10, bare 429s, answers of a second, 5 s plateaus. The echo
    of a probe's refusal listened from a success's latency on, three seconds in all, while
    the probe grew from 34 to 465/s: 846 refused for 1000 lines. From the refusal's own
    round trip (a millisecond) it hears the probe's pace at once."""
    r = bare_bucket_answering_in_a_second()
    assert r.refused <= 0.1 * r.accepted and r.share >= 0.75, r.line()


def test_stated_limits_govern_and_refusals_only_pause() -> None:
    """x-ratelimit-* headers state the rate: the pace sits just under it, and nothing the
    refusals would teach moves it."""
    r = run_row(BY_NAME["bucket-xratelimit"], 0)
    end = lane(r)
    assert end["pace_source"] == "stated by x-ratelimit headers"
    assert 0.95 * 50 <= end["pace_requests_per_second"] <= 50 and end["pace_cuts"] == 0


def _successes(c: Controller, rate: float, start: float, seconds: float) -> float:
    """Answers of sends at `rate` for `seconds` from `start` (each answered in 10 ms)."""
    t = start
    while t < start + seconds:
        c.on_sent(t)
        c.on_answer(Answer(t, t + 0.01, True))
        t += 1.0 / rate
    return t


def test_a_pause_elsewhere_in_the_fleet_ends_a_probe_and_restarts_the_plateau() -> None:
    """With --redis a refusal anywhere is every process's: a probe above the rate measured
    goes back to it (the refusal it caused may have landed on another process), and the
    next probe waits a whole plateau, so the fleet probes as one process would."""
    c = Controller()
    fleet.join(c, 20.0)
    t = _successes(c, 20.0, 0.0, c.cfg.plateau + 3.0)
    assert c.rate is not None and c.rate > 20.0  # probing past the plateau
    change = fleet.paused_elsewhere(c, t)
    assert change is not None and change.rate == pytest.approx(20.0)
    _successes(c, 20.0, t, c.cfg.plateau - 1.0)
    assert c.rate == pytest.approx(20.0)  # the plateau again, no probe yet


def test_a_pause_elsewhere_in_the_fleet_stops_a_ramp_from_a_lower_bound() -> None:
    """A first cut is a lower bound the pace ramps from; with K processes ramping at once
    the fleet overshoots K times as fast, so the fleet's refusal makes where it got the
    measure: it plateaus there."""
    c = Controller()
    t = _successes(c, 200.0, 0.0, 0.5)  # unpaced, then refused with a hint: the first cut
    c.on_answer(Answer(t, t + 0.01, False, wait=1.0))
    assert c.rate is not None and c.limit is None
    t = _successes(c, c.rate, t + 1.0, 1.5)
    ramped = c.rate
    assert ramped is not None
    fleet.paused_elsewhere(c, t)
    assert c.limit == pytest.approx(ramped / c.cfg.margin)
    _successes(c, ramped, t + 1.0, 2.0)
    assert c.rate == pytest.approx(ramped)
