"""--samples N through the body's `n`: one request per line where the route and the server
take it, a request per seed where they do not, and every unit its own outcome either way.

The server here is a real aiohttp app on 127.0.0.1 that records every body it is sent and
answers `n` as told: honours it (its choices in reverse order, as nothing promises their
order), ignores it (one choice, as mock-ai-api does), or refuses it (400). The third-party
servers are checked in tests/test_conformance.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import (
    API_KEY,
    chat_line,
    clean_env,
    read_jsonl,
    run_cli,
    write_jsonl,
)
from tmbatch.inputs.reader import Request
from tmbatch.inputs.samples import takes_n

CHAT = "/v1/chat/completions"


def app(seen: list[dict[str, Any]], n_is: str, truncate: int | None = None) -> web.Application:
    """`n_is`: "honoured", "ignored" or "refused". `truncate`: the choice index that ends
    with finish_reason length."""
    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        n = body.get("n") or 1
        if body.get("temperature") == 9:  # a bad body, refused whatever n is
            return web.json_response({"error": {"message": "temperature must be <= 2",
                                                "type": "invalid_request_error"}}, status=400)
        if n > 1 and n_is == "refused":
            return web.json_response({"error": {"message": "n must be 1", "type":
                                                "invalid_request_error"}}, status=400)
        count = n if n_is == "honoured" else 1
        prompt = body["messages"][-1]["content"]
        choices = [{"index": i, "finish_reason": "length" if i == truncate else "stop",
                    "message": {"role": "assistant",
                                "content": f"{prompt} / seed {body.get('seed')} / choice {i}"}}
                   for i in range(count)]
        return web.json_response({
            "id": f"chatcmpl-{len(seen)}", "object": "chat.completion", "model": body["model"],
            "choices": choices[::-1],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5 * count,
                      "total_tokens": 10 + 5 * count}})

    a = web.Application()
    a.router.add_post(CHAT, answer)
    return a


def run(url: str, inp: Path, out: Path, *extra: str, code: int = 0) -> Any:
    done = run_cli(["run", str(inp), "-o", str(out), "--base-url", url, "--no-preflight",
                    "--samples", "3", "-c", "1", "--log-format", "json", *extra],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY), timeout=60)
    assert done.returncode == code, done.stderr[-3000:]
    return done


def units(out: Path, lines: int) -> dict[str, dict[str, Any]]:
    """custom_id -> result; every unit exactly once, no failure."""
    results = read_jsonl(out / "results.jsonl")
    assert read_jsonl(out / "failures.jsonl") == []
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(f"req-{i}#{k}" for i in range(lines) for k in range(3))
    return {r["custom_id"]: r for r in results}


def content(result: dict[str, Any]) -> str:
    [choice] = result["response"]["body"]["choices"]
    assert choice["index"] == 0
    return str(choice["message"]["content"])


def fell_back(stderr: str) -> list[dict[str, Any]]:
    return [e for e in (orjson.loads(x) for x in stderr.splitlines() if x.startswith("{"))
            if e.get("event") == "samples_via_seed"]


def test_a_lines_samples_are_one_request_with_n(serve: Any, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    url = serve(app(seen, "honoured")).url()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)] +
                      [chat_line(4, seed=40)])
    done = run(url, inp, tmp_path / "out")
    assert [(b["n"], b["seed"]) for b in seen] == [(3, 0)] * 4 + [(3, 40)]
    res = units(tmp_path / "out", 5)
    for i in range(5):
        seed = 40 if i == 4 else 0
        for k in range(3):  # choice k is sample k, whatever order the server sent them in
            r = res[f"req-{i}#{k}"]
            assert r["sample"] == k
            assert content(r) == f"question {i} / seed {seed} / choice {k}"
        bodies = [res[f"req-{i}#{k}"]["response"]["body"] for k in range(3)]
        assert len({b["id"] for b in bodies}) == 1  # one answer
        # the request's usage once, on sample 0: the lines add up to what was billed
        assert [b["usage"]["completion_tokens"] for b in bodies] == [15, 0, 0]
        assert [b["usage"]["prompt_tokens"] for b in bodies] == [10, 0, 0]
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    assert summary["this_run"]["attempts_sent"] == 5 and summary["counts"]["succeeded"] == 15
    assert not fell_back(done.stderr)


@pytest.mark.parametrize(("n_is", "first"), [("ignored", 1 + 2), ("refused", 1 + 3)])
def test_a_server_that_does_not_take_n_gets_a_request_per_seed(
        serve: Any, tmp_path: Path, n_is: str, first: int) -> None:
    """The first line shows the server does not take `n` (one choice back, or a 400, which
    did no work): the samples it did not answer go as requests of their own, with their
    seeds, and so does every later line. Nothing fails, and it is said once."""
    seen: list[dict[str, Any]] = []
    url = serve(app(seen, n_is)).url()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    done = run(url, inp, tmp_path / "out")
    assert seen[0]["n"] == 3
    assert all("n" not in b for b in seen[1:])
    assert len(seen) == first + 3 * 3
    assert [b["seed"] for b in seen[first:]] == [0, 1, 2] * 3
    res = units(tmp_path / "out", 4)
    if n_is == "ignored":  # the one choice answered sample 0; 1 and 2 were sent on their own
        assert content(res["req-0#0"]) == "question 0 / seed 0 / choice 0"
        assert [b["seed"] for b in seen[1:3]] == [1, 2]
    assert content(res["req-3#2"]) == "question 3 / seed 2 / choice 0"
    [event] = fell_back(done.stderr)
    assert (event["model"], event["route"]) == ("tm-small", CHAT)
    assert "sent as a request of its own" in event["msg"]


def test_a_bad_line_refused_with_n_and_alone_fails_without_ending_n(serve: Any,
                                                                    tmp_path: Path) -> None:
    """A 400 to the line's request with n, then to its first sample alone: the body is bad,
    not `n`. Its three samples fail permanent, each after a request of its own (a 400 does no
    work), and the next lines still go with `n`."""
    seen: list[dict[str, Any]] = []
    url = serve(app(seen, "honoured")).url()
    inp = write_jsonl(tmp_path / "in.jsonl",
                      [chat_line(0, temperature=9), chat_line(1), chat_line(2)])
    done = run(url, inp, tmp_path / "out", code=1)  # 1: failed lines
    assert [(b.get("n"), b["seed"]) for b in seen] == [(3, 0), (None, 0), (None, 1),
                                                      (None, 2), (3, 0), (3, 0)]
    failures = {f["custom_id"]: f for f in read_jsonl(tmp_path / "out" / "failures.jsonl")}
    assert sorted(failures) == ["req-0#0", "req-0#1", "req-0#2"]
    assert {(f["error"]["class"], f["error"]["code"]) for f in failures.values()} == \
        {("permanent", "http_400")}
    assert len(read_jsonl(tmp_path / "out" / "results.jsonl")) == 6
    assert not fell_back(done.stderr)


@pytest.mark.parametrize(("url", "body", "joins"), [
    ("/v1/chat/completions", {}, True),
    ("/v1/completions", {"n": 1}, True),
    ("/v1/chat/completions", {"stream": True}, False),  # a stream's choices interleave
    ("/v1/chat/completions", {"n": 2}, False),  # the line's own n: kept
    ("/v1/responses", {}, False),  # no `n` in OpenAI's API
    ("/tokenize", {}, False),
])
def test_which_units_may_share_a_request(url: str, body: dict[str, Any], joins: bool) -> None:
    assert takes_n(Request(1, "q#0", url, {"model": "m", **body}, sample=0)) is joins


def test_what_cannot_take_n_is_sent_by_seed(serve: Any, tmp_path: Path) -> None:
    """A streamed line, a line asking for `n` itself, and --samples-via seed: a request per
    sample. The line's own `n` is kept (each sample is then a request of n choices)."""
    seen: list[dict[str, Any]] = []
    url = serve(app(seen, "honoured")).url()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0, n=2), chat_line(1),
                                              chat_line(2, stream=True)])
    run(url, inp, tmp_path / "own-n")
    assert [(b.get("n"), b["seed"], b.get("stream")) for b in seen] == \
        [(2, 0, None), (2, 1, None), (2, 2, None), (3, 0, None),
         (None, 0, True), (None, 1, True), (None, 2, True)]
    seen.clear()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0, n=2), chat_line(1)])
    seen.clear()
    run(url, inp, tmp_path / "seed", "--samples-via", "seed")
    assert [(b.get("n"), b["seed"]) for b in seen] == [(2, 0), (2, 1), (2, 2),
                                                      (None, 0), (None, 1), (None, 2)]
    res = units(tmp_path / "seed", 2)
    assert content(res["req-1#2"]) == "question 1 / seed 2 / choice 0"


def test_a_truncated_sample_alone_is_sent_again_from_the_cache(serve: Any,
                                                               tmp_path: Path) -> None:
    """Choice 1 ends at the length cap: it is not stored, the other two are; a rerun in
    another directory gets those from the cache and sends sample 1 alone, with its seed."""
    seen: list[dict[str, Any]] = []
    url = serve(app(seen, "honoured", truncate=1)).url()
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    cache = str(tmp_path / "cache.sqlite")
    run(url, inp, tmp_path / "a", "--cache", cache)
    assert len(seen) == 3
    seen.clear()
    run(url, inp, tmp_path / "b", "--cache", cache)
    assert [(b.get("n"), b["seed"]) for b in seen] == [(None, 1)] * 3
    res = units(tmp_path / "b", 3)
    assert [bool(res[f"req-0#{k}"].get("cached")) for k in range(3)] == [True, False, True]
