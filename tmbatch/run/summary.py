"""What a run achieved: counts by outcome and class, tokens, rates, latency percentiles."""

from __future__ import annotations

import math
import shlex
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmbatch.base.files import FAILURES
from tmbatch.base.logs import say
from tmbatch.base.stop import Stop
from tmbatch.base.words import millis
from tmbatch.inputs.samples import resume_command
from tmbatch.journal.compact import LineStates
from tmbatch.journal.failed import Failed, current_failures
from tmbatch.journal.format import Header
from tmbatch.policy import FAILURE_CLASSES, Outcome
from tmbatch.run.summaries import Counts, MergedSummary, Summary, ThisRun

_log = math.log


def percentile(sorted_values: list[float] | array, q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, min(n, int(q / 100.0 * n + 0.999999)))
    return sorted_values[rank - 1]


class Histogram:
    """Log-bucketed durations: percentiles within 0.25 % in constant memory (~14 KB).

    A million-request run would otherwise keep a million floats and sort them at the end.
    """

    LOW, HIGH, STEP = 1e-4, 3600.0, 1.005  # 100 µs .. 1 h, 0.5 % wide buckets

    def __init__(self) -> None:
        self._log_step = math.log(self.STEP)
        n = int(math.log(self.HIGH / self.LOW) / self._log_step) + 2
        self._counts = array("Q", bytes(8 * n))
        self.count = 0
        self.max: float | None = None

    def add(self, seconds: float) -> None:
        """Once per answer: the common case (inside the range) without min/max calls."""
        low = self.LOW
        v = seconds if low < seconds < self.HIGH else min(max(seconds, low), self.HIGH)
        self._counts[int(_log(v / low) / self._log_step)] += 1
        self.count += 1
        top = self.max
        if top is None or seconds > top:
            self.max = seconds

    def percentile(self, q: float) -> float | None:
        """Nearest-rank, reported at the bucket's geometric middle."""
        if not self.count:
            return None
        rank = max(1, min(self.count, int(q / 100.0 * self.count + 0.999999)))
        seen = 0
        for i, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                mid = self.LOW * self.STEP ** (i + 0.5)
                return min(mid, self.max) if self.max is not None else mid
        return self.max

    def __len__(self) -> int:
        return self.count


@dataclass
class RunStats:
    """Accumulated while the run goes; floats in arrays so a million requests cost 8 MB each."""

    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    latencies: Histogram = field(default_factory=Histogram)
    ttfts: Histogram = field(default_factory=Histogram)
    sent: int = 0  # attempts that left this run
    ok: int = 0
    failed: Counter[Outcome] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    rejected_429: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0

    def add_usage(self, used: tuple[int, int, int] | None) -> int:
        """Count an answer's tokens (`spend.usage_tokens`); return prompt + completion."""
        if used is None:
            return 0
        self.prompt_tokens += used[0]
        self.completion_tokens += used[1]
        return used[0] + used[1]

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)


def build_summary(stats: RunStats, states: LineStates, *, input_lines: int, blank_lines: int,
                  header: Header, stop: Stop, admission: Any, spend: dict[str, Any] | None,
                  previous: Summary | MergedSummary | None = None,
                  lines: int | None = None) -> Summary:
    """The run's summary.json, whole: the job's counts from the line states, this run's
    numbers, how it stopped, its spend (`Budget.report`); `lines`: the input's lines that
    need an outcome (`count_lines`), None when not known (stdin cut short). `previous`, the
    summary the last run wrote: a run that had nothing to send keeps its `this_run` (its rates
    and latencies are the job's useful numbers) and says so in `nothing_sent`, instead of
    zeros and nulls."""
    this_run = _this_run(stats, admission)
    nothing_sent = None
    if _sent_nothing(this_run):
        earlier = previous.this_run if isinstance(previous, Summary) else None
        if earlier and not _sent_nothing(earlier):
            this_run = earlier
        nothing_sent = {"at": _iso_now(), "wall_seconds": round(stats.elapsed, 3)}
    return Summary(
        input=header.input, fingerprint=header.fingerprint, job_id=header.job,
        input_lines=input_lines, blank_lines_skipped=blank_lines, counts=Counts.of(states, lines),
        this_run=this_run, stopped=stop.reason.label if stop.reason else None,
        fatal=stop.fatal, io_error=stop.io_error, spend=spend, nothing_sent=nothing_sent)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 2)


