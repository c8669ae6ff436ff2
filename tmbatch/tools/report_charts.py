"""The report's charts, drawn with matplotlib: throughput, latency, TTFT, failures, cost.

Plotting needs matplotlib, an optional extra (`pip install 'tmbatch[report]'`), so the batch
runner itself stays light; it is imported only here, lazily, when a report is made.
"""

from __future__ import annotations

import io
import math
import time
from array import array
from collections import Counter
from typing import Any

from tmbatch.policy import Outcome
from tmbatch.run.summary import percentile
from tmbatch.spend.prices import Prices
from tmbatch.tools.report_data import RunData

INSTALL_HINT = "pip install 'tmbatch[report]'"
CLASS_COLORS = {
    Outcome.NOT_SENT: "#8c8c8c", Outcome.REJECTED: "#e69f00", Outcome.AMBIGUOUS: "#d55e00",
    Outcome.PERMANENT: "#cc79a7", Outcome.FATAL: "#7a0019",
}
OK_COLOR, FAIL_COLOR, PAUSE_COLOR = "#2b7bb9", "#d55e00", "#e69f00"
NICE_BINS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900,
             1800, 3600, 7200, 21600, 43200, 86400)


class ReportError(ValueError):
    """The report cannot be made as asked; a ValueError so the CLI answers with exit 2."""


