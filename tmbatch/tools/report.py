"""`tmbatch report OUT/`: one self-contained HTML page (charts embedded, PNGs beside it).

Everything comes from the journal, which already knows every outcome, when it
happened, how long it took, and every 429 pause; so a report can be made for
any run, finished, interrupted or still going, without re-reading the outputs.
Journals written before outcomes carried timestamps still give the failure
breakdown; the time charts then say why they are missing.

Plotting needs matplotlib, an optional extra (`pip install 'tmbatch[report]'`),
so the batch runner itself stays light; it is imported only here, lazily.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import html
import io
import math
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.files import JOURNAL, RESULTS, SUMMARY, atomic_write, make_dir
from tmbatch.journal.journal import OutcomeRecord, SpendRecord, read_header
from tmbatch.policy import Outcome
from tmbatch.run.summary import RunStats, percentile
from tmbatch.spend.prices import Prices
from tmbatch.spend.usage import usage_tokens

INSTALL_HINT = "pip install 'tmbatch[report]'"
CHART_FILES = ("throughput.png", "latency.png", "ttft.png", "failures.png", "cost.png")
CLASS_COLORS = {
    Outcome.NOT_SENT: "#8c8c8c", Outcome.REJECTED: "#e69f00", Outcome.AMBIGUOUS: "#d55e00",
    Outcome.PERMANENT: "#cc79a7", Outcome.FATAL: "#7a0019",
}
OK_COLOR, FAIL_COLOR, PAUSE_COLOR = "#2b7bb9", "#d55e00", "#e69f00"
NICE_BINS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900,
             1800, 3600, 7200, 21600, 43200, 86400)


class ReportError(ValueError):
    """The report cannot be made as asked; a ValueError so the CLI answers with exit 2."""


@dataclass
class RunData:
    """What the charts need, in flat arrays so a million-line journal stays small."""

    header: dict[str, Any]
    run_starts: list[float] = field(default_factory=list)
    ok_t: array = field(default_factory=lambda: array("d"))
    fail_t: array = field(default_factory=lambda: array("d"))
    latency_ms: array = field(default_factory=lambda: array("d"))
    ttft_ms: array = field(default_factory=lambda: array("d"))
    pauses: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    final: dict[int, tuple[Outcome, str]] = field(default_factory=dict)  # line -> (cls, code)
    untimed_outcomes: int = 0
    summary: dict[str, Any] | None = None
    tokens: int = 0  # from the usage of every result
    spend: list[SpendRecord] = field(default_factory=list)  # the job's spend over time
    budget: dict[str, Any] | None = None  # the last run's {"e": "budget"}: limits, prices

    @property
    def failures(self) -> Counter[tuple[Outcome, str]]:
        return Counter(v for v in self.final.values() if v[0].policy.failure)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for v in self.final.values() if v[0] is outcome)

    def active_seconds(self) -> float:
        """Time spent sending: within each run, first to last outcome. Hours between a run
        and a later resend are idle, not slow, and must not dilute the rates."""
        starts = sorted(self.run_starts)
        spans: dict[int, tuple[float, float]] = {}
        for t in (*self.ok_t, *self.fail_t):
            run = bisect.bisect_right(starts, t)
            lo, hi = spans.get(run, (t, t))
            spans[run] = (min(lo, t), max(hi, t))
        return sum(hi - lo for lo, hi in spans.values())

    def pause_spans(self) -> list[tuple[float, float]]:
        """(start, end) of the time the workers were paused: the union of the pauses, which
        overlap when several 429s arrive in one window (each journals its own Retry-After)."""
        spans: list[tuple[float, float]] = []
        for t, secs in sorted(self.pauses):
            if spans and t <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], t + secs))
            else:
                spans.append((t, t + secs))
        return spans

    def paused_seconds(self) -> float:
        return sum(end - start for start, end in self.pause_spans())


def result_tokens(out_dir: Path) -> int:
    """Tokens of every success in results.jsonl (its `usage`), whichever run answered it."""
    stats = RunStats()
    try:
        with open(out_dir / RESULTS, "rb") as f:
            for raw in f:
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                    body = (orjson.loads(raw).get("response") or {}).get("body")
                    if isinstance(body, dict):
                        stats.add_usage(usage_tokens(body))
    except OSError:
        return 0
    return stats.prompt_tokens + stats.completion_tokens


def load_run(out_dir: Path) -> RunData:
    """Read the journal without changing it (a run may still be writing; a torn tail is skipped)."""
    data = RunData(header=read_header(out_dir))
    if isinstance(data.header.get("t"), (int, float)):
        data.run_starts.append(float(data.header["t"]))
    with open(out_dir / JOURNAL, "rb") as f:
        f.readline()
        for raw in f:
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                if rec.get("e") == "resume" and isinstance(rec.get("t"), (int, float)):
                    data.run_starts.append(float(rec["t"]))
                elif rec.get("e") == "budget":
                    data.budget = rec
                continue
            if not isinstance(rec, list) or not rec:
                continue
            if rec[0] == "o":
                found = OutcomeRecord.from_list(rec)
                if found is not None:
                    _outcome(data, found)
            elif rec[0] == "p" and len(rec) >= 3:
                data.pauses.append((float(rec[1]), float(rec[2])))
            elif rec[0] == "s":
                snap = SpendRecord.from_list(rec)
                if snap is not None:
                    data.spend.append(snap)
    try:
        summary = orjson.loads((out_dir / SUMMARY).read_bytes())
        data.summary = summary if isinstance(summary, dict) else None
    except (OSError, orjson.JSONDecodeError):
        data.summary = None
    data.tokens = result_tokens(out_dir)
    return data


def _outcome(data: RunData, rec: OutcomeRecord) -> None:
    if rec.outcome is Outcome.PENDING:  # refused while stopping: read again later
        return
    data.final[rec.line] = (rec.outcome, rec.code)
    if rec.t is None or rec.code == "unknown_outcome_after_crash":
        data.untimed_outcomes += 1  # adopted or recovered on resume: when it ended is unknown
        return
    (data.ok_t if rec.outcome is Outcome.OK else data.fail_t).append(rec.t)
    if rec.latency_ms is not None:
        data.latency_ms.append(rec.latency_ms)
    if rec.ttft_ms is not None:
        data.ttft_ms.append(rec.ttft_ms)


# -- charts ---------------------------------------------------------------------------------------
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


def _figure(height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(10, height), dpi=110, layout="constrained")


def _png(fig: Any) -> bytes:
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
    return None if fig is None else _png(fig)


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
    fig = _figure()
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
    fig = _figure()
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
    return _png(fig)


def failures_chart(failures: Counter[tuple[Outcome, str]]) -> bytes | None:
    if not failures:
        return None
    rows = failures.most_common(20)[::-1]  # largest on top
    fig = _figure(max(2.2, 0.8 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    labels = [f"{cls}: {code or '-'}" for (cls, code), _ in rows]
    counts = [c for _, c in rows]
    bars = ax.barh(labels, counts, color=[CLASS_COLORS.get(cls, "#666") for (cls, _), _ in rows])
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3)
    ax.set_xlabel("lines (final outcome)")
    ax.set_title("Failures by class and code")
    ax.grid(axis="y", visible=False)
    ax.set_xlim(0, max(counts) * 1.12)
    return _png(fig)


def cost_chart(data: RunData) -> bytes | None:
    """The job's spend over time, with the budget as a line: how a budgeted run approached it,
    and where resumes continued. In the budget's unit; else dollars at the last run's prices,
    else tokens."""
    if not data.spend:
        return None
    rec = data.budget or {}
    prices = Prices.from_json(rec.get("prices"))
    t0 = data.spend[0].t
    xs = [s.t - t0 for s in data.spend]
    if prices and (rec.get("usd") is not None or rec.get("tokens") is None):
        ys = [sum(p.cost(*row[:2], row[2]) for m, row in s.spent.items()
                  if (p := prices.get(m)) is not None) for s in data.spend]
        limit, unit = rec.get("usd"), "USD"
        excluded = sorted({m for s in data.spend for m in s.spent if prices.get(m) is None})
    else:
        ys = [float(sum(row[0] + row[1] for row in s.spent.values())) for s in data.spend]
        limit, unit, excluded = rec.get("tokens"), "tokens", []
    fig = _figure()
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
    return _png(fig)


# -- page -----------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;
margin:0;background:#f4f6f9}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px}
.meta{color:#5a6475;margin:0 0 20px;word-break:break-all}.meta code{color:#1d2430}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:12px}
.card{background:#fff;border-radius:10px;padding:12px 16px;box-shadow:0 1px 3px #0002}
.card b{display:block;font-size:24px}.card span{color:#5a6475;font-size:13px}
.card.bad b{color:#c0392b}.card.warn b{color:#b76e00}
figure{background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;margin:0 0 16px;
padding:12px}figure img{width:100%;height:auto;display:block}
.note{background:#fff;border-radius:10px;padding:14px 18px;color:#5a6475;
box-shadow:0 1px 3px #0002}
table{border-collapse:collapse;background:#fff;border-radius:10px;overflow:hidden;
box-shadow:0 1px 3px #0002;min-width:50%}
th,td{padding:7px 14px;text-align:left;border-bottom:1px solid #e6e9ef}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}
footer{margin-top:36px;color:#8a93a3;font-size:13px}
"""