def _this_run(stats: RunStats, admission: Any) -> ThisRun:
    lat, ttft = stats.latencies, stats.ttfts
    elapsed = stats.elapsed
    answered = stats.ok + sum(stats.failed.values())
    tokens = stats.prompt_tokens + stats.completion_tokens
    return {
        "attempts_sent": stats.sent,
        "succeeded": stats.ok,
        "failed_by_class": {cls.value: n for cls, n in stats.failed.items()},
        "failed_by_code": dict(stats.codes),
        "retries": stats.retries,
        "rate_limited_429": stats.rejected_429,
        "pauses": getattr(admission, "pauses", 0),
        "paused_seconds": round(getattr(admission, "paused_seconds", 0.0), 3),
        "admission": admission.report() if hasattr(admission, "report") else None,
        "wall_seconds": round(elapsed, 3),
        "requests_per_second": round(answered / elapsed, 2),
        "tokens": {
            "prompt": stats.prompt_tokens,
            "completion": stats.completion_tokens,
            "total": tokens,
            "per_second": round(tokens / elapsed, 1),
        },
        "latency_ms": {"p50": _ms(lat.percentile(50)), "p90": _ms(lat.percentile(90)),
                       "p99": _ms(lat.percentile(99)), "max": _ms(lat.max)},
        "ttft_ms": {"count": ttft.count, "p50": _ms(ttft.percentile(50)),
                    "p90": _ms(ttft.percentile(90)), "p99": _ms(ttft.percentile(99))},
    }


def _sent_nothing(run: ThisRun) -> bool:
    """This run found every line already answered: it has no rates or latencies to tell."""
    return not run.get("attempts_sent") and not run.get("succeeded") and not any(
        (run.get("failed_by_class") or {}).values())


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _counts_part(c: Counts) -> str:
    """The job's lines: `200 lines: 150 succeeded, 8 failed (fatal 8), 42 pending`."""
    failed = ", ".join(f"{k} {v}" for k, v in c.failed_by_class.items() if v)
    text = f"{c.succeeded} succeeded, {c.failed} failed" + (f" ({failed})" if failed else "")
    if c.unknown_outcome_in_flight:
        text += f", {c.unknown_outcome_in_flight} of unknown outcome"
    if c.pending:
        text += f", {c.pending} pending"
    return text if c.lines is None else f"{c.lines} line{'' if c.lines == 1 else 's'}: {text}"


def budget_flags(spend: dict[str, Any] | None) -> str:
    """The budget flags a run was given, as the fix names them: `--budget-tokens`."""
    budget = (spend or {}).get("budget") or {}
    flags = [f"--budget-{k}" for k in ("tokens", "usd") if budget.get(k) is not None]
    return "/".join(flags) or "--budget-tokens/--budget-usd"


def _stop_part(summary: Summary) -> str:
    """Why lines are left, when a budget is the reason: how many, and the flag to raise."""
    if summary.stopped != "budget":
        return ""
    c = summary.counts
    left = "?" if c.pending is None else f"{c.pending + c.failed_by_class.get('fatal', 0):,}"
    return f"; budget reached: {left} pending; raise {budget_flags(summary.spend)}"


def _this_run_part(r: ThisRun) -> str:
    """This run's share: what it sent and answered; rates only when it sent something."""
    sent = int(r.get("attempts_sent") or 0)
    failed = sum((r.get("failed_by_class") or {}).values())
    text = f"this run: {sent} sent, {r.get('succeeded', 0)} succeeded, {failed} failed"
    if not sent:
        return text
    return (f"{text}, {r['requests_per_second']} req/s, {r['tokens']['per_second']} tok/s"
            f"{_latency_part(r)}")


def _latency_part(r: ThisRun) -> str:
    """Percentiles only when something was measured (never "p50 None ms")."""
    lat = r.get("latency_ms") or {}
    if lat.get("p50") is None:
        return ""
    text = f", latency p50 {millis(lat['p50'])} p90 {millis(lat['p90'])} p99 {millis(lat['p99'])}"
    ttft = r.get("ttft_ms") or {}
    if ttft.get("count"):
        text += f", ttft p50 {millis(ttft['p50'])} p90 {millis(ttft['p90'])}"
    return text


def final_line(summary: Summary) -> str:
    """The one line a run ends with: the job's counts (`Counts`: the same numbers as the
    progress line, `status` and the report), then this run's share, then why it stopped
    short when a budget is why."""
    c, r = summary.counts, summary.this_run
    stop = _stop_part(summary)
    if summary.nothing_sent:
        if stop:
            return f"done: {_counts_part(c)}; this run sent nothing{stop}"
        if summary.stopped is None and not (c.pending or c.failed_by_class.get("fatal")):
            return (f"done: {_counts_part(c)}; nothing was left to send: every line already "
                    "has an outcome")
        return f"done: {_counts_part(c)}; this run sent nothing"
    extra = ""
    adm = r.get("admission") or {}
    if r.get("attempts_sent") and adm.get("mode") == "adaptive" and adm.get("decreases"):
        extra += f", adaptive: settled at {adm['concurrency_final']} in flight"
        if adm.get("settled_requests_per_second") is not None:  # none when nothing succeeded
            extra += f", {adm['settled_requests_per_second']} req/s"
    return (f"done: {_counts_part(c)}; {_this_run_part(r)}{extra}, "
            f"wall {r['wall_seconds']} s{stop}")


