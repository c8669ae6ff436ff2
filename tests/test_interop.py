"""What OpenAI-compatible servers that nobody here wrote do, reproduced small (issue 12).

tests/test_conformance.py runs the real servers; these tests pin each fix where the real
servers cannot show it cheaply or at all: a model past preflight's scan, a route judged
missing after its 404s, rate-limit headers read as "one more fits", a settled rate that a
burst of simultaneous answers cannot inflate. Real sockets throughout: the simulator, or
an aiohttp app on 127.0.0.1 in a thread (the `serve` fixture).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    clean_env,
    keyed_env,
    outcomes,
    run_cli,
    write_jsonl,
)
from tmbatch.base.config import Settings
from tmbatch.client.http import make_session, send
from tmbatch.client.preflight import SCAN_LINES
from tmbatch.client.sse import Aggregator, StreamError, error_payload
from tmbatch.inputs.reader import Request
from tmbatch.limits import Admission
from tmbatch.policy import AttemptFailed, Outcome, parse_retry_after

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (e.encode() if isinstance(e, str) else orjson.dumps(e))
                    + b"\n\n" for e in events)


def aggregate(route: str, raw: bytes) -> dict[str, Any]:
    agg = Aggregator(route)
    agg.feed(raw, 0.0)
    return agg.finish()


def run(url: str, rows: list[Any], tmp_path: Path, *args: str, name: str = "out") -> Any:
    inp = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return run_cli(["run", str(inp), "-o", str(tmp_path / name), "--base-url", url,
                    "--job-id", "interop", *args], env=keyed_env(), timeout=90)


# -- 1. a Responses stream ends at its terminal event -----------------------------------------

RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "output": [
    {"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": "Hi there", "annotations": []}]}]}
RESPONSE_EVENTS = (
    {"type": "response.created", "response": {**RESPONSE, "status": "in_progress"}},
    {"type": "response.output_text.delta", "delta": "Hi "},
    {"type": "response.output_text.delta", "delta": "there"},
)


@pytest.mark.parametrize("terminal,done", [("response.completed", False),
                                           ("response.completed", True),
                                           ("response.incomplete", False)])
def test_a_responses_stream_is_whole_at_its_terminal_event(terminal: str, done: bool) -> None:
    """llmock, mock-ai-api and vLLM end a Responses stream at response.completed with no
    `data: [DONE]`; OpenAI and Tensormesh send one after it. Both are whole answers."""
    body = {**RESPONSE, "status": terminal.split(".")[1]}
    raw = sse(*RESPONSE_EVENTS, {"type": terminal, "response": body}, *(["[DONE]"] * done))
    assert aggregate(RESPONSES, raw) == body


def test_a_responses_stream_cut_before_its_terminal_event_is_cut() -> None:
    with pytest.raises(StreamError) as info:
        aggregate(RESPONSES, sse(*RESPONSE_EVENTS))
    assert info.value.code == "stream_cut" and "response.completed" in info.value.message
    failed = {"type": "response.failed",
              "response": {**RESPONSE, "status": "failed", "error": {"message": "boom"}}}
    with pytest.raises(StreamError) as info:
        aggregate(RESPONSES, sse(*RESPONSE_EVENTS, failed))
    assert info.value.code == "stream_error" and "boom" in info.value.message


def test_chat_is_not_whole_without_done() -> None:
    """Only /v1/responses has a terminal event: a chat stream still needs its [DONE]."""
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"},
                                     "finish_reason": "stop"}]}
    with pytest.raises(StreamError, match=r"before data: \[DONE\]"):
        aggregate(CHAT, sse(chunk))


def _stream_app(payload: bytes) -> web.Application:
    """Sends `payload` as SSE, then closes the connection without ending the chunked body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(payload)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post(CHAT, handler)
    return app


def _settings(url: str) -> Settings:
    return Settings(surface="serverless", base_url=url, api_key=API_KEY, user_id=None,
                    timeout=30, max_retries=0, ca_bundle=None)


async def _send(url: str, route: str, body: dict[str, Any]) -> Any:
    session = make_session(_settings(url), 2)
    try:
        return await send(session, route, body)
    except AttemptFailed as exc:
        return exc
    finally:
        await session.close()