def load_matplotlib() -> Any:
    """Import matplotlib for drawing off-screen, or say which extra installs it: only the
    report needs it, so it is not a dependency of tmbatch itself."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            f"tmbatch report draws its charts with matplotlib, an optional extra: {INSTALL_HINT}"
        ) from None
    matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update({
        "font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.alpha": 0.3, "axes.titleweight": "bold",
    })
    return matplotlib


def new_figure(height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(10, height), dpi=110, layout="constrained")


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bin_width(span: float) -> float:
    """A round bin width giving at most ~120 bars, so bars stay visible on any run length."""
    for w in NICE_BINS:
        if span / w <= 120:
            return w
    return NICE_BINS[-1] * math.ceil(span / NICE_BINS[-1] / 120)


def throughput_chart(data: RunData) -> bytes | None:
    fig = throughput_figure(data)
    return None if fig is None else png_bytes(fig)


def throughput_figure(data: RunData) -> Any:
    times = [*data.ok_t, *data.fail_t]
    if not times:
        return None
    t0 = min([*times, *(p[0] for p in data.pauses)])
    t1 = max([*times, *(p[0] + p[1] for p in data.pauses)])
    width = _bin_width(max(t1 - t0, 0.01))
    n = int((t1 - t0) / width) + 1
    ok, bad = [0] * n, [0] * n
    for t in data.ok_t:
        ok[int((t - t0) / width)] += 1
    for t in data.fail_t:
        bad[int((t - t0) / width)] += 1
    xs = [i * width for i in range(n)]
    fig = new_figure()
    ax = fig.add_subplot()
    ax.bar(xs, [c / width for c in ok], width=width, align="edge", color=OK_COLOR,
           label="succeeded", linewidth=0)
    ax.bar(xs, [c / width for c in bad], width=width, align="edge", bottom=[c / width for c in ok],
           color=FAIL_COLOR, label="failed", linewidth=0)
    for i, (start, end) in enumerate(data.pause_spans()):
        ax.axvspan(start - t0, end - t0, color=PAUSE_COLOR, alpha=0.25, linewidth=0, zorder=0,
                   label="429 pause (Retry-After)" if i == 0 else None)
    for i, t in enumerate(s for s in data.run_starts[1:] if t0 <= s <= t1):
        ax.axvline(t - t0, color="#444", linestyle="--", linewidth=1,
                   label="resumed" if i == 0 else None)
    ax.set_xlim(0, max(n * width, 1e-3))
    ax.set_xlabel(f"seconds since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t0))} UTC"
                  f"  (bars of {width:g} s)")
    ax.set_ylabel("outcomes per second")
    ax.set_title("Throughput over time", loc="left")
    # Above the plot, not in it: pause bands run the full height and would hide it.
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, ncols=4,
              borderaxespad=0.2)
    return fig


def histogram(values: array, title: str, xlabel: str, color: str) -> bytes | None:
    if not values:
        return None
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    vals = sorted(values)
    lo, hi = max(vals[0], 1e-3), max(vals[-1], 1e-3)
    fig = new_figure()
    ax = fig.add_subplot()
    if hi / lo > 50 or hi > 4 * percentile(vals, 90):
        # a long tail: equal-width bins would squeeze the bulk into a few bars
        edges = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.hist([max(v, lo) for v in vals], bins=edges, color=color, linewidth=0)
    else:
        ax.hist(vals, bins=min(40, max(5, len(vals) // 5)), color=color, linewidth=0)
    for q, style in ((50, "-"), (90, "--"), (99, ":")):
        v = percentile(vals, q)
        ax.axvline(v, color="#222", linestyle=style, linewidth=1.2, label=f"p{q} {v:,.1f} ms")
    ax.set_title(f"{title} ({len(vals):,} requests)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests")
    ax.legend(frameon=False)
    return png_bytes(fig)


def failures_chart(failures: Counter[tuple[Outcome, str]]) -> bytes | None:
    if not failures:
        return None
    rows = failures.most_common(20)[::-1]  # largest on top
    fig = new_figure(max(2.2, 0.8 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    labels = [f"{cls}: {code or '-'}" for (cls, code), _ in rows]
    counts = [c for _, c in rows]
    bars = ax.barh(labels, counts, color=[CLASS_COLORS.get(cls, "#666") for (cls, _), _ in rows])
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3)
    ax.set_xlabel("lines (final outcome)")
    ax.set_title("Failures by class and code")
    ax.grid(axis="y", visible=False)
    ax.set_xlim(0, max(counts) * 1.12)
    return png_bytes(fig)


def cost_chart(data: RunData) -> bytes | None:
    """The job's spend over time, with the budget as a line: how a budgeted run approached it,
    and where resumes continued. In the budget's unit; else dollars at the last run's prices,
    else tokens."""
    if not data.spend:
        return None
    rec = data.budget
    prices = Prices.from_json(None if rec is None else rec.prices)
    usd, tokens = (None, None) if rec is None else (rec.usd, rec.tokens)
    t0 = data.spend[0].t
    xs = [s.t - t0 for s in data.spend]
    limit: float | None
    if prices and (usd is not None or tokens is None):
        ys = [sum(p.cost(*row[:2], row[2]) for m, row in s.spent.items()
                  if (p := prices.get(m)) is not None) for s in data.spend]
        limit, unit = usd, "USD"
        excluded = sorted({m for s in data.spend for m in s.spent if prices.get(m) is None})
    else:
        ys = [float(sum(row[0] + row[1] for row in s.spent.values())) for s in data.spend]
        limit, unit, excluded = tokens, "tokens", []
    fig = new_figure()
    ax = fig.add_subplot()
    ax.step(xs, ys, where="post", color=OK_COLOR, linewidth=1.8, label=f"spent ({unit})")
    if isinstance(limit, (int, float)):
        ax.axhline(limit, color=FAIL_COLOR, linestyle="--", linewidth=1.2,
                   label=f"budget {limit:,.4g} {unit}")
    for i, t in enumerate(s for s in data.run_starts[1:] if s >= t0):
        ax.axvline(t - t0, color="#444", linestyle="--", linewidth=1,
                   label="resumed" if i == 0 else None)
    ax.set_xlabel(f"seconds since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t0))} UTC")
    ax.set_ylabel(unit + (f" (excludes {', '.join(excluded)}: no price)" if excluded else ""))
    ax.set_title("Cost over time (the whole job)")
    ax.set_ylim(0, max([*ys, float(limit or 0), 1e-9]) * 1.15)
    ax.legend(loc="upper left", frameon=False)
    return png_bytes(fig)
