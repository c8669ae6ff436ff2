"""The product card's layout: console script, `python -m`, a non-root Docker image, CI
running exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, clean_env


def test_python_dash_m_and_version() -> None:
    p = subprocess.run([sys.executable, "-m", "tmbatch", "--version"], capture_output=True,
                       text=True, env=clean_env(), cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("tmbatch ")


def test_console_script_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'tmbatch = "tmbatch.cli.main:main"' in text


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"^    (python3 -m venv .*pip install -e .*pytest.*)$", readme, re.M)
    assert blocks, "README has no test command"
    assert blocks[0].split("#")[0].strip() in ci


def test_dockerfile_is_non_root_with_tmbatch_entrypoint_under_an_init() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0", "USER 0:0")
    # tini as PID 1 passes SIGTERM on and reaps zombies; tmbatch is what it runs.
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "tmbatch"]' in lines
    # The last stage is the one that runs: USER must come after its FROM.
    last_from = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    assert any(ln.startswith("USER ") for ln in lines[last_from:])


def test_readme_docs_and_help_list_every_exit_code() -> None:
    """Scripts branch on these numbers: the README's table, the docs' exit codes page, --help
    and the code agree."""
    from tmbatch.base.exitcodes import ExitCode

    readme = (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "exit-codes.md").read_text()
    tables = {"README.md": readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0],
              "docs/exit-codes.md": page.split("\n## ", 1)[0]}  # the first table, all codes
    for name, section in tables.items():
        documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
        assert documented == {int(c) for c in ExitCode}, name
    p = subprocess.run([sys.executable, "-m", "tmbatch", "--help"], capture_output=True,
                       text=True, env=clean_env(), cwd=ROOT)
    listed = {int(m) for m in re.findall(r"^  (\d+) ", p.stdout.split("exit codes:")[1], re.M)}
    assert listed == {int(c) for c in ExitCode}


def test_dockerfile_installs_dependencies_before_the_source() -> None:
    """A code change must not reinstall every dependency: they come from pyproject.toml alone,
    in a layer before the one that copies the package."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    deps = next(i for i, ln in enumerate(lines) if "pip install -r" in ln)
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY tmbatch"))
    package = next(i for i, ln in enumerate(lines) if "pip install --no-deps" in ln)
    assert deps < source < package
    copied = [ln for ln in lines[:deps] if ln.startswith("COPY ")]
    assert copied == ["COPY pyproject.toml docker/requirements.py /src/"]


def test_image_dependency_list_is_pyprojects() -> None:
    import tomllib

    p = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"),
                        str(ROOT / "pyproject.toml"), "fast"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    want = (project["build-system"]["requires"] + project["project"]["dependencies"]
            + project["project"]["optional-dependencies"]["fast"])
    assert p.stdout.splitlines() == want
    bad = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"),
                          str(ROOT / "pyproject.toml"), "no-such-extra"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "no-such-extra" in bad.stderr


def test_a_wheel_carries_every_subpackage(tmp_path: Path) -> None:
    """`pip install .` (not -e) must install every package of the tree: an editable install
    and the test suite would never notice a subpackage left out of the wheel."""
    import shutil

    src = tmp_path / "src"  # a copy: an in-tree build/ left from earlier would hide a miss
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "tmbatch", src / "tmbatch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(tmp_path), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    import zipfile

    (wheel,) = tmp_path.glob("tmbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "tmbatch").rglob("__init__.py")}
    assert packages and {f"{pkg}/__init__.py" for pkg in packages} <= names


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """`tmbatch validate big.jsonl | head -1`: the pipe closes early; no traceback, no 70."""
    from tests.conftest import chat_line, write_jsonl

    rows = [{"custom_id": i} for i in range(20000)] + [chat_line(1)]
    inp = write_jsonl(tmp_path / "bad.jsonl", rows)
    done = subprocess.run(f"{sys.executable} -m tmbatch validate {inp} | head -1; "
                          "echo \"status=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=120)
    assert "status=141" in done.stdout, done
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
