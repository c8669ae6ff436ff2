"""Streams the input file into requests, one line at a time.

Memory does not grow with the file: one line is held at a time, plus a compact
set of custom_id hashes for the duplicate check. A bad line never stops the
run: it becomes a `permanent` failure that names its line number and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

from tmbatch.base.config import check_model
from tmbatch.base.words import json_text, json_type
from tmbatch.inputs.files import seekable
from tmbatch.inputs.lines import Shard, in_shard, numbered_lines
from tmbatch.inputs.routes import ROUTES, STREAMABLE
from tmbatch.journal.compact import IdSet, LineStates

BATCH_FIELDS = {"custom_id", "method", "url", "body"}
MAX_LINE_BYTES = 32 * 1024 * 1024
MAX_CUSTOM_ID = 512
FIRST_USE_LOOKUPS = 32  # duplicated ids whose first line is looked up (see FirstUse)
# orjson refuses to serialize deeper than this; a line it cannot send is bad input, not a crash.
MAX_DEPTH = 255
# orjson turns integers outside 64 bits into floats: the request would be sent altered.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
# A run of 19 digits: an integer that may not fit in 64 bits. Looked for as 19 "0"s in the
# line with every ASCII digit made "0" and every other byte " " (what rb"\d{19,}" finds, in
# two C passes: the regex costs ~10x more per line, and every line is checked).
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DELTA = [0] * 256
_DELTA[ord("[")] = _DELTA[ord("{")] = 1
_DELTA[ord("]")] = _DELTA[ord("}")] = -1


@dataclass(slots=True)
class Request:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]
    # What the Idempotency-Key is derived from, when not the custom_id: `resend --input`
    # sends a corrected body under a key of its own where the server saw the old one
    key_id: str | None = None
    # --samples N: the sample's index (0..N-1) in its model's directory (`inputs.samples`)
    sample: int | None = None
    # --samples N sent as one request with the body's `n`: the units it answers, in order
    # (`inputs.samples.grouped`); each gets its own journal records and outcome line
    units: tuple[Request, ...] | None = None

    @property
    def idempotent(self) -> bool:
        return ROUTES[self.url]

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def each_unit(self) -> tuple[Request, ...]:
        """What gets an outcome line of its own: a grouped request's units, else itself."""
        return self.units or (self,)


@dataclass(slots=True)
class BadLine:
    line: int
    custom_id: str | None
    code: str
    message: str


