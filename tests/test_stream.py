"""Streaming: SSE aggregated into exactly the non-streamed body, whatever the chunking, and a
cut or errored stream is `ambiguous`, kept, and never re-sent."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, chat_line, clean_env, outcomes, run_cli, write_jsonl
from tmbatch.base.config import Settings
from tmbatch.client.http import idempotency_key, make_session, send, with_stream_usage
from tmbatch.client.sse import Aggregator, StreamError
from tmbatch.policy import AttemptFailed, Outcome

JOB = "streamjob01"
PROMPT = "héllo wörld, 日本語のテキスト 🎉 naïve café ∑ — done"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def body_for(route: str, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "tm-small", "stream": stream}
    if route == "/v1/chat/completions":
        b["messages"] = [{"role": "user", "content": PROMPT}]
        b["max_tokens"] = 64
    elif route == "/v1/completions":
        b["prompt"] = PROMPT
        b["max_tokens"] = 64
    else:
        b["input"] = PROMPT
        b["max_output_tokens"] = 64
    if stream:
        b = with_stream_usage(route, b)
    return b


def strip_ids(value: Any) -> Any:
    """Ids and timestamps differ between two calls; everything else must be equal."""
    if isinstance(value, dict):
        return {k: strip_ids(v) for k, v in value.items()
                if k not in ("id", "created", "created_at")}
    if isinstance(value, list):
        return [strip_ids(v) for v in value]
    return value


async def _fetch(url: str, route: str, stream: bool) -> tuple[bytes, str]:
    async with aiohttp.ClientSession() as s, s.post(
        url + route, json=body_for(route, stream),
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        assert r.status == 200
        return await r.read(), r.content_type


@pytest.fixture(scope="module")
def captured() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Per route: the simulator's raw SSE bytes, and its non-streamed body."""
    from tmbatch.sim import SimConfig, start_sim

    async def go() -> dict[str, tuple[bytes, dict[str, Any]]]:
        server = await start_sim(SimConfig(stream_chunks=16))
        try:
            out = {}
            for route in ROUTES:
                raw, ctype = await _fetch(server.url, route, True)
                assert ctype == "text/event-stream"
                plain, _ = await _fetch(server.url, route, False)
                out[route] = (raw, orjson.loads(plain))
            return out
        finally:
            await server.stop()

    return asyncio.run(go())


def aggregate(route: str, chunks: list[bytes]) -> dict[str, Any]:
    agg = Aggregator(route)
    for i, c in enumerate(chunks):
        agg.feed(c, float(i))
    return agg.finish()


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def test_captured_streams_really_have_multibyte_text(captured: Any) -> None:
    for route in ROUTES:
        raw, plain = captured[route]
        assert "日本語" in raw.decode("utf-8")
        assert b"data: [DONE]" in raw
        assert plain.get("usage"), route  # the non-streamed body counts tokens


@pytest.mark.parametrize("route", ROUTES)
def test_every_two_way_split_aggregates_to_the_plain_body(captured: Any, route: str) -> None:
    raw, plain = captured[route]
    want = strip_ids(plain)
    assert strip_ids(aggregate(route, [raw])) == want
    # every byte offset: mid-line, mid-"data:", mid-UTF-8 sequence, between \n\n
    for cut in range(1, len(raw)):
        got = aggregate(route, [raw[:cut], raw[cut:]])
        assert strip_ids(got) == want, cut


@pytest.mark.parametrize("route", ROUTES)
def test_one_byte_at_a_time_and_crlf(captured: Any, route: str) -> None:
    raw, plain = captured[route]
    want = strip_ids(plain)
    assert strip_ids(aggregate(route, [raw[i:i + 1] for i in range(len(raw))])) == want
    crlf = raw.replace(b"\n", b"\r\n")
    assert strip_ids(aggregate(route, split_at(crlf, list(range(1, len(crlf), 7))))) == want


def test_utf8_split_points_are_really_exercised(captured: Any) -> None:
    raw, _ = captured["/v1/chat/completions"]
    inside = [i for i in range(1, len(raw)) if 0x80 <= raw[i] <= 0xBF]  # continuation bytes
    assert len(inside) > 10  # so the split tests above did cut UTF-8 sequences


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_chunkings(captured: Any, data: Any) -> None:
    route = data.draw(st.sampled_from(ROUTES))
    raw, plain = captured[route]
    cuts = data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=40))
    assert strip_ids(aggregate(route, split_at(raw, cuts))) == strip_ids(plain)


