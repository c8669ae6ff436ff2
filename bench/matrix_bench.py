"""The scenario matrix over real sockets: every row of `tmbatch.sim.scenarios.SCENARIOS`, with
`tmbatch sim` and `tmbatch run` as two processes on 127.0.0.1.

    python bench/matrix_bench.py                           # every row, 3 repeats (~35-40 min)
    python bench/matrix_bench.py --quick                   # every row, 1 repeat (~12 min)
    python bench/matrix_bench.py --quick --rows random-10-seconds,bucket-ms,capacity
    python bench/matrix_bench.py --quick --rows bucket-50-1-seconds    # a held-out row
    python bench/matrix_bench.py --list                    # the rows and their length
    python bench/matrix_bench.py --tmbatch-cmd "/other/checkout/.venv/bin/python -m tmbatch"
    # -> bench/results/<--name>.md and .json (default name: matrix), the table also on stdout

`python -m tmbatch.sim.virtual` runs the same rows in virtual time, in-process; this runs them
in wall time over HTTP, so what the socket, the event loop and two processes add (or take) is
in the figures. Each run of a row (repeat r = 0, 1, ...):

1. `tmbatch sim` of this tree, its own process on a free port, with `row.sim_flags()`,
   `--sim-seed r`, `--sim-grace 0.02` (an arrival inside an announced Retry-After window counts
   from 20 ms after the refusal left: a request sent once it came back, not one on the wire)
   and `--sim-api-key`; reset (`POST /_sim/reset`) just before the client starts, so the
   limits' epoch (fixed windows, rate schedule) is where the virtual run has it, at the start.
2. The input: `row.lines` chat lines, line i naming `row.models[i % len(row.models)]`, each
   prompt sized so the simulator's own usage (prompt characters / 4 + 1, plus the echoed
   words) is exactly TOKENS_PER_REQUEST = 100 tokens, checked with the simulator's
   `build_answer`; lines of `row.refuse_models` carry the body hook `"sim": {"status": 429}`.
3. `tmbatch run INPUT -o OUT --base-url URL --api-key-file KEYFILE --no-preflight
   --log-format json --progress-interval 3600 --job-id virtual <row.client_flags()>` (the
   optional flags only when the tmbatch under test knows them), run outside the source tree;
   stopped (SIGTERM) after the row's expected length x 3 + 60 s. `--job-id virtual` and the
   custom ids r1, r2, ... give every line the Idempotency-Key it has in the virtual run, so
   the simulator's refusals at random (drawn per seed, key and arrival) are the virtual run's
   for the same seed: the random rows refuse the same requests the same number of times.
4. `GET /_sim/stats`: the arrival log of the billable routes becomes `Arrival`s and
   `tmbatch.sim.scenarios.score(row, arrivals, wall, refusal_wait)` gives the share; its
   module doc says how each kind of row is scored. The inputs, from the real simulator:

   at          arrival time (the sim's monotonic clock) minus the limits' epoch (`epoch` in the
               stats, the reset): the fixed-window and schedule scores count windows and
               schedule steps from the server's epoch, as the virtual server's clock does;
               every other score only takes differences.
   status      as logged; refused = 429 + 503.
   tokens      100 per answer (the prompts are sized for it; the client's summary tokens /
               succeeded is reported as `tokens_per_answer` to prove it).
   finished    capacity rows only: the simulator logs arrivals, not finishes, so the latest
               accepted arrival gets the capacity stats' `last_finish` (the score takes only
               the latest finish); everything else None.
   wall        first arrival to the last answer (what the virtual run measures): an accepted
               arrival + the row's latency, a refusal at once, `last_finish` when there is a
               capacity. The share to the client's exit is in the JSON too (`share_to_exit`).
   refusal_wait  the pause the random refusals announce, from the simulator's own hint
               functions: 1.0 s (Retry-After: 1) for the hinted rows, 0 for `none`.

   The quota row's hook would answer 429 with the row's Retry-After (the default format,
   `seconds`: "Retry-After: 1"); a per-model quota gives no hint, so a row with refuse_models
   and no retry_after_format of its own gets `--sim-retry-after-format none` (it has no other
   refusal whose hint that could change).
5. The verdict is `tmbatch.sim.virtual.judge` on the run: share >= band.share, refusals <=
   band.refused x accepted, no arrival inside an announced window (`retry_after_violations`),
   exactly band.rejected lines whose failure class is `rejected` (failures.jsonl; the summary's
   count is cross-checked) and no other failure; here also every line accounted for and the
   client not stopped by the timeout.

Where a row cannot be the virtual one:

- tokens: the simulator books an answer's usage on the tokens budget when the request is
  admitted (`handlers._charge_usage`, before the latency), the virtual server when the answer
  is done (20 ms later), so a burst arriving together is admitted once here and many times
  there; the virtual run with the charge moved to admission gives this run's ~1,900
  refusals (the virtual row: 29).
- the client starts ~0.2 s after the limits' epoch (process start-up; 0 in virtual time):
  the first fixed window is that much shorter, and the schedule changes that much earlier
  into the run.
- HTTP-date hints are real wall-clock dates (the virtual server draws the clock's phase).

Each run's arrival log is kept in --data as ROW-rN.arrivals.json ([seconds after the epoch,
status, model]), beside the client's ROW-rN.stdout and ROW-rN.stderr (with
--tmbatch-args=-v, its pace decisions). Per row the median run by share is reported (with
min-max over the repeats), and for each run the client's CPU seconds (user + sys of the
tmbatch process, os.wait4) and wall (spawn to exit).

How long (2 cores, Xeon, Python 3.11): the rows' ideal lengths add up to 11.7 minutes a repeat
(window-30-15 150 s, tokens 110 s, random-30-seconds 80 s, window-40-4 40 s, halved 37 s,
quota 30 s, the rest 30 s or less; `--list` shows them); a client that misses its share runs
longer and one that beats a random row's budget shorter, and each run adds ~0.5 s of start-up.
Measured: --quick (every row once) 11 min 40 s and 12 min 45 s: --repeats 3 takes 35-40 min.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from heldout import banded, mixed  # noqa: E402
from run_bench import Sim, fmt  # noqa: E402

from tmbatch.sim.bodies import build_answer, prompt_text  # noqa: E402
from tmbatch.sim.config import BILLABLE_ROUTES, ROUTE_CHAT, SimConfig  # noqa: E402
from tmbatch.sim.gate import hint_headers, hint_seconds  # noqa: E402
from tmbatch.sim.scenarios import (  # noqa: E402
    BY_NAME,
    SCENARIOS,
    TOKENS_PER_REQUEST,
    Arrival,
    Scenario,
    _schedule_time,
    score,
)
from tmbatch.sim.state import new_state  # noqa: E402
from tmbatch.sim.virtual import RowResult, judge  # noqa: E402

PY = sys.executable
GRACE = 0.02  # seconds after a refusal left in which an arrival was already on the wire
KEY = "tm-matrix-bench-key"
MAX_TOKENS = 50  # as the virtual run's lines
# The virtual run's job id: with custom ids r1, r2, ... as there, every line has the virtual
# run's Idempotency-Key, so --sim-seed r refuses at random exactly the arrivals seed r does.
JOB_ID = "virtual"
TOPICS = ("the moon", "tea", "rivers", "owls", "granite", "jazz", "tides", "bread")
FILLER = ("Some context follows, to give the prompt the length of a real one. ") * 8
OPTIONAL_FLAGS = ("--log-format", "--progress-interval", "--no-preflight")


# -- the row as processes ------------------------------------------------------------------


def refusal_wait(sc: Scenario) -> float:
    """The pause a random refusal announces, from the simulator's own hint functions (as the
    virtual server computes it): the configured or 1-second Retry-After, 0 with no hint."""
    cfg = SimConfig(**sc.server)
    return hint_headers(cfg.retry_after_format, hint_seconds(cfg, 1.0), 0.0)[1] or 0.0


def sim_flags(sc: Scenario, seed: int) -> tuple[list[str], list[str]]:
    """The simulator's flags for one run, and what could not be made like the virtual row."""
    flags = [*sc.sim_flags(), "--sim-seed", str(seed), "--sim-grace", f"{GRACE:g}",
             "--sim-api-key", KEY]
    notes = []
    served = SimConfig().models
    if any(m not in served for m in sc.models):
        flags += ["--sim-models", ",".join(dict.fromkeys(sc.models))]
    if sc.refuse_models:
        fmt_ = sc.server.get("retry_after_format")
        if fmt_ is None:  # the hook's 429 would carry the default "Retry-After: 1"
            flags += ["--sim-retry-after-format", "none"]
        elif fmt_ != "none":
            notes.append(f"the refused models' 429s carry the row's {fmt_} hint (the body "
                         "hook answers with the server's hint format)")
        if any(k in sc.server for k in ("rate_limit", "window_limit", "tpm_limit")):
            notes.append("the refused models' requests pass the limits first (the hook is "
                         "read after admission), unlike the virtual server's")
    return flags, notes


