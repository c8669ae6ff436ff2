"""`tmbatch completion bash|zsh`: the shell's completion script, made by shtab from the very
parser `--help` prints, so it cannot drift from the command line. shtab is an extra
(`pip install 'tmbatch[completion]'`): a runner in a container has no shell to complete."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tmbatch.base.config import ConfigError
from tmbatch.base.exitcodes import ExitCode
from tmbatch.cli.common import subcommand

SHELLS = ("bash", "zsh")


def add_completion_parser(sub: Any) -> None:
    comp = subcommand(
        sub, "completion", "print the shell completion script (bash or zsh)",
        "Print a completion script for SHELL on stdout (needs the `completion` extra: pip "
        "install 'tmbatch[completion]'). bash: tmbatch completion bash > "
        "~/.local/share/bash-completion/completions/tmbatch; zsh: tmbatch completion zsh > "
        "\"${fpath[1]}/_tmbatch\"",
    )
    comp.add_argument("shell", choices=SHELLS, help="the shell to complete in")


def cmd_completion(ns: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise ConfigError("shell completion needs shtab, which is not installed: pip install "
                          "'tmbatch[completion]'") from None
    from tmbatch.cli.main import build_parser

    sys.stdout.write(shtab.complete(build_parser(), shell=ns.shell))
    return ExitCode.OK
