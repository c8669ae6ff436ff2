"""Property: whatever bytes the reader is handed, it never raises, and every non-blank
physical line yields exactly one Request or BadLine carrying that line's number."""

from __future__ import annotations

import io

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmbatch.inputs.reader import BadLine, Request, read_requests
from tmbatch.inputs.routes import ROUTES

GOOD = orjson.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}})

# Pieces that reach the interesting branches far more often than random bytes do.
FRAGMENTS = [
    GOOD, GOOD.replace(b'"a"', b'"b"'), b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":",
    b"\r", b"\r\n", b"\n", b" ", b"\t", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\x00", b"NaN",
    b"Infinity", b"1e999", b"123456789012345678901234567890", b"null", b"true", b'"custom_id"',
    b'"url"', b'"body"', b'"method"', b'"GET"', b'"/tokenize"', b'"stream"', b'"model"',
    b'{"custom_id":"x","url":"/v1/completions","body":{"model":"m","stream":"yes"}}',
    b'{"custom_id":"x","url":"https://h/v1/completions","body":{}}',
    b'{"model":"m","prompt":"p"}', b"[" * 300, b"]" * 300, b'{"a":' * 300,
    b'{"custom_id":"d","url":"/tokenize","body":{"model":"m","x":' + b"[" * 300 + b"]" * 300
    + b"}}",
    b'{"custom_id":"n","url":"/tokenize","body":{"model":"m","seed":99999999999999999999999}}',
]


def expected_lines(data: bytes, max_line_bytes: int) -> list[int]:
    """The oracle, written independently of the reader's loop: split on LF, 1-based."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()  # the text after a final newline is not a line
    out = []
    for n, raw in enumerate(parts, start=1):
        if len(raw) > max_line_bytes:
            out.append(n)
            continue
        if n == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if raw.rstrip(b"\r\n").strip():
            out.append(n)
    return out


def check(data: bytes, endpoint: str | None = None, max_line_bytes: int = 1 << 20) -> None:
    items = list(read_requests(io.BytesIO(data), endpoint=endpoint,
                               max_line_bytes=max_line_bytes))
    assert [i.line for i in items] == expected_lines(data, max_line_bytes)
    ids = set()
    for item in items:
        assert isinstance(item, Request | BadLine)
        if isinstance(item, BadLine):
            assert item.message.startswith(f"line {item.line}: "), item
            assert item.code and item.code.isidentifier()
        else:
            assert item.url in ROUTES and isinstance(item.body, dict)
            assert isinstance(item.custom_id, str) and item.custom_id.strip()
            assert item.custom_id not in ids, "a duplicate custom_id got through"
            ids.add(item.custom_id)
            orjson.dumps(item.body)  # whatever was accepted can be sent


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=8), max_size=40))
def test_structured_fragments(pieces: list[bytes]) -> None:
    check(b"".join(pieces))


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30), st.integers(min_value=1, max_value=80))
def test_small_line_limit(pieces: list[bytes], limit: int) -> None:
    """Over-long lines are skipped without being held, and still numbered right."""
    check(b"".join(pieces), max_line_bytes=limit)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=8), max_size=40))
def test_bare_bodies(pieces: list[bytes]) -> None:
    check(b"".join(pieces), endpoint="/v1/chat/completions")


@FUZZ
@given(st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["custom_id", "url", "body", "method", "model", "stream", "x"]), kids,
        max_size=5),
    max_leaves=30,
))
def test_any_json_value(value: object) -> None:
    """Every JSON shape, including near-valid Batch lines, is one item naming its line."""
    check(orjson.dumps(value) + b"\n" + GOOD + b"\n")


def test_oracle_is_not_trivial() -> None:
    """The oracle must see blank lines, a BOM, CR-only lines and a missing final newline."""
    assert expected_lines(b"\xef\xbb\xbf\n\r\n \n" + GOOD, 1 << 20) == [4]
    assert expected_lines(b"x\n\ny", 1 << 20) == [1, 3]
    assert expected_lines(b"   \n", 2) == [1]
