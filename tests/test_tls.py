"""Transport safety: TLS verified by default, a private CA only when asked, no key over
plain http to another machine, and no key carried along a redirect.

The TLS server is the simulator app itself (tmbatch.sim.build_app) behind an ssl
context holding a certificate from a throwaway trustme CA, on 127.0.0.1.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.conftest import (
    API_KEY,
    AppThread,
    chat_answer,
    chat_line,
    clean_env,
    read_jsonl,
    run_cli,
)
from tests.conftest import write_jsonl as write_lines
from tmbatch.sim import STATE_KEY, SimConfig, build_app, stats_of


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return authority, pem


def tls_sim(serve: Callable[..., AppThread], authority: trustme.CA) -> tuple[AppThread, Any]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    app = build_app(SimConfig(api_key=API_KEY))
    return serve(app, ssl_context=ctx), app[STATE_KEY]


def run_args(tmp_path: Path, url: str, n: int = 3) -> list[str]:
    inp = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(n)])
    return ["run", str(inp), "-o", str(tmp_path / "out"), "--base-url", url, "--max-retries", "0"]


def test_untrusted_certificate_is_not_sent(serve: Callable[..., AppThread],
                                           ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    server, state = tls_sim(serve, ca[0])
    proc = run_cli([*run_args(tmp_path, server.url("https")), "--no-preflight"],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    # Nothing can reach the server: the circuit breaker stops the run (exit 3) with the reason
    # and the fix, and every line stays pending for the same command once it is trusted.
    assert proc.returncode == 3, proc.stderr
    assert "tls_certificate" in proc.stderr and "certificate verify failed" in proc.stderr
    assert "--ca-bundle" in proc.stderr
    assert read_jsonl(tmp_path / "out" / "failures.jsonl") == []
    assert stats_of(state)["received"] == 0  # the handshake failed: no request, no key sent
    again = run_cli([*run_args(tmp_path, server.url("https")), "--no-preflight",
                     "--ca-bundle", str(ca[1])],
                    env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(tmp_path / "out" / "results.jsonl")) == 3


def test_untrusted_certificate_stops_at_preflight(serve: Callable[..., AppThread],
                                                  ca: tuple[trustme.CA, Path],
                                                  tmp_path: Path) -> None:
    """With the default preflight, the run stops before any line, saying why."""
    server, state = tls_sim(serve, ca[0])
    proc = run_cli(run_args(tmp_path, server.url("https")),
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert proc.returncode != 0
    assert "certificate" in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert stats_of(state)["completion_calls"] == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_ca_bundle_is_honoured(how: str, serve: Callable[..., AppThread],
                               ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    server, state = tls_sim(serve, ca[0])
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    args = run_args(tmp_path, server.url("https"))
    if how == "flag":
        args += ["--ca-bundle", str(ca[1])]
    else:
        env["TENSORMESH_CA_BUNDLE"] = str(ca[1])
    proc = run_cli(args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(tmp_path / "out" / "results.jsonl")) == 3
    assert stats_of(state)["auth"]["bearer_ok"] >= 3


def test_missing_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    proc = run_cli([*run_args(tmp_path, "https://127.0.0.1:9"), "--ca-bundle",
                    str(tmp_path / "nope.pem")],
                   env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert proc.returncode == 2
    assert "CA bundle" in proc.stderr and "nope.pem" in proc.stderr


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") else addr


def test_key_not_sent_over_plain_http_to_another_host(serve: Callable[..., AppThread],
                                                      tmp_path: Path) -> None:
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("no non-loopback address to serve plain http on")
    app = build_app(SimConfig(api_key=API_KEY))
    try:
        server = serve(app, host=addr)
    except OSError as exc:
        pytest.skip(f"cannot listen on {addr}: {exc}")
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    refused = run_cli(run_args(tmp_path, server.url()), env=env)
    assert refused.returncode == 2
    assert "refusing to send the API key over plain http://" in refused.stderr
    assert "--allow-insecure-http" in refused.stderr
    assert sum(stats_of(app[STATE_KEY])["auth"][k] for k in
               ("bearer_ok", "bearer_wrong", "bearer_missing")) == 0  # not even a GET

    allowed = run_cli([*run_args(tmp_path, server.url()), "--allow-insecure-http"], env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert stats_of(app[STATE_KEY])["auth"]["bearer_ok"] >= 3


def test_plain_http_to_loopback_is_fine(sim_factory: Any, tmp_path: Path) -> None:
    """Local simulators and sidecars are loopback: the key may go there without a flag."""
    sim = sim_factory(api_key=API_KEY)
    proc = run_cli(run_args(tmp_path, sim.url), env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert proc.returncode == 0, proc.stderr
    assert sim.stats()["auth"]["bearer_ok"] >= 3


def test_redirect_does_not_carry_the_key(serve: Callable[..., AppThread],
                                         tmp_path: Path) -> None:
    """Every 3xx is a permanent `redirect` failure; the other host never sees a request."""
    second_seen: list[dict[str, str]] = []

    async def second(request: web.Request) -> web.Response:
        second_seen.append(dict(request.headers))
        return web.json_response(chat_answer("stolen"))

    app2 = web.Application()
    app2.router.add_route("*", "/{tail:.*}", second)
    other = serve(app2)

    first_auth: list[str | None] = []

    async def first(request: web.Request) -> web.Response:
        body = await request.json()
        first_auth.append(request.headers.get("Authorization"))
        return web.Response(status=body["metadata"]["status"],
                            headers={"Location": other.url() + "/v1/chat/completions"})

    app1 = web.Application()
    app1.router.add_post("/v1/chat/completions", first)
    server = serve(app1)
    statuses = [301, 302, 303, 307, 308]
    inp = write_lines(tmp_path / "in.jsonl",
                      [chat_line(i, metadata={"status": s}) for i, s in enumerate(statuses)])
    out = tmp_path / "out"
    proc = run_cli(["run", str(inp), "-o", str(out), "--base-url", server.url(),
                    "--no-preflight"], env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert proc.returncode == 1, proc.stderr
    fails = read_jsonl(out / "failures.jsonl")
    assert sorted(f["response"]["status_code"] for f in fails) == statuses
    for f in fails:
        assert (f["error"]["class"], f["error"]["code"]) == ("permanent", "redirect")
        assert other.url() in f["error"]["message"] and "not followed" in f["error"]["message"]
    assert first_auth == [f"Bearer {API_KEY}"] * len(statuses)  # the key went where asked
    assert second_seen == []  # and nowhere else: not even a request without it
