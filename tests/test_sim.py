"""Tests of the local simulator over real sockets: the rest of the suite trusts its accounting,
so the accounting itself has to be proven here."""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import run_cli
from tmbatch.sim import (
    SimConfig,
    SimServer,
    add_sim_arguments,
    build_app,
    sim_config_from_args,
    start_sim,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"

Scenario = Callable[[SimServer, aiohttp.ClientSession], Awaitable[None]]


class FakeClock:
    """The simulator's accounting clock (arrivals, limits, Retry-After windows), moved by the
    test: a pause is waited out by moving it, not by sleeping. The sockets stay real."""

    def __init__(self) -> None:
        self.now = 1000.0  # steps of 1/2**k seconds stay exact on it

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_with_sim(config: SimConfig, scenario: Scenario, clock: FakeClock | None = None) -> None:
    """pytest-asyncio is not a dependency: each test runs its own loop and server."""

    async def main() -> None:
        server = await (start_sim(config) if clock is None else start_sim(config, clock=clock))
        try:
            async with aiohttp.ClientSession() as session:
                await scenario(server, session)
        finally:
            await server.stop()

    asyncio.run(main())


def chat_body(text: str = "Hello there, simulator!", **extra: Any) -> dict[str, Any]:
    return {"model": "tm-small", "messages": [{"role": "user", "content": text}], **extra}


def body_for(route: str, text: str, **extra: Any) -> dict[str, Any]:
    if route == CHAT:
        return chat_body(text, **extra)
    if route == COMPLETIONS:
        return {"model": "tm-small", "prompt": text, **extra}
    return {"model": "tm-small", "input": text, **extra}


def text_of(route: str, body: dict[str, Any]) -> str:
    if route == CHAT:
        return body["choices"][0]["message"]["content"]
    if route == COMPLETIONS:
        return body["choices"][0]["text"]
    return body["output"][0]["content"][0]["text"]


async def post(
    session: aiohttp.ClientSession,
    server: SimServer,
    route: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    async with session.post(server.url + route, json=body, headers=headers) as resp:
        raw = await resp.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = raw
        return resp.status, parsed, resp.headers


def sse_data(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


# ----------------------------------------------------------------------------------------------
# Shapes


def test_every_route_has_the_openai_shape() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        request_ids = set()
        status, body, headers = await post(session, server, CHAT, chat_body("Say hello."))
        assert status == 200
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["model"] == "tm-small" and isinstance(body["created"], int)
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["finish_reason"] == "stop"
        assert choice["message"] == {
            "role": "assistant",
            "content": "Simulated answer to: Say hello.",
        }
        usage = body["usage"]
        assert usage["completion_tokens"] == 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        request_ids.add(headers["x-request-id"])

        status, body, headers = await post(
            session, server, COMPLETIONS, {"model": "tm-large", "prompt": "Once upon a time"}
        )
        assert status == 200 and body["object"] == "text_completion"
        assert body["choices"][0] == {
            "index": 0,
            "text": "Simulated answer to: Once upon a time",
            "finish_reason": "stop",
            "logprobs": None,
        }
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        request_ids.add(headers["x-request-id"])

        status, body, headers = await post(
            session, server, RESPONSES, {"model": "tm-small", "input": "Tell me."}
        )
        assert status == 200
        assert body["object"] == "response" and body["id"].startswith("resp_")
        assert body["status"] == "completed" and isinstance(body["created_at"], int)
        item = body["output"][0]
        assert item["type"] == "message" and item["id"].startswith("msg_")
        assert item["status"] == "completed" and item["role"] == "assistant"
        assert item["content"] == [
            {"type": "output_text", "text": "Simulated answer to: Tell me.", "annotations": []}
        ]
        assert set(body["usage"]) == {"input_tokens", "output_tokens", "total_tokens",
                                      "input_tokens_details", "output_tokens_details"}
        request_ids.add(headers["x-request-id"])

        status, body, headers = await post(
            session, server, "/tokenize", {"model": "tm-small", "prompt": "one two three"}
        )
        assert status == 200 and body["count"] == 3 and body["max_model_len"] == 8192
        assert len(body["tokens"]) == 3 and all(isinstance(t, int) for t in body["tokens"])
        request_ids.add(headers["x-request-id"])
        status, again, _ = await post(
            session, server, "/tokenize", {"model": "tm-small", "prompt": "one two three"}
        )
        assert again["tokens"] == body["tokens"]
        status, chat_tokens, _ = await post(session, server, "/tokenize", chat_body("a b"))
        assert status == 200 and chat_tokens["count"] == 2

        status, body, headers = await post(
            session, server, "/detokenize", {"model": "tm-small", "tokens": [12, 345]}
        )
        assert status == 200 and body == {"prompt": "tok12 tok345"}
        request_ids.add(headers["x-request-id"])

        async with session.get(server.url + "/v1/models") as resp:
            assert resp.status == 200
            models = await resp.json()
            request_ids.add(resp.headers["x-request-id"])
        assert models == {
            "object": "list",
            "data": [
                {"id": "tm-small", "object": "model", "created": 0, "owned_by": "tensormesh"},
                {"id": "tm-large", "object": "model", "created": 0, "owned_by": "tensormesh"},
            ],
        }
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 200 and await resp.read() == b""
            request_ids.add(resp.headers["x-request-id"])
        async with session.get(server.url + "/version") as resp:
            assert await resp.json() == {"version": "tmbatch-sim 1"}
            request_ids.add(resp.headers["x-request-id"])
        assert len(request_ids) == 8

        async with session.get(server.url + "/nowhere") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == 404

        stats = server.stats()
        assert stats["completion_calls"] == 3 and stats["tokenize_calls"] == 3
        assert stats["received"] == 7
        assert stats["by_route"]["/v1/models"]["received"] == 1
        assert stats["processed_total"] == 3 and stats["duplicates"] == 0
        async with session.get(server.url + "/_sim/stats") as resp:
            served = await resp.json()
        assert served["processed"] == stats["processed"]
        assert served["time_now"] >= stats["time_now"]

    run_with_sim(SimConfig(), scenario)


def test_bad_requests_are_openai_errors_and_not_processed() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, body, _ = await post(session, server, CHAT, {**chat_body(), "model": "nope"})
        assert status == 404
        assert body == {
            "error": {
                "message": "The model `nope` does not exist.",
                "type": "NotFoundError",
                "code": 404,
            }
        }
        status, body, _ = await post(session, server, CHAT, {"messages": []})
        assert status == 400 and set(body["error"]) == {"message", "type", "code"}
        async with session.post(server.url + CHAT, data=b"[1, 2]") as resp:
            assert resp.status == 400
        async with session.post(server.url + CHAT, data=b"{not json") as resp:
            assert resp.status == 400
        status, _, _ = await post(session, server, CHAT, {"model": "tm-small", "messages": []})
        assert status == 400
        stats = server.stats()
        assert stats["processed_total"] == 0
        assert stats["status_counts"] == {"404": 1, "400": 4}

    run_with_sim(SimConfig(), scenario)


def test_max_tokens_truncates_with_length() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        _, body, _ = await post(session, server, CHAT, chat_body("a b c d", max_tokens=2))
        assert body["choices"][0]["message"]["content"] == "Simulated answer"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 2
        _, body, _ = await post(
            session, server, RESPONSES, {"model": "tm-small", "input": "x", "max_output_tokens": 1}
        )
        assert text_of(RESPONSES, body) == "Simulated"

    run_with_sim(SimConfig(), scenario)


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS, RESPONSES])
def test_streams_reassemble_to_the_plain_answer(route: str) -> None:
    prompt = "Stream   me\na fairly long answer with many words in it please"

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        _, plain, _ = await post(session, server, route, body_for(route, prompt))
        expected = text_of(route, plain)
        stream_body = body_for(route, prompt, stream=True, stream_options={"include_usage": True})
        async with session.post(server.url + route, json=stream_body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            data = sse_data(await resp.read())
        assert data[-1] == "[DONE]"
        events = [orjson.loads(d) for d in data[:-1]]
        if route == CHAT:
            assert all(e["object"] == "chat.completion.chunk" for e in events)
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(
                e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]
            )
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
            assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
            deltas = sum(
                1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")
            )
        elif route == COMPLETIONS:
            assert all(e["object"] == "text_completion" for e in events)
            text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            assert events[-1]["usage"] == plain["usage"]
            deltas = sum(1 for e in events if e["choices"] and e["choices"][0]["text"])
        else:
            types = [e["type"] for e in events]
            assert types[:3] == [
                "response.created",
                "response.output_item.added",
                "response.content_part.added",
            ]
            assert types[-4:] == [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
            assert events[0]["response"]["status"] == "in_progress"
            text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            done = next(e for e in events if e["type"] == "response.output_text.done")
            assert done["text"] == expected
            completed = events[-1]["response"]
            assert completed["usage"] == plain["usage"]
            assert text_of(RESPONSES, completed) == expected
            deltas = types.count("response.output_text.delta")
        assert text == expected
        assert deltas == 8  # default stream_chunks, and the answer has more words than that

    run_with_sim(SimConfig(), scenario)


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        async with session.post(server.url + CHAT, json=chat_body("hi", stream=True)) as resp:
            data = sse_data(await resp.read())
        events = [orjson.loads(d) for d in data[:-1]]
        assert all(e["choices"] for e in events)
        # "Simulated answer to: hi" is 4 words, fewer than stream_chunks: one delta per word
        assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) == 4

    run_with_sim(SimConfig(stream_chunks=8), scenario)


def test_label_mode_answers_one_allowed_label_deterministically() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        labels = {"positive", "negative", "neutral"}
        seen = set()
        for i in range(12):
            messages = [
                {
                    "role": "system",
                    "content": "Classify.\nALLOWED LABELS: positive, negative, neutral\n",
                },
                {"role": "user", "content": f"review number {i}"},
            ]
            body = {"model": "tm-small", "messages": messages}
            _, first, _ = await post(session, server, CHAT, body)
            _, second, _ = await post(session, server, CHAT, body)
            answer = text_of(CHAT, first)
            assert answer in labels and text_of(CHAT, second) == answer
            seen.add(answer)
        assert len(seen) > 1
        _, body, _ = await post(
            session,
            server,
            COMPLETIONS,
            {"model": "tm-small", "prompt": "Text: meh\nAllowed labels: spam, ham.\nLabel:"},
        )
        assert text_of(COMPLETIONS, body) in {"spam", "ham"}

    run_with_sim(SimConfig(), scenario)


# ----------------------------------------------------------------------------------------------
# Auth and routing


def test_serverless_auth_needs_bearer_on_post_only() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, body, _ = await post(session, server, CHAT, chat_body())
        assert status == 401 and body["error"]["type"] == "AuthenticationError"
        status, _, _ = await post(
            session, server, CHAT, chat_body(), {"Authorization": "Bearer wrong"}
        )
        assert status == 401
        status, _, _ = await post(
            session, server, "/tokenize", {"model": "tm-small", "prompt": "x"}
        )
        assert status == 401
        status, _, _ = await post(
            session, server, CHAT, chat_body(), {"Authorization": "Bearer sk-test"}
        )
        assert status == 200
        async with session.get(server.url + "/v1/models") as resp:
            assert resp.status == 200
        stats = server.stats()
        assert stats["auth"] == {
            "bearer_ok": 1,
            "bearer_wrong": 1,
            "bearer_missing": 3,
            "user_ids": [],
        }
        assert stats["processed_total"] == 1

    run_with_sim(SimConfig(api_key="sk-test"), scenario)


def test_on_demand_needs_user_id_and_key_on_every_route() -> None:
    user = "00000000-0000-0000-0000-000000000001"
    good = {"Authorization": "Bearer sk-test", "X-User-Id": user}

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, body, _ = await post(
            session, server, CHAT, chat_body(), {"Authorization": "Bearer sk-test"}
        )
        assert status == 404
        assert body["error"]["message"] == "no route: missing or unknown X-User-Id"
        status, _, _ = await post(
            session, server, CHAT, chat_body(), {**good, "X-User-Id": "someone-else"}
        )
        assert status == 404
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 404
        async with session.get(server.url + "/health", headers={"X-User-Id": user}) as resp:
            assert resp.status == 401
        async with session.get(server.url + "/v1/models", headers=good) as resp:
            assert resp.status == 200
        status, _, _ = await post(session, server, CHAT, chat_body(), good)
        assert status == 200
        assert sorted(server.stats()["auth"]["user_ids"]) == sorted([user, "someone-else"])

    run_with_sim(SimConfig(api_key="sk-test", user_id=user), scenario)


# ----------------------------------------------------------------------------------------------
# Rate limiting and Retry-After


@pytest.mark.parametrize("fmt", ["seconds", "http-date", "ms", "llm-provider", "none"])
def test_rate_limit_answers_429_in_each_retry_after_format(fmt: str) -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        statuses = []
        headers = None
        for i in range(3):
            status, body, hdrs = await post(session, server, CHAT, chat_body(f"q{i}"))
            statuses.append(status)
            if status == 429:
                headers = hdrs
                assert body["error"]["type"] == "RateLimitError"
        assert statuses == [200, 200, 429]
        assert headers is not None
        if fmt == "seconds":
            assert headers["Retry-After"] == "1"
        elif fmt == "http-date":
            when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
            assert 0 < when - time.time() <= 2.01
        elif fmt == "ms":
            # the real wait (about 1/rate from the last token), to the millisecond
            assert "Retry-After" not in headers
            assert 400 < int(headers["retry-after-ms"]) <= 500
        elif fmt == "llm-provider":
            assert headers["llm_provider-retry-after"] == "1"
            assert "Retry-After" not in headers and "retry-after-ms" not in headers
        else:
            assert "Retry-After" not in headers and "retry-after-ms" not in headers
            assert "llm_provider-retry-after" not in headers
        stats = server.stats()
        assert stats["rejected_429"] == 1 and stats["processed_total"] == 2

    run_with_sim(SimConfig(rate_limit=2, retry_after_format=fmt), scenario)


def test_computed_retry_after_and_ratelimit_headers() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        _, _, headers = await post(session, server, CHAT, chat_body("a"))
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] in {"4s", "3.999s", "4.0s"}
        status, _, headers = await post(session, server, CHAT, chat_body("b"))
        assert status == 429
        assert headers["Retry-After"] == "4"  # ceil of the time until the bucket has a token
        assert "x-ratelimit-remaining-requests" in headers

    run_with_sim(SimConfig(rate_limit=0.25, ratelimit_headers=True), scenario)


