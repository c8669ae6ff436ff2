"""Aggregate a data-only SSE stream into the body a non-streamed call returns.

So `results.jsonl` looks the same whether a line streamed or not. A stream that
ends without `data: [DONE]`, or carries an error event, is `ambiguous`: tokens
were generated and billed, the answer is incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


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
    content: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Aggregator:
    """Feed it raw bytes in any chunking; it splits lines itself (mid-UTF-8 safe)."""

    route: str
    buf: bytes = b""
    done: bool = False
    event: str | None = None
    first_token_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, _Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    response: dict[str, Any] | None = None  # /v1/responses: from response.completed
    resp_text: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    events: int = 0

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                return
            line, self.buf = self.buf[:i].rstrip(b"\r"), self.buf[i + 1 :]
            self._line(line, now)

    def _line(self, line: bytes, now: float) -> None:
        if not line:
            self.event = None
            return
        if line.startswith(b":"):
            return  # comment / keep-alive
        if line.startswith(b"event:"):
            self.event = line[6:].strip().decode("utf-8", "replace")
            return
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamError(
                "stream_bad_event", "a stream event is not JSON", self.partial()
            ) from None
        self.events += 1
        if self.event == "error" or (isinstance(obj, dict) and "error" in obj and
                                     obj.get("type") in (None, "error")):
            self.error = obj.get("error", obj) if isinstance(obj, dict) else {"message": str(obj)}
            return
        if not isinstance(obj, dict):
            return
        if self.route == "/v1/responses":
            self._responses_event(obj, now)
        else:
            self._chunk(obj, now)

    def _chunk(self, obj: dict[str, Any], now: float) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in obj and key not in self.meta:
                self.meta[key] = obj[key]
        if obj.get("usage"):
            self.usage = obj["usage"]
        for ch in obj.get("choices") or ():
            idx = ch.get("index", 0)
            c = self.choices.get(idx)
            if c is None:
                c = self.choices[idx] = _Choice(idx)
            delta = ch.get("delta")
            if isinstance(delta, dict):
                if delta.get("role"):
                    c.role = delta["role"]
                if delta.get("content"):
                    c.content.append(delta["content"])
                    self._first(now)
                for tc in delta.get("tool_calls") or ():
                    slot = c.tool_calls.setdefault(
                        tc.get("index", 0),
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
                    self._first(now)
            if isinstance(ch.get("text"), str) and ch["text"]:
                c.text.append(ch["text"])
                self._first(now)
            if ch.get("finish_reason"):
                c.finish_reason = ch["finish_reason"]

    def _responses_event(self, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type", "")
        if kind == "response.output_text.delta":
            self.resp_text.append(obj.get("delta", ""))
            self._first(now)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.response = obj.get("response")
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
        if self.route == "/v1/responses":
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
            if chat:
                msg: dict[str, Any] = {"role": c.role or "assistant", "content": "".join(c.content)}
                if c.tool_calls:
                    msg["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
                out["choices"].append(
                    {"index": idx, "message": msg, "finish_reason": c.finish_reason}
                )
            else:
                out["choices"].append({
                    "index": idx, "text": "".join(c.text), "finish_reason": c.finish_reason,
                    "logprobs": None,
                })
        if self.usage is not None:
            out["usage"] = self.usage
        return out

    def finish(self) -> dict[str, Any]:
        """The final body, or StreamError when the stream did not end cleanly."""
        if self.buf.strip():
            self._line(self.buf.rstrip(b"\r"), 0.0)
            self.buf = b""
        if self.error is not None:
            msg = self.error.get("message") if isinstance(self.error, dict) else None
            raise StreamError("stream_error", f"error event in stream: {msg or self.error}",
                              self.partial())
        if not self.done:
            raise StreamError(
                "stream_cut", f"stream ended before data: [DONE] after {self.events} event(s)",
                self.partial(),
            )
        return self.partial()