def prompt_for(i: int) -> str:
    """A prompt whose answer the simulator bills exactly TOKENS_PER_REQUEST tokens: the answer
    echoes the first 60 characters (a fixed number of words), the length makes the rest."""
    text = f"Tell me one fact about {TOPICS[i % len(TOPICS)]} (line {i}). " + FILLER
    body = {"model": "m", "messages": [{"role": "user", "content": text[:64]}],
            "max_tokens": MAX_TOKENS}
    echo_words = usage_of(body) - (64 // 4 + 1)
    return text[:4 * (TOKENS_PER_REQUEST - 1 - echo_words)]


def usage_of(body: dict[str, Any]) -> int:
    """The tokens the simulator charges for this chat body (its own build_answer)."""
    prompt = prompt_text(ROUTE_CHAT, body)
    assert not isinstance(prompt, str), prompt
    answer = build_answer(new_state(SimConfig()), ROUTE_CHAT, body, body["model"], *prompt)
    return answer.prompt_tokens + answer.completion_tokens


def write_input(path: Path, sc: Scenario) -> Path:
    """row.lines chat lines, models in turn, the refused models' lines with the 429 hook."""
    out = []
    for i in range(sc.lines):
        model = sc.models[i % len(sc.models)]
        body: dict[str, Any] = {"model": model,
                                "messages": [{"role": "user", "content": prompt_for(i + 1)}],
                                "max_tokens": MAX_TOKENS}
        if usage_of(body) != TOKENS_PER_REQUEST:
            raise AssertionError(f"line {i + 1} is billed {usage_of(body)} tokens, not "
                                 f"{TOKENS_PER_REQUEST}")
        if model in sc.refuse_models:
            body["sim"] = {"status": 429}
        out.append(orjson.dumps({"custom_id": f"r{i + 1}", "method": "POST",
                                 "url": ROUTE_CHAT, "body": body}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def expected_seconds(sc: Scenario) -> float:
    """How long a client that got its share exactly (100 %) takes: the run's timeout is this
    x 3 + 60 s, and --list shows it."""
    s = sc.server
    latency = s.get("latency", 0.0)
    if sc.score == "random":
        return (sc.lines / sc.concurrency * latency
                + 1.25 * sc.lines * s["refuse_fraction"] * refusal_wait(sc) + 5.0)
    if sc.score == "capacity":
        return sc.lines * latency / s["capacity"]
    if sc.score == "quota":
        return sc.patience + sc.lines / sc.concurrency * latency
    if sc.score == "window":
        return math.ceil(sc.lines / s["window_limit"]) * s["window_seconds"]
    if sc.score == "tokens":
        tokens = sc.lines * TOKENS_PER_REQUEST - s.get("tpm_burst", 0.0)
        return max(0.0, tokens) / (s["tpm_limit"] / 60.0)
    burst = s.get("rate_burst") or s["rate_limit"]
    if sc.score == "schedule":
        return _schedule_time(sc.lines, burst, s["rate_limit"], s["rate_schedule"], 0.0)
    groups = len(set(sc.models)) if s.get("limit_scope") == "model" else 1
    return max(0.0, sc.lines - burst * groups) / (s["rate_limit"] * groups)


class Client:
    """How to run the tmbatch under test, and which flags it knows."""

    def __init__(self, cmd: list[str], extra: list[str]) -> None:
        self.cmd, self.extra = cmd, extra
        text = subprocess.run([*cmd, "run", "--help"], capture_output=True, text=True,
                              cwd="/").stdout
        self.known = set(re.findall(r"--[a-z][a-z-]+", text))
        version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, cwd="/")
        self.version = (version.stdout or version.stderr).strip()

    def command(self, sc: Scenario, inp: Path, out: Path, url: str,
                keyfile: Path) -> tuple[list[str], list[str]]:
        """The command line, and the row's flags the tmbatch under test does not know."""
        row = sc.client_flags()
        missing = [f for f in row if f.startswith("--") and f not in self.known]
        cmd = [*self.cmd, "run", str(inp), "-o", str(out), "--base-url", url,
               "--api-key-file", str(keyfile)]
        if "--no-preflight" in self.known:
            cmd.append("--no-preflight")
        if "--log-format" in self.known:
            cmd += ["--log-format", "json"]
        if "--progress-interval" in self.known:
            cmd += ["--progress-interval", "3600"]
        if "--job-id" in self.known:  # the virtual run's job id: the same Idempotency-Keys
            cmd += ["--job-id", JOB_ID]
        return [*cmd, *row, *self.extra], missing


# -- one run -------------------------------------------------------------------------------


def run_once(sc: Scenario, repeat: int, client: Client, work: Path) -> dict[str, Any]:
    """One run of a row: its own simulator, the client to its end (or the timeout), then what
    the simulator saw, scored and judged."""
    flags, notes = sim_flags(sc, repeat)
    inp = write_input(work / f"{sc.name}.jsonl", sc)
    out = work / f"{sc.name}-r{repeat}"
    if out.exists():
        shutil.rmtree(out)
    keyfile = work / "key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o600)
    timeout = expected_seconds(sc) * 3 + 60.0
    sim = Sim(flags)
    try:
        cmd, missing = client.command(sc, inp, out, sim.url, keyfile)
        if missing:
            return {"row": sc.name, "repeat": repeat, "skipped":
                    f"the tmbatch under test does not know {', '.join(missing)}"}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TENSORMESH_") and k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        stdout_path = work / f"{sc.name}-r{repeat}.stdout"
        stderr_path = work / f"{sc.name}-r{repeat}.stderr"
        sim.reset()
        t0 = time.monotonic()
        with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=so, stderr=se)
            capped = threading.Event()

            def kill() -> None:
                if proc.poll() is None:
                    proc.kill()

            def stop() -> None:
                if proc.poll() is None:
                    capped.set()
                    proc.send_signal(signal.SIGTERM)
                    threading.Timer(15.0, kill).start()

            timer = threading.Timer(timeout, stop)
            timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            timer.cancel()
        t_exit = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stats = sim.stats()
        same_clock = sim.same_clock
    finally:
        sim.stop()
    run: dict[str, Any] = {
        "row": sc.name, "repeat": repeat, "seed": repeat, "exit": proc.returncode,
        "capped": capped.is_set(), "timeout_s": round(timeout, 1),
        "wall_s": round(t_exit - t0, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "cpu_user_s": round(usage.ru_utime, 3), "cpu_sys_s": round(usage.ru_stime, 3),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "sim_flags": flags,
        "client_cmd": cmd, "notes": notes,
    }
    log = [[round(e[0] - stats["epoch"], 4), e[3], e[4]] for e in stats["log"]
           if e[1] in BILLABLE_ROUTES]
    (work / f"{sc.name}-r{repeat}.arrivals.json").write_bytes(orjson.dumps(log))
    run.update(server_side(sc, stats, t_exit if same_clock else None))
    run.update(client_side(out, stderr_path.read_bytes()))
    verdict(sc, run)
    return run


def server_side(sc: Scenario, stats: dict[str, Any], t_exit: float | None) -> dict[str, Any]:
    """The share and counts from the simulator's arrival log (see the module doc)."""
    epoch = stats["epoch"]
    entries = sorted((e for e in stats["log"] if e[1] in BILLABLE_ROUTES), key=lambda e: e[0])
    capacity = stats.get("capacity")
    latency = sc.server.get("latency", 0.0)
    arrivals = [Arrival(e[0] - epoch, e[4] or "", e[3],
                        TOKENS_PER_REQUEST if e[3] == 200 else 0) for e in entries]
    ok = [a for a in arrivals if a.status == 200]
    if capacity and capacity.get("last_finish") is not None and ok:
        last = max(range(len(arrivals)), key=lambda i: (arrivals[i].status == 200,
                                                        arrivals[i].at))
        a = arrivals[last]
        arrivals[last] = Arrival(a.at, a.model, a.status, a.tokens,
                                 capacity["last_finish"] - epoch)
    out: dict[str, Any] = {
        "received": len(arrivals), "accepted": len(ok),
        "refused": sum(1 for a in arrivals if a.status in (429, 503)),
        "other_status": sorted({a.status for a in arrivals} - {200, 429, 503}),
        "violations": stats["retry_after_violations"],
        "duplicates": stats["duplicates"], "log_overflow": stats["log_overflow"],
        "windows_announced": stats["windows_announced"],
        "refused_random": stats["refused_random"], "rejected_by": stats["rejected_by"],
        "by_model": stats["by_model"], "capacity": capacity,
    }
    if not arrivals:
        out.update(share=0.0, seconds=None, start_s=None, share_to_exit=None, exit_s=None)
        return out
    first = arrivals[0].at
    finishes = [a.finished if a.finished is not None
                else a.at + (latency if a.status == 200 else 0.0) for a in arrivals]
    last_answer = max(finishes)
    seconds = last_answer - first
    wait = refusal_wait(sc)
    out.update(start_s=round(first, 3), seconds=round(seconds, 3),
               share=score(sc, arrivals, seconds, wait), refusal_wait=wait)
    if t_exit is not None:
        exit_s = t_exit - epoch - first
        out.update(exit_s=round(exit_s, 3), share_to_exit=score(sc, arrivals, exit_s, wait))
    return out


def client_side(out: Path, stderr: bytes) -> dict[str, Any]:
    """What the client says about its lines: failures by class, and its lanes' paces."""
    res: dict[str, Any] = {"succeeded": None, "failed": None, "rejected": None,
                           "summary_rejected": None}
    failures = out / "failures.jsonl"
    if failures.exists():
        classes = [orjson.loads(ln).get("error", {}).get("class")
                   for ln in failures.read_bytes().splitlines() if ln.strip()]
        res["failed"] = len(classes)
        res["rejected"] = classes.count("rejected")
    summary_path = out / "summary.json"
    if not summary_path.exists():
        res["stderr_tail"] = stderr[-800:].decode("utf-8", "replace")
        return res
    summary = orjson.loads(summary_path.read_bytes())
    counts = summary.get("counts", {})
    this_run = summary.get("this_run", {})
    res["succeeded"] = counts.get("succeeded")
    res["summary_failed"] = counts.get("failed")
    res["summary_rejected"] = counts.get("failed_by_class", {}).get("rejected")
    if res["failed"] is None:
        res["failed"], res["rejected"] = res["summary_failed"], res["summary_rejected"]
    tokens = (this_run.get("tokens") or {}).get("total")
    if tokens is not None and res["succeeded"]:
        res["tokens_per_answer"] = round(tokens / res["succeeded"], 2)
    admission = this_run.get("admission") or {}
    res["paces"] = {m: lane.get("pace_requests_per_second")
                    for m, lane in (admission.get("lanes") or {}).items()}
    res["pauses"] = this_run.get("pauses")
    res["paused_s"] = this_run.get("paused_seconds")
    res["retries"] = this_run.get("retries")
    res["client_wall_s"] = this_run.get("wall_seconds")
    return res


def verdict(sc: Scenario, run: dict[str, Any]) -> None:
    """virtual.judge on the run, plus what only a real run can get wrong."""
    failed = run["failed"] if run["failed"] is not None else sc.lines
    rejected = run["rejected"] if run["rejected"] is not None else 0
    r = judge(sc, RowResult(sc.name, run["seed"], run["share"], run["accepted"],
                            run["refused"], run["violations"], rejected, failed,
                            run["seconds"] or 0.0, run.get("paces") or {}))
    why = [r.why] if r.why else []
    if run["capped"]:
        why.append(f"stopped after {run['timeout_s']:g} s")
    if run["succeeded"] is None:
        why.append("no summary.json")
    elif run["succeeded"] + failed != sc.lines:
        why.append(f"{run['succeeded']} succeeded + {failed} failed of {sc.lines} lines")
    if run.get("summary_rejected") not in (None, rejected):
        why.append(f"summary says {run['summary_rejected']} rejected, failures {rejected}")
    if run["duplicates"]:
        why.append(f"{run['duplicates']} generated twice")
    if run["other_status"]:
        why.append(f"statuses {run['other_status']}")
    run["passed"], run["why"] = not why, "; ".join(why)


# -- the report ----------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by share (as virtual.run_matrix), with the range over the repeats."""
    done = sorted((r for r in runs if "skipped" not in r), key=lambda r: r["share"])
    if not done:
        return {"skipped": runs[0].get("skipped") if runs else "no run"}
    med = dict(done[len(done) // 2])
    med["runs"] = len(done)
    med["runs_passed"] = sum(1 for r in done if r["passed"])
    med["share_min"], med["share_max"] = done[0]["share"], done[-1]["share"]
    med["shares"] = [r["share"] for r in done]
    return med


def band_text(sc: Scenario) -> str:
    text = f"≥ {sc.band.share:.0%}"
    if sc.band.refused < 1.0:
        text += f", 429 ≤ {sc.band.refused:.0%}"
    if sc.band.rejected:
        text += f", {sc.band.rejected} rejected"
    return text


COLUMNS = ("row", "band", "share (min–max)", "accepted", "refused (of accepted)",
           "in a window", "rejected / failed", "sending s", "wall s", "CPU s", "passed",
           "why")


def table(rows: list[Scenario], med: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---:|" * (len(COLUMNS) - 4) + "---|---|"]
    for sc in rows:
        m = med.get(sc.name)
        if m is None:
            continue
        if "skipped" in m:
            lines.append(f"| {sc.name} | {band_text(sc)} |" + " – |" * (len(COLUMNS) - 3)
                         + f" skipped: {m['skipped']} |")
            continue
        rng = (f" ({m['share_min']:.1%}–{m['share_max']:.1%})" if m["runs"] > 1 else "")
        refused = f"{m['refused']} ({m['refused'] / max(1, m['accepted']):.1%})"
        lines.append(
            f"| {sc.name} | {band_text(sc)} | {m['share']:.1%}{rng} | {m['accepted']} "
            f"| {refused} | {m['violations']} | {fmt(m['rejected'], 0)} / "
            f"{fmt(m['failed'], 0)} | {fmt(m['seconds'], 1)} | {m['wall_s']:.1f} "
            f"| {m['cpu_s']:.2f} | {m['runs_passed']}/{m['runs']} "
            f"| {'ok' if m['passed'] else 'FAIL: ' + m['why']} |")
    return lines


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": model, "git_rev": git("rev-parse", "HEAD"),
            "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def write_results(a: argparse.Namespace, client: Client, rows: list[Scenario],
                  repeats: int, runs: dict[str, list[dict[str, Any]]], elapsed: float,
                  done: bool) -> str:
    """OUT/NAME.md and .json; written after every row, so a stopped run leaves what it had."""
    med = {name: median_of(rs) for name, rs in runs.items()}
    facts = machine()
    passed = sum(1 for m in med.values() if m.get("passed"))
    md = [f"# Scenario matrix over real sockets ({'quick' if a.quick else 'full'}, median of "
          f"{repeats}){'' if done else ', PARTIAL: still running'}", "",
          f"{facts['platform']}, {facts['cpu_model'] or 'unknown CPU'}, "
          f"{facts['cpus_usable']} usable of {facts['cpus']} CPUs, Python {facts['python']}; "
          f"git {facts['git_rev'][:12]} ({facts['git_branch']}"
          f"{', dirty' if facts['git_dirty'] else ''}); total {elapsed:.0f} s.",
          f"Command: `python bench/matrix_bench.py {shlex.join(sys.argv[1:])}`".rstrip(),
          f"tmbatch under test: `{shlex.join(client.cmd + client.extra)}` "
          f"({client.version or 'version unknown'})", "",
          "Share: `tmbatch.sim.scenarios.score` on the simulator's arrival log (see that "
          "module's doc); the median run by share, min–max over the repeats. Band and "
          "verdict as `tmbatch.sim.virtual.judge`. Sending s: first arrival to the last "
          "answer (the score's wall); wall s: client spawn to exit; CPU s: user + sys of the "
          "client process. Passed: runs in the band.", "",
          *table(rows, med), "",
          f"{passed} of {len(med)} rows in their band (median run).", ""]
    notes = sorted({n for rs in runs.values() for r in rs for n in r.get("notes", [])})
    if notes:
        md += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    text = "\n".join(md)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{a.name}.md").write_text(text)
    (out_dir / f"{a.name}.json").write_bytes(orjson.dumps({
        "quick": a.quick, "repeats": repeats, "complete": done,
        "elapsed_s": round(elapsed, 1), "argv": sys.argv[1:], "machine": facts,
        "tmbatch": {"cmd": client.cmd, "extra": client.extra, "version": client.version},
        "rows": {sc.name: {"title": sc.title, "score": sc.score, "server": sc.server,
                           "band": vars(sc.band), "lines": sc.lines,
                           "client_flags": sc.client_flags(),
                           "expected_s": round(expected_seconds(sc), 1)}
                 for sc in rows},
        "median": med, "runs": runs,
    }, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=None,
                   help="comma list of row names (default: every row of SCENARIOS); the "
                        "held-out rows of bench/heldout.py may be named too")
    p.add_argument("--repeats", type=int, default=None, help="runs per row (default 3)")
    p.add_argument("--quick", action="store_true", help="1 repeat")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--tmbatch-cmd", default=f"{shlex.quote(PY)} -m tmbatch",
                   help="how to run the tmbatch under test (run outside the source tree)")
    p.add_argument("--tmbatch-args", default="",
                   help="appended to every tmbatch run command line")
    p.add_argument("--name", default="matrix", help="results file name")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--data", default="/tmp/tmbatch-matrix-bench",
                   help="inputs and outputs of the runs, and each run's arrival log "
                        "(ROW-rN.arrivals.json: [seconds after the epoch, status, model]) "
                        "and its client's ROW-rN.stderr")
    a = p.parse_args()
    names = [n.strip() for n in a.rows.split(",")] if a.rows else [s.name for s in SCENARIOS]
    known = {**BY_NAME, **{sc.name: sc for sc in banded() + mixed()}}
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)}; rows: {', '.join(known)}")
    rows = [known[n] for n in names]
    if a.list:
        for sc in rows:
            print(f"{sc.name:<18} {expected_seconds(sc):6.1f} s  {band_text(sc):<28} "
                  f"{sc.title}")
        print(f"{'':<18} {sum(expected_seconds(sc) for sc in rows):6.1f} s in all")
        return 0
    repeats = a.repeats or (1 if a.quick else 3)
    client = Client(shlex.split(a.tmbatch_cmd), shlex.split(a.tmbatch_args))
    work = Path(a.data)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {}
    print(f"tmbatch under test: {shlex.join(client.cmd)} ({client.version}); {len(rows)} rows "
          f"x {repeats}, about {sum(expected_seconds(sc) + 3 for sc in rows) * repeats / 60:.0f}"
          " min", flush=True)
    for sc in rows:
        print(f"[{sc.name}] {sc.title} (expected {expected_seconds(sc):.0f} s)", flush=True)
        for r in range(repeats):
            run = run_once(sc, r, client, work)
            runs.setdefault(sc.name, []).append(run)
            if "skipped" in run:
                print(f"  r{r} skipped: {run['skipped']}", flush=True)
                continue
            print(f"  r{r} share {run['share']:7.1%}  accepted {run['accepted']:5d}  refused "
                  f"{run['refused']:4d}  in windows {run['violations']}  rejected "
                  f"{fmt(run['rejected'], 0)}/{fmt(run['failed'], 0)}  sending "
                  f"{fmt(run['seconds'], 1)}s  wall {run['wall_s']:.1f}s  cpu "
                  f"{run['cpu_s']:.2f}s  {'ok' if run['passed'] else 'FAIL ' + run['why']}",
                  flush=True)
        write_results(a, client, rows, repeats, runs, time.monotonic() - started, False)
    text = write_results(a, client, rows, repeats, runs, time.monotonic() - started, True)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
