"""The commands that read an output directory, and the command line's own help."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from tests.conftest import chat_line, run_cli, write_jsonl
from tmbatch.cli.main import build_parser


def test_every_flag_of_every_command_says_what_it_does() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {a.option_strings or a.dest}"
               for name, command in sub.choices.items() for a in command._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []
    report = sub.choices["report"].format_usage()
    assert report.count("OUTPUT") == 1 and "-o DIR" in report  # one thing is called OUTPUT


def test_status_of_a_finished_run_whose_input_is_gone(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out"
    assert run_cli(["run", str(inp), "-o", str(out), "--sim", "-q"]).returncode == 0
    inp.unlink()
    p = run_cli(["status", str(out)])
    assert p.returncode == 0, p.stdout  # finished, not "not finished"
    assert "(finished)" in p.stdout and "not found here" in p.stdout
    st = orjson.loads(run_cli(["status", str(out), "--json"]).stdout)
    assert st["finished"] is True and st["not_yet_sent"] == 0 and st["input_lines"] == 4
    assert st["input_readable"] is False
    journal = out / "journal.jsonl"  # a dispatch with no outcome: not finished after all
    journal.write_bytes(journal.read_bytes() + b'["d",9,1,"req-9"]\n')
    p = run_cli(["status", str(out)])
    assert p.returncode == 1 and "not finished" in p.stdout


def test_export_has_no_ordered_flag_and_says_what_to_do(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(2)])
    out = tmp_path / "out"
    assert run_cli(["run", str(inp), "-o", str(out), "--sim", "-q"]).returncode == 0
    p = run_cli(["export", str(out), "--ordered"])
    assert p.returncode == 2 and "always writes in input order; drop the flag" in p.stderr
    assert not (out / "results.ordered.jsonl").exists()
    assert "--ordered" not in run_cli(["export", "--help"]).stdout
    assert run_cli(["export", str(out)]).returncode == 0


def test_validate_a_job_file_checks_the_file_then_its_input(tmp_path: Path) -> None:
    rows = [chat_line(i) for i in range(3)] + [{"custom_id": "x"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\nmodel = "tm-small"\nconcurrency = 4\n')
    p = run_cli(["validate", str(job)])
    assert p.returncode == 1, p.stderr  # the input's one bad line, not 29 invalid_json
    assert "job file is valid" in p.stdout and "invalid_json" not in p.stdout
    assert f"{tmp_path / 'in.jsonl'}:4: missing_field" in p.stdout
    summary = orjson.loads(run_cli(["validate", str(job), "--json"]).stdout.splitlines()[-1])
    assert (summary["valid"], summary["invalid"], summary["job"]) == (3, 1, str(job))
    job.write_text('input = "in.jsonl"\nconcurency = 4\n')
    p = run_cli(["validate", str(job)])
    assert p.returncode == 2 and "concurency" in p.stderr


def test_validate_a_labelling_job_checks_its_records(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    p = run_cli(["validate", str(ROOT / "jobs" / "label-sentiment.toml")])
    assert p.returncode == 0, p.stderr + p.stdout
    assert "40 valid" in p.stdout


def test_json_logs_end_with_the_exit_event_even_with_quiet(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "o"), "--sim", "-q",
                 "--log-format", "json"])
    assert p.returncode == 0, p.stderr
    events = [orjson.loads(line) for line in p.stderr.splitlines()]
    assert events and events[-1]["event"] == "exit" and events[-1]["exit_code"] == 0
    assert all(e["level"] != "info" or e["event"] == "exit" for e in events)  # still quiet
