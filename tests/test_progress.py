"""The progress bar in a real terminal (a pty 80 columns wide), the overall count after a
resume, and the warning for a --tpm smaller than one request."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from tests.conftest import ROOT, chat_line, clean_env, write_jsonl
from tmbatch.base.logs import REDACT, setup_logging
from tmbatch.inputs.reader import Request
from tmbatch.journal.compact import LineStates
from tmbatch.limits import Admission, estimate_tokens
from tmbatch.policy import Outcome
from tmbatch.run.config import RunConfig
from tmbatch.run.progress import Progress, RecentRate, eta, eta_text, layout
from tmbatch.run.progress import line as line_of
from tmbatch.run.summary import RunStats
from tmbatch.sim.virtual import run_virtual

BLOCKS = "█▏▎▍▌▋▊▉"


def run_in_pty(args: list[str], cols: int = 80, timeout: float = 120) -> tuple[int, str]:
    """`python -m tmbatch ARGS` with stderr on a real terminal of `cols` columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "tmbatch", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=clean_env(), cwd=ROOT)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=timeout)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def segments(screen: str) -> list[str]:
    """What each carriage return or newline starts: a frame of the bar, or a log line."""
    return [s for s in re.split(r"[\r\n]", screen) if s.strip()]


def test_bar_at_80_columns_has_room_and_log_lines_do_not_cut_into_it(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(300)])
    # the server allows 150 req/s, the client starts at 8 in flight of 10 ms: 429s follow,
    # and with them "rate limited" log lines while the bar is drawn
    code, screen = run_in_pty(["run", str(inp), "-o", str(tmp_path / "out"), "--sim",
                               "--sim-rate-limit", "150", "--sim-latency", "0.01", "-c", "8"])
    assert code == 0, screen
    parts = segments(screen)
    logs = [p for p in parts if "tmbatch: INFO: rate limited" in p]
    frames = [p for p in parts if "%|" in p]
    assert logs and frames, screen
    for line in logs:  # a log line starts at column 0 and no bar is drawn into it
        assert line.startswith("tmbatch: INFO: rate limited") and "%|" not in line, line
    for frame in frames:
        assert len(frame) <= 80, frame
    last = frames[-1]
    assert "300/300" in last and last.startswith("100%|")
    assert sum(last.count(c) for c in BLOCKS) >= 30, last  # tqdm's default leaves 1 cell


def test_layout_shrinks_the_statistics_not_the_bar() -> None:
    snap = {"failed": 3, "in_flight": 64, "tok_per_s": 4510.1, "total": 1_000_000}
    for width, cells in ((80, 30), (120, 30)):
        fmt, postfix = layout(width, snap)
        text = tqdm.format_meter(500_000, 1_000_000, 12.0, ncols=width, bar_format=fmt,
                                 postfix=postfix, unit="req")
        assert len(text) <= width and "3 failed" in text
        assert sum(text.count(c) for c in BLOCKS) + text.count(" ") >= cells, text
    assert "tok/s" in layout(120, snap)[1] and "in flight" in layout(120, snap)[1]
    fmt, _ = layout(40, snap)
    assert "{bar}" not in fmt  # too narrow for a bar: the numbers alone
    assert "{percentage" not in layout(80, {**snap, "total": None})[0]  # not counted yet


def test_a_resume_counts_the_whole_job_from_the_line_states() -> None:
    """After a resume the line counts the job's failures, not this run's alone: 30 lines
    failed before it and 22 in it are 52 failed (the issue saw "22 failed" here)."""
    states = LineStates()
    for line in range(1, 41):
        states.set(line, Outcome.OK.policy.state)
    for line in range(41, 71):
        states.set(line, Outcome.PERMANENT.policy.state)
    stats = RunStats()
    progress = Progress.for_run(stats, states, RunConfig("in.jsonl", Path("out")), tty=False)
    progress.set_total(200)
    for line in range(71, 80):  # this run: 9 succeed, 22 fail (the writer sets the states)
        states.set(line, Outcome.OK.policy.state)
    for line in range(80, 102):
        states.set(line, Outcome.REJECTED.policy.state)
    stats.ok, stats.failed[Outcome.REJECTED] = 9, 22
    snap = progress.snapshot(fresh=True)
    assert (snap["done"], snap["done_before"], snap["done_this_run"], snap["total"]) == \
        (101, 70, 31, 200)
    assert (snap["succeeded"], snap["failed"], snap["failed_this_run"]) == (49, 52, 22)
    text = line_of(snap)
    assert "101/200 done (70 before this run), 52 failed (22 this run)" in text, text
    resend = RunConfig("in.jsonl", Path("out"), only_lines={3, 7})
    snap = Progress.for_run(RunStats(), states, resend, tty=False).snapshot()
    assert (snap["done"], snap["total"]) == (0, 2)  # a resend counts its own lines


