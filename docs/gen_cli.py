"""Write docs/cli.md, the CLI reference, from tmbatch's own argparse parsers.

    .venv/bin/python docs/gen_cli.py            # rewrite docs/cli.md
    .venv/bin/python docs/gen_cli.py --check    # exit 1 when docs/cli.md is out of date

The page is built from `tmbatch.cli.main.build_parser()`, the parser `--help` prints, so it
cannot drift from the command line: tests/test_docs.py fails when the committed page differs
from what this script writes. The formatting is done here, not by argparse, so the page does
not depend on the terminal's width or on the Python version's help layout.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"
REGENERATE = ".venv/bin/python docs/gen_cli.py"

# Groups whose options differ from command to command: never summarised as "as for ...".
OWN_GROUPS = {"positional arguments", "options"}


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """The subcommand parsers, in --help order, with their one-line help."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def escape(text: str) -> str:
    """Markdown-safe text that keeps its `code spans` as code."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([\\*_\[\]<>|])", r"\\\1", parts[i])
    return "".join(parts)


def cell(text: str) -> str:
    return escape(" ".join(text.split()))


def metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def arguments(action: argparse.Action) -> str:
    """What follows the flag, as argparse's usage writes it."""
    m = metavar(action)
    nargs = action.nargs
    if nargs == 0:
        return ""
    if nargs is None:
        return m
    if nargs == "?":
        return f"[{m}]"
    if nargs == "*":
        return f"[{m} ...]"
    if nargs == "+":
        return f"{m} [{m} ...]"
    if isinstance(nargs, int):
        return " ".join([m] * nargs)
    return m


def invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{arguments(action)}`"
    args = arguments(action)
    return ", ".join(f"`{o} {args}`" if args else f"`{o}`" for o in action.option_strings)


def help_of(action: argparse.Action, prog: str) -> str:
    text = argparse.HelpFormatter(prog)._expand_help(action) if action.help else ""
    if action.required and action.option_strings:
        text = f"(required) {text}"
    return cell(text)


def shown_options(actions: list[argparse.Action]) -> bool:
    return any(a.option_strings for a in actions)


def synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    words = [f"tmbatch {name}", "[options]"]
    for a in parser._actions:
        if not a.option_strings:
            words.append(arguments(a))
        elif a.required:
            words.append(invocation(a).split(", ")[-1].strip("`"))
    return " ".join(words)


def prose(text: str | None) -> list[str]:
    """A description or epilog: a paragraph, or as written when it is laid out in lines."""
    if not text:
        return []
    if "\n" in text.strip():
        return ["```text", text.strip("\n"), "```", ""]
    return [escape(text.strip()), ""]


def render() -> str:
    from tmbatch.cli.main import build_parser

    main = build_parser()
    commands = subcommands(main)
    out = [
        "# CLI reference",
        "",
        "<!-- Generated from the argparse parsers by docs/gen_cli.py: do not edit by hand. -->",
        "Every command, option and help text as `tmbatch --help` and `tmbatch COMMAND --help`",
        f"print them. This page is generated: after changing a parser run `{REGENERATE}`.",
        "Every command also takes `-h` / `--help`.",
        "",
        "## tmbatch",
        "",
        "```text",
        "tmbatch [--version] COMMAND [options]",
        "```",
        "",
        *prose(main.description),
        "| command | what it does |",
        "|---|---|",
        *[f"| [`{name}`](#tmbatch-{name}) | {cell(h)} |" for name, h, _ in commands],
        "",
        *prose(main.epilog),
    ]
    first_seen: dict[str, tuple[str, dict[str, str]]] = {}
    for name, _, parser in commands:
        out += [f"## tmbatch {name}", "", "```text", synopsis(name, parser), "```", ""]
        out += prose(parser.description)
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS
                       and not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            rows = {invocation(a): help_of(a, parser.prog) for a in actions}
            title = group.title or "options"
            out += [f"**{escape(title)}**", ""]
            earlier = first_seen.get(title) if title not in OWN_GROUPS else None
            if earlier is None:
                first_seen.setdefault(title, (name, rows))
                shown = rows
            else:
                where, seen = earlier
                shown = {k: v for k, v in rows.items() if seen.get(k) != v}
                missing = [k for k in seen if k not in rows]
                line = f"As for [`tmbatch {where}`](#tmbatch-{where})"
                if missing:
                    line += ", without " + ", ".join(missing)
                out += [line + (", except:" if shown else "."), ""]
            if shown:
                kind = "option" if shown_options(actions) else "argument"
                out += [f"| {kind} | description |", "|---|---|"]
                out += [f"| {k} | {v} |" for k, v in shown.items()]
                out.append("")
        for mutex in parser._mutually_exclusive_groups:
            flags = [a.option_strings[0] for a in mutex._group_actions if a.option_strings]
            if len(flags) > 1:
                out += [" and ".join(f"`{f}`" for f in flags) + " exclude each other.", ""]
        out += prose(parser.epilog)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if PAGE.exists() and PAGE.read_text() == text:
            return 0
        print(f"{PAGE.relative_to(ROOT)} is out of date: run {REGENERATE}", file=sys.stderr)
        return 1
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
