"""Stops, restarts and crashes, as operators cause them: real processes, real signals.

Every stop ends (a second signal, a drain timeout with a full queue, a signal during a pause,
a throttle or preflight); a refused command touches neither the network nor a live job's
files; a dead host stops the run instead of burning the input; a line that was only ever
refused comes back pending after kill -9, and the resumed run honours the open Retry-After.
Nothing here asserts a duration: a stuck process fails the `communicate(timeout=...)`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import (
    ROOT,
    AppThread,
    chat_line,
    journal_records,
    keyed_env,
    read_jsonl,
    read_jsonl_tolerant,
    read_stderr_until,
    run_cli,
)
from tests.conftest import write_jsonl as write_lines

STUCK = 20  # seconds after which a stop that has not ended is a hang


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tmbatch", *args], env=keyed_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(what: Callable[[], bool], why: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


def sleepy_rows(n: int, sleep: float = 30) -> list[dict[str, Any]]:
    rows = [chat_line(i) for i in range(n)]
    for row in rows:
        row["body"]["sim"] = {"sleep": sleep}
    return rows


def counting_app(health_delay: float = 0.0) -> tuple[web.Application, dict[str, int]]:
    """Answers every route like a healthy server and counts what reached it, GETs included:
    the proof that a refused command touched no network."""
    seen = {"any": 0, "billable": 0}

    async def handler(request: web.Request) -> web.Response:
        seen["any"] += 1
        await request.read()
        if request.path == "/health" and health_delay:
            import asyncio

            await asyncio.sleep(health_delay)
        if request.method == "POST" and request.path.startswith("/v1/"):
            seen["billable"] += 1
            return web.json_response({"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}]})
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "tm-small"}]})
        return web.json_response({"version": "t", "tokens": [1]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app, seen


# -- every stop ends ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["second_signal", "drain_timeout"])
def test_a_stop_with_a_full_queue_ends(sim: Any, tmp_path: Path, how: str) -> None:
    """200 unread lines behind 2 requests that take 30 s: the queue is full when the signal
    comes, and the process must still end promptly, write its summary and say how to resume."""
    inp = write_lines(tmp_path / "in.jsonl", sleepy_rows(200))
    out = tmp_path / "out"
    proc = start(["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q",
                  "--no-preflight", "-c", "2", "--drain-timeout", "1" if how == "drain_timeout"
                  else "25"])
    wait_for(lambda: sim.stats()["completion_calls"] >= 2, "never sent")
    proc.send_signal(signal.SIGTERM)
    early = b""
    if how == "second_signal":  # once the first has been handled: the drain has begun
        early = read_stderr_until(proc, b"no new requests")
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=STUCK)
    err = early + err
    assert proc.returncode == 143, err
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["stopped"] == "SIGTERM" and summary["finished"] is False
    assert b"run the same command again" in err
    assert sim.stats()["completion_calls"] == 2  # nothing new was admitted after the signal


@pytest.mark.parametrize("case", ["retry_after_pause", "rpm_throttle"])
def test_a_signal_ends_a_wait_with_nothing_in_flight(sim: Any, tmp_path: Path,
                                                      case: str) -> None:
    rows = [chat_line(i) for i in range(6)]
    extra: list[str] = []
    if case == "retry_after_pause":  # every worker waits out a 60 s Retry-After
        rows[0]["body"]["sim"] = {"status": 429, "retry_after": 60, "times": 1}
        extra = ["-c", "1"]
    else:  # one request a minute: the second waits ~60 s in the bucket
        extra = ["-c", "2", "--rpm", "1"]
    inp = write_lines(tmp_path / "in.jsonl", rows)
    proc = start(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", sim.url, "-q",
                  "--no-preflight", *extra])
    wait_for(lambda: sim.stats()["received"] >= 1, "never sent")
    # now waiting: in the pause the 429 announced (journaled), or in the rate bucket once the
    # first line is answered
    if case == "retry_after_pause":
        wait_for(lambda: journal_records(tmp_path / "out", "p") != [], "never paused")
    else:
        wait_for(lambda: len(read_jsonl_tolerant(tmp_path / "out" / "results.jsonl")) == 1,
                 "never answered")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=STUCK)
    assert proc.returncode == 130, err
    assert sim.stats()["received"] == 1
    # the refused (or never sent) lines are pending for the next run; nothing is ambiguous
    status = orjson.loads(run_cli(["status", str(tmp_path / "out"), "--json"]).stdout)
    assert status["unknown_outcome"] == 0 and status["failed"] == 0
    assert status["succeeded"] + status["not_yet_sent"] == 6
    assert status["not_yet_sent"] >= 5


def test_sigterm_during_preflight_ends_it_and_bills_nothing(
        serve: Callable[..., AppThread], tmp_path: Path) -> None:
    app, seen = counting_app(health_delay=60)
    server = serve(app)
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    out = tmp_path / "out"
    proc = start(["run", str(inp), "-o", str(out), "--base-url", server.url()])
    wait_for(lambda: seen["any"] >= 1, "preflight never asked /health")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=STUCK)
    assert proc.returncode == 143, err
    assert seen["billable"] == 0
    assert b"Traceback" not in err
    assert not out.exists()  # a new job stopped before its first request leaves nothing


# -- refused commands touch nothing ---------------------------------------------------------

def hold_lock(out: Path) -> int:
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("extra", [[], ["--restart"]])
def test_a_locked_directory_is_refused_before_anything_changes(
        serve: Callable[..., AppThread], sim: Any, tmp_path: Path, extra: list[str]) -> None:
    """A second command on a live directory: refused at once, exit 2, nothing moved, no torn
    line repaired, and not one request (not even preflight's GETs) sent."""
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out"
    first = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q"], env=keyed_env())
    assert first.returncode == 0, first.stderr
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"torn": ')  # as a live run could leave it mid-write
    fd = hold_lock(out)  # the live run
    before = snapshot(out)
    try:
        app, seen = counting_app()
        other = serve(app)
        p = run_cli(["run", str(inp), "-o", str(out), "--base-url", other.url(), *extra],
                    env=keyed_env())
    finally:
        os.close(fd)
    assert p.returncode == 2, p.stderr
    assert "another tmbatch process is using" in p.stderr
    assert seen["any"] == 0
    assert snapshot(out) == before
    assert not [d for d in out.iterdir() if d.name.startswith("previous-")]


def test_restart_against_a_live_run_moves_nothing(sim: Any, tmp_path: Path) -> None:
    inp = write_lines(tmp_path / "in.jsonl", sleepy_rows(40, sleep=0.2))
    out = tmp_path / "out"
    live = start(["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q",
                  "--no-preflight", "-c", "2", "--job-id", "livejob"])
    wait_for(lambda: (out / "results.jsonl").exists()
             and (out / "results.jsonl").stat().st_size > 0, "the live run wrote nothing")
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--restart"],
                env=keyed_env())
    assert p.returncode == 2 and "another tmbatch process" in p.stderr, p.stderr
    _, err = live.communicate(timeout=120)
    assert live.returncode == 0, err
    assert not [d for d in out.iterdir() if d.name.startswith("previous-")]
    assert len(read_jsonl(out / "results.jsonl")) == 40
    assert sim.stats()["duplicates"] == 0
    assert not (out / ".lock").exists()  # released, not left behind


