"""A real S3 API for the tests: moto in server mode (`moto_server` on a random port of
127.0.0.1, a subprocess), reached over HTTP through AWS_ENDPOINT_URL the way a user points
tmbatch at MinIO or R2."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MOTO = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
    "moto_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", name="s3")
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server for the module; the environment that points at it."""
    if MOTO is None:
        pytest.fail("moto_server not found: pip install 'moto[server]' (the test extra)")
    port = free_port()
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # wait for the server's state (it answers), not for a time
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, "moto_server exited"
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bucket(env: dict[str, str], name: str = "bkt") -> Any:
    """An s3fs filesystem on the moto server, with bucket `name` made."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="test", secret="test",
                           skip_instance_cache=True)
    if not fs.exists(name):
        fs.mkdir(name)
    return fs