def test_cut_stream_keeps_the_partial_and_is_a_stream_error(captured: Any) -> None:
    raw, plain = captured["/v1/chat/completions"]
    cut = raw.index(b"data: [DONE]")
    agg = Aggregator("/v1/chat/completions")
    agg.feed(raw[: cut - 40], 0.0)  # mid-event, before [DONE]
    with pytest.raises(StreamError) as info:
        agg.finish()
    assert info.value.code == "stream_cut"
    text = info.value.partial["choices"][0]["message"]["content"]
    assert text and plain["choices"][0]["message"]["content"].startswith(text)


def test_error_event_is_a_stream_error_even_after_done() -> None:
    agg = Aggregator("/v1/chat/completions")
    agg.feed(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"par"}}]}\n\n'
             b'data: {"error":{"message":"boom","code":500}}\n\ndata: [DONE]\n\n', 0.0)
    with pytest.raises(StreamError) as info:
        agg.finish()
    assert info.value.code == "stream_error" and "boom" in info.value.message
    assert info.value.partial["choices"][0]["message"]["content"] == "par"


def test_null_error_field_and_extra_deltas_are_kept() -> None:
    """`"error": null` is not an error; reasoning deltas concatenate like content."""
    agg = Aggregator("/v1/chat/completions")
    agg.feed(b'data: {"id":"a","error":null,"choices":[{"index":0,"delta":'
             b'{"role":"assistant","reasoning_content":"thi"}}]}\n'
             b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"nk","content":"A"},'
             b'"finish_reason":"stop","stop_reason":null}]}\n'
             b'data: [DONE]\n', 0.0)
    msg = agg.finish()["choices"][0]
    assert msg["message"] == {"role": "assistant", "content": "A", "reasoning_content": "think"}
    assert msg["finish_reason"] == "stop" and "stop_reason" in msg


def test_include_usage_is_added_only_when_unsaid() -> None:
    chat = {"model": "m", "stream": True}
    assert with_stream_usage("/v1/chat/completions", chat)["stream_options"] == {
        "include_usage": True}
    kept = {**chat, "stream_options": {"include_usage": False}}
    assert with_stream_usage("/v1/chat/completions", kept) is kept
    merged = with_stream_usage("/v1/completions", {**chat, "stream_options": {"x": 1}})
    assert merged["stream_options"] == {"x": 1, "include_usage": True}
    assert "stream_options" not in with_stream_usage("/v1/responses", chat)


# -- over a real socket, bytes dribbled out in awkward pieces --------------------------------

def _settings(url: str) -> Settings:
    return Settings(surface="serverless", base_url=url, api_key=API_KEY, user_id=None,
                    timeout=30, max_retries=0, ca_bundle=None)


async def _dribble_server(payload: bytes, pieces: list[bytes], cut: bool) -> tuple[Any, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "x-request-id": "rid-1"})
        await resp.prepare(request)
        for p in pieces:
            await resp.write(p)
            await asyncio.sleep(0.001)
        if cut:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_client_aggregates_a_dribbled_stream_over_a_socket(captured: Any) -> None:
    raw, plain = captured["/v1/chat/completions"]
    rnd = random.Random(7)
    pieces = split_at(raw, [rnd.randrange(1, len(raw)) for _ in range(60)])

    async def go() -> Any:
        runner, url = await _dribble_server(raw, pieces, cut=False)
        session = make_session(_settings(url), 2)
        try:
            return await send(session, "/v1/chat/completions",
                              body_for("/v1/chat/completions", True))
        finally:
            await session.close()
            await runner.cleanup()

    answer = asyncio.run(go())
    assert strip_ids(answer.body) == strip_ids(plain)
    assert answer.ttft is not None and answer.ttft <= answer.latency


def test_client_classifies_a_socket_cut_as_ambiguous_with_the_partial(captured: Any) -> None:
    raw, _ = captured["/v1/chat/completions"]
    half = raw[: len(raw) // 2]

    async def go() -> AttemptFailed:
        runner, url = await _dribble_server(half, [half], cut=True)
        session = make_session(_settings(url), 2)
        try:
            with pytest.raises(AttemptFailed) as info:
                await send(session, "/v1/chat/completions",
                           body_for("/v1/chat/completions", True))
            return info.value
        finally:
            await session.close()
            await runner.cleanup()

    exc = asyncio.run(go())
    assert exc.cls is Outcome.AMBIGUOUS and exc.code == "stream_cut"
    assert exc.status == 200 and exc.request_id == "rid-1"
    assert exc.body["choices"][0]["message"]["content"]


# -- end to end: tmbatch run against the simulator ------------------------------------------

def _lines(stream: bool) -> list[dict[str, Any]]:
    rows = []
    for i, route in enumerate(ROUTES * 3):
        body = body_for(route, stream)
        body.pop("stream_options", None)
        if route == "/v1/chat/completions":
            body["messages"][0]["content"] += f" #{i}"
        elif route == "/v1/completions":
            body["prompt"] += f" #{i}"
        else:
            body["input"] += f" #{i}"
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": route, "body": body})
    return rows


def _run(sim: Any, inp: Path, out: Path, *args: str) -> Any:
    return run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--job-id", JOB,
                    "-q", *args], env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))


