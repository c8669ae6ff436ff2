"""Prices the user supplies: USD per million tokens, per model. tmbatch knows none itself.

Prices change, differ by account and are not published by any API tmbatch talks to, so a
cost figure is only ever "these tokens at the prices you gave". They come from a file
(`--prices FILE`, TOML or JSON), from `--price MODEL=IN:OUT[:CACHED]`, or from a job file's
`[prices]` table; a flag wins over the file, the file over the job, model by model.

    ["tm-small"]            # a model name, as the requests spell it
    input = 0.20            # USD per million prompt tokens
    output = 0.60           # USD per million generated tokens
    cached_input = 0.05     # optional: prompt tokens the server reports as cached
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError
from tmbatch.base.files import os_problem
from tmbatch.base.tomlcheck import TableChecker, unknown_key

PER = 1_000_000.0  # prices are per million tokens
FIELDS = ("input", "output", "cached_input")
EXAMPLE = '["MODEL"]\ninput = 0.20\noutput = 0.60'


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, prompt: float, completion: float, cached: float = 0.0) -> float:
        """USD for these tokens; cached prompt tokens at the cached price when there is one."""
        cached = min(max(cached, 0.0), prompt)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return ((prompt - cached) * self.input + cached * cached_price
                + completion * self.output) / PER

    def as_dict(self) -> dict[str, float]:
        out = {"input": self.input, "output": self.output}
        if self.cached_input is not None:
            out["cached_input"] = self.cached_input
        return out


@dataclass
class Prices:
    """The run's price table, and where it came from (for messages)."""

    table: dict[str, Price] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.table)

    def get(self, model: str | None) -> Price | None:
        return None if model is None else self.table.get(model)

    def missing(self, models: Iterable[str]) -> list[str]:
        """The models among `models` that have no price, sorted, for one warning."""
        return sorted({m for m in models if m not in self.table})

    def as_json(self) -> dict[str, dict[str, float]]:
        return {m: p.as_dict() for m, p in sorted(self.table.items())}

    @classmethod
    def from_json(cls, data: Any) -> Prices:
        """Prices as a journal or summary recorded them (already checked when given)."""
        table: dict[str, Price] = {}
        if isinstance(data, dict):
            for model, p in data.items():
                if isinstance(p, dict) and isinstance(p.get("input"), int | float) \
                        and isinstance(p.get("output"), int | float):
                    cached = p.get("cached_input")
                    table[model] = Price(float(p["input"]), float(p["output"]),
                                         float(cached) if isinstance(cached, int | float)
                                         else None)
        return cls(table, ["journal"])


def parse_table(path: Path, table: Mapping[str, Any], prefix: str = "") -> dict[str, Price]:
    """Check a table of model -> {input, output, cached_input}; errors name file and key."""
    checker = TableChecker(path, prefix)
    out: dict[str, Price] = {}
    for model, entry in table.items():
        if not model.strip():
            raise ConfigError(f"{path}: a price entry has an empty model name")
        entry = checker.table(model, entry)
        inner = TableChecker(path, f"{prefix}{model}.")
        for key in entry:
            if key not in FIELDS:
                raise unknown_key(path, key, list(FIELDS), f"{prefix}{model}.")
        for key in ("input", "output"):
            if key not in entry:
                raise ConfigError(f"{path}: key `{prefix}{model}.{key}` is missing: give USD per "
                                  f"million {key} tokens, e.g.\n{EXAMPLE}")
        cached = entry.get("cached_input")
        out[model] = Price(
            inner.nonneg_number("input", entry["input"]),
            inner.nonneg_number("output", entry["output"]),
            None if cached is None else inner.nonneg_number("cached_input", cached),
        )
    return out


def load_file(path_text: str) -> dict[str, Price]:
    """A price file: JSON when it ends in .json or starts with `{`, TOML otherwise."""
    path = Path(path_text)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--prices {path}: {os_problem(exc)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--prices {path}: not UTF-8 text") from None
    is_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if is_json else "TOML"
        raise ConfigError(f"--prices {path}: not valid {kind} ({exc}); expected, per model:\n"
                          f"{EXAMPLE}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--prices {path}: expected a table of models, e.g.\n{EXAMPLE}")
    return parse_table(path, data)


def price_flag(text: str) -> tuple[str, Price]:
    """argparse type of `--price MODEL=IN:OUT[:CACHED]` (USD per million tokens).

    The model is everything before the last `=`, so names with `:` or `/` work."""
    model, sep, values = text.rpartition("=")
    parts = values.split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if not sep or not model.strip() or len(numbers) not in (2, 3) \
            or not all(n >= 0 and n != float("inf") for n in numbers):
        raise argparse.ArgumentTypeError(
            f"--price {text!r}: expected MODEL=IN:OUT or MODEL=IN:OUT:CACHED, USD per million "
            "tokens (numbers of 0 or more), e.g. --price tm-small=0.2:0.6")
    return model.strip(), Price(*numbers)


def resolve(file: str | None, flags: list[tuple[str, Price]] | None,
            job_table: Mapping[str, Price] | None, job_name: str | None = None) -> Prices:
    """One table from the three places, model by model: --price > --prices > job file."""
    prices = Prices()
    if job_table:
        prices.table.update(job_table)
        prices.sources.append(f"{job_name or 'the job file'} [prices]")
    if file:
        prices.table.update(load_file(file))
        prices.sources.append(file)
    if flags:
        prices.table.update(dict(flags))
        prices.sources.append("--price")
    return prices
