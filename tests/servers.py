"""Third-party OpenAI-compatible servers for the conformance suite, as real processes.

Each server is installed from PyPI at a pinned version by the project's own files (the
`conformance` extra in pyproject.toml; LiteLLM from tests/requirements-litellm.txt into a
virtualenv of its own, built here on first use, because its dependencies conflict with
mock-ai-api's), started on 127.0.0.1 on a free port in its own process group, waited for
until it answers HTTP, and stopped by killing that group, so nothing outlives the session.

What each server serves and how it behaves is written down in `SPECS` as data: the tests
read it to decide what to assert, so a server's limitation is stated, never silently skipped.
Observed against the pinned versions (docs/tested-against.md has the table):

llmock 0.2.2: chat and responses, no /v1/completions, /tokenize or /version (404); no key
needed anywhere; no request-id header. A responses stream ends at `response.completed` with
no `data: [DONE]`; chat streams end with it. Text is picked by crc32(model|prompt); tool calls
pick the best-matching tool with schema-valid arguments, random `call_` ids, and a streamed
tool call starts with `"content": null`. Responses usage lacks `cache_write_tokens`. --rpm sends
429 + Retry-After + x-ratelimit-{limit,remaining,reset}-requests (reset: time until full).

mock-ai-api 0.1.1: chat, completions and responses; no key; no request-id header; ignores n.
The answer is chosen by a `:mock-*` model suffix (default: a fixed greeting; `:mock-tool-stream`
a `Write` tool call, unstreamed and streamed; `:mock-429` a 429 without Retry-After). 40 ms
sleep between stream events. Responses bodies lack parallel_tool_calls, tool_choice, tools,
usage details and the output items' status/annotations; its responses stream has no
sequence numbers and ends at `response.completed` with no `[DONE]`. It installs top-level
modules named `app` and `server`.

xpyd-sim 0.5.0: chat and completions, no /v1/responses, /tokenize or /version; with
--require-api-key every /v1/* route wants the key, GET /v1/models included (/health does
not). Output length is random unless --eos-min-ratio 1; tool_choice auto calls a tool on a
coin flip (required is deterministic). Answers with its own model name, for any model asked.

LiteLLM proxy 1.106.12 with mock_response models and a master_key: GET /v1/models and
/health answer 401 without the key (500 unless prisma is installed). Sends x-litellm-call-id
(a UUID) on every answer, its 429s and SSE 500s included. A streamed /v1/responses of a mock
model is HTTP 500 with `data: {"error": {"message": "Error processing stream start", ...}}`
then `data: [DONE]`;
its unstreamed responses body is a canned fixture (usage details with nulls). A streamed n=2
chat ends choice 0 only; mock_tool_calls reach unstreamed answers only (content ""). An
upstream 429 comes back with only llm_provider-retry-after / llm_provider-retry-after-ms.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.conftest import AppThread

HERE = Path(__file__).resolve().parent
LITELLM_REQUIREMENTS = HERE / "requirements-litellm.txt"
# The LiteLLM proxy's virtualenv is about 750 MB from PyPI: its tests run only when asked
# (`TMBATCH_LITELLM=1`, which .ci/run sets), so the README's test command downloads nothing
# of that size unannounced. The other three servers come with the `conformance` extra.
LITELLM_SIZE = "about 750 MB"  # also in tests/conftest.py's skip reason
START_TIMEOUT = 120.0  # a cold LiteLLM start compiles its bytecode: tens of seconds on 2 cores

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"

# The key the servers that check one are configured with; the tests put it in
# TENSORMESH_INFERENCE_API_KEY and grep the outputs for it.
SERVER_KEY = "sk-conformance-0123456789abcdef-SECRET"


@dataclass(frozen=True)
class ServerSpec:
    """What one server is and does, as observed against its pinned version. The defaults
    are what a well-behaved server does; each entry of SPECS names only where it differs."""

    name: str
    package: str
    version: str
    model: str
    routes: frozenset[str]  # POST routes it serves; the others answer 404
    key_on_gets: bool = False  # GET /v1/models (LiteLLM: /health too) is 401 without the key
    honours_n: bool = True  # n=2 gives two choices
    streamed_n_finishes: bool = True  # a streamed n=2 answer ends every choice
    request_id_header: str | None = None  # the header naming the request, when it sends one
    tool_model: str | None = None  # the model whose answer is a tool call (None: `model`)
    tool_choice: str | None = None  # what makes its tool call deterministic
    tools_streamed: bool = True  # a streamed tool-call answer carries the tool calls
    # Where its /v1/responses body breaks the openai SDK's `Response` type (openai==3.57.0):
    # top-level fields, or `usage.*_details.*` paths. Empty: the body validates.
    responses_sdk_errors: frozenset[str] = field(default=frozenset())
    responses_stream_error: bool = False  # a streamed /v1/responses is HTTP 500 + SSE body


SPECS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec(
            "llmock", "llmock", "0.2.2", "gpt-4o", frozenset({CHAT, RESPONSES}),
            responses_sdk_errors=frozenset({"usage.input_tokens_details.cache_write_tokens"}),
        ),
        ServerSpec(
            "mock-ai-api", "mock-ai-api", "0.1.1", "gpt-4.1",
            frozenset({CHAT, COMPLETIONS, RESPONSES}),
            honours_n=False, tool_model="gpt-4.1:mock-tool-stream",
            responses_sdk_errors=frozenset({
                "output", "parallel_tool_calls", "tool_choice", "tools",
                "usage.input_tokens_details", "usage.output_tokens_details"}),
        ),
        ServerSpec(
            "xpyd-sim", "xpyd-sim", "0.5.0", "tm-xpyd", frozenset({CHAT, COMPLETIONS}),
            key_on_gets=True, tool_choice="required",
        ),
        ServerSpec(
            "litellm", "litellm[proxy]", "1.106.12", "tm-mock",
            frozenset({CHAT, COMPLETIONS, RESPONSES}),
            key_on_gets=True, streamed_n_finishes=False, request_id_header="x-litellm-call-id",
            tool_model="tm-tools", tools_streamed=False, responses_stream_error=True,
            responses_sdk_errors=frozenset({"usage.input_tokens_details.cache_write_tokens",
                                            "usage.output_tokens_details.reasoning_tokens"}),
        ),
    )
}

LITELLM_RATE_LIMITED_MODEL = "tm-upstream-429"


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server in its own process group; `stop` kills the whole group."""

    def __init__(self, spec: ServerSpec, cmd: list[str], port: int, log_dir: Path,
                 env: dict[str, str] | None = None, ready_path: str = "/health",
                 cleanup: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{spec.name}.log"
        self._ready_path = ready_path
        self._cleanup = cleanup
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True, cwd=log_dir,
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the server answers HTTP at all (any status: a 401 is an answer too)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + self._ready_path, timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.spec.name} did not answer within {timeout:g}s:\n"
                                   + self.log_tail())
            time.sleep(0.2)

    def log_tail(self, size: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL if it lingers; then nothing of it is left."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError):  # children the leader left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def _python_cmd(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def start_llmock(log_dir: Path, *flags: str) -> ServerProcess:
    """`flags`: llmock's own faults and limits (--error-rate 429=0.1, --rpm N, ...); its
    journal of every request, with the server's times, is GET /_llmock/requests."""
    port = free_port()
    cmd = _python_cmd("import sys; from llmock.cli import app; sys.argv[0] = 'llmock'; app()",
                      "serve", "--host", "127.0.0.1", "--port", str(port),
                      "--log-level", "warning", *flags)
    return ServerProcess(SPECS["llmock"], cmd, port, log_dir)


def start_mock_ai_api(log_dir: Path) -> ServerProcess:
    """Its own `mock-ai-api` command starts the OpenAI and the Anthropic app on fixed ports;
    this is the same uvicorn command for the OpenAI app alone, on a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "app.openai_app:app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    return ServerProcess(SPECS["mock-ai-api"], cmd, port, log_dir)


def start_xpyd_sim(log_dir: Path) -> ServerProcess:
    """No simulated latency, and answers of exactly max_tokens words (eos ratio 1), so that
    streamed and unstreamed answers can be compared."""
    port = free_port()
    spec = SPECS["xpyd-sim"]
    cmd = _python_cmd("from xpyd_sim.cli import main; main()",
                      "serve", "--host", "127.0.0.1", "--port", str(port),
                      "--model", spec.model, "--prefill-delay-ms", "0",
                      "--kv-transfer-delay-ms", "0", "--decode-delay-per-token-ms", "0",
                      "--eos-min-ratio", "1", "--require-api-key", SERVER_KEY)
    return ServerProcess(spec, cmd, port, log_dir)


def litellm_venv() -> Path:
    """The LiteLLM virtualenv, built once per requirements file (its hash names it).

    Under $TMBATCH_CONFORMANCE_VENVS, default ~/.cache/tmbatch-conformance. Built under a
    lock and marked complete only at the end, so that a killed build is redone, not used.
    """
    digest = hashlib.sha256(LITELLM_REQUIREMENTS.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("TMBATCH_CONFORMANCE_VENVS")
                or Path.home() / ".cache" / "tmbatch-conformance")
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"litellm-{digest}"
    marker = venv / ".complete"
    if marker.exists():
        return venv
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        # Said on the terminal itself (pytest captures the test's own output): what is
        # fetched, how big, and where it goes.
        print(f"\ntests/servers.py: installing the LiteLLM proxy ({LITELLM_REQUIREMENTS.name}, "
              f"{LITELLM_SIZE} from PyPI) into {venv}, once; TMBATCH_CONFORMANCE_VENVS moves it",
              file=sys.__stderr__, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=300)
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
             "--disable-pip-version-check", "-r", str(LITELLM_REQUIREMENTS)],
            capture_output=True, text=True, timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError("installing tests/requirements-litellm.txt failed:\n"
                               + done.stdout[-3000:] + done.stderr[-3000:])
        marker.write_text(LITELLM_REQUIREMENTS.name + "\n")
    return venv


def _rate_limited_upstream() -> AppThread:
    """An OpenAI-shaped upstream that refuses every request with 429 + Retry-After: 1, so
    that LiteLLM relays a real provider's rate limit (its own mock 429 carries no hint)."""

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"error": {"message": "Rate limit reached for requests", "type": "requests",
                       "param": None, "code": "rate_limit_exceeded"}},
            status=429, headers={"Retry-After": "1", "retry-after-ms": "1000"},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    return AppThread(app)


