"""The documentation: docs/cli.md is what the argparse parsers generate now."""

from __future__ import annotations

import importlib.util
from types import ModuleType

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

