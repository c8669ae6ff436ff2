"""Preflight and doctor tell the truth (issue 24): a host that cannot be reached (DNS, a
refused port, TLS) stops `run` with one message and exit 3 before any POST, `doctor` exits 3
and lists every check (ok / WARN / FAIL / skip with why); the small wording bugs around it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from tests.conftest import (
    API_KEY,
    ROOT,
    AppThread,
    chat_line,
    clean_env,
    keyed_env,
    run_cli,
    write_jsonl,
)
from tests.test_tls import ca, tls_sim  # noqa: F401  (ca: the module's fixture)

WRONG = "tm-wrong-key-0000000000000000000000"


def free_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["dns", "refused", "tls"])
def dead_host(request: pytest.FixtureRequest, serve: Callable[..., AppThread],
              ca: tuple[trustme.CA, Path]) -> Iterator[tuple[str, str, Any]]:  # noqa: F811
    """(base URL, what stderr names, the server's state to count POSTs: None when there is
    no server at all)."""
    if request.param == "dns":
        yield "https://nonexistent.invalid", "nonexistent.invalid", None
    elif request.param == "refused":
        port = free_port()
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", None
    else:  # a real server whose certificate is not trusted: the handshake fails
        server, state = tls_sim(serve, ca[0])
        yield server.url("https"), "certificate verify failed", state


def test_run_stops_with_one_message_before_any_post(dead_host: tuple[str, str, Any],
                                                    tmp_path: Path) -> None:
    url, named, state = dead_host
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    out = tmp_path / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--base-url", url], env=keyed_env())
    assert p.returncode == 3, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr  # one message: no "preflight ok", no progress, no retry
    assert lines[0].startswith("tmbatch: preflight failed, nothing was sent "
                               "(--no-preflight skips these checks): health: cannot connect to ")
    assert named in lines[0]
    assert "--ca-bundle" in lines[0] if "verify" in named else "--base-url" in lines[0]
    assert API_KEY not in p.stderr
    assert not out.exists()  # a job that never sent its first request leaves nothing behind
    if state is not None:
        from tmbatch.sim import stats_of

        assert stats_of(state)["received"] == 0  # not even the GETs got through the handshake


def test_doctor_fails_and_lists_every_check(dead_host: tuple[str, str, Any]) -> None:
    url, named, _ = dead_host
    p = run_cli(["doctor", "--base-url", url, "--model", "tm-small"], env=keyed_env())
    assert p.returncode == 3, p.stdout + p.stderr
    checks = p.stdout[p.stdout.index("checks:"):].splitlines()
    assert checks[1] == "  ok    key      inference API key set (env TENSORMESH_INFERENCE_API_KEY)"
    assert checks[2].startswith("  FAIL  health   cannot connect to ") and named in checks[2]
    assert checks[3:6] == [f"  skip  {name:<8} not checked: the host could not be reached"
                           for name in ("version", "models", "auth")]
    assert checks[6:] == ["doctor: problems found"]
    j = run_cli(["doctor", "--json", "--base-url", url, "--model", "tm-small"], env=keyed_env())
    assert j.returncode == 3
    doc = orjson.loads(j.stdout)
    assert doc["ok"] is False
    assert [(c["name"], c["status"]) for c in doc["checks"]] == [
        ("key", "ok"), ("health", "error"), ("version", "skipped"), ("models", "skipped"),
        ("auth", "skipped")]
    assert doc["checks"][1]["code"] == "unreachable"


def test_a_warning_is_not_called_ok(serve: Callable[..., AppThread], sim: Any,
                                    tmp_path: Path) -> None:
    """A server without /health (404) is usable: the run goes ahead, and says it does so
    with a warning, never `preflight ok`."""
    from aiohttp import ClientSession, web

    async def proxy(request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.json_response({"error": {"message": "no such route"}}, status=404)
        async with ClientSession() as s, s.request(
                request.method, sim.url + request.path_qs, data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"}) as r:
            return web.Response(body=await r.read(), status=r.status,
                                content_type=r.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    server = serve(app)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(2)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", server.url()],
                env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert "preflight ok" not in p.stderr
    assert "WARNING: preflight: health: GET /health answered HTTP 404" in p.stderr
    assert "preflight: going ahead with 1 warning(s): " in p.stderr
    assert sim.stats()["completion_calls"] == 2


# -- the small wording bugs ------------------------------------------------------------------

def test_sim_says_which_credentials_it_needs(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "a"), "--sim"], env=clean_env())
    assert p.returncode == 0, p.stderr
    assert "(no credentials needed)" in p.stderr
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "b"), "--sim", "--sim-api-key", API_KEY],
                env=keyed_env())
    assert p.returncode == 0, p.stderr
    assert "no credentials needed" not in p.stderr
    assert "(it requires the key given to --sim-api-key)" in p.stderr
    assert API_KEY not in p.stderr


def test_a_refused_key_is_said_once_without_a_double_period(sim_factory: Any,
                                                            tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(5)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", sim.url,
                 "--no-preflight", "-c", "1"], env=keyed_env(WRONG))
    assert p.returncode == 3, p.stderr
    assert ".." not in p.stderr
    assert p.stderr.count("Incorrect API key provided") == 1, p.stderr  # the fatal text once
    assert "Incorrect API key provided. Check the inference API key" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "tmbatch: stopped by the fatal error above; nothing more was sent")


def test_ctrl_c_during_preflight_promises_no_resume(sim_factory: Any, tmp_path: Path) -> None:
    """POST /tokenize (the key check) is held 30 s by the simulator's latency: SIGINT then."""
    sim = sim_factory(latency=30.0)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--base-url",
         sim.url], env=keyed_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sim.stats()["by_route"].get("/tokenize", {}).get("received", 0) < 1:
        assert time.monotonic() < deadline and proc.poll() is None, "preflight never began"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    stderr = err.decode()
    assert proc.returncode == 130, stderr
    assert "resume" not in stderr
    assert (f"interrupted (SIGINT) before the first request: nothing was sent and no job was "
            f"recorded in {out}; run the same command to start it") in stderr
    assert not out.exists()
    assert sim.stats()["completion_calls"] == 0
