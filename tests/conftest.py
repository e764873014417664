"""Shared fixtures.

The bundled model is converted once into .test-cache/ (kept between runs, so
only the first run pays the ~20 s conversion); every test gets its own data
directory and SQLite file under tmp_path, with the converted model linked in.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatbot import default_model
from chatbot.personas import PersonaLibrary
from chatbot.store import ChatStore

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".test-cache" / "data"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No test reads the developer's settings or writes to their data directory."""
    for key in list(os.environ):
        if key.startswith("PERSONA_STUDIO_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    return default_model.ensure_checkpoint(MODEL_CACHE)


@pytest.fixture
def data_dir(tmp_path, checkpoint) -> Path:
    """A fresh data directory whose models/ points at the converted bundled model."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "models").symlink_to(checkpoint.parent, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def engine(checkpoint):
    from chatbot.engine import ChatEngine

    return ChatEngine.load("", MODEL_CACHE)


@pytest.fixture
def store(tmp_path):
    store = ChatStore.open(f"sqlite:///{tmp_path / 'chat.db'}")
    yield store
    store.close()


@pytest.fixture
def personas() -> PersonaLibrary:
    return PersonaLibrary(REPO / "personas")


@pytest.fixture
def service(engine, personas, store):
    from chatbot.chat import ChatService

    return ChatService(engine, personas, store)
