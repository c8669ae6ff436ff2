"""`tmbatch resend out/`: the only way a failed line is sent again, and only when asked.

An `ambiguous` line may already have been generated and billed; sending it again is the
user's decision, made explicitly, after seeing the list. The same Idempotency-Key goes
out again, so a server that honours it can still drop the duplicate.

What the list says about each class comes from its policy (`meaning`), never from its name:
a line that never reached the server is not "billed again". A line sent as it is can only
get another answer when it was sent before (a 5xx, a refusal, a lost connection) or when the
server did not serve its model (re-checked against GET /v1/models before sending); a bad
input line or a request the server refused as written would fail the same way, so it is
listed apart and sent only corrected: `--input FIXED.jsonl` gives the corrected lines,
matched by custom_id (`corrected`), checked as `run` checks its input.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.files import os_problem
from tmbatch.inputs.files import open_input
from tmbatch.inputs.lines import numbered_lines
from tmbatch.inputs.reader import MAX_LINE_BYTES, BadLine, Request, parse_line
from tmbatch.journal.compact import LineStates
from tmbatch.journal.failed import Failed, current_failures
from tmbatch.journal.format import Header
from tmbatch.journal.journal import JournalError, ResumeState, load
from tmbatch.policy import FAILURE_CLASSES, Cause, Outcome

SHOWN = 20  # lines listed per class before asking; --dry-run lists all of them


@dataclass
class Selected:
    """A failed line chosen to go again, with its corrected request when `--input` gave one."""

    failed: Failed
    request: Request | None = None
    named: bool = False  # by --ids: the user's explicit choice, sent as it is if it was sent

    @property
    def line(self) -> int:
        return self.failed.line

    @property
    def custom_id(self) -> str | None:
        return self.request.custom_id if self.request is not None else self.failed.custom_id

    @property
    def cls(self) -> Outcome:
        return self.failed.cls

    @property
    def code(self) -> str:
        return self.failed.code

    @property
    def attempts(self) -> int:
        return self.failed.attempts

    @property
    def sendable(self) -> bool:
        """Corrected, or able to get another answer as it is (`Failed.resendable`); a line
        named by --ids goes as it is whenever it has been sent before."""
        if self.request is not None or self.failed.resendable:
            return True
        return self.named and self.failed.attempts > 0

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "class": self.cls.value,
                "code": self.code, "attempts": self.attempts, "will_send": self.sendable,
                "corrected": self.request is not None}


@dataclass
class Corrected:
    """What `--input` gave: the chosen lines with their corrected requests, and what of the
    file was not used, and why (each said to the user before anything is sent)."""

    chosen: list[Selected] = field(default_factory=list)
    succeeded: int = 0  # lines of the file whose line already has an outcome other than a failure
    other_class: Counter[str] = field(default_factory=Counter)  # failed as a class not chosen
    unknown: list[str] = field(default_factory=list)  # custom_ids this job never had
    still_bad: list[str] = field(default_factory=list)  # lines the reader refuses, why


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
    current = current_failures(out_dir, state.states)
    if ids_file is None:
        chosen = [Selected(r) for r in current.values() if r.cls in classes]
    else:
        chosen = _by_ids(out_dir, ids_file, current, state.states)
    return sorted(chosen, key=lambda r: r.line)


def _by_ids(out_dir: Path, ids_file: str, current: dict[int, Failed],
            states: LineStates) -> list[Selected]:
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
        raise JournalError(
            f"--ids: {len(missing)} custom_id(s) have no current failure in {out_dir} (a line "
            f"that succeeded is never resent): {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}"
        )
    chosen = [by_id[i] for i in wanted]
    bad = [r for r in chosen if not r.cls.policy.user_resendable]
    if bad:
        raise JournalError(f"--ids: {bad[0].custom_id} failed as {bad[0].cls}, which resend "
                           f"does not send: {bad[0].cls.policy.meaning}")
    return [Selected(r, named=True) for r in chosen]


def corrected(out_dir: Path, classes: list[Outcome], path: str) -> Corrected:
    """`--input FILE`: the failed lines of `classes` that FILE gives again, corrected.

    FILE holds OpenAI Batch lines (what `export --failed --as-input` writes; a job run with
    --endpoint gave its lines the custom_id line-N), checked as `run` checks a line with the
    job's --model and --stream. A line is matched to a failure by custom_id; a failed line
    that had none (not JSON, say) by its line number, when FILE is the corrected input and
    that line's custom_id is new to the job. A line that succeeded is never chosen."""
    state = load(out_dir)
    refuse_merged(state.header, out_dir)
    current = current_failures(out_dir, state.states)
    endpoint = state.header.options.get("endpoint")
    by_id = {_id_of(f, endpoint): f for f in current.values() if _id_of(f, endpoint)}
    found = Corrected()
    known = _Known(state, by_id)
    taken: dict[int, Selected] = {}
    for n, item in _read_corrected(path, state.header):
        failed = by_id.get(item.custom_id) if item.custom_id is not None else None
        if failed is None:
            failed = _by_line(n, item, current, endpoint, known)
        if failed is None:
            _not_a_failure(found, item, known)
        elif failed.cls not in classes:
            found.other_class[failed.cls.value] += 1
        elif isinstance(item, BadLine):
            found.still_bad.append(f"{path} {item.message}")
        elif failed.line not in taken:
            taken[failed.line] = Selected(failed, Request(
                failed.line, item.custom_id, item.url, item.body, _key_id(failed, item)))
    found.chosen = sorted(taken.values(), key=lambda r: r.line)
    return found


