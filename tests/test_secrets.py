"""Production keys never leak: not in logs, errors, summaries, output files, `ps` or doctor.

Every scenario greps ALL of what tmbatch produced (stdout, stderr, every file under
the output directory) for the key, and for a slice of it, so a truncated echo
("Bearer tm-test-key-01...") is caught too.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, chat_line, clean_env, read_jsonl, run_cli, write_jsonl

# Looks like a Control Plane JWT: config refuses it, and must not repeat it while refusing.
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0bWJhdGNoLXRlc3QtdXNlci0xMjM0NSJ9.c2VjcmV0LXNpZ25hdHVyZQ"


def needles(secret: str) -> list[bytes]:
    return [secret.encode(), secret[4:20].encode()]


def leaks(secret: str, proc: subprocess.CompletedProcess[Any], out: Path | None) -> list[str]:
    """Where the secret (or a 16-character slice of it) shows up."""
    found = []
    blobs: list[tuple[str, bytes]] = []
    for name in ("stdout", "stderr"):
        v = getattr(proc, name) or b""
        blobs.append((name, v.encode() if isinstance(v, str) else v))
    if out is not None and out.exists():
        blobs += [(str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file()]
    for where, blob in blobs:
        if any(n in blob for n in needles(secret)):
            found.append(where)
    return found


def inputs(tmp_path: Path, n: int = 4) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(n)])


def key_env(key: str = API_KEY) -> dict[str, str]:
    return clean_env(TENSORMESH_INFERENCE_API_KEY=key)


def free_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_normal_run_verbose_and_json_logs(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    for fmt in ("text", "json"):
        out = tmp_path / f"out-{fmt}"
        proc = run_cli(["run", str(inputs(tmp_path)), "-o", str(out), "--base-url", sim.url,
                        "-vv", "--log-format", fmt], env=key_env())
        assert proc.returncode == 0, proc.stderr
        assert len(read_jsonl(out / "results.jsonl")) == 4
        assert leaks(API_KEY, proc, out) == []
    assert sim.stats()["auth"]["bearer_ok"] >= 8  # the key was really used


def test_fatal_401_run(tmp_path: Path) -> None:
    """The server refuses our key: the error is explained without repeating the key."""
    out = tmp_path / "out"
    proc = run_cli(["run", str(inputs(tmp_path)), "-o", str(out), "--sim", "-v",
                    "--sim-api-key", "tm-the-key-the-server-wants-000000000000"], env=key_env())
    assert proc.returncode == 3, proc.stderr
    assert "401" in proc.stderr and "API key" in proc.stderr
    assert leaks(API_KEY, proc, out) == []


@pytest.mark.parametrize("case", ["on_demand_without_user", "insecure_http", "bad_timeout",
                                  "jwt_as_key", "key_file_two_lines", "key_with_space"])
def test_bad_config(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    secret = API_KEY
    args = ["run", str(inputs(tmp_path)), "-o", str(out)]
    env = key_env()
    if case == "on_demand_without_user":
        args += ["--surface", "on-demand", "--base-url", "https://gw.example"]
    elif case == "insecure_http":
        args += ["--base-url", "http://203.0.113.7:8080"]
    elif case == "bad_timeout":
        env["TENSORMESH_TIMEOUT_SECONDS"] = "soon"
    elif case == "jwt_as_key":
        secret, env = JWT, key_env(JWT)
    elif case == "key_file_two_lines":
        key_file = tmp_path / "key"
        key_file.write_text(API_KEY + "\n" + API_KEY[::-1] + "\n")
        env = clean_env()
        args += ["--api-key-file", str(key_file)]
    elif case == "key_with_space":
        secret = API_KEY + " trailing-part-of-the-key-abcdef"
        env = key_env(secret)
    proc = run_cli(args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tmbatch: error:") or "tmbatch:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert leaks(secret, proc, out) == []


def test_network_error_run(tmp_path: Path) -> None:
    """Nothing listens: the circuit breaker stops the run naming the host, and neither its
    message nor anything on disk carries the key."""
    out = tmp_path / "out"
    port = free_port()
    args = ["run", str(inputs(tmp_path, 2)), "-o", str(out), "--base-url",
            f"http://127.0.0.1:{port}", "--max-retries", "0", "-v", "--no-preflight"]
    proc = run_cli(args, env=key_env())
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot reach http://127.0.0.1:{port}" in proc.stderr
    assert read_jsonl(out / "failures.jsonl") == []  # pending: the next run sends them
    assert leaks(API_KEY, proc, out) == []


def test_doctor_output(sim_factory: Any, tmp_path: Path) -> None:
    probe = run_cli(["doctor", "--help"])
    if probe.returncode != 0:
        pytest.skip("tmbatch doctor does not exist in this tree")
    sim = sim_factory(api_key=API_KEY)
    for extra in ([], ["--json"]):
        proc = run_cli(["doctor", "--base-url", sim.url, *extra], env=key_env())
        assert "Traceback" not in proc.stderr
        assert leaks(API_KEY, proc, None) == [], proc
    wrong = run_cli(["doctor", "--base-url", sim.url], env=key_env(API_KEY[::-1]))
    assert wrong.returncode != 0
    assert leaks(API_KEY[::-1], wrong, None) == []


def test_no_api_key_flag_and_no_echo(tmp_path: Path) -> None:
    """`--api-key` (nor an abbreviation of --api-key-file) takes a key from argv."""
    proc = run_cli(["run", str(inputs(tmp_path)), "-o", str(tmp_path / "o"), "--sim",
                    "--api-key", API_KEY])
    assert proc.returncode == 2
    assert "api-key-file" in proc.stderr or "TENSORMESH_INFERENCE_API_KEY" in proc.stderr
    assert leaks(API_KEY, proc, tmp_path / "o") == []
    help_text = run_cli(["run", "--help"]).stdout
    assert "--api-key-file" in help_text
    assert "--api-key " not in help_text.replace("--api-key-file", "")


def test_key_file_keeps_key_out_of_proc(sim_factory: Any, tmp_path: Path) -> None:
    """A running tmbatch's /proc/PID/cmdline and environ never hold the key."""
    sim = sim_factory(api_key=API_KEY, latency=1.0)
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tmbatch", "run", str(inputs(tmp_path, 1)), "-o", str(out),
           "--base-url", sim.url, "--api-key-file", str(key_file), "-c", "1", "-q"]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while sim.stats()["received"] == 0 and proc.poll() is None:
            time.sleep(0.02)  # until the process has read the key and is mid-request
        assert proc.poll() is None, "the run ended before it could be inspected"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert str(key_file).encode() in cmdline  # really looking at the right process
        assert not any(n in cmdline for n in needles(API_KEY))
        assert not any(n in environ for n in needles(API_KEY))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert sim.stats()["auth"]["bearer_ok"] >= 1
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert leaks(API_KEY, done, out) == []


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_output_modes_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Results hold prompts and answers: 0600 files in a 0700 directory, even under umask 0."""
    out = tmp_path / "deep" / "out"
    rows = [chat_line(i) for i in range(3)] + [b"{broken"]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)

    def run(*extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--sim", "-q",
             *extra], env=clean_env(), capture_output=True, timeout=120,
            preexec_fn=lambda: os.umask(0),
        )

    first = run()
    assert first.returncode == 1, first.stderr
    again = run("--restart")  # moves the old files aside into previous-*/: same rules there
    assert again.returncode == 1, again.stderr
    modes = _modes(out)
    assert any(name.startswith("previous-") for name in modes)
    assert {"results.jsonl", "failures.jsonl", "journal.jsonl", "summary.json"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o700 if (out / name).is_dir() else 0o600)}
    assert wrong == {}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def echoing_app() -> Any:
    """A server (or proxy) that echoes the request's headers back: in a successful answer, in
    an error message (padded so a cut at 500 characters would split the key), and in a 401."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        mode = body["messages"][0]["content"]
        if mode == "question 1":
            return web.json_response({"error": {"message": "x" * 480 + f" got {auth}"}},
                                     status=400)
        if mode == "question 3":
            return web.json_response({"error": {"message": f"bad key {auth}"}}, status=401)
        return web.json_response({
            "id": "c", "object": "chat.completion", "model": "tm-small",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"you sent {auth}"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": f"echo {request.headers.get('Authorization')}"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "tm-small"}],
                                  "note": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/version", version)
    app.router.add_get("/health", version)
    app.router.add_get("/v1/models", models)
    async def tokenize(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        return web.json_response({"error": {"message": f"upstream saw {auth}"}}, status=500)

    app.router.add_post("/tokenize", tokenize)
    return app


def test_an_echoed_key_never_reaches_disk(serve: Any, tmp_path: Path) -> None:
    """The answers are kept (they were paid for) with the key replaced; nothing written, not
    results, failures, summary, exports nor the report's data, holds it."""
    server = serve(echoing_app())
    out = tmp_path / "out"
    proc = run_cli(["run", str(inputs(tmp_path, 4)), "-o", str(out), "--base-url",
                    server.url(), "-c", "1", "--no-preflight"], env=key_env())
    assert proc.returncode == 3, proc.stderr  # the 401 on the last line stops the run
    results = read_jsonl(out / "results.jsonl")
    assert [r["response"]["body"]["choices"][0]["message"]["content"] for r in results] == \
        ["you sent Bearer [redacted]", "you sent Bearer [redacted]"]
    failed = {f["line"]: f for f in read_jsonl(out / "failures.jsonl")}
    assert "[redacted]" in str(failed[2]["response"]["body"])
    exported = run_cli(["export", str(out), "--combined"], env=key_env())
    assert exported.returncode == 0, exported.stderr
    assert (out / "outcomes.ordered.jsonl").stat().st_size > 0
    assert leaks(API_KEY, proc, out) == []
    for extra in ([], ["--json"]):
        doctor = run_cli(["doctor", "--base-url", server.url(), *extra], env=key_env())
        assert "[redacted]" in doctor.stdout, doctor.stdout
        assert leaks(API_KEY, doctor, None) == []
