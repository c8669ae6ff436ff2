"""The response cache across runs: complete answers in one SQLite file, shared by processes.

An evaluation rerun (a new metric, a fixed template, ten more lines) should pay only for what
changed. `--cache PATH` keeps every complete success under a key made of what decides the
answer's content (docs/cache.md spells it):

    sha256(orjson({"v": 1, "base_url", "route", "body" without stream/stream_options,
                   "sample"}, sorted keys))

SQLite in WAL mode (the standard library's sqlite3, nothing to run beside it): readers never
wait for a writer, and several tmbatch processes on one machine can share one file; a write
waits up to `busy` seconds for another process's and then gives up (a lookup that fails is a
miss, a store that fails is an answer not kept: the result line is on disk either way).

What may be stored is decided here (`storable`): only complete successes, never a truncated
(`length`) or filtered (`content_filter`) answer nor a `/v1/responses` one whose status is not
`completed`. Everything a user can get wrong about the file (not a database, not tmbatch's,
locked by another process, read-only) is a `CacheError` at open, before anything is sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import ConfigError

MODES = ("read-write", "read-only", "write-only", "off")
SCHEMA = 1
KEY_VERSION = 1  # in every key: a change of what goes into keys starts a fresh key space
LEFT_OUT = ("stream", "stream_options")  # how the answer travels, not what it says
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
NOT_COMPLETE = ("length", "content_filter")

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key BLOB PRIMARY KEY, route TEXT NOT NULL, model TEXT, sample INTEGER NOT NULL,
    status INTEGER NOT NULL, request_id TEXT, body BLOB NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_created ON entries (created);
CREATE TABLE IF NOT EXISTS runs (
    t REAL NOT NULL, output TEXT, mode TEXT, hits INTEGER, misses INTEGER, stored INTEGER,
    tokens_saved INTEGER, usd_saved REAL
);
"""


class CacheError(ConfigError):
    """The cache file cannot be used as asked: exit 2, before anything is sent."""


def cache_key(base_url: str, route: str, body: Mapping[str, Any], sample: int = 0) -> bytes:
    """The 32-byte key of one request's answer. `body` as the reader made it (the model
    filled in, the template rendered); `sample`: the sample's index (0 until samples exist)."""
    kept = {k: v for k, v in body.items() if k not in LEFT_OUT}
    canon = orjson.dumps({"v": KEY_VERSION, "base_url": base_url.rstrip("/"), "route": route,
                          "body": kept, "sample": sample}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canon).digest()


def storable(route: str, body: Any) -> bool:
    """A complete success: every choice finished for a reason other than a cut (`length`,
    `content_filter`, or no reason at all), or a response whose status is `completed` with
    no incomplete details. Anything else (other routes included) is never stored."""
    if route not in GENERATION_ROUTES or not isinstance(body, dict):
        return False
    if route == "/v1/responses":
        return body.get("status") == "completed" and not body.get("incomplete_details")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if not isinstance(reason, str) or not reason or reason in NOT_COMPLETE:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Hit:
    """A stored answer: what results.jsonl gets, and the tokens it did not cost again."""

    status: int
    request_id: str | None
    body: bytes  # the answer's JSON, one line
    prompt_tokens: int
    completion_tokens: int
    model: str | None


@dataclass(frozen=True, slots=True)
class Entry:
    """One answer to store (`ResponseCache.put`)."""

    key: bytes
    route: str
    model: str | None
    sample: int
    status: int
    request_id: str | None
    body: bytes
    prompt_tokens: int
    completion_tokens: int


def _problem(path: Path, exc: sqlite3.Error, mode: str) -> CacheError:
    """What went wrong with the file, in words, with what to do."""
    text = str(exc)
    if "not a database" in text or (isinstance(exc, sqlite3.DatabaseError) and "malformed" in text):
        return CacheError(f"--cache {path}: not a tmbatch cache (the file is not an SQLite "
                          f"database, or a damaged one: {text}); move it aside or point "
                          "--cache at another file. Nothing was sent")
    if "locked" in text or "busy" in text:
        return CacheError(f"--cache {path}: locked by another process ({text}) for longer than "
                          "the wait allows; run again when it is done, or use --cache-mode "
                          "read-only. Nothing was sent")
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        hint = ("use --cache-mode read-only to only read it, or make it writable"
                if mode != "read-only" else "check the path and its permissions")
        return CacheError(f"--cache {path}: cannot be opened for {mode} ({text}); {hint}. "
                          "Nothing was sent")
    return CacheError(f"--cache {path}: {text}; move it aside or point --cache at another "
                      "file. Nothing was sent")


