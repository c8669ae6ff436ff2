"""The safety contract: every attempt ends in exactly one outcome, and the outcome decides.

Non-idempotent POSTs are generated and billed once accepted, so the only failures that may
be sent again without the user asking are the ones where the server provably did no work:
the bytes never left (`not_sent`) or the server said "not now" (`rejected`).

The table is data, in the manner of urllib3's `util/retry.py`: each `Outcome` carries a
`Policy`, and every module asks the member what it permits (`failure.cls.policy.refund`)
instead of comparing class names. Adding a rule means adding a field here, once.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tmbatch.base.redact import SECRETS


@dataclass(frozen=True, slots=True)
class Policy:
    """What one outcome permits. Read each field as a sentence about the outcome."""

    # The line has its final outcome: a resume skips it (a `fatal` refusal or a `pending`
    # line is sent again on resume: the server did no work for either).
    final: bool
    # It is a failure: written to failures.jsonl and counted by class.
    failure: bool
    # The server provably did no work and may accept it later: sending it again cannot make
    # anyone pay twice, so it is retried automatically, and a stopping run leaves it pending.
    retry: bool
    # The server may have done the work, so only an idempotent route may retry it by itself.
    retry_if_idempotent: bool
    # Nothing was generated: the tokens reserved for the attempt go back to the --tpm bucket.
    refund: bool
    # The server says we are too fast: adaptive admission slows down.
    slows_admission: bool
    # Proof that the server did no work, and that it would later: retried for as long as the
    # run makes progress (--patience), not --max-retries times.
    patient: bool
    # Nothing more may be sent in this run (401/403: every request would fail the same way).
    stops_run: bool
    # `tmbatch resend --class X` may choose it (a `fatal` one is resent by resuming).
    user_resendable: bool
    # The request reached the server (it answered, or may have read it): a run whose attempts
    # never get this far is talking to the wrong host or no network at all.
    reached_server: bool
    # Its byte in compact.LineStates (0 and 1 are "unseen" and "in flight").
    state: int
    # How `tmbatch status` and `resend` describe it to a person.
    meaning: str

    def may_retry(self, idempotent: bool) -> bool:
        """The tenacity predicate's whole logic: never 'retry on any exception'."""
        return self.retry or (idempotent and self.retry_if_idempotent)


class Outcome(StrEnum):
    """Every outcome an attempt or a line can have; the journal spells them by value."""

    OK = "ok"
    NOT_SENT = "not_sent"
    REJECTED = "rejected"
    AMBIGUOUS = "ambiguous"
    PERMANENT = "permanent"
    FATAL = "fatal"
    # Internal, never reported: an attempt the server refused (or that never left) while the
    # run was stopping. The line has no outcome yet; the next run sends it.
    PENDING = "pending"

    @property
    def policy(self) -> Policy:
        return POLICIES[self]


_ = False
Y = True
# One row per outcome, the columns in Policy's order (Y yes, _ no). Read down a column to see
# who may do what: only the rows with `retry` are ever sent again without the user asking.
#                final fail retry idemp refund slows patient stops resend reached state
_TABLE: dict[Outcome, tuple[bool, bool, bool, bool, bool, bool, bool, bool, bool, bool,
                            int]] = {
    Outcome.OK:        (Y, _, _, _, _, _, _, _, _, Y, 2),
    # DNS failure, connection refused, TLS handshake, connect timeout: the bytes never left
    Outcome.NOT_SENT:  (Y, Y, Y, Y, Y, _, _, _, Y, _, 3),
    # 429; 503 with Retry-After; 408: the server refused it before doing any work
    Outcome.REJECTED:  (Y, Y, Y, Y, Y, Y, Y, _, Y, Y, 4),
    # read timeout, reset after sending, 5xx, a cut stream: the server may have done the work
    Outcome.AMBIGUOUS: (Y, Y, _, Y, _, _, _, _, Y, Y, 5),
    # 400, 404, 422, a redirect, a bad input line: sending it again gives the same answer
    Outcome.PERMANENT: (Y, Y, _, _, Y, _, _, _, Y, Y, 6),
    # 401/403: the key is wrong for every request; nothing was done, sent again on resume
    Outcome.FATAL:     (_, Y, _, _, Y, _, _, Y, _, Y, 7),
    Outcome.PENDING:   (_, _, _, _, Y, _, _, _, _, _, 0),
}
_MEANING = {
    Outcome.OK: "succeeded",
    Outcome.NOT_SENT: "never reached the server (retries exhausted); safe to resend",
    Outcome.REJECTED: "refused by the server's rate limit (retries exhausted); safe to resend",
    Outcome.AMBIGUOUS: "may have been processed and billed; resending may bill it twice",
    Outcome.PERMANENT: "refused as it is (error.code says why): the line must be corrected, "
                       "or the server must serve its model, before it can succeed",
    Outcome.FATAL: "refused before any work (401/403); sent again when the run resumes",
    Outcome.PENDING: "not yet sent",
}
POLICIES: dict[Outcome, Policy] = {
    o: Policy(*row, meaning=_MEANING[o]) for o, row in _TABLE.items()
}
del _, Y

