"""The report's comparison section: several runs (a `--models` run's models) on one page.

`tmbatch compare ... --html DIR` writes it, and `tmbatch report OUT` does when OUT is the
parent of several runs (what `run --models` writes), linking each run's own report. The
figures are the `Comparison` the text table shows; the chart (compare.png) puts success rate
and accuracy, latency percentiles and pairwise agreement side by side.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

from tmbatch.base.files import atomic_write, make_dir
from tmbatch.tools.compare import Comparison
from tmbatch.tools.compare_render import kappa_text, ms, of, pct
from tmbatch.tools.report import CSS, card, chart_html
from tmbatch.tools.report_charts import (
    OK_COLOR,
    ReportError,
    load_matplotlib,
    new_figure,
    png_bytes,
)

CHART = "compare.png"
LATENCY_COLORS = ("#2b7bb9", "#e69f00", "#d55e00")  # p50, p90, p99
ACCURACY_COLOR = "#009e73"


def compare_chart(c: Comparison) -> bytes | None:
    """Three panels: success rate (and accuracy) per run, latency p50/p90/p99 per run, and
    the pairwise agreement (Cohen's kappa for labelling jobs, else the same-answer rate)."""
    if not c.runs:
        return None
    import numpy as np

    names = [r.run for r in c.runs]
    y = np.arange(len(names))
    fig = new_figure(max(3.0, 1.2 + 0.45 * len(names)))
    left, mid, right = fig.subplots(1, 3, width_ratios=(1, 1, 0.9))
    acc = [r.accuracy.rate if r.accuracy and r.accuracy.rate is not None else None
           for r in c.runs]
    h = 0.38 if any(a is not None for a in acc) else 0.7
    left.barh(y, [100 * (r.success_rate or 0) for r in c.runs], height=h, color=OK_COLOR,
              label="success rate")
    if any(a is not None for a in acc):
        left.barh(y + h, [100 * (a or 0) for a in acc], height=h, color=ACCURACY_COLOR,
                  label="accuracy (gold)")
    left.set_yticks(y + (h / 2 if h < 0.5 else 0), names)
    left.set_xlim(0, 100)
    left.set_xlabel("% of lines")
    left.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, ncols=2)
    for i, q in enumerate((50, 90, 99)):
        mid.barh(y + i * 0.27, [r.latency_ms[f"p{q}"] or 0 for r in c.runs], height=0.27,
                 color=LATENCY_COLORS[i], label=f"p{q}")
    mid.set_yticks(y + 0.27, names)
    mid.set_xlabel("latency, ms")
    mid.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, ncols=3)
    for ax in (left, mid):
        ax.invert_yaxis()  # the first run on top, as in the tables and the agreement grid
    _agreement_panel(right, c, names)
    return png_bytes(fig)


def _agreement_panel(ax: Any, c: Comparison, names: list[str]) -> None:
    by = {(p.a, p.b): p for p in c.pairs} | {(p.b, p.a): p for p in c.pairs}

    def value(a: str, b: str) -> float:
        if a == b:
            return 1.0
        p = by[a, b]
        v = p.kappa if c.labels else p.answers.rate
        return float("nan") if v is None else v

    grid = [[value(a, b) for b in names] for a in names]
    ax.imshow(grid, vmin=-1 if c.labels else 0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.grid(False)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if i != j:
                ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center")
    ax.set_title("Cohen's kappa (labels)" if c.labels else "same answer (rate)", fontsize=10)


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i >= numeric_from else ""}>{html.escape(v)}</td>'
                         for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_table(c: Comparison, links: dict[str, str]) -> str:
    rows = []
    for r in c.runs:
        failed = ", ".join(f"{k} {n:,}" for k, n in r.failed_by_class.items() if n)
        rows.append([r.run, "?" if r.lines is None else f"{r.lines:,}",
                     f"{r.succeeded:,} ({pct(r.success_rate)})",
                     f"{r.failed:,}" + (f" ({failed})" if failed else ""),
                     *(ms(r.latency_ms[f"p{q}"]) for q in (50, 90, 99)),
                     f"{r.tokens_in:,}", f"{r.tokens_out:,}",
                     "no price" if r.usd is None else f"${r.usd:,.6g}",
                     ", ".join(f"{k} {n:,}" for k, n in r.finish_reasons.items()) or "–",
                     "–" if r.accuracy is None else pct(r.accuracy.rate)])
    table = _table(["run", "lines", "succeeded", "failed", "p50 ms", "p90 ms", "p99 ms",
                    "tokens in", "tokens out", "cost", "finish reasons", "accuracy"], rows)
    for name, href in links.items():  # each run's own report, when there is one
        cell = f"<td>{html.escape(name)}</td>"
        table = table.replace(cell, f'<td><a href="{html.escape(href)}">'
                              f"{html.escape(name)}</a></td>", 1)
    return table


