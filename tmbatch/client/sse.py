"""Aggregate a data-only SSE stream into the body a non-streamed call returns.

So `results.jsonl` looks the same whether a line streamed or not. A stream is
complete at `data: [DONE]`, or, on /v1/responses, at its terminal event
(`response.completed` / `response.incomplete` / `response.failed`): vLLM and other
servers end a Responses stream there, with or without a `[DONE]` after it. A stream
that ends before that, or carries an error event, is `ambiguous`: tokens were
generated and billed, the answer is incomplete.

Each `data:` line is one event (what OpenAI-compatible servers send); a server
that splits one JSON event over several `data:` lines is not supported. Lines
end in LF or CRLF. The network may cut the bytes anywhere, mid-line or inside
a UTF-8 sequence: bytes are kept until their line is complete and only whole
lines are decoded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_LINE_BYTES = 16 * 1024 * 1024  # one event this large is a broken server, not an answer


class StreamError(Exception):
    def __init__(self, code: str, message: str, partial: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial = partial


@dataclass
class _Choice:
    index: int
    role: str | None = None
    # every string `delta.content`, "" included: none at all (a tool call whose deltas say
    # `content: null` or nothing) rebuilds as `content: null`, as the unstreamed body has it
    content: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    # other string deltas (reasoning_content, refusal, ...): concatenated like content
    more: dict[str, list[str]] = field(default_factory=dict)
    # other choice fields (stop_reason, ...): the last value seen wins
    extra: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] | None = None


RESPONSES = "/v1/responses"
RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_CHOICE_KEYS = {"index", "delta", "text", "finish_reason", "logprobs"}
_META_KEYS = ("id", "created", "model", "system_fingerprint")


def _merge_logprobs(c: _Choice, lp: Any) -> None:
    """Streamed logprobs arrive as lists per chunk; the final body has them concatenated."""
    if not isinstance(lp, dict):
        return
    if c.logprobs is None:
        c.logprobs = {}
    for key, value in lp.items():
        if isinstance(value, list):
            c.logprobs.setdefault(key, []).extend(value)


@dataclass
class Aggregator:
    """Feed it raw bytes in any chunking; it splits lines itself (mid-UTF-8 safe)."""

    route: str
    buf: bytearray = field(default_factory=bytearray)
    done: bool = False
    event: str | None = None
    first_token_at: float | None = None
    last_at: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, _Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    response: dict[str, Any] | None = None  # /v1/responses: from response.completed
    resp_text: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    events: int = 0
    bytes_in: int = 0

    def feed(self, data: bytes, now: float) -> None:
        self.last_at = now
        self.bytes_in += len(data)
        if data.find(b"\n") < 0:  # not `in`: see records.ResultRecord.to_json
            self.buf += data
            self._check_line_length()
            return
        self.buf += data
        lines = bytes(self.buf).split(b"\n")
        self.buf = bytearray(lines.pop())
        for line in lines:
            self._line(line.rstrip(b"\r"), now)
        self._check_line_length()

    def _check_line_length(self) -> None:
        if len(self.buf) > MAX_LINE_BYTES:
            self.buf.clear()
            raise StreamError(
                "stream_bad_event", f"a stream line is over {MAX_LINE_BYTES} bytes",
                self.partial(),
            )

    def _line(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):  # data lines first: they are nearly all of them
            if not line:
                self.event = None
            elif line.startswith(b"event:"):
                self.event = line[6:].strip().decode("utf-8", "replace")
            return  # otherwise a comment / keep-alive or a field we do not use
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamError(
                "stream_bad_event",
                f"stream event {self.events + 1} is not JSON: "
                f"{payload[:200].decode('utf-8', 'replace')!r}",
                self.partial(),
            ) from None
        self.events += 1
        if not isinstance(obj, dict):
            return
        if self.event == "error" or (obj.get("error") and obj.get("type") in (None, "error")):
            err = obj.get("error") or obj
            self.error = err if isinstance(err, dict) else {"message": str(err)}
            return
        if self.route == RESPONSES:
            self._responses_event(obj, now)
        else:
            self._chunk(obj, now)

    def _chunk(self, obj: dict[str, Any], now: float) -> None:
        choices = obj.get("choices")
        if self.meta and len(choices or ()) == 1 and not obj.get("usage"):
            ch = choices[0]  # type: ignore[index]
            delta = ch.get("delta") if type(ch) is dict else None
            # The common chunk: one choice whose delta is only more content. Appending it is
            # all the general path below would do, at a fraction of the interpreter work
            # (64 events a stream; bench scenario f).
            if (
                type(delta) is dict and len(delta) == 1 and type(delta.get("content")) is str
                and ch.get("finish_reason") is None and ch.get("logprobs") is None
                and "text" not in ch and ch.keys() <= _CHOICE_KEYS
            ):
                c = self.choices.get(ch.get("index", 0))
                if c is not None:
                    c.content.append(delta["content"])
                    if self.first_token_at is None and delta["content"]:
                        self.first_token_at = now
                    for key in _META_KEYS:
                        if key in obj and key not in self.meta:
                            self.meta[key] = obj[key]
                    return
        for key in _META_KEYS:
            if key in obj and key not in self.meta:
                self.meta[key] = obj[key]
        if obj.get("usage"):
            self.usage = obj["usage"]
        for ch in choices or ():
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            c = self.choices.get(idx)
            if c is None:
                c = self.choices[idx] = _Choice(idx)
            delta = ch.get("delta")
            if isinstance(delta, dict):
                self._delta(c, delta, now)
            if isinstance(ch.get("text"), str) and ch["text"]:
                c.text.append(ch["text"])
                self._first(now)
            if ch.get("finish_reason"):
                c.finish_reason = ch["finish_reason"]
            if "logprobs" in ch:
                _merge_logprobs(c, ch["logprobs"])
            for key, value in ch.items():
                if key not in _CHOICE_KEYS and (value is not None or key not in c.extra):
                    c.extra[key] = value

    def _delta(self, c: _Choice, delta: dict[str, Any], now: float) -> None:
        for key, value in delta.items():
            if key == "role":
                if value:
                    c.role = value
            elif key == "content":
                if isinstance(value, str):
                    c.content.append(value)
                    if value:
                        self._first(now)
            elif key == "tool_calls":
                for tc in value or ():
                    self._tool_call(c, tc)
                    self._first(now)
            elif isinstance(value, str):
                c.more.setdefault(key, []).append(value)
                if value:
                    self._first(now)

    @staticmethod
    def _tool_call(c: _Choice, tc: dict[str, Any]) -> None:
        slot = c.tool_calls.setdefault(
            tc.get("index", 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if tc.get("id"):
            slot["id"] = tc["id"]
        if tc.get("type"):
            slot["type"] = tc["type"]
        fn = tc.get("function") or {}
        slot["function"]["name"] += fn.get("name") or ""
        slot["function"]["arguments"] += fn.get("arguments") or ""

    def _responses_event(self, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type", "")
        if kind == "response.output_text.delta":
            self.resp_text.append(obj.get("delta", ""))
            self._first(now)
        elif kind in RESPONSES_TERMINAL:
            self.response = obj.get("response")
            self.done = True  # the answer is whole: a `[DONE]` may follow, or not
            if kind == "response.failed":
                err = (self.response or {}).get("error") or {"message": "response.failed"}
                self.error = err
        elif kind == "response.created" and isinstance(obj.get("response"), dict):
            self.meta.update({k: obj["response"].get(k) for k in ("id", "model", "created_at")})
        elif kind == "error":
            self.error = obj

    def _first(self, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now

    def partial(self) -> dict[str, Any]:
        """What was received so far, in the final body's shape."""
        if self.route == RESPONSES:
            if self.response is not None:
                return self.response
            return {
                **self.meta,
                "object": "response",
                "status": "incomplete",
                "output": [{"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": "".join(self.resp_text), "annotations": []}
                ]}],
            }
        chat = self.route == "/v1/chat/completions"
        out: dict[str, Any] = {
            "id": self.meta.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": self.meta.get("created"),
            "model": self.meta.get("model"),
            "choices": [],
        }
        if "system_fingerprint" in self.meta:
            out["system_fingerprint"] = self.meta["system_fingerprint"]
        for idx in sorted(self.choices):
            c = self.choices[idx]
            choice: dict[str, Any]
            if chat:
                msg: dict[str, Any] = {"role": c.role or "assistant",
                                       "content": "".join(c.content) if c.content else None}
                for key, parts in c.more.items():
                    msg[key] = "".join(parts)
                if c.tool_calls:
                    msg["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
                choice = {"index": idx, "message": msg, "finish_reason": c.finish_reason}
                if c.logprobs is not None:
                    choice["logprobs"] = c.logprobs
            else:
                choice = {"index": idx, "text": "".join(c.text), "finish_reason": c.finish_reason,
                          "logprobs": c.logprobs}
            choice.update(c.extra)
            out["choices"].append(choice)
        if self.usage is not None:
            out["usage"] = self.usage
        return out

    def finish(self) -> dict[str, Any]:
        """The final body, or StreamError when the stream did not end cleanly."""
        if self.buf.strip():
            rest = bytes(self.buf).rstrip(b"\r")
            self.buf.clear()
            # a last line without its newline that does not parse was cut: not an error
            with contextlib.suppress(StreamError):
                self._line(rest, self.last_at)
        if self.error is not None:
            msg = self.error.get("message") if isinstance(self.error, dict) else None
            raise StreamError("stream_error", f"error event in stream: {msg or self.error}",
                              self.partial())
        if not self.done:
            raise StreamError(
                "stream_cut", f"stream ended before {self.end_marker} after {self.events} "
                "event(s)", self.partial(),
            )
        return self.partial()

    @property
    def end_marker(self) -> str:
        """What ends this route's stream, for messages about one that did not end."""
        if self.route == RESPONSES:
            return "its terminal event (response.completed) or data: [DONE]"
        return "data: [DONE]"


def error_payload(raw: bytes) -> dict[str, Any] | None:
    """The error object of a non-2xx answer whose body is SSE, not JSON (LiteLLM answers a
    failed stream with HTTP 500 and `data: {"error": {...}}` then `data: [DONE]`), so the
    failure keeps the server's own message and body."""
    for line in raw.splitlines():
        payload = line.strip()
        if not payload.startswith(b"data:"):
            continue
        try:
            obj = orjson.loads(payload[5:].strip())
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("error"):
            return obj
    return None
