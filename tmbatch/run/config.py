"""What one `tmbatch run` (or `resend`) was asked to do: one frozen `RunConfig`.

`cli.resolve` builds it once from the flags, the job file, the environment and the defaults
(`base.defaults`), in that order, and nothing changes it afterwards: the output directory, the
runner and the progress line read it, and what a run learns once it is going (the simulator's
address, the models the server serves) is `Learnt`, handed to `Runner.send`, never written
into the config. It lives apart from the runner because the output directory, the job files
and the CLI all read it, and none of them should need the runner to do so.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tmbatch.base import defaults as D
from tmbatch.base.config import Settings
from tmbatch.inputs.bodies import BodyTable
from tmbatch.inputs.lines import Shard
from tmbatch.spend.budget import BudgetSpec


@dataclass(frozen=True)
class Fleet:
    """Many pods, one account (docs: Fleet): what is shared through Redis, and where the
    run's metrics go. `job` names the job for both: the Pushgateway's group and the Redis
    keys' prefix (None: the job id, which only a pinned --job-id makes the shards' own)."""

    metrics_port: int | None = None  # serve /metrics here
    pushgateway: str | None = None  # PUT the metrics here every 15 s and at exit
    redis: str | None = None  # share the lanes' pauses, paces and the budget through it
    job: str | None = None  # --redis-prefix, else the job file's name, else --job-id
    budget_tokens: int | None = None  # the whole job's budget (RunConfig.budget: the share)
    budget_usd: float | None = None

    @property
    def observed(self) -> bool:
        return self.metrics_port is not None or self.pushgateway is not None


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run, resolved. A field's default is the table's
    (`base.defaults`), for the parts built without the resolver (`resend`, tests)."""

    input: str  # the JSONL the run reads (a labelling job's: OUTPUT/requests.jsonl)
    out_dir: Path  # with an output URL: the local working directory (`run.remote`)
    endpoint: str | None = None  # normalized route of bare bodies
    model: str | None = None
    stream: bool | None = None
    concurrency: int = D.CONCURRENCY.value
    rpm: float | None = None  # this shard's share of the account's limit
    tpm: float | None = None
    adaptive: bool | None = None  # None: adaptive concurrency exactly when no --rpm
    limit_scope: str = D.LIMIT_SCOPE.value  # one lane per model, or "account": one for all
    patience: float = D.PATIENCE.value  # seconds with no success at all before refusals fail
    fsync: str = D.FSYNC.value
    restart: bool = False
    # -o s3://... (gs://, az://, file://): the bucket the journal ships to as segments, and
    # the outputs are published in; `out_dir` is then the local working directory
    output_url: str | None = None
    drain_timeout: float = D.DRAIN_TIMEOUT.value
    job_id: str | None = None
    shard: Shard | None = None
    quiet: bool = False
    progress_interval: float = D.PROGRESS_INTERVAL.value
    max_line_bytes: int = D.MAX_LINE_BYTES.value
    budget: BudgetSpec = field(default_factory=BudgetSpec)  # limits and prices (this shard's)
    fleet: Fleet = field(default_factory=Fleet)  # metrics and Redis (docs: Fleet)
    # The connection as resolved (key, URL, timeouts; its own `sources`). None only for a
    # config that sends nothing (a test of the progress line).
    connection: Settings | None = None
    preflight: bool = True  # the checks before the first request (not --no-preflight)
    sim: bool = False  # send to the simulator started in-process (its address: `Learnt`)
    ordered: bool = False  # write the outputs in input order too, when the run finishes
    cache: Path | None = None  # --cache: the response cache's SQLite file (docs/cache.md)
    cache_mode: str = D.CACHE_MODE.value
    output_format: str = D.OUTPUT_FORMAT.value  # parquet/csv: outcomes.<fmt> when it finishes
    # --models: every line to each, one output directory per model (`run.fanout`); empty:
    # the lines' own models
    models: tuple[str, ...] = ()
    samples: int = D.SAMPLES.value  # --samples: answers per line and model (`inputs.samples`)
    samples_via: str = D.SAMPLES_VIA.value  # --samples-via: n (one request a line) or seed
    records: str | None = None  # a labelling job's records, rendered into `input`
    table: BodyTable | None = None  # a table of request bodies, staged into `input`
    only_lines: AbstractSet[int] | None = None  # resend: exactly these lines (a frozenset)
    prior_attempts: Mapping[int, int] = field(default_factory=dict)  # resend: attempts so far
    extra_header: Mapping[str, Any] = field(default_factory=dict)  # resend: in the resume record
    # resend --input: these checked, corrected requests (at their input line numbers) are
    # sent instead of the input's lines; the input is then neither read nor fingerprinted
    requests: tuple[Any, ...] | None = None
    # setting -> where its value came from ("flag --rpm", "job file rpm at jobs/x.toml",
    # "env JOB_COMPLETION_INDEX", "default"): what `--print-config` shows
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # frozen all the way down: the mappings and sets a caller passed become read-only
        for name in ("prior_attempts", "extra_header", "sources"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))
        if self.only_lines is not None and not isinstance(self.only_lines, frozenset):
            object.__setattr__(self, "only_lines", frozenset(self.only_lines))

    @property
    def is_adaptive(self) -> bool:
        """No --rpm: the pace is learnt from refusals and rate-limit headers, unless
        --adaptive / --no-adaptive says otherwise."""
        return self.rpm is None if self.adaptive is None else self.adaptive

    @property
    def alone(self) -> bool:
        """No other shard of the job sends to the same limits (rule 4 meets a window as its
        own only then; a fleet over --redis is told by the admission)."""
        return not self.shard or self.shard[1] == 1

    def request_shape(self) -> dict[str, Any]:
        """The options that shape requests: a resume must use the same ones."""
        return {"endpoint": self.endpoint, "model": self.model, "stream": self.stream,
                "shard": list(self.shard) if self.shard else None,
                # absent from journals without samples: None keeps them resumable
                "samples": self.samples if self.samples > 1 else None}


def out_dir_of(input_arg: str, output: str | None) -> Path:
    """The default output directory: INPUT's name + .out (stdin.out for `-`)."""
    if output:
        return Path(output)
    return Path((Path(input_arg).stem if input_arg != "-" else "stdin") + ".out")


@dataclass(frozen=True)
class Learnt:
    """What a run learns after its config, before its first request: where it really sends
    (the simulator's address with --sim) and which models the server serves (preflight's
    GET /v1/models: a line naming another fails `permanent`, unsent; None: not checked)."""

    settings: Settings
    served_models: tuple[str, ...] | None = None
