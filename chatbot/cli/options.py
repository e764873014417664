"""What the command groups share: the Settings options, reading them back, and a plain-text table.

Every option named after a ``Settings`` field (``--db-url``, ``--data-dir``,
``--personas-dir``, ``--model``, ...) takes its help from the field, so the
help text is written once (chatbot/settings.py) whichever command shows it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import fields

from ..settings import Settings
from ..startup import StartupError

# The database: what every command that reads or writes the store takes.
STORE = ("db_url", "data_dir")
_FIELDS = {f.name: f for f in fields(Settings)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(name: str) -> str | None:
    return _FIELDS[name].metadata.get("help")


def add_settings(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """One option per Settings field (for the commands that load the model), except those in ``skip``."""
    for name in _FIELDS:
        if name not in skip:
            parser.add_argument(_flag(name), dest=name, default=None, help=_help(name))


def setting_options(names: Sequence[str] = STORE,
                    group: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """A parent parser with the options of the Settings fields ``names``, for a group's subcommands.

    With ``group``, the group takes them too, so they may come before or after
    the subcommand; the subcommands' copies default to SUPPRESS, so one left
    out after the subcommand does not reset the value given before it.
    """
    common = argparse.ArgumentParser(add_help=False)
    for name in names:
        if group is not None:
            group.add_argument(_flag(name), dest=name, default=None, help=_help(name))
        common.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS if group is not None else None,
                            help=_help(name))
    return common


def settings(args: argparse.Namespace) -> Settings:
    """The Settings of a command: its flags over PERSONA_STUDIO_* variables over the defaults."""
    try:
        return Settings.from_sources({name: getattr(args, name, None) for name in _FIELDS})
    except ValueError as exc:  # a bad PERSONA_STUDIO_PORT and the like: nothing can start
        raise StartupError(str(exc)) from None


def open_store(database_url: str):
    """The ChatStore at ``database_url``, or a CommandError naming why it cannot be opened."""
    from ..store import ChatStore, StoreError  # imported here: `--help` never loads SQLAlchemy
    from .errors import CommandError

    try:
        return ChatStore.open(database_url)
    except StoreError as exc:
        raise CommandError(exc) from None


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the last one (a path, a note) is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
              .rstrip())
