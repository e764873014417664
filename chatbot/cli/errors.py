"""How a `persona-studio` command fails: it raises, and `main` prints one line and returns the status.

Commands never print their own error line or pick exit codes by hand: they
raise ``CommandError`` (status 1), and start-up problems arrive as
``chatbot.startup.StartupError`` (status 2: the data directory, the store or
the model could not be opened). ``main`` is the one place that catches both
and prints ``persona-studio: error: <message>`` on stderr. StartupError is
not a CommandError subclass because it lives outside the command line
(chatbot/startup.py is imported by library code).
"""

from __future__ import annotations

import sys

from ..startup import StartupError

EXIT_FAILED = 1


class CommandError(Exception):
    """A command failed for a reason the user can act on; the message is one line."""

    def __init__(self, message: object, status: int = EXIT_FAILED):
        super().__init__(str(message))
        self.status = status


# What `main` catches: everything a command may stop on with a one-line message.
FAILURES = (CommandError, StartupError)


def report(exc: CommandError | StartupError) -> int:
    """Print ``persona-studio: error: <message>`` and return the exit status."""
    print(f"persona-studio: error: {exc}", file=sys.stderr)
    return exc.status
