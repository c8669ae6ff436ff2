"""tmbatch against OpenAI-compatible servers that nobody here wrote (issue 12).

Every test drives the real CLI (`python -m tmbatch run`) over real sockets against a real
server process from PyPI (tests/servers.py: versions, how each is started, its quirks). The
assertions are the behaviour the product promises; where a server cannot do something (no
route, no `n`, a tool call on a coin flip, a stream without its tool calls) the test states
it and asserts what must happen instead, so nothing is skipped in silence.

All four servers answer deterministically with the settings used here (llmock picks its text
by crc32 of model and prompt, mock-ai-api answers a fixed greeting, xpyd-sim runs with
--eos-min-ratio 1, LiteLLM returns its mock_response), so a streamed answer must equal the
unstreamed one field for field, except ids and timestamps.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel, ValidationError

from tests.conftest import clean_env, read_jsonl, run_cli, write_jsonl
from tests.servers import (
    CHAT,
    COMPLETIONS,
    LITELLM_RATE_LIMITED_MODEL,
    RESPONSES,
    SERVER_KEY,
    SPECS,
    ServerPool,
    ServerProcess,
    ServerSpec,
)

ALL = list(SPECS)
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]


@pytest.fixture(scope="session")
def server_pool(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    """Every server this session's selected tests name, booted together on first use."""
    wanted = {item.callspec.params["server_name"] for item in request.session.items
              if "server_name" in getattr(getattr(item, "callspec", None), "params", {})
              and item.get_closest_marker("skip") is None}  # LiteLLM's unless asked for
    pool = ServerPool(tmp_path_factory.mktemp("servers"), sorted(wanted))
    yield pool
    pool.stop()


@pytest.fixture
def server(server_name: str, server_pool: ServerPool) -> ServerProcess:
    """The server a test is parametrized with (`server_name`), running."""
    return server_pool.get(server_name)


class Run:
    """One finished `tmbatch run`: exit code, logs, and each line's one outcome."""

    def __init__(self, proc: Any, out: Path) -> None:
        self.code: int = proc.returncode
        self.stdout: str = proc.stdout
        self.stderr: str = proc.stderr
        self.out = out
        results = read_jsonl(out / "results.jsonl")
        failures = read_jsonl(out / "failures.jsonl")
        self.results = {r["custom_id"]: r for r in results}
        self.failures = {r["custom_id"]: r for r in failures}
        self.ids = [r["custom_id"] for r in results + failures]
        self.summary = orjson.loads((out / "summary.json").read_bytes())

    def body(self, custom_id: str) -> dict[str, Any]:
        assert custom_id in self.results, self.explain(custom_id)
        body = self.results[custom_id]["response"]["body"]
        assert isinstance(body, dict)
        return body

    def explain(self, custom_id: str) -> str:
        failure = self.failures.get(custom_id)
        what = orjson.dumps(failure["error"]).decode() if failure else "no outcome"
        return f"{custom_id}: {what}\n--- stderr ---\n{self.stderr[-3000:]}"

    def events(self) -> list[dict[str, Any]]:
        """--log-format json: one object per stderr line."""
        return [orjson.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]


