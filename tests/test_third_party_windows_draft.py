"""DRAFT (for review, not wired anywhere): the LiteLLM proxy as a third-party fixed-window
rate limiter, with no database (no prisma, no Postgres) and a mock_response model.

Two configurations give a requests-per-minute limit from a deployment's `rpm:` in
`litellm_params`; they differ in the window, in N, and in what the 429 says. Observed by hand
against litellm[proxy] 1.106.12 (the pinned venv, ~/.cache/tmbatch-conformance/litellm-*/) on
2026-12-07, 2 cores, Python 3.11; the tests below assert exactly those observations.

A. `router_settings: routing_strategy: usage-based-routing-v2`  -> CLOCK-MINUTE fixed window
   * The counter is keyed `<deployment id>:<model>:rpm:<UTC %H-%M>` (litellm/router_strategy/
     lowest_tpm_rpm_v2.py): it resets at every UTC minute boundary, not 60 s after the first
     request. Seen: 4 OK at 20:05:44.8, refusals until 20:05:59, 4 OK again at 20:06:00.33.
   * N admitted per minute is max(1, rpm - 1), not rpm (selection filters a deployment when
     `count + 1 >= rpm`): rpm 5 -> 4, rpm 2 -> 1, rpm 1 -> 1. Also with 12 requests sent at
     once right after the boundary: exactly 4 OK, 8 refused.
   * The 429 (the selection step's "No deployments available", never the pre-call
     "Deployment over defined rpm limit" one in these runs) carries `llm_provider-retry-after:
     60` -- a constant 60, not the time to the minute boundary -- and NO `Retry-After`, no
     `retry-after-ms`, no `llm_provider-retry-after-ms`, no `x-ratelimit-*`. All its headers:
         date: Mon, 07 Dec 2026 20:05:44 GMT
         llm_provider-retry-after: 60
         x-litellm-call-id: d731dd8d-47c3-4888-8a26-acfc7bcbd1db
         x-litellm-response-cost: 0
         x-litellm-key-spend: 0.0
         content-length: 411
         content-type: application/json
         vary: Origin
         x-frame-options: DENY
         content-security-policy: frame-ancestors 'none'
         x-content-type-options: nosniff
         Connection: close
     Body: {"error":{"message":"litellm.RateLimitError: No deployments available for selected
     model. Passed model=tm-mock. Deployments={'<id>': {'current_tpm': 120, 'tpm_limit': inf,
     'current_rpm': 4, 'rpm_limit': 5}}\n\nLiteLLM: model group 'tm-mock' failed with the
     error above. No fallback was attempted.","type":"throttling_error","param":null,
     "code":"429"}}
   * Refused requests do not count: after 30 more refusals the body still says current_rpm 4.
   * The 200s carry x-ratelimit-limit-requests: 5 and x-ratelimit-remaining-requests 4,3,2,1:
     the last 200 says 1 remaining, and the next request is refused (off by one, as above).
   * tmbatch reads llm_provider-retry-after (tmbatch/policy.py), so to it this is a fixed
     window with a 60 s Retry-After that overshoots the true reset by up to 60 s.

B. `router_settings: routing_strategy: simple-shuffle, enable_pre_call_checks: true`
   -> 60 s window ANCHORED AT ITS FIRST REQUEST, BARE 429
   * The counter is an in-memory key per deployment id set with ttl=60 on the first success
     and incremented without touching the ttl (Router._update_usage; the check is
     Router._pre_call_checks). So a window opens at the first request after the previous one
     expired and lasts 60 s; the clock minute plays no part. Seen: first request 20:07:24.6,
     still refused at 20:08:23.27, accepted at 20:08:24.34; burst at 20:09:40.10, still
     refused at 20:10:40.06, accepted at 20:10:40.62 (not at 20:10:00, not at 20:10:24).
   * N is exactly rpm (rpm 5 -> 5, rpm 1 -> 1), also for 12 requests sent at once: 5 OK.
   * The 429 is BARE: no Retry-After of any spelling, no x-ratelimit-*. All its headers:
         date: Mon, 07 Dec 2026 20:07:23 GMT
         x-litellm-call-id: 8a85de87-06f2-4089-8e06-da8ade5ec3d3
         x-litellm-response-cost: 0
         x-litellm-key-spend: 0.0
         content-length: 125
         content-type: application/json
         vary: Origin
         x-frame-options: DENY
         content-security-policy: frame-ancestors 'none'
         x-content-type-options: nosniff
         Connection: close
     Body: {"error":{"message":"No deployments available for selected model.",
     "type":"internal_server_error","param":null,"code":"429"}}
   * Refused requests do not count: 36 refusals inside one window, then 5 OK in the next.
   * The 200s' x-ratelimit-remaining-requests follow a DIFFERENT counter, per UTC clock minute
     (Router.get_model_group_usage): with a window opened at 20:11:50 (1 request), at 20:12:02
     the 200s said remaining 4,3,2,1 and the 5th request was refused. The headers lie there.

Start-up (to /health/liveliness answering): 4.5-5.2 s warm (the venv's bytecode compiled);
9.1-10.0 s with no usable bytecode (PYTHONPYCACHEPREFIX pointed at an empty directory and
PYTHONDONTWRITEBYTECODE=1). Several s quicker than START_TIMEOUT either way.

No setting found that gives a per-minute limit without a database other than these: the
key/user/team/end-user limits (proxy/hooks/parallel_request_limiter_v3.py, a window opened at
the first request, 429 with `retry-after: <window>`) all read rpm_limit from records kept in
the database; not tried.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.servers import SERVER_KEY, SPECS, ServerProcess, free_port, litellm_venv

MODEL = "tm-mock"
RPM = 5

# A: counted per UTC clock minute; admits RPM - 1; 429 with llm_provider-retry-after: 60.
CLOCK_MINUTE_CONFIG = """\
model_list:
  - model_name: tm-mock
    litellm_params:
      model: openai/tm-mock
      api_key: fake-upstream-key
      mock_response: "Hello from the LiteLLM mock."
      rpm: {rpm}
