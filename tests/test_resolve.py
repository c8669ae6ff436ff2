"""One resolver, one frozen RunConfig: flag > job file > environment > default, each default
written once (`base.defaults`), and `run --print-config` saying where every value came from.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import API_KEY, ROOT, chat_line, clean_env, run_cli, write_jsonl
from tmbatch.base import defaults
from tmbatch.cli.main import build_parser
from tmbatch.cli.resolve import resolve_run

PKG = ROOT / "tmbatch"


def counting_server(serve: Any) -> tuple[str, list[str]]:
    """A server that answers nothing useful and remembers every request it was sent."""
    hits: list[str] = []

    async def any_request(request: web.Request) -> web.Response:
        hits.append(f"{request.method} {request.path}")
        return web.json_response({"error": "this test expects no request"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    return serve(app).url(), hits


def printed(p: Any) -> dict[str, dict[str, Any]]:
    """The JSON object `--print-config --log-format json` writes on stdout."""
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith('{"config"')]
    assert len(lines) == 1, p.stdout
    return orjson.loads(lines[0])["config"]  # type: ignore[no-any-return]


def test_each_setting_comes_from_the_first_source_that_gives_it(tmp_path: Path,
                                                                serve: Any) -> None:
    url, hits = counting_server(serve)
    write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\nconcurrency = 2\nfsync = "never"\ntimeout = 30\n'
                   f'base_url = "{url}"\nrpm = 120\n')
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY, TENSORMESH_TIMEOUT_SECONDS="45",
                    TENSORMESH_MAX_RETRIES="7",
                    TENSORMESH_SERVERLESS_BASE_URL="http://127.0.0.1:9")
    p = run_cli(["run", str(job), "-c", "5", "--print-config", "--log-format", "json"],
                env=env, cwd=tmp_path)
    c = printed(p)
    where = f"at {job}"
    assert c["concurrency"] == {"value": 5, "source": "flag --concurrency"}  # flag > job file
    assert c["fsync"] == {"value": "never", "source": f"job file fsync {where}"}
    assert c["timeout"] == {"value": 30.0, "source": f"job file timeout {where}"}  # > env
    assert c["base_url"] == {"value": url, "source": f"job file base_url {where}"}  # > env
    assert c["max_retries"] == {"value": 7, "source": "env TENSORMESH_MAX_RETRIES"}  # env
    assert c["patience"] == {"value": defaults.PATIENCE.value, "source": "default"}
    assert c["drain_timeout"] == {"value": defaults.DRAIN_TIMEOUT.value, "source": "default"}
    assert c["adaptive"] == {"value": False, "source": "default (off: --rpm given)"}
    assert c["input"] == {"value": str(tmp_path / "in.jsonl"),
                          "source": f"job file input {where}"}
    assert c["output"] == {"value": "job.out", "source": "default (the job file's name + .out)"}
    assert c["api_key"] == {"value": "set", "source": "env TENSORMESH_INFERENCE_API_KEY"}
    assert API_KEY not in p.stdout + p.stderr
    # exits before the output directory or the network: nothing made, nothing sent
    assert not (tmp_path / "job.out").exists() and hits == []


def test_the_flag_beats_the_environment_and_an_indexed_jobs_shard_shares_the_limits(
        tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out"\nrpm = 3000\nbudget_tokens = 1000\n')
    env = clean_env(TENSORMESH_TIMEOUT_SECONDS="45", JOB_COMPLETION_INDEX="1",
                    JOB_COMPLETIONS="4")
    c = printed(run_cli(["run", str(job), "--timeout", "12", "--print-config",
                         "--log-format", "json"], env=env))
    assert c["timeout"] == {"value": 12.0, "source": "flag --timeout"}
    assert c["shard"] == {"value": "1/4", "source": "env JOB_COMPLETION_INDEX/JOB_COMPLETIONS"}
    assert c["rpm"] == {"value": 750.0,
                        "source": f"job file rpm at {job}, 1/4 for shard 1/4"}
    assert c["budget_tokens"]["value"] == 250
    assert c["output"] == {"value": str(tmp_path / "out" / "shard-1"),
                           "source": f"job file output at {job}, /shard-1 for shard 1/4"}
    assert c["api_key"]["value"] == "unset" and "a run needs one" in c["api_key"]["source"]


def test_print_config_as_text_names_every_source_and_never_the_key(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY, TENSORMESH_MAX_RETRIES="2")
    p = run_cli(["run", str(inp), "--rpm", "60", "--print-config"], env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:]}
    assert p.stdout.startswith("resolved configuration (flag > job file > environment > "
                               "default):")
    assert rows["rpm"].split()[1:] == ["60", "flag", "--rpm"]
    assert rows["max_retries"].split()[1:] == ["2", "env", "TENSORMESH_MAX_RETRIES"]
    assert rows["concurrency"].split()[1:] == [str(defaults.CONCURRENCY.value), "default"]
    assert rows["api_key"].split()[1:3] == ["set", "env"]
    assert API_KEY not in p.stdout + p.stderr and API_KEY[-4:] not in p.stdout
    assert not (tmp_path / "in.out").exists()


def test_print_config_of_a_labelling_job_writes_no_requests(tmp_path: Path) -> None:
    out = tmp_path / "lab"
    p = run_cli(["run", str(ROOT / "jobs" / "label-sentiment.toml"), "-o", str(out), "--sim",
                 "--print-config", "--log-format", "json"])
    c = printed(p)
    assert c["requests"]["value"] == str(out / "requests.jsonl")
    assert c["input"]["value"].endswith("reviews.jsonl")
    assert c["base_url"]["source"] == "flag --sim"
    assert not out.exists()


def test_validate_shows_what_run_print_config_shows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(2)])
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\nmodel = "tm-small"\nconcurrency = 4\npatience = 30\n')
    env = clean_env(TENSORMESH_TIMEOUT_SECONDS="45")
    run = run_cli(["run", str(job), "--print-config"], env=env, cwd=tmp_path)
    val = run_cli(["validate", str(job)], env=env, cwd=tmp_path)
    assert run.returncode == 0 and val.returncode == 0, run.stderr + val.stderr
    assert val.stdout.startswith(run.stdout)
    rows = [line.split() for line in run.stdout.splitlines()]
    assert ["patience", "30", "job", "file", "patience", "at", str(job)] in rows
    summary = orjson.loads(run_cli(["validate", str(job), "--json"], env=env,
                                   cwd=tmp_path).stdout.splitlines()[-1])
    assert summary["config"]["patience"] == {"value": 30.0,
                                             "source": f"job file patience at {job}"}
    assert summary["config"]["timeout"]["source"] == "env TENSORMESH_TIMEOUT_SECONDS"


def test_a_bad_job_file_value_is_the_same_clear_error_and_nothing_is_sent(
        tmp_path: Path, serve: Any) -> None:
    url, hits = counting_server(serve)
    write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\nbase_url = "{url}"\nconcurrency = "abc"\n')
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    for extra in ([], ["--print-config"]):
        p = run_cli(["run", str(job), *extra], env=env, cwd=tmp_path)
        assert p.returncode == 2
        assert f'{job}: key `concurrency` must be a positive integer, got "abc"' in p.stderr
    assert hits == [] and not (tmp_path / "job.out").exists()


def test_help_tells_of_print_config_with_an_example() -> None:
    p = run_cli(["run", "--help"])
    assert p.returncode == 0
    assert "--print-config" in p.stdout
    assert "tmbatch run jobs/nightly.toml -c 8 --print-config" in p.stdout


# -- the config is frozen, and resolving changes nothing it was given --------------------

def test_the_resolved_config_is_frozen_and_the_namespace_untouched(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\nconcurrency = 3\nrpm = 100\n')
    ns = build_parser().parse_args(["run", str(job), "--shard", "0/2"])
    before = copy.deepcopy(vars(ns))
    config = resolve_run(vars(ns), {}, require_key=False).config
    assert vars(ns) == before  # no flag filled in, no input or output rewritten
    assert (config.concurrency, config.rpm, config.shard) == (3, 50.0, (0, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.concurrency = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.sources["concurrency"] = "me"  # type: ignore[index]
    assert isinstance(config.only_lines, frozenset | type(None))


# -- every default once ------------------------------------------------------------------

def run_flags() -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["run"]._actions}


def test_the_parsers_leave_every_setting_with_a_default_unset() -> None:
    """A flag's own default would hide the job file and the environment behind it."""
    actions = run_flags()
    with_defaults = [k for k in defaults.DEFAULTS if k in actions]
    assert len(with_defaults) >= 10, with_defaults
    for key in with_defaults:
        assert actions[key].default is None, key
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    resend = {a.dest: a for a in sub.choices["resend"]._actions}
    assert resend["concurrency"].default is None  # RESEND_CONCURRENCY fills it in