def _json_error(raw: bytes, line: int, exc: orjson.JSONDecodeError,
                ) -> tuple[int, None, str, str]:
    """Say where the line breaks and, for the usual suspects, why."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return (
            line, None, "invalid_utf8",
            f"line {line}: not valid UTF-8 text (bad byte at offset {uexc.start}); save the "
            "file as UTF-8",
        )
    at = exc.doc[exc.pos:exc.pos + 9] if isinstance(exc.doc, str) else ""
    hint = ""
    if at.lstrip("-").startswith(("NaN", "Infinity")):
        hint = "; NaN and Infinity are not JSON: write null or a finite number"
    elif "end of data" in exc.msg:
        hint = "; the line ends before the JSON value does (was the file cut off?)"
    elif "infinity" in exc.msg:
        hint = "; a number too large for a 64-bit float"
    return (
        line, None, "invalid_json",
        f"line {line}: not valid JSON at column {exc.colno}: {exc.msg}{hint}",
    )


def _peek_id(obj: Any) -> str | None:
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid[:MAX_CUSTOM_ID] if isinstance(cid, str) else None


def _depth(raw: bytes) -> int:
    """Nesting depth outside strings, without recursion.

    orjson recurses on the C stack and a line of a million brackets kills the
    process (SIGSEGV), so a suspicious line is measured before it is parsed.
    """
    skeleton = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DELTA.__getitem__, skeleton)), default=0)


def _check_int(text: str) -> int:
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise OverflowError(text)
    return value


def _big_int(raw: bytes) -> str | None:
    """The first integer literal orjson would have turned into a float, if any."""
    try:
        json.loads(raw, parse_int=_check_int)
    except OverflowError as exc:
        return str(exc)
    except (ValueError, RecursionError):
        return None
    return None


class _Refused(Exception):
    """A check found the line bad; raised only for bad lines, which are rare."""

    def __init__(self, line: int, custom_id: str | None, code: str, message: str) -> None:
        self.bad = BadLine(line, custom_id, code, message)


def parse_line(
    raw: bytes, line: int, endpoint: str | None, model: str | None, stream: bool | None
) -> Request | BadLine:
    """Turn one raw line into a Request, or a BadLine saying what is wrong and how to fix it."""
    try:
        obj = check_json(raw, line)
        if endpoint is not None:
            custom_id, url, body = check_bare_body(obj, line, endpoint)
        else:
            # check_batch_line's common case, without its calls (every line comes through
            # here): exactly the lines it accepts; any other goes to it, for its message
            custom_id = obj.get("custom_id")
            url = obj.get("url")
            body = obj.get("body")
            if not (type(custom_id) is str and 0 < len(custom_id) <= MAX_CUSTOM_ID
                    and not custom_id.isspace() and type(url) is str and url in ROUTES
                    and type(body) is dict and obj.get("method", "POST") == "POST"
                    and BATCH_FIELDS.issuperset(obj)):
                custom_id, url, body = check_batch_line(obj, line)
        check_body(body, line, custom_id, url, model, stream)
    except _Refused as exc:
        return exc.bad
    return Request(line, custom_id, url, body)


def check_json(raw: bytes, line: int) -> dict[str, Any]:
    """A JSON object that can be sent unaltered: not too deep, no integer over 64 bits."""
    if len(raw) > MAX_DEPTH and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and \
            _depth(raw) > MAX_DEPTH:
        raise _Refused(
            line, None, "too_deep",
            f"line {line}: JSON nested more than {MAX_DEPTH} levels deep; flatten the request",
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Refused(*_json_error(raw, line, exc)) from None
    # find, not `in` (records.ResultRecord.to_json says why)
    big = _big_int(raw) if raw.translate(_DIGITS_AS_ZERO).find(_LONG_DIGITS) >= 0 else None
    if big is not None:
        shown = big if len(big) <= 40 else big[:20] + "..." + big[-8:]
        raise _Refused(
            line, _peek_id(obj), "number_out_of_range",
            f"line {line}: integer {shown} does not fit in 64 bits and would be sent altered "
            "(as a float); quote it as a string or use a smaller number",
        )
    if not isinstance(obj, dict):
        raise _Refused(line, None, "not_an_object",
                       f"line {line}: expected a JSON object, got {json_type(obj)}")
    return obj


def check_bare_body(obj: dict[str, Any], line: int, endpoint: str,
                    ) -> tuple[str, str, dict[str, Any]]:
    """--endpoint: the whole line is the body, and its custom_id is line-N."""
    if "body" in obj and "custom_id" in obj:
        raise _Refused(
            line, str(obj.get("custom_id"))[:MAX_CUSTOM_ID], "batch_line_with_endpoint",
            f"line {line}: looks like an OpenAI Batch line (custom_id, body) but --endpoint "
            "was given; drop --endpoint to read Batch lines",
        )
    return f"line-{line}", endpoint, obj


def check_batch_line(obj: dict[str, Any], line: int) -> tuple[str, str, dict[str, Any]]:
    """An OpenAI Batch line: {custom_id, method, url, body} and nothing else."""
    # the common case without a set or a list built (every line comes through here)
    unknown = () if BATCH_FIELDS.issuperset(obj) else set(obj) - BATCH_FIELDS
    missing = () if "custom_id" in obj and "url" in obj and "body" in obj else [
        k for k in ("custom_id", "url", "body") if k not in obj]
    if missing and "custom_id" not in unknown and (
            "messages" in obj or "prompt" in obj or "input" in obj):
        raise _Refused(
            line, None, "bare_body_without_endpoint",
            f"line {line}: looks like a bare request body; pass --endpoint (e.g. --endpoint "
            "chat) or wrap it as {\"custom_id\", \"method\", \"url\", \"body\"}",
        )
    custom_id = check_custom_id(obj, line)
    if unknown:
        raise _Refused(
            line, custom_id, "unknown_field",
            f"line {line}: unknown field(s) {', '.join(sorted(unknown))}; a Batch line has "
            "only custom_id, method, url, body",
        )
    if missing:
        raise _Refused(line, custom_id, "missing_field",
                       f"line {line}: missing field(s) {', '.join(missing)}")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Refused(
            line, custom_id, "invalid_method",
            f"line {line}: method {json_text(method)} is not allowed; every batch route takes POST",
        )
    url = check_url(obj["url"], line, custom_id)
    body = obj["body"]
    if not isinstance(body, dict):
        raise _Refused(line, custom_id, "invalid_body",
                       f"line {line}: body is {json_type(body)}; expected a JSON object")
    return custom_id, url, body


def check_custom_id(obj: dict[str, Any], line: int) -> str:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        what = "missing" if "custom_id" not in obj else (
            "empty" if isinstance(custom_id, str) else f"{json_type(custom_id)}, not a string"
        )
        raise _Refused(
            line, None, "invalid_custom_id",
            f"line {line}: field custom_id is {what}; give each line a unique non-empty "
            "string custom_id",
        )
    if len(custom_id) > MAX_CUSTOM_ID:
        raise _Refused(
            line, custom_id[:64], "invalid_custom_id",
            f"line {line}: custom_id is {len(custom_id)} characters; at most {MAX_CUSTOM_ID}",
        )
    return custom_id


def check_url(url: Any, line: int, custom_id: str) -> str:
    """A supported route's path; a host is refused (it comes from the configuration)."""
    if not isinstance(url, str):
        raise _Refused(line, custom_id, "invalid_url",
                       f"line {line}: url is {json_type(url)}; expected a path string")
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise _Refused(
            line, custom_id, "invalid_url",
            f"line {line}: url {url[:100]!r} has a host; give only the path, e.g. "
            "/v1/chat/completions (the host comes from the configuration)",
        )
    if url not in ROUTES:
        raise _Refused(
            line, custom_id, "unsupported_url",
            f"line {line}: url {url[:100]!r} is not a supported route; expected one of "
            + ", ".join(ROUTES),
        )
    return url