general_settings:
  master_key: {key}
router_settings:
  routing_strategy: usage-based-routing-v2
  num_retries: 0
litellm_settings:
  num_retries: 0
"""

# B: a 60 s window opened by its first request; admits RPM; bare 429.
FIRST_REQUEST_CONFIG = """\
model_list:
  - model_name: tm-mock
    litellm_params:
      model: openai/tm-mock
      api_key: fake-upstream-key
      mock_response: "Hello from the LiteLLM mock."
      rpm: {rpm}
general_settings:
  master_key: {key}
router_settings:
  routing_strategy: simple-shuffle
  enable_pre_call_checks: true
  num_retries: 0
litellm_settings:
  num_retries: 0
"""

RETRY_HEADERS = ("retry-after", "retry-after-ms", "llm_provider-retry-after",
                 "llm_provider-retry-after-ms")


def start_limited_litellm(log_dir: Path, config_text: str) -> ServerProcess:
    """As tests/servers.py's start_litellm, with one of the configs above."""
    venv = litellm_venv()
    config = log_dir / "litellm-config.yaml"
    config.write_text(config_text.format(rpm=RPM, key=SERVER_KEY))
    port = free_port()
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port)]
    env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "NO_COLOR": "1"}
    return ServerProcess(SPECS["litellm"], cmd, port, log_dir, env=env,
                         ready_path="/health/liveliness")