def test_eta_follows_the_pace_and_the_open_pause() -> None:
    assert eta(0, None) == 0.0
    assert eta(22, None) is None  # nothing to go by: unknown, not a guess
    assert eta(22, 10.0) == pytest.approx(2.2)
    # the run averaged 10/s but admission now holds it to 0.1/s: 220 s, not 2.2 s
    assert eta(22, 10.0, pace=0.1) == pytest.approx(220.0)
    assert eta(22, None, pace=0.1) == pytest.approx(220.0)
    assert eta(22, 0.05, pace=0.1) == pytest.approx(440.0)  # slower than the pace: the rate
    assert eta(22, 10.0, pause_left=30.0) == pytest.approx(32.2)  # a Retry-After open now
    assert eta(22, 0.0) is None  # stalled: no answer in the window
    assert [eta_text(s) for s in (None, 4.4, 220, 7322)] == ["?", "4s", "3m40s", "2h02m"]


def test_the_recent_rate_forgets_a_fast_start() -> None:
    """100 lines in the first 10 s, then one every 10 s: a minute later the rate is ~0.1/s
    (the run's average would still say ~1/s and an ETA ten times too short)."""
    now = [0.0]
    rate = RecentRate(window=60.0, clock=lambda: now[0])
    done = 0
    for t in range(1, 11):
        now[0], done = float(t), done + 10
        rate.add(done)
    for t in range(20, 200, 10):
        now[0], done = float(t), done + 1
        last = rate.add(done)
    assert last == pytest.approx(0.1, rel=0.2)
    assert done / now[0] > 0.5  # what the whole-run average would have said


def test_a_resume_in_a_terminal_shows_the_whole_job(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(40)])
    out = tmp_path / "out"
    code, _ = run_in_pty(["run", str(inp), "-o", str(out), "--sim"])
    assert code == 0
    code, screen = run_in_pty(["run", str(inp), "-o", str(out), "--sim"])
    assert code == 0
    frames = [p for p in segments(screen) if p.endswith("in flight")]
    assert frames and frames[-1].startswith("40 done"), screen  # not "0" of nothing left


def test_log_lines_through_the_bar_keep_the_key_out(capsys: Any) -> None:
    async def main() -> None:
        setup_logging(0, False)
        REDACT.secrets.add("sk-progress-secret-0000")
        try:
            progress = Progress(RunStats(), 10, tty=True)
            progress.start()
            logging.getLogger("tmbatch").warning("oops sk-progress-secret-0000")
            await progress.stop()
        finally:
            REDACT.secrets.clear()

    asyncio.run(main())
    err = capsys.readouterr().err
    assert "oops [redacted]" in err and "sk-progress-secret" not in err
    handlers = logging.getLogger("tmbatch").handlers
    assert [type(h).__name__ for h in handlers] == ["StreamHandler"]  # put back after the bar


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tpm_below_one_request_warns_at_the_first_request() -> None:
    line = Request(1, "r1", "/v1/chat/completions",
                   {"model": "m", "messages": [{"role": "user", "content": "x" * 40}],
                    "max_tokens": 290})
    tokens = estimate_tokens(line.body, generates=True)

    async def admit(adm: Admission) -> None:
        async def enter() -> None:
            async with adm.permit(line):
                pass

        task = asyncio.ensure_future(enter())
        await asyncio.sleep(0.05)  # virtual: the warning comes before the long wait for the budget
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    seen = Records()
    logging.getLogger("tmbatch").addHandler(seen)
    try:
        run_virtual(lambda: admit(Admission(tpm=100_000)))
        assert not any("--tpm" in m for m in seen.messages)
        adm = Admission(tpm=30)
        run_virtual(lambda: admit(adm))
        run_virtual(lambda: admit(adm))
    finally:
        logging.getLogger("tmbatch").removeHandler(seen)
    warned = [m for m in seen.messages if "--tpm 30 is below" in m]
    assert len(warned) == 1  # once per run, not once per request
    assert f"{tokens} tokens" in warned[0] and f"{tokens / 30:.1f} minutes" in warned[0]


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    yield
    setup_logging(0, False)