def check_body(body: dict[str, Any], line: int, custom_id: str, url: str, model: str | None,
               stream: bool | None) -> None:
    """A served model name and a boolean `stream` the route can honour; fills the defaults."""
    if model is not None and "model" not in body:
        body["model"] = model
    m = body.get("model")
    if type(m) is not str or m not in _GOOD_MODELS:  # a model name already checked: fine
        _check_model_name(m, line, custom_id)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _Refused(
            line, custom_id, "invalid_stream",
            f"line {line}: body.stream is {json_type(body['stream'])}; expected true or false",
        )
    if stream is not None and url in STREAMABLE and "stream" not in body:
        body["stream"] = stream
    if body.get("stream") is True and url not in STREAMABLE:
        raise _Refused(line, custom_id, "invalid_stream",
                       f"line {line}: {url} cannot stream; remove body.stream")


# Model names that passed _check_model_name: a file names a few models on a million lines, so
# each is checked once (bounded: a file of ever new names is checked line by line).
_GOOD_MODELS: set[str] = set()
_GOOD_MODELS_MAX = 1024


def _check_model_name(m: Any, line: int, custom_id: str) -> None:
    if not isinstance(m, str) or not m.strip():
        raise _Refused(
            line, custom_id, "missing_model",
            f"line {line}: body.model is missing or not a string; add it or pass --model",
        )
    uuid_hint = check_model(m, f"line {line}")
    if uuid_hint:
        raise _Refused(line, custom_id, "model_is_uuid", uuid_hint)
    if type(m) is str and len(_GOOD_MODELS) < _GOOD_MODELS_MAX:
        _GOOD_MODELS.add(m)


@dataclass
class ReadStats:
    lines: int = 0
    blank: int = 0


