"""`tmbatch report OUT/`: one self-contained HTML page (charts embedded, PNGs beside it).

Everything comes from the journal (`report_data`), which already knows every outcome, when it
happened, how long it took, and every 429 pause; so a report can be made for any run,
finished, interrupted or still going, without re-reading the outputs. Journals written before
outcomes carried timestamps still give the failure breakdown; the time charts then say why
they are missing. The charts are drawn in `report_charts`, with matplotlib (an optional
extra, imported only when a report is made).
"""

from __future__ import annotations

import base64
import html
import time
from collections import Counter
from pathlib import Path

from tmbatch.base.files import JOURNAL, atomic_write, make_dir
from tmbatch.policy import Outcome
from tmbatch.run.summaries import read_summary
from tmbatch.run.summary import percentile
from tmbatch.tools.report_charts import (
    CLASS_COLORS,
    OK_COLOR,
    ReportError,
    cost_chart,
    failures_chart,
    histogram,
    load_matplotlib,
    throughput_chart,
)
from tmbatch.tools.report_data import RunData, load_run

CHART_FILES = ("throughput.png", "latency.png", "ttft.png", "failures.png", "cost.png")


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


def card(value: str, label: str, kind: str = "") -> str:
    return (f'<div class="card {kind}"><b>{html.escape(value)}</b>'
            f"<span>{html.escape(label)}</span></div>")


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f} ms" if v >= 100 else f"{v:,.1f} ms"


def _count_cards(data: RunData) -> list[str]:
    """The job's lines, counted as `status` and the `done:` line count them (`Counts`)."""
    c = data.counts
    if c is None:  # (load_run always sets them; a RunData made by hand may not)
        ok = data.count(Outcome.OK)
        return [card(f"{ok:,}", "succeeded"), card(f"{len(data.final) - ok:,}", "failed")]
    cards = [card(f"{c.lines:,}", "lines")] if c.lines is not None else []
    cards += [card(f"{c.succeeded:,}", "succeeded"),
              card(f"{c.failed:,}", "failed", "bad" if c.failed else "")]
    ambiguous = c.failed_by_class.get(Outcome.AMBIGUOUS.value, 0)
    if ambiguous:
        cards.append(card(f"{ambiguous:,}", "ambiguous (never re-sent)", "bad"))
    if c.unknown_outcome_in_flight:
        cards.append(card(f"{c.unknown_outcome_in_flight:,}", "unknown outcome", "bad"))
    if c.pending:
        cards.append(card(f"{c.pending:,}", "pending (not yet sent)", "warn"))
    return cards


def _cards(data: RunData) -> str:
    lat = sorted(data.latency_ms)
    cards = _count_cards(data)
    timed = len(data.ok_t) + len(data.fail_t)
    active = data.active_seconds()
    if timed > 1 and active > 0:
        cards.append(card(f"{timed / active:,.1f}", "outcomes / s (while sending)"))
    cards.append(card(_ms(percentile(lat, 50)), "latency p50"))
    cards.append(card(_ms(percentile(lat, 99)), "latency p99"))
    if data.ttft_ms:
        cards.append(card(_ms(percentile(sorted(data.ttft_ms), 50)), "TTFT p50 (streamed)"))
    cards.append(card(f"{len(data.pauses):,}",
                       f"pauses for 429s ({data.paused_seconds():,.1f} s in all)",
                       "warn" if data.pauses else ""))
    if data.tokens and active > 0:
        cards.append(card(f"{data.tokens / active:,.0f}", "tokens / s (while sending)"))
    if len(data.run_starts) > 1:
        cards.append(card(str(len(data.run_starts)), "runs (resumed)"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def cache_cards(data: RunData, out_dir: Path) -> str:
    """--cache: the lines the cache answered (the journal's), and the last run's hits,
    misses and spend avoided (summary.json's `cache`)."""
    summary = read_summary(out_dir)
    last = getattr(summary, "cache", None) if summary is not None else None
    if not data.cached and not last:
        return ""
    cards = [card(f"{data.cached:,}", "lines answered from the cache (nothing sent)")]
    if last:
        cards.append(card(f"{last['hits']:,} / {last['misses']:,}",
                           "cache hits / misses (last run)"))
        saved = f"{last['tokens_saved']['total']:,}"
        if last.get("usd_saved") is not None:
            saved += f" · ${last['usd_saved']:,.4f}"
        cards.append(card(saved, "tokens · USD the cache saved (last run)"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def chart_html(name: str, png: bytes | None, alt: str, missing: str) -> str:
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
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.t)) if h.t else "?"
    shards = f" · merged from {len(h.merged)} shard directories" if h.merged is not None else ""
    meta = (f"job <code>{html.escape(h.job)}</code>{shards} · started {when} · input "
            f"<code>{html.escape(h.input)}</code> · output "
            f"<code>{html.escape(str(out_dir))}</code>")
    failures = data.failures
    untimed = ""
    if data.untimed_outcomes and timed:
        untimed = (f'<p class="note">{data.untimed_outcomes:,} outcome(s) have no time (found '
                   "or recovered on resume) and are counted above but not drawn.</p>")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>tmbatch report · {html.escape(h.job)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>tmbatch run report</h1>", f'<p class="meta">{meta}</p>',
        _cards(data) + cache_cards(data, out_dir),
        "<h2>Throughput</h2>",
        chart_html("throughput.png", charts["throughput.png"],
               "outcomes per second over time, with 429 pauses shaded", no_time),
        untimed,
        "<h2>Latency</h2>",
        chart_html("latency.png", charts["latency.png"], "histogram of request latency",
               no_time if not timed else "No successful request to measure."),
        "<h2>Time to first token</h2>",
        chart_html("ttft.png", charts["ttft.png"], "histogram of time to first token",
               "No streamed request in this run: TTFT is measured only with \"stream\": true."),
        "<h2>Failures</h2>",
        chart_html("failures.png", charts["failures.png"], "failures by class and code", "")
        if failures else "",
        _failure_table(failures),
        "<h2>Cost</h2>",
        chart_html("cost.png", charts["cost.png"], "the job's spend over time, with its budget",
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
