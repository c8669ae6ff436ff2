"""`tmbatch report`: a real run against the simulator, a real report, rendered by a real
headless Chromium; and the paths where it cannot be made (no extra installed, not a run)."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import chat_line, clean_env, read_jsonl, run_cli, write_jsonl
from tmbatch.journal.compact import IN_FLIGHT, OK
from tmbatch.journal.journal import load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("throughput.png", "latency.png", "ttft.png", "failures.png", "cost.png")


def require(available: bool, what: str) -> None:
    """Skip only on a developer machine without it; in CI (CI set) a missing tool fails."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is not installed")
    pytest.skip(f"{what} is not installed (CI would fail here)")


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with every kind of thing a report shows: streams, a 429 pause, failures."""
    tmp = tmp_path_factory.mktemp("run")
    rows: list[Any] = [chat_line(i, stream=i % 2 == 0) for i in range(40)]
    rows[5]["body"]["sim"] = {"status": 429, "times": 1, "retry_after": 0.2}
    rows[9]["body"]["sim"] = {"status": 400}
    rows[13]["body"]["sim"] = {"status": 500}
    rows.append(b"{not json")
    inp = write_jsonl(tmp / "in.jsonl", rows)
    out = tmp / "out"
    p = run_cli(["run", str(inp), "-o", str(out), "--sim", "--sim-latency", "0.01",
                 "--concurrency", "4", "-q"])
    assert p.returncode == 1, p.stderr  # some lines failed, on purpose
    return out


def test_journal_carries_times_and_pauses_and_resume_still_reads_it(finished_run: Path) -> None:
    journal = read_jsonl(finished_run / "journal.jsonl")
    oks = [r for r in journal if isinstance(r, list) and r[0] == "o" and r[2] == "ok"]
    assert len(oks) == 38
    assert all(isinstance(r[4], float) and r[5] > 0 for r in oks)
    assert sum(1 for r in oks if r[6] is not None) == 20  # TTFT only for the streamed half
    assert [r[2] for r in journal if isinstance(r, list) and r[0] == "p"] == [0.2]
    state = load(finished_run)  # new trailing fields and "p" records: resume is unaffected
    counts = state.states.counts()
    assert counts[OK] == 38 and counts[IN_FLIGHT] == 0 and not state.in_flight


def test_report_is_self_contained_and_renders_in_headless_chromium(
        finished_run: Path, tmp_path: Path) -> None:
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    p = run_cli(["report", str(finished_run)])
    assert p.returncode == 0, p.stderr
    page = finished_run / "report" / "index.html"
    assert p.stdout.strip() == str(page)
    text = page.read_text()
    # self-contained: nothing fetched from anywhere, every chart embedded
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    assert "<script" not in text and "<link" not in text
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)" [^>]*data-file="([^"]+)"', text)
    assert sorted(name for _, name in embedded) == sorted(CHARTS)
    for b64, name in embedded:  # the page shows exactly the PNGs written beside it
        png = (page.parent / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and base64.b64decode(b64) == png
    assert "http_400" in text and "http_500" in text and "invalid_json" in text
    assert "pauses for 429s (0.2 s in all)" in text
    assert "<h2>Cost</h2>" in text and "no spend records" not in text

    browser = chromium()
    require(browser is not None, "chromium (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(browser), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", page.as_uri()],
        capture_output=True, timeout=120, check=False, cwd=tmp_path,
    )
    assert shot.exists() and shot.read_bytes().startswith(PNG_MAGIC), "no screenshot"
    from matplotlib.image import imread

    img = (imread(shot)[:, :, :3] * 255).round()
    assert img.shape[1] == 1200

    def pixels_near(rgb: tuple[int, int, int]) -> int:
        return int((abs(img - rgb).max(axis=2) <= 12).sum())

    # The charts' own colours on screen prove the embedded images decoded and were drawn;
    # text alone is black and grey.
    assert pixels_near((0x2B, 0x7B, 0xB9)) > 5000, "no throughput/latency bars on screen"
    assert pixels_near((0x00, 0x9E, 0x73)) > 1000, "no TTFT histogram on screen"
    assert pixels_near((0xD5, 0x5E, 0x00)) > 200, "no failure bars on screen"


def test_without_the_extra_report_says_how_to_install_it(finished_run: Path,
                                                        tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    env = clean_env()
    env["PYTHONPATH"] = f"{blocker.parent}{os.pathsep}{env['PYTHONPATH']}"
    p = run_cli(["report", str(finished_run), "-o", str(tmp_path / "r")], env=env)
    assert p.returncode == 2
    assert "pip install 'tmbatch[report]'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()

    p = run_cli(["report", str(finished_run), "-o", str(tmp_path / "r"), "--log-format", "json"],
                env=env)
    assert p.returncode == 2
    (err,) = [orjson.loads(x) for x in p.stderr.splitlines()]
    assert err["event"] == "error" and "tmbatch[report]" in err["msg"]


def test_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path: Path) -> None:
    p = run_cli(["report", str(tmp_path)])
    assert p.returncode == 2
    assert "not a tmbatch output directory" in p.stderr and "Traceback" not in p.stderr


def test_an_old_journal_without_times_still_reports_failures(tmp_path: Path) -> None:
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    out = tmp_path / "old"
    out.mkdir()
    write_jsonl(out / "journal.jsonl", [
        {"e": "start", "v": 1, "input": "/x/in.jsonl", "fingerprint": "f", "job": "oldjob",
         "t": 1.7e9},
        ["d", 1, 1, "a"], ["o", 1, "ok"],
        ["d", 2, 1, "b"], ["o", 2, "permanent", "http_400"],
        ["d", 3, 1, "c"],  # in flight when it stopped: no outcome, not drawn
    ])
    stale = out / "report" / "throughput.png"
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)
    p = run_cli(["report", str(out)])
    assert p.returncode == 0, p.stderr
    text = (out / "report" / "index.html").read_text()
    assert "has no timestamps" in text and "oldjob" in text
    assert (out / "report" / "failures.png").exists()
    assert not stale.exists(), "a chart from an older report must not linger"
    assert "http_400" in text
    assert "no spend records" in text and not (out / "report" / "cost.png").exists()


def _two_runs(tmp_path: Path) -> Path:
    """A run of 100 outcomes over 10 s with overlapping 429 pauses, then, an hour later, a
    resend of two lines that took 0.1 s; results carry 50 tokens each."""
    out = tmp_path / "two"
    out.mkdir()
    t0 = 1.7e9
    records: list[Any] = [{"e": "start", "v": 1, "input": "/x/in.jsonl", "fingerprint": "f",
                           "job": "twojob", "t": t0}]
    for i in range(1, 101):
        records += [["d", i, 1, f"r{i}"], ["o", i, "ok", "", t0 + i / 10, 12.0, None]]
    records += [["p", t0 + 2.0, 2.0], ["p", t0 + 3.0, 2.0], ["p", t0 + 3.5, 0.5]]  # 3 s paused
    records += [{"e": "resume", "t": t0 + 3600, "resend": 2}]
    records += [["d", 101, 1, "r101"], ["o", 101, "ok", "", t0 + 3600.1, 12.0, None],
                ["d", 102, 1, "r102"], ["o", 102, "ok", "", t0 + 3600.2, 12.0, None]]
    write_jsonl(out / "journal.jsonl", records)
    usage = {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50}
    write_jsonl(out / "results.jsonl", [
        {"custom_id": f"r{i}", "line": i, "error": None,
         "response": {"status_code": 200, "body": {"usage": usage}}} for i in range(1, 103)])
    (out / "summary.json").write_bytes(orjson.dumps(
        {"this_run": {"tokens": {"per_second": 3.0}}}))  # the resend's own, tiny, rate
    return out


def test_rates_count_time_spent_sending_and_pauses_count_once(tmp_path: Path) -> None:
    from tmbatch.tools.report_data import load_run

    out = _two_runs(tmp_path)
    data = load_run(out)
    assert data.paused_seconds() == 3.0  # 2 + 2 + 0.5 overlapping: their union
    active = data.active_seconds()
    assert abs(active - (9.9 + 0.1)) < 1e-6  # the hour between the runs is not counted
    assert data.tokens == 102 * 50
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    p = run_cli(["report", str(out)])
    assert p.returncode == 0, p.stderr
    text = (out / "report" / "index.html").read_text()
    assert "3 pauses for 429s (3.0 s in all)" in text.replace("</b><span>", " ")
    assert f"{102 / active:,.1f}</b><span>outcomes / s (while sending)" in text
    assert f"{102 * 50 / active:,.0f}</b><span>tokens / s (while sending)" in text
    assert "last run" not in text


def test_the_legend_is_outside_the_plot_where_pause_bands_cannot_cover_it(
        tmp_path: Path) -> None:
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    from tmbatch.tools.report_charts import load_matplotlib, throughput_figure
    from tmbatch.tools.report_data import load_run

    load_matplotlib()
    fig = throughput_figure(load_run(_two_runs(tmp_path)))
    fig.canvas.draw()
    (ax,) = fig.axes
    legend, plot = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y0 >= plot.y1 - 1  # above the axes, whose full height the bands fill
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "429 pause (Retry-After)" in labels and "resumed" in labels


def test_the_report_draws_cost_over_time_against_the_budget(sim: Any, tmp_path: Path) -> None:
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    from tests.conftest import API_KEY
    from tmbatch.tools.report_data import load_run

    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i, max_tokens=16) for i in range(50)])
    out = tmp_path / "out"
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    args = ["run", str(inp), "-o", str(out), "--base-url", sim.url, "--no-preflight", "-q",
            "--price", "tm-small=100:300"]
    assert run_cli([*args, "--budget-usd", "0.03"], env=env).returncode == 6
    assert run_cli([*args, "--budget-usd", "1"], env=env).returncode == 0  # resumed
    data = load_run(out)
    assert data.budget is not None and data.budget.usd == 1
    assert len(data.spend) >= 4 and data.spend[-1].spent["tm-small"][3] == 50
    p = run_cli(["report", str(out)])
    assert p.returncode == 0, p.stderr
    text = (out / "report" / "index.html").read_text()
    assert 'data-file="cost.png"' in text and "spend over time, with its budget" in text
    assert (out / "report" / "cost.png").read_bytes().startswith(PNG_MAGIC)
