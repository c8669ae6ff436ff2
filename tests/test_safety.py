"""The safety contract as a table: each status and transport failure lands in its class, and
each class permits exactly what DESIGN.md's table says. The end-to-end tests prove the same
on the wire; this pins the table itself, so a change to it is a deliberate, visible one."""

from __future__ import annotations

import aiohttp
import pytest

from tmbatch.client.classify import classify_exception, classify_status
from tmbatch.policy import (
    FAILURE_CLASSES,
    RESENDABLE,
    AttemptFailed,
    Outcome,
    retryable,
)


@pytest.mark.parametrize("status,headers,cls", [
    (429, {}, Outcome.REJECTED),
    (503, {"Retry-After": "2"}, Outcome.REJECTED),
    (408, {}, Outcome.REJECTED),
    (503, {}, Outcome.AMBIGUOUS),  # no word on when: the server may have done the work
    (500, {}, Outcome.AMBIGUOUS),
    (502, {}, Outcome.AMBIGUOUS),
    (504, {}, Outcome.AMBIGUOUS),
    (409, {}, Outcome.AMBIGUOUS),  # an idempotency key still in use
    (400, {}, Outcome.PERMANENT),
    (404, {}, Outcome.PERMANENT),
    (422, {}, Outcome.PERMANENT),
    (401, {}, Outcome.FATAL),
    (403, {}, Outcome.FATAL),
])
def test_status_classes(status: int, headers: dict[str, str], cls: Outcome) -> None:
    failed = classify_status(status, headers, {"error": {"message": "m"}}, None)
    assert failed.cls is cls and failed.message == "m" and failed.headers == headers


def test_transport_failures_by_whether_the_bytes_can_have_left() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, None, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    assert classify_exception(refused).cls is Outcome.NOT_SENT
    assert classify_exception(aiohttp.ConnectionTimeoutError()).cls is Outcome.NOT_SENT
    assert classify_exception(aiohttp.ServerDisconnectedError()).cls is Outcome.AMBIGUOUS
    assert classify_exception(TimeoutError()).cls is Outcome.AMBIGUOUS
    assert classify_exception(ConnectionResetError()).cls is Outcome.AMBIGUOUS


def test_only_provably_unprocessed_failures_are_retried_on_billed_routes() -> None:
    billed = {cls for cls in Outcome
              if retryable(AttemptFailed(cls, "c", "m"), idempotent=False)}
    assert billed == {Outcome.NOT_SENT, Outcome.REJECTED}
    idempotent = {cls for cls in Outcome
                  if retryable(AttemptFailed(cls, "c", "m"), idempotent=True)}
    assert idempotent == {Outcome.NOT_SENT, Outcome.REJECTED, Outcome.AMBIGUOUS}
    assert not retryable(ValueError("anything else"), idempotent=True)


def test_what_each_class_permits() -> None:
    assert FAILURE_CLASSES == (Outcome.NOT_SENT, Outcome.REJECTED, Outcome.AMBIGUOUS,
                               Outcome.PERMANENT, Outcome.FATAL)
    assert set(RESENDABLE) == set(FAILURE_CLASSES) - {Outcome.FATAL}
    # refunded = nothing was generated; an ambiguous attempt may have been
    assert {c for c in Outcome if not c.policy.refund} == {Outcome.OK, Outcome.AMBIGUOUS}
    assert {c for c in Outcome if c.policy.slows_admission} == {Outcome.REJECTED}
    assert {c for c in Outcome if c.policy.stops_run} == {Outcome.FATAL}
    # a fatal refusal and a pending line are sent again when the run resumes
    assert {c for c in Outcome if not c.policy.final} == {Outcome.FATAL, Outcome.PENDING}
    assert {c for c in Outcome if not c.policy.reached_server} == {Outcome.NOT_SENT,
                                                                   Outcome.PENDING}
    states = [c.policy.state for c in Outcome if c is not Outcome.PENDING]
    assert len(set(states)) == len(states) and min(states) >= 2  # 0, 1: unseen, in flight


def test_the_policy_is_data_and_knows_no_transport() -> None:
    """The table imports no HTTP library: the client turns aiohttp's errors into its values."""
    import ast
    from pathlib import Path

    import tmbatch.policy

    tree = ast.parse(Path(tmbatch.policy.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"aiohttp", "asyncio", "httpx", "requests"}, names