# The failure classes users see, in the order every report lists them.

FAILURE_CLASSES: tuple[Outcome, ...] = tuple(o for o in Outcome if o.policy.failure)
RESENDABLE: tuple[Outcome, ...] = tuple(o for o in Outcome if o.policy.user_resendable)

class Cause(StrEnum):
    """Why a failed line failed, as far as what fixes it goes."""

    LINE = "line"  # the input line cannot be sent as written: it never was (the reader)
    REQUEST = "request"  # the server refused the request as written (400, 413, 422, ...)
    SERVED = "served"  # the server does not serve the line's model or route (yet)
    TRANSIENT = "transient"  # nothing is wrong with the line: send it again (or resume)


@dataclass(frozen=True, slots=True)
class Fix:
    """What a failure code says about its lines and what to do: the one place the advice is
    written (the end of a run, `resend`, the docs' table). `text` may name {out} (the output
    directory), {resume} (the command that resumes the job) and {fixed} (a corrected file)."""

    cause: Cause
    text: str
    # The advice when no line of the job was ever sent (nothing billed, so starting over
    # costs nothing), where it is simpler; {restart}: the job's command with --restart.
    unsent: str | None = None

    def say(self, *, nothing_sent: bool = False, **names: str) -> str:
        text = self.unsent if nothing_sent and self.unsent else self.text
        return text.format(**names)


_RESEND_INPUT = ("tmbatch export {out} --failed --as-input > {fixed}, correct the lines in "
                 "{fixed}, then tmbatch resend {out} --input {fixed}")
_FIX_LINE = ("{hint}; then send the corrected lines: tmbatch resend {{out}} --input {{fixed}} "
             "({{fixed}}: the corrected input, or only its corrected lines; matched by "
             "custom_id, a line that succeeded is never sent again)")


def _line_fix(hint: str, unsent: str | None = None) -> Fix:
    return Fix(Cause.LINE, _FIX_LINE.format(hint=hint), unsent)


# Codes the reader gives a line it cannot send (tmbatch.inputs.reader), and the server-side
# refusals with advice of their own. A code not here takes its class's (CLASS_FIXES).
FIXES: dict[str, Fix] = {
    "invalid_json": _line_fix("write each line as one JSON object"),
    "invalid_utf8": _line_fix("save the file as UTF-8"),
    "too_deep": _line_fix("flatten the request (at most 255 levels of nesting)"),
    "number_out_of_range": _line_fix("quote the number as a string or use a smaller one"),
    "not_an_object": _line_fix("make each line a JSON object"),
    "unknown_field": _line_fix("keep only custom_id, method, url and body"),
    "missing_field": _line_fix("add the missing field(s)"),
    "invalid_method": _line_fix("use method POST"),
    "invalid_url": _line_fix("give url as a path, e.g. /v1/chat/completions"),
    "unsupported_url": _line_fix("use a supported route, e.g. /v1/chat/completions"),
    "invalid_body": _line_fix("make body a JSON object"),
    "invalid_custom_id": _line_fix("give each line a unique non-empty string custom_id"),
    "duplicate_custom_id": _line_fix("give the line a custom_id of its own"),
    "missing_model": _line_fix("add body.model"),
    "model_is_uuid": _line_fix("name the served model (`tmbatch models` lists them), not a "
                               "UUID"),
    "invalid_stream": _line_fix("make body.stream true or false (on a route that streams)"),
    "line_too_long": _line_fix("shorten the line (or raise --max-line-bytes and --restart)"),
    "bare_body_without_endpoint": _line_fix(
        "the line is a bare request body: wrap it as {{\"custom_id\", \"method\", \"url\", "
        "\"body\"}} (--endpoint reads a whole file of bare bodies)",
        "the lines are bare request bodies: pass --endpoint (chat, completions, responses, "
        "...). No line of this job was sent, so it can start over: {restart} --endpoint chat"),
    "batch_line_with_endpoint": _line_fix(
        "the line is an OpenAI Batch line in a job run with --endpoint: resend reads {fixed} "
        "as Batch lines, so it can stay as it is",
        "the lines are OpenAI Batch lines: drop --endpoint. No line of this job was sent, so "
        "it can start over without it: {restart_batch}"),
    "model_not_served": Fix(Cause.SERVED, (
        "the server does not serve the model (`tmbatch models` lists the served ones): once "
        "it does, tmbatch resend {out} --class permanent checks GET /v1/models again and "
        "sends its lines; or name a served model: " + _RESEND_INPUT)),
    "route_not_served": Fix(Cause.SERVED, (
        "the server has no such route: send the lines to a server that has it, or change "
        "their url: " + _RESEND_INPUT)),
    "not_served": Fix(Cause.SERVED, (
        "the server serves neither the model nor the route: once it does, tmbatch resend "
        "{out} --class permanent sends them again; or change them: " + _RESEND_INPUT)),
    "not_found": Fix(Cause.SERVED, (
        "the server answered 404 (error.message says what it lacks): once it serves it, "
        "tmbatch resend {out} --class permanent; or change the lines: " + _RESEND_INPUT)),
}
CLASS_FIXES: dict[Outcome, Fix] = {
    Outcome.NOT_SENT: Fix(Cause.TRANSIENT, "check the base URL and the network, then tmbatch "
                          "resend {out} --class not_sent (safe: they never reached it)"),
    Outcome.REJECTED: Fix(Cause.TRANSIENT, "safe to send again, slower or later: tmbatch "
                          "resend {out} --class rejected (or resume with a longer --patience)"),
    Outcome.AMBIGUOUS: Fix(Cause.TRANSIENT, "they may have been billed: look first with "
                           "tmbatch resend {out} --class ambiguous --dry-run, then send them "
                           "without --dry-run"),
    Outcome.PERMANENT: Fix(Cause.REQUEST, "the server refused the request as written "
                           "(error.message says why): " + _RESEND_INPUT),
    Outcome.FATAL: Fix(Cause.TRANSIENT, "the key was refused: fix TENSORMESH_INFERENCE_API_KEY "
                       "(and, on-demand, the user id), then resume: {resume}"),
}