class ResponseCache:
    """One open cache file. Every call runs on the caller's thread (the run's event loop)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, mode: str) -> None:
        self.path, self.conn, self.mode = path, conn, mode

    @classmethod
    def open(cls, path: Path, mode: str = "read-write", busy: float = 5.0) -> ResponseCache:
        """Open (and in a writing mode create) the cache, and prove it usable now: a
        CacheError otherwise. A writing mode takes the write lock once, so a file another
        process holds locked fails here, not at the first answer."""
        if mode not in MODES or mode == "off":
            raise ValueError(f"cache mode must be one of {MODES[:3]}")
        if path.is_dir():
            raise CacheError(f"--cache {path}: is a directory; name a file (e.g. {path}/"
                             "cache.sqlite)")
        if mode == "read-only" and not path.exists():
            raise CacheError(f"--cache {path}: no such file (read-only mode creates none)")
        try:
            if mode == "read-only":
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                       timeout=busy, isolation_level=None)
            else:
                conn = sqlite3.connect(path, timeout=busy, isolation_level=None)
        except sqlite3.Error as exc:
            raise _problem(path, exc, mode) from None
        try:
            cls._check_within(conn, mode, path, busy)
        except sqlite3.Error as exc:
            conn.close()
            raise _problem(path, exc, mode) from None
        except CacheError:
            conn.close()
            raise
        return cls(path, conn, mode)

    @classmethod
    def _check_within(cls, conn: sqlite3.Connection, mode: str, path: Path,
                      busy: float) -> None:
        """`_check`, tried again while another process holds the file for up to `busy`
        seconds: SQLite answers some lock conflicts at once without its busy wait (two
        processes creating one file, or switching it to WAL, at the same moment)."""
        deadline = time.monotonic() + busy
        while True:
            try:
                cls._check(conn, mode, path)
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) \
                        or time.monotonic() >= deadline:
                    raise
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                time.sleep(0.01)

    @staticmethod
    def _check(conn: sqlite3.Connection, mode: str, path: Path) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "entries" not in tables:
            raise CacheError(f"--cache {path}: an SQLite database, but not a tmbatch cache "
                             f"(its tables: {', '.join(sorted(tables))}); point --cache at "
                             "another file")
        if mode == "read-only":
            if not tables:
                raise CacheError(f"--cache {path}: empty (no tmbatch cache in it yet)")
            conn.execute("SELECT count(*) FROM entries WHERE 0").fetchall()
            return
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise CacheError(f"--cache {path}: SQLite would not switch it to WAL mode (a "
                             "network file system?); keep the cache on a local disk")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives kill -9, no fsync
        conn.execute("BEGIN IMMEDIATE")  # the write lock, now: locked or read-only says so
        try:
            for statement in _TABLES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- the run's calls ------------------------------------------------------------------
    def get(self, key: bytes) -> Hit | None:
        row = self.conn.execute(
            "SELECT status, request_id, body, prompt_tokens, completion_tokens, model "
            "FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else Hit(row[0], row[1], bytes(row[2]), row[3], row[4],
                                             row[5])

    def put(self, entries: list[Entry]) -> None:
        """Store answers in one transaction (a newer answer under a key replaces the older)."""
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(e.key, e.route, e.model, e.sample, e.status, e.request_id, e.body,
                  e.prompt_tokens, e.completion_tokens, now) for e in entries])

    def record_run(self, output: str, hits: int, misses: int, stored: int, tokens_saved: int,
                   usd_saved: float | None) -> None:
        """One row per run, for `tmbatch cache stats` (not in read-only mode)."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?)",
                              (time.time(), output, self.mode, hits, misses, stored,
                               tokens_saved, usd_saved))

    def close(self) -> None:
        self.conn.close()

    # -- the `tmbatch cache` command ------------------------------------------------------
    def stats(self, last: int = 10) -> dict[str, Any]:
        """Entries, size, the last runs' hits and misses, what the cache saved them."""
        c = self.conn
        n, prompt, completion, oldest, newest = c.execute(
            "SELECT count(*), coalesce(sum(prompt_tokens), 0), "
            "coalesce(sum(completion_tokens), 0), min(created), max(created) FROM entries"
        ).fetchone()
        by_model = {m or "(none)": k for m, k in c.execute(
            "SELECT model, count(*) FROM entries GROUP BY model ORDER BY 2 DESC")}
        runs = [{"t": t, "output": o, "mode": mode, "hits": h, "misses": mi, "stored": s,
                 "tokens_saved": ts, "usd_saved": us}
                for t, o, mode, h, mi, s, ts, us in c.execute(
                    "SELECT * FROM runs ORDER BY t DESC LIMIT ?", (last,))]
        total_hits, total_tokens, total_usd = c.execute(
            "SELECT coalesce(sum(hits), 0), coalesce(sum(tokens_saved), 0), sum(usd_saved) "
            "FROM runs").fetchone()
        return {"path": str(self.path), "entries": n, "bytes": _size(self.path),
                "tokens_stored": {"prompt": prompt, "completion": completion},
                "oldest": oldest, "newest": newest, "by_model": by_model,
                "runs": runs, "all_runs": {"hits": total_hits, "tokens_saved": total_tokens,
                                           "usd_saved": total_usd}}

    def prune(self, older_than: float) -> int:
        """Drop the answers stored more than `older_than` seconds ago; how many went."""
        cut = time.time() - older_than
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            gone = self.conn.execute("DELETE FROM entries WHERE created < ?", (cut,)).rowcount
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(gone)


def _size(path: Path) -> int:
    """The database and its WAL, in bytes: what the cache takes on disk."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total
