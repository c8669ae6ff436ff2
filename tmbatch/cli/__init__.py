"""The command line: the parser, one module per group of subcommands, job files.

The top: may import every part.
"""

from tmbatch.cli.main import main

__all__ = ["main"]