def test_every_default_is_in_the_table_with_its_reason() -> None:
    for name, default in defaults.DEFAULTS.items():
        assert default.value is not None and len(default.why) > 20, name
    ns = build_parser().parse_args(["run", "in.jsonl"])
    config = resolve_run(vars(ns), {}, require_key=False).config
    for key in ("concurrency", "limit_scope", "patience", "fsync", "drain_timeout",
                "max_line_bytes", "progress_interval"):
        assert getattr(config, key) == defaults.DEFAULTS[key].value, key
        assert config.sources[key] == "default", key
    assert config.connection is not None
    assert config.connection.timeout == defaults.TIMEOUT.value
    assert config.connection.max_retries == defaults.MAX_RETRIES.value
    assert config.connection.base_url == defaults.BASE_URL.value
    # The reader's own constant (its read_requests' default) is the one number still written
    # twice: it moves to base.defaults once the reader's module split has landed.
    from tmbatch.inputs.reader import MAX_LINE_BYTES

    assert defaults.MAX_LINE_BYTES.value == MAX_LINE_BYTES


# The settings whose default the table holds, by the names code gives them.
SETTING_NAMES = {"concurrency", "patience", "fsync", "drain_timeout", "limit_scope", "scope",
                 "max_line_bytes", "progress_interval", "max_retries", "surface"}
