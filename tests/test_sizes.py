"""Sizes that keep tmbatch readable: a module read whole, a function held in the head at once.

Every module under tmbatch/ has at most MAX_MODULE_LINES lines; every function (a method, a
nested function) at most MAX_FUNCTION_LINES, from its `def` to its last line, and a cyclomatic
complexity of at most MAX_COMPLEXITY, counted as ruff's C901 (McCabe) counts it. A module or
function that grows past them is split along what each part is for (the input file got a
module of its own; the stream's aggregation a state per route), not by moving lines around.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tmbatch

ROOT = Path(tmbatch.__file__).parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_COMPLEXITY = 15

MODULES = sorted(ROOT.rglob("*.py"))
HOW = "split it by responsibility (a part for each thing it does), not by moving lines around"

Function = ast.FunctionDef | ast.AsyncFunctionDef


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """(qualified name, node) of every function in `tree`, methods and nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + node.name
            yield name, node
            yield from functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, prefix + node.name + ".")
        else:
            yield from functions(node, prefix)


def complexity(fn: Function) -> int:
    """McCabe's number as ruff's C901 counts it: 1, plus one for each if and elif, for, while,
    except clause, a try's else, match case (not an irrefutable last one) and nested def, with
    the branches inside each. Boolean operators and comprehensions do not count."""
    return 1 + _branches(fn.body)


def _branches(body: list[ast.stmt]) -> int:
    n = 0
    for s in body:
        if isinstance(s, ast.If | ast.For | ast.AsyncFor | ast.While):
            n += 1 + _branches(s.body) + _branches(s.orelse)  # an elif is an If in orelse
        elif isinstance(s, ast.With | ast.AsyncWith | ast.ClassDef):
            n += _branches(s.body)
        elif isinstance(s, ast.Try | ast.TryStar):
            n += _branches(s.body) + bool(s.orelse) + _branches(s.orelse)
            n += _branches(s.finalbody) + sum(1 + _branches(h.body) for h in s.handlers)
        elif isinstance(s, ast.Match):
            n += sum(1 + _branches(case.body) for case in s.cases)
            last = s.cases[-1] if s.cases else None
            if last is not None and last.guard is None and _irrefutable(last.pattern):
                n -= 1  # like an if's else
        elif isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef):
            n += 1 + _branches(s.body)
    return n


def _irrefutable(p: ast.pattern) -> bool:
    if isinstance(p, ast.MatchAs):
        return p.pattern is None or _irrefutable(p.pattern)
    return isinstance(p, ast.MatchOr) and any(_irrefutable(q) for q in p.patterns)


def oversize(path: Path) -> list[str]:
    """What in the file is past the bounds, one sentence each."""
    text = path.read_text()
    rel = path.relative_to(ROOT.parent) if path.is_relative_to(ROOT.parent) else path
    found = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{rel} has {lines} lines (at most {MAX_MODULE_LINES}): {HOW}")
    for name, fn in functions(ast.parse(text, str(path))):
        length = fn.end_lineno - fn.lineno + 1  # type: ignore[operator]
        if length > MAX_FUNCTION_LINES:
            found.append(f"{rel}:{fn.lineno}: {name} has {length} lines "
                         f"(at most {MAX_FUNCTION_LINES}): {HOW}")
        branches = complexity(fn)
        if branches > MAX_COMPLEXITY:
            found.append(f"{rel}:{fn.lineno}: {name} has cyclomatic complexity {branches} "
                         f"(at most {MAX_COMPLEXITY}): {HOW}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_and_its_functions_are_within_bounds(path: Path) -> None:
    found = oversize(path)
    assert not found, "\n".join(found)


def test_the_checker_names_the_file_the_function_and_the_figure(tmp_path: Path) -> None:
    src = tmp_path / "big.py"
    src.write_text("class C:\n    def long(self):\n" + "        x = 1\n" * 60
                   + "def branchy(x):\n" + "    if x:\n        pass\n" * 15
                   + "\n" * (MAX_MODULE_LINES - 92))
    found = oversize(src)
    assert found == [
        f"{src} has 451 lines (at most 450): {HOW}",
        f"{src}:2: C.long has 61 lines (at most 60): {HOW}",
        f"{src}:63: branchy has cyclomatic complexity 16 (at most 15): {HOW}",
    ], found


def test_the_checker_counts_as_ruff_counts(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text(
        "def f(a, b):\n"  # 1
        "    if a and b:\n"  # +1 (and: nothing)
        "        pass\n"
        "    elif b:\n"  # +1
        "        pass\n"
        "    else:\n"
        "        pass\n"
        "    for x in a:\n"  # +1
        "        while x:\n"  # +1
        "            x = [y for y in x if y]\n"  # (a comprehension: nothing)
        "    try:\n"
        "        pass\n"
        "    except ValueError:\n"  # +1
        "        pass\n"
        "    except KeyError:\n"  # +1
        "        pass\n"
        "    else:\n"  # +1
        "        pass\n"
        "    with a:\n"
        "        if b:\n"  # +1
        "            pass\n"
        "    def g():\n"  # +1, and its own branches
        "        if a:\n"  # +1
        "            pass\n"
        "    match a:\n"
        "        case 1:\n"  # +1
        "            pass\n"
        "        case _:\n"  # (irrefutable and last: nothing)
        "            pass\n"
        "    return b\n"
    )
    found = dict(functions(ast.parse(src.read_text())))
    assert set(found) == {"f", "f.g"}
    assert complexity(found["f"]) == 12 and complexity(found["f.g"]) == 2
    assert found["f"].end_lineno - found["f"].lineno + 1 == 30  # type: ignore[operator]
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (the test extra installs it)")
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "C901", "--config",
         "lint.mccabe.max-complexity=1", "--output-format", "concise", str(src)],
        capture_output=True, text=True, timeout=60).stdout
    ruff = {m[0]: int(m[1]) for m in re.findall(r"`(\w+)` is too complex \((\d+) > 1\)", out)}
    assert ruff == {"f": 12, "g": 2}, out


def test_the_checker_agrees_with_ruff_on_tmbatch() -> None:
    """Every function's figure, as ruff's C901 gives it for the whole package."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (the test extra installs it)")
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "C901", "--config",
         "lint.mccabe.max-complexity=1", "--output-format", "concise", str(ROOT)],
        capture_output=True, text=True, timeout=120).stdout
    ruff = {(Path(path).resolve(), int(line)): int(n) for path, line, n in re.findall(
        r"^(.+?):(\d+):\d+: C901 `\w+` is too complex \((\d+) > 1\)", out, re.M)}
    ours = {(path.resolve(), fn.lineno): complexity(fn) for path in MODULES
            for _, fn in functions(ast.parse(path.read_text()))}
    assert ruff, out
    assert {k: v for k, v in ours.items() if v > 1} == ruff
