"""`tmbatch export OUT --failed --as-input`: the failed lines' requests, as an input file.

Each current failure's line is read again from the job's input, as the run read it (its
--endpoint, --model and --stream applied), and written as an OpenAI Batch line with its
custom_id kept: a file `tmbatch run` accepts as it is, and that `tmbatch resend OUT --input`
takes back once corrected. A line the reader refuses (not JSON, say) has no request to
write: it is named on stderr with its fix, to be corrected in the input itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from tmbatch.inputs.files import fingerprint, open_input
from tmbatch.inputs.reader import BadLine, read_requests
from tmbatch.journal.failed import Failed, current_failures
from tmbatch.journal.journal import JournalError, load


@dataclass
class Exported:
    written: int = 0
    bad: list[Failed] = field(default_factory=list)  # failed lines with no request to write


def failed_as_input(out_dir: Path, dest: IO[bytes]) -> Exported:
    """Write every currently failed line's request to `dest` as a Batch line, in input
    order; memory is bounded by the number of failures."""
    state = load(out_dir, repair=False)
    header = state.header
    if header.merged:
        raise JournalError(f"{out_dir} is a merged directory: export --failed in each shard "
                           "directory (resend takes the lines back there)")
    failed = current_failures(out_dir, state.states)
    done = Exported()
    if not failed:
        return done
    if header.input == "-":
        raise JournalError(f"{out_dir} ran stdin, which cannot be read again: its failed "
                           "requests are not kept anywhere else")
    _same_input(header.input, header.fingerprint)
    opts = header.options
    with open_input(header.input) as f:
        for item in read_requests(f, endpoint=opts.get("endpoint"), model=opts.get("model"),
                                  stream=opts.get("stream"), shard=header.shard):
            if item.line not in failed:
                continue
            if isinstance(item, BadLine):
                done.bad.append(failed[item.line])
                continue
            dest.write(orjson.dumps({"custom_id": item.custom_id, "method": "POST",
                                     "url": item.url, "body": item.body},
                                    option=orjson.OPT_APPEND_NEWLINE))
            done.written += 1
    return done


def _same_input(path: str, fp: str) -> None:
    try:
        now = fingerprint(path)
    except OSError as exc:
        raise JournalError(f"the job's input {path} cannot be read ({exc.strerror}): the "
                           "failed requests are read from it") from None
    if now != fp:
        raise JournalError(f"the job's input {path} has changed since the run (fingerprint "
                           f"{now[:12]}, was {fp[:12]}): its lines are no longer the ones "
                           "that failed; export from the file as it was run")
