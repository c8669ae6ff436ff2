"""`tmbatch resend out/`: the only way a possibly-processed request is sent again.

An `ambiguous` line may already have been generated and billed; sending it again is the
user's decision, made explicitly, after seeing the list. The same Idempotency-Key goes
out again, so a server that honours it can still drop the duplicate.

What the list says about each class comes from its policy (`meaning`), never from its name:
a line that never reached the server is not "billed again". A line that was never sent at
all (a bad input line: no attempt) cannot be resent, because resend sends the input line
as it is and it would fail the same way; it is listed apart and not sent.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.files import FAILURES, os_problem
from tmbatch.journal.compact import LineStates
from tmbatch.journal.format import Header
from tmbatch.journal.journal import JournalError, load
from tmbatch.policy import FAILURE_CLASSES, Outcome

SHOWN = 20  # lines listed per class before asking; --dry-run lists all of them


@dataclass
class Selected:
    line: int
    custom_id: str | None
    cls: Outcome
    code: str
    attempts: int

    @property
    def sendable(self) -> bool:
        """A line with no attempt failed before sending (bad input): resending it as it is
        would fail the same way, so it is never sent."""
        return self.attempts > 0

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "class": self.cls.value,
                "code": self.code, "attempts": self.attempts, "will_send": self.sendable}


def _failure_records(out_dir: Path) -> dict[int, Selected]:
    """The last failure record per line (bounded by the number of failures)."""
    out: dict[int, Selected] = {}
    path = out_dir / FAILURES
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = orjson.loads(raw)
                err = rec["error"]
                cid = rec.get("custom_id")
                out[rec["line"]] = Selected(rec["line"], cid if isinstance(cid, str) else None,
                                            Outcome(err["class"]), str(err.get("code") or ""),
                                            int(rec.get("attempts") or 0))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def refuse_merged(header: Header, out_dir: Path) -> None:
    """A merged directory joins shards that each had their own job id, and so their own
    Idempotency-Keys: resending from it would send keys the server has never seen."""
    if header.merged:
        raise JournalError(
            f"{out_dir} is a merged directory: resend in the shard directory that ran the line "
            "(it keeps the line's Idempotency-Key), then merge again"
        )


def select(out_dir: Path, classes: list[Outcome], ids_file: str | None) -> list[Selected]:
    """Lines whose current outcome is a failure of one of `classes`, or named in ids_file."""
    state = load(out_dir)
    refuse_merged(state.header, out_dir)
    states: LineStates = state.states
    records = _failure_records(out_dir)
    current = {line: r for line, r in records.items() if states.outcome(line) is r.cls}
    if ids_file is None:
        chosen = [r for r in current.values() if r.cls in classes]
    else:
        chosen = _by_ids(out_dir, ids_file, current, records, states)
    return sorted(chosen, key=lambda r: r.line)


def _by_ids(out_dir: Path, ids_file: str, current: dict[int, Selected],
            records: dict[int, Selected], states: LineStates) -> list[Selected]:
    try:
        text = Path(ids_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise JournalError(f"--ids {ids_file}: {os_problem(exc)}") from None
    except UnicodeDecodeError:
        raise JournalError(f"--ids {ids_file}: not UTF-8 text; one custom_id a line") from None
    wanted = {x.strip() for x in text.splitlines() if x.strip()}
    by_id = {r.custom_id: r for r in current.values() if r.custom_id is not None}
    missing = sorted(wanted - set(by_id))
    if missing:
        succeeded = [m for m in missing if any(
            r.custom_id == m and states.outcome(r.line) is Outcome.OK
            for r in records.values())]
        hint = " (some already succeeded)" if succeeded else ""
        raise JournalError(
            f"--ids: {len(missing)} custom_id(s) have no current failure in {out_dir}"
            f"{hint}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    chosen = [by_id[i] for i in wanted]
    bad = [r for r in chosen if not r.cls.policy.user_resendable]
    if bad:
        raise JournalError(f"--ids: {bad[0].custom_id} failed as {bad[0].cls}, which resend "
                           f"does not send: {bad[0].cls.policy.meaning}")
    return chosen


def _row(r: Selected) -> str:
    cid = r.custom_id if r.custom_id is not None else "(no custom_id)"
    tries = "never sent" if not r.attempts else \
        f"{r.attempts} attempt{'s' if r.attempts != 1 else ''} so far"
    return f"    line {r.line}  {cid}  ({r.code or 'no code'}, {tries})"


def _rows(group: list[Selected], limit: int | None) -> list[str]:
    shown = group if limit is None else group[:limit]
    out = [_row(r) for r in shown]
    if len(group) > len(shown):
        out.append(f"    ... and {len(group) - len(shown)} more (--dry-run lists them all)")
    return out


def describe(chosen: list[Selected], *, limit: int | None = SHOWN) -> str:
    """The list shown before sending: each class under what its policy says it means."""
    send = [r for r in chosen if r.sendable]
    lines: list[str] = []
    if send:
        lines.append(f"{len(send)} line(s) to send again:")
        for cls in FAILURE_CLASSES:
            group = [r for r in send if r.cls is cls]
            if group:
                lines.append(f"  {len(group)} {cls}: {cls.policy.meaning}")
                lines.extend(_rows(group, limit))
    never = [r for r in chosen if not r.sendable]
    if never:
        lines.append(
            f"{len(never)} line(s) cannot be resent: they were never sent, because the input "
            "line itself is bad (error.code says why); resend would send it as it is. Fix the "
            "input and run it under a new --output:")
        lines.extend(_rows(never, limit))
    return "\n".join(lines)


def outcome_after(out_dir: Path, chosen: list[Selected]) -> tuple[int, Counter[str]]:
    """How the sent lines stand now, from the journal (not from this run's summary, which a
    run that sent nothing does not rewrite): succeeded, and still failed by class."""
    states = load(out_dir, repair=False).states
    ok = 0
    still: Counter[str] = Counter()
    for r in chosen:
        now = states.outcome(r.line)
        if now is Outcome.OK:
            ok += 1
        else:
            still[str(now) if now is not None else "no outcome"] += 1
    return ok, still


def json_report(chosen: list[Selected], *, dry_run: bool, sent: bool,
                succeeded: int | None = None, still: Counter[str] | None = None) -> bytes:
    """What `--json` writes on stdout: every selected line, and what became of them."""
    report: dict[str, Any] = {
        "dry_run": dry_run, "sent": sent,
        "selected": [r.as_dict() for r in chosen],
        "to_send": sum(r.sendable for r in chosen),
        "cannot_send": sum(not r.sendable for r in chosen),
    }
    if succeeded is not None:
        report["now_succeeded"] = succeeded
        report["still_failed"] = dict(still or {})
    return orjson.dumps(report) + b"\n"


def confirm(prompt: str) -> bool:
    """Ask on the terminal; without one, the caller must have passed --yes."""
    if not sys.stdin.isatty():
        raise JournalError("resend needs confirmation: pass --yes (stdin is not a terminal)")
    print(prompt, end=" ", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")
