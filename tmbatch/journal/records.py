"""The lines of results.jsonl and failures.jsonl, as typed records.

Both follow the OpenAI Batch output and error files, so tools that read OpenAI's or vLLM's
batch output read ours; tmbatch's own fields sit beside theirs (`line`, `attempts`,
`error.class`, `timing`). One `to_json` per record is the only place their shape is spelled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from tmbatch.policy import AttemptFailed, Outcome


def line_of(raw: bytes) -> int | None:
    """The input line a results/failures line is about (None for a line that is not a record)."""
    try:
        line = orjson.loads(raw).get("line")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return line if isinstance(line, int) and not isinstance(line, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def usage_tokens(body: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) from an answer's `usage`, either naming; None if absent."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    # one lookup per field in the common case: this runs on every answer
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = usage.get("input_tokens")
    completion = usage.get("completion_tokens")
    if completion is None:
        completion = usage.get("output_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        prompt, completion = _int(prompt), _int(completion)  # the checks, past the common case
        if prompt is None or completion is None:
            return None  # absent, a bool, a float, negative: not a count
    details = usage.get("prompt_tokens_details")
    if details is None:
        details = usage.get("input_tokens_details")
        if details is None:
            return prompt, completion, 0
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return prompt, completion, min(cached or 0, prompt)


def record_id(job_id: str, custom_id: str) -> str:
    """Stable per job and line, like OpenAI's `batch_req_...` ids: blake2b-96 of
    "job_id\0custom_id". One per outcome, so the job's prefix is hashed once and copied."""
    h = _PREFIXES.get(job_id)
    if h is None:
        h = _PREFIXES[job_id] = hashlib.blake2b(f"{job_id}\0".encode(), digest_size=12)
    h = h.copy()
    h.update(custom_id.encode())
    return "batch_req_" + h.hexdigest()


_PREFIXES: dict[str, Any] = {}  # job id -> blake2b state after "job_id\0" (a run has one)


@dataclass(slots=True)
class Response:
    """What the server answered: `response` in both files (null when nothing came back)."""

    status_code: int | None
    request_id: str | None
    body: Any

    def as_dict(self) -> dict[str, Any]:
        return {"status_code": self.status_code, "request_id": self.request_id,
                "body": self.body}


@dataclass(slots=True)
class Timing:
    """Streamed answers only: when the first token came and how fast the rest did."""

    ttft_ms: float
    total_ms: float
    tokens_per_s: float | None

    @classmethod
    def of(cls, ttft: float, latency: float, output_tokens: int | None) -> Timing:
        gen = latency - ttft
        rate = round(output_tokens / gen, 1) if output_tokens and gen > 0 else None
        return cls(round(ttft * 1000, 2), round(latency * 1000, 2), rate)


_dumps = orjson.dumps
# ResultRecord.to_json's dict with the body spliced in and no timing, key for key
_RESULT_LINE = (b'{"id":%s,"custom_id":%s,"response":{"status_code":%d,"request_id":%s,'
                b'"body":%s},"error":null,"line":%d}\n')


@dataclass(slots=True)
class ResultRecord:
    """One line of results.jsonl."""

    id: str
    custom_id: str
    line: int
    response: Response
    timing: Timing | None = None
    # The body exactly as the server sent it (one line of JSON): written as it is instead of
    # serialising again what was just parsed; None to serialise `response.body`.
    raw_body: bytes | None = None
    cached: bool = False  # answered from the response cache (`"cached": true` in the line)
    sample: int | None = None  # --samples: the sample's index (`"sample": k` in the line)

    def to_json(self) -> bytes:
        raw = self.raw_body
        # bytes.find, not `in`: on 3.11 `in` tries the operand as an int first and pays for a
        # formatted TypeError each time (two per answer here)
        spliced = raw is not None and raw.find(b"\n") < 0 and raw.find(b"\r") < 0
        r = self.response  # Response.as_dict's shape, spelled here: one per answer
        if spliced and self.timing is None and type(r.status_code) is int \
                and type(self.line) is int and not self.cached and self.sample is None:
            # the common answer: the bytes the dict below would give, formatted around the
            # raw body in one pass (no dict, no second copy of the body to splice it in)
            return _RESULT_LINE % (_dumps(self.id), _dumps(self.custom_id), r.status_code,
                                   _dumps(r.request_id), raw, self.line)
        rec: dict[str, Any] = {
            "id": self.id, "custom_id": self.custom_id,
            "response": {"status_code": r.status_code, "request_id": r.request_id,
                         "body": None if spliced else r.body},
            "error": None, "line": self.line,
        }
        if self.cached:  # beside the response: the body and its request id are the original's
            rec["cached"] = True
        if self.sample is not None:
            rec["sample"] = self.sample
        if self.timing is not None:
            t = self.timing
            rec["timing"] = {"ttft_ms": t.ttft_ms, "total_ms": t.total_ms,
                             "tokens_per_s": t.tokens_per_s}
        out = orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)
        if spliced:
            # `"body":null` cannot occur earlier: inside a JSON string its quotes are escaped
            out = out.replace(b'"body":null', b'"body":' + raw, 1)  # type: ignore[operator]
        return out


@dataclass(slots=True)
class FailureRecord:
    """One line of failures.jsonl: OpenAI Batch's error file plus class, attempts, line."""

    id: str
    custom_id: str | None
    line: int
    outcome: Outcome
    code: str
    message: str
    attempts: int
    response: Response | None = None
    sample: int | None = None  # --samples: the sample's index (`"sample": k` in the line)

    def to_json(self) -> bytes:
        rec = {
            "id": self.id,
            "custom_id": self.custom_id,
            "response": None if self.response is None else self.response.as_dict(),
            "error": {"code": self.code, "message": self.message, "class": self.outcome.value},
            "attempts": self.attempts,
            "line": self.line,
        }
        if self.sample is not None:
            rec["sample"] = self.sample
        return orjson.dumps(rec) + b"\n"

    @classmethod
    def of(cls, job_id: str, line: int, custom_id: str | None, outcome: Outcome, code: str,
           message: str, attempts: int, response: Response | None = None,
           sample: int | None = None) -> FailureRecord:
        return cls(record_id(job_id, custom_id or f"line-{line}"), custom_id, line, outcome,
                   code, message, attempts, response, sample)

    @classmethod
    def of_attempt(cls, job_id: str, line: int, custom_id: str, failure: AttemptFailed,
                   attempts: int, sample: int | None = None) -> FailureRecord:
        """A failed attempt's record: the server's answer kept when there was one."""
        response = None
        if failure.status is not None or failure.body is not None:
            response = Response(failure.status, failure.request_id, failure.body)
        return cls.of(job_id, line, custom_id, failure.cls, failure.code, failure.message,
                      attempts, response, sample)
