"""The container image, built and run for real with podman (no daemon): `--help`, a `--sim` job
as a non-root uid on a host-owned volume, and SIGTERM while tmbatch is in preflight.

    TMBATCH_IMAGE=1 python -m pytest -m image

Skipped, with the reason, unless TMBATCH_IMAGE=1 (.ci/run sets it); with it set, a missing
tool is a failure, not a skip. Needs root, podman and debootstrap (Debian: `apt-get install
podman debootstrap`). The base is the Debian 12 image `docker/debian-base.sh` makes with
debootstrap (no registry needed; cached in podman's storage, so only the first run pays for
it); TMBATCH_IMAGE_BASE=IMAGE builds on another, e.g. the Dockerfile's own
python:3.11-slim-bookworm where a registry is reachable. TMBATCH_PODMAN overrides the podman
command, e.g. TMBATCH_PODMAN="podman --runtime runc" where crun refuses the host's cgroups.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.conftest import API_KEY, ROOT, AppThread, chat_answer, clean_env, read_jsonl

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("TMBATCH_IMAGE") != "1",
                       reason="builds and runs the container image: set TMBATCH_IMAGE=1 "
                              "(docs/development.md, Opt-in tests)"),
]

TAG = "localhost/tmbatch:image-test"
HOST_UID = HOST_GID = 1234
BILLABLE = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# Generous bounds for a stuck container on 2 busy cores; nothing is asserted about speed.
BUILD_TIMEOUT = 1800
RUN_TIMEOUT = 300


def _ulimits() -> list[str]:
    """This process's own limits for the container. Rootful podman asks for nofile=1048576,
    which a host whose hard limit is lower refuses ('setrlimit RLIMIT_NOFILE: Operation not
    permitted'); nproc stays at podman's own default, the kernel's pid_max."""
    args = []
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile != resource.RLIM_INFINITY:
        args += ["--ulimit", f"nofile={nofile}:{nofile}"]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    return [*args, "--ulimit", f"nproc={nproc}:{nproc}"]


@dataclass
class Image:
    podman: list[str]
    tag: str
    ulimits: list[str]

    def cmd(self, *args: str) -> list[str]:
        return [*self.podman, *args]

    def run(self, *args: str, timeout: float = RUN_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`podman run --rm [ARGS...]`: ARGS hold podman's options, then the image and its
        arguments."""
        return subprocess.run(self.cmd("run", "--rm", *self.ulimits, *args), capture_output=True,
                              text=True, timeout=timeout, env=env or clean_env())


@pytest.fixture(scope="module")
def image() -> Image:
    podman = shlex.split(os.environ.get("TMBATCH_PODMAN", "podman"))
    if shutil.which(podman[0]) is None:
        pytest.fail(f"TMBATCH_IMAGE=1 but {podman[0]} is not installed "
                    "(apt-get install podman debootstrap)")
    base = os.environ.get("TMBATCH_IMAGE_BASE")
    if not base:
        made = subprocess.run(["bash", str(ROOT / "docker" / "debian-base.sh")],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        assert made.returncode == 0, f"docker/debian-base.sh failed:\n{made.stderr[-4000:]}"
        base = made.stdout.strip().splitlines()[-1]
    ulimits = _ulimits()
    built = subprocess.run(
        [*podman, "build", "--network", "host", *ulimits, "--build-arg", f"BASE={base}",
         "-t", TAG, str(ROOT)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, (
        f"podman build failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}")
    return Image(podman, TAG, ulimits)


def test_image_config_help_and_version(image: Image) -> None:
    inspect = subprocess.run(image.cmd("image", "inspect", image.tag), capture_output=True,
                             text=True, timeout=RUN_TIMEOUT, check=True)
    config = orjson.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "tmbatch"]

    p = image.run(image.tag, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: tmbatch") and "run" in p.stdout
    p = image.run(image.tag, "--version")
    assert p.returncode == 0 and p.stdout.startswith("tmbatch "), p.stderr


def test_sim_job_as_host_uid_on_host_owned_volume(image: Image, tmp_path: Path) -> None:
    """What `docker run --user "$(id -u):$(id -g)" -v "$PWD:/work"` does: the host user's own
    directory (0700, owned by that user, not by the image's 10001) mounted as /work."""
    vol = tmp_path / "vol"
    vol.mkdir(mode=0o700)
    shutil.copy(ROOT / "samples" / "chat.jsonl", vol / "chat.jsonl")
    for path in (vol, vol / "chat.jsonl"):
        os.chown(path, HOST_UID, HOST_GID)

    p = image.run("--user", f"{HOST_UID}:{HOST_GID}", "-v", f"{vol}:/work", image.tag,
                  "run", "chat.jsonl", "-o", "out/", "--sim")
    assert p.returncode == 0, p.stderr
    out = vol / "out"
    results = read_jsonl(out / "results.jsonl")
    assert sorted(r["line"] for r in results) == list(range(1, 11))
    assert all(r["response"]["status_code"] == 200 for r in results)
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["counts"]["succeeded"] == 10 and summary["counts"]["failed"] == 0, summary
    for path in (out, *out.iterdir()):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_GID), path


def test_no_pip_or_setuptools_in_the_runtime_image(image: Image) -> None:
    """The runtime stage holds neither pip nor setuptools (nor wheel), in tmbatch's virtualenv
    or in the base's Python: nothing in the image can install a package."""
    probe = ("import importlib.util as u; "
             "print([m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)])")
    # The virtualenv's python, then the base interpreter its python3 link resolves to.
    for script in ('exec python3 -c "$0"',
                   'exec "$(readlink -f /opt/tmbatch/venv/bin/python3)" -c "$0"'):
        p = image.run("--entrypoint", "sh", image.tag, "-c", script, probe)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "[]", (script, p.stdout)


def test_home_is_writable_for_any_uid(image: Image) -> None:
    probe = ("import os, pathlib; p = pathlib.Path(os.environ['HOME'], 'probe'); "
             "p.write_text('x'); print(p)")
    p = image.run("--user", f"{HOST_UID}:{HOST_GID}", "--entrypoint", "python3", image.tag,
                  "-c", probe)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "/home/tmbatch/probe"


class HangingHealth:
    """A Tensormesh stand-in on the host: /health never answers (so tmbatch sits in
    preflight), every other route does, and billable POSTs are counted. If tmbatch ignored
    SIGTERM, preflight would give up on /health and the chats would be sent and counted."""

    def __init__(self) -> None:
        self.health_seen = threading.Event()
        self.billable = 0
        self.lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", answer({"version": "test"}))
        app.router.add_get("/v1/models", answer(
            {"object": "list", "data": [{"id": "tm-small", "object": "model"}]}))
        app.router.add_post("/tokenize", answer(
            {"tokens": [1, 2, 3], "count": 3, "max_model_len": 4096}))
        for route in BILLABLE:
            app.router.add_post(route, self.billed)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        self.health_seen.set()
        await asyncio.Event().wait()  # never set: cancelled when the server shuts down
        raise AssertionError("unreachable")

    async def billed(self, request: web.Request) -> web.Response:
        await request.read()
        with self.lock:
            self.billable += 1
        return web.json_response(chat_answer("chatcmpl-1", "ok"))


def answer(body: dict[str, object]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(_request: web.Request) -> web.Response:
        return web.json_response(body)

    return handler


@pytest.fixture
def hanging_server() -> Iterator[tuple[HangingHealth, AppThread]]:
    server = HangingHealth()
    thread = AppThread(server.app())
    yield server, thread
    thread.stop()


def test_sigterm_in_preflight_exits_143_and_bills_nothing(
        image: Image, hanging_server: tuple[HangingHealth, AppThread]) -> None:
    """What Kubernetes does to a pod that is still starting: SIGTERM to the container's PID 1.
    tini passes it to tmbatch, which must stop before anything billable is sent, say so, and
    exit 143."""
    server, thread = hanging_server
    name = f"tmbatch-sigterm-{uuid.uuid4().hex[:12]}"
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)  # passed by name, never by value
    proc = subprocess.Popen(
        image.cmd("run", "--rm", "--name", name, "--network", "host", *image.ulimits,
                  "-e", "TENSORMESH_INFERENCE_API_KEY", image.tag,
                  "run", "/opt/tmbatch/samples/chat.jsonl", "-o", "out",
                  "--base-url", thread.url(), "--log-format", "json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not server.health_seen.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                subprocess.run(image.cmd("kill", "--signal", "KILL", name), capture_output=True,
                               timeout=RUN_TIMEOUT)
                _, err = proc.communicate()
                pytest.fail(f"tmbatch never reached preflight's GET /health (exit "
                            f"{proc.returncode}):\n{err[-4000:]}")
        top = subprocess.run(image.cmd("top", name, "pid", "args"), capture_output=True,
                             text=True, timeout=RUN_TIMEOUT)
        assert top.returncode == 0, top.stderr
        pid1 = [ln for ln in top.stdout.splitlines()[1:] if ln.split()[0] == "1"]
        assert pid1 and "tini" in pid1[0], top.stdout  # the signal goes through an init

        subprocess.run(image.cmd("kill", "--signal", "TERM", name), check=True,
                       capture_output=True, timeout=RUN_TIMEOUT)
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            subprocess.run(image.cmd("kill", "--signal", "KILL", name), capture_output=True,
                           timeout=RUN_TIMEOUT)
            out, err = proc.communicate()
            pytest.fail(f"tmbatch did not stop on SIGTERM:\n{err[-4000:]}")
    finally:
        subprocess.run(image.cmd("rm", "--force", "--ignore", name), capture_output=True,
                       timeout=RUN_TIMEOUT)

    assert server.billable == 0, f"{server.billable} billable requests sent after SIGTERM"
    assert API_KEY not in out + err
    assert proc.returncode == 143, f"exit {proc.returncode}:\n{err[-4000:]}"
    # Honoured, not merely killed: tmbatch itself reports the stop and its exit code.
    events = [orjson.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    assert any(e.get("exit_code") == 143 for e in events), (
        "exit 143 without a word from tmbatch (killed by the signal's default action, not "
        f"handled):\n{err[-4000:]}")