def run_batch(server: ServerProcess, rows: list[dict[str, Any]], tmp_path: Path,
              *args: str, preflight: bool = False, timeout: float = 90) -> Run:
    """Run the CLI on `rows` against `server`, then check what holds for every run: each
    input line has exactly one outcome, and the key is in no output and no log."""
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    cmd = ["run", str(inp), "-o", str(out), "--base-url", server.url, *args]
    if not preflight:
        cmd.append("--no-preflight")
    proc = run_cli(cmd, env=clean_env(TENSORMESH_INFERENCE_API_KEY=SERVER_KEY),
                   timeout=timeout)
    assert (out / "summary.json").exists(), (
        f"the run did not start (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    run = Run(proc, out)
    assert sorted(run.ids) == sorted(r["custom_id"] for r in rows), (
        "every input line must have exactly one outcome\n" + proc.stderr[-3000:])
    for text in (proc.stdout, proc.stderr,
                 *(p.read_text() for p in out.iterdir() if p.is_file())):
        assert SERVER_KEY not in text
    return run


def row(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_body(spec: ServerSpec, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": spec.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8, **extra}


def completion_body(spec: ServerSpec, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": spec.model, "prompt": prompt, "max_tokens": 8, **extra}


def response_body(spec: ServerSpec, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": spec.model, "input": prompt, **extra}


def pairs(url: str, make: Any, spec: ServerSpec, n: int = 2, **extra: Any) -> list[dict]:
    """Each prompt twice: as `q-I` and streamed as `q-I-s`."""
    rows = []
    for i in range(n):
        rows.append(row(f"q-{i}", url, make(spec, f"question {i}", **extra)))
        rows.append(row(f"q-{i}-s", url, make(spec, f"question {i}", stream=True, **extra)))
    return rows


def chat_content(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a chat answer says, without what differs between two calls (ids, times)."""
    out = []
    for choice in body["choices"]:
        msg = choice["message"]
        calls = [(c["type"], c["function"]["name"], c["function"]["arguments"])
                 for c in msg.get("tool_calls") or []]
        out.append((choice["index"], msg.get("role"), msg.get("content"), calls,
                    choice.get("finish_reason")))
    return out


def response_text(body: dict[str, Any]) -> list[str]:
    return [part.get("text") for item in body["output"] if item.get("type") == "message"
            for part in item.get("content", [])]


def sdk_errors(model: type[BaseModel], body: dict[str, Any]) -> frozenset[str]:
    """Where `body` breaks the SDK type: top-level fields, or `usage.X.Y` paths (the
    members of a union are left out: one wrong output item would name every kind)."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return frozenset(".".join(map(str, e["loc"][:3] if e["loc"][0] == "usage"
                                      else e["loc"][:1])) for e in exc.errors())
    return frozenset()


def assert_missing_route(run: Run, ids: list[str], spec: ServerSpec, route: str) -> None:
    """A route the server lacks: its lines fail `permanent` with the server's 404."""
    for cid in ids:
        failure = run.failures.get(cid)
        assert failure is not None, f"{spec.name} has no {route}, yet {cid} succeeded"
        assert failure["error"]["class"] == "permanent"
        assert failure["response"]["status_code"] == 404


# ---------------------------------------------------------------------------------------------
# Each route, streamed and not, n=2


@pytest.mark.parametrize("server_name", ALL)
def test_chat_streamed_equals_unstreamed(server: ServerProcess, tmp_path: Path) -> None:
    spec = server.spec
    rows = pairs(CHAT, chat_body, spec)
    rows += [row("n2", CHAT, chat_body(spec, "two answers", n=2)),
             row("n2-s", CHAT, chat_body(spec, "two answers", n=2, stream=True))]
    run = run_batch(server, rows, tmp_path)
    assert run.code == 0, run.stderr[-3000:]
    for r in rows[:-1]:
        ChatCompletion.model_validate(run.body(r["custom_id"]))
    for base in ("q-0", "q-1"):
        assert chat_content(run.body(base + "-s")) == chat_content(run.body(base))
    n2, n2s = chat_content(run.body("n2")), chat_content(run.body("n2-s"))
    if spec.streamed_n_finishes:
        ChatCompletion.model_validate(run.body("n2-s"))
        assert n2s == n2
    else:  # LiteLLM streams finish_reason for choice 0 only: the rebuilt choice 1 has none
        assert [c[:4] for c in n2s] == [c[:4] for c in n2]
        assert [c[4] for c in n2s] == ["stop", None]
    # n=2: two choices where the server honours n; mock-ai-api ignores it (one choice)
    assert len(run.body("n2")["choices"]) == (2 if spec.honours_n else 1)


@pytest.mark.parametrize("server_name", ALL)
def test_samples_through_n_or_by_seed(server: ServerProcess, tmp_path: Path) -> None:
    """--samples 3: one request with n=3 per line where the server honours n, each choice
    a sample's answer (the request's usage on sample 0); a server that ignores n answers one
    choice, and the rest go as requests of their own (said once). Every unit succeeds."""
    spec = server.spec
    rows = [row(f"s-{i}", CHAT, chat_body(spec, f"Say something about {i}")) for i in range(3)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    proc = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url,
                    "--no-preflight", "--samples", "3", "-c", "1", "--log-format", "json"],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=SERVER_KEY), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["custom_id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(results) == sorted(f"s-{i}#{k}" for i in range(3) for k in range(3))
    for cid, r in results.items():
        assert r["sample"] == int(cid.split("#")[1])
        body = r["response"]["body"]
        assert len(body["choices"]) == 1 and body["choices"][0]["index"] == 0
        ChatCompletion.model_validate(body)
    events = [orjson.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    fell_back = [e for e in events if e.get("event") == "samples_via_seed"]
    assert len(fell_back) == (0 if spec.honours_n else 1), proc.stderr[-3000:]
    if spec.honours_n:
        for i in range(3):
            out_tokens = [results[f"s-{i}#{k}"]["response"]["body"]["usage"]["completion_tokens"]
                          for k in range(3)]
            assert out_tokens[0] > 0 and out_tokens[1:] == [0, 0]


@pytest.mark.parametrize("server_name", ALL)
def test_completions_streamed_equals_unstreamed(server: ServerProcess, tmp_path: Path) -> None:
    spec = server.spec
    rows = pairs(COMPLETIONS, completion_body, spec)
    run = run_batch(server, rows, tmp_path)
    if COMPLETIONS not in spec.routes:  # llmock: no /v1/completions
        assert run.code == 1, run.stderr[-3000:]
        assert_missing_route(run, [r["custom_id"] for r in rows], spec, COMPLETIONS)
        return
    assert run.code == 0, run.stderr[-3000:]
    for r in rows:
        Completion.model_validate(run.body(r["custom_id"]))
    for base in ("q-0", "q-1"):
        texts = [[c["text"] for c in run.body(cid)["choices"]] for cid in (base, base + "-s")]
        assert texts[0] == texts[1]


@pytest.mark.parametrize("server_name", ALL)
def test_responses_streamed_equals_unstreamed(server: ServerProcess, tmp_path: Path) -> None:
    """A /v1/responses stream is complete at `response.completed`, with or without a
    `data: [DONE]` after it (llmock and mock-ai-api send none, as vLLM does not)."""
    spec = server.spec
    rows = pairs(RESPONSES, response_body, spec)
    run = run_batch(server, rows, tmp_path)
    if RESPONSES not in spec.routes:  # xpyd-sim: no /v1/responses
        assert run.code == 1, run.stderr[-3000:]
        assert_missing_route(run, [r["custom_id"] for r in rows], spec, RESPONSES)
        return
    streamed = [r["custom_id"] for r in rows if r["body"].get("stream")]
    plain = [r["custom_id"] for r in rows if not r["body"].get("stream")]
    if spec.responses_stream_error:
        # LiteLLM's mock cannot stream this route: HTTP 500, an SSE error body. A 500 may
        # have been processed: ambiguous, never re-sent. The unstreamed lines still succeed.
        assert run.code == 1, run.stderr[-3000:]
        for cid in streamed:
            failure = run.failures[cid]
            assert failure["error"]["class"] == "ambiguous"
            assert failure["response"]["status_code"] == 500
    else:
        assert run.code == 0, "\n".join(run.explain(c) for c in streamed if c in run.failures)
        for base in plain:
            assert response_text(run.body(base + "-s")) == response_text(run.body(base))
            assert run.body(base + "-s")["status"] == "completed"
    for cid in plain + ([] if spec.responses_stream_error else streamed):
        # the SDK type where the server's body allows; else exactly where it does not
        assert sdk_errors(Response, run.body(cid)) == spec.responses_sdk_errors, cid


# ---------------------------------------------------------------------------------------------
# Tools


@pytest.mark.parametrize("server_name", ALL)
def test_tool_calls_streamed_equal_unstreamed(server: ServerProcess, tmp_path: Path) -> None:
    """A streamed tool-call answer is rebuilt as the unstreamed one: same tool calls, and
    the content the server gives unstreamed (null when it sends none, not "")."""
    spec = server.spec
    extra: dict[str, Any] = {"tools": TOOLS, "model": spec.tool_model or spec.model}
    if spec.tool_choice is not None:
        extra["tool_choice"] = spec.tool_choice
    rows = [row("tool", CHAT, chat_body(spec, "What is the weather in Paris?", **extra)),
            row("tool-s", CHAT, chat_body(spec, "What is the weather in Paris?", stream=True,
                                          **extra))]
    if spec.name == "xpyd-sim":  # tool_choice auto: a coin flip between a tool call and text
        rows.append(row("tool-auto", CHAT, chat_body(spec, "weather?", tools=TOOLS)))
    run = run_batch(server, rows, tmp_path)
    assert run.code == 0, run.stderr[-3000:]
    for r in rows:
        ChatCompletion.model_validate(run.body(r["custom_id"]))
    plain = chat_content(run.body("tool"))
    assert plain[0][3], f"{spec.name}: no tool call in the unstreamed answer"
    streamed = chat_content(run.body("tool-s"))
    if spec.tools_streamed:
        assert streamed == plain
    else:  # LiteLLM: mock_tool_calls reach unstreamed answers only; its stream has none
        assert streamed[0][3] == []


# ---------------------------------------------------------------------------------------------
# Output lines other tools can read


@pytest.mark.parametrize("server_name", ALL)
def test_request_id_is_a_string(server: ServerProcess, tmp_path: Path) -> None:
    """vLLM's BatchRequestOutput and OpenAI's batch output type request_id as a string: the
    server's id header where it sends one (LiteLLM: x-litellm-call-id, a UUID), else one
    tmbatch makes up."""
    spec = server.spec
    rows = [row("a", CHAT, chat_body(spec, "hello")),
            row("a-s", CHAT, chat_body(spec, "hello", stream=True))]
    run = run_batch(server, rows, tmp_path)
    assert run.code == 0, run.stderr[-3000:]
    for r in rows:
        request_id = run.results[r["custom_id"]]["response"]["request_id"]
        assert isinstance(request_id, str) and request_id, (r["custom_id"], request_id)
        if spec.request_id_header == "x-litellm-call-id":
            uuid.UUID(request_id)


@pytest.mark.parametrize("server_name", ["litellm"])
def test_sse_error_body_keeps_the_server_message(server: ServerProcess, tmp_path: Path) -> None:
    """LiteLLM answers a mock /v1/responses stream with HTTP 500 and the body
    `data: {"error": {"message": "Error processing stream start", ...}}` + `data: [DONE]`.
    The failure keeps the server's message, and the error object as the body."""
    run = run_batch(server, [row("r-s", RESPONSES, response_body(server.spec, "hi",
                                                                 stream=True))], tmp_path)
    failure = run.failures["r-s"]
    assert failure["error"]["class"] == "ambiguous"
    assert "Error processing stream start" in failure["error"]["message"]
    body = failure["response"]["body"]
    assert isinstance(body, dict) and body["error"]["message"] == "Error processing stream start"


# ---------------------------------------------------------------------------------------------
# A healthy run is not stopped


MISSING_ROUTE = {"llmock": COMPLETIONS, "xpyd-sim": RESPONSES}


@pytest.mark.parametrize("server_name", list(MISSING_ROUTE))
def test_a_missing_route_fails_its_lines_and_the_rest_runs(server: ServerProcess,
                                                           tmp_path: Path) -> None:
    """Eight lines on a route the server lacks come first (one at a time, so their 404s are
    the first outcomes), then chat lines: the 404s fail `permanent`, the chat lines succeed,
    and the run is not stopped as if the model were unknown."""
    spec = server.spec
    route = MISSING_ROUTE[spec.name]
    make = completion_body if route == COMPLETIONS else response_body
    missing = [row(f"m-{i}", route, make(spec, f"question {i}")) for i in range(8)]
    chats = [row(f"c-{i}", CHAT, chat_body(spec, f"question {i}")) for i in range(4)]
    run = run_batch(server, missing + chats, tmp_path, "-c", "1")
    assert run.code == 1, run.stderr[-3000:]
    assert_missing_route(run, [r["custom_id"] for r in missing], spec, route)
    for r in chats:
        ChatCompletion.model_validate(run.body(r["custom_id"]))


@pytest.mark.parametrize("server_name", ["llmock", "xpyd-sim", "litellm"])
def test_preflight_sends_the_key_on_get_routes(server: ServerProcess, tmp_path: Path) -> None:
    """xpyd-sim (--require-api-key) and LiteLLM (master_key) answer GET /v1/models with 401
    when no key comes with it; preflight sends the key on every route, so a correct key
    passes. llmock wants no key anywhere: the control."""
    spec = server.spec
    rows = [row(f"c-{i}", CHAT, chat_body(spec, f"question {i}")) for i in range(2)]
    run = run_batch(server, rows, tmp_path, preflight=True)
    assert run.code == 0, run.stderr[-3000:]
    assert "refused the key" not in run.stderr


@pytest.mark.parametrize("server_name", ["llmock"])
def test_an_unserved_model_fails_only_its_lines(server: ServerProcess, tmp_path: Path) -> None:
    """llmock lists gpt-4o (not `not-served-model`) at /v1/models. The line naming the
    unserved model fails `permanent` / model_not_served, naming it; the others run."""
    spec = server.spec
    rows = [row(f"c-{i}", CHAT, chat_body(spec, f"question {i}")) for i in range(3)]
    rows.append(row("unserved", CHAT, chat_body(spec, "hi", model="not-served-model")))
    run = run_batch(server, rows, tmp_path, preflight=True)
    assert run.code == 1, run.stderr[-3000:]
    error = run.failures["unserved"]["error"]
    assert (error["class"], error["code"]) == ("permanent", "model_not_served")
    assert "not-served-model" in error["message"]
    for r in rows[:3]:
        ChatCompletion.model_validate(run.body(r["custom_id"]))


# ---------------------------------------------------------------------------------------------
# Rate limits and reporting


@pytest.mark.parametrize("server_name", ["litellm"])
def test_litellm_provider_retry_after_pauses_everyone(server: ServerProcess,
                                                      tmp_path: Path) -> None:
    """LiteLLM relays an upstream 429 with `llm_provider-retry-after: 1` and
    `llm_provider-retry-after-ms: 1000` and no Retry-After of its own: that is the pause.
    Nothing ever succeeds there, so after --patience the refused line ends `rejected`."""
    rows = [row("limited", CHAT, chat_body(server.spec, "hi",
                                           model=LITELLM_RATE_LIMITED_MODEL))]
    run = run_batch(server, rows, tmp_path, "--patience", "3", "--log-format", "json")
    assert run.failures["limited"]["error"]["class"] == "rejected"
    assert run.failures["limited"]["response"]["status_code"] == 429
    pauses = [e["retry_after"] for e in run.events() if e.get("event") == "rate_limit_pause"]
    assert pauses and pauses[0] == pytest.approx(1.0), run.stderr[-3000:]


MOCK_AI_API_STREAM_SECONDS = 0.12  # 4 events (role, text, finish, [DONE]), 40 ms sleep between


@pytest.mark.parametrize("server_name", ["mock-ai-api"])
def test_settled_rate_cannot_exceed_what_the_server_allows(server: ServerProcess,
                                                           tmp_path: Path) -> None:
    """mock-ai-api sleeps 40 ms between stream events, so each streamed chat answer takes at
    least 0.12 s; with 8 in flight at most, no honest rate is over 8 / 0.12 s. (A slower
    machine only lowers the true rate: the bound cannot flake.)"""
    rows = [row(f"s-{i}", CHAT, chat_body(server.spec, f"question {i}", stream=True))
            for i in range(8)]
    run = run_batch(server, rows, tmp_path, "-c", "8")
    assert run.code == 0, run.stderr[-3000:]
    settled = run.summary["this_run"]["admission"]["settled_requests_per_second"]
    assert settled is not None and settled <= 8 / MOCK_AI_API_STREAM_SECONDS, settled


def test_specs_name_what_the_extra_installs() -> None:
    """The versions written in SPECS are the ones pinned in the project's files."""
    root = Path(__file__).resolve().parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    litellm = (root / "tests" / "requirements-litellm.txt").read_text()
    for spec in SPECS.values():
        if spec.name == "litellm":
            assert f"litellm=={spec.version}\n" in litellm
        else:
            assert re.search(rf'"{re.escape(spec.package)}=={re.escape(spec.version)}"',
                             pyproject), spec.name
