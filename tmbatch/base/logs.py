"""Logs for people and for machines: the one place that decides what stderr looks like.

Text mode keeps the terse `tmbatch: LEVEL: message` lines people read in a
terminal or in cron mail. JSON mode (`--log-format json`) writes one object per
line, `{"ts", "level", "event", "msg", ...fields}`, so a log pipeline (kubectl
logs, Loki, jq) can filter on `event` instead of parsing English. In JSON mode
nothing else may reach stderr, so the lines that used to be bare prints (the
final summary, "interrupted, run again") go through `say`, which prints them in
text mode and turns them into events in JSON mode.

Callers attach structure with `extra={"event": "rate_limit_pause", "retry_after": 2.0}`;
the text formatter ignores it, so adding an event never changes what people see.
Keys never appear: every record is redacted by a filter, and the serialized JSON
line is scrubbed again because fields are not part of the message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from tmbatch.base.redact import SECRETS

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "tmbatch: %(levelname)s: %(message)s"

log = logging.getLogger("tmbatch")
_format = "text"


class RedactFilter(logging.Filter):
    """Belt and braces: no log record may carry the key, whatever formatted it."""

    secrets = SECRETS  # the process's one registry (tmbatch.base.redact)

    def scrub(self, text: str) -> str:
        """Replace every secret, also in its JSON-escaped spelling (fields are serialized)."""
        return self.secrets.text(text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.scrub(record.getMessage()), None
        return True


REDACT = RedactFilter()

# Everything a bare LogRecord carries; whatever else a record has came from `extra=`.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "event", "taskName",
}


def _iso(ts: float) -> str:
    """UTC with milliseconds: sorts as text and needs no timezone guessing in a pipeline."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int(ts % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields come from the record's `extra=` attributes."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                obj[k] = v
        if record.exc_info and record.exc_info[0] is not None:
            obj["exc_type"] = record.exc_info[0].__name__
        line = orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        return REDACT.scrub(line)


def setup_logging(verbose: int, quiet: bool, fmt: str = "text") -> None:
    """Route the `tmbatch` logger to stderr in the chosen format; safe to call again."""
    global _format
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(REDACT)
    root = logging.getLogger("tmbatch")
    root.handlers[:] = [handler]
    root.propagate = False
    level = logging.WARNING if quiet else logging.INFO if verbose == 0 else logging.DEBUG
    root.setLevel(level)


def json_mode() -> bool:
    return _format == "json"


def add_log_format_arg(p: argparse.ArgumentParser | Any) -> None:
    """One flag for every subcommand that logs, so they all spell it the same."""
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="stderr as text for people (default), or json: one object per line "
                   "with ts, level, event, msg and the event's fields")


def _safe_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """`extra=` may not shadow LogRecord attributes (logging raises); rename the rare clash."""
    return {(f"{k}_" if k in _RESERVED else k): v for k, v in fields.items()}


def event(name: str, msg: str, /, *, level: int = logging.INFO, always: bool = False,
          **fields: Any) -> None:
    """A log line with a machine-readable event name and fields (both formats).

    `always` writes it whatever the level (-q sets WARNING): a pipeline must see how every
    command ended, and `exit` is that event."""
    extra = {"event": name, **_safe_fields(fields)}
    if always and not log.isEnabledFor(level):
        log.handle(log.makeRecord(log.name, level, __file__, 0, "%s", (msg,), None,
                                  extra=extra))
        return
    log.log(level, "%s", msg, extra=extra)


def say(name: str, msg: str, /, *, text: str | None = None, level: int = logging.INFO,
        **fields: Any) -> None:
    """A line written for people (no `tmbatch: LEVEL:` prefix) that is an event for machines.

    Text mode prints `text` (default `msg`) exactly as before, whatever the log
    level, because callers decide themselves when people want it (e.g. not with -q).
    """
    if _format == "json":
        event(name, msg.strip(), level=level, **fields)
    else:
        _write(REDACT.scrub(msg if text is None else text))


def _write(text: str) -> None:
    """A line to stderr; through tqdm when a progress bar is drawn there, which clears the
    bar, writes the line and draws the bar again below it, instead of writing into it.
    tqdm is imported only to draw a bar (`progress`), ~10 ms of every start: not imported,
    no bar is drawn."""
    bars = sys.modules.get("tqdm")
    if bars is not None and getattr(bars.tqdm, "_instances", None):
        bars.tqdm.write(text.lstrip("\n"), file=sys.stderr)
        return
    print(text, file=sys.stderr, flush=True)


def progress_kwargs() -> dict[str, Any]:
    """Arguments for `Progress`: in JSON mode no bar (even on a TTY) and events instead."""
    if _format != "json":
        return {}
    return {"emit": _emit_progress, "tty": False}


def _emit_progress(name: str, snap: dict[str, Any]) -> None:
    total = f"/{snap['total']}" if snap.get("total") else ""
    event(name, f"{snap['done']}{total} done, {snap['failed']} failed, {snap['in_flight']} in "
          f"flight, {snap['req_per_s']} req/s", **snap)


def public_url(url: str) -> str:
    """A base URL fit for a log: user:password@ and query strings can hold credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "[unparsable url]"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))

