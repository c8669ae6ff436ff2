"""What a batch will cost, before anything billable is sent.

Per model: lines, estimated prompt tokens (`tokens.prompt_tokens`, the rule `--tpm` and
budgets use), the output ceiling (each line's max_tokens / max_completion_tokens /
max_output_tokens times `n`, or the stated default), and, at the user's prices, a cost range:
"worst" when every answer uses its whole ceiling, "expected" when answers use a share of it
(`--expected-output`, half by default: real answers usually stop well before the cap).

`--tokenize` asks the server's /tokenize (idempotent, not billed) for a sample of lines and
says how far the estimate is from the server's own count, so the figures can be trusted or
scaled. `check_before_sending` is the same estimate applied to a run's budget.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError, Settings
from tmbatch.base.logs import REDACT
from tmbatch.inputs.files import open_input
from tmbatch.inputs.reader import BadLine, ReadStats, Request, read_requests
from tmbatch.inputs.tables import unit_of
from tmbatch.policy import AttemptFailed
from tmbatch.spend.budget import Budget, BudgetSpec
from tmbatch.spend.prices import Prices
from tmbatch.spend.tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    output_cap,
    output_ceiling,
    prompt_tokens,
)
from tmbatch.spend.usage import money, short

DEFAULT_EXPECTED_OUTPUT = 0.5
DEFAULT_SAMPLE = 20
BAD_KEPT = 1000  # bad lines kept for the JSON report (all are counted, and listed as read)


@dataclass
class ModelLines:
    """One model's share of the input."""

    lines: int = 0  # billed lines
    prompt: int = 0  # estimated prompt tokens of its billed lines
    output: int = 0  # their output ceiling
    uncapped: int = 0  # billed lines that set no output cap (counted at the default)
    unbilled: int = 0  # /tokenize and /detokenize lines: not billed, not counted

    @property
    def worst_tokens(self) -> int:
        return self.prompt + self.output


@dataclass
class TokenizeCheck:
    """How the estimate compared with the server's /tokenize on a sample."""

    sampled: int = 0
    estimated: int = 0
    counted: int = 0
    ratios: list[float] = field(default_factory=list)  # estimate / count, per line
    skipped: int = 0  # sampled lines whose prompt /tokenize cannot take
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return self.estimated / self.counted if self.counted else None

    def as_json(self) -> dict[str, Any]:
        return {
            "sampled": self.sampled, "estimated_prompt_tokens": self.estimated,
            "server_prompt_tokens": self.counted,
            "estimate_to_server": None if self.ratio is None else round(self.ratio, 3),
            "per_line_min": round(min(self.ratios), 3) if self.ratios else None,
            "per_line_max": round(max(self.ratios), 3) if self.ratios else None,
            "skipped": self.skipped, "errors": self.errors[:5],
        }

    def describe(self) -> str:
        if self.ratio is None:
            why = self.errors[0] if self.errors else "no sampled line could be tokenized"
            return f"tokenize: could not compare ({why})"
        direction = "over" if self.ratio >= 1 else "under"
        return (f"tokenize: on {self.sampled} sampled line(s) the server counted "
                f"{self.counted:,} prompt tokens, the estimate {self.estimated:,} "
                f"({abs(self.ratio - 1) * 100:.0f}% {direction}; per line "
                f"{min(self.ratios):.2f}-{max(self.ratios):.2f} of the server's count)")


