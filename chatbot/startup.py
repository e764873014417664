"""Opening the shared services (store, personas, model) for the commands that generate replies.

`serve`, `chat` and `simulate` all start the same way: a writable data
directory, then the store, the persona library and the engine. What can go
wrong there (an unwritable folder, an unreachable database, a model that will
not load) is a ``StartupError``: one line, and exit status 2 when a command
stops on it (chatbot/cli catches it in one place).

This module is not part of the command line on purpose: library code
(chatbot.simulation, alignment/) may call it without importing chatbot.cli,
which imports alignment/ for `align`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .settings import Settings

EXIT_STARTUP = 2


class StartupError(Exception):
    """A problem found before serving or generating; printed as one line."""

    status = EXIT_STARTUP  # the exit status of a command that stops on it


def check_data_dir(path: Path) -> None:
    """Make the data directory and prove it is writable, before anything is stored in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data directory {path} is not writable: {exc.strerror or exc}") from None


def build_service(settings: Settings):
    """Open the store, load the personas and the model: the shared services."""
    from .chat import ChatService
    from .default_model import ModelLoadError
    from .engine import EngineUnavailable, open_engine
    from .personas import PersonaError, PersonaLibrary
    from .store import ChatStore, StoreError

    try:
        store = ChatStore.open(settings.database_url)
        personas = PersonaLibrary(settings.personas_dir)
        for problem in personas.errors:
            print(f"warning: persona skipped: {problem}", file=sys.stderr)
        engine = open_engine(settings)
    except (StoreError, PersonaError, ModelLoadError, EngineUnavailable, ValueError) as exc:
        # ValueError: a setting no engine accepts (`--engine tgi`)
        raise StartupError(str(exc)) from None
    return ChatService(engine, personas, store)
