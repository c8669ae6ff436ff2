"""Configuration: flag > environment > default, blank env = unset, and one clear error per
common mistake of reference/sdk-configuration.txt, before anything is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, chat_line, clean_env, run_cli, write_jsonl
from tmbatch.base.config import SERVERLESS_DEFAULT, ConfigError, Settings, resolve

USER = "0b7e4c1e-2f6d-4a8e-9a1c-3d5b6e7f8a90"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl"


def flags(**kw: Any) -> dict[str, Any]:
    base = dict.fromkeys(("surface", "base_url", "api_key_file", "user_id", "timeout",
                          "max_retries", "ca_bundle", "tm_config", "allow_insecure_http"))
    base.update(kw)
    return base


def test_defaults_serverless() -> None:
    s = resolve(flags(), {"TENSORMESH_INFERENCE_API_KEY": API_KEY})
    assert s.surface == "serverless" and s.base_url == SERVERLESS_DEFAULT
    assert s.api_key == API_KEY and s.sources["api_key"] == "env TENSORMESH_INFERENCE_API_KEY"
    assert s.sources["base_url"] == "default"
    assert s.timeout == 600.0 and s.max_retries == 5
    assert "X-User-Id" not in s.headers()
    assert API_KEY not in repr(s)


def test_flag_beats_env_beats_default(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("tm-from-file-key-000000000000000\n")
    env = {"TENSORMESH_INFERENCE_API_KEY": API_KEY, "TENSORMESH_TIMEOUT_SECONDS": "30",
           "TENSORMESH_MAX_RETRIES": "2", "TENSORMESH_SERVERLESS_BASE_URL": "https://env.example"}
    s = resolve(flags(timeout="7", api_key_file=str(keyfile)), env)
    assert s.timeout == 7.0 and s.sources["timeout"] == "flag --timeout"
    assert s.api_key == "tm-from-file-key-000000000000000"
    assert s.max_retries == 2 and s.sources["max_retries"] == "env TENSORMESH_MAX_RETRIES"
    assert s.base_url == "https://env.example"


def test_blank_env_counts_as_unset() -> None:
    env = {"TENSORMESH_INFERENCE_API_KEY": API_KEY, "TENSORMESH_SERVERLESS_BASE_URL": "  ",
           "TENSORMESH_TIMEOUT_SECONDS": ""}
    s = resolve(flags(), env)
    assert s.base_url == SERVERLESS_DEFAULT and s.timeout == 600.0


def test_explicit_empty_flag_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--base-url was given an empty value"):
        resolve(flags(base_url=""), {"TENSORMESH_INFERENCE_API_KEY": API_KEY})


def test_on_demand_needs_base_url_and_user_id() -> None:
    env = {"TENSORMESH_INFERENCE_API_KEY": API_KEY}
    with pytest.raises(ConfigError, match="on-demand needs a base URL"):
        resolve(flags(surface="on-demand"), env)
    with pytest.raises(ConfigError, match="needs both a base URL and a user id"):
        resolve(flags(surface="on-demand", base_url="https://gw.example"), env)
    with pytest.raises(ConfigError, match="is not a UUID"):
        resolve(flags(surface="on-demand", base_url="https://gw.example", user_id="bob"), env)
    s = resolve(flags(surface="on-demand"), {**env, "TENSORMESH_ON_DEMAND_BASE_URL":
                                             "https://gw.example",
                                             "TENSORMESH_ON_DEMAND_USER_ID": USER})
    assert s.headers()["X-User-Id"] == USER and s.base_url == "https://gw.example"


def test_serverless_host_as_on_demand_base_is_mixed_up() -> None:
    env = {"TENSORMESH_INFERENCE_API_KEY": API_KEY, "TENSORMESH_ON_DEMAND_USER_ID": USER}
    with pytest.raises(ConfigError, match="mixed up"):
        resolve(flags(surface="on-demand", base_url="https://serverless.tensormesh.ai"), env)


def test_on_demand_url_as_serverless_base_is_mixed_up() -> None:
    env = {"TENSORMESH_INFERENCE_API_KEY": API_KEY,
           "TENSORMESH_ON_DEMAND_BASE_URL": "https://gw.example"}
    with pytest.raises(ConfigError, match="mixed up"):
        resolve(flags(base_url="https://gw.example"), env)


def test_control_plane_token_is_not_an_inference_key() -> None:
    with pytest.raises(ConfigError, match="Control Plane bearer token"):
        resolve(flags(), {"TENSORMESH_INFERENCE_API_KEY": JWT})
    with pytest.raises(ConfigError, match="TENSORMESH_CONTROL_PLANE_TOKEN is set"):
        resolve(flags(), {"TENSORMESH_CONTROL_PLANE_TOKEN": JWT})


def test_no_key_error_names_env_and_sim() -> None:
    with pytest.raises(ConfigError, match=r"TENSORMESH_INFERENCE_API_KEY.*--sim"):
        resolve(flags(), {})


def test_bad_numbers_and_urls() -> None:
    env = {"TENSORMESH_INFERENCE_API_KEY": API_KEY}
    with pytest.raises(ConfigError, match="expected seconds"):
        resolve(flags(timeout="-3"), env)
    with pytest.raises(ConfigError, match="TENSORMESH_MAX_RETRIES"):
        resolve(flags(), {**env, "TENSORMESH_MAX_RETRIES": "many"})
    with pytest.raises(ConfigError, match="ends in /v1"):
        resolve(flags(base_url="https://x.example/v1"), env)
    with pytest.raises(ConfigError, match="not an http"):
        resolve(flags(base_url="ftp://x.example"), env)
    with pytest.raises(ConfigError, match="plain http"):
        resolve(flags(base_url="http://x.example"), env)
    assert resolve(flags(base_url="http://x.example", allow_insecure_http="1"), env)
    assert resolve(flags(base_url="http://127.0.0.1:9"), env)  # loopback is fine


def test_tm_config_read_only_when_asked(tmp_path: Path) -> None:
    home = tmp_path / "tmhome"
    home.mkdir()
    (home / "config.toml").write_text(
        '[managed]\ngateway_api_key = "tm-from-cli-config-000000000000"\n'
        f'gateway_user_id = "{USER}"\ngateway_model_id = "served-model"\n'
    )
    env = {"TM_CONFIG_HOME": str(home)}
    with pytest.raises(ConfigError, match="no inference API key"):
        resolve(flags(), env)  # not read unless asked
    s: Settings = resolve(flags(tm_config=""), env)
    assert s.api_key == "tm-from-cli-config-000000000000"
    assert s.sources["api_key"].startswith("tm config")


def test_uuid_as_model_is_refused_before_sending(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "o"), "--sim", "--model",
                 "123e4567-e89b-12d3-a456-426614174000"])
    assert p.returncode == 2
    assert "served model name" in p.stderr
    assert not (tmp_path / "o").exists()


def test_cli_config_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1)])
    env = clean_env(TENSORMESH_INFERENCE_API_KEY=API_KEY)
    p = run_cli(["run", str(inp), "--surface", "on-demand"], env=env)
    assert p.returncode == 2 and "on-demand needs a base URL" in p.stderr
    assert "Traceback" not in p.stderr and API_KEY not in p.stderr
    p = run_cli(["run", str(inp), "--api-key", API_KEY], env=env)
    assert p.returncode == 2  # there is deliberately no --api-key flag
    assert "no --api-key flag" in p.stderr and API_KEY not in p.stderr