@dataclass
class Estimate:
    """The estimate of one input, built line by line in constant memory (plus a sample)."""

    source: str
    stats: ReadStats = field(default_factory=ReadStats)
    by_model: dict[str, ModelLines] = field(default_factory=dict)
    bad: int = 0
    bad_kept: list[BadLine] = field(default_factory=list)
    sample_size: int = 0
    sample: list[Request] = field(default_factory=list)
    _billed_seen: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, item: Request | BadLine) -> None:
        if isinstance(item, BadLine):
            self.bad += 1
            if len(self.bad_kept) < BAD_KEPT:
                self.bad_kept.append(item)
            return
        model = item.body.get("model")
        m = self.by_model.setdefault(model if isinstance(model, str) else "", ModelLines())
        if item.idempotent:
            m.unbilled += 1
            return
        m.lines += 1
        m.prompt += prompt_tokens(item.body)
        m.output += output_ceiling(item.body)
        if output_cap(item.body) is None:
            m.uncapped += 1
        self._keep_sample(item)

    def _keep_sample(self, item: Request) -> None:
        """Reservoir sampling: every billed line equally likely, whatever the file's size."""
        if not self.sample_size:
            return
        self._billed_seen += 1
        if len(self.sample) < self.sample_size:
            self.sample.append(item)
        else:
            j = self._rng.randrange(self._billed_seen)
            if j < self.sample_size:
                self.sample[j] = item

    @property
    def valid(self) -> int:
        return sum(m.lines + m.unbilled for m in self.by_model.values())

    def total(self) -> ModelLines:
        t = ModelLines()
        for m in self.by_model.values():
            t.lines += m.lines
            t.prompt += m.prompt
            t.output += m.output
            t.uncapped += m.uncapped
            t.unbilled += m.unbilled
        return t

    def billed_models(self) -> list[str]:
        return sorted(k for k, m in self.by_model.items() if m.lines)

    def cost(self, prices: Prices, model: str, share: float) -> tuple[float, float] | None:
        """(expected, worst) USD for a model's lines; None without a price."""
        price = prices.get(model)
        if price is None:
            return None
        m = self.by_model[model]
        return price.cost(m.prompt, m.output * share), price.cost(m.prompt, m.output)

    def as_json(self, prices: Prices, share: float,
                tokenize: TokenizeCheck | None) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        expected = worst = 0.0
        for model, m in sorted(self.by_model.items()):
            cost = self.cost(prices, model, share) if m.lines else None
            if cost is not None:
                expected += cost[0]
                worst += cost[1]
            rows[model] = {"lines": m.lines, "prompt_tokens": m.prompt, "output_ceiling": m.output,
                           "worst_tokens": m.worst_tokens, "lines_without_output_cap": m.uncapped,
                           "unbilled_lines": m.unbilled,
                           "cost_usd": None if cost is None else
                           {"expected": round(cost[0], 6), "worst": round(cost[1], 6)}}
        t = self.total()
        missing = prices.missing(self.billed_models())
        return {
            "input": self.source, "lines": self.stats.lines, "valid": self.valid,
            "invalid": self.bad, "blank": self.stats.blank,
            "by_model": rows,
            "total": {"lines": t.lines, "prompt_tokens": t.prompt, "output_ceiling": t.output,
                      "worst_tokens": t.worst_tokens, "lines_without_output_cap": t.uncapped,
                      "unbilled_lines": t.unbilled,
                      "cost_usd": {"expected": round(expected, 6), "worst": round(worst, 6),
                                   "excludes_models": missing} if prices else None},
            "default_output_cap": DEFAULT_MAX_OUTPUT_TOKENS,
            "expected_output_share": share,
            "prices_from": prices.sources,
            "unpriced_models": missing if prices else self.billed_models(),
            "tokenize": None if tokenize is None else tokenize.as_json(),
        }

    def render(self, prices: Prices, share: float, tokenize: TokenizeCheck | None) -> str:
        head = (f"{self.source}: {self.stats.lines:,} lines, {self.valid:,} valid, "
                f"{self.bad:,} invalid, {self.stats.blank:,} blank skipped")
        header = ["model", "lines", "prompt tok", "output ceiling", "worst tok"]
        if prices:
            header += ["cost expected", "cost worst"]
        table = [header]
        expected = worst = 0.0
        for model in self.billed_models():
            m = self.by_model[model]
            row = [model or "(none)", f"{m.lines:,}", f"~{m.prompt:,}", f"{m.output:,}",
                   f"{m.worst_tokens:,}"]
            if prices:
                cost = self.cost(prices, model, share)
                if cost is None:
                    row += ["no price", "no price"]
                else:
                    expected += cost[0]
                    worst += cost[1]
                    row += [money(cost[0]), money(cost[1])]
            table.append(row)
        t = self.total()
        missing = prices.missing(self.billed_models())
        total = ["total", f"{t.lines:,}", f"~{t.prompt:,}", f"{t.output:,}", f"{t.worst_tokens:,}"]
        if prices:
            mark = "*" if missing else ""
            total += [f"{money(expected)}{mark}", f"{money(worst)}{mark}"]
        table.append(total)
        lines = [head, *_columns(table)]
        if t.uncapped:
            lines.append(f"{t.uncapped:,} line(s) set no max_tokens / max_completion_tokens / "
                         f"max_output_tokens: counted at {DEFAULT_MAX_OUTPUT_TOKENS} output "
                         "tokens each (the server may allow more)")
        if t.unbilled:
            lines.append(f"{t.unbilled:,} /tokenize or /detokenize line(s): not billed, not "
                         "counted")
        if prices:
            lines.append(f"prices: USD per million tokens from {', '.join(prices.sources)}; "
                         f"expected = prompt + {share:.0%} of the output ceiling, worst = all of "
                         "it")
            if missing:
                lines.append(f"* cost figures exclude {', '.join(missing)}: no price given "
                             f"(--price {missing[0]}=IN:OUT)")
        else:
            lines.append("no prices given: --prices FILE or --price MODEL=IN:OUT (USD per "
                         "million tokens) adds cost")
        if tokenize is not None:
            lines.append(tokenize.describe())
        return "\n".join(lines)


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]


