"""A run's use of the response cache (`journal.cache`): look up before admission, store after
the result is on disk, and count what it saved.

A hit never takes an admission permit, so it costs no budget, no tokens per minute and no
place in the pace; it is written to results.jsonl like any answer (marked `"cached": true`)
and journaled as an `ok` outcome with code `cached`, so resume and merge count it done.

A miss is stored only after its result line has reached the OS: the store is queued and
committed at the end of the loop tick, after `Writer.flush` (called again here, so the order
does not rest on callback order). So kill -9 can leave a result without its cache entry (the
next run in another directory sends that line again) but never a cache entry without its
result line.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.defaults import CACHE_WAIT
from tmbatch.base.logs import public_url
from tmbatch.client.http import Answer
from tmbatch.inputs.reader import Request
from tmbatch.journal.cache import Entry, Hit, ResponseCache, cache_key, storable
from tmbatch.journal.records import usage_tokens
from tmbatch.journal.writer import Writer, WriterError
from tmbatch.run.config import RunConfig
from tmbatch.spend.prices import Prices

log = logging.getLogger("tmbatch")
SIM_BASE = "tmbatch-sim"  # --sim's server: its port changes every run, its answers do not


def open_cache(config: RunConfig) -> ResponseCache | None:
    """The run's cache, opened and checked (a CacheError, exit 2, before anything is sent),
    or None without --cache or with --cache-mode off."""
    if config.cache is None or config.cache_mode == "off":
        return None
    return ResponseCache.open(config.cache, config.cache_mode, CACHE_WAIT.value)


@dataclass
class RunCache:
    """The open cache as one run uses it, and this run's counts."""

    cache: ResponseCache
    base_url: str  # the server part of every key (`key_base`)
    writer: Writer
    prices: Prices = field(default_factory=Prices)
    hits: int = 0
    misses: int = 0
    stored: int = 0
    errors: int = 0  # lookups or stores SQLite refused mid-run (the line was sent / kept)
    prompt_saved: int = 0
    completion_saved: int = 0
    usd_saved: float = 0.0
    unpriced: set[str] = field(default_factory=set)
    _queue: list[Entry] = field(default_factory=list)

    @property
    def reads(self) -> bool:
        return self.cache.mode in ("read-write", "read-only")

    @property
    def writes(self) -> bool:
        return self.cache.mode in ("read-write", "write-only")

    def lookup(self, req: Request) -> Hit | None:
        """The stored answer for `req`, counted as a hit (with what it saved) or a miss."""
        if not self.reads:
            return None
        try:
            hit = self.cache.get(cache_key(self.base_url, req.url, req.body, req.sample or 0))
        except sqlite3.Error as exc:
            self._error("lookup", exc)
            hit = None
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self.prompt_saved += hit.prompt_tokens
        self.completion_saved += hit.completion_tokens
        price = self.prices.get(hit.model) if self.prices else None
        if price is not None:
            self.usd_saved += price.cost(hit.prompt_tokens, hit.completion_tokens)
        elif self.prices and hit.model:
            self.unpriced.add(hit.model)
        return hit

    def store(self, req: Request, answer: Answer) -> None:
        """Queue a complete success for the end of the tick (after its result line)."""
        if not self.writes or not storable(req.url, answer.body):
            return
        raw = answer.raw
        if raw is None or raw.find(b"\n") >= 0 or raw.find(b"\r") >= 0:
            raw = orjson.dumps(answer.body)
        used = usage_tokens(answer.body) or (0, 0, 0)
        model = req.body.get("model")
        self._queue.append(Entry(
            cache_key(self.base_url, req.url, req.body, req.sample or 0), req.url,
            model if isinstance(model, str) else None, req.sample or 0, answer.status,
            answer.request_id, raw, used[0], used[1]))
        if len(self._queue) == 1:
            asyncio.get_running_loop().call_soon(self.commit)

    def commit(self) -> None:
        """The queued answers, after the results they belong to are written out."""
        if not self._queue:
            return
        entries, self._queue = self._queue, []
        try:
            self.writer.flush()  # the result lines first, whatever ran before this callback
        except WriterError:
            return  # the run stops on it; an answer not on disk is never cached
        try:
            self.cache.put(entries)
        except sqlite3.Error as exc:
            self._error("store", exc)
            return
        self.stored += len(entries)

    def _error(self, what: str, exc: sqlite3.Error) -> None:
        self.errors += 1
        if self.errors == 1:
            log.warning("cache %s: %s failed (%s): the line is sent (or its answer kept only "
                        "in results.jsonl); further cache errors are counted in summary.json",
                        self.cache.path, what, exc, extra={"event": "cache_error"})

    def report(self) -> dict[str, Any]:
        """summary.json's `cache`: this run's hits, misses and the spend they avoided."""
        priced = bool(self.prices)
        out: dict[str, Any] = {
            "path": str(self.cache.path), "mode": self.cache.mode, "hits": self.hits,
            "misses": self.misses, "stored": self.stored, "errors": self.errors,
            "tokens_saved": {"prompt": self.prompt_saved, "completion": self.completion_saved,
                             "total": self.prompt_saved + self.completion_saved},
            "usd_saved": round(self.usd_saved, 6) if priced else None,
        }
        if self.unpriced:
            out["unpriced_models"] = sorted(self.unpriced)
        return out

    def report_after(self, previous: Any) -> dict[str, Any]:
        """`report`, or the last run's when this one had nothing to look up (a rerun of a
        finished job keeps what the cache did for it, as summary.json keeps `this_run`)."""
        earlier = getattr(previous, "cache", None)
        if not (self.hits or self.misses) and isinstance(earlier, dict):
            return earlier
        return self.report()

    def line(self) -> str:
        """The run's last words on the cache (after the summary line)."""
        r = self.report()
        saved = f"{r['tokens_saved']['total']:,} tokens"
        if r["usd_saved"] is not None:
            saved += f", ${r['usd_saved']:.4f}"
        return (f"cache {self.cache.path} ({self.cache.mode}): {self.hits} hit(s), "
                f"{self.misses} miss(es), {self.stored} stored; saved {saved}")

    def close(self, output: Path) -> None:
        """The last answers, and this run's row in the cache's history."""
        self.commit()
        try:
            if self.cache.mode != "read-only":
                self.cache.record_run(str(output), self.hits, self.misses, self.stored,
                                      self.prompt_saved + self.completion_saved,
                                      round(self.usd_saved, 6) if self.prices else None)
        except sqlite3.Error as exc:
            self._error("history", exc)
        finally:
            self.cache.close()


def key_base(base_url: str, sim: bool) -> str:
    """The server part of a key: the base URL without credentials, or `tmbatch-sim`."""
    return SIM_BASE if sim else public_url(base_url).rstrip("/")