@pytest.mark.parametrize("problem", ["read_only", "file_in_the_way", "foreign_owner"])
def test_an_unusable_output_path_is_one_clear_line_before_the_network(
        serve: Callable[..., AppThread], tmp_path: Path, problem: str) -> None:
    app, seen = counting_app()
    server = serve(app)
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    parent = tmp_path / "data"
    parent.mkdir()
    out = parent / "out"
    as_plain_user = False
    if problem == "read_only":
        parent.chmod(0o500)
        as_plain_user = True
    elif problem == "file_in_the_way":
        out.write_text("not a directory")
    else:  # a volume owned by another uid, mode 0755: not writable by us
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another uid needs root (CI runs as root)")
        out.mkdir()
        os.chown(out, 4242, 4242)
        out.chmod(0o755)
        as_plain_user = True
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url()], env=keyed_env(),
                as_plain_user=as_plain_user)
    assert p.returncode == 2, p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
    assert str(out) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert seen["any"] == 0


@pytest.mark.parametrize("name", ["results.jsonl", "journal.jsonl", "summary.json"])
def test_a_planted_link_is_refused_and_its_target_untouched(sim: Any, tmp_path: Path,
                                                            name: str) -> None:
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    out = tmp_path / "out"
    first = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q"], env=keyed_env())
    assert first.returncode == 0, first.stderr
    target = tmp_path / "precious.txt"
    target.write_bytes(b"someone else's file, no newline at the end")
    (out / name).unlink()
    (out / name).symlink_to(target)
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q"], env=keyed_env())
    assert p.returncode == 2, p.stderr
    assert f"{out / name} is a symbolic link" in p.stderr
    assert target.read_bytes() == b"someone else's file, no newline at the end"