FLAGS = {"--" + n.replace("_", "-") for n in SETTING_NAMES} | {"-c", "--timeout"}
# Known and left: the simulator's own knobs, not a run's defaults. sim/config's limit_scope is
# the simulated server's; sim/scenarios' rows mirror a run's defaults (to take them from
# base.defaults once the sim's module split has landed).
LEFT = {("sim/config.py", "limit_scope"), ("sim/scenarios.py", "concurrency"),
        ("sim/scenarios.py", "patience"), ("sim/scenarios.py", "limit_scope")}


def written_defaults(path: Path) -> list[tuple[int, str, str]]:
    """(line, name, value) of every literal default given to a setting's name in `path`: a
    parameter's, a (dataclass) field's, an add_argument's."""
    found: list[tuple[int, str, ast.expr]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            pos = a.posonlyargs + a.args
            found += [(node.lineno, arg.arg, d)
                      for arg, d in zip(pos[len(pos) - len(a.defaults):], a.defaults,
                                        strict=True)]
            found += [(node.lineno, arg.arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults,
                                                                   strict=True) if d is not None]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.value is not None:
            found.append((node.lineno, node.target.id, node.value))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = {a.value for a in node.args if isinstance(a, ast.Constant)}
            found += [(node.lineno, min(flags & FLAGS), kw.value) for kw in node.keywords
                      if kw.arg == "default" and flags & FLAGS]
    return [(line, name, ast.unparse(value)) for line, name, value in found
            if (name in SETTING_NAMES or name in FLAGS)
            and ((isinstance(value, ast.Constant) and value.value is not None)
                 or isinstance(value, ast.BinOp))]


def test_no_default_is_written_outside_the_table() -> None:
    """`patience = 600.0` in a second place is how four of them came to be (issue 23)."""
    table = PKG / "base" / "defaults.py"
    found = [f"{path.relative_to(PKG)}:{line}: {name} = {value}"
             for path in sorted(PKG.rglob("*.py")) if path != table
             for line, name, value in written_defaults(path)
             if (str(path.relative_to(PKG)), name.lstrip("-").replace("-", "_")) not in LEFT]
    assert found == [], "give these defaults from tmbatch.base.defaults: " + "; ".join(found)


def test_the_scan_sees_a_default_written_again(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f(patience: float = 600.0): ...\n"
                   "class C:\n    concurrency: int = 64\n"
                   "p.add_argument('--fsync', default='interval')\n"
                   "def g(concurrency: int = CONCURRENCY.value): ...\n")
    assert [name for _, name, _ in written_defaults(bad)] == ["patience", "concurrency",
                                                              "--fsync"]
