"""The result line's bytes: the formatted common case is the dict path's output, byte for byte."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tmbatch.journal.records import Response, ResultRecord, Timing

# orjson cannot encode a lone surrogate either way; every other code point is fair game
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def dict_path(rec: ResultRecord) -> bytes:
    """ResultRecord.to_json as it was before the formatted case: a dict, then the raw body
    spliced in where `"body":null` stands."""
    r = rec.response
    raw = rec.raw_body
    spliced = raw is not None and b"\n" not in raw and b"\r" not in raw
    out: dict[str, Any] = {
        "id": rec.id, "custom_id": rec.custom_id,
        "response": {"status_code": r.status_code, "request_id": r.request_id,
                     "body": None if spliced else r.body},
        "error": None, "line": rec.line,
    }
    if rec.timing is not None:
        t = rec.timing
        out["timing"] = {"ttft_ms": t.ttft_ms, "total_ms": t.total_ms,
                         "tokens_per_s": t.tokens_per_s}
    data = orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE)
    if spliced:
        assert raw is not None
        data = data.replace(b'"body":null', b'"body":' + raw, 1)
    return data


@settings(max_examples=400, deadline=None)
@given(custom_id=TEXT, request_id=st.none() | TEXT, status=st.integers(200, 299),
       line=st.integers(1, 2**40), body=st.dictionaries(TEXT, JSON_VALUE, max_size=5),
       indent=st.booleans(), timed=st.booleans())
def test_a_result_line_is_the_dict_paths_bytes(custom_id: str, request_id: str | None,
                                               status: int, line: int, body: dict[str, Any],
                                               indent: bool, timed: bool) -> None:
    # the raw body as a server sends it: compact, or pretty-printed (then not spliced)
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2 if indent else 0)
    timing = Timing.of(0.01, 0.25, 40) if timed else None
    rec = ResultRecord(f"batch_req_{line:024x}", custom_id, line,
                       Response(status, request_id, body), timing, raw)
    out = rec.to_json()
    assert out == dict_path(rec)
    parsed = orjson.loads(out)
    assert parsed["response"]["body"] == body
    assert parsed["custom_id"] == custom_id and parsed["line"] == line


def test_a_result_without_its_raw_body_or_with_odd_fields_takes_the_dict_path() -> None:
    body = {"choices": [{"message": {"content": "hi"}}]}
    for rec in (ResultRecord("batch_req_1", "a", 1, Response(200, "r", body)),
                ResultRecord("batch_req_1", "a", 1, Response(None, None, body), None,
                             orjson.dumps(body)),
                ResultRecord("batch_req_1", "a\n\"b", 2, Response(True, "r", body), None,
                             orjson.dumps(body))):
        assert rec.to_json() == dict_path(rec)
