"""docs/cli.md, the command-line reference, generated from the argparse parsers.

    python -m chatbot.cli.reference > docs/cli.md      (make cli-docs)

Every command and subcommand gets its `--help` text. The help is formatted at
a fixed width, whatever the terminal, so the file is the same on every
machine; tests/test_cli_reference.py fails when docs/cli.md differs from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

WIDTH = 100  # argparse reads $COLUMNS for its line width
REGENERATE = "python -m chatbot.cli.reference > docs/cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser, then each of its subcommands' parsers depth-first, in the order they were added."""
    yield parser
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subcommands(sub)


def render() -> str:
    """The text of docs/cli.md."""
    from . import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        sections = [f"## `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n"
                    for parser in _subcommands(build_parser())]
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    head = ("# `persona-studio` command reference\n\n"
            f"Generated from the command's argparse parsers by `{REGENERATE}` (`make cli-docs`);\n"
            "do not edit by hand. Every option named after a setting also reads\n"
            "`PERSONA_STUDIO_<NAME>` (see [settings.md](settings.md)); a flag wins over it.\n")
    return "\n".join([head, *sections])


if __name__ == "__main__":
    sys.stdout.write(render())