def test_ignoring_retry_after_is_counted_as_a_violation() -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 200
        status, _, headers = await post(session, server, CHAT, chat_body("b"))
        assert status == 429 and headers["Retry-After"] == "0.6"
        clock.advance(0.02)  # past the grace (10 ms), well inside the announced pause
        await post(session, server, CHAT, chat_body("b"))
        await post(session, server, "/tokenize", {"model": "tm-small", "prompt": "x"})
        assert server.stats()["retry_after_violations"] == 2

    run_with_sim(SimConfig(rate_limit=1, retry_after=0.6), scenario, clock)


def test_honouring_retry_after_is_not_a_violation() -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 200
        assert (await post(session, server, CHAT, chat_body("a2")))[0] == 200
        status, _, headers = await post(session, server, CHAT, chat_body("b"))
        assert status == 429
        # a request that crossed the 429 on the wire arrives inside the grace
        clock.advance(0.005)
        await post(session, server, CHAT, chat_body("c"))
        clock.advance(int(headers["retry-after-ms"]) / 1000)
        assert (await post(session, server, CHAT, chat_body("b")))[0] == 200
        stats = server.stats()
        assert stats["retry_after_violations"] == 0
        assert stats["rejected_429"] == 2

    run_with_sim(SimConfig(rate_limit=2, retry_after=0.5, retry_after_format="ms"), scenario,
                 clock)


