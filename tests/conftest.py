"""Shared test helpers: a simulator on a real 127.0.0.1 socket in its own thread, and the
real `tmbatch` command run as a subprocess with a clean environment."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tmbatch.sim import SimConfig, start_sim

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "tm-test-key-0123456789abcdef-SECRET"


class SimThread:
    """The simulator in a thread with its own loop, so tests can drive the CLI in-process
    or as a subprocess while the server keeps serving."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.server: Any = None
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("simulator did not start")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self.server = await start_sim(self.config)
            self._ready.set()

        self.loop.run_until_complete(boot())
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return self.server.url

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=10) as r:
            return orjson.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_sim/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()

    async def _shutdown(self) -> None:
        """Handlers still waiting (a slow answer nobody reads any more) are cancelled, not
        left for the interpreter's exit to report as destroyed while pending."""
        await self.server.stop()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The opt-in markers (pyproject.toml): long soaks (`slow`) are skipped unless
    TMBATCH_SLOW=1; the conformance tests against the LiteLLM proxy (`litellm`, given here to
    every test parametrized with it) unless TMBATCH_LITELLM=1, because their first run builds
    a virtualenv of about 750 MB (tests/servers.py). Skipped with the reason, never silently."""
    slow = pytest.mark.skip(reason="a long soak: set TMBATCH_SLOW=1 to run it "
                            "(TMBATCH_SLOW=1 python -m pytest -m slow)")
    litellm = pytest.mark.skip(
        reason="the LiteLLM proxy needs a virtualenv of about 750 MB from PyPI: set "
               "TMBATCH_LITELLM=1 to build it once and run these (CI does; docs/development.md)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("server_name") == "litellm":
            item.add_marker(pytest.mark.litellm)
            if os.environ.get("TMBATCH_LITELLM") != "1":
                item.add_marker(litellm)
        if item.get_closest_marker("slow") is not None and os.environ.get("TMBATCH_SLOW") != "1":
            item.add_marker(slow)


@pytest.fixture
def sim_factory() -> Iterator[Any]:
    started: list[SimThread] = []

    def make(**kwargs: Any) -> SimThread:
        s = SimThread(SimConfig(**kwargs))
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def sim(sim_factory: Any) -> SimThread:
    return sim_factory()


class AppThread:
    """An aiohttp app on a real 127.0.0.1 socket, served from its own thread and loop."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> None:
        self.loop = asyncio.new_event_loop()
        self._app, self._ssl, self._host = app, ssl_context, host
        self._ready = threading.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._boot())
        self.loop.run_forever()

    async def _boot(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0, ssl_context=self._ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._ready.set()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self._host}:{self.port}"

    async def _shutdown(self) -> None:
        """Handlers still waiting (the one that never answers) are cancelled, not abandoned."""
        assert self._runner is not None
        await self._runner.cleanup()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., AppThread]]:
    started: list[AppThread] = []

    def start(app: web.Application, **kwargs: Any) -> AppThread:
        started.append(AppThread(app, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment minus anything that configures Tensormesh."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TENSORMESH_", "TM_CONFIG"))}
    env["HOME"] = env.get("TMBATCH_TEST_HOME", env.get("HOME", "/tmp"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def keyed_env(key: str = API_KEY, **extra: str) -> dict[str, str]:
    """`clean_env` with an inference API key: what a test's `tmbatch run` is started with."""
    return clean_env(TENSORMESH_INFERENCE_API_KEY=key, **extra)


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
    input: bytes | None = None, cwd: Path | None = None, as_plain_user: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m tmbatch ARGS` for real and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "tmbatch", *args],
        env=clean_env() if env is None else env,
        capture_output=True, timeout=timeout, input=input, cwd=cwd or ROOT,
        text=input is None, preexec_fn=drop_file_override if as_plain_user else None,
    )


def drop_file_override() -> None:
    """In the child: give up root's power to read any file (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH leave the bounding set), so file modes apply to it as to any user.
    Tests run as root in CI; this is how they can still see a permission error."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0 and os.geteuid() == 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def read_stderr_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 30) -> bytes:
    """Read a running process's piped stderr until `marker` has appeared: a bounded wait for
    a state the process reports, not a sleep. Returns what was read, which `communicate` will
    not return again."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {marker!r} on stderr: {got[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"stderr closed before {marker!r}: {got[-2000:]!r}"
            got += chunk
    return got


def wait_for_calls(sim: Any, calls: int, proc: subprocess.Popen[bytes] | None = None,
                   timeout: float = 30.0) -> None:
    """Until the simulator has received `calls` billable requests in all (from `proc`, which
    must stay alive meanwhile: its stderr is the failure's message if it died)."""
    deadline = time.monotonic() + timeout
    while sim.stats()["completion_calls"] < calls:
        if proc is not None:
            assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "the run never sent enough requests"
        time.sleep(0.01)


def kill_at_random(launch: Callable[[int], subprocess.Popen[bytes]], planned: int,
                   seed: int, window: tuple[float, float]) -> int:
    """Start runs (`launch(i)`) and SIGKILL each at a random moment in `window` seconds,
    until `planned` kills or one run finishes first; the kills made."""
    import random
    import signal

    rng = random.Random(seed)
    kills = 0
    for i in range(3 * planned):
        proc = launch(i)
        time.sleep(rng.uniform(*window))  # a random moment to kill at, not a wait
        if proc.poll() is not None:
            break  # it finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        if kills >= planned:
            break
    return kills


def journal_records(out: Path, kind: str) -> list[list[Any]]:
    """The records of one kind ("d" dispatch, "p" pause, ...) in the journal of a run in
    progress (or killed): its whole lines, as written so far."""
    return [r for r in read_jsonl_tolerant(out / "journal.jsonl")
            if isinstance(r, list) and r and r[0] == kind]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else orjson.dumps(r))
            f.write(b"\n")
    return path


def chat_line(i: int, model: str = "tm-small", **body: Any) -> dict[str, Any]:
    b = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}],
         "max_tokens": 16}
    b.update(body)
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}


def chat_answer(rid: str, content: str = "fine") -> dict[str, Any]:
    """A whole chat completion as a server of the tests' own answers it (3 + 1 tokens)."""
    return {"id": rid, "object": "chat.completion", "model": "tm-small",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """A file a live run is writing, or as kill -9 left it: a torn last line is not a record.

    Only the last line may be torn; a bad line before it is still an error.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    out = [orjson.loads(x) for x in lines[:-1] if x.strip()]
    with contextlib.suppress(orjson.JSONDecodeError):
        out.extend([orjson.loads(lines[-1])] if lines[-1].strip() else [])
    return out


def outcomes(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """custom_id -> record, for results and failures."""
    res = {r["custom_id"]: r for r in read_jsonl(out / "results.jsonl")}
    fail = {r["custom_id"]: r for r in read_jsonl(out / "failures.jsonl")}
    return res, fail
