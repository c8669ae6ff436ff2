"""`--log-format json`: every stderr line is one JSON event a log pipeline can filter, for the
runs that matter (429 pauses, a fatal 401, SIGTERM and the resume after it), and keys never
appear. Text mode stays what people read."""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    API_KEY,
    ROOT,
    chat_line,
    keyed_env,
    read_jsonl,
    run_cli,
    write_jsonl,
)
from tmbatch.base import logs


def parse_events(stderr: str) -> list[dict[str, Any]]:
    """Every line must be a JSON object with the four fixed keys, or the test fails."""
    events = []
    for line in stderr.splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}\n--- full stderr ---\n{stderr}")
        assert isinstance(obj, dict), line
        assert {"ts", "level", "event", "msg"} <= obj.keys(), line
        assert obj["ts"].endswith("Z") and obj["level"] in {"debug", "info", "warning", "error"}
        events.append(obj)
    assert events, "no events at all"
    return events


def by_event(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def test_429_pauses_start_progress_summary_are_json_events(sim_factory: Any,
                                                          tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    rows = [chat_line(i) for i in range(12)]
    rows[3]["body"]["sim"] = {"status": 429, "times": 1, "retry_after": 0.2}
    rows[8]["body"]["sim"] = {"status": 429, "times": 1, "retry_after": 0.3}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--concurrency", "2",
                 "--log-format", "json", "--progress-interval", "0.01", "-v"],
                env=keyed_env())
    assert p.returncode == 0, p.stderr
    events = parse_events(p.stderr)
    assert API_KEY not in p.stderr and API_KEY not in p.stdout
    # without -v a second pause within 30 s is not logged at all: quiet logs at a limit
    quiet = parse_events(run_cli(["run", str(inp), "-o", str(tmp_path / "quiet"), "--base-url",
                                  sim.url, "--concurrency", "2", "--log-format", "json"],
                                 env=keyed_env()).stderr)
    assert [e["level"] for e in by_event(quiet, "rate_limit_pause")] == ["info"]

    (start,) = by_event(events, "start")
    assert start["job_id"] and start["base_url"] == sim.url and start["surface"] == "serverless"
    assert start["input"] == str(inp) and start["output"] == str(out)
    assert not any("key" in k.lower() for k in start)

    pauses = by_event(events, "rate_limit_pause")
    assert sorted(e["retry_after"] for e in pauses) == [0.2, 0.3]
    # the same pauses are on the report's timeline: ["p", t, seconds] in the journal
    journal = read_jsonl(out / "journal.jsonl")
    assert sorted(r[2] for r in journal if isinstance(r, list) and r[0] == "p") == [0.2, 0.3]

    assert by_event(events, "progress"), "a non-TTY run with a short interval reports progress"
    assert all("in_flight" in e and "done" in e for e in by_event(events, "progress"))
    (summary,) = by_event(events, "summary")
    assert summary["counts"]["succeeded"] == 12
    assert summary["this_run"]["rate_limited_429"] == 2
    assert events[-1]["event"] == "exit" and events[-1]["exit_code"] == 0


def test_fatal_401_is_a_json_event_with_the_exit_code_and_no_key(sim_factory: Any,
                                                                tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    rows = [chat_line(i) for i in range(50)]
    rows[0]["body"]["sim"] = {"status": 401}  # the first request is refused: stop everything
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--concurrency", "1",
                 "--log-format", "json"], env=keyed_env())
    assert p.returncode == 3, p.stderr
    events = parse_events(p.stderr)
    assert API_KEY not in p.stderr and API_KEY not in p.stdout
    (fatal,) = by_event(events, "fatal")
    assert fatal["level"] == "error" and "401" in fatal["msg"]
    (stopped,) = by_event(events, "stopped")
    assert stopped["reason"] == "fatal" and stopped["exit_code"] == 3
    assert by_event(events, "summary")[0]["stopped"] == "fatal"


def _wait_for_dispatches(journal: Path, n: int, proc: subprocess.Popen[bytes]) -> None:
    """Bounded poll for the journal, not an assertion on time."""
    for _ in range(600):
        if proc.poll() is not None:
            break
        if journal.exists():
            recs = read_jsonl(journal) if journal.read_bytes().endswith(b"\n") else []
            if sum(1 for r in recs if isinstance(r, list) and r[0] == "d") >= n:
                return
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=30)
    pytest.fail(f"never saw {n} dispatches; rc={proc.returncode} stderr={err!r}")


