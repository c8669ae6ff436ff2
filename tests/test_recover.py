"""After a failure, the next step works: for each way a line can fail, the command the end of
the run suggests is run as printed, against a real server on 127.0.0.1, and must do
something useful (send the lines, and get them answered), never "nothing was sent".

The server is one aiohttp app whose behaviour the test changes between commands, as a real
one changes: the key it accepts, the models it serves, whether it refuses with 429s. It
counts every request it receives by its question, so a test can say what was sent twice.
"""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import (
    API_KEY,
    chat_answer,
    chat_line,
    clean_env,
    keyed_env,
    read_jsonl,
    run_cli,
    write_jsonl,
)
from tmbatch.client.http import idempotency_key
from tmbatch.policy import FIXES, Cause, Outcome


class Server:
    def __init__(self, serve: Any) -> None:
        self.key = API_KEY
        self.models = {"tm-small", "tm-large"}
        self.refusing = False
        self.asked: Counter[str] = Counter()  # question -> POSTs received
        self.keys: dict[str, str] = {}  # question -> the last Idempotency-Key it came with
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.url = serve(app).url()

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": "test"})

    async def list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model"} for m in sorted(self.models)]})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        question = body["messages"][0]["content"]
        self.asked[question] += 1
        self.keys[question] = request.headers.get("Idempotency-Key", "")
        if not self._authorized(request):
            return web.json_response({"error": {"message": "Incorrect API key"}}, status=401)
        if body.get("model") not in self.models:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        if question.startswith("too long"):
            return web.json_response({"error": {"message": "prompt too long"}}, status=400)
        if self.refusing:
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"Retry-After": "0"})
        return web.json_response(chat_answer(question))


@pytest.fixture
def server(serve: Any) -> Server:
    return Server(serve)


def run(server: Server, inp: Path, out: Path, *extra: str, key: str = API_KEY) -> Any:
    """A run whose end is read as events: the advice is the `next_steps` event."""
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url, "--log-format",
                 "json", "--max-retries", "0", "--patience", "1", *extra], env=keyed_env(key))
    return p, _steps(p.stderr)


