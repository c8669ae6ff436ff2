"""`--help` and shell completion (issue 24, item 8): the simulator's --sim-* knobs are listed
only under `tmbatch sim` (run/doctor/models still take them with --sim), and `tmbatch
completion bash` is a script that real bash completes with."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, chat_line, clean_env, run_cli, write_jsonl


@pytest.mark.parametrize("command", ["run", "doctor", "models"])
def test_sim_knobs_are_listed_only_under_sim(command: str) -> None:
    p = run_cli([command, "--help"])
    assert p.returncode == 0, p.stderr
    assert "--sim " in p.stdout and "tmbatch sim --help" in p.stdout
    assert "--sim-latency SECONDS" not in p.stdout and "--sim-rate-limit RPS" not in p.stdout
    sim = run_cli(["sim", "--help"])
    assert "--sim-latency SECONDS" in sim.stdout and "--sim-rate-limit RPS" in sim.stdout


def test_run_sim_still_takes_the_knobs(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(1, model="alpha")])
    p = run_cli(["run", str(inp), "-o", str(tmp_path / "out"), "--sim", "--sim-models",
                 "alpha,beta", "--sim-latency", "0.01"], env=clean_env())
    assert p.returncode == 0, p.stderr  # alpha is served only because --sim-models applied
    bad = run_cli(["run", str(inp), "-o", str(tmp_path / "o2"), "--sim", "--sim-latency", "-1"])
    assert bad.returncode == 2 and "--sim-latency: must be >= 0" in bad.stderr


def _complete(script: Path, words: list[str]) -> list[str]:
    """What bash offers for the last word of `words`, through the script's own function."""
    line = " ".join(words)
    prog = (f'source {script}; f=$(complete -p tmbatch | sed "s/.*-F \\([^ ]*\\).*/\\1/"); '
            f'COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE="{line}"; '
            f'COMP_POINT=${{#COMP_LINE}}; $f tmbatch {words[-1]} {words[-2]}; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_completes_commands_and_flags(tmp_path: Path) -> None:
    p = run_cli(["completion", "bash"])
    assert p.returncode == 0, p.stderr
    script = tmp_path / "tmbatch.bash"
    script.write_text(p.stdout)
    assert _complete(script, ["tmbatch", "ru"]) == ["run"]
    assert _complete(script, ["tmbatch", "run", "--conc"]) == ["--concurrency"]
    assert _complete(script, ["tmbatch", "sim", "--sim-lat"]) == ["--sim-latency"]
    assert _complete(script, ["tmbatch", "run", "--sim-lat"]) == []  # listed under sim only
    zsh = run_cli(["completion", "zsh"])
    assert zsh.returncode == 0 and "#compdef tmbatch" in zsh.stdout


def test_completion_without_shtab_names_the_extra() -> None:
    code = ("import sys; sys.modules['shtab'] = None; from tmbatch.cli.main import main; "
            "sys.exit(main(['completion', 'bash']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean_env(), cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("tmbatch: error: shell completion needs shtab, which is not "
                                "installed: pip install 'tmbatch[completion]'")
    assert p.stdout == ""