def fix_for(cls: Outcome, code: str) -> Fix:
    """The advice for a failure: its code's when the code has one, else its class's."""
    fix = FIXES.get(code)
    if fix is not None and cls is Outcome.PERMANENT:
        return fix
    return CLASS_FIXES.get(cls, CLASS_FIXES[Outcome.PERMANENT])


# A Retry-After further away than this is capped: a server that asks for a
# year is treated as asking for this long (documented in the README).
MAX_RETRY_AFTER = 600.0
# seconds a 429 may take from the server's Date to being read here (its latency), within
# which this machine's clock is taken to agree with the server's
CLOCK_SLACK = 0.25


@dataclass
class AttemptFailed(Exception):
    """One attempt failed; `cls` decides whether it may be sent again."""

    cls: Outcome
    code: str
    message: str
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] | None = None  # the answer's, for admission to learn from

    def __str__(self) -> str:
        return f"{self.cls}/{self.code}: {self.message}"


def retryable(exc: BaseException, idempotent: bool) -> bool:
    """The tenacity predicate: built from the class table, never 'any exception'."""
    if not isinstance(exc, AttemptFailed):
        return False
    return exc.cls.policy.may_retry(idempotent)


def _seconds(raw: str | None) -> float | None:
    """A non-negative finite number of seconds, or None for garbage."""
    if not raw:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


# Where a server says how long to wait, in the order believed: the standard header (and
# OpenAI's milliseconds form), then what the LiteLLM proxy relays from its upstream provider
# when it adds no Retry-After of its own.
RETRY_AFTER_HEADERS = (
    ("retry-after-ms", "Retry-After"),
    ("llm_provider-retry-after-ms", "llm_provider-retry-after"),
)


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date;
    else the same pair prefixed `llm_provider-` (LiteLLM's relayed 429s carry only those).

    Garbage and negative values count as absent; huge ones are capped.
    """
    for ms_name, name in RETRY_AFTER_HEADERS:
        ms = _seconds(headers.get(ms_name))
        if ms is not None:
            return min(ms / 1000.0, MAX_RETRY_AFTER)
        value = _seconds_or_date(headers.get(name), now, headers.get("Date"))
        if value is not None:
            return value
    return None


def _http_date(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return None if when is None else when.timestamp()


def _seconds_or_date(raw: str | None, now: float | None, served: str | None) -> float | None:
    """A date is in the server's clock. Counted from this machine's clock it is right when
    the two agree, but a pod whose clock runs ahead would send inside the window (and one
    that runs behind would wait too long). The answer's own `Date` (whole seconds: the
    server's now is within a second after it) says whether they agree; when they do not, the
    wait counts from that Date, the longest the window can still be."""
    if not raw:
        return None
    value = _seconds(raw)
    if value is not None:
        return min(value, MAX_RETRY_AFTER)
    when = _http_date(raw)
    if when is None:
        return None
    value = when - (time.time() if now is None else now)
    server_now = _http_date(served)
    if server_now is not None:
        longest = when - server_now
        if not longest - 1.0 - CLOCK_SLACK <= value <= longest:
            value = longest
    return min(max(value, 0.0), MAX_RETRY_AFTER)


def error_message(body: Any, fallback: str) -> str:
    """The server's own words when it sent an OpenAI-style error body (a key it echoed is
    removed before the message is cut short, so no part of it survives the cut)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return SECRETS.text(err["message"])[:500]
        if isinstance(err, str):
            return SECRETS.text(err)[:500]
        if isinstance(body.get("message"), str):
            return SECRETS.text(body["message"])[:500]
    return fallback
