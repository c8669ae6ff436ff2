"""What group commit costs: a run whose output is a bucket against the same run to a local
directory, at a fixed offered rate on the simulator.

    python bench/remote_bench.py --requests 10000 --rpm 60000 --repeats 3

Both runs send `--requests` chat lines to the in-process simulator (`--sim`, with
`--sim-latency`) paced at `--rpm` (60000 = 1,000 req/s) with `--concurrency`; the remote run
writes to `s3://bench/out-N/` on a moto server started here (a subprocess on 127.0.0.1,
reached through AWS_ENDPOINT_URL as MinIO or R2 would be), each with a fresh working
directory. The figure is each run's `requests_per_second` from its summary.json (the
remote's read from the bucket), the median of `--repeats`, and the ratio remote / local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def write_input(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        for i in range(n):
            body = {"model": "tm-small", "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"question {i}"}]}
            f.write(orjson.dumps({"custom_id": f"q{i}", "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + b"\n")


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


def run(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "tmbatch", *args], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"tmbatch {' '.join(args)} failed ({r.returncode}): {r.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--rpm", type=float, default=60000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    proc, endpoint = start_moto()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": endpoint,
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")
    fs.mkdir("bench")
    common = ["-q", "--sim", "--sim-latency", str(a.latency), "--rpm", str(a.rpm),
              "--concurrency", str(a.concurrency), "--no-adaptive"]
    local, remote = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inp = Path(tmp) / "in.jsonl"
            write_input(inp, a.requests)
            for r in range(a.repeats):
                out = Path(tmp) / f"local-{r}"
                run(["run", str(inp), "-o", str(out), *common], env)
                local.append(orjson.loads((out / "summary.json").read_bytes())["this_run"]
                             ["requests_per_second"])
                url = f"s3://bench/out-{r}"
                run(["run", str(inp), "-o", url, "--work-dir", f"{tmp}/w{r}", *common], env)
                s = orjson.loads(fs.cat(f"bench/out-{r}/summary.json"))
                remote.append(s["this_run"]["requests_per_second"])
                print(f"repeat {r}: local {local[-1]:.0f} req/s, bucket {remote[-1]:.0f} "
                      f"req/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    lo, re = statistics.median(local), statistics.median(remote)
    print(f"{a.requests} requests at --rpm {a.rpm:g} (offered {a.rpm / 60:.0f} req/s), "
          f"concurrency {a.concurrency}, sim latency {a.latency:g}s, median of {a.repeats}:")
    print(f"  local directory: {lo:.0f} req/s")
    print(f"  s3:// (moto), group commit: {re:.0f} req/s = {100 * re / lo:.1f} % of local")


if __name__ == "__main__":
    main()