def test_a_ca_bundle_that_is_not_pem_is_refused_before_the_network(
        serve: Callable[..., AppThread], tmp_path: Path) -> None:
    app, seen = counting_app()
    server = serve(app)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("this is not a certificate\n")
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", server.url(),
                 "--ca-bundle", str(bundle)], env=keyed_env())
    assert p.returncode == 2 and "not a PEM file" in p.stderr, p.stderr
    assert seen["any"] == 0


# -- a dead host, a crash during a pause ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_dead_host_stops_the_run_and_the_same_command_resumes(tmp_path: Path) -> None:
    port = free_port()
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(300)])
    out = tmp_path / "out"
    # --no-preflight: the runner's own breaker (preflight stops first: test_preflight_unreachable)
    args = ["run", str(inp), "-o", str(out), "--base-url", f"http://127.0.0.1:{port}", "-q",
            "--no-preflight"]
    p = run_cli(args, env=keyed_env(), timeout=60)
    assert p.returncode == 3, p.stderr
    assert p.stderr.count(f"cannot reach http://127.0.0.1:{port}") == 1, p.stderr  # said once
    assert read_jsonl(out / "failures.jsonl") == []  # not burnt: every line is pending
    status = orjson.loads(run_cli(["status", str(out), "--json"], env=keyed_env()).stdout)
    assert status["not_yet_sent"] == 300
    sim = subprocess.Popen([sys.executable, "-m", "tmbatch", "sim", "--port", str(port)],
                           env=keyed_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), "the simulator did not start")
        again = run_cli(args, env=keyed_env(), timeout=120)
    finally:
        sim.terminate()
        sim.wait(10)
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(out / "results.jsonl")) == 300


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_kill_9_during_a_retry_after_pause_leaves_the_line_pending(sim: Any,
                                                                   tmp_path: Path) -> None:
    """The line was only ever refused (429): after kill -9 it is sent again, not called
    ambiguous; and the resumed run waits out the window the 429 announced."""
    rows = [chat_line(i) for i in range(3)]
    rows[0]["body"]["sim"] = {"status": 429, "retry_after": 3, "times": 1}
    inp = write_lines(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["run", str(inp), "-o", str(out), "--base-url", sim.url, "-q", "--no-preflight",
            "-c", "1"]
    proc = start(args)
    wait_for(lambda: sim.stats()["rejected_429"] == 1, "no 429")
    wait_for(lambda: journal_records(out, "p") != [], "the pause never journaled")
    proc.kill()
    proc.wait(10)
    again = run_cli(args, env=keyed_env())
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(out / "results.jsonl")) == 3
    assert read_jsonl(out / "failures.jsonl") == []
    stats = sim.stats()
    assert stats["retry_after_violations"] == 0  # the resumed run honoured the open window
    assert stats["duplicates"] == 0


def test_resuming_on_a_disk_that_is_still_full_stops_before_the_network(
        serve: Callable[..., AppThread], tmp_path: Path) -> None:
    from tests.test_disk import limit_file_size

    app, seen = counting_app()
    server = serve(app)
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(50)])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url",
            server.url(), "-q"]
    first = subprocess.run(args, env=keyed_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=60, preexec_fn=limit_file_size(2000))
    assert first.returncode == 4, first.stderr
    size = (out / "journal.jsonl").stat().st_size
    seen["any"] = 0
    again = subprocess.run(args, env=keyed_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=60, preexec_fn=limit_file_size(size))
    assert again.returncode == 4, again.stderr
    assert "File too large" in again.stderr and "Traceback" not in again.stderr
    assert seen["any"] == 0
