"""`tmbatch compare`'s text table (the default) and its CSV (`--csv`: one row per run).

Both show one `Comparison`; `--json` is its `as_dict`, and the HTML report's section is
`report_compare`'s. The CSV puts the pairwise figures in columns (`agreement_with_<run>`,
`kappa_with_<run>`) so one spreadsheet row holds everything about a run; the matrices are in
the text, the JSON and the report only.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from tmbatch.spend.usage import money
from tmbatch.tools.compare import Comparison, Pair, RunRow
from tmbatch.tools.compare_stats import Agreement


def pct(rate: float | None) -> str:
    return "–" if rate is None else f"{100 * rate:.1f}%"


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def kappa_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def of(a: Agreement) -> str:
    return f"{a.agree:,} of {a.total:,} ({pct(a.rate)})" if a.total else "none to compare"


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    out = []
    for r in (header, *rows):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _failed(r: RunRow) -> str:
    parts = [f"{cls} {n:,}" for cls, n in r.failed_by_class.items() if n]
    return f"{r.failed:,}" + (f" ({', '.join(parts)})" if parts else "")


def _cost(r: RunRow) -> str:
    if r.usd is None:
        return "no price"
    return money(r.usd) + ("*" if r.usd_excludes_models else "")


def run_table(c: Comparison) -> list[str]:
    header = ["run", "lines", "succeeded", "failed", "p50 ms", "p90 ms", "p99 ms",
              "tokens in", "tokens out", "cost", "finish reasons"]
    rows = []
    for r in c.runs:
        finish = ", ".join(f"{k} {n:,}" for k, n in r.finish_reasons.items()) or "–"
        lines = "?" if r.lines is None else f"{r.lines:,}"
        rows.append([r.run, lines, f"{r.succeeded:,} ({pct(r.success_rate)})", _failed(r),
                     *(ms(r.latency_ms[f"p{q}"]) for q in (50, 90, 99)),
                     f"{r.tokens_in:,}", f"{r.tokens_out:,}", _cost(r), finish])
    out = grid(header, rows)
    for r in c.runs:
        if r.pending or r.unknown:
            out.append(f"  {r.run}: not finished ({r.pending or 0:,} not yet sent, "
                       f"{r.unknown or 0:,} of unknown outcome)")
        if r.usd is not None and r.usd_excludes_models:
            out.append(f"  * {r.run}: the cost excludes {', '.join(r.usd_excludes_models)} "
                       "(no price: give --price MODEL=IN:OUT)")
    return out


def _square(c: Comparison, cell: Any) -> list[str]:
    """A runs x runs grid of a pairwise figure."""
    names = [r.run for r in c.runs]
    by_pair = {(p.a, p.b): p for p in c.pairs} | {(p.b, p.a): p for p in c.pairs}
    rows = [[a, *("–" if a == b else cell(by_pair[a, b]) for b in names)] for a in names]
    return grid(["", *names], rows)


def label_lines(c: Comparison) -> list[str]:
    out = ["", "labels (labels.jsonl): agreement and Cohen's kappa, over the lines both "
           "runs gave a valid label"]
    out += _square(c, lambda p: f"{pct(p.labels.rate)} κ {kappa_text(p.kappa)}")
    for p in c.pairs:
        if p.matrix is None or p.categories is None:
            continue
        out += ["", f"  {p.a} (rows) against {p.b} (columns): {of(p.labels)} agree, "
                f"kappa {kappa_text(p.kappa)}"]
        out += grid(["", *p.categories],
                    [[k, *map(str, row)] for k, row in zip(p.categories, p.matrix, strict=True)],
                    "    ")
    return out


def gold_lines(c: Comparison) -> list[str]:
    out: list[str] = []
    for r in c.runs:
        acc = r.accuracy
        if acc is None:
            continue
        out += ["", f"  {r.run}: accuracy {pct(acc.rate)} ({acc.correct:,} of {acc.total:,} "
                "records with a gold label); rows gold, columns the run's label"]
        out += grid(["gold", *acc.predicted],
                    [[g, *map(str, row)] for g, row in zip(acc.gold, acc.matrix, strict=True)],
                    "    ")
    return ["", "against the gold labels (the records' `gold` field)", *out] if out else []


def render_text(c: Comparison) -> str:
    which = "" if c.sample is None else f", sample {c.sample} only"
    out = [f"runs: {len(c.runs)}", *run_table(c), "",
           f"per line (matched by custom_id and sample{which}): {c.units_in_all:,} answered "
           f"by every run, {c.units_in_some:,} by only some",
           f"  the same answer from every run (whitespace and case ignored): {of(c.all_agree)}"]
    if len(c.runs) > 2:
        out += ["", "pairwise: the same answer, over the lines both runs answered"]
        out += _square(c, lambda p: pct(p.answers.rate))
    else:
        (p,) = c.pairs
        out.append(f"  {p.a} and {p.b}, over the lines both answered: {of(p.answers)}")
    if c.labels:
        out += label_lines(c)
    out += gold_lines(c)
    if c.disagreements:
        shown = ", ".join(cid if s == 0 else f"{cid} (sample {s})" for cid, s in c.disagreements)
        out += ["", f"first lines answered differently: {shown}"]
    return "\n".join(out)


def _pair_of(c: Comparison, a: str, b: str) -> Pair:
    return next(p for p in c.pairs if {p.a, p.b} == {a, b})


def render_csv(c: Comparison) -> str:
    """One row per run; every run's figures in the same columns."""
    classes = list(c.runs[0].failed_by_class)
    reasons = sorted({k for r in c.runs for k in r.finish_reasons})
    names = [r.run for r in c.runs]
    header = ["run", "path", "model", "job", "lines", "succeeded", "failed", "success_rate",
              *(f"failed_{k}" for k in classes), "latency_p50_ms", "latency_p90_ms",
              "latency_p99_ms", "tokens_in", "tokens_out", "usd",
              *(f"finish_{k}" for k in reasons), "accuracy",
              *(f"agreement_with_{n}" for n in names)]
    if c.labels:
        header += [f"label_agreement_with_{n}" for n in names]
        header += [f"kappa_with_{n}" for n in names]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in c.runs:
        others = [None if n == r.run else _pair_of(c, r.run, n) for n in names]
        row: list[Any] = [r.run, r.path, r.model, r.job, r.lines, r.succeeded, r.failed,
                          r.success_rate, *(r.failed_by_class[k] for k in classes),
                          *(r.latency_ms[f"p{q}"] for q in (50, 90, 99)), r.tokens_in,
                          r.tokens_out, r.usd, *(r.finish_reasons.get(k, 0) for k in reasons),
                          None if r.accuracy is None else r.accuracy.rate,
                          *(None if p is None else p.answers.rate for p in others)]
        if c.labels:
            row += [None if p is None or p.labels is None else p.labels.rate for p in others]
            row += [None if p is None else p.kappa for p in others]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()