@pytest.mark.parametrize("fmt", ["seconds", "http-date", "ms", "llm-provider", "none"])
def test_every_hint_that_announces_a_pause_opens_a_window(fmt: str) -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 200
        assert (await post(session, server, CHAT, chat_body("b")))[0] == 429
        clock.advance(0.2)  # past the grace, inside a 0.6 s (or later) pause
        await post(session, server, CHAT, chat_body("b"))
        # "none" announces nothing, so arriving early breaks no promise
        expected = 0 if fmt == "none" else 1
        assert server.stats()["retry_after_violations"] == expected

    run_with_sim(SimConfig(rate_limit=1, retry_after=0.6, retry_after_format=fmt), scenario,
                 clock)


def test_headers_may_state_a_bigger_bucket_than_the_one_enforced() -> None:
    """--sim-ratelimit-stated-burst: the headers count a bucket of 100 at the same rate, the
    server enforces its burst of 2 (a per-minute limit enforced per second)."""
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        answers = [await post(session, server, CHAT, chat_body(f"q{i}")) for i in range(4)]
        assert [a[0] for a in answers] == [200, 200, 429, 429]
        assert {a[2]["x-ratelimit-limit-requests"] for a in answers} == {"100"}
        assert answers[1][2]["x-ratelimit-remaining-requests"] == "98"  # room, it says

    run_with_sim(SimConfig(rate_limit=0.01, rate_burst=2, ratelimit_headers=True,
                           ratelimit_stated_burst=100), scenario)


def test_burst_sets_how_many_pass_at_once() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        statuses = [(await post(session, server, CHAT, chat_body(f"q{i}")))[0] for i in range(8)]
        # the bucket starts full with 5 and refills one token in 100 s: 5 pass, then 429s
        assert statuses == [200] * 5 + [429] * 3
        _, _, headers = await post(session, server, CHAT, chat_body("x"))
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["Retry-After"] == "100"  # the real wait for a token, rounded up
        assert server.stats()["rejected_by"] == {"requests": 4}

    run_with_sim(SimConfig(rate_limit=0.01, rate_burst=5, ratelimit_headers=True), scenario)


