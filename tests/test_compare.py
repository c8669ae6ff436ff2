"""`tmbatch compare`: real runs on the simulator (labelling jobs with different prompts, chat
runs with failures and truncations), compared through the real command; kappa against
textbook figures; and every way the directories can be wrong."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, chat_line, read_jsonl, run_cli, write_jsonl
from tests.test_report import PNG_MAGIC, chromium, has_matplotlib, require
from tmbatch.tools.compare_stats import cohen_kappa, normalise

LABELS = ["positive", "negative", "neutral"]


# -- the arithmetic -------------------------------------------------------------------------
def test_kappa_matches_the_textbook_examples() -> None:
    # Wikipedia, "Cohen's kappa": 50 grant proposals read by A and B; 20 yes/yes, 5 yes/no,
    # 10 no/yes, 15 no/no: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4
    table = Counter({("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15})
    assert cohen_kappa(table) == pytest.approx(0.4)
    # its second example: 45/15/25/15 of 100: p_o = 0.6, p_e = 0.6*0.7 + 0.4*0.3 = 0.54,
    # kappa = 0.06 / 0.46 = 0.1304...
    table = Counter({("yes", "yes"): 45, ("yes", "no"): 15, ("no", "yes"): 25, ("no", "no"): 15})
    assert cohen_kappa(table) == pytest.approx(0.06 / 0.46)
    assert round(cohen_kappa(table) or 0, 4) == 0.1304
    # symmetric in the raters; perfect agreement is 1; agreement at chance level is 0
    swapped = Counter({(b, a): n for (a, b), n in table.items()})
    assert cohen_kappa(swapped) == pytest.approx(cohen_kappa(table))
    assert cohen_kappa(Counter({("a", "a"): 3, ("b", "b"): 7})) == 1.0
    assert cohen_kappa(Counter({("a", "a"): 1, ("a", "b"): 1, ("b", "a"): 1,
                                ("b", "b"): 1})) == 0.0
    # undefined (0/0): no units, or both raters always the same single category
    assert cohen_kappa(Counter()) is None
    assert cohen_kappa(Counter({("a", "a"): 5})) is None


def test_answers_are_the_same_after_whitespace_and_case_only() -> None:
    assert normalise("  The  Answer\n is\tPARIS ") == normalise("the answer is paris")
    assert normalise("Paris.") != normalise("Paris")


# -- two labelling runs: the same records, two prompts, gold labels ---------------------------
def _job(tmp: Path, name: str, system: str) -> Path:
    text = (ROOT / "jobs" / "label-sentiment.toml").read_text()
    text = text.replace('input = "../samples/reviews.jsonl"', 'input = "records.jsonl"')
    text = text.replace("You are a careful annotator.", system)
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """out/tm-small and out/tm-large, as `run --models` lays them out: the same 40 records
    (each with a gold label) labelled by two models with different system prompts, so their
    labels differ (the simulator picks a label by a hash of the prompt)."""
    tmp = tmp_path_factory.mktemp("lab")
    records = read_jsonl(ROOT / "samples" / "reviews.jsonl")
    for i, rec in enumerate(records):
        rec["gold"] = LABELS[i % 3]
    write_jsonl(tmp / "records.jsonl", records)
    out = tmp / "out"
    for model, system in (("tm-small", "You are a careful annotator."),
                          ("tm-large", "You are a quick annotator.")):
        p = run_cli(["run", str(_job(tmp, model, system)), "--sim", "--rpm", "60000", "-q",
                     "--model", model, "-o", str(out / model), "--price", "tm-small=0.2:0.6",
                     "--price", "tm-large=1:3"])
        assert p.returncode == 0, p.stderr
    return out


def _labels(run: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in read_jsonl(run / "labels.jsonl")}


def test_labels_carry_the_records_gold_label(labelled: Path) -> None:
    rows = read_jsonl(labelled / "tm-small" / "labels.jsonl")
    assert len(rows) == 40 and [r["gold"] for r in rows[:4]] == [*LABELS, "positive"]
    assert all(r["status"] == "ok" and r["label"] in LABELS for r in rows)
    sent = read_jsonl(labelled / "tm-small" / "requests.jsonl")
    assert "gold" not in orjson.dumps(sent).decode()  # the gold label is never sent


def test_compare_a_models_parent_as_json(labelled: Path) -> None:
    p = run_cli(["compare", str(labelled), "--json"])
    assert p.returncode == 0, p.stderr
    c = orjson.loads(p.stdout)
    small, large = _labels(labelled / "tm-small"), _labels(labelled / "tm-large")
    # runs are named by their model, in directory order
    assert [r["run"] for r in c["runs"]] == ["tm-large", "tm-small"]
    for row in c["runs"]:
        assert row["lines"] == 40 and row["succeeded"] == 40 and row["success_rate"] == 1.0
        assert row["failed"] == 0 and set(row["failed_by_class"]) == {
            "not_sent", "rejected", "ambiguous", "permanent", "fatal"}
        assert row["finish_reasons"] == {"stop": 40}
        assert row["latency_ms"]["p50"] > 0 and row["latency_ms"]["p99"] >= row["latency_ms"]["p90"]
        spent = orjson.loads((labelled / row["run"] / "summary.json").read_bytes())["spend"]
        booked = spent["by_model"][row["run"]]["spent"]
        assert (row["tokens_in"], row["tokens_out"]) == (booked["prompt"], booked["completion"])
        price = {"tm-small": (0.2, 0.6), "tm-large": (1.0, 3.0)}[row["run"]]
        assert row["usd"] == pytest.approx(
            (booked["prompt"] * price[0] + booked["completion"] * price[1]) / 1e6)
        labels = _labels(labelled / row["run"])
        correct = sum(1 for r in labels.values() if r["label"] == r["gold"])
        acc = row["accuracy"]
        assert (acc["correct"], acc["total"]) == (correct, 40)
        confusion = Counter((r["gold"], r["label"]) for r in labels.values())
        assert {(g, p): n for g, r in zip(acc["gold"], acc["matrix"], strict=True)
                for p, n in zip(acc["predicted"], r, strict=True) if n} == dict(confusion)
    same = sum(1 for k in small if small[k]["label"] == large[k]["label"])
    assert 0 < same < 40, "the two prompts must give different labels for the test to mean it"
    assert c["units_in_all"] == 40 and c["units_in_some"] == 0
    assert c["all_agree"] == {"agree": same, "total": 40, "rate": same / 40}
    (pair,) = c["pairs"]
    assert (pair["a"], pair["b"]) == ("tm-large", "tm-small") and c["labels"] is True
    assert pair["labels"]["agree"] == same and pair["answers"]["agree"] == same
    table = Counter((large[k]["label"], small[k]["label"]) for k in small)
    cats = pair["categories"]
    assert {(a, b): n for a, r in zip(cats, pair["matrix"], strict=True)
            for b, n in zip(cats, r, strict=True) if n} == dict(table)
    assert pair["kappa"] == pytest.approx(cohen_kappa(table))
    # the prompts differ, so the inputs do: said, and the custom_ids they share compared
    assert any("different input" in w for w in c["warnings"]) and "different input" in p.stderr
    first_differ = next(k for k in small if small[k]["label"] != large[k]["label"])
    assert c["disagreements"][0] == [first_differ, 0]


def test_compare_text_and_csv(labelled: Path) -> None:
    p = run_cli(["compare", str(labelled / "tm-small"), str(labelled / "tm-large")])
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "runs: 2" in text and "40 (100.0%)" in text and "Cohen's kappa" in text
    assert "tm-small (rows) against tm-large (columns)" in text
    assert "accuracy" in text and "against the gold labels" in text
    assert "$" in text and "stop 40" in text
    p = run_cli(["compare", str(labelled), "--csv"])
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert [r["run"] for r in rows] == ["tm-large", "tm-small"]
    c = orjson.loads(run_cli(["compare", str(labelled), "--json"]).stdout)
    for row, js in zip(rows, c["runs"], strict=True):
        assert int(row["succeeded"]) == js["succeeded"] == 40
        assert float(row["accuracy"]) == js["accuracy"]["rate"]
        assert float(row["latency_p90_ms"]) == js["latency_ms"]["p90"]
    assert rows[0]["kappa_with_tm-large"] == "" and rows[1]["agreement_with_tm-small"] == ""
    assert float(rows[0]["kappa_with_tm-small"]) == pytest.approx(c["pairs"][0]["kappa"])


def test_report_on_a_models_parent_compares_and_renders(labelled: Path, tmp_path: Path) -> None:
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    p = run_cli(["report", str(labelled)])
    assert p.returncode == 0, p.stderr
    page = labelled / "report" / "index.html"
    assert p.stdout.strip() == str(page)
    text = page.read_text()
    assert "<h2>Comparison</h2>" in text and 'data-file="compare.png"' in text
    assert (page.parent / "compare.png").read_bytes().startswith(PNG_MAGIC)
    for model in ("tm-small", "tm-large"):  # each model's own report, linked
        assert (labelled / model / "report" / "index.html").exists()
        assert f'href="../{model}/report/index.html"' in text
    assert "Cohen&#x27;s kappa" in text or "Cohen's kappa" in text

    html_dir = tmp_path / "cmp"
    p = run_cli(["compare", str(labelled), "--html", str(html_dir)])
    assert p.returncode == 0, p.stderr and (html_dir / "index.html").exists()
    browser = chromium()
    require(browser is not None, "chromium (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(browser), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,1600", (html_dir / "index.html").as_uri()],
        capture_output=True, timeout=120, check=False, cwd=tmp_path)
    assert shot.exists() and shot.read_bytes().startswith(PNG_MAGIC), "no screenshot"
    from matplotlib.image import imread

    img = (imread(shot)[:, :, :3] * 255).round()

    def pixels_near(rgb: tuple[int, int, int]) -> int:
        return int((abs(img - rgb).max(axis=2) <= 12).sum())

    assert pixels_near((0x2B, 0x7B, 0xB9)) > 3000, "no success-rate bars on screen"
    assert pixels_near((0x00, 0x9E, 0x73)) > 1000, "no accuracy bars on screen"


# -- chat runs: failures, truncation, partial and different inputs ---------------------------
@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a/: 30 lines, line 3 refused (400, permanent), line 7 a 500 (ambiguous);
    b/: the same lines, every fifth one cut at 3 tokens (finish_reason length)."""
    tmp = tmp_path_factory.mktemp("chat")
    rows_a = [chat_line(i) for i in range(30)]
    rows_a[3]["body"]["sim"] = {"status": 400}
    rows_a[7]["body"]["sim"] = {"status": 500}
    rows_b = [chat_line(i, max_tokens=3 if i % 5 == 0 else 16) for i in range(30)]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        inp = write_jsonl(tmp / f"{name}.jsonl", rows)
        p = run_cli(["run", str(inp), "-o", str(tmp / name), "--sim", "-q", "--rpm", "60000"])
        assert p.returncode in (0, 1), p.stderr
    return tmp