@pytest.fixture
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_limited_litellm(tmp_path, request.param)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def chat(server: ServerProcess) -> tuple[int, dict[str, str], str]:
    """(status, lower-cased headers, body) of one chat request."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(
        server.url + "/v1/chat/completions", data=body.encode(), method="POST",
        headers={"Authorization": f"Bearer {SERVER_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def sleep_until_second(second: float) -> None:
    """Until `second` (0-60) past the next (or this) wall-clock minute."""
    now = time.time()
    target = (now // 60) * 60 + second
    if target <= now:
        target += 60
    time.sleep(target - now)


# `server_name` is there only so that tests/conftest.py marks these `litellm` (skipped unless
# TMBATCH_LITELLM=1), like every other LiteLLM test.
@pytest.mark.parametrize("server_name", ["litellm"])
@pytest.mark.parametrize("limited", [CLOCK_MINUTE_CONFIG], indirect=True)
def test_usage_based_v2_is_a_clock_minute_window(server_name: str,
                                                 limited: ServerProcess) -> None:
    sleep_until_second(30)  # the burst and its refusals fall inside one clock minute
    first = time.time()
    with ThreadPoolExecutor(RPM + 7) as pool:
        answers = list(pool.map(lambda _: chat(limited), range(RPM + 7)))
    statuses = sorted(a[0] for a in answers)
    assert statuses == [200] * (RPM - 1) + [429] * 8, statuses  # N is rpm - 1
    refused = next(a for a in answers if a[0] == 429)
    status, headers, body = refused
    assert headers.get("llm_provider-retry-after") == "60"  # constant, whatever the second
    assert not {"retry-after", "retry-after-ms", "llm_provider-retry-after-ms"} & set(headers)
    assert not [h for h in headers if h.startswith("x-ratelimit")]
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("throttling_error", "429")
    assert "No deployments available" in error["message"]
    assert f"'current_rpm': {RPM - 1}, 'rpm_limit': {RPM}" in error["message"]
    for _ in range(10):  # refusals are not counted
        assert chat(limited)[0] == 429
    assert f"'current_rpm': {RPM - 1}," in chat(limited)[2]
    # Right after the minute boundary (~30 s after the burst, not 60 s): open again.
    sleep_until_second(0.3)
    assert time.time() - first < 35
    again = [chat(limited)[0] for _ in range(RPM + 1)]
    assert again == [200] * (RPM - 1) + [429] * 2, again


@pytest.mark.parametrize("server_name", ["litellm"])
@pytest.mark.parametrize("limited", [FIRST_REQUEST_CONFIG], indirect=True)
def test_simple_shuffle_pre_call_checks_is_a_window_from_the_first_request(
        server_name: str, limited: ServerProcess) -> None:
    sleep_until_second(30)  # the window (30 s -> 30 s) straddles a clock-minute boundary
    first = time.monotonic()
    with ThreadPoolExecutor(RPM + 7) as pool:
        answers = list(pool.map(lambda _: chat(limited), range(RPM + 7)))
    statuses = sorted(a[0] for a in answers)
    assert statuses == [200] * RPM + [429] * 7, statuses  # N is rpm exactly
    status, headers, body = next(a for a in answers if a[0] == 429)
    assert not set(RETRY_HEADERS) & set(headers), headers  # a bare 429
    assert not [h for h in headers if h.startswith("x-ratelimit")]
    assert json.loads(body) == {"error": {
        "message": "No deployments available for selected model.",
        "type": "internal_server_error", "param": None, "code": "429"}}
    # Past the clock-minute boundary: still refused (not a clock-minute window).
    sleep_until_second(2)
    assert chat(limited)[0] == 429
    # Just before 60 s from the first request: still refused; just after: open again, with
    # RPM whole requests (the ~45 refusals in between did not count).
    refusals = 0
    while time.monotonic() - first < 59.0:
        assert chat(limited)[0] == 429
        refusals += 1
        time.sleep(0.5)
    time.sleep(max(0.0, first + 61.0 - time.monotonic()))
    again = [chat(limited)[0] for _ in range(RPM + 1)]
    assert again == [200] * RPM + [429], (again, refusals)
