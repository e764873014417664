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
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:  # the backends import the engine module; it never imports them
    from .engine import Engine

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


def build_service(settings: Settings, engine=None):
    """Open the store, load the personas and the model: the shared services. ``engine``: one already
    open to answer with instead of the settings' model (the tests' FakeEngine)."""
    from .chat import ChatService
    from .default_model import ModelLoadError
    from .engine import EngineUnavailable
    from .personas import PersonaError, PersonaLibrary
    from .store import ChatStore, StoreError

    try:
        store = ChatStore.open(settings.database_url)
        personas = PersonaLibrary(settings.personas_dir)
        for problem in personas.errors:
            print(f"warning: persona skipped: {problem}", file=sys.stderr)
        engine = engine or open_engine(settings)
    except (StoreError, PersonaError, ModelLoadError, EngineUnavailable, ValueError) as exc:
        # ValueError: a setting no engine accepts (`--engine tgi`)
        raise StartupError(str(exc)) from None
    from .knowledge.retrieval import PersonaKnowledge

    # Documents are indexed and searched in the store's own database; the embedding model loads on first use.
    return ChatService(engine, personas, store, PersonaKnowledge(store.engine, settings.personas_dir))


ENGINES = ("transformers", "vllm")


def open_engine(settings: Settings) -> Engine:
    """The backend ``settings`` ask for (``--engine``, ``--engine-url``), loaded and ready.

    Raises ModelLoadError or EngineUnavailable with a one-line reason.
    """
    from . import default_model

    if settings.engine not in ENGINES:
        raise ValueError(f"unknown engine {settings.engine!r}: use {' or '.join(ENGINES)}")
    if settings.engine == "transformers" and not settings.engine_url:
        from .transformers_engine import TransformersEngine

        return TransformersEngine.load(settings.model, settings.data_dir, settings.dtype, settings.context_tokens)
    from .vllm_engine import VLLMEngine, VLLMServer, default_python, free_port

    if settings.model:
        checkpoint, model_id = settings.model, settings.model
    else:
        checkpoint, model_id = default_model.ensure_checkpoint(settings.data_dir), default_model.MODEL_ID
    if settings.engine_url:
        return VLLMEngine.connect(settings.engine_url, checkpoint, model_id, settings.context_tokens)
    server = VLLMServer(default_python(), Path(checkpoint), model_id, free_port(),
                        Path(settings.data_dir) / "vllm.log", max_model_len=settings.context_tokens,
                        dtype="bfloat16" if settings.dtype == "auto" else settings.dtype)
    url = server.start()
    try:
        return VLLMEngine.connect(url, checkpoint, model_id, settings.context_tokens, server=server)
    except BaseException:
        server.stop()
        raise
