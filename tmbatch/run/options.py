"""What one `tmbatch run` (or `resend`) was asked to do, once the command line is parsed.

It lives apart from the runner because the output directory, the job files and the CLI all
read it, and none of them should need the runner to do so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmbatch.inputs.lines import Shard
from tmbatch.inputs.reader import MAX_LINE_BYTES
from tmbatch.spend.budget import BudgetSpec


@dataclass
class RunOptions:
    input: str
    out_dir: Path
    endpoint: str | None = None
    model: str | None = None
    stream: bool | None = None
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    fsync: str = "interval"
    restart: bool = False
    drain_timeout: float = 25.0
    job_id: str | None = None
    shard: Shard | None = None
    quiet: bool = False
    progress_interval: float = 10.0
    max_line_bytes: int = MAX_LINE_BYTES
    fatal_404_after: int = 8
    patience: float = 600.0  # seconds with no success at all before refusals are final
    only_lines: set[int] | None = None  # resend: exactly these lines, even if done
    prior_attempts: dict[int, int] = field(default_factory=dict)  # resend: attempts so far
    adaptive: bool | None = None  # None: adaptive concurrency exactly when no --rpm
    limit_scope: str = "model"  # one lane per model, or "account": one for all
    extra_header: dict[str, Any] = field(default_factory=dict)
    # GET /v1/models' list, when preflight read one: a line naming another model fails
    # `permanent` (model_not_served) without being sent. None: no list, nothing checked.
    served_models: tuple[str, ...] | None = None
    budget: BudgetSpec = field(default_factory=BudgetSpec)  # limits and prices (not the shape)

    @property
    def is_adaptive(self) -> bool:
        """No --rpm: the pace is learnt from refusals and rate-limit headers, unless
        --adaptive / --no-adaptive says otherwise."""
        return self.rpm is None if self.adaptive is None else self.adaptive

    def request_shape(self) -> dict[str, Any]:
        """The options that shape requests: a resume must use the same ones."""
        return {"endpoint": self.endpoint, "model": self.model, "stream": self.stream,
                "shard": list(self.shard) if self.shard else None}