def _steps(stderr: str) -> dict[str, Any]:
    events = [orjson.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    steps = [e for e in events if e.get("event") == "next_steps"]
    assert steps, f"no advice at the end of the run: {stderr[-3000:]}"
    return steps[0]


def as_typed(command: str, server: Server, *extra: str) -> list[str]:
    """The suggested command as argv for `python -m tmbatch`, sent to the test's server (the
    user's environment says where to send; here the flag does)."""
    argv = shlex.split(command)
    assert argv[0] == "tmbatch", command
    return [*argv[1:], "--base-url", server.url, *extra]


def states(out: Path) -> dict[str, int]:
    p = run_cli(["status", str(out), "--json"])
    got = orjson.loads(p.stdout)
    return {"succeeded": got["succeeded"], "failed": got["failed"]}


def fixes(steps: dict[str, Any]) -> dict[str, str]:
    return {c["code"]: c["fix"] for c in steps["codes"]}


def test_bad_lines_are_sent_corrected_with_the_fixed_input_and_nothing_twice(
        server: Server, tmp_path: Path) -> None:
    rows: list[Any] = [chat_line(i) for i in range(6)]
    good = [orjson.dumps(r) for r in rows]
    rows[1] = good[1][:-5]  # cut short: not JSON (and so no custom_id to match by)
    rows[2] = chat_line(2)
    del rows[2]["body"]["model"]  # missing_model
    rows[3] = chat_line(3, messages=[{"role": "user", "content": "too long 3"}])  # a 400
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p, steps = run(server, inp, out)
    assert p.returncode == 1, p.stderr
    assert sum(server.asked.values()) == 4  # the two bad lines never went
    fix = fixes(steps)
    assert set(fix) == {"invalid_json", "missing_model", "http_400"}
    assert "retry.jsonl" in fix["http_400"] and "--as-input" in fix["http_400"]
    assert not [c for c in steps["classes"] if c["command"]]  # resend --class would refuse
    example = {c["code"]: c for c in steps["codes"]}["missing_model"]
    assert example["example_line"] == 3 and "body.model" in example["example"]

    # the user corrects the input in place: run refuses it and names the command that works
    fixed = [chat_line(i) for i in range(6)]
    fixed[3] = chat_line(3, messages=[{"role": "user", "content": "question 3"}])
    write_jsonl(inp, fixed)
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url], env=keyed_env())
    assert p.returncode == 2 and "belongs to a different input" in p.stderr
    suggested = p.stderr.split("send them: ")[1].split(" (matched")[0]
    assert suggested == f"tmbatch resend {out} --input {inp}"
    before = server.asked.copy()
    p = run_cli(as_typed(suggested, server, "--yes"), env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert "resend: 3 of 3 sent line(s) now succeeded" in p.stderr
    sent = server.asked - before
    assert sent == Counter({"question 1": 1, "question 2": 1, "question 3": 1}), sent
    assert states(out) == {"succeeded": 6, "failed": 0}
    # never-sent lines keep the key their custom_id gives; the 400's correction has its own
    job = read_jsonl(out / "journal.jsonl")[0]["job"]
    assert server.keys["question 1"] == idempotency_key(job, "req-1")
    assert server.keys["question 3"] not in (idempotency_key(job, "req-3"),
                                             server.keys["too long 3"])
    res = {r["custom_id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(res) == [f"req-{i}" for i in range(6)] and res["req-1"]["line"] == 2
    resume = [r for r in read_jsonl(out / "journal.jsonl") if isinstance(r, dict)
              and r.get("e") == "resume"]
    assert resume[-1]["resend"] == 3 and resume[-1]["input"] == str(inp)

    # the same file again: every line has succeeded, so nothing is sent
    p = run_cli(as_typed(suggested, server, "--yes"), env=keyed_env())
    assert p.returncode == 0 and "nothing to resend" in p.stderr, p.stderr
    assert server.asked - before == sent


def test_export_as_input_writes_the_failed_requests_and_resend_takes_them_back(
        server: Server, tmp_path: Path) -> None:
    rows: list[Any] = [chat_line(i) for i in range(4)]
    rows[1] = chat_line(1, messages=[{"role": "user", "content": "too long 1"}])
    rows[2] = chat_line(2, model="tm-huge")  # not served: fails unsent
    rows.append(b"{not json")
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p, steps = run(server, inp, out)
    assert p.returncode == 1, p.stderr
    export = fixes(steps)["http_400"].split(": ", 1)[1].split(" > retry.jsonl")[0]
    assert export == f"tmbatch export {out} --failed --as-input"
    assert "--as-input > retry.jsonl" in fixes(steps)["model_not_served"]
    p = run_cli(shlex.split(export)[1:])
    assert p.returncode == 0, p.stderr
    exported = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert [e["custom_id"] for e in exported] == ["req-1", "req-2"]
    assert exported[0] == rows[1]  # the request as it was sent, custom_id kept
    assert "1 failed line(s) not written" in p.stderr and "line 5 (invalid_json)" in p.stderr
    retry = tmp_path / "retry.jsonl"
    retry.write_text(p.stdout)
    p = run_cli(["validate", str(retry)])
    assert p.returncode == 0, p.stderr  # a valid input file as it is
    # corrected: a shorter prompt, a served model; plus a line that already succeeded
    exported[0]["body"]["messages"][0]["content"] = "question 1"
    exported[1]["body"]["model"] = "tm-small"
    write_jsonl(retry, [*exported, chat_line(0)])
    before = server.asked.copy()
    p = run_cli(["resend", str(out), "--input", str(retry), "--base-url", server.url,
                 "--yes"], env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert "1 line(s) of" in p.stderr and "never sent again" in p.stderr  # req-0 not sent
    assert server.asked - before == Counter({"question 1": 1, "question 2": 1})
    assert states(out) == {"succeeded": 4, "failed": 1}  # the line that is not JSON


def test_bare_bodies_without_endpoint_say_pass_endpoint_and_the_command_works(
        server: Server, tmp_path: Path) -> None:
    bodies = [chat_line(i)["body"] for i in range(5)]
    inp = write_jsonl(tmp_path / "bodies.jsonl", bodies)
    out = tmp_path / "out"
    p, steps = run(server, inp, out)
    assert p.returncode == 1 and not server.asked
    text = run_cli(["run", str(inp), "-o", str(tmp_path / "plain"), "--base-url",
                    server.url], env=keyed_env()).stderr
    assert "--endpoint" in text.split("by code")[1]  # on the terminal, not only in the file
    fix = fixes(steps)["bare_body_without_endpoint"]
    assert "pass --endpoint" in fix
    command = fix.split("start over: ")[1]
    p = run_cli(as_typed(command, server), env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert states(out) == {"succeeded": 5, "failed": 0}
    assert sum(server.asked.values()) == 5


def test_model_not_served_is_rechecked_by_resend_and_sent_once_served(
        server: Server, tmp_path: Path) -> None:
    server.models = {"tm-small"}
    inp = write_jsonl(tmp_path / "in.jsonl",
                      [chat_line(i, model="tm-large" if i % 2 else "tm-small")
                       for i in range(6)])
    out = tmp_path / "out"
    p, steps = run(server, inp, out)
    assert p.returncode == 1, p.stderr
    assert {c["code"]: c["cause"] for c in steps["codes"]} == {"model_not_served": "served"}
    assert sum(server.asked.values()) == 3  # tm-large never went
    (row,) = steps["classes"]
    assert row["command"] == f"tmbatch resend {out} --class permanent"
    # still not served: resend checks the list, sends nothing billed, says so
    p = run_cli(as_typed(row["command"], server, "--yes"), env=keyed_env())
    assert p.returncode == 1, p.stderr
    assert "input line itself is bad" not in p.stderr
    assert "failed again (permanent 3)" in p.stderr and sum(server.asked.values()) == 3
    server.models.add("tm-large")
    p = run_cli(as_typed(row["command"], server, "--yes"), env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert "the server serves 2 model(s) now" in p.stderr
    assert "resend: 3 of 3 sent line(s) now succeeded" in p.stderr
    assert states(out) == {"succeeded": 6, "failed": 0}
    assert set(server.asked.values()) == {1}  # each question exactly once


def test_a_refused_key_is_fixed_by_the_resume_command_printed(
        server: Server, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out"
    p, steps = run(server, inp, out, "--no-preflight", "-c", "1", key="tm-wrong-key-1234567")
    assert p.returncode == 3, p.stderr
    (row,) = steps["classes"]
    assert row["class"] == "fatal" and row["command"] == f"tmbatch run {inp} -o {out}"
    assert "TENSORMESH_INFERENCE_API_KEY" in fixes(steps)["unauthorized"]
    p = run_cli(as_typed(row["command"], server), env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert states(out) == {"succeeded": 4, "failed": 0}


def test_rejected_lines_are_sent_by_the_command_printed(server: Server, tmp_path: Path) -> None:
    server.refusing = True
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    out = tmp_path / "out"
    p, steps = run(server, inp, out)
    assert p.returncode == 1, p.stderr
    (row,) = steps["classes"]
    assert row["command"] == f"tmbatch resend {out} --class rejected"
    server.refusing = False
    p = run_cli(as_typed(row["command"], server, "--yes"), env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert states(out) == {"succeeded": 3, "failed": 0}


def test_resend_checks_the_key_before_listing_anything(server: Server, tmp_path: Path) -> None:
    server.refusing = True
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    out = tmp_path / "out"
    run(server, inp, out)
    p = run_cli(["resend", str(out), "--class", "rejected", "--base-url", server.url,
                 "--yes"], env=clean_env())
    assert p.returncode == 2, p.stderr
    assert "TENSORMESH_INFERENCE_API_KEY" in p.stderr and "line(s) to send" not in p.stderr
    p = run_cli(["resend", str(out), "--class", "rejected", "--dry-run"], env=clean_env())
    assert p.returncode == 0 and "3 line(s) to send again" in p.stderr  # a look needs no key


def test_every_reader_code_has_a_fix_that_names_a_command() -> None:
    """The advice is data: each code the reader gives a bad line has a fix, and each fix
    names the command to run (a test would catch a fix lost to a renamed code)."""
    reader = Path(__file__).resolve().parent.parent / "tmbatch" / "inputs" / "reader.py"
    text = reader.read_text()
    for code, fix in FIXES.items():
        assert "tmbatch " in fix.text, code
        if fix.cause is Cause.LINE:
            assert f'"{code}"' in text, f"{code} is no reader code"
    assert "the input line itself is bad" not in Outcome.PERMANENT.policy.meaning