def test_failures_and_truncations_are_counted_and_compared(chats: Path) -> None:
    p = run_cli(["compare", str(chats / "a"), str(chats / "b"), "--json"])
    assert p.returncode == 0, p.stderr
    c = orjson.loads(p.stdout)
    a, b = c["runs"]
    assert (a["run"], b["run"]) == ("a", "b")  # no --model: named by directory
    assert a["succeeded"] == 28 and a["failed_by_class"]["permanent"] == 1
    assert a["failed_by_class"]["ambiguous"] == 1 and a["success_rate"] == pytest.approx(28 / 30)
    assert b["finish_reasons"] == {"stop": 24, "length": 6}
    # the 28 lines both answered; the truncated ones (0, 5, ..., 25: none of them 3 or 7)
    # are the ones that differ
    assert c["units_in_all"] == 30 and c["all_agree"] == {"agree": 22, "total": 28,
                                                          "rate": 22 / 28}
    assert c["disagreements"] == [[f"req-{i}", 0] for i in range(0, 30, 5)]
    assert c["labels"] is False and c["pairs"][0]["kappa"] is None
    assert c["warnings"] == ["b ran a different input than a (another file, template or "
                             "prompt: the journals' fingerprints differ); lines are compared "
                             "where their custom_ids match"]


def test_a_partial_run_and_another_input_compare_on_what_they_share(
        chats: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    shutil.copytree(chats / "b", part)
    raw = (part / "results.jsonl").read_bytes().splitlines(keepends=True)
    ids = [orjson.loads(x)["custom_id"] for x in raw[:10]]
    (part / "results.jsonl").write_bytes(b"".join(raw[:10]) + raw[10][:40])  # torn tail
    p = run_cli(["compare", str(chats / "a"), str(part), "--json"])
    assert p.returncode == 0, p.stderr
    c = orjson.loads(p.stdout)
    assert c["units_in_all"] == 10 and c["units_in_some"] == 20
    assert c["pairs"][0]["answers"]["total"] == sum(1 for i in ids if i not in ("req-3", "req-7"))

    (part / "results.jsonl").write_bytes(b"".join(raw[:3]) + b"{oops\n" + b"".join(raw[3:10]))
    p = run_cli(["compare", str(chats / "a"), str(part)])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{part / 'results.jsonl'}, line 4: not JSON" in p.stderr


def test_samples_are_matched_by_index_and_sample_picks_one(chats: Path, tmp_path: Path) -> None:
    """Outcome lines with a `sample` field (run --samples): each sample is compared with the
    same sample of the other run; --sample K compares sample K alone."""
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        shutil.copytree(chats / "b", d)
        rows = read_jsonl(d / "results.jsonl")
        doubled = []
        for r in rows:
            other = orjson.loads(orjson.dumps(r))
            other["sample"] = 1
            other["custom_id"] = r["custom_id"] + "#1"
            if name == "b":  # b's second samples all answer differently
                other["response"]["body"]["choices"][0]["message"]["content"] = "something else"
            doubled += [r, other]
        write_jsonl(d / "results.jsonl", doubled)
        runs.append(str(d))
    c = orjson.loads(run_cli(["compare", *runs, "--json"]).stdout)
    assert c["units_in_all"] == 60 and c["all_agree"]["agree"] == 30
    c = orjson.loads(run_cli(["compare", *runs, "--json", "--sample", "0"]).stdout)
    assert c["units_in_all"] == 30 and c["all_agree"]["agree"] == 30 and c["sample"] == 0
    c = orjson.loads(run_cli(["compare", *runs, "--json", "--sample", "1"]).stdout)
    assert c["units_in_all"] == 30 and c["all_agree"]["agree"] == 0
    p = run_cli(["compare", *runs, "--sample", "-1"])
    assert p.returncode == 2 and "--sample -1" in p.stderr


@pytest.mark.parametrize("case", ["missing", "file", "empty", "one", "twice", "corrupt"])
def test_what_cannot_be_compared_is_a_clear_error(case: str, chats: Path,
                                                  tmp_path: Path) -> None:
    a = str(chats / "a")
    args, needle = {
        "missing": ([a, str(tmp_path / "nope")], "no such directory"),
        "file": ([a, str(chats / "a.jsonl")], "is a file, not an output directory"),
        "empty": ([a, str(tmp_path)], "is not a tmbatch output directory"),
        "one": ([a], "compare needs at least two runs"),
        "twice": ([a, a], "is given twice"),
        "corrupt": ([a, str(tmp_path / "bad")], "not a tmbatch journal header"),
    }[case]
    if case == "corrupt":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "journal.jsonl").write_text("hello\n")
    p = run_cli(["compare", *args])
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr and p.stdout == ""