# -- reading ---------------------------------------------------------------------------------
def requests_of(path: str, *, endpoint: str | None, model: str | None, stats: ReadStats,
                label: tuple[Path, dict[str, Any]] | None = None) -> Iterator[Request | BadLine]:
    """The input's requests as `run` would send them (a labelling job's rendered records)."""
    f = open_input(path)
    try:
        if label is None:
            yield from read_requests(f, endpoint=endpoint, model=model, stats=stats)
        else:
            yield from _label_requests(f, label, model, stats)
    finally:
        if path != "-":
            f.close()


def _label_requests(f: Any, label: tuple[Path, dict[str, Any]], model: str | None,
                    stats: ReadStats) -> Iterator[Request | BadLine]:
    from tmbatch.inputs import templates

    spec = templates.load_spec(*label)
    if not model:
        raise ConfigError("a labelling job needs a model: set `model` in the job file or pass "
                          "--model")
    unit = unit_of(f)
    for line, raw in templates.iter_records(f):
        stats.lines = line
        if not raw:
            stats.blank += 1
            continue
        item = templates.render(spec, raw, line, model, unit)
        if isinstance(item, templates.RecordError):
            yield BadLine(line, None, item.code, item.message)
        else:
            yield Request(line, item["custom_id"], item["url"], item["body"])


def estimate(path: str, *, endpoint: str | None, model: str | None, sample: int = 0,
             label: tuple[Path, dict[str, Any]] | None = None,
             on_bad: Any = None) -> Estimate:
    est = Estimate(path, sample_size=sample)
    for item in requests_of(path, endpoint=endpoint, model=model, stats=est.stats, label=label):
        est.add(item)
        if on_bad is not None and isinstance(item, BadLine):
            on_bad(item)
    return est


