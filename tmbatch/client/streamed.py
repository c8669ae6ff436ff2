"""What a stream's events add up to, per route: a small state machine each.

`sse.Aggregator` reads the wire (lines, `data:`, `[DONE]`, error events) and hands every JSON
event to its route's state, which changes with each event and can say at any moment what
arrived, in the shape of the body the unstreamed call returns (`body`):

- chat and completions (`ChatState`, `CompletionsState`) stream chunks of choices: each
  chunk's metadata is kept the first time it is seen, its usage replaces any before, and each
  choice's deltas (chat) or text (completions) are concatenated; the stream ends at `[DONE]`.
- /v1/responses (`ResponsesState`) streams typed events: `response.created` gives the
  metadata, `response.output_text.delta` the text, and a terminal event
  (`response.completed` / `response.incomplete` / `response.failed`) the whole response and
  the end of the stream, with or without a `[DONE]` after it.

Every state starts open; it is done at its end marker, and carries an error once an error
event (or `response.failed`) arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_CHOICE_KEYS = {"index", "delta", "text", "finish_reason", "logprobs"}
_META_KEYS = ("id", "created", "model", "system_fingerprint")


class RouteState:
    """What every route's stream keeps: its end, an error it carried, its first token."""

    end_marker = "data: [DONE]"  # what ends the stream, for messages about one that did not

    def __init__(self) -> None:
        self.done = False
        self.error: dict[str, Any] | None = None
        self.first_token_at: float | None = None
        self.meta: dict[str, Any] = {}

    def event(self, obj: dict[str, Any], now: float) -> None:
        """One JSON event that is not an error event."""
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        """What arrived so far, in the final body's shape."""
        raise NotImplementedError

    def _first(self, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now


def state_for(route: str) -> RouteState:
    if route == RESPONSES:
        return ResponsesState()
    return ChatState() if route == CHAT else CompletionsState()


# -- chat and completions: chunks of choices ---------------------------------------------------


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


class ChoicesState(RouteState):
    """A stream of chunks, each with a list of choices (chat and completions alike)."""

    object_name = ""  # the final body's `object`

    def __init__(self) -> None:
        super().__init__()
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def event(self, obj: dict[str, Any], now: float) -> None:
        choices = obj.get("choices")
        if (self.meta and len(choices or ()) == 1 and not obj.get("usage")
                and self._content_only(obj, choices[0], now)):  # type: ignore[index]
            return
        self._keep_meta(obj)
        if obj.get("usage"):
            self.usage = obj["usage"]
        for ch in choices or ():
            if isinstance(ch, dict):
                self._choice(ch, now)

    def _content_only(self, obj: dict[str, Any], ch: Any, now: float) -> bool:
        """The common chunk: one known choice whose delta is only more content. Appending it
        is all `_choice` would do, at a fraction of the interpreter work (64 events a stream;
        bench scenario f). False, having done nothing, for any other chunk."""
        delta = ch.get("delta") if type(ch) is dict else None
        if not (type(delta) is dict and len(delta) == 1 and type(delta.get("content")) is str
                and ch.get("finish_reason") is None and ch.get("logprobs") is None
                and "text" not in ch and ch.keys() <= _CHOICE_KEYS):
            return False
        c = self.choices.get(ch.get("index", 0))
        if c is None:
            return False
        c.content.append(delta["content"])
        if self.first_token_at is None and delta["content"]:
            self.first_token_at = now
        self._keep_meta(obj)
        return True

    def _keep_meta(self, obj: dict[str, Any]) -> None:
        for key in _META_KEYS:
            if key in obj and key not in self.meta:
                self.meta[key] = obj[key]

    def _choice(self, ch: dict[str, Any], now: float) -> None:
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
                    _tool_call(c, tc)
                    self._first(now)
            elif isinstance(value, str):
                c.more.setdefault(key, []).append(value)
                if value:
                    self._first(now)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.meta.get("id"),
            "object": self.object_name,
            "created": self.meta.get("created"),
            "model": self.meta.get("model"),
            "choices": [],
        }
        if "system_fingerprint" in self.meta:
            out["system_fingerprint"] = self.meta["system_fingerprint"]
        for idx in sorted(self.choices):
            c = self.choices[idx]
            choice = self._choice_body(c)
            choice.update(c.extra)
            out["choices"].append(choice)
        if self.usage is not None:
            out["usage"] = self.usage
        return out

    def _choice_body(self, c: _Choice) -> dict[str, Any]:
        raise NotImplementedError


class ChatState(ChoicesState):
    """/v1/chat/completions: each choice's deltas make its message."""

    object_name = "chat.completion"

    def _choice_body(self, c: _Choice) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": c.role or "assistant",
                               "content": "".join(c.content) if c.content else None}
        for key, parts in c.more.items():
            msg[key] = "".join(parts)
        if c.tool_calls:
            msg["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
        choice: dict[str, Any] = {"index": c.index, "message": msg,
                                  "finish_reason": c.finish_reason}
        if c.logprobs is not None:
            choice["logprobs"] = c.logprobs
        return choice


class CompletionsState(ChoicesState):
    """/v1/completions: each choice's text pieces make its text."""

    object_name = "text_completion"

    def _choice_body(self, c: _Choice) -> dict[str, Any]:
        return {"index": c.index, "text": "".join(c.text), "finish_reason": c.finish_reason,
                "logprobs": c.logprobs}


def _merge_logprobs(c: _Choice, lp: Any) -> None:
    """Streamed logprobs arrive as lists per chunk; the final body has them concatenated."""
    if not isinstance(lp, dict):
        return
    if c.logprobs is None:
        c.logprobs = {}
    for key, value in lp.items():
        if isinstance(value, list):
            c.logprobs.setdefault(key, []).extend(value)


def _tool_call(c: _Choice, tc: dict[str, Any]) -> None:
    """A tool call's pieces: its id and type as they come, name and arguments concatenated."""
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


# -- /v1/responses: typed events ---------------------------------------------------------------


class ResponsesState(RouteState):
    """/v1/responses: created, then text deltas, then a terminal event with the whole
    response (which is the body from then on); an `error` event fails it."""

    end_marker = "its terminal event (response.completed) or data: [DONE]"

    def __init__(self) -> None:
        super().__init__()
        self.response: dict[str, Any] | None = None  # from the terminal event
        self.text: list[str] = []

    def event(self, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type", "")
        if kind == "response.output_text.delta":
            self.text.append(obj.get("delta", ""))
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

    def body(self) -> dict[str, Any]:
        if self.response is not None:
            return self.response
        return {
            **self.meta,
            "object": "response",
            "status": "incomplete",
            "output": [{"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "".join(self.text), "annotations": []}
            ]}],
        }
