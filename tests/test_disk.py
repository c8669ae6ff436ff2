"""A disk that fills up mid-run: stop admitting work, keep what is written consistent,
exit 4 with the reason, and resume correctly once there is space again.

Two ways to make write() fail, both real: a 200 KiB tmpfs (ENOSPC; needs root and
mount, else skipped), and RLIMIT_FSIZE in the child (EFBIG; works anywhere, with
SIGXFSZ ignored so the write fails instead of killing the process).
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    API_KEY,
    chat_line,
    clean_env,
    read_jsonl,
    read_jsonl_tolerant,
    write_jsonl,
)
from tmbatch.base.files import FAILURES, JOURNAL, RESULTS
from tmbatch.journal.compact import LineStates
from tmbatch.journal.records import FailureRecord, Response, ResultRecord
from tmbatch.journal.writer import Writer, WriterError
from tmbatch.policy import Outcome

LINES = 400
PROMPT = "tell me about disks " * 20  # ~400 chars: ~1 KiB a result line


def run(args: list[str],
        preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tmbatch", *args], capture_output=True, text=True, timeout=120,
        env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY), preexec_fn=preexec,
    )


def limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def make_input(tmp_path: Path) -> Path:
    rows = [chat_line(i, messages=[{"role": "user", "content": f"{i} {PROMPT}"}])
            for i in range(LINES)]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def check_failed_run(proc: subprocess.CompletedProcess[str], reason: str, out: Path) -> None:
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert reason in proc.stderr, proc.stderr
    assert "resume" in proc.stderr or "run the same command again" in proc.stderr, proc.stderr
    done = read_jsonl_tolerant(out / "results.jsonl")
    assert 0 < len(done) < LINES, "the disk filled mid-run, not before or after it"
    # `done:` counts only outcomes that were written, never ones lost with the disk
    said = re.search(r"done: \d+ lines: (\d+) succeeded, (\d+) failed", proc.stderr)
    assert said is not None, proc.stderr
    failed = read_jsonl_tolerant(out / "failures.jsonl") if (out / "failures.jsonl").exists() \
        else []
    assert int(said[1]) <= len(done) and int(said[2]) <= len(failed), (said[0], len(done))


def check_still_full(args: list[str], out: Path) -> None:
    """A resume while the disk is still full: exit 4 again (no traceback, no exit 70), no
    empty `*.torn-*` side file left behind, and nothing already written lost."""
    before = {n: (out / n).read_bytes() for n in ("results.jsonl", "failures.jsonl")}
    for _ in range(2):
        proc = run(args)
        assert proc.returncode == 4, proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        assert "No space left on device" in proc.stderr, proc.stderr
        assert sorted(p.name for p in out.iterdir() if ".torn-" in p.name) == []
        for name, data in before.items():
            # kept whole: at most a torn tail is moved aside once there is space
            assert (out / name).read_bytes().startswith(data.rpartition(b"\n")[0]), name


def check_resumed(proc: subprocess.CompletedProcess[str], out: Path, sim: Any) -> None:
    """Every line ends with exactly one outcome; no key was processed twice."""
    assert proc.returncode in (0, 1), proc.stderr
    results = read_jsonl(out / "results.jsonl")
    failures = read_jsonl(out / "failures.jsonl")
    lines = sorted([r["line"] for r in results] + [f["line"] for f in failures])
    assert lines == list(range(1, LINES + 1))
    # only a request whose answer was lost with the disk may end ambiguous, never re-sent
    assert {f["error"]["code"] for f in failures} <= {"unknown_outcome_after_crash"}
    stats = sim.stats()
    assert stats["duplicates"] == 0, stats["duplicate_keys"]
    assert stats["processed_keys"] == stats["processed_total"]
    assert len(results) + len(failures) == LINES
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["counts"]["with_outcome"] == LINES


def test_disk_full_enospc_then_resume(small_tmpfs: Path, tmp_path: Path,
                                      sim_factory: Any) -> None:
    sim = sim_factory()
    out = small_tmpfs / "out"
    args = ["run", str(make_input(tmp_path)), "-o", str(out), "--base-url", sim.url,
            "--no-preflight", "-c", "8"]
    check_failed_run(run(args), "No space left on device", out)
    check_still_full(args, out)
    remount = subprocess.run(["mount", "-o", "remount,size=20m", str(small_tmpfs)],
                             capture_output=True, text=True)
    assert remount.returncode == 0, remount.stderr
    check_resumed(run(args), out, sim)


def test_file_size_limit_efbig_then_resume(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory()
    out = tmp_path / "out"
    args = ["run", str(make_input(tmp_path)), "-o", str(out), "--base-url", sim.url,
            "--no-preflight", "-c", "8"]
    check_failed_run(run(args, limit_file_size(120_000)), "File too large", out)
    check_resumed(run(args), out, sim)


@pytest.mark.parametrize("breaks", ["journal", "results"])
def test_a_failed_write_never_counts_the_outcomes_queued_behind_it(tmp_path: Path,
                                                                   breaks: str) -> None:
    """Answers of one loop tick are queued and written at its end. When a write fails first
    (the next dispatch record's, to the journal, or the results file's own), the queued
    answers are not on disk: their lines must not count as succeeded or failed, or `done:`
    says more than results.jsonl holds (CI, 2026-12-06: 332 succeeded, 328 on disk). The
    failing file is /dev/full: a real write(2) that fails with ENOSPC."""
    out = tmp_path / "out"
    out.mkdir()
    states = LineStates()
    writer = Writer(out, states, fsync="never")
    name = {"journal": JOURNAL, "results": RESULTS}[breaks]

    async def tick() -> None:
        writer.dispatch(1, 1, "a")
        writer.dispatch(2, 1, "b")
        writer.result(ResultRecord("batch_req_a", "a", 1, Response(200, "r", {"x": 1})))
        writer.failure(FailureRecord.of("j0b", 2, "b", Outcome.PERMANENT, "http_400", "bad", 1))
        os.close(writer._fds[name])
        writer._fds[name] = os.open("/dev/full", os.O_WRONLY)
        with pytest.raises(WriterError, match="No space left on device"):
            if breaks == "journal":
                writer.dispatch(3, 1, "c")  # out at once, ahead of the queued outcomes
            else:
                writer.flush()

    asyncio.run(tick())
    assert [states.outcome(line) for line in (1, 2)] == [None, None]  # in flight, not done
    assert (out / RESULTS).read_bytes() == b"" and (out / FAILURES).read_bytes() == b""
    with pytest.raises(WriterError):
        writer.close()
