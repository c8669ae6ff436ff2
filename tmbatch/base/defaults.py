"""Every built-in default of a setting, written once, each with why it is what it is.

A parser leaves its flags None ("not given"), so that a job file and the environment can be
told from the default; the one resolver (`cli.resolve`) fills in from this table last
(flag > job file > environment > default). Library code that needs a default of its own
(`limits.Admission`, `run.attempts.LineSender`, `run.config.RunConfig`, the help texts) names
an entry here rather than writing the number again. `tmbatch run --print-config` shows which
values came from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Default(Generic[T]):
    """A setting's built-in value and the reason for it."""

    value: T
    why: str


SURFACE = Default("serverless", "the surface that needs no gateway of your own: a key is enough")
BASE_URL = Default(
    "https://serverless.tensormesh.ai",
    "the serverless surface's public endpoint (on-demand has none: each provider's gateway "
    "is its own host)")
TIMEOUT = Default(
    600.0,
    "the Tensormesh SDK's: a long generation takes minutes, and a read timeout is `ambiguous` "
    "(possibly billed, never re-sent by itself), so a short one would fail answers on their way")
MAX_RETRIES = Default(
    5,
    "the Tensormesh SDK's; it counts only retries that cost nothing (attempts that never "
    "reached the server); refusals are retried by --patience instead")
CONCURRENCY = Default(
    64,
    "enough in flight to fill a serverless account's usual limits from one process, few enough "
    "that a learnt pace (which starts at 8) finds the limit before the ceiling matters")
LIMIT_SCOPE = Default(
    "model", "OpenAI and LiteLLM limit each model on its own: one lane, pause and pace per model")
PATIENCE = Default(
    600.0,
    "a refusal is not a failure while the run makes progress: ten minutes without one success "
    "in a lane is as long as the longest Retry-After honoured (capped at 600 s), so only a "
    "lane that stays shut past any announced window gives up")
FSYNC = Default(
    "interval",
    "flush every write, fsync once a second: kill -9 loses nothing, power loss at most ~1 s, "
    "without `always`'s fsync before every send")
DRAIN_TIMEOUT = Default(
    25.0,
    "inside Kubernetes' 30 s grace period, with time left to write the files and the summary")
MAX_LINE_BYTES = Default(
    32 * 1024 * 1024,
    "far above any real request (a long context is a few MiB of JSON), low enough that one "
    "broken line cannot take the reader's memory")
PROGRESS_INTERVAL = Default(
    10.0, "a line every 10 s in `kubectl logs` or cron mail: alive, without drowning the log")
RESEND_CONCURRENCY = Default(
    16,
    "a resend is a handful of lines after a run, often ones that failed under load: gentler "
    "than a run's 64")
CACHE_MODE = Default(
    "read-write",
    "a cache named with --cache is meant to be used: answers are looked up, and complete new "
    "ones kept for the next run")
CACHE_WAIT = Default(
    5.0,
    "seconds a cache write waits for another process's: its writes last milliseconds, so "
    "longer is a process holding the file, which should fail the run's start, not stall it")
OUTPUT_FORMAT = Default(
    "jsonl",
    "results.jsonl and failures.jsonl are always written (they are the checkpoint's outcomes); "
    "a table (parquet, csv) is an extra file made from them when the run finishes")
SAMPLES = Default(
    1,
    "one answer per line and model, as the input asks; more are drawn only when asked for "
    "(each is a request billed on its own)")
SAMPLES_VIA = Default(
    "n",
    "one request with the body's `n` bills the prompt once for N samples; where the route, "
    "the line or the server cannot take `n`, each sample is sent with a seed of its own")

# The table: setting -> its default (the names `run --print-config` shows).
DEFAULTS: dict[str, Default[Any]] = {
    "surface": SURFACE,
    "base_url": BASE_URL,
    "timeout": TIMEOUT,
    "max_retries": MAX_RETRIES,
    "concurrency": CONCURRENCY,
    "limit_scope": LIMIT_SCOPE,
    "patience": PATIENCE,
    "fsync": FSYNC,
    "drain_timeout": DRAIN_TIMEOUT,
    "max_line_bytes": MAX_LINE_BYTES,
    "progress_interval": PROGRESS_INTERVAL,
    "resend_concurrency": RESEND_CONCURRENCY,
    "cache_mode": CACHE_MODE,
    "output_format": OUTPUT_FORMAT,
    "samples": SAMPLES,
    "samples_via": SAMPLES_VIA,
}
