"""The simulator's bodies are what the openai SDK's types accept (issue 12).

tmbatch is tested mostly against its own simulator; a body there that a real client would
reject (a `/v1/responses` body without `parallel_tool_calls`, `tool_choice`, `tools` or the
`usage.*_details`) hides exactly the bugs the conformance suite found. Real HTTP to the
simulator on 127.0.0.1, streamed and not: every response object in the stream (the in-progress
one of `response.created` too) and every chat / completion body validates.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import SimThread

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def post(sim: SimThread, route: str, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(sim.url + route, data=orjson.dumps(body), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of a data-only SSE stream, checking that it ends with [DONE]."""
    data = [line[5:].strip() for line in raw.splitlines() if line.startswith(b"data:")]
    assert data[-1] == b"[DONE]"
    return [orjson.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("max_output_tokens", [None, 2], ids=["completed", "incomplete"])
def test_responses_body_and_stream_are_sdk_responses(sim: SimThread,
                                                     max_output_tokens: int | None) -> None:
    body: dict[str, Any] = {"model": "tm-small", "input": "hello there, simulator"}
    if max_output_tokens is not None:
        body["max_output_tokens"] = max_output_tokens
    plain = Response.model_validate(orjson.loads(post(sim, "/v1/responses", body)))
    assert plain.output_text and plain.usage is not None
    events = sse_events(post(sim, "/v1/responses", {**body, "stream": True}))
    for event in events:
        STREAM_EVENT.validate_python(event)
    responses = [Response.model_validate(e["response"]) for e in events if "response" in e]
    assert [r.status for r in responses] == ["in_progress", plain.status]
    final = responses[-1]
    assert final.output_text == plain.output_text
    assert final.usage == plain.usage


def test_chat_and_completion_bodies_and_chunks_are_sdk_types(sim: SimThread) -> None:
    chat = {"model": "tm-small", "messages": [{"role": "user", "content": "hi"}]}
    ChatCompletion.model_validate(orjson.loads(post(sim, "/v1/chat/completions", chat)))
    options = {"stream": True, "stream_options": {"include_usage": True}}
    for event in sse_events(post(sim, "/v1/chat/completions", {**chat, **options})):
        ChatCompletionChunk.model_validate(event)
    completion = {"model": "tm-small", "prompt": "hi"}
    Completion.model_validate(orjson.loads(post(sim, "/v1/completions", completion)))
    events = sse_events(post(sim, "/v1/completions", {**completion, **options}))
    # the SDK reuses Completion for stream chunks without validating them: its finish_reason
    # is not nullable, as it is in every chunk but the last, so only those two are checked
    ended = [e for e in events if all(c["finish_reason"] for c in e["choices"])]
    assert len(ended) == 2  # the finish chunk and the usage chunk (no choices)
    for event in ended:
        Completion.model_validate(event)
