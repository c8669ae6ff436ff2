"""`tmbatch resend out/`: the only way a possibly-processed request is sent again.

An `ambiguous` line may already have been generated and billed; sending it again is the
user's decision, made explicitly, after seeing the list. The same Idempotency-Key goes
out again, so a server that honours it can still drop the duplicate.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

from tmbatch.compact import LineStates
from tmbatch.files import FAILURES
from tmbatch.journal import JournalError, load
from tmbatch.safety import Outcome


@dataclass
class Selected:
    line: int
    custom_id: str
    cls: Outcome
    code: str
    attempts: int


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
                out[rec["line"]] = Selected(rec["line"], rec["custom_id"], Outcome(err["class"]),
                                            err["code"], int(rec.get("attempts") or 0))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def select(out_dir: Path, classes: list[Outcome], ids_file: str | None) -> list[Selected]:
    """Lines whose current outcome is a failure of one of `classes`, or named in ids_file."""
    state = load(out_dir)
    states: LineStates = state.states
    records = _failure_records(out_dir)
    current = {line: r for line, r in records.items() if states.outcome(line) is r.cls}
    if ids_file is None:
        chosen = [r for r in current.values() if r.cls in classes]
    else:
        try:
            text = Path(ids_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise JournalError(f"--ids {ids_file}: cannot read it ({exc})") from None
        wanted = {x.strip() for x in text.splitlines() if x.strip()}
        by_id = {r.custom_id: r for r in current.values()}
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
            raise JournalError(f"--ids: {bad[0].custom_id} failed as {bad[0].cls}; a fatal "
                               "refusal is sent again by resuming the run, not by resend")
    return sorted(chosen, key=lambda r: r.line)


def describe(chosen: list[Selected], limit: int = 20) -> str:
    lines = [f"{len(chosen)} request(s) will be sent again (they may be billed again):"]
    for r in chosen[:limit]:
        lines.append(f"  line {r.line}  {r.custom_id}  ({r.cls}: {r.code}, "
                     f"{r.attempts} attempt(s) so far)")
    if len(chosen) > limit:
        lines.append(f"  ... and {len(chosen) - limit} more")
    return "\n".join(lines)


def confirm(prompt: str) -> bool:
    """Ask on the terminal; without one, the caller must have passed --yes."""
    if not sys.stdin.isatty():
        raise JournalError("resend needs confirmation: pass --yes (stdin is not a terminal)")
    print(prompt, end=" ", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")
