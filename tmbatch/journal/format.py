"""The journal's format: its record kinds as types and the one decoder (`reading` reads files).

Format (`journal.jsonl`, one JSON value per line):
    {"e": "start", ...}            header: input, fingerprint, options, job id
    {"e": "resume", "t": ...}      each later run on the same directory
    ["d", line, attempt, custom_id] written and flushed *before* the bytes leave
    ["o", line, outcome, code, ...] an outcome: "ok", a failure class, or "pending"; an "ok"
                                    with code "cached" was answered from the response cache
                                    (nothing sent; older readers see a plain "ok")
    ["p", t, seconds]               a Retry-After pause of every worker
    ["m", results_size, failures_size]  output sizes after an outcome batch
    {"e": "budget", "t", "tokens", "usd", "prices"}  a run's budget and prices, when it has any
    ["s", t, spent, in_flight, unknown]  the job's spend so far (`journal.journal` says how)

Each kind is a type here with its `to_json`, the only place its shape is spelled; `decode` is
the only place a line of the journal becomes a value, and `reading.JournalReader` (or
`reading.records`) the only way the rest of tmbatch reads one: resume, status, merge and
report alike. A line that is not one of these records stops the reader with a `JournalError`
naming the file, the line and what to do; a last line without its newline (torn by a crash,
or still being written) is never data and ends the records.

The per-line kinds (dispatch, outcome) are plain slotted dataclasses: a million-line job
replays two million of them, and a frozen one costs four times as much to build. The others
are frozen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tmbatch.policy import Outcome

FORMAT_VERSION = 1
CACHED = "cached"  # the code of an "ok" outcome answered from the response cache
_OK = Outcome.OK.value  # a plain str: orjson writes it a little faster than the StrEnum
_NL = orjson.OPT_APPEND_NEWLINE  # the record's newline, without a copy to add it
FIX_HINT = "inspect it, or start over with --restart (old files are kept aside)"


class JournalError(Exception):
    """The output directory cannot be resumed as it is; the message says why and what to do."""


class RecordError(ValueError):
    """A line that holds no journal record; the message says what is wrong with it."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw  # the line, once the decoder knows it


# -- the records ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    """{"e": "start", ...}: the first line, what the job is. Built once, never changed."""

    input: str
    fingerprint: str
    job: str
    options: dict[str, Any] = field(default_factory=dict)
    t: float | None = None
    v: int = FORMAT_VERSION
    tmbatch: str | None = None
    merged: list[dict[str, Any]] | None = None  # `tmbatch merge`: the shard directories

    @property
    def shard(self) -> tuple[int, int] | None:
        """The `--shard I/N` the job ran as, if any."""
        raw = self.options.get("shard")
        if isinstance(raw, list) and len(raw) == 2 and all(type(v) is int for v in raw):
            return raw[0], raw[1]
        return None

    def to_json(self) -> bytes:
        rec: dict[str, Any] = {"e": "start", "v": self.v, "tmbatch": self.tmbatch,
                               "input": self.input, "fingerprint": self.fingerprint,
                               "options": self.options, "job": self.job, "t": self.t}
        if self.merged is not None:
            rec["merged"] = self.merged
        return orjson.dumps(rec, option=_NL)


@dataclass(frozen=True, slots=True)
class ResumeRecord:
    """{"e": "resume", "t": ...}: a later run on the same directory (`resend`: how many
    lines a `tmbatch resend` sent again; `input`, `fingerprint`: with `resend --input`, the
    file their corrected requests came from, instead of the job's input)."""

    t: float
    resend: int | None = None
    input: str | None = None
    fingerprint: str | None = None

    def to_json(self) -> bytes:
        rec: dict[str, Any] = {"e": "resume", "t": self.t}
        if self.resend is not None:
            rec["resend"] = self.resend
        if self.input is not None:
            rec["input"] = self.input
            rec["fingerprint"] = self.fingerprint
        return orjson.dumps(rec, option=_NL)


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    """{"e": "budget", ...}: a run's budget (None: no limit in that unit) and its prices
    (`spend.Prices.as_json`), which status and report price the job's spend at."""

    t: float
    tokens: int | None = None
    usd: float | None = None
    prices: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps({"e": "budget", "t": self.t, "tokens": self.tokens,
                             "usd": self.usd, "prices": self.prices}, option=_NL)


@dataclass(slots=True)
class DispatchRecord:
    """["d", line, attempt, custom_id(, reserved)]: flushed before the request's bytes leave;
    under a budget `reserved` is the attempt's worst case, [model, prompt, output]."""

    line: int
    attempt: int
    custom_id: str
    reserved: tuple[str, int, int] | None = None

    def to_json(self) -> bytes:
        return self.of(self.line, self.attempt, self.custom_id, self.reserved)

    @staticmethod
    def of(line: int, attempt: int, custom_id: str,
           reserved: Sequence[Any] | None = None) -> bytes:
        """`DispatchRecord(...).to_json()` without building the record: one per attempt."""
        if reserved is not None:
            return orjson.dumps(("d", line, attempt, custom_id, reserved), option=_NL)
        return orjson.dumps(("d", line, attempt, custom_id), option=_NL)


