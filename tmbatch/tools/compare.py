"""`tmbatch compare`: several runs of one benchmark (models, prompts, days) side by side.

Per run: success rate, failures by class, latency p50/p90/p99, tokens in and out, cost and
finish reasons. Per unit (custom_id and sample, matched across runs): how often the runs give
the same answer (whitespace and case ignored), all of them and each pair; for labelling jobs
the labels' agreement matrix and Cohen's kappa per pair; with the records' gold labels, each
run's accuracy and confusion matrix. The result is one frozen value (`Comparison`) that the
text table, `--json`, `--csv` and the HTML report all show (`compare_render`,
`report_compare`). Reading is `compare_read`'s, the arithmetic `compare_stats`'.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tmbatch.policy import FAILURE_CLASSES
from tmbatch.run.summary import percentile
from tmbatch.spend.prices import Price, Prices
from tmbatch.spend.usage import Tokens
from tmbatch.tools.compare_read import Run, Unit, find_runs, label_runs, load
from tmbatch.tools.compare_stats import (
    Agreement,
    agreement,
    categories,
    cohen_kappa,
    contingency,
    matrix,
)

NO_LABEL = "(none)"  # the confusion matrix's column for a failed line or an invalid label
SHOWN_DISAGREEMENTS = 10


@dataclass(frozen=True, slots=True)
class Accuracy:
    """One run against the records' gold labels: rows are gold, columns the run's labels."""

    correct: int
    total: int
    rate: float | None
    gold: list[str]
    predicted: list[str]
    matrix: list[list[int]]


@dataclass(frozen=True, slots=True)
class RunRow:
    """One run's line of the table."""

    run: str
    path: str
    model: str | None
    job: str
    lines: int | None
    succeeded: int
    failed: int
    failed_by_class: dict[str, int]
    pending: int | None
    unknown: int | None
    success_rate: float | None
    latency_ms: dict[str, float | None]
    tokens_in: int
    tokens_out: int
    usd: float | None
    usd_excludes_models: list[str]
    finish_reasons: dict[str, int]
    accuracy: Accuracy | None = None


@dataclass(frozen=True, slots=True)
class Pair:
    """Two runs, unit by unit: their answers, and for labelling jobs their labels."""

    a: str
    b: str
    answers: Agreement
    labels: Agreement | None = None
    kappa: float | None = None
    categories: list[str] | None = None
    matrix: list[list[int]] | None = None  # rows: a's labels, columns: b's


@dataclass(frozen=True, slots=True)
class Comparison:
    runs: list[RunRow]
    units_in_all: int  # units every run has an outcome for
    units_in_some: int  # units only some runs have an outcome for (left out of `all_agree`)
    all_agree: Agreement  # of the units every run answered, those all answered alike
    pairs: list[Pair]
    labels: bool  # label agreement computed (every run has labels.jsonl)
    sample: int | None  # `--sample K`: only that sample index was compared
    disagreements: list[list[Any]]  # the first units the runs answered differently
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"all_agree": _agreement_dict(self.all_agree), "pairs": [
            asdict(p) | {"answers": _agreement_dict(p.answers),
                         "labels": None if p.labels is None else _agreement_dict(p.labels)}
            for p in self.pairs]}


def _agreement_dict(a: Agreement) -> dict[str, Any]:
    return {"agree": a.agree, "total": a.total, "rate": a.rate}


def compare(paths: Sequence[str], prices: Prices | None = None,
            sample: int | None = None) -> Comparison:
    """Read the runs PATHS name and compare them; a CompareError (exit 2) when they cannot be."""
    runs = [load(p, sample) for p in find_runs(paths)]
    label_runs(runs)
    warnings = _input_warnings(runs)
    common = set.intersection(*(set(r.answers) for r in runs))
    some = set.union(*(set(r.answers) for r in runs))
    labelled = all(r.labels is not None for r in runs)
    if not labelled and any(r.labels is not None for r in runs):
        missing = ", ".join(r.label for r in runs if r.labels is None)
        warnings.append(f"label agreement needs labels.jsonl in every run; {missing} has none "
                        "(not a labelling job, or not finished): answers compared only")
    if runs and not common:
        warnings.append("no unit (custom_id and sample) has an outcome in every run: nothing "
                        "to compare line by line")
    all_agree, disagreements = _all_agree(runs, common)
    return Comparison(
        runs=[_row(r, prices) for r in runs],
        units_in_all=len(common), units_in_some=len(some) - len(common),
        all_agree=all_agree,
        pairs=[_pair(a, b, labelled) for a, b in itertools.combinations(runs, 2)],
        labels=labelled, sample=sample, disagreements=disagreements, warnings=warnings)