def test_sigterm_drain_and_the_resume_after_it_are_json(sim_factory: Any,
                                                        tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    rows = [chat_line(i) for i in range(6)]
    for r in rows[:3]:
        r["body"]["sim"] = {"sleep": 60}  # still in flight when SIGTERM comes
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out),
            "--base-url", sim.url, "--concurrency", "3", "--drain-timeout", "0.3",
            "--log-format", "json", "--progress-interval", "0.05"]
    proc = subprocess.Popen(args, env=keyed_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _wait_for_dispatches(out / "journal.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    err = stderr.decode()
    assert proc.returncode == 143, err
    events = parse_events(err)
    assert API_KEY not in err and API_KEY.encode() not in stdout
    (sig,) = by_event(events, "signal")
    assert sig["signal"] == "SIGTERM" and sig["level"] == "warning"
    (drain,) = by_event(events, "drain")
    assert drain["left_in_flight"] == 3
    (interrupted,) = by_event(events, "interrupted")
    assert interrupted["exit_code"] == 143 and "run the same command again" in interrupted["msg"]

    # A kill -9 mid-write leaves a torn journal line; the resume repairs it and says so.
    with open(out / "journal.jsonl", "ab") as f:
        f.write(b'["d",4,1,"req-')
    p = run_cli(args[3:], env=keyed_env())
    assert p.returncode == 1, p.stderr  # three lines are ambiguous: unknown outcome
    events = parse_events(p.stderr)
    (torn,) = by_event(events, "torn_line_repaired")
    assert torn["file"] == "journal.jsonl" and torn["bytes"] == len(b'["d",4,1,"req-')
    (unknown,) = by_event(events, "unknown_outcome")
    assert unknown["count"] == 3 and unknown["level"] == "warning"
    assert by_event(events, "start")[0]["resumed"] is True


def test_usage_errors_are_json_too_and_text_mode_is_unchanged(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "o"), "--log-format", "json"])
    assert p.returncode == 2
    (err,) = parse_events(p.stderr)
    assert err["event"] == "error" and err["exit_code"] == 2 and "API key" in err["msg"]

    p = run_cli(["run", str(inp), "-o", str(tmp_path / "o")])
    assert p.returncode == 2
    assert p.stderr.startswith("tmbatch: error: ") and "{" not in p.stderr

    p = run_cli(["run", str(inp), "-o", str(tmp_path / "t"), "--sim"])
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert lines[-1].startswith("done: 1 line: 1 succeeded")
    assert all(x.startswith(("tmbatch: INFO: ", "done: ")) for x in lines), p.stderr


@pytest.fixture
def json_logging() -> Any:
    stream = io.StringIO()
    logs.setup_logging(0, False, "json")
    logging.getLogger("tmbatch").handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    logs.REDACT.secrets.clear()
    logs.setup_logging(0, False, "text")


def test_secrets_are_scrubbed_from_fields_not_only_messages(json_logging: io.StringIO) -> None:
    key = 'tm-"quoted"\\key-0123456789'
    logs.REDACT.secrets.add(key)
    logs.event("pause", f"msg with {key}", url=f"https://x/?k={key}", nested={"k": [key]})
    logging.getLogger("tmbatch").warning("plain %s", key, extra={"event": "warn"})
    text = json_logging.getvalue()
    lines = [orjson.loads(x) for x in text.splitlines()]
    assert [x["event"] for x in lines] == ["pause", "warn"]
    assert "[redacted]" in lines[0]["url"] and lines[0]["nested"] == {"k": ["[redacted]"]}
    assert key not in text and orjson.dumps(key).decode()[1:-1] not in text
    assert "0123456789" not in text


def test_fields_that_shadow_log_record_attributes_are_kept_renamed(
        json_logging: io.StringIO) -> None:
    logs.event("x", "m", name="n", lineno=3, custom=1.5)
    (obj,) = [orjson.loads(x) for x in json_logging.getvalue().splitlines()]
    assert obj["name_"] == "n" and obj["lineno_"] == 3 and obj["custom"] == 1.5
    assert "name" not in obj  # record internals are not leaked as fields


def test_public_url_drops_credentials_and_queries() -> None:
    assert logs.public_url("https://user:pw@h.example:8443/p?key=s#f") == "https://h.example:8443/p"
    assert logs.public_url("http://[::1]:9/") == "http://[::1]:9/"
