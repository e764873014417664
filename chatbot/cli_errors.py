"""How a `persona-studio` subcommand reports a failure: one line on stderr, exit status 1."""

from __future__ import annotations

import sys

EXIT_FAILED = 1


def fail(exc: BaseException) -> int:
    """Print ``persona-studio: error: <what was wrong>`` and return the exit status."""
    # A KeyError's str() is its repr ('"run 7 does not exist"'); its message is the argument.
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"persona-studio: error: {message}", file=sys.stderr)
    return EXIT_FAILED