def _card(value: str, label: str, kind: str = "") -> str:
    return (f'<div class="card {kind}"><b>{html.escape(value)}</b>'
            f"<span>{html.escape(label)}</span></div>")


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f} ms" if v >= 100 else f"{v:,.1f} ms"


def _cards(data: RunData) -> str:
    ok = data.count(Outcome.OK)
    failed = len(data.final) - ok
    lat = sorted(data.latency_ms)
    cards = [_card(f"{ok:,}", "succeeded"),
             _card(f"{failed:,}", "failed", "bad" if failed else "")]
    ambiguous = data.count(Outcome.AMBIGUOUS)
    if ambiguous:
        cards.append(_card(f"{ambiguous:,}", "ambiguous (never re-sent)", "bad"))
    timed = len(data.ok_t) + len(data.fail_t)
    active = data.active_seconds()
    if timed > 1 and active > 0:
        cards.append(_card(f"{timed / active:,.1f}", "outcomes / s (while sending)"))
    cards.append(_card(_ms(percentile(lat, 50)), "latency p50"))
    cards.append(_card(_ms(percentile(lat, 99)), "latency p99"))
    if data.ttft_ms:
        cards.append(_card(_ms(percentile(sorted(data.ttft_ms), 50)), "TTFT p50 (streamed)"))
    cards.append(_card(f"{len(data.pauses):,}",
                       f"pauses for 429s ({data.paused_seconds():,.1f} s in all)",
                       "warn" if data.pauses else ""))
    if data.tokens and active > 0:
        cards.append(_card(f"{data.tokens / active:,.0f}", "tokens / s (while sending)"))
    if len(data.run_starts) > 1:
        cards.append(_card(str(len(data.run_starts)), "runs (resumed)"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _chart(name: str, png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    b64 = base64.b64encode(png).decode()
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}" '
            f'data-file="{name}"></figure>')


def _failure_table(failures: Counter[tuple[Outcome, str]]) -> str:
    if not failures:
        return '<p class="note">No failures: every line with an outcome succeeded.</p>'
    rows = "".join(
        f'<tr><td><span class="dot" style="background:{CLASS_COLORS.get(cls, "#666")}"></span>'
        f"{html.escape(cls)}</td><td><code>{html.escape(code or '-')}</code></td>"
        f'<td class="n">{n:,}</td></tr>'
        for (cls, code), n in failures.most_common()
    )
    return ("<table><thead><tr><th>class</th><th>code</th><th>lines</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def render_html(data: RunData, out_dir: Path, charts: dict[str, bytes | None]) -> str:
    h = data.header
    no_time = ("This journal has no timestamps for its outcomes (written by an older tmbatch, "
               "or outcomes recovered after a crash), so there is nothing to draw over time.")
    timed = bool(data.ok_t or data.fail_t)
    started = h.get("t")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
    merged = h.get("merged")
    shards = f" · merged from {len(merged)} shard directories" if isinstance(merged, list) else ""
    meta = (f"job <code>{html.escape(str(h.get('job')))}</code>{shards} · started {when} · input "
            f"<code>{html.escape(str(h.get('input')))}</code> · output "
            f"<code>{html.escape(str(out_dir))}</code>")
    failures = data.failures
    untimed = ""
    if data.untimed_outcomes and timed:
        untimed = (f'<p class="note">{data.untimed_outcomes:,} outcome(s) have no time (found '
                   "or recovered on resume) and are counted above but not drawn.</p>")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>tmbatch report · {html.escape(str(h.get('job')))}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>tmbatch run report</h1>", f'<p class="meta">{meta}</p>',
        _cards(data),
        "<h2>Throughput</h2>",
        _chart("throughput.png", charts["throughput.png"],
               "outcomes per second over time, with 429 pauses shaded", no_time),
        untimed,
        "<h2>Latency</h2>",
        _chart("latency.png", charts["latency.png"], "histogram of request latency",
               no_time if not timed else "No successful request to measure."),
        "<h2>Time to first token</h2>",
        _chart("ttft.png", charts["ttft.png"], "histogram of time to first token",
               "No streamed request in this run: TTFT is measured only with \"stream\": true."),
        "<h2>Failures</h2>",
        _chart("failures.png", charts["failures.png"], "failures by class and code", "")
        if failures else "",
        _failure_table(failures),
        "<h2>Cost</h2>",
        _chart("cost.png", charts["cost.png"], "the job's spend over time, with its budget",
               "This journal has no spend records (written by an older tmbatch)."),
        f"<footer>Made by <code>tmbatch report</code> from {JOURNAL} on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. Self-contained: the charts "
        "are embedded and also saved as PNGs beside this page.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(out_dir: Path, dest: Path | None = None) -> Path:
    """Write DEST/index.html (default OUT/report/) and the charts as PNGs; return the page."""
    data = load_run(out_dir)  # a JournalError for a directory that is not a run comes first
    load_matplotlib()
    charts: dict[str, bytes | None] = {
        "throughput.png": throughput_chart(data),
        "latency.png": histogram(data.latency_ms, "Latency", "milliseconds", OK_COLOR),
        "ttft.png": histogram(data.ttft_ms, "Time to first token", "milliseconds", "#009e73"),
        "failures.png": failures_chart(data.failures),
        "cost.png": cost_chart(data),
    }
    dest = dest or out_dir / "report"
    try:
        make_dir(dest)
        for name in CHART_FILES:
            png = charts[name]
            if png is None:
                (dest / name).unlink(missing_ok=True)  # no stale chart from an older report
            else:
                atomic_write(dest / name, png)
        page = dest / "index.html"
        atomic_write(page, render_html(data, out_dir, charts).encode("utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write the report to {dest}: {exc.strerror or exc}") from None
    return page
