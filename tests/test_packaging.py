"""The product card's layout: console script, `python -m`, a non-root Docker image, CI
running exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT, clean_env


def test_python_dash_m_and_version() -> None:
    p = subprocess.run([sys.executable, "-m", "tmbatch", "--version"], capture_output=True,
                       text=True, env=clean_env(), cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("tmbatch ")


def test_console_script_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'tmbatch = "tmbatch.cli:main"' in text


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"^    (python3 -m pip install -e .*pytest.*)$", readme, re.M)
    assert blocks, "README has no test command"
    assert blocks[0].split("#")[0].strip() in ci


def test_dockerfile_is_non_root_with_tmbatch_entrypoint() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0", "USER 0:0")
    assert 'ENTRYPOINT ["tmbatch"]' in lines
    # The last stage is the one that runs: USER must come after its FROM.
    last_from = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    assert any(ln.startswith("USER ") for ln in lines[last_from:])


def test_readme_and_help_list_every_exit_code() -> None:
    """Scripts branch on these numbers: the README table, --help and the code agree."""
    from tmbatch.exitcodes import ExitCode

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert documented == {int(c) for c in ExitCode}
    p = subprocess.run([sys.executable, "-m", "tmbatch", "--help"], capture_output=True,
                       text=True, env=clean_env(), cwd=ROOT)
    listed = {int(m) for m in re.findall(r"^  (\d+) ", p.stdout.split("exit codes:")[1], re.M)}
    assert listed == {int(c) for c in ExitCode}
