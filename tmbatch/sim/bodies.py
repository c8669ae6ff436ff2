"""Answer text and the OpenAI-shaped bodies and SSE events that carry it.

Answers are deterministic (an echo of the prompt, or one allowed label chosen by crc32) so that
tests can assert on them and label-mode runs give the same labels in every process. One `Answer`
renders both the plain body and the stream, so streamed and non-streamed answers always agree.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from tmbatch.sim.config import (
    ANSWER_PREFIX,
    MAX_MODEL_LEN,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_RESPONSES,
)
from tmbatch.sim.state import SimState, next_id

SSE_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"


def _content_text(content: Any) -> str:
    """Message content is either a string or a list of typed parts (text / input_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return ""


def _messages_text(messages: list[Any]) -> tuple[str, str]:
    """(full text of all messages, text of the last user message or else the last message)."""
    texts = []
    last_user = None
    for message in messages:
        if not isinstance(message, dict):
            continue
        text = _content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    if last_user is None:
        last_user = texts[-1] if texts else ""
    return "\n".join(texts), last_user


def prompt_text(route: str, body: dict[str, Any]) -> tuple[str, str] | str:
    """(full prompt, the part the answer echoes); a plain str is a 400 message."""
    if route == ROUTE_CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        return _messages_text(messages)
    if route == ROUTE_COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = " ".join(f"tok{t}" for t in prompt)  # one pre-tokenized prompt
        elif isinstance(prompt, list) and prompt:
            prompt = prompt[0]  # batched prompts: the simulator answers the first one only
            if isinstance(prompt, list):
                prompt = " ".join(f"tok{t}" for t in prompt)
        if not isinstance(prompt, str):
            return "'prompt' must be a string or a list of strings"
        return prompt, prompt
    given = body.get("input")
    if isinstance(given, str):
        return given, given
    if isinstance(given, list) and given:
        return _messages_text(given)
    return "'input' must be a string or a non-empty list of input items"


def _label_choice(full: str) -> str | None:
    """Label mode: answer with exactly one allowed label, stable across processes (crc32)."""
    lowered = full.lower()
    at = lowered.find("allowed labels:")
    if at < 0:
        return None
    rest = full[at + len("allowed labels:") :].split("\n", 1)[0]
    labels = [label.strip().strip("\"'`.").strip() for label in rest.split(",")]
    labels = [label for label in labels if label]
    if not labels:
        return None
    return labels[zlib.crc32(full.encode()) % len(labels)]


def _max_tokens(route: str, body: dict[str, Any]) -> int | None:
    names = {
        ROUTE_CHAT: ("max_completion_tokens", "max_tokens"),
        ROUTE_COMPLETIONS: ("max_tokens",),
        ROUTE_RESPONSES: ("max_output_tokens",),
    }[route]
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass
class Answer:
    """Everything needed to render one answer, streamed or not, identically."""

    route: str
    model: str
    text: str
    words: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    rid: str
    created: int
    choices: int = 1  # the body's `n` (chat and completions): that many copies of the choice


def build_answer(
    state: SimState, route: str, body: dict[str, Any], model: str, full: str, echo: str
) -> Answer:
    """Whitespace is normalised so that re-joining streamed word groups reproduces the text."""
    label = _label_choice(full)
    words = label.split() if label is not None else (ANSWER_PREFIX + echo[:60]).split()
    finish = "stop"
    cap = _max_tokens(route, body)
    if cap is not None and len(words) > cap:
        words = words[:cap]
        finish = "length"
    n = body.get("n") if route in (ROUTE_CHAT, ROUTE_COMPLETIONS) else None
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    return Answer(
        route=route,
        model=model,
        text=" ".join(words),
        words=words,
        finish_reason=finish,
        prompt_tokens=len(full) // 4 + 1,
        completion_tokens=len(words) * n,  # billed as OpenAI bills `n`: every choice's output
        rid=next_id(state),
        created=int(time.time()),
        choices=n,
    )


# ----------------------------------------------------------------------------------------------
# Rendering


def _head(a: Answer, route: str, obj: str) -> dict[str, Any]:
    """The fields every chat / completion body and chunk starts with."""
    prefix = "chatcmpl-" if route == ROUTE_CHAT else "cmpl-"
    return {"id": prefix + a.rid, "object": obj, "created": a.created, "model": a.model}


def _chat_body(a: Answer) -> dict[str, Any]:
    message = {"role": "assistant", "content": a.text}
    return {**_head(a, ROUTE_CHAT, "chat.completion"),
            "choices": [{"index": i, "message": message, "finish_reason": a.finish_reason}
                        for i in range(a.choices)],
            "usage": _usage(a)}


def _completion_body(a: Answer) -> dict[str, Any]:
    return {**_head(a, ROUTE_COMPLETIONS, "text_completion"),
            "choices": [{"index": i, "text": a.text, "finish_reason": a.finish_reason,
                         "logprobs": None} for i in range(a.choices)],
            "usage": _usage(a)}


def _usage(a: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens + a.completion_tokens,
    }


def _message_item(a: Answer, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": "msg_" + a.rid,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _response_body(a: Answer, done: bool = True) -> dict[str, Any]:
    """Every field the openai SDK's `Response` type requires is here (parallel_tool_calls,
    tool_choice, tools, the usage details): a client that validates bodies accepts ours,
    as it must accept a real server's. The simulator never calls tools."""
    incomplete = None if a.finish_reason == "stop" else {"reason": "max_output_tokens"}
    return {
        "id": "resp_" + a.rid,
        "object": "response",
        "created_at": a.created,
        "status": "completed" if done else "in_progress",
        "model": a.model,
        "output": [_message_item(a, "completed", a.text)] if done else [],
        "incomplete_details": incomplete if done else None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": a.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": a.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        }
        if done
        else None,
    }


def full_body(a: Answer) -> dict[str, Any]:
    if a.route == ROUTE_CHAT:
        return _chat_body(a)
    if a.route == ROUTE_COMPLETIONS:
        return _completion_body(a)
    return _response_body(a)


def _pieces(words: list[str], chunks: int) -> list[str]:
    """Split into at most `chunks` deltas whose concatenation is exactly " ".join(words)."""
    if not words:
        return []
    n = min(chunks, len(words))
    size, extra = divmod(len(words), n)
    pieces = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        piece = " ".join(words[start:end])
        pieces.append(piece if i == 0 else " " + piece)
        start = end
    return pieces


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_events(a: Answer, body: dict[str, Any], chunks: int) -> list[bytes]:
    """All data events of a stream except the final [DONE]."""
    pieces = _pieces(a.words, chunks)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if a.route == ROUTE_CHAT:
        return _chat_events(a, pieces, include_usage)
    if a.route == ROUTE_COMPLETIONS:
        return _completion_events(a, pieces, include_usage)
    return _response_events(a, pieces)


def _chat_events(a: Answer, pieces: list[str], include_usage: bool) -> list[bytes]:
    head = _head(a, ROUTE_CHAT, "chat.completion.chunk")

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": piece}, None) for piece in pieces)
    events.append(chunk({}, a.finish_reason))
    if include_usage:
        events.append(_sse({**head, "choices": [], "usage": _usage(a)}))
    return events


def _completion_events(a: Answer, pieces: list[str], include_usage: bool) -> list[bytes]:
    head = _head(a, ROUTE_COMPLETIONS, "text_completion")

    def chunk(text: str, finish: str | None) -> bytes:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return _sse({**head, "choices": [choice]})

    events = [chunk(piece, None) for piece in pieces]
    events.append(chunk("", a.finish_reason))
    if include_usage:
        events.append(_sse({**head, "choices": [], "usage": _usage(a)}))
    return events


def _response_events(a: Answer, pieces: list[str]) -> list[bytes]:
    item_id = "msg_" + a.rid
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    full_part = {"type": "output_text", "text": a.text, "annotations": []}
    objs: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response_body(a, done=False)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": _message_item(a, "in_progress", None),
        },
        {"type": "response.content_part.added", **where, "part": empty_part},
    ]
    text_event = {**where, "logprobs": []}
    objs.extend({"type": "response.output_text.delta", **text_event, "delta": p} for p in pieces)
    objs.append({"type": "response.output_text.done", **text_event, "text": a.text})
    objs.append({"type": "response.content_part.done", **where, "part": full_part})
    objs.append(
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": _message_item(a, "completed", a.text),
        }
    )
    objs.append({"type": "response.completed", "response": _response_body(a)})
    for number, obj in enumerate(objs):
        obj["sequence_number"] = number
    return [_sse(obj) for obj in objs]


def _token_ids(text: str) -> list[int]:
    return [zlib.crc32(word.encode()) % 50000 for word in text.split()]


def tokenize_body(body: dict[str, Any]) -> dict[str, Any] | str:
    if isinstance(body.get("prompt"), str):
        text = body["prompt"]
    elif isinstance(body.get("messages"), list):
        text = _messages_text(body["messages"])[0]
    else:
        return "'prompt' (string) or 'messages' (list) is required"
    tokens = _token_ids(text)
    return {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}


def detokenize_body(body: dict[str, Any]) -> dict[str, Any] | str:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        return "'tokens' must be a list of integers"
    return {"prompt": " ".join(f"tok{t}" for t in tokens)}
