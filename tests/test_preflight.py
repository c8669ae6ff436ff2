"""Preflight, `tmbatch doctor` and `tmbatch models`: a wrong key, host or model is found
before a single completion is billed (counted on the simulator's side)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, chat_line, clean_env, keyed_env, outcomes, run_cli, write_jsonl
from tmbatch.client.http import idempotency_key
from tmbatch.client.preflight import SCAN_LINES, models_in_input, unknown_model_message

USER = "0b7e4c1e-2f6d-4a8e-9a1c-3d5b6e7f8a90"
WRONG = "tm-wrong-key-0000000000000000000000"


def run(sim: Any, inp: Path, out: Path, *args: str, key: str = API_KEY) -> Any:
    return run_cli(["run", str(inp), "-o", str(out), "--base-url", sim.url, "--job-id", "pf1",
                    *args], env=keyed_env(key))


def test_wrong_key_stops_before_any_completion(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(20)])
    out = tmp_path / "out"
    p = run(sim, inp, out, key=WRONG)
    assert p.returncode == 3, p.stderr
    assert "preflight" in p.stderr and "/tokenize refused the key" in p.stderr
    assert WRONG not in p.stderr and WRONG not in p.stdout
    stats = sim.stats()
    assert stats["completion_calls"] == 0 and stats["processed_total"] == 0
    assert stats["tokenize_calls"] == 1
    assert not out.exists()  # nothing started: no journal to resume


def test_an_unknown_model_fails_its_lines_with_a_hint(sim_factory: Any, tmp_path: Path) -> None:
    """One line names a model that is not served: that line fails `model_not_served` with
    the hint, unsent; the others run (vLLM writes an error line for that request only)."""
    sim = sim_factory(api_key=API_KEY)
    rows = [chat_line(i) for i in range(5)] + [chat_line(9, model="tm-smal")]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    p = run(sim, inp, tmp_path / "out")
    assert p.returncode == 1, p.stderr
    assert "'tm-smal' is not served here; did you mean 'tm-small'?" in p.stderr
    res, fail = outcomes(tmp_path / "out")
    assert len(res) == 5 and fail["req-9"]["error"]["code"] == "model_not_served"
    assert "did you mean 'tm-small'" in fail["req-9"]["error"]["message"]
    assert sim.stats()["completion_calls"] == 5


def test_no_served_model_at_all_stops_before_any_completion(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, model="tm-smal") for i in range(3)])
    p = run(sim, inp, tmp_path / "out")
    assert p.returncode == 3, p.stderr
    assert "'tm-smal' is not served here; did you mean 'tm-small'?" in p.stderr
    assert sim.stats()["completion_calls"] == 0


def test_model_flag_is_checked_too(sim: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    p = run(sim, inp, tmp_path / "out", "--endpoint", "chat", "--model", "TM-LARGE")
    assert p.returncode == 3, p.stderr
    assert "did you mean 'tm-large'" in p.stderr
    assert sim.stats()["completion_calls"] == 0


def test_no_preflight_skips_the_checks(sim_factory: Any, tmp_path: Path) -> None:
    """The same wrong key without preflight reaches the billed route (the runner's own
    fatal stop): proof that the test above was stopped by preflight."""
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(20)])
    p = run(sim, inp, tmp_path / "out", "--no-preflight", "--concurrency", "1", key=WRONG)
    assert p.returncode == 3, p.stderr
    stats = sim.stats()
    assert stats["completion_calls"] >= 1 and stats["tokenize_calls"] == 0


def test_good_run_after_preflight_and_what_it_sent(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    p = run(sim, inp, tmp_path / "out", "-q")
    assert p.returncode == 0, p.stderr
    stats = sim.stats()
    assert stats["completion_calls"] == 3
    for route in ("/health", "/version", "/v1/models", "/tokenize"):
        assert stats["by_route"][route]["received"] == 1, route
    # the key goes on every route, the GETs included: a server may want it there
    assert stats["auth"]["bearer_missing"] == 0 and stats["auth"]["bearer_wrong"] == 0


def test_unreachable_host_stops_doctor(tmp_path: Path) -> None:
    """More in test_preflight_unreachable.py: DNS, refused and TLS, run and doctor."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    p = run_cli(["doctor", "--base-url", url, "--model", "m"], env=keyed_env())
    assert p.returncode == 3, p.stdout + p.stderr
    assert "cannot connect to" in p.stdout and "FAIL  health" in p.stdout


# -- the prefix scan -------------------------------------------------------------------------