def read_requests(
    f: IO[bytes],
    *,
    endpoint: str | None = None,
    model: str | None = None,
    stream: bool | None = None,
    done: LineStates | None = None,
    seen: IdSet | None = None,
    shard: Shard | None = None,
    stats: ReadStats | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    unit: str = "line",
) -> Iterator[Request | BadLine]:
    """Yield a Request or BadLine per non-blank line not in `done`.

    Blank lines are skipped (counted in stats, never failures) so a trailing
    newline or a blank separator line is harmless. Line numbers are physical
    line numbers, 1-based, so users can `sed -n Np` them. `unit` "row": the input was
    staged from a table (row N is line N), and the messages say so.
    """
    items = _read(f, endpoint, model, stream, done, seen, shard, stats, max_line_bytes)
    if unit == "line":
        return items
    return (item if isinstance(item, Request) else as_rows(item) for item in items)


_LINE_WORD = re.compile(r"\bline (\d+)|\ban earlier line\b")


def as_rows(bad: BadLine) -> BadLine:
    """A bad line's message in a table's words: "row 3", not "line 3" (rare: bad lines)."""
    bad.message = _LINE_WORD.sub(
        lambda m: f"row {m.group(1)}" if m.group(1) else "an earlier row", bad.message)
    return bad


def _read(f: IO[bytes], endpoint: str | None, model: str | None, stream: bool | None,
          done: LineStates | None, seen: IdSet | None, shard: Shard | None,
          stats: ReadStats | None, max_line_bytes: int) -> Iterator[Request | BadLine]:
    seen = IdSet() if seen is None else seen
    stats = ReadStats() if stats is None else stats
    first_use = FirstUse(f, endpoint, model, stream, shard, max_line_bytes)
    for line, raw, length in numbered_lines(f, max_line_bytes):
        stats.lines = line
        if (shard is not None and not in_shard(line, shard)) or (
                done is not None and line in done):
            continue
        if raw is None:
            yield BadLine(
                line, None, "line_too_long",
                f"line {line}: {length} bytes, over the {max_line_bytes}-byte limit "
                "(--max-line-bytes)",
            )
            continue
        if not raw.strip():
            stats.blank += 1
            continue
        item = parse_line(raw, line, endpoint, model, stream)
        if isinstance(item, Request) and not seen.add(item.custom_id):
            first = first_use.line_of(item.custom_id, line)
            yield BadLine(
                line, item.custom_id, "duplicate_custom_id",
                f"line {line}: custom_id {json_text(item.custom_id)} was already used by "
                f"{'an earlier line' if first is None else f'line {first}'}; custom_ids must "
                "be unique",
            )
            continue
        yield item


class FirstUse:
    """The line that first used a duplicated custom_id, found by reading the input again.

    The reader keeps 8-byte hashes of the ids, not the ids and their lines, so that a
    million-line file costs megabytes; duplicates are rare, so the first use is looked up only
    when one appears, from the start of the file up to the duplicate, for at most
    FIRST_USE_LOOKUPS different ids (then the message says "an earlier line"). A line is only
    parsed when its bytes can hold the id. Stdin cannot be read twice and is not looked up.
    """

    def __init__(self, f: IO[bytes], endpoint: str | None, model: str | None,
                 stream: bool | None, shard: Shard | None, max_line_bytes: int) -> None:
        self.f = f
        self.parse = (endpoint, model, stream)
        self.shard = shard
        self.max_line_bytes = max_line_bytes
        self.left = FIRST_USE_LOOKUPS
        self.found: dict[str, int | None] = {}

    def line_of(self, custom_id: str, before: int) -> int | None:
        if custom_id in self.found:
            return self.found[custom_id]
        if self.left <= 0 or not seekable(self.f):
            return None
        self.left -= 1
        pos = self.f.tell()
        try:
            self.f.seek(0)
            self.found[custom_id] = self._scan(custom_id, before)
        finally:
            self.f.seek(pos)
        return self.found[custom_id]

    def _scan(self, custom_id: str, before: int) -> int | None:
        needle = orjson.dumps(custom_id)
        for line, raw, _ in numbered_lines(self.f, self.max_line_bytes):
            if line >= before:
                return None
            if raw is None or not in_shard(line, self.shard) or (
                    needle not in raw and b"\\" not in raw):
                continue
            item = parse_line(raw, line, *self.parse)
            if isinstance(item, Request) and item.custom_id == custom_id:
                return line
        return None

