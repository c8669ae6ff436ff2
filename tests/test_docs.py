"""The documentation: the MkDocs site builds with --strict (a broken link or anchor fails it),
docs/cli.md is what the argparse parsers generate now, and the README's relative links point
at files that exist."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_what_the_parsers_generate() -> None:
    gen = generator()
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), (
        f"docs/cli.md differs from the argparse parsers: run `{gen.REGENERATE}` and commit it")


def test_the_docs_site_builds_strict(tmp_path: Path) -> None:
    if not os.environ.get("CI"):  # CI installs the test extra: a missing mkdocs must fail there
        pytest.importorskip("mkdocs", reason="pip install -e '.[test]'")
        pytest.importorskip("material", reason="pip install -e '.[test]'")
    site = tmp_path / "site"
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(site)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner
    )
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}\n{p.stderr}"
    pages = sorted(str(f.relative_to(ROOT / "docs")) for f in (ROOT / "docs").glob("*.md"))
    built = [page for page in pages
             if (site / page.removesuffix(".md") / "index.html").exists()
             or (page == "index.md" and (site / "index.html").exists())]
    assert built == pages


def test_readme_relative_links_point_at_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [t for t in targets
                if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "the README links to no docs page"
    missing = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