def test_scan_is_bounded_and_adds_the_model_flag(tmp_path: Path) -> None:
    rows = [chat_line(i, model=f"m{i}") for i in range(30)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    models, complete = models_in_input(str(inp), model="flag-model", max_lines=10)
    assert models == ["flag-model", *[f"m{i}" for i in range(10)]] and not complete
    models, complete = models_in_input(str(inp))
    assert len(models) == 30 and complete
    assert SCAN_LINES == 10_000


def test_stdin_and_fifos_are_not_scanned(tmp_path: Path) -> None:
    assert models_in_input("-", model="x") == (["x"], False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert models_in_input(str(fifo)) == ([], False)  # returns at once: nothing read


def test_unknown_model_messages() -> None:
    served = ["llama-3.1-8b-instruct", "qwen2.5-72b"]
    uuid = "123e4567-e89b-12d3-a456-426614174000"
    assert "served model name" in unknown_model_message(uuid, served)
    assert "did you mean 'qwen2.5-72b'" in unknown_model_message("qwen2.5-72B", served)
    assert "did you mean" not in unknown_model_message("gpt-4", served)
    assert "llama-3.1-8b-instruct" in unknown_model_message("gpt-4", served)


# -- doctor and models -----------------------------------------------------------------------

def test_doctor_shows_sources_and_redacts_the_key(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(api_key=API_KEY)
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1), chat_line(2, model="tm-large")])
    p = run_cli(["doctor", str(inp), "--base-url", sim.url], env=keyed_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert API_KEY not in p.stdout + p.stderr
    assert API_KEY[-4:] in p.stdout  # enough to tell keys apart
    assert "flag --base-url" in p.stdout and "env TENSORMESH_INFERENCE_API_KEY" in p.stdout
    for needle in ("'tm-small' is served", "'tm-large' is served", "accepted the key",
                   "doctor: all good"):
        assert needle in p.stdout
    assert sim.stats()["completion_calls"] == 0


def test_doctor_json_and_exit_code_on_a_wrong_key(sim_factory: Any) -> None:
    sim = sim_factory(api_key=API_KEY)
    p = run_cli(["doctor", "--json", "--model", "tm-small"],
                env=keyed_env(WRONG, TENSORMESH_SERVERLESS_BASE_URL=sim.url))
    assert p.returncode == 3
    doc = orjson.loads(p.stdout)
    assert doc["ok"] is False
    assert doc["settings"]["base_url"] == {"value": sim.url,
                                           "source": "env TENSORMESH_SERVERLESS_BASE_URL"}
    auth = next(c for c in doc["checks"] if c["name"] == "auth")
    assert auth["status"] == "error" and auth["code"] == "unauthorized"
    assert WRONG not in p.stdout + p.stderr


def test_on_demand_doctor_sends_key_and_user_everywhere(sim_factory: Any) -> None:
    sim = sim_factory(api_key=API_KEY, user_id=USER)
    args = ["doctor", "--surface", "on-demand", "--base-url", sim.url, "--model", "tm-small"]
    p = run_cli([*args, "--user-id", USER], env=keyed_env())
    assert p.returncode == 0, p.stdout + p.stderr
    stats = sim.stats()
    assert stats["auth"]["bearer_ok"] == 4 and stats["auth"]["user_ids"] == [USER]
    other = "11111111-2222-4333-8444-555555555555"
    p = run_cli([*args, "--user-id", other], env=keyed_env())
    assert p.returncode == 3 and "X-User-Id" in p.stdout


def test_models_lists_served_models(sim_factory: Any) -> None:
    sim = sim_factory(models=("alpha", "beta-2"))
    p = run_cli(["models", "--base-url", sim.url], env=clean_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["alpha", "beta-2"]
    p = run_cli(["models", "--base-url", sim.url, "--json"], env=clean_env())
    assert [m["id"] for m in orjson.loads(p.stdout)["data"]] == ["alpha", "beta-2"]


@pytest.mark.parametrize("user,code", [(USER, 0), ("11111111-2222-4333-8444-555555555555", 3)])
def test_models_on_demand(sim_factory: Any, user: str, code: int) -> None:
    sim = sim_factory(api_key=API_KEY, user_id=USER)
    p = run_cli(["models", "--surface", "on-demand", "--base-url", sim.url, "--user-id", user],
                env=keyed_env())
    assert p.returncode == code, p.stderr
    if code:
        assert "X-User-Id" in p.stderr


# -- the idempotent routes -------------------------------------------------------------------

def test_dropped_tokenize_is_retried_but_dropped_chat_is_not(sim: Any, tmp_path: Path) -> None:
    rows = [
        {"custom_id": "tok", "method": "POST", "url": "/tokenize",
         "body": {"model": "tm-small", "prompt": "four words right here",
                  "sim": {"drop": True, "times": 1}}},
        {"custom_id": "detok", "method": "POST", "url": "/detokenize",
         "body": {"model": "tm-small", "tokens": [5, 6], "sim": {"drop": True, "times": 1}}},
        chat_line(1, sim={"drop": True, "times": 1}),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    p = run(sim, inp, out, "--no-preflight", "-q")
    assert p.returncode == 1, p.stderr
    res, fail = outcomes(out)
    assert res["tok"]["response"]["body"]["count"] == 4
    assert res["detok"]["response"]["body"]["prompt"] == "tok5 tok6"
    assert set(fail) == {"req-1"} and fail["req-1"]["error"]["class"] == "ambiguous"
    stats = sim.stats()
    assert stats["by_route"]["/tokenize"]["received"] == 2  # dropped, then retried
    assert stats["by_route"]["/detokenize"]["received"] == 2
    assert stats["processed"][idempotency_key("pf1", "req-1")] == 1  # sent once, not again