TOP_CODES = 5  # failure codes the end of a run explains, the most frequent first
FIXED = "retry.jsonl"  # the corrected file the advice names


def job_command(header: Header, out_dir: Path, *, endpoint: bool = True) -> str:
    """`tmbatch run` with the job's input, output and request-shaping options: what resumes
    it (the connection and limit flags are the user's to repeat)."""
    fanned = resume_command(header.input, out_dir)  # a --models/--samples run: its command
    if fanned is not None:
        return fanned
    opts = header.options
    parts = ["tmbatch", "run", shlex.quote(header.input), "-o", shlex.quote(str(out_dir))]
    if endpoint and opts.get("endpoint"):
        parts += ["--endpoint", shlex.quote(str(opts["endpoint"]))]
    if opts.get("model"):
        parts += ["--model", shlex.quote(str(opts["model"]))]
    if opts.get("stream") is not None:
        parts.append("--stream" if opts["stream"] else "--no-stream")
    if header.shard:
        parts += ["--shard", f"{header.shard[0]}/{header.shard[1]}"]
    return " ".join(parts)


def _fix_names(header: Header, out_dir: Path) -> dict[str, str]:
    resume = job_command(header, out_dir)
    return {"out": shlex.quote(str(out_dir)), "fixed": FIXED, "resume": resume,
            "restart": resume + " --restart",
            "restart_batch": job_command(header, out_dir, endpoint=False) + " --restart"}


def _class_command(cls: Outcome, failed: list[Failed], names: dict[str, str]) -> str | None:
    """The command that does something for the class's lines, or None when none does as
    they are (a bad line, a request the server refused as written: the codes' fixes say)."""
    if cls.policy.user_resendable and any(f.resendable for f in failed):
        return f"tmbatch resend {names['out']} --class {cls.value}"
    if not cls.policy.final and not cls.policy.user_resendable:  # fatal: resuming sends it
        return names["resume"]
    return None


def _code_rows(failed: list[Failed], names: dict[str, str], nothing_sent: bool,
               ) -> list[dict[str, Any]]:
    """The most frequent codes, one example each (the first line) and the fix."""
    by_code: dict[tuple[str, Outcome], list[Failed]] = {}
    for f in failed:
        by_code.setdefault((f.code, f.cls), []).append(f)
    ranked = sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[1][0].line))
    rows = []
    for (code, cls), group in ranked[:TOP_CODES]:
        first = group[0]
        rows.append({"code": code, "class": cls.value, "lines": len(group),
                     "cause": first.cause.value, "example_line": first.line,
                     "example": first.message[:300],
                     "fix": first.fix.say(nothing_sent=nothing_sent, **names)})
    return rows


def next_steps(summary: Summary, out_dir: Path, states: LineStates,
               header: Header) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Where a run's failed lines are, what each class means, and for the most frequent
    failure codes an example and the exact fix (`policy.FIXES`). Worded from the policy, so a
    new class, code or rule changes this advice without anyone editing it here; a command
    is printed only where it does something for those lines."""
    failed = sorted(current_failures(out_dir, states).values(), key=lambda f: f.line)
    names = _fix_names(header, out_dir)
    nothing_sent = not summary.counts.succeeded and all(f.attempts == 0 for f in failed)
    rows: list[dict[str, Any]] = []
    lines = [f"failed lines are in {out_dir / FAILURES} (error.code says why):"]
    for cls in FAILURE_CLASSES:
        n = summary.counts.failed_by_class.get(cls.value, 0)
        if not n:
            continue
        command = _class_command(cls, [f for f in failed if f.cls is cls], names)
        rows.append({"class": cls.value, "lines": n, "meaning": cls.policy.meaning,
                     "command": command})
        lines.append(f"  {n} {cls.value}: {cls.policy.meaning}")
        if command:
            lines.append(f"      {command}")
    codes = _code_rows(failed, names, nothing_sent)
    if codes:
        lines.append("by code (the most frequent first):")
    for c in codes:
        # The message that stopped the run was said once already, in the fatal error line.
        said = bool(summary.fatal) and c["example"] and c["example"] in summary.fatal
        example = "the fatal error above" if said else c["example"]
        lines.append(f"  {c['lines']} {c['code']} ({c['class']}), e.g. line "
                     f"{c['example_line']}: {example}")
        lines.append(f"      fix: {c['fix']}")
    return "\n".join(lines), rows, codes


def say_next_steps(summary: Summary, out_dir: Path, states: LineStates,
                   header: Header) -> None:
    """After the final line of a run with failures that finished (or was stopped by a
    refused key, which resuming fixes): what failed, why, and the command that fixes it."""
    if not summary.counts.failed or not (summary.finished or summary.fatal):
        return
    text, rows, codes = next_steps(summary, out_dir, states, header)
    say("next_steps", text, failures_file=str(out_dir / FAILURES), classes=rows, codes=codes)