def _key_id(failed: Failed, item: Request) -> str | None:
    """A corrected request whose line was sent before goes under an Idempotency-Key of its
    own (from its custom_id and body): a server that keeps keys would answer the old key with
    the old request's refusal, or refuse a new body under it. A line never sent keeps the
    key its custom_id gives: no server has seen it."""
    if failed.attempts == 0:
        return None
    body = hashlib.blake2b(orjson.dumps(item.body, option=orjson.OPT_SORT_KEYS),
                           digest_size=8).hexdigest()
    return f"{item.custom_id}#corrected-{body}"


def _id_of(f: Failed, endpoint: str | None) -> str | None:
    """The custom_id a failed line is matched by: its own, or line-N in an --endpoint job."""
    if f.custom_id is not None:
        return f.custom_id
    return f"line-{f.line}" if endpoint else None


class _Known:
    """Whether the job has a line with this custom_id (the journal's id set, which has only
    `add`: an id it found new is remembered here as new)."""

    def __init__(self, state: ResumeState, failed_ids: dict[str, Failed]) -> None:
        self.seen = state.seen
        self.failed_ids = failed_ids
        self.new: set[str] = set()

    def __call__(self, cid: str) -> bool:
        if cid in self.failed_ids:
            return True
        if cid in self.new:
            return False
        if self.seen.add(cid):
            self.new.add(cid)
            return False
        return True


def _by_line(n: int, item: Request | BadLine, current: dict[int, Failed],
             endpoint: str | None, known: _Known) -> Failed | None:
    """The failed line n of the job, when it had no custom_id and the corrected line's id
    is new to the job (so FILE is the corrected input, line for line)."""
    failed = current.get(n)
    if failed is None or _id_of(failed, endpoint) is not None:
        return None
    if item.custom_id is not None and known(item.custom_id):
        return None
    return failed


def _not_a_failure(found: Corrected, item: Request | BadLine, known: _Known) -> None:
    if item.custom_id is None:
        return
    if known(item.custom_id):
        found.succeeded += 1
    else:
        found.unknown.append(item.custom_id)


