"""`tmbatch resend`: what it lists, what a dry run says, and the lines it cannot send."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import chat_answer, chat_line, keyed_env, run_cli, write_jsonl
from tmbatch.policy import Outcome


class Server:
    """Questions 0-24 fail with a 500 the first time (ambiguous); question 25 is refused with
    429s for as long as `refusing` (rejected, once nothing succeeded for --patience)."""

    def __init__(self, serve: Any) -> None:
        self.refusing = True
        self.seen: Counter[str] = Counter()
        self.received = self.processed = 0
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.url = serve(app).url()

    async def chat(self, request: web.Request) -> web.Response:
        self.received += 1
        question = (await request.json())["messages"][0]["content"]
        self.seen[question] += 1
        number = int(question.split()[-1])
        if number < 25 and self.seen[question] == 1:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if number == 25 and self.refusing:
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"Retry-After": "0"})
        self.processed += 1
        return web.json_response(chat_answer(question))


@pytest.fixture
def server(serve: Any) -> Server:
    return Server(serve)


def failed_run(server: Server, tmp_path: Path) -> Path:
    """25 ambiguous lines, one rejected, two bad lines; then the server stops refusing."""
    rows: list[Any] = [chat_line(i) for i in range(30)]
    rows[26] = {"custom_id": None, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tm-small"}}
    rows[27] = chat_line(0)  # custom_id req-0 again
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url, "-q",
                 "--no-preflight", "--max-retries", "0", "--patience", "1"], env=keyed_env())
    assert p.returncode == 1, p.stderr
    server.refusing = False
    return out


def test_dry_run_lists_every_line_says_nothing_was_sent_and_words_each_class(
        server: Server, tmp_path: Path) -> None:
    out = failed_run(server, tmp_path)
    before = server.processed
    base = ["resend", str(out), "--base-url", server.url, "--dry-run"]
    p = run_cli([*base, "--class", "ambiguous"], env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("  line ") == 25 and "more" not in p.stderr  # all of them
    assert f"25 ambiguous: {Outcome.AMBIGUOUS.policy.meaning}" in p.stderr
    assert p.stderr.rstrip().endswith("dry run: nothing was sent")
    p = run_cli([*base, "--class", "rejected", "--class", "permanent", "--json"], env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert f"1 rejected: {Outcome.REJECTED.policy.meaning}" in p.stderr
    assert "billed" not in p.stderr  # neither a refused line nor a never-sent one is billed
    assert "(no custom_id)" in p.stderr and "None" not in p.stderr
    listed = orjson.loads(p.stdout)
    assert listed["dry_run"] is True and listed["sent"] is False
    rows = {r["line"]: r for r in listed["selected"]}
    assert sorted(rows) == [26, 27, 28]
    assert rows[26]["will_send"] is True and rows[26]["class"] == "rejected"
    assert rows[27]["custom_id"] is None and rows[27]["will_send"] is False
    assert rows[28]["code"] == "duplicate_custom_id" and rows[28]["attempts"] == 0
    assert (listed["to_send"], listed["cannot_send"]) == (1, 2)
    assert server.processed == before  # a dry run sends nothing


def test_lines_that_were_never_sent_are_not_resent_and_the_exit_code_says_so(
        server: Server, tmp_path: Path) -> None:
    out = failed_run(server, tmp_path)
    base = ["resend", str(out), "--base-url", server.url, "--yes", "-q"]
    received = server.received
    p = run_cli([*base, "--class", "permanent"], env=keyed_env())
    assert p.returncode == 2, p.stderr  # not "0 of 2 now succeeded" and exit 0
    assert "cannot be resent" in p.stderr and "nothing was sent" in p.stderr
    assert server.received == received
    p = run_cli([*base, "--class", "rejected", "--class", "permanent", "--json"], env=keyed_env())
    assert p.returncode == 1, p.stderr  # the rejected line succeeded, the bad ones cannot
    assert "resend: 1 of 1 sent line(s) now succeeded" in p.stderr
    assert "2 line(s) could not be resent as they are (correct them and send them with " \
        "--input)" in p.stderr
    result = orjson.loads(p.stdout)
    assert result["sent"] is True and result["now_succeeded"] == 1
    assert result["still_failed"] == {}
    p = run_cli([*base, "--class", "rejected"], env=keyed_env())
    assert p.returncode == 0 and "nothing to resend" in p.stderr