def test_gold_field_names_the_records_gold_label() -> None:
    from array import array

    from tmbatch.inputs.templates import load_spec
    from tmbatch.tools.labels import _label_row

    spec = load_spec(Path("jobs/t.toml"), {"template": "{text}", "gold_field": "answer"})
    raw = orjson.dumps({"id": "r1", "text": "fine", "answer": "positive", "gold": "no"})
    row = _label_row(spec, raw, 1, array("q"), {})
    assert row["gold"] == "positive" and row["status"] == "failed"  # no outcome yet
    plain = load_spec(Path("jobs/t.toml"), {"template": "{text}"})
    assert _label_row(plain, raw, 1, array("q"), {})["gold"] == "no"
    assert "gold" not in _label_row(plain, b'{"id": "r2", "text": "x"}', 1, array("q"), {})


def test_three_runs_get_a_pairwise_grid_and_a_page(chats: Path, tmp_path: Path) -> None:
    same = tmp_path / "a2"
    shutil.copytree(chats / "a", same)
    runs = [str(chats / "a"), str(chats / "b"), str(same)]
    p = run_cli(["compare", *runs])
    assert p.returncode == 0, p.stderr
    grid = p.stdout.split("pairwise: the same answer", 1)[1].splitlines()
    header, row_a = grid[1].split(), grid[2].split()
    assert header == ["a", "b", "a2"]
    assert row_a == ["a", "–", f"{100 * 22 / 28:.1f}%", "100.0%"]  # a2 is a copy of a
    c = orjson.loads(run_cli(["compare", *runs, "--json"]).stdout)
    assert [(x["a"], x["b"]) for x in c["pairs"]] == [("a", "b"), ("a", "a2"), ("b", "a2")]
    assert c["all_agree"] == {"agree": 22, "total": 28, "rate": 22 / 28}
    require(has_matplotlib(), "matplotlib (pip install '.[report]')")
    p = run_cli(["compare", *runs, "--html", str(tmp_path / "page")])
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "page" / "compare.png").read_bytes().startswith(PNG_MAGIC)
    text = (tmp_path / "page" / "index.html").read_text()
    assert text.count("<tr><td>a</td><td>") == 2  # a's pairs with b and a2


