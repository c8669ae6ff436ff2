"""The layout tells the architecture: each part of tmbatch imports only the parts below it.

The order is the Layout table of docs/development.md read upwards (the last test holds the
table to it). A module-level import and a lazy one inside a function count alike: a lazy
import up the table is the same tangle, deferred."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import tmbatch

ROOT = Path(tmbatch.__file__).parent
# low to high; a part may import its own modules and any part before it
ORDER = ["base", "policy", "journal", "inputs", "client", "spend", "limits", "run",
         "tools", "sim", "cli", "__main__"]
RANK = {part: i for i, part in enumerate(ORDER)}


def part_of(module: str) -> str:
    """`tmbatch.run.attempts` -> `run`; `tmbatch.policy` -> `policy`."""
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every tmbatch module the file imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tmbatch":
                found += [(node.lineno, f"tmbatch.{a.name}") for a in node.names
                          if a.name != "__version__"]
            elif node.module.startswith("tmbatch."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tmbatch.")]
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_parts_below_its_own(path: Path) -> None:
    rel = path.relative_to(ROOT)
    part = rel.parts[0].removesuffix(".py")
    assert part in RANK, (f"{rel}: a part the layout does not know; add it to ORDER and to "
                          "docs/development.md's Layout table")
    up = [(line, mod) for line, mod in imports(path) if RANK[part_of(mod)] > RANK[part]]
    assert not up, f"{rel} imports up the layout: " + ", ".join(f"{m} (line {n})" for n, m in up)


def test_every_part_says_what_it_is_and_what_it_may_import() -> None:
    for part in ORDER:
        init = ROOT / part / "__init__.py"
        if not init.exists():
            assert (ROOT / f"{part}.py").exists(), part
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{part}/__init__.py: say what the part may import"


def test_the_checker_sees_an_import_up_the_layout(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from tmbatch.run.runner import Runner\n"
                   "def f():\n    from tmbatch import cli\n")
    assert [part_of(m) for _, m in imports(bad)] == ["run", "cli"]


def test_the_development_page_lists_the_parts_in_import_order() -> None:
    """The Layout table of docs/development.md, read upwards, is ORDER."""
    page = (ROOT.parent / "docs" / "development.md").read_text()
    section = page.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = [m.rstrip("/") for m in re.findall(r"^\| `([a-z_]+/?)` \|", section, re.M)]
    assert listed[::-1] == [part for part in ORDER if part != "__main__"], (
        "docs/development.md's Layout table must list the parts top to bottom in the reverse "
        f"of ORDER: {listed}")