def _read_corrected(path: str, header: Header) -> Iterable[tuple[int, Request | BadLine]]:
    """FILE's lines, each a Request or a BadLine, as the reader makes them."""
    opts = header.options
    seen: set[str] = set()
    try:
        f = open_input(path)
    except OSError as exc:
        raise JournalError(f"--input {path}: {os_problem(exc)}") from None
    with f:
        for n, raw, length in numbered_lines(f, MAX_LINE_BYTES):
            if raw is None:
                yield n, BadLine(n, None, "line_too_long", f"line {n}: {length} bytes, too long")
                continue
            if not raw.strip():
                continue
            item = parse_line(raw, n, None, opts.get("model"), opts.get("stream"))
            if isinstance(item, Request):
                if item.custom_id in seen:
                    raise JournalError(
                        f"--input {path} line {n}: custom_id {item.custom_id!r} is used twice "
                        "in the file; give each corrected line once")
                seen.add(item.custom_id)
            yield n, item


def _row(r: Selected) -> str:
    cid = r.custom_id if r.custom_id is not None else "(no custom_id)"
    tries = "never sent" if not r.attempts else \
        f"{r.attempts} attempt{'s' if r.attempts != 1 else ''} so far"
    fixed = ", corrected" if r.request is not None else ""
    return f"    line {r.line}  {cid}  ({r.code or 'no code'}, {tries}{fixed})"


def _rows(group: list[Selected], limit: int | None) -> list[str]:
    shown = group if limit is None else group[:limit]
    out = [_row(r) for r in shown]
    if len(group) > len(shown):
        out.append(f"    ... and {len(group) - len(shown)} more (--dry-run lists them all)")
    return out


def describe(chosen: list[Selected], out_dir: Path, *, limit: int | None = SHOWN) -> str:
    """The list shown before sending: each class under what its policy says it means, and
    the lines that cannot go as they are under their code's fix (`policy.FIXES`)."""
    send = [r for r in chosen if r.sendable and r.request is None]
    lines: list[str] = []
    fixed = [r for r in chosen if r.request is not None]
    if fixed:
        lines.append(f"{len(fixed)} corrected line(s) to send in place of the failed ones:")
        lines.extend(_rows(fixed, limit))
    if send:
        lines.append(f"{len(send)} line(s) to send again:")
        for cls in FAILURE_CLASSES:
            group = [r for r in send if r.cls is cls]
            if group:
                lines.append(f"  {len(group)} {cls}: {cls.policy.meaning}")
                served = sum(r.failed.cause is Cause.SERVED and r.request is None
                             for r in group)
                if served:
                    lines.append(f"  ({served} the server did not serve: GET /v1/models is "
                                 "checked first, and only those it serves now are sent)")
                lines.extend(_rows(group, limit))
    never = [r for r in chosen if not r.sendable]
    if never:
        lines.append(f"{len(never)} line(s) cannot be resent as they are: sent unchanged "
                     "they would fail the same way:")
        names = {"out": str(out_dir), "fixed": "retry.jsonl", "resume": "", "restart": "",
                 "restart_batch": ""}
        for code in sorted({r.code for r in never}):
            group = [r for r in never if r.code == code]
            lines.append(f"  {len(group)} {code}: {group[0].failed.fix.say(**names)}")
            lines.extend(_rows(group, limit))
    return "\n".join(lines)


def describe_unused(found: Corrected, path: str) -> list[str]:
    """What of `--input FILE` is not sent, and why: said before anything is."""
    out: list[str] = []
    if found.succeeded:
        out.append(f"{found.succeeded} line(s) of {path} have an outcome that is not a "
                   "failure (succeeded, or not yet sent): not sent (a line that succeeded is "
                   "never sent again)")
    for cls, n in sorted(found.other_class.items()):
        out.append(f"{n} line(s) of {path} failed as {cls}: not chosen (add --class {cls})")
    if found.unknown:
        shown = ", ".join(found.unknown[:5]) + (" ..." if len(found.unknown) > 5 else "")
        out.append(f"{len(found.unknown)} custom_id(s) of {path} are not in this job: not "
                   f"sent ({shown})")
    for message in found.still_bad[:SHOWN]:
        out.append(f"still bad, not sent: {message}")
    if len(found.still_bad) > SHOWN:
        out.append(f"... and {len(found.still_bad) - SHOWN} more bad line(s) in {path}")
    return out


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
