"""What a job spent: tokens by model from `usage`, as the journal keeps them and people read them.

The numbers are facts (what the server's `usage` said, or the worst case of an attempt that
may have been billed without saying); dollars are those tokens at the prices the user gave.
`budget` keeps the books while a run goes; `status` and `report` read them back here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tmbatch.spend.prices import Prices


@dataclass(slots=True)
class Tokens:
    """Tokens one model was billed for, and how many answers (or possible answers) they were."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    requests: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def add(self, prompt: int, completion: int, cached: int = 0, requests: int = 1) -> None:
        self.prompt += prompt
        self.completion += completion
        self.cached += cached
        self.requests += requests

    def as_list(self) -> list[int]:
        return [self.prompt, self.completion, self.cached, self.requests]

    @classmethod
    def of(cls, raw: Iterable[Any]) -> Tokens:
        nums = [int(v) if isinstance(v, int | float) else 0 for v in raw][:4]
        return cls(*nums)


def spend_status(state: Any) -> dict[str, Any] | None:
    """The job's spend as the journal says (`journal.ResumeState`), priced at the last run's
    prices, with its last budget; None for a journal an older tmbatch wrote."""
    if state.spend is None:
        return None
    rec = state.budget  # a journal.BudgetRecord, or None
    prices = Prices.from_json(None if rec is None else rec.prices)
    by_model = {}
    usd = 0.0
    for model, row in sorted(state.spend.items()):
        t = Tokens.of(row)
        price = prices.get(model)
        cost = None if price is None else price.cost(t.prompt, t.completion, t.cached)
        usd += cost or 0.0
        by_model[model] = {"tokens": t.total, "prompt": t.prompt, "completion": t.completion,
                           "cached": t.cached, "requests": t.requests,
                           "usd": None if cost is None else round(cost, 6)}
    return {
        "tokens": sum(m["tokens"] for m in by_model.values()),
        "usd": round(usd, 6) if prices else None,
        "usd_excludes_models": sorted(m for m in by_model if prices.get(m) is None)
        if prices else [],
        "by_model": by_model,
        "budget": {"tokens": None if rec is None else rec.tokens,
                   "usd": None if rec is None else rec.usd},
        "unknown_attempts": state.spend_unknown,
    }


def render_spend(s: dict[str, Any] | None) -> str:
    """`tmbatch status`'s spend line."""
    if s is None:
        return "unknown (the journal was written by a tmbatch that did not record spend)"
    text = f"{s['tokens']:,} tokens"
    budget = s["budget"]
    if budget.get("tokens"):
        text += f" of a budget of {budget['tokens']:,}"
    if s["usd"] is not None:
        text += f", {money(s['usd'])}"
        if budget.get("usd"):
            text += f" of {money(budget['usd'])}"
        if s["usd_excludes_models"]:
            text += f" (excludes {', '.join(s['usd_excludes_models'])}: no price)"
    parts = [f"{m} {v['tokens']:,}" for m, v in s["by_model"].items()]
    if len(parts) > 1:
        text += " (" + ", ".join(parts) + ")"
    if s["unknown_attempts"]:
        text += f"; {s['unknown_attempts']} cut-off attempt(s) of unknown spend"
    return text


def money(usd: float) -> str:
    """US dollars to four significant digits: `$0.001234`, `$0.05`, `$12.35`, `$1,235`.

    Small jobs cost fractions of a cent: shown to the cent they all read `$0.00`. Trailing
    zeros go (a budget of 0.05 reads `$0.05`, not `$0.05000`), down to two decimals."""
    if not math.isfinite(usd):
        return f"${usd}"
    if usd == 0:
        return "$0.00"
    digits = max(0, 3 - math.floor(math.log10(abs(usd))))
    text = f"{usd:,.{digits}f}"
    if digits > 2:
        head, _, tail = text.partition(".")
        text = f"{head}.{tail.rstrip('0').ljust(2, '0')}"
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def short(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"