def _input_warnings(runs: list[Run]) -> list[str]:
    """Runs of different inputs are compared on the units they share; say so."""
    first = runs[0]
    other = [r for r in runs[1:] if r.input != first.input]
    if not other:
        return []
    names = ", ".join(r.label for r in other)
    return [f"{names} ran a different input than {first.label} (another file, template or "
            "prompt: the journals' fingerprints differ); lines are compared where their "
            "custom_ids match"]


def _all_agree(runs: list[Run], common: set[Unit]) -> tuple[Agreement, list[list[Any]]]:
    """Of the units every run answered with a text, how many got the same answer from all of
    them; and the first few that did not, in input order."""
    agree = total = 0
    differ: list[tuple[int, int, str]] = []
    first = runs[0].answers
    for unit in common:
        texts = [r.answers[unit].text for r in runs]
        if any(t is None for t in texts):  # a failure, or an answer with no text
            continue
        total += 1
        if all(t == texts[0] for t in texts):
            agree += 1
        else:
            differ.append((first[unit].line, unit[1], unit[0]))
    shown = [[cid, sample] for _, sample, cid in sorted(differ)[:SHOWN_DISAGREEMENTS]]
    return Agreement(agree, total), shown


def _pair(a: Run, b: Run, labelled: bool) -> Pair:
    texts = [(x, y) for u, ans in a.answers.items() if (x := ans.text) is not None
             and (other := b.answers.get(u)) is not None and (y := other.text) is not None]
    answers = agreement(texts)
    if not labelled or a.labels is None or b.labels is None:
        return Pair(a.label, b.label, answers)
    la, lb = a.labels, b.labels
    pairs = [(x, y) for u, x in la.items() if x is not None and (y := lb.get(u)) is not None]
    table = contingency(pairs)
    cats = categories(table)
    return Pair(a.label, b.label, answers, agreement(pairs), cohen_kappa(table), cats,
                matrix(table, cats, cats))


def _row(run: Run, prices: Prices | None) -> RunRow:
    data = run.data
    c = data.counts
    assert c is not None  # load_run counts every run
    done = c.succeeded + c.failed
    base = c.lines if c.lines else done
    lat = sorted(data.latency_ms)
    tokens_in, tokens_out, usd, excluded = _spend(run, prices)
    return RunRow(
        run=run.label, path=str(run.path), model=run.model, job=data.header.job,
        lines=c.lines, succeeded=c.succeeded, failed=c.failed,
        failed_by_class={k.value: c.failed_by_class.get(k.value, 0) for k in FAILURE_CLASSES},
        pending=c.pending, unknown=c.unknown_outcome_in_flight,
        success_rate=c.succeeded / base if base else None,
        latency_ms={f"p{q}": percentile(lat, q) for q in (50, 90, 99)},
        tokens_in=tokens_in, tokens_out=tokens_out, usd=usd, usd_excludes_models=excluded,
        finish_reasons=dict(run.finish.most_common()), accuracy=_accuracy(run))


def _spend(run: Run, extra: Prices | None) -> tuple[int, int, float | None, list[str]]:
    """Tokens in and out and their cost: what the journal booked (every billed answer, the
    cache's hits excluded), priced at the run's own prices with `extra` (compare's --prices,
    --price) over them; from results.jsonl's usage for a journal without spend records."""
    data = run.data
    table: dict[str, Price] = dict(Prices.from_json(
        None if data.budget is None else data.budget.prices).table)
    if extra:
        table.update(extra.table)
    if data.spend:
        booked = {m: Tokens.of(row) for m, row in data.spend[-1].spent.items()}
    else:
        booked = {run.model or "?": Tokens(*run.usage)}
    tokens_in = sum(t.prompt for t in booked.values())
    tokens_out = sum(t.completion for t in booked.values())
    excluded = sorted(m for m in booked if m not in table)
    if not table or (booked and len(excluded) == len(booked)):
        return tokens_in, tokens_out, None, excluded
    usd = sum(table[m].cost(t.prompt, t.completion, t.cached)
              for m, t in booked.items() if m in table)
    return tokens_in, tokens_out, usd, excluded


def _accuracy(run: Run) -> Accuracy | None:
    """Against the gold labels the run's records carry (labels.jsonl's `gold`): a unit with
    gold and no valid label (failed, invalid, not answered) counts as wrong, in column
    `(none)`."""
    if not run.gold or run.labels is None:
        return None
    labels = run.labels
    pairs = [(g, labels.get(u) or NO_LABEL) for u, g in run.gold.items()]
    table = contingency(pairs)
    gold = sorted({g for g, _ in pairs})
    predicted = categories(table, gold)
    if NO_LABEL in predicted:  # last: it is not a label
        predicted = [p for p in predicted if p != NO_LABEL] + [NO_LABEL]
    correct = sum(n for (g, p), n in table.items() if g == p)
    return Accuracy(correct, len(pairs), correct / len(pairs), gold, predicted,
                    matrix(table, gold, predicted))


def run_paths(comparison: Comparison) -> list[Path]:
    return [Path(r.path) for r in comparison.runs]