def test_fixed_window_admits_exactly_n_per_window() -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        statuses = []
        for i in range(60):
            status, _, headers = await post(session, server, CHAT, chat_body(f"q{i}"))
            statuses.append(status)
            if status == 429:
                assert "Retry-After" not in headers and "retry-after-ms" not in headers
            clock.advance(1 / 64)  # 16 arrivals a window, the last of the four cut short
        stats = server.stats()
        window = stats["window"]
        ok: dict[int, int] = {}
        refused: set[int] = set()
        for arrived, _, _, status, _ in stats["log"]:
            index = int((arrived - window["epoch"]) // window["seconds"])
            if status == 200:
                ok[index] = ok.get(index, 0) + 1
            else:
                refused.add(index)
        assert refused == {0, 1, 2, 3}
        # each window admitted exactly its 3 first, and refused the rest
        assert ok == {0: 3, 1: 3, 2: 3, 3: 3}
        assert statuses == ([200] * 3 + [429] * 13) * 3 + [200] * 3 + [429] * 9
        assert len(stats["log"]) == 60 and stats["rejected_429"] == 60 - sum(ok.values())

    run_with_sim(
        SimConfig(window_limit=3, window_seconds=0.25, retry_after_format="none"), scenario,
        clock,
    )


def test_fixed_window_headers_and_retry_after_count_down_to_the_next_window() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        remaining = []
        for i in range(2):
            status, _, headers = await post(session, server, CHAT, chat_body(f"q{i}"))
            assert status == 200 and headers["x-ratelimit-limit-requests"] == "2"
            remaining.append(headers["x-ratelimit-remaining-requests"])
        assert remaining == ["1", "0"]
        status, _, headers = await post(session, server, CHAT, chat_body("q2"))
        assert status == 429
        assert 1 <= int(headers["Retry-After"]) <= 30  # until the window ends, whole seconds
        assert headers["x-ratelimit-reset-requests"].endswith("s")

    run_with_sim(SimConfig(window_limit=2, window_seconds=30, ratelimit_headers=True), scenario)


def test_a_body_naming_no_served_model_is_refused_before_the_limits() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, _, headers = await post(session, server, CHAT, {**chat_body(), "model": "nope"})
        assert status == 404 and headers["x-ratelimit-remaining-requests"] == "1"
        async with session.post(server.url + CHAT, data=b"{not json") as resp:
            assert resp.status == 400
        # neither cost a token: the bucket of one still admits one, then refuses
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 200
        assert (await post(session, server, CHAT, chat_body("b")))[0] == 429
        # and once it is empty, a bad body is still told what is wrong with it
        assert (await post(session, server, CHAT, {**chat_body(), "model": "nope"}))[0] == 404
        assert server.stats()["rejected_429"] == 1

    run_with_sim(SimConfig(rate_limit=0.01, rate_burst=1, ratelimit_headers=True), scenario)


def test_tokens_per_minute_charges_usage_and_refuses_in_debt() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, body, headers = await post(session, server, CHAT, chat_body("a fairly long q"))
        assert status == 200
        used = body["usage"]["total_tokens"]
        assert used > 5  # more than the budget holds: it is now in debt
        assert headers["x-ratelimit-remaining-tokens"] == "0"
        assert headers["x-ratelimit-remaining-requests"] == "1"
        status, body, headers = await post(session, server, CHAT, chat_body("b"))
        assert status == 429 and "tokens" in body["error"]["message"]
        # the tokens refusal did not cost a request: one of the two is still there
        assert headers["x-ratelimit-remaining-requests"] == "1"
        # the debt (used - 5 tokens) refills at 0.1 token/s: the wait says so, rounded up
        assert int(headers["Retry-After"]) >= (used - 5) * 10
        stats = server.stats()
        assert stats["rejected_by"] == {"tokens": 1} and stats["processed_total"] == 1
        # every POST route is gated, tokenize too, though only generation is charged
        status, _, _ = await post(session, server, "/tokenize", {"model": "tm-small",
                                                                   "prompt": "x"})
        assert status == 429

    run_with_sim(
        SimConfig(rate_limit=0.001, rate_burst=2, tpm_limit=6, tpm_burst=5,
                  ratelimit_headers=True),
        scenario,
    )


def test_x_ratelimit_remaining_zero_opens_a_window_until_room() -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, _, headers = await post(session, server, CHAT, chat_body("a"))
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1s"
        clock.advance(0.25)  # past the grace, well before the next token (1 s)
        status, _, headers = await post(session, server, CHAT, chat_body("b"))
        assert status == 429 and "Retry-After" not in headers
        assert server.stats()["retry_after_violations"] == 1
        # honouring the reset: wait what it says, then the next one passes without blame
        reset = headers["x-ratelimit-reset-requests"]
        assert reset == "750ms"
        clock.advance(int(reset[:-2]) / 1000)
        status, _, _ = await post(session, server, CHAT, chat_body("b"))
        assert status == 200
        assert server.stats()["retry_after_violations"] == 1

    run_with_sim(SimConfig(rate_limit=1, ratelimit_headers=True, retry_after_format="none"),
                 scenario, clock)


def test_capacity_queues_instead_of_refusing_and_never_exceeds_n() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        results = await asyncio.gather(
            *(post(session, server, CHAT, chat_body(f"q{i}")) for i in range(9))
        )
        assert [status for status, _, _ in results] == [200] * 9  # nobody refused
        capacity = server.stats()["capacity"]
        assert capacity["slots"] == 3
        assert capacity["running_peak"] == 3  # full, and never more than its 3
        assert capacity["waited"] >= 1 and capacity["queued_peak"] >= 1
        assert capacity["running"] == 0 and capacity["queued"] == 0  # all handed back
        assert capacity["finished"] == 9
        assert capacity["first_start"] < capacity["last_finish"] <= server.stats()["time_now"]
        # tokenize is not generation: it does not wait for a slot
        status, _, _ = await post(session, server, "/tokenize", {"model": "tm-small",
                                                                   "prompt": "x"})
        assert status == 200

    run_with_sim(SimConfig(capacity=3, latency=0.3), scenario)


def test_rate_schedule_changes_the_accepted_rate_at_the_given_time() -> None:
    from tmbatch.sim.limits import ScheduledBucket

    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        resets = []
        for i in range(64):  # a second, an arrival every 1/64 s
            status, _, headers = await post(session, server, CHAT, chat_body(f"q{i}"))
            if status == 200:
                resets.append(headers["x-ratelimit-reset-requests"])
            clock.advance(1 / 64)
        stats = server.stats()
        epoch = stats["epoch"]
        log = [(e[0] - epoch, e[3]) for e in stats["log"]]
        before = sum(1 for t, s in log if t < 0.5 and s == 200)
        after = sum(1 for t, s in log if t >= 0.5 and s == 200)
        # 0.5 s at 2/s holding 1: the burst only; then 0.5 s at 20/s holding 1: a token
        # every 50 ms, taken by the next arrival (every 1/64 s): 8 of the 32
        assert before == 1 and after == 8, log
        # the server's every decision is the pure bucket's on the same arrival times
        bucket = ScheduledBucket(2, 1, 1, epoch, epoch=epoch, schedule=((0.5, 20),))
        replay = []
        for t, _ in log:
            ok = bucket.wait(epoch + t) == 0.0
            if ok:
                bucket.take(epoch + t)
            replay.append(200 if ok else 429)
        assert replay == [s for _, s in log]
        # the headers follow the rate in force: a token per 500 ms, then per 50 ms
        assert resets[0] == "500ms" and resets[-1] == "50ms"

    run_with_sim(
        SimConfig(rate_limit=2, rate_burst=1, rate_schedule=((0.5, 20),), ratelimit_headers=True),
        scenario, clock,
    )


# ----------------------------------------------------------------------------------------------
# Limits per model


def large(text: str) -> dict[str, Any]:
    return {**chat_body(text), "model": "tm-large"}


@pytest.mark.parametrize("scope", ["account", "model"])
def test_model_scope_limits_each_model_on_its_own(scope: str) -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        small = [(await post(session, server, CHAT, chat_body(f"s{i}")))[0] for i in range(3)]
        assert small == [200, 200, 429]
        status, _, headers = await post(session, server, CHAT, large("l0"))
        if scope == "model":  # its own bucket, full, and its own headers
            assert status == 200 and headers["x-ratelimit-remaining-requests"] == "1"
            assert (await post(session, server, CHAT, large("l1")))[0] == 200
            assert (await post(session, server, CHAT, large("l2")))[0] == 429
        else:  # one bucket for the account, emptied by tm-small
            assert status == 429 and headers["x-ratelimit-remaining-requests"] == "0"
        # a body naming no served model meets no model's limits: no headers to give
        _, _, headers = await post(session, server, CHAT, {**chat_body(), "model": "nope"})
        assert ("x-ratelimit-limit-requests" in headers) == (scope == "account")

    run_with_sim(SimConfig(rate_limit=0.01, rate_burst=2, ratelimit_headers=True,
                           limit_scope=scope), scenario)


@pytest.mark.parametrize("scope", ["account", "model"])
def test_model_scope_keeps_retry_after_windows_per_model(scope: str) -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 200
        status, _, headers = await post(session, server, CHAT, chat_body("b"))
        assert status == 429 and headers["Retry-After"] == "0.6"
        clock.advance(0.2)  # past the grace, inside tm-small's announced pause
        status, _, _ = await post(session, server, CHAT, large("c"))
        # in its own scope tm-large was promised nothing: not a violation, and admitted
        assert server.stats()["retry_after_violations"] == (1 if scope == "account" else 0)
        assert status == (429 if scope == "account" else 200)
        await post(session, server, CHAT, chat_body("b"))  # tm-small inside its own window
        assert server.stats()["retry_after_violations"] == (2 if scope == "account" else 1)

    run_with_sim(SimConfig(rate_limit=0.01, rate_burst=1, retry_after=0.6, limit_scope=scope),
                 scenario, clock)


def test_model_scope_covers_fixed_windows_but_not_capacity() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        # a fixed window of 1 per model: each model's first passes, its second is refused
        statuses = [(await post(session, server, CHAT, body))[0]
                    for body in (chat_body("a"), chat_body("b"), large("c"), large("d"))]
        assert statuses == [200, 429, 200, 429]
        # one slot for the account, whichever model: the two queue one behind the other
        slow = {"sim": {"sleep": 0.2}}
        server.reset()
        results = await asyncio.gather(post(session, server, CHAT, chat_body("x", **slow)),
                                       post(session, server, CHAT, large("y") | slow))
        assert [r[0] for r in results] == [200, 200]
        capacity = server.stats()["capacity"]
        assert capacity["running_peak"] == 1 and capacity["waited"] == 1

    run_with_sim(SimConfig(window_limit=1, window_seconds=30, retry_after_format="none",
                           capacity=1, limit_scope="model"), scenario)


@pytest.mark.parametrize("refusal", ["random", "hook"])
def test_model_scope_windows_of_other_refusals_are_the_models_too(refusal: str) -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        hook = {"sim": {"status": 503, "retry_after": 0.6}} if refusal == "hook" else {}
        assert (await post(session, server, CHAT, chat_body("a", **hook)))[0] == 503
        clock.advance(0.2)  # past the grace, inside tm-small's announced pause
        await post(session, server, CHAT, large("b") | hook)
        assert server.stats()["retry_after_violations"] == 0
        await post(session, server, CHAT, chat_body("c", **hook))
        assert server.stats()["retry_after_violations"] == 1

    run_with_sim(SimConfig(refuse_fraction=1.0 if refusal == "random" else 0.0,
                           refuse_status=503, retry_after=0.6, limit_scope="model"),
                 scenario, clock)


def test_model_scope_charges_each_models_tokens_budget() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, _, headers = await post(session, server, CHAT, chat_body("a fairly long q"))
        assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "0"  # in debt
        status, body, _ = await post(session, server, CHAT, chat_body("b"))
        assert status == 429 and "tokens" in body["error"]["message"]
        status, _, headers = await post(session, server, CHAT, large("c"))
        assert status == 200  # tm-large's budget was untouched

    run_with_sim(SimConfig(tpm_limit=6, tpm_burst=5, ratelimit_headers=True,
                           limit_scope="model"), scenario)


# ----------------------------------------------------------------------------------------------
# Refusals at random


def test_random_refusals_refuse_about_the_share_and_the_seed_fixes_which() -> None:
    from tmbatch.sim.overload import RandomRefusal

    runs: list[dict[str, int]] = []

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        seen = {}
        for i in range(60):
            key = f"r{i % 40}"  # 20 keys arrive twice: a re-send gets a fresh draw
            seen[f"{key}/{i // 40}"] = (
                await post(session, server, CHAT, chat_body(), {"Idempotency-Key": key}))[0]
        runs.append(seen)
        stats = server.stats()
        refused = sum(1 for s in seen.values() if s == 503)
        assert stats["refused_random"] == stats["rejected_503"] == refused
        assert stats["rejected_429"] == 0 and stats["rejected_by"] == {}
        assert stats["processed_total"] == 60 - refused

    config = SimConfig(refuse_fraction=0.3, refuse_status=503, seed=11)
    run_with_sim(config, scenario)
    run_with_sim(config, scenario)
    assert runs[0] == runs[1]
    assert set(runs[0].values()) == {200, 503}
    refused = sum(1 for s in runs[0].values() if s == 503)
    assert 8 <= refused <= 30  # about 30 % of 60
    # the same draws, without a server: per (seed, key, arrival of that key)
    pure = RandomRefusal(0.3, 11)
    assert refused == sum(pure.refuses(f"r{i % 40}") for i in range(60))
    other = RandomRefusal(0.3, 12)
    assert [other.refuses(f"r{i % 40}") for i in range(60)] != [
        s == 503 for s in runs[0].values()
    ]


@pytest.mark.parametrize("fmt", ["seconds", "http-date", "ms", "llm-provider", "none"])
def test_random_refusals_announce_the_pause_in_each_format(fmt: str) -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, body, headers = await post(session, server, CHAT, chat_body("a"))
        assert status == 429 and body["error"]["type"] == "RateLimitError"
        assert "overloaded" in body["error"]["message"]
        if fmt == "seconds":
            assert headers["Retry-After"] == "1"  # no --sim-retry-after: one second
        elif fmt == "http-date":
            when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
            assert 0 < when - time.time() <= 2.01
        elif fmt == "ms":
            assert headers["retry-after-ms"] == "1000" and "Retry-After" not in headers
        elif fmt == "llm-provider":
            assert headers["llm_provider-retry-after"] == "1" and "Retry-After" not in headers
        else:
            assert not {"Retry-After", "retry-after-ms", "llm_provider-retry-after"} & set(
                headers)
        # only billable routes are refused at random
        status, _, _ = await post(session, server, "/tokenize", {"model": "tm-small",
                                                                   "prompt": "x"})
        assert status == 200
        assert server.stats()["refused_random"] == 1

    run_with_sim(SimConfig(refuse_fraction=1.0, retry_after_format=fmt), scenario)


def test_random_refusals_announce_retry_after_and_open_windows() -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        status, _, headers = await post(session, server, CHAT, chat_body("a"))
        assert status == 503 and headers["Retry-After"] == "0.6"
        clock.advance(0.2)  # past the grace, inside the announced pause
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 503
        stats = server.stats()
        assert stats["retry_after_violations"] == 1 and stats["rejected_503"] == 2

    run_with_sim(SimConfig(refuse_fraction=1.0, refuse_status=503, retry_after=0.6),
                 scenario, clock)


def test_random_refusals_cost_no_token_and_come_after_the_key_and_model() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        auth = {"Authorization": "Bearer k"}
        assert (await post(session, server, CHAT, chat_body()))[0] == 401
        assert (await post(session, server, CHAT, {**chat_body(), "model": "x"}, auth))[0] == 404
        statuses = []
        for i in range(24):
            status, _, headers = await post(session, server, CHAT, chat_body(f"q{i}"), auth)
            statuses.append(status)
            if status == 503:  # the bucket's headers, untouched by the refusal
                assert headers["x-ratelimit-limit-requests"] == "3"
        assert set(statuses) == {200, 429, 503}
        # the bucket of 3 (no refill to speak of) admitted the first three not refused at
        # random, and refused the rest: a refusal at random took none of its tokens
        admitted = [s for s in statuses if s != 503]
        assert admitted == [200] * 3 + [429] * (len(admitted) - 3)
        stats = server.stats()
        assert stats["refused_random"] == statuses.count(503)
        assert stats["rejected_by"] == {"requests": statuses.count(429)}

    run_with_sim(
        SimConfig(rate_limit=0.001, rate_burst=3, api_key="k", ratelimit_headers=True,
                  refuse_fraction=0.5, refuse_status=503, seed=3),
        scenario,
    )


def test_reset_header_uses_openai_duration_text() -> None:
    from tmbatch.sim.limits import openai_duration

    cases = {0.0: "0s", 0.25: "250ms", 0.0004: "1ms", 1.0: "1s", 1.5: "1.5s", 360.0: "6m0s",
             3723.5: "1h2m3.5s", 59.9991: "1m0s"}
    assert {value: openai_duration(value) for value in cases} == cases


# ----------------------------------------------------------------------------------------------
# Processing accounting


def test_processed_and_duplicates_follow_idempotency_keys() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        for key in ("k1", "k1", "k2", "k3", "k3", "k3"):
            status, _, _ = await post(session, server, CHAT, chat_body(), {"Idempotency-Key": key})
            assert status == 200
        # the same body without a key is one request, identified by its hash
        await post(session, server, COMPLETIONS, {"model": "tm-small", "prompt": "p"})
        await post(session, server, COMPLETIONS, {"model": "tm-small", "prompt": "p"})
        # rejections are not processings
        hook = {"sim": {"status": 429, "retry_after": 0}}
        await post(session, server, CHAT, chat_body(**hook), {"Idempotency-Key": "k4"})
        stats = server.stats()
        assert stats["processed"]["k1"] == 2 and stats["processed"]["k3"] == 3
        assert "k4" not in stats["processed"]
        assert stats["duplicates"] == 3
        assert stats["duplicate_keys"][:2] == ["k1", "k3"]
        assert stats["duplicate_keys"][2].startswith("body-")
        assert stats["processed_total"] == 8 and stats["processed_keys"] == 4
        assert stats["rejected_429"] == 1
        assert [entry[2] for entry in stats["log"][:3]] == ["k1", "k1", "k2"]
        assert all(entry[0] <= stats["time_now"] for entry in stats["log"])
        assert stats["log"][-1][1:] == [CHAT, "k4", 429, "tm-small"]

        async with session.post(server.url + "/_sim/reset") as resp:
            assert resp.status == 200
        stats = server.stats()
        assert stats["processed"] == {} and stats["received"] == 0 and stats["log"] == []

    run_with_sim(SimConfig(), scenario)


def test_by_model_counts_billable_arrivals_and_the_log_names_the_model() -> None:
    clock = FakeClock()

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        assert (await post(session, server, CHAT, chat_body("a")))[0] == 200
        assert (await post(session, server, CHAT, chat_body("b")))[0] == 429
        clock.advance(0.2)  # past the grace, inside the pause announced to tm-small
        assert (await post(session, server, COMPLETIONS,
                           {"model": "tm-large", "prompt": "c"}))[0] == 200
        assert (await post(session, server, CHAT, chat_body("d")))[0] == 429
        # not billable, or naming no served model: in no model's count
        await post(session, server, "/tokenize", {"model": "tm-small", "prompt": "x"})
        await post(session, server, CHAT, {**chat_body(), "model": "nope"})
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 200
        stats = server.stats()
        assert stats["by_model"] == {
            "tm-small": {"received": 3, "ok": 1, "refused": 2, "violations": 1},
            "tm-large": {"received": 1, "ok": 1, "refused": 0, "violations": 0},
        }
        # tokenize arrived inside tm-small's window too; the 404 is in no model's scope
        assert stats["retry_after_violations"] == 2
        assert [(e[1], e[3], e[4]) for e in stats["log"]] == [
            (CHAT, 200, "tm-small"), (CHAT, 429, "tm-small"), (COMPLETIONS, 200, "tm-large"),
            (CHAT, 429, "tm-small"), ("/tokenize", 429, "tm-small"), (CHAT, 404, None),
            ("/health", 200, None),
        ]
        server.reset()
        assert server.stats()["by_model"]["tm-small"] == {
            "received": 0, "ok": 0, "refused": 0, "violations": 0}

    run_with_sim(SimConfig(rate_limit=0.01, rate_burst=1, retry_after=0.6, limit_scope="model"),
                 scenario, clock)


def test_log_is_capped() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        for i in range(5):
            await post(session, server, CHAT, chat_body(f"m{i}"))
        stats = server.stats()
        assert len(stats["log"]) == 3 and stats["log_overflow"] == 2

    run_with_sim(SimConfig(log_limit=3), scenario)


# ----------------------------------------------------------------------------------------------
# Test hooks


def test_hook_status_with_times_then_normal_answers() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        body = chat_body(sim={"status": 500, "times": 1})
        key = {"Idempotency-Key": "h500"}
        status, err, _ = await post(session, server, CHAT, body, key)
        assert status == 500 and err["error"]["code"] == 500
        status, _, _ = await post(session, server, CHAT, body, key)
        assert status == 200
        assert server.stats()["processed"]["h500"] == 2

        body = chat_body(sim={"status": 429, "times": 2, "retry_after": 3})
        key = {"Idempotency-Key": "h429"}
        for _ in range(2):
            status, _, headers = await post(session, server, CHAT, body, key)
            assert status == 429 and headers["Retry-After"] == "3"
        assert "h429" not in server.stats()["processed"]
        status, _, _ = await post(session, server, CHAT, body, key)
        assert status == 200

        body = chat_body(sim={"status": 503, "times": 1})
        status, _, headers = await post(session, server, CHAT, body, {"Idempotency-Key": "h503"})
        assert status == 503 and headers["Retry-After"] == "7"
        stats = server.stats()
        assert "h503" not in stats["processed"] and stats["rejected_503"] == 1
        assert stats["processed"]["h429"] == 1

    run_with_sim(SimConfig(retry_after=7), scenario)


def test_hook_drop_looks_like_a_disconnect_but_is_processed() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(
                session, server, CHAT, chat_body(sim={"drop": True}), {"Idempotency-Key": "d"}
            )
        stats = server.stats()
        assert stats["processed"] == {"d": 1} and stats["dropped"] == 1
        assert stats["status_counts"] == {"0": 1}
        # the session keeps working after the server closed a pooled connection
        assert (await post(session, server, CHAT, chat_body()))[0] == 200

    run_with_sim(SimConfig(), scenario)


def test_hook_cut_after_ends_the_stream_without_done() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        received: list[bytes] = []
        body = chat_body("cut me off please now", stream=True, sim={"cut_after": 2})
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(server.url + CHAT, json=body) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    received.append(line)
        data = [line for line in received if line.startswith(b"data: ")]
        assert len(data) == 2 and b"[DONE]" not in b"".join(received)
        assert server.stats()["processed_total"] == 1

    run_with_sim(SimConfig(), scenario)


def test_hook_sse_error_and_bad_json_and_sleep() -> None:
    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        body = body_for(RESPONSES, "x", stream=True, sim={"sse_error": True})
        async with session.post(server.url + RESPONSES, json=body) as resp:
            raw = (await resp.read()).decode()
        assert "event: error\n" in raw and "[DONE]" not in raw
        error_data = [d for d in sse_data(raw.encode()) if '"error"' in d]
        assert orjson.loads(error_data[-1])["error"]["code"] == 500

        status, parsed, _ = await post(session, server, CHAT, chat_body(sim={"bad_json": True}))
        assert status == 200 and isinstance(parsed, bytes)

        started = time.monotonic()
        status, _, _ = await post(session, server, CHAT, chat_body(sim={"sleep": 0.3}))
        assert status == 200 and time.monotonic() - started >= 0.3

    run_with_sim(SimConfig(), scenario)


def test_random_faults_are_deterministic_per_seed() -> None:
    outcomes: list[dict[str, int]] = []

    async def scenario(server: SimServer, session: aiohttp.ClientSession) -> None:
        seen = {}
        for i in range(40):
            key = f"r{i}"
            try:
                status, _, _ = await post(
                    session, server, CHAT, chat_body(), {"Idempotency-Key": key}
                )
            except aiohttp.ServerDisconnectedError:
                status = 0
            seen[key] = status
        outcomes.append(seen)
        stats = server.stats()
        assert stats["processed_total"] == 40
        assert stats["injected_500"] == sum(1 for s in seen.values() if s == 500)

    config = SimConfig(error_500=0.3, drop_after_read=0.2, seed=7)
    run_with_sim(config, scenario)
    run_with_sim(config, scenario)
    assert outcomes[0] == outcomes[1]
    assert {0, 200, 500} <= set(outcomes[0].values())


# ----------------------------------------------------------------------------------------------
# Construction and command line


def test_cli_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    ns = parser.parse_args(
        [
            "--sim-latency",
            "0.5",
            "--sim-jitter",
            "0.1",
            "--sim-rate-limit",
            "20",
            "--sim-rate-burst",
            "4",
            "--sim-tpm-limit",
            "6000",
            "--sim-tpm-burst",
            "50",
            "--sim-capacity",
            "8",
            "--sim-retry-after",
            "2",
            "--sim-retry-after-format",
            "http-date",
            "--sim-ratelimit-headers",
            "--sim-error-500",
            "0.1",
            "--sim-drop-after-read",
            "0.05",
            "--sim-slow",
            "0.01",
            "--sim-slow-seconds",
            "3",
            "--sim-api-key",
            "k",
            "--sim-user-id",
            "u",
            "--sim-models",
            "a, b",
            "--sim-stream-chunks",
            "3",
            "--sim-seed",
            "9",
            "--sim-refuse-fraction",
            "0.25",
            "--sim-refuse-status",
            "503",
            "--sim-rate-schedule",
            "15:10, 30:20",
            "--sim-limit-scope",
            "model",
        ]
    )
    config = sim_config_from_args(ns)
    assert config == SimConfig(
        latency=0.5,
        latency_jitter=0.1,
        rate_limit=20,
        rate_burst=4,
        tpm_limit=6000,
        tpm_burst=50,
        capacity=8,
        retry_after=2,
        retry_after_format="http-date",
        ratelimit_headers=True,
        error_500=0.1,
        drop_after_read=0.05,
        slow=0.01,
        slow_seconds=3,
        api_key="k",
        user_id="u",
        models=("a", "b"),
        stream_chunks=3,
        seed=9,
        refuse_fraction=0.25,
        refuse_status=503,
        rate_schedule=((15, 10), (30, 20)),
        limit_scope="model",
    )
    assert sim_config_from_args(parser.parse_args([])) == SimConfig()
    window = parser.parse_args(["--sim-window-limit", "20", "--sim-window-seconds", "5",
                                "--sim-retry-after-format", "llm-provider"])
    assert sim_config_from_args(window) == SimConfig(
        window_limit=20, window_seconds=5, retry_after_format="llm-provider"
    )
    for bad in (["--sim-error-500", "2"], ["--sim-capacity", "0"], ["--sim-window-seconds", "0"],
                ["--sim-rate-limit", "5", "--sim-window-limit", "5"],
                ["--sim-refuse-fraction", "1.5"], ["--sim-refuse-fraction", "x"],
                ["--sim-refuse-status", "500"], ["--sim-refuse-status", "busy"],
                ["--sim-rate-schedule", "15"], ["--sim-rate-schedule", "15:x"],
                ["--sim-rate-schedule", "0:5"], ["--sim-rate-schedule", "30:5,15:5"],
                ["--sim-rate-schedule", "15:0"], ["--sim-rate-schedule", ""],
                ["--sim-limit-scope", "team"], ["--sim-limit-scope", "Model"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    for wrong in ({"retry_after_format": "minutes"}, {"rate_limit": 5, "window_limit": 5},
                  {"rate_limit": 5, "rate_burst": 0.5}, {"capacity": 0}, {"tpm_limit": 0},
                  {"refuse_fraction": -0.1}, {"refuse_status": 500},
                  {"rate_schedule": ((1, 5),)}, {"limit_scope": "key"}):
        with pytest.raises(ValueError):
            SimConfig(**wrong)
    # flags that do not combine are a usage error naming the flags, not a traceback
    with pytest.raises(ValueError, match=r"--sim-rate-schedule .* needs --sim-rate-limit"):
        sim_config_from_args(parser.parse_args(["--sim-rate-schedule", "1:5"]))
    assert build_app(SimConfig()) is not None


def test_the_cli_reports_flags_that_do_not_combine_as_a_usage_error() -> None:
    # a subprocess: main() in-process would set up the tmbatch logger for the whole session
    done = run_cli(["sim", "--sim-rate-schedule", "1:5", "--sim-tpm-limit", "600"], timeout=30)
    assert done.returncode == 2
    assert "--sim-rate-schedule" in done.stderr and "--sim-rate-limit" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_sim_forever_serves_and_stops_on_sigterm() -> None:
    code = (
        "from tmbatch.sim import SimConfig, run_sim_forever; "
        "run_sim_forever(SimConfig(), '127.0.0.1', 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().strip()
        assert line.startswith("tmbatch sim listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]

        async def probe() -> None:
            async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
                assert resp.status == 200

        asyncio.run(probe())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