def _matrices(c: Comparison) -> str:
    parts = []
    for p in c.pairs:
        if p.matrix is None or p.categories is None or p.labels is None:
            continue
        parts.append(f"<h3>{html.escape(p.a)} (rows) against {html.escape(p.b)} (columns): "
                     f"{html.escape(of(p.labels))} agree, kappa {kappa_text(p.kappa)}</h3>")
        parts.append(_table(["", *p.categories], [[k, *(f"{n:,}" for n in row)] for k, row
                                                  in zip(p.categories, p.matrix, strict=True)]))
    for r in c.runs:
        a = r.accuracy
        if a is None:
            continue
        parts.append(f"<h3>{html.escape(r.run)} against the gold labels: accuracy "
                     f"{pct(a.rate)} ({a.correct:,} of {a.total:,})</h3>")
        parts.append(_table(["gold", *a.predicted], [[g, *(f"{n:,}" for n in row)] for g, row
                                                     in zip(a.gold, a.matrix, strict=True)]))
    return "".join(parts)


def compare_section(c: Comparison, png: bytes | None, links: dict[str, str]) -> str:
    """The comparison as a section of a report page."""
    cards = [card(str(len(c.runs)), "runs compared"),
             card(f"{c.units_in_all:,}", "lines answered by every run"),
             card(pct(c.all_agree.rate), "same answer from every run")]
    pairs = _table(["run", "run", "same answer", "labels agree", "Cohen's kappa"], [
        [p.a, p.b, of(p.answers), "–" if p.labels is None else of(p.labels),
         kappa_text(p.kappa)] for p in c.pairs], numeric_from=2)
    notes = "".join(f'<p class="note">{html.escape(w)}</p>' for w in c.warnings)
    return "\n".join([
        "<h2>Comparison</h2>", notes,
        '<div class="cards">' + "".join(cards) + "</div>",
        chart_html(CHART, png, "success rate, accuracy, latency and agreement per run",
               "Nothing to draw."),
        _run_table(c, links), "<h2>Agreement, line by line</h2>",
        '<p class="meta">Lines are matched by custom_id and sample; answers are the same when '
        "equal after whitespace is collapsed and case folded.</p>", pairs, _matrices(c)])


def write_compare_report(c: Comparison, dest: Path, links: dict[str, Path] | None = None) -> Path:
    """DEST/index.html (the comparison, self-contained) and DEST/compare.png; the page."""
    load_matplotlib()
    png = compare_chart(c)
    hrefs = {name: os.path.relpath(page, dest) for name, page in (links or {}).items()}
    page_html = "\n".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        "<title>tmbatch comparison</title>", f"<style>{CSS}h3{{font-size:15px}}</style>",
        "</head><body><main>", "<h1>tmbatch comparison</h1>",
        '<p class="meta">' + " · ".join(f"{html.escape(r.run)}: <code>{html.escape(r.path)}"
                                        "</code>" for r in c.runs) + "</p>",
        compare_section(c, png, hrefs),
        "<footer>Made by <code>tmbatch compare</code> (or <code>report</code>) from the "
        "runs' journals and outputs on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</footer>",
        "</main></body></html>"])
    try:
        make_dir(dest)
        if png is None:
            (dest / CHART).unlink(missing_ok=True)
        else:
            atomic_write(dest / CHART, png)
        page = dest / "index.html"
        atomic_write(page, page_html.encode("utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write the report to {dest}: {exc.strerror or exc}") from None
    return page