@dataclass(slots=True)
class OutcomeRecord:
    """["o", line, outcome, code, t, latency_ms, ttft_ms]: resume reads the first three
    fields; the time fields, present for outcomes this run saw happen, are what
    `tmbatch report` draws."""

    line: int
    outcome: Outcome
    code: str = ""
    t: float | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None

    @property
    def cached(self) -> bool:
        """Answered from the response cache (`--cache`): nothing was sent for it."""
        return self.code == CACHED and self.outcome is Outcome.OK

    def to_json(self) -> bytes:
        # orjson writes an Outcome (a StrEnum) as its value, without Enum.value's call
        rec: tuple[Any, ...] = ("o", self.line, self.outcome, self.code)
        if self.t is not None:
            rec += (self.t,)
            if self.latency_ms is not None or self.ttft_ms is not None:
                rec += (self.latency_ms, self.ttft_ms)
        return orjson.dumps(rec, option=_NL)

    @staticmethod
    def ok_json(line: int, t: float, latency_ms: float | None, ttft_ms: float | None) -> bytes:
        """`OutcomeRecord(line, Outcome.OK, "", t, latency_ms, ttft_ms).to_json()`, without
        building the record: one is written per answer."""
        if latency_ms is None and ttft_ms is None:
            return orjson.dumps(("o", line, _OK, "", t), option=_NL)
        return orjson.dumps(("o", line, _OK, "", t, latency_ms, ttft_ms), option=_NL)


@dataclass(frozen=True, slots=True)
class PauseRecord:
    """["p", t, seconds]: every worker paused for a Retry-After (drawn by the report)."""

    t: float
    seconds: float

    def to_json(self) -> bytes:
        return orjson.dumps(("p", self.t, self.seconds), option=_NL)


@dataclass(frozen=True, slots=True)
class MarkRecord:
    """["m", results_size, failures_size]: the output sizes after a batch of outcomes, so a
    resume knows where outcomes without a journal record can start."""

    results_size: int
    failures_size: int

    def to_json(self) -> bytes:
        # two ints: formatted directly, as orjson would (one per flush with outcomes)
        return b'["m",%d,%d]\n' % (self.results_size, self.failures_size)


@dataclass(frozen=True, slots=True)
class SpendRecord:
    """["s", t, spent, in_flight, unknown]: the job's spend so far (`journal.journal`):
    {model: [prompt, completion, cached, requests]}, {model: [prompt, output, attempts]}."""

    t: float
    spent: dict[str, list[int]]
    in_flight: dict[str, list[int]] = field(default_factory=dict)
    unknown: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(("s", self.t, self.spent, self.in_flight, self.unknown),
                            option=_NL)


Record = (Header | ResumeRecord | BudgetRecord | DispatchRecord | OutcomeRecord | PauseRecord
          | MarkRecord | SpendRecord)


# -- the one decoder --------------------------------------------------------------------------
_OUTCOMES = {o.value: o for o in Outcome}
_NUM = frozenset((int, float))
_NUM_OR_NONE = frozenset((int, float, type(None)))
_OUTCOME_TAIL = ("", None, None, None)  # code, t, latency_ms, ttft_ms when not written
_CORRUPT = "a corrupt line (not a torn last line)"
_SHAPES = {
    "d": 'a dispatch is ["d", line, attempt, custom_id(, [model, prompt, output])]',
    "o": 'an outcome is ["o", line, outcome, code(, t(, latency_ms, ttft_ms))]',
    "p": 'a pause is ["p", t, seconds]',
    "m": 'a mark is ["m", results_size, failures_size]',
    "s": 'a spend snapshot is ["s", t, spent, in_flight, unknown]',
}


def decode(raw: bytes) -> Record:
    """The record a line of the journal (after its header) holds; RecordError says why it
    holds none."""
    return next(decode_lines((raw,)))