# -- /tokenize ------------------------------------------------------------------------------
def tokenize_body(req: Request) -> dict[str, Any] | None:
    """What /tokenize takes for this line's prompt: chat messages or one prompt string."""
    body = req.body
    out: dict[str, Any] = {"model": body.get("model")}
    messages = body.get("messages")
    if isinstance(messages, list):
        return {**out, "messages": messages}
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return {**out, "prompt": value}
        if key == "input" and isinstance(value, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            return {**out, "messages": [{"role": m.get("role", "user"), "content": m["content"]}
                                        for m in value]}
    return None


async def tokenize_sample(settings: Settings, sample: list[Request]) -> TokenizeCheck:
    """Ask the server to count the sample's prompts (4 at a time); a refused key raises."""
    from tmbatch.client.http import make_session, send

    check = TokenizeCheck()
    session = make_session(settings, 4)
    gate = asyncio.Semaphore(4)

    async def one(req: Request) -> None:
        body = tokenize_body(req)
        if body is None:
            check.skipped += 1
            return
        async with gate:
            try:
                answer = await send(session, "/tokenize", body)
            except AttemptFailed as exc:
                if exc.cls.policy.stops_run:
                    raise
                check.errors.append(REDACT.scrub(f"line {req.line}: {exc.code}: {exc.message}"))
                return
        count = answer.body.get("count")
        if not isinstance(count, int) or count <= 0:
            check.errors.append(f"line {req.line}: /tokenize answered no count")
            return
        est = prompt_tokens(req.body)
        check.sampled += 1
        check.estimated += est
        check.counted += count
        check.ratios.append(est / count)

    try:
        await asyncio.gather(*(one(r) for r in sample))
    finally:
        await session.close()
    return check


# -- before a run sends anything -----------------------------------------------------------
SCAN_LINES = 10_000
SCAN_SECONDS = 2.0


def check_before_sending(spec: BudgetSpec, input_path: str, *, endpoint: str | None,
                         model: str | None, stream: bool | None = None,
                         shard: tuple[int, int] | None = None,
                         max_line_bytes: int | None = None) -> None:
    """Refuse, before a byte is sent, a budget smaller than one request and a USD budget for
    models without a price (in the first lines of the input, as preflight reads them)."""
    if not spec.limited or input_path == "-":
        return
    kwargs: dict[str, Any] = {} if max_line_bytes is None else {"max_line_bytes": max_line_bytes}
    first: Request | None = None
    unpriced: dict[str, int] = {}
    deadline = time.monotonic() + SCAN_SECONDS
    f = open_input(input_path)
    try:
        items = read_requests(f, endpoint=endpoint, model=model, stream=stream, shard=shard,
                              **kwargs)
        for n, item in enumerate(items, 1):
            if isinstance(item, Request) and not item.idempotent:
                first = first or item
                m = item.body.get("model")
                if spec.usd is not None and spec.prices.get(m) is None:
                    unpriced.setdefault(str(m), item.line)
            if n >= SCAN_LINES or (n % 256 == 0 and time.monotonic() > deadline):
                break
    finally:
        f.close()
    if unpriced:
        names = ", ".join(f"{m!r} (line {line})" for m, line in unpriced.items())
        raise ConfigError(f"--budget-usd needs a price for every model, and these have none: "
                          f"{names}; give --price {next(iter(unpriced))}=IN:OUT (USD per million "
                          "tokens) or --prices FILE")
    if first is not None:
        _fits_one(spec, first)


def _fits_one(spec: BudgetSpec, first: Request) -> None:
    res = Budget(spec).worst_case(first)
    where = f"line {first.line} ({first.custom_id})"
    if spec.tokens is not None and res.tokens > spec.tokens:
        raise ConfigError(
            f"--budget-tokens {spec.tokens:,} is smaller than one request: {where} may use up "
            f"to {res.tokens:,} tokens (prompt ~{res.prompt:,} + output ceiling "
            f"{res.output:,}); raise the budget or lower the line's max_tokens")
    if spec.usd is not None and res.usd > spec.usd:
        raise ConfigError(
            f"--budget-usd {spec.usd:g} is smaller than one request: {where} may cost up to "
            f"${res.usd:.6f} ({short(res.tokens)} tokens at its price); raise the budget or "
            "lower the line's max_tokens")
