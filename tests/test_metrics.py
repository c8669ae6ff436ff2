"""Prometheus metrics (`--metrics-port`) and the Pushgateway (`--pushgateway`): scraped over a
real socket while a simulator run goes, pushed to a real `prometheus-pushgateway`, and checked
against the run's summary.json."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import chat_line, clean_env, run_cli, write_jsonl
from tests.daemons import Pushgateway, free_port, running

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str, **match: str) -> Samples:
    """sample name -> [(labels, value)], only the samples whose labels include `match`."""
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if all(s.labels.get(k) == v for k, v in match.items()):
                out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, [])
               if all(labels.get(k) == x for k, x in match.items()))


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()
    except OSError:
        return None


def agree_with_summary(m: Samples, summary: dict[str, Any]) -> None:
    run = summary["this_run"]
    assert total(m, "tmbatch_lines_total", outcome="succeeded", **{"class": "ok"}) \
        == run["succeeded"]
    for cls, n in run["failed_by_class"].items():
        assert total(m, "tmbatch_lines_total", outcome="failed", **{"class": cls}) == n
    assert total(m, "tmbatch_requests_total") == run["attempts_sent"]
    assert total(m, "tmbatch_requests_total", status="429") == run["rate_limited_429"]
    assert total(m, "tmbatch_requests_total", status="200") == run["succeeded"]
    assert total(m, "tmbatch_tokens_total", kind="prompt") == run["tokens"]["prompt"]
    assert total(m, "tmbatch_tokens_total", kind="completion") == run["tokens"]["completion"]
    assert total(m, "tmbatch_refusals_total") == run["admission"]["refusals"]
    assert total(m, "tmbatch_request_duration_seconds_count") == run["succeeded"]
    assert total(m, "tmbatch_in_flight") == 0
    assert total(m, "tmbatch_lines_pending") == 0


def test_metrics_live_and_pushed_agree_with_the_summary(tmp_path: Path) -> None:
    rows = [chat_line(i, model="tm-small" if i % 2 else "tm-large") for i in range(400)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out, port = tmp_path / "out", free_port()
    with running(Pushgateway()) as gw:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tmbatch", "run", str(inp), "-o", str(out), "--sim",
             "--sim-models", "tm-small,tm-large", "--sim-rate-limit", "60",
             "--sim-latency", "0.02", "-c", "8", "--shard", "1/2", "--job-id", "nightly-7",
             "--metrics-port", str(port), "--pushgateway", gw.url, "-q"],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        live: list[Samples] = []
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            page = scrape(port)
            if page is not None:
                m = parse(page)
                if total(m, "tmbatch_lines_pending") > 0 and total(m, "tmbatch_lines_total"):
                    live.append(m)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        summary = orjson.loads((out / "summary.json").read_bytes())
        pushed = parse(gw.page(), job="nightly-7", shard="1")
    assert live, "no scrape caught the run midway"
    m = live[-1]
    assert 0 < total(m, "tmbatch_lines_total") < 200  # midway: counting, not done
    assert total(m, "tmbatch_lines_pending") + total(m, "tmbatch_lines_total") <= 200
    for labels, _ in m["tmbatch_requests_total"]:  # bounded labels: no custom_id, no prompt
        assert set(labels) == {"route", "model", "status"}
        assert labels["model"] in ("tm-small", "tm-large")
        assert labels["route"] == "/v1/chat/completions"
    assert summary["this_run"]["rate_limited_429"] > 0  # the limit was met: 429s counted
    assert summary["counts"]["succeeded"] == 200
    agree_with_summary(pushed, summary)  # the last push has the run's final values


def test_an_unreachable_pushgateway_is_one_warning_and_the_run_finishes(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(20)])
    r = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--sim", "--pushgateway",
                 f"http://127.0.0.1:{free_port()}"])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("cannot push metrics") == 1
    assert orjson.loads((tmp_path / "out" / "summary.json").read_bytes())[
        "counts"]["succeeded"] == 20


@pytest.mark.parametrize(("args", "says"), [
    (["--pushgateway", "localhost:9091"], "--pushgateway 'localhost:9091' is not a URL"),
    (["--redis", "redis://127.0.0.1:1/0"], "--redis-prefix NAME"),
    (["--redis", "http://x"], "is not a URL: give redis://HOST:PORT"),
    (["--redis-prefix", "a b", "--redis", "redis://h"], "letters, digits"),
])
def test_fleet_settings_are_checked_before_anything_is_sent(
        tmp_path: Path, args: list[str], says: str) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])
    r = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--sim", *args])
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_print_config_shows_the_redis_url_without_its_password(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(0)])
    r = run_cli(["run", str(inp), "--sim", "--print-config", "--redis-prefix", "nightly"],
                env=clean_env(TMBATCH_REDIS_URL="redis://:hunter2@10.0.0.5:6379/0"))
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout + r.stderr
    assert "redis://10.0.0.5:6379/0" in r.stdout
    assert "env TMBATCH_REDIS_URL" in r.stdout