def test_streamed_run_equals_plain_run(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY, stream_chunks=5)
    plain_in = write_jsonl(tmp_path / "plain.jsonl", _lines(False))
    p = _run(sim, plain_in, tmp_path / "plain")
    assert p.returncode == 0, p.stderr
    # the same lines, streamed by the --stream flag (bodies say nothing about stream)
    for r in (unsaid := _lines(False)):
        r["body"].pop("stream")
    unsaid_in = write_jsonl(tmp_path / "unsaid.jsonl", unsaid)
    p = _run(sim, unsaid_in, tmp_path / "flag", "--stream")
    assert p.returncode == 0, p.stderr
    streamed_in = write_jsonl(tmp_path / "streamed.jsonl", _lines(True))
    p = _run(sim, streamed_in, tmp_path / "body")
    assert p.returncode == 0, p.stderr
    plain, _ = outcomes(tmp_path / "plain")
    assert len(plain) == 9
    for name in ("flag", "body"):
        got, fail = outcomes(tmp_path / name)
        assert fail == {}
        assert set(got) == set(plain)
        for cid, rec in got.items():
            assert strip_ids(rec["response"]["body"]) == strip_ids(plain[cid]["response"]["body"])
            assert rec["timing"]["ttft_ms"] is not None and rec["timing"]["total_ms"] > 0
            assert "timing" not in plain[cid]
    summary = orjson.loads((tmp_path / "flag" / "summary.json").read_bytes())
    assert summary["this_run"]["ttft_ms"]["count"] == 9
    assert summary["this_run"]["tokens"]["completion"] > 0


@pytest.mark.parametrize("hook", [{"cut_after": 3}, {"sse_error": True, "cut_after": 2}])
def test_cut_or_errored_stream_is_ambiguous_and_sent_once(
    sim_factory: Any, tmp_path: Path, hook: dict[str, Any]
) -> None:
    sim = sim_factory(api_key=API_KEY, stream_chunks=6)
    rows = [chat_line(i, stream=True) for i in range(4)]
    rows[1]["body"]["sim"] = hook
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    p = _run(sim, inp, tmp_path / "out", "--max-retries", "5")
    assert p.returncode == 1, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert set(res) == {"req-0", "req-2", "req-3"} and set(fail) == {"req-1"}
    f = fail["req-1"]
    assert f["error"]["class"] == "ambiguous"
    assert f["error"]["code"] == ("stream_error" if "sse_error" in hook else "stream_cut")
    assert f["attempts"] == 1
    kept = f["response"]["body"]["choices"][0]["message"]
    assert kept["role"] == "assistant" and kept["content"]  # what arrived is kept
    stats = sim.stats()
    assert stats["processed"][idempotency_key(JOB, "req-1")] == 1  # received exactly once
    assert stats["duplicates"] == 0


def test_fast_path_chunks_aggregate_like_the_general_path() -> None:
    """Content-only chunks take a shortcut; mixing them with every other kind of chunk
    (role, tool calls, finish, usage, an extra field, a second choice) must give the same
    body as feeding the same events where no chunk can take the shortcut."""
    from tmbatch.client.sse import Aggregator

    def sse(obj: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "logprobs": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": " wo"}, "stop_reason": None}]},
        {**base, "choices": [{"index": 1, "delta": {"role": "assistant", "content": "x"}}]},
        {**base, "choices": [{"index": 1, "delta": {"content": "y"}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "rld"}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                          "total_tokens": 8}},
    ]
    fast = Aggregator("/v1/chat/completions")
    fast.feed(b"".join(sse(e) for e in events) + b"data: [DONE]\n\n", 0.0)
    slow = Aggregator("/v1/chat/completions")
    for e in events:  # a second, empty choice list entry defeats the shortcut everywhere
        e2 = {**e, "choices": [*e["choices"], {"index": 9, "delta": {}}]} if e["choices"] else e
        slow.feed(sse(e2), 0.0)
    slow.feed(b"data: [DONE]\n\n", 0.0)
    got, want = fast.finish(), slow.finish()
    want["choices"] = [c for c in want["choices"] if c["index"] != 9]
    assert got == want
    assert got["choices"][0]["message"]["content"] == "Hello world"
    assert got["choices"][1]["message"]["content"] == "xy"
