"""Real third-party daemons the fleet tests start on 127.0.0.1: `redis-server` and
`prometheus-pushgateway`, from Debian's packages (`.ci/run` installs them). Missing outside CI:
the test is skipped with the reason; in CI (`CI` set) missing is a failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is not None:
        return path
    what = f"{binary} (apt-get install -y {package})"
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is not installed")
    pytest.skip(f"{what} is not installed (CI would fail here)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Redis:
    """A redis-server of the test's own: no persistence, its files in a temp dir."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.binary = need("redis-server", "redis-server")
        self.dir = tmp
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_tcp(self.port, self.proc, "redis-server")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class Pushgateway:
    """A prometheus-pushgateway on a free port, nothing persisted."""

    def __init__(self) -> None:
        self.binary = need("prometheus-pushgateway", "prometheus-pushgateway")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Pushgateway:
        self.proc = subprocess.Popen(
            [self.binary, f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_tcp(self.port, self.proc, "prometheus-pushgateway")
        return self

    def page(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@contextlib.contextmanager
def running(daemon: Redis | Pushgateway) -> Iterator[Redis | Pushgateway]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
