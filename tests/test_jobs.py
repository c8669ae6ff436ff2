"""Declared jobs: TOML files as `run` command lines, with file/key-naming errors and no secrets."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import API_KEY, ROOT, chat_line, clean_env, read_jsonl, run_cli, write_jsonl
from tmbatch.base.config import ConfigError
from tmbatch.cli.jobfile import load_job, shard_from_env, share_limits
from tmbatch.cli.main import build_parser
from tmbatch.cli.resolve import resolve_run
from tmbatch.run.config import RunConfig


def job(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(str(path))
    return str(info.value)


def test_type_errors_name_file_key_and_value(tmp_path: Path) -> None:
    p = job(tmp_path, 'input = "x.jsonl"\nconcurrency = "abc"\n')
    msg = error_of(p)
    assert msg == f'{p}: key `concurrency` must be a positive integer, got "abc"'
    assert "must be a number greater than 0, got -5" in error_of(
        job(tmp_path, 'input = "x.jsonl"\nrpm = -5\n'))
    assert '`fsync` must be one of "always", "interval", "never", got "sometimes"' in error_of(
        job(tmp_path, 'input = "x.jsonl"\nfsync = "sometimes"\n'))
    assert "`stream` must be true or false" in error_of(
        job(tmp_path, 'input = "x.jsonl"\nstream = "yes"\n'))


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    msg = error_of(job(tmp_path, 'input = "x.jsonl"\nconcurency = 4\n'))
    assert "unknown key `concurency`; did you mean `concurrency`?" in msg
    msg = error_of(job(tmp_path, 'input = "x.jsonl"\n[label]\ntemplate = "{text}"\nidfield = 1\n'))
    assert "unknown key `label.idfield`; did you mean `label.id_field`?" in msg


@pytest.mark.parametrize("key", ["api_key", "key", "token", "auth_token", "API-KEY",
                                 "client_secret", "password"])
def test_secret_looking_keys_are_refused_without_echoing_the_value(tmp_path: Path,
                                                                   key: str) -> None:
    value = "sk-live-DO-NOT-PRINT-0123456789"
    msg = error_of(job(tmp_path, f'input = "x.jsonl"\n"{key}" = "{value}"\n'))
    assert f"key `{key}` looks like a credential" in msg
    assert "TENSORMESH_INFERENCE_API_KEY" in msg and "environment" in msg
    assert value not in msg


def test_secrets_are_refused_in_tables_but_schema_property_names_are_data(tmp_path: Path) -> None:
    msg = error_of(job(tmp_path, 'input = "x"\n[label]\ntemplate = "{t}"\ntoken = "abc"\n'))
    assert "key `token` looks like a credential" in msg
    ok = job(tmp_path, 'input = "x"\n[label]\ntemplate = "{t}"\n'
             '[label.schema]\ntype = "object"\n[label.schema.properties.key]\ntype = "string"\n')
    assert load_job(str(ok)).label is not None
    msg = error_of(job(tmp_path, 'input = "x"\nuser_id = "0b5e2b4c-8a3c-4f0e-9d55-3a1e2f6b7c8d"\n'))
    assert "TENSORMESH_ON_DEMAND_USER_ID" in msg


def test_missing_input_bad_toml_and_missing_file(tmp_path: Path) -> None:
    assert "key `input` is missing" in error_of(job(tmp_path, 'model = "m"\n'))
    bad = job(tmp_path, 'input = "x.jsonl\n')
    assert error_of(bad).startswith(f"{bad}: not valid TOML (")
    assert "no such job file" in error_of(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_job_files_directory(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    p = job(tmp_path / "jobs", 'input = "../data/in.jsonl"\noutput = "out"\n'
            'ca_bundle = "/etc/ca.pem"\n')
    loaded = load_job(str(p))
    assert loaded.values["input"] == str(tmp_path / "data" / "in.jsonl")
    assert loaded.values["output"] == str(tmp_path / "jobs" / "out")
    assert loaded.values["ca_bundle"] == "/etc/ca.pem"


def config_for(args: list[str], env: dict[str, str] | None = None) -> RunConfig:
    ns = build_parser().parse_args(["run", *args])
    return resolve_run(vars(ns), env or {}, require_key=False).config


def test_flags_override_the_file_even_when_equal_to_the_default(tmp_path: Path) -> None:
    p = job(tmp_path, 'input = "x.jsonl"\nconcurrency = 2\nfsync = "never"\nrpm = 60\n'
            'timeout = 30\nmodel = "tm-large"\n')
    c = config_for([str(p), "-c", "64", "--fsync", "interval", "--model", "tm-small"])
    assert (c.concurrency, c.fsync, c.model) == (64, "interval", "tm-small")
    assert c.rpm == 60 and c.connection is not None and c.connection.timeout == 30.0
    c = config_for([str(p)])
    assert (c.concurrency, c.fsync, c.drain_timeout) == (2, "never", 25.0)
    assert c.out_dir == Path("job.out")


def test_shard_from_env_needs_the_completion_count() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "4"}) == (2, 4)
    with pytest.raises(ConfigError, match="JOB_COMPLETIONS is not"):
        shard_from_env({"JOB_COMPLETION_INDEX": "2"})
    with pytest.raises(ConfigError, match="must be below"):
        shard_from_env({"JOB_COMPLETION_INDEX": "4", "JOB_COMPLETIONS": "4"})
    assert share_limits(3000.0, None, (1, 4)) == (750.0, None)
    assert share_limits(3000.0, 100.0, None) == (3000.0, 100.0)


def test_sharded_job_gets_its_own_output_and_share_of_limits(tmp_path: Path) -> None:
    p = job(tmp_path, 'input = "x.jsonl"\noutput = "out"\nrpm = 3000\ntpm = 1000\n')
    pod = {"JOB_COMPLETION_INDEX": "1", "JOB_COMPLETIONS": "4"}
    c = config_for([str(p)], pod)
    assert c.shard == (1, 4) and c.out_dir == tmp_path / "out" / "shard-1"
    assert (c.rpm, c.tpm) == (750.0, 250.0)
    c = config_for([str(p), "--shard", "0/2", "-o", "mine"], pod)  # flags win over the env
    assert c.shard == (0, 2) and c.out_dir == Path("mine") and c.rpm == 1500.0


def test_cli_runs_a_job_file_from_another_directory(tmp_path: Path, sim: object) -> None:
    data = tmp_path / "jobs"
    data.mkdir()
    write_jsonl(data / "in.jsonl", [chat_line(i) for i in range(6)])
    p = job(data, 'input = "in.jsonl"\nconcurrency = 3\njob_id = "nightly-7"\n'
            'model = "tm-small"\n', name="nightly.toml")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    r = run_cli(["run", str(p), "--base-url", sim.url], env=env, cwd=elsewhere)  # type: ignore
    assert r.returncode == 0, r.stderr
    out = elsewhere / "nightly.out"
    header = orjson.loads((out / "journal.jsonl").read_bytes().splitlines()[0])
    assert header["job"] == "nightly-7" and header["input"] == str(data / "in.jsonl")
    assert header["options"]["model"] == "tm-small"
    assert len(read_jsonl(out / "results.jsonl")) == 6
    r = run_cli(["run", str(p), "--base-url", sim.url, "-o", str(tmp_path / "o2"),  # type: ignore
                 "--job-id", "override"], env=env, cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert orjson.loads((tmp_path / "o2" / "journal.jsonl").read_bytes().splitlines()[0])[
        "job"] == "override"
    for path in (out, tmp_path / "o2"):
        for f in path.iterdir():
            assert API_KEY.encode() not in f.read_bytes()


def test_cli_bad_job_file_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    p = job(tmp_path, 'input = "in.jsonl"\napi_key = "sk-abcdefabcdefabcdef"\n')
    r = run_cli(["run", str(p), "--sim"])
    assert r.returncode == 2
    assert r.stderr.startswith(f"tmbatch: error: {p}: key `api_key` looks like a credential")
    assert "Traceback" not in r.stderr and "sk-abcdef" not in r.stderr
    p = job(tmp_path, 'input = "in.jsonl"\nconcurrency = 0\n')
    r = run_cli(["run", str(p), "--sim"])
    assert r.returncode == 2 and "key `concurrency` must be a positive integer, got 0" in r.stderr


def test_cli_index_without_completions_is_a_usage_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    r = run_cli(["run", str(tmp_path / "in.jsonl"), "--sim", "-o", str(tmp_path / "o")],
                env=clean_env(JOB_COMPLETION_INDEX="1"))
    assert r.returncode == 2 and "JOB_COMPLETIONS" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_shipped_job_files_load() -> None:
    for p in sorted((ROOT / "jobs").glob("*.toml")):
        loaded = load_job(str(p))
        assert Path(loaded.values["input"]).is_file(), p