# the mock model every LiteLLM config here serves (tests/test_third_party_windows.py limits it)
LITELLM_MOCK_MODEL = """\
  - model_name: tm-mock
    litellm_params:
      model: openai/tm-mock
      api_key: fake-upstream-key
      mock_response: "Hello from the LiteLLM mock."
"""
LITELLM_CONFIG = """\
model_list:
""" + LITELLM_MOCK_MODEL + """\
  - model_name: tm-tools
    litellm_params:
      model: openai/tm-tools
      api_key: fake-upstream-key
      mock_response: ""
      mock_tool_calls:
        - id: call_mock_1
          type: function
          function:
            name: get_weather
            arguments: '{{"city": "Paris"}}'
  - model_name: {rate_limited}
    litellm_params:
      model: openai/gpt-4o
      api_key: fake-upstream-key
      api_base: {upstream}/v1
      max_retries: 0
general_settings:
  master_key: {key}
router_settings:
  num_retries: 0
litellm_settings:
  num_retries: 0
"""


def start_litellm(log_dir: Path) -> ServerProcess:
    upstream = _rate_limited_upstream()
    config = log_dir / "litellm-config.yaml"
    config.write_text(LITELLM_CONFIG.format(
        rate_limited=LITELLM_RATE_LIMITED_MODEL, upstream=upstream.url(), key=SERVER_KEY))
    return litellm_process(config, log_dir, cleanup=upstream.stop)


