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

This module reads the wire; what each route's events add up to is `streamed`'s, a small
state machine per route.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from tmbatch.client.streamed import state_for

MAX_LINE_BYTES = 16 * 1024 * 1024  # one event this large is a broken server, not an answer


class StreamError(Exception):
    def __init__(self, code: str, message: str, partial: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial = partial


class Aggregator:
    """Feed it raw bytes in any chunking; it splits lines itself (mid-UTF-8 safe) and hands
    each event to its route's state (`streamed`), which knows what the events add up to."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.state = state_for(route)
        self.buf = bytearray()
        self.event: str | None = None  # the `event:` field of the event being read
        self.events = 0
        self.bytes_in = 0
        self.last_at = 0.0

    @property
    def done(self) -> bool:
        """The stream reached its end marker (`end_marker`)."""
        return self.state.done

    @property
    def error(self) -> dict[str, Any] | None:
        return self.state.error

    @property
    def first_token_at(self) -> float | None:
        return self.state.first_token_at

    @property
    def end_marker(self) -> str:
        """What ends this route's stream, for messages about one that did not end."""
        return self.state.end_marker

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
            self.state.done = True
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
            self.state.error = err if isinstance(err, dict) else {"message": str(err)}
            return
        self.state.event(obj, now)

    def partial(self) -> dict[str, Any]:
        """What was received so far, in the final body's shape."""
        return self.state.body()

    def finish(self) -> dict[str, Any]:
        """The final body, or StreamError when the stream did not end cleanly."""
        if self.buf.strip():
            rest = bytes(self.buf).rstrip(b"\r")
            self.buf.clear()
            # a last line without its newline that does not parse was cut: not an error
            with contextlib.suppress(StreamError):
                self._line(rest, self.last_at)
        error = self.state.error
        if error is not None:
            msg = error.get("message") if isinstance(error, dict) else None
            raise StreamError("stream_error", f"error event in stream: {msg or error}",
                              self.partial())
        if not self.state.done:
            raise StreamError(
                "stream_cut", f"stream ended before {self.end_marker} after {self.events} "
                "event(s)", self.partial(),
            )
        return self.partial()


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
