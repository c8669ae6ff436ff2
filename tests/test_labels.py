"""Labelling jobs: records + template -> requests -> labels.jsonl, nothing silently dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import API_KEY, ROOT, clean_env, read_jsonl, run_cli, write_jsonl
from tmbatch.base.config import ConfigError
from tmbatch.inputs.templates import load_spec
from tmbatch.tools.labels import check_value, parse_answer

ALLOWED = {"positive", "negative", "neutral"}


def spec(**table: Any) -> Any:
    table.setdefault("template", "{text}")
    return load_spec(Path("jobs/t.toml"), table)


def test_label_matching_is_lenient_in_form_strict_in_content() -> None:
    s = spec(labels=["Positive", "negative"])
    assert parse_answer(s, " positive.\n") == ("ok", "Positive", None)
    assert parse_answer(s, '"NEGATIVE"') == ("ok", "negative", None)
    status, label, why = parse_answer(s, "mostly positive")
    assert (status, label) == ("invalid_label", None) and "Positive, negative" in str(why)
    assert parse_answer(s, "   ")[0] == "unparsable"
    assert parse_answer(s, None)[0] == "unparsable"
    assert parse_answer(spec(), "anything at all") == ("ok", "anything at all", None)


def test_schema_answers_parse_and_validate_without_a_dependency() -> None:
    schema = {"type": "object", "required": ["sentiment"], "additionalProperties": False,
              "properties": {"sentiment": {"type": "string", "enum": ["pos", "neg"]},
                             "score": {"type": "number"}}}
    s = spec(schema=schema)
    assert parse_answer(s, '{"sentiment": "pos", "score": 0.5}')[:2] == (
        "ok", {"sentiment": "pos", "score": 0.5})
    assert parse_answer(s, '```json\n{"sentiment": "neg"}\n```')[0] == "ok"
    assert parse_answer(s, "pos")[0] == "unparsable"
    assert "not one of" in str(parse_answer(s, '{"sentiment": "meh"}')[2])
    assert "lacks required key `sentiment`" in str(parse_answer(s, '{"score": 1}')[2])
    assert "unexpected key(s) extra" in str(parse_answer(s, '{"sentiment":"pos","extra":1}')[2])
    assert "not of type number" in str(parse_answer(s, '{"sentiment":"pos","score":true}')[2])
    assert check_value([1, "x"], {"type": "array", "items": {"type": "integer"}}) == (
        'answer[1] is "x", not of type integer')


@pytest.mark.parametrize(("template", "needle"), [
    ("Review: {text.upper}", "not a plain field name"),
    ("Review: {text!r}", "not a plain field name"),
    ("Answer as {\"a\": 1}", "not a plain field name"),
    ("Review: {text", "{{ or }}"),
])
def test_bad_templates_are_config_errors(template: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"label\.template") as info:
        spec(template=template)
    assert needle in str(info.value)


def test_labels_and_schema_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"either `label\.labels` or a schema"):
        spec(labels=["a"], schema={"type": "object"})


def test_shipped_sentiment_job_runs_end_to_end_on_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli(["run", "jobs/label-sentiment.toml", "--sim", "-o", str(out), "--rpm", "60000"])
    assert r.returncode == 0, r.stderr
    records = read_jsonl(ROOT / "samples" / "reviews.jsonl")
    labels = read_jsonl(out / "labels.jsonl")
    assert len(records) >= 40
    assert [row["id"] for row in labels] == [rec["id"] for rec in records]
    assert all(row["status"] == "ok" and row["label"] in ALLOWED for row in labels)
    assert len({row["label"] for row in labels}) > 1  # the simulator really chose per record
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["labels"]["ok"] == len(records) and summary["counts"]["succeeded"] == 40
    assert "labels: 40 ok" in r.stderr


def write_job(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "mixed.toml"
    p.write_text(
        'input = "records.jsonl"\nmodel = "tm-small"\n' + extra
        + '[label]\nid_field = "key"\ntemplate = """Text: {text}\nAllowed labels: {choices}"""\n'
        'labels = ["positive", "negative"]\n', encoding="utf-8")
    return p


RECORDS: list[Any] = [
    {"key": "a", "text": "great", "choices": "positive"},         # 1 ok
    {"key": "b", "text": "fine", "choices": "maybe"},              # 2 invalid_label
    {"key": 3, "text": "awful", "choices": "NEGATIVE."},            # 3 ok, canonical spelling
    {"key": "d", "choices": "positive"},                           # 4 missing {text}
    b"{not json",                                                  # 5 not JSON
    {"text": "no id", "choices": "positive"},                      # 6 no id
    b"",                                                           # 7 blank: skipped
    {"key": "a", "text": "again", "choices": "positive"},         # 8 duplicate id
    {"key": "h", "text": None, "choices": "positive"},            # 9 null field
]


def test_every_record_gets_exactly_one_labels_line(tmp_path: Path, sim: Any) -> None:
    write_jsonl(tmp_path / "records.jsonl", RECORDS)
    p = write_job(tmp_path)
    out = tmp_path / "out"
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    r = run_cli(["run", str(p), "--base-url", sim.url, "-o", str(out)], env=env)
    assert r.returncode == 1, r.stderr  # some labels are not ok
    assert "record line 4: field `text` (used by the template as {text}) is missing" in r.stderr
    rows = {row["line"]: row for row in read_jsonl(out / "labels.jsonl")}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 8, 9]
    assert rows[1] == {"id": "a", "line": 1, "label": "positive", "status": "ok"}
    assert rows[2]["status"] == "invalid_label" and rows[2]["raw"] == "maybe"
    assert rows[3]["id"] == 3 and rows[3]["label"] == "negative"
    assert rows[4]["status"] == "failed" and rows[4]["error"]["code"] == "missing_field"
    assert "record line 4" in rows[4]["error"]["message"]
    assert rows[5]["error"]["code"] == "invalid_json"
    assert rows[6]["error"]["code"] == "invalid_id" and rows[6]["id"] is None
    assert rows[8]["status"] == "failed" and rows[8]["error"]["code"] == "duplicate_custom_id"
    assert "is null" in rows[9]["error"]["message"]
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["labels"] == {"file": "labels.jsonl", "ok": 2, "invalid_label": 1,
                                 "unparsable": 0, "failed": 5}
    assert sim.stats()["processed_total"] == 3  # only renderable, unique records were sent
    # The same command again resumes: nothing is sent, labels.jsonl is rebuilt identically.
    before = (out / "labels.jsonl").read_bytes()
    r = run_cli(["run", str(p), "--base-url", sim.url, "-o", str(out)], env=env)
    assert r.returncode == 1 and sim.stats()["processed_total"] == 3
    assert (out / "labels.jsonl").read_bytes() == before
    # Another template on the same output is refused rather than mixed in.
    p.write_text(p.read_text().replace("Text:", "Words:"), encoding="utf-8")
    r = run_cli(["run", str(p), "--base-url", sim.url, "-o", str(out)], env=env)
    assert r.returncode == 2 and "was started from other records" in r.stderr


def test_json_schema_mode_sends_response_format_and_lists_unparsable(tmp_path: Path,
                                                                      sim: Any) -> None:
    rows = [{"id": 1, "text": "x", "choices": '{"sentiment":"positive"}'},
            {"id": 2, "text": "y", "choices": '{"sentiment":"bogus"}'},
            {"id": 3, "text": "z", "choices": "not-json"}]
    write_jsonl(tmp_path / "records.jsonl", rows)
    p = tmp_path / "schema.toml"
    p.write_text(
        'input = "records.jsonl"\nmodel = "tm-small"\n[label]\n'
        'template = """{text}\nAllowed labels: {choices}"""\n'
        '[label.schema]\ntype = "object"\nrequired = ["sentiment"]\n'
        '[label.schema.properties.sentiment]\ntype = "string"\n'
        'enum = ["positive", "negative"]\n', encoding="utf-8")
    out = tmp_path / "out"
    r = run_cli(["run", str(p), "--base-url", sim.url, "-o", str(out)],
                env=clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY))
    assert r.returncode == 1, r.stderr
    got = {row["id"]: row for row in read_jsonl(out / "labels.jsonl")}
    assert got[1]["status"] == "ok" and got[1]["label"] == {"sentiment": "positive"}
    assert got[2]["status"] == "invalid_label" and got[2]["raw"] == '{"sentiment":"bogus"}'
    assert got[3]["status"] == "unparsable" and got[3]["raw"] == "not-json"
    request = read_jsonl(out / "requests.jsonl")[0]["body"]
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["schema"]["required"] == ["sentiment"]


def test_label_job_without_model_is_a_usage_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "records.jsonl", [{"id": 1, "text": "x"}])
    p = tmp_path / "j.toml"
    p.write_text('input = "records.jsonl"\n[label]\ntemplate = "{text}"\n', encoding="utf-8")
    r = run_cli(["run", str(p), "--sim", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "needs a model" in r.stderr and "Traceback" not in r.stderr


def test_a_labelling_job_runs_on_several_models(tmp_path: Path, sim: Any) -> None:
    """--models on a labelling job: each model renders the records into its own requests
    (its own model in every body), writes its own labels.jsonl, resumes on its own; the
    parent is what `tmbatch compare` reads for the label agreement. --samples is refused
    before anything is sent (one label per record and model)."""
    write_jsonl(tmp_path / "records.jsonl", RECORDS)
    p = write_job(tmp_path)  # its `model = "tm-small"`: --models on the command line wins
    out = tmp_path / "out"
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    cmd = ["run", str(p), "--base-url", sim.url, "-o", str(out), "--models", "tm-small,tm-large"]
    r = run_cli(cmd, env=env)
    assert r.returncode == 1, r.stderr  # some labels are not ok, in each model
    for model in ("tm-small", "tm-large"):
        rows = {row["line"]: row for row in read_jsonl(out / model / "labels.jsonl")}
        assert sorted(rows) == [1, 2, 3, 4, 5, 6, 8, 9]
        assert rows[1]["label"] == "positive" and rows[3]["label"] == "negative"
        bodies = [r["body"] for r in read_jsonl(out / model / "requests.jsonl")]
        assert bodies and {b["model"] for b in bodies} == {model}
    assert sim.stats()["processed_total"] == 6  # three renderable records, two models
    again = run_cli(cmd, env=env)
    assert again.returncode == 1 and sim.stats()["processed_total"] == 6  # resumed: none sent
    compared = orjson.loads(run_cli(["compare", str(out), "--json"], env=env).stdout)
    assert compared["runs"][0]["run"] == "tm-small" and compared["labels"], compared.keys()
    samples = run_cli([*cmd, "--samples", "2", "-o", str(tmp_path / "s")], env=env)
    assert samples.returncode == 2 and "--samples does not run labelling" in samples.stderr
    assert sim.stats()["processed_total"] == 6