def litellm_process(config: Path, log_dir: Path,
                    cleanup: Callable[[], None] | None = None) -> ServerProcess:
    """The LiteLLM proxy of the pinned virtualenv, started on a free port with `config`; the
    caller waits for it (`wait_ready`). Every LiteLLM here starts this way."""
    port = free_port()
    cmd = [str(litellm_venv() / "bin" / "litellm"), "--config", str(config), "--host",
           "127.0.0.1", "--port", str(port)]
    env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "NO_COLOR": "1"}
    return ServerProcess(SPECS["litellm"], cmd, port, log_dir, env=env,
                         ready_path="/health/liveliness", cleanup=cleanup)


STARTERS: dict[str, Callable[[Path], ServerProcess]] = {
    "llmock": start_llmock,
    "mock-ai-api": start_mock_ai_api,
    "xpyd-sim": start_xpyd_sim,
    "litellm": start_litellm,
}


class ServerPool:
    """Starts servers on first use, all the ones a session needs at once (they boot in
    parallel: LiteLLM alone takes several seconds), and stops every one at the end."""

    def __init__(self, log_dir: Path, wanted: list[str]) -> None:
        self.log_dir = log_dir
        self.wanted = [w for w in STARTERS if w in wanted]
        self.started: dict[str, ServerProcess] = {}
        self.ready: set[str] = set()

    def get(self, name: str) -> ServerProcess:
        if name not in self.started:
            for other in [name, *self.wanted]:
                if other not in self.started:
                    self.started[other] = STARTERS[other](self.log_dir)
        server = self.started[name]
        if name not in self.ready:
            server.wait_ready()
            self.ready.add(name)
        return server

    def stop(self) -> None:
        for server in self.started.values():
            server.stop()