def test_a_cut_after_done_keeps_the_whole_answer(serve: Any) -> None:
    """The answer and its [DONE] arrived; only closing the connection failed: that is a
    success, not a paid answer thrown away as `stream_cut`."""
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                           "content": "whole"},
                                     "finish_reason": "stop"}]}
    app = serve(_stream_app(sse(chunk, "[DONE]")))
    answer = asyncio.run(_send(app.url(), CHAT, {"model": "m", "stream": True}))
    assert not isinstance(answer, AttemptFailed), answer
    assert answer.body["choices"][0]["message"]["content"] == "whole"
    cut = serve(_stream_app(sse(chunk)))
    failed = asyncio.run(_send(cut.url(), CHAT, {"model": "m", "stream": True}))
    assert isinstance(failed, AttemptFailed) and failed.code == "stream_cut"


# -- 2. a streamed tool call has content null, as unstreamed ----------------------------------

TOOL_DELTA = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "get_weather",
                                           "arguments": "{\"city\": \"Paris\"}"}}]}


@pytest.mark.parametrize("first", [
    {"role": "assistant", "content": None, **TOOL_DELTA},  # llmock, xpyd-sim
    {"role": "assistant", **TOOL_DELTA},  # mock-ai-api: no content key at all
])
def test_a_streamed_tool_call_has_content_null(first: dict[str, Any]) -> None:
    raw = sse({"id": "c", "choices": [{"index": 0, "delta": first}]},
              {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              "[DONE]")
    msg = aggregate(CHAT, raw)["choices"][0]["message"]
    assert msg["content"] is None
    call = {k: v for k, v in TOOL_DELTA["tool_calls"][0].items() if k != "index"}
    assert msg["tool_calls"] == [call]


def test_streamed_text_keeps_a_string_even_when_empty() -> None:
    """A server that says `content: ""` said there is content, and it is empty."""
    for pieces, want in ((["", "Hel", "lo"], "Hello"), ([""], "")):
        raw = sse(*({"id": "c", "choices": [{"index": 0, "delta": {"content": p}}]}
                    for p in pieces), "[DONE]")
        assert aggregate(CHAT, raw)["choices"][0]["message"]["content"] == want


# -- 3. request_id: the server's id header, else ours ------------------------------------------

def _id_app(seen: list[str]) -> web.Application:
    """/v1/chat/completions answers with the id header its `model` names (or none)."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(request.headers.get("X-Request-Id", ""))
        header = body["model"]
        headers = {} if header == "none" else {header: f"id-from-{header}"}
        status = 404 if body.get("fail") else 200
        return web.json_response({"id": "c", "object": "chat.completion", "choices": []},
                                 status=status, headers=headers)

    app = web.Application()
    app.router.add_post(CHAT, handler)
    return app


def test_request_id_is_the_servers_header_else_the_one_we_sent(serve: Any) -> None:
    seen: list[str] = []
    app = serve(_id_app(seen))
    got = {}
    for header in ("x-request-id", "request-id", "x-litellm-call-id", "none"):
        answer = asyncio.run(_send(app.url(), CHAT, {"model": header}))
        got[header] = answer.request_id
    failed = asyncio.run(_send(app.url(), CHAT, {"model": "none", "fail": True}))
    assert isinstance(failed, AttemptFailed) and failed.status == 404
    assert got["x-request-id"] == "id-from-x-request-id"
    assert got["request-id"] == "id-from-request-id"
    assert got["x-litellm-call-id"] == "id-from-x-litellm-call-id"
    # none: the X-Request-Id tmbatch sent, so the server's logs can be matched
    assert re.fullmatch(r"tmbatch-[0-9a-f]{16}-[0-9a-f]+", got["none"]) and got["none"] == seen[3]
    # the docs give that shape (they said `tmbatch-<32 hex>`: issue 24)
    assert "`tmbatch-<16 hex>-<n>`" in (ROOT / "docs" / "inputs-and-outputs.md").read_text()
    assert failed.request_id == seen[4] and len(set(seen)) == 5  # one per attempt


# -- 4. an SSE error body keeps the server's message -------------------------------------------

LITELLM_500 = (b'data: {"error": {"message": "Error processing stream start", '
               b'"type": "None", "param": "None", "code": "500"}}\n\ndata: [DONE]\n\n')


def test_an_sse_error_body_is_parsed(serve: Any) -> None:
    assert error_payload(LITELLM_500) == {"error": {
        "message": "Error processing stream start", "type": "None", "param": "None",
        "code": "500"}}
    assert error_payload(b"<html>502 Bad Gateway</html>") is None

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=LITELLM_500, status=500, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post(RESPONSES, handler)
    failed = asyncio.run(_send(serve(app).url(), RESPONSES, {"model": "m", "stream": True}))
    assert isinstance(failed, AttemptFailed) and failed.cls is Outcome.AMBIGUOUS
    assert failed.message == "Error processing stream start"
    assert failed.body["error"]["message"] == "Error processing stream start"


# -- 5 and 7. a 404 fails its (route, model), never the run -----------------------------------

def _no_completions_app(counts: Counter[str]) -> web.Application:
    """Serves chat for model `m` only (vLLM's 404 for another, or for `user: "404"`); no
    /v1/completions."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        counts[f"chat:{body['model']}"] += 1
        if body["model"] != "m" or body.get("user") == "404":
            return web.json_response({"error": {"message": f"The model `{body['model']}` "
                                                "does not exist.", "code": 404}}, status=404)
        return web.json_response({"id": "c", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop", "message":
                                               {"role": "assistant", "content": "ok"}}]})

    async def missing(request: web.Request) -> web.Response:
        await request.read()
        counts["completions"] += 1
        return web.json_response({"detail": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_post(CHAT, chat)
    app.router.add_post(COMPLETIONS, missing)
    return app


def completion_line(i: int, model: str = "m") -> dict[str, Any]:
    return {"custom_id": f"cmp-{i}", "method": "POST", "url": COMPLETIONS,
            "body": {"model": model, "prompt": "x", "max_tokens": 4}}


def test_a_missing_route_is_judged_after_its_404s_and_the_rest_runs(
        serve: Any, tmp_path: Path) -> None:
    """One chat answer, then 12 lines on a route the server lacks, then chat again: the
    first 8 get their 404 (`not_found`), the other 4 are not sent (`route_not_served`: the
    model answered on chat), every chat line succeeds, and a resume sends nothing again."""
    counts: Counter[str] = Counter()
    app = serve(_no_completions_app(counts))
    rows = [chat_line(0, model="m"), *(completion_line(i) for i in range(12)),
            *(chat_line(i, model="m") for i in range(1, 4))]
    p = run(app.url(), rows, tmp_path, "--no-preflight", "-c", "1")
    assert p.returncode == 1, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert set(res) == {f"req-{i}" for i in range(4)}
    codes = Counter(f["error"]["code"] for f in fail.values())
    assert codes == {"not_found": 8, "route_not_served": 4}, codes
    assert {f["error"]["class"] for f in fail.values()} == {"permanent"}
    assert counts["completions"] == 8
    refused = fail["cmp-11"]
    assert refused["response"] is None and refused["attempts"] == 0
    assert "has no /v1/completions" in refused["error"]["message"]
    assert "got 404 (HTTP 404)" in refused["error"]["message"]  # what the server said
    assert "the rest runs" in p.stderr and "fatal" not in p.stderr
    again = run(app.url(), rows, tmp_path, "--no-preflight", "-c", "1")
    assert again.returncode == 1, again.stderr
    assert counts["completions"] == 8 and counts["chat:m"] == 4  # nothing sent again


def test_an_unserved_model_is_told_from_a_missing_route(serve: Any, tmp_path: Path) -> None:
    """Chat answered model m, then 11 lines name model `gone`: after 8 404s the other 3
    fail unsent as `model_not_served` (the route works, the model does not)."""
    counts: Counter[str] = Counter()
    app = serve(_no_completions_app(counts))
    rows = [chat_line(0, model="m"), *(chat_line(i, model="gone") for i in range(1, 12))]
    p = run(app.url(), rows, tmp_path, "--no-preflight", "-c", "1")
    assert p.returncode == 1, p.stderr
    _, fail = outcomes(tmp_path / "out")
    codes = Counter(f["error"]["code"] for f in fail.values())
    assert codes == {"not_found": 8, "model_not_served": 3}, codes
    assert counts["chat:gone"] == 8
    assert "'gone'" in fail["req-11"]["error"]["message"]


def test_a_pair_that_answered_once_is_never_judged(serve: Any, tmp_path: Path) -> None:
    """404s after a success on the same route and model are each line's own answer: every
    line is sent and gets it."""
    counts: Counter[str] = Counter()
    app = serve(_no_completions_app(counts))
    rows = [chat_line(0, model="m"), *(chat_line(i, model="m", user="404")
                                       for i in range(1, 12))]
    p = run(app.url(), rows, tmp_path, "--no-preflight", "-c", "1")
    assert p.returncode == 1, p.stderr
    _, fail = outcomes(tmp_path / "out")
    assert Counter(f["error"]["code"] for f in fail.values()) == {"not_found": 11}
    assert counts["chat:m"] == 12


def test_an_unserved_model_past_the_preflight_scan_fails_unsent(
        sim: Any, tmp_path: Path) -> None:
    """Preflight reads the models of the first SCAN_LINES lines only; the run gets the
    served list, so a line after them naming an unserved model fails `model_not_served`
    (naming it and the served ones) without being sent, and the rest runs."""
    filler = [b"[1]"] * SCAN_LINES  # bad lines: read by the scan, never sent
    rows = [*filler, chat_line(1), chat_line(2, model="tm-smal"), chat_line(3)]
    p = run(sim.url, rows, tmp_path, "-q")
    assert p.returncode == 1, p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert set(res) == {"req-1", "req-3"}
    error = fail["req-2"]["error"]
    assert (error["class"], error["code"]) == ("permanent", "model_not_served")
    assert "'tm-smal'" in error["message"] and "did you mean 'tm-small'" in error["message"]
    assert "tm-large" in error["message"]  # the served ones
    assert sim.stats()["completion_calls"] == 2
    assert "line 10002" in p.stderr and "model_not_served" in p.stderr


def test_preflight_warns_about_an_unserved_model_and_runs_the_rest(
        sim: Any, tmp_path: Path) -> None:
    rows = [chat_line(1), chat_line(2, model="nope"), chat_line(3, model="tm-large")]
    p = run(sim.url, rows, tmp_path)
    assert p.returncode == 1, p.stderr
    assert "preflight: model: model 'nope' is not served here" in p.stderr
    assert "1 not served: their lines fail, the rest runs" in p.stderr
    _, fail = outcomes(tmp_path / "out")
    assert list(fail) == ["req-2"] and fail["req-2"]["error"]["code"] == "model_not_served"
    assert sim.stats()["completion_calls"] == 2


# -- 6. preflight sends the key on GET routes --------------------------------------------------

def _keyed_gets_app(models_status: int = 200) -> web.Application:
    """GET /health and /v1/models want the key, as LiteLLM and vLLM --api-key do."""

    def keyed(request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {API_KEY}"

    async def health(request: web.Request) -> web.Response:
        return web.json_response({}, status=200 if keyed(request) else 401)

    async def models(request: web.Request) -> web.Response:
        if not keyed(request):
            return web.json_response({"error": {"message": "no key"}}, status=401)
        if models_status != 200:
            return web.json_response({"error": {"message": "boom"}}, status=models_status)
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = _no_completions_app(Counter())
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


def test_preflight_doctor_and_models_send_the_key_on_gets(serve: Any, tmp_path: Path) -> None:
    app = serve(_keyed_gets_app())
    p = run(app.url(), [chat_line(1, model="m")], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "refused the key" not in p.stderr and "1 model(s) checked" in p.stderr
    doc = run_cli(["doctor", "--base-url", app.url(), "--model", "m"], env=keyed_env())
    assert "ok    models   1 served: m" in doc.stdout, doc.stdout
    models = run_cli(["models", "--base-url", app.url()], env=keyed_env())
    assert (models.returncode, models.stdout) == (0, "m\n"), models.stderr


def test_preflight_does_not_claim_models_it_did_not_check(serve: Any, tmp_path: Path) -> None:
    app = serve(_keyed_gets_app(models_status=500))
    p = run(app.url(), [chat_line(1, model="m")], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "models not checked" in p.stderr
    assert "model(s) checked" not in p.stderr


# -- 8. LiteLLM's relayed Retry-After ----------------------------------------------------------

def test_llm_provider_retry_after_is_a_retry_after() -> None:
    assert parse_retry_after({"llm_provider-retry-after": "1"}) == 1.0
    assert parse_retry_after({"llm_provider-retry-after-ms": "1500",
                              "llm_provider-retry-after": "9"}) == 1.5
    # the server's own header comes first; garbage counts as absent
    assert parse_retry_after({"Retry-After": "2", "llm_provider-retry-after": "9"}) == 2.0
    assert parse_retry_after({"llm_provider-retry-after": "soon"}) is None


# -- 9. x-ratelimit reset: one more request fits long before the bucket is full ----------------

def test_remaining_zero_holds_until_one_more_request_fits(caplog: Any) -> None:
    """llmock at 120 requests/min: remaining 0, `reset-requests: 60s` (until FULL). One
    more fits in 60/120 = 0.5 s; holding everyone 60 s stalled runs for a minute."""

    async def go() -> tuple[float, float]:
        adm = Admission(concurrency=4)
        loop = asyncio.get_running_loop()
        line = Request(1, "r1", CHAT, {"model": "m", "messages": [], "max_tokens": 1})
        async with adm.permit(line) as permit:
            permit.ok({}, None, 0, {"x-ratelimit-limit-requests": "120",
                                    "x-ratelimit-remaining-requests": "0",
                                    "x-ratelimit-reset-requests": "60s"})
        lane = adm.lane("m")
        return lane.pause_until - loop.time(), lane.held_seconds

    with caplog.at_level(logging.INFO, logger="tmbatch"):
        left, held = asyncio.run(go())
    assert 0 < left <= 0.5 and held == pytest.approx(0.5, abs=0.01)
    hold = [r for r in caplog.records if getattr(r, "event", None) == "rate_limit_hold"]
    assert hold and hold[0].levelno == logging.INFO
    assert "one more fits in 0.5s" in hold[0].getMessage()


def test_a_run_at_its_limit_holds_per_request_not_per_minute(serve: Any,
                                                             tmp_path: Path) -> None:
    """Every answer says remaining 0 of 600/min, full again in 60 s: each hold is 0.1 s.
    (Read as 'until full', the 4 lines would take 3 minutes: past the CLI's timeout.)"""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"id": "c", "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "ok"}}]},
            headers={"x-ratelimit-limit-requests": "600",
                     "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": "60s"})

    app = web.Application()
    app.router.add_post(CHAT, handler)
    p = run(serve(app).url(), [chat_line(i) for i in range(4)], tmp_path, "--no-preflight",
            "-c", "1")
    assert p.returncode == 0, p.stderr
    adm = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())["this_run"]["admission"]
    assert adm["header_holds"] >= 1
    assert adm["held_seconds"] <= adm["header_holds"] * 0.1 + 1e-6, adm
    assert "every worker holds" in p.stderr


# -- 10. the settled rate is a rate the server allowed ------------------------------------------

def test_settled_rate_counts_the_time_the_answers_took(sim_factory: Any, tmp_path: Path) -> None:
    """8 answers of at least 0.2 s each, at most 8 in flight, finishing together: no honest
    rate is above 8 / 0.2 s = 40/s. (Measured between the first and last success, it was
    thousands.) A slower machine only lowers the true rate: the bound cannot flake."""
    sim = sim_factory(latency=0.2)
    p = run(sim.url, [chat_line(i) for i in range(8)], tmp_path, "--no-preflight", "-c", "8")
    assert p.returncode == 0, p.stderr
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    settled = summary["this_run"]["admission"]["settled_requests_per_second"]
    assert settled is not None and 0 < settled <= 8 / 0.2, settled


# -- issue 14: doctor and models ---------------------------------------------------------------

def test_doctor_fails_without_a_key_even_where_the_server_needs_none(sim: Any) -> None:
    """The simulator answers keyless requests; Tensormesh does not, and `run` refuses to
    start without a key: doctor must not say "all good"."""
    p = run_cli(["doctor", "--base-url", sim.url, "--model", "tm-small"], env=clean_env())
    assert p.returncode == 3, p.stdout + p.stderr
    assert "FAIL  key" in p.stdout and "doctor: problems found" in p.stdout
    assert "TENSORMESH_INFERENCE_API_KEY" in p.stdout and "--api-key-file" in p.stdout
    js = run_cli(["doctor", "--json", "--base-url", sim.url], env=clean_env())
    key = orjson.loads(js.stdout)["checks"][0]
    assert (key["name"], key["status"], key["code"]) == ("key", "error", "no_api_key")


def test_doctor_and_models_with_sim_need_no_credentials(tmp_path: Path) -> None:
    p = run_cli(["doctor", "--sim", "--model", "tm-small"], env=clean_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert "--sim" in p.stdout and "doctor: all good" in p.stdout
    assert "'tm-small' is served" in p.stdout
    p = run_cli(["models", "--sim", "--sim-models", "alpha,beta"], env=clean_env())
    assert (p.returncode, p.stdout) == (0, "alpha\nbeta\n"), p.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_on_demand_host_as_the_serverless_base_is_refused(how: str) -> None:
    url = "https://external.nebius.tensormesh.ai"
    args, extra = (["--base-url", url], {}) if how == "flag" else \
        ([], {"TENSORMESH_SERVERLESS_BASE_URL": url})
    p = run_cli(["doctor", *args], env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY,
                                                 **extra))
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "mixed up" in p.stderr and "--surface on-demand" in p.stderr