def decode_lines(lines: Iterable[bytes]) -> Iterator[Record]:
    """The one decoder: each line as its record, or a RecordError (with the line) at the
    first that is none. The two per-line kinds are decoded here, inline and each checked in
    one expression: a million-line job has two million of them (the rest are a few a
    second at most, decoded by `_LISTS` and `_event`)."""
    loads, corrupt, outcomes, nums = orjson.loads, orjson.JSONDecodeError, _OUTCOMES, _NUM_OR_NONE
    dispatch_, outcome_, type_, int_, str_, list_ = \
        DispatchRecord, OutcomeRecord, type, int, str, list
    for raw in lines:
        tag = None
        try:
            v = loads(raw)
            tag = v[0] if type_(v) is list_ and v else None
            if tag == "d":
                if len(v) == 4:
                    _, line, attempt, cid = v
                    res = None
                else:
                    _, line, attempt, cid, res = v
                    if not (type_(res) is list_ and len(res) == 3 and type_(res[0]) is str_
                            and type_(res[1]) is int_ and type_(res[2]) is int_):
                        raise RecordError(_SHAPES["d"])
                    res = tuple(res)
                if not (type_(line) is int_ and line > 0 and type_(attempt) is int_
                        and type_(cid) is str_):
                    raise RecordError(_SHAPES["d"])
                rec: Record = dispatch_(line, attempt, cid, res)
            elif tag == "o":
                _, line, name, code, t, latency, ttft = v if len(v) == 7 else \
                    (*v, *_OUTCOME_TAIL[len(v) - 3:])
                outcome = outcomes.get(name)
                if outcome is None:
                    raise RecordError(f"an unknown outcome {quoted(name)}")
                if not (type_(line) is int_ and line > 0 and type_(code) is str_
                        and type_(t) in nums and type_(latency) in nums and type_(ttft) in nums):
                    raise RecordError(_SHAPES["o"])
                rec = outcome_(line, outcome, code, t, latency, ttft)
            else:
                rec = _LISTS[tag](v) if tag is not None else _event(v)
        except RecordError as exc:
            exc.raw = raw
            raise
        except corrupt:
            raise RecordError(_CORRUPT, raw) from None
        except (KeyError, IndexError, TypeError, ValueError):
            known = _SHAPES.get(tag) if type(tag) is str else None
            raise RecordError(known or f"an unknown record kind {quoted(tag)}", raw) from None
        yield rec


def decode_header(value: Any) -> Header:
    """The journal's first line: {"e": "start", ...}."""
    if type(value) is not dict or value.get("e") != "start":
        raise RecordError("not a journal header")
    text = [value.get(k) for k in ("input", "fingerprint", "job")]
    options = value.get("options") or {}
    t, version = value.get("t"), value.get("v", FORMAT_VERSION)
    made_by, merged = value.get("tmbatch"), value.get("merged")
    if not (all(type(v) is str for v in text) and type(options) is dict
            and type(t) in _NUM_OR_NONE and type(version) is int
            and (made_by is None or type(made_by) is str)
            and (merged is None or type(merged) is list)):
        raise RecordError("a journal header without its input, fingerprint, job or options")
    return Header(text[0], text[1], text[2], options, t, version, made_by, merged)


def _event(value: Any) -> Record:
    """{"e": ...}: a later run's start, or its budget."""
    if type(value) is not dict:
        raise RecordError("neither a record list nor an event object")
    e, t = value.get("e"), value.get("t")
    if e == "resume":
        resend, source, fp = value.get("resend"), value.get("input"), value.get("fingerprint")
        if type(t) in _NUM and (resend is None or type(resend) is int) and \
                (source is None or type(source) is str) and (fp is None or type(fp) is str):
            return ResumeRecord(t, resend, source, fp)
        raise RecordError('a resume record is {"e": "resume", "t": seconds}')
    if e == "budget":
        tokens, usd, prices = value.get("tokens"), value.get("usd"), value.get("prices") or {}
        if type(t) in _NUM and (tokens is None or type(tokens) is int) \
                and type(usd) in _NUM_OR_NONE and type(prices) is dict:
            return BudgetRecord(t, tokens, usd, prices)
        raise RecordError('a budget record is {"e": "budget", "t", "tokens", "usd", "prices"}')
    if e == "start":
        raise RecordError("a second journal header (only the first line is one)")
    raise RecordError(f"an unknown event {quoted(e)}")


def _pause(v: list[Any]) -> PauseRecord:
    if len(v) != 3 or type(v[1]) not in _NUM or type(v[2]) not in _NUM:
        raise RecordError('a pause is ["p", t, seconds]')
    return PauseRecord(v[1], v[2])


def _mark(v: list[Any]) -> MarkRecord:
    if len(v) != 3 or type(v[1]) is not int or type(v[2]) is not int or min(v[1], v[2]) < 0:
        raise RecordError('a mark is ["m", results_size, failures_size]')
    return MarkRecord(v[1], v[2])


def _spend(v: list[Any]) -> SpendRecord:
    if len(v) != 5 or type(v[1]) not in _NUM or type(v[2]) is not dict \
            or type(v[3]) is not dict or type(v[4]) is not int:
        raise RecordError('a spend snapshot is ["s", t, spent, in_flight, unknown]')
    return SpendRecord(v[1], _counts(v[2], 4), _counts(v[3], 3), v[4])


def _counts(table: dict[str, Any], width: int) -> dict[str, list[int]]:
    """{model: [n, ...]} with exactly `width` integers per model, whatever was written."""
    out = {}
    for model, row in table.items():
        nums = [int(v) if type(v) in _NUM else 0 for v in row] if type(row) is list else []
        out[str(model)] = (nums + [0] * width)[:width]
    return out


_LISTS = {"p": _pause, "m": _mark, "s": _spend}  # "d" and "o": `decode_lines`


def quoted(value: Any) -> str:
    return orjson.dumps(value).decode() if value is not None else "(none)"
