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
    command = blocks[0].split("#")[0].strip()
    assert command in ci
    # CI runs the heavy opt-in tests too (the LiteLLM conformance tests, the container
    # image), opted in before the same command, and the README says how (next to it).
    exports = re.search(r"^export (.*)$", ci, re.M)
    assert exports and exports.start() < ci.index(command)
    for opt_in in ("TMBATCH_LITELLM=1", "TMBATCH_IMAGE=1"):
        assert opt_in in exports.group(1).split()
        assert opt_in in readme.split(command, 1)[1].split("\n## ", 1)[0]


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


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, one a line (continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [re.sub(r"\s+", " ", ln.strip()) for ln in text.splitlines()]


def test_dockerfile_installs_locked_dependencies_before_the_source() -> None:
    """A code change must not reinstall every dependency: they come from the lock files
    alone, with their hashes, in a layer before the one that copies the package."""
    lines = _dockerfile()
    deps = next(i for i, ln in enumerate(lines) if "-r /src/docker/requirements.lock" in ln)
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY tmbatch"))
    package = next(i for i, ln in enumerate(lines) if "install --no-deps" in ln)
    assert deps < source < package
    copied = [ln for ln in lines[:deps] if ln.startswith("COPY ")]
    assert copied == ["COPY docker/build-requirements.lock docker/requirements.lock /src/docker/"]
    installs = [ln for ln in lines if re.search(r"pip .*install", ln)]
    locked = [ln for ln in installs if " -r " in ln]
    assert len(locked) == 2 and all("--require-hashes" in ln for ln in locked), installs


def test_the_runtime_stage_has_no_pip() -> None:
    """pip and setuptools stay in the build stage: the last stage copies the virtualenv and
    runs docker/no-pip.sh, and never calls pip itself."""
    lines = _dockerfile()
    last_from = max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    runtime = lines[last_from:]
    assert not [ln for ln in runtime if re.search(r"\bpip\b", ln)
                and "no-pip" not in ln and not ln.startswith("#")]
    assert "COPY --from=build /opt/tmbatch/venv /opt/tmbatch/venv" in runtime
    assert any("sh /tmp/no-pip.sh" in ln for ln in runtime)


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `--generate-hashes` lock file."""
    from packaging.utils import canonicalize_name

    out: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert m, f"{path.name}: not a pinned, hashed requirement: {line!r}"
        hashes = re.findall(r"sha256:([0-9a-f]{64})", m.group(3))
        assert hashes, f"{path.name}: {m.group(1)} has no --hash (regenerate: docker/lock.sh)"
        out[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return out


def test_the_lock_files_pin_every_dependency_of_pyproject_with_hashes() -> None:
    """Every runtime dependency (and the `fast` extra) is in docker/requirements.lock at a
    version its specifier allows, with hashes; setuptools for the build in its own lock; and
    every package's own dependencies are in the lock too (as this venv's metadata says)."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "platform_machine": "x86_64",
           "extra": ""}
    for lock_name, wanted in (
            ("requirements.lock", project["project"]["dependencies"]
             + project["project"]["optional-dependencies"]["fast"]),
            ("build-requirements.lock", project["build-system"]["requires"])):
        lock = _lock(ROOT / "docker" / lock_name)
        for text in wanted:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            assert name in lock, f"{lock_name} lacks {text!r}: run docker/lock.sh"
            assert req.specifier.contains(lock[name][0], prereleases=True), (
                f"{lock_name}: {name}=={lock[name][0]} does not satisfy {text!r}")
        for name in lock:  # closed: each locked package's requirements are locked too
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            for text in requires:
                req = Requirement(text)
                if req.marker is None or req.marker.evaluate(env):
                    assert canonicalize_name(req.name) in lock, (
                        f"{lock_name}: {name} needs {req.name}, which is not locked")


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