def test_a_run_that_sent_nothing_yet_is_compared_as_it_stands(chats: Path,
                                                               tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    header = read_jsonl(chats / "a" / "journal.jsonl")[0]
    write_jsonl(fresh / "journal.jsonl", [header])
    p = run_cli(["compare", str(chats / "a"), str(fresh), "--json"])
    assert p.returncode == 0, p.stderr
    c = orjson.loads(p.stdout)
    assert c["runs"][1]["succeeded"] == 0 and c["runs"][1]["pending"] == 30
    assert c["units_in_all"] == 0 and "nothing to compare line by line" in p.stderr
    p = run_cli(["compare", str(chats / "a"), str(fresh)])
    assert p.returncode == 0 and "30 not yet sent" in p.stdout


def test_labels_are_compared_only_when_every_run_has_them(labelled: Path, chats: Path) -> None:
    p = run_cli(["compare", str(labelled / "tm-small"), str(chats / "a"), "--json"])
    assert p.returncode == 0, p.stderr
    c = orjson.loads(p.stdout)
    assert c["labels"] is False and c["pairs"][0]["kappa"] is None
    assert c["runs"][0]["accuracy"] is not None and c["runs"][1]["accuracy"] is None
    assert "label agreement needs labels.jsonl in every run; a has none" in p.stderr
    assert c["units_in_all"] == 0 and c["units_in_some"] == 70  # no custom_id in common


def test_a_models_parent_names_and_orders_runs_as_models_json_lists_them(
        chats: Path, tmp_path: Path) -> None:
    """`run --models zeta,org/model -o out/`: out/models.json maps each directory (a name
    percent-encoded) to its model, in the order given; compare shows them so."""
    out = tmp_path / "out"
    for model_dir, src in (("zeta", "a"), ("org%2Fmodel", "b")):
        shutil.copytree(chats / src, out / model_dir)
        journal = read_jsonl(out / model_dir / "journal.jsonl")
        journal[0]["options"]["model"] = None  # as if the lines named their models
        write_jsonl(out / model_dir / "journal.jsonl", journal)
    listed = [{"model": "zeta", "dir": "zeta"}, {"model": "org/model", "dir": "org%2Fmodel"}]
    # each model's own units file differs (the model written in): the input models.json
    # names is what they share, so no "different input" warning
    (out / "models.json").write_bytes(orjson.dumps(
        {"input": str(chats / "a.jsonl"), "samples": 1, "models": listed}))
    p = run_cli(["compare", str(out), "--json"])
    c = orjson.loads(p.stdout)
    assert [(r["run"], r["model"], Path(r["path"]).name) for r in c["runs"]] == [
        ("zeta", "zeta", "zeta"), ("org/model", "org/model", "org%2Fmodel")]
    assert c["warnings"] == [] and "different input" not in p.stderr
    (out / "models.json").write_bytes(orjson.dumps(
        {"input": str(tmp_path / "gone.jsonl"), "samples": 1, "models": listed}))
    c = orjson.loads(run_cli(["compare", str(out), "--json"]).stdout)  # the journals decide
    assert [r["run"] for r in c["runs"]] == ["zeta", "org/model"]
    assert "org/model ran a different input than zeta" in c["warnings"][0]
    (out / "models.json").write_text("not json")  # ignored: names from the spend, then dirs
    c = orjson.loads(run_cli(["compare", str(out), "--json"]).stdout)
    assert [r["run"] for r in c["runs"]] == ["org%2Fmodel", "zeta"]
    assert [r["model"] for r in c["runs"]] == ["tm-small", "tm-small"]
