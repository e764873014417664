"""Shared fixtures.

The bundled model is converted once into .test-cache/ (kept between runs, so
only the first run pays the ~20 s conversion); every test gets its own data
directory and SQLite file under tmp_path, with the converted model linked in.

Tests of the chat's plumbing use ``fake_engine`` / ``fake_service``
(tests/fake_engine.py: replies from a queue, no model); ``engine`` and
``service`` run the real bundled model. Every test that needs the bundled
model, through any fixture built on ``checkpoint``, is marked ``model``
here, so ``pytest -m "not model"`` runs the rest without converting it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbot import default_model
from chatbot.personas import PersonaLibrary
from chatbot.store import ChatStore

REPO = Path(__file__).resolve().parent.parent

# Under xdist the workers share the cores: each worker's torch, and every process it starts (the app,
# a job worker), gets its share of them instead of a thread per core. Two torch processes with two
# threads each on two cores wait on each other's threads: a training job of 15 s alone took 3 min next
# to a test that generated. Read by torch when it is imported, which conftest does not do.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

MODEL_CACHE = REPO / ".test-cache" / "data"
# The PostgreSQL server the store tests use (`make test` and .ci/postgres.sh
# set it). Read at import: _isolated_environment removes PERSONA_STUDIO_*
# variables from every test's environment.
TEST_PG_URL = os.environ.get("PERSONA_STUDIO_TEST_PG_URL", "")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """Mark ``model`` every test that needs the bundled model (its weights or its tokenizer).

    They all reach it through ``checkpoint`` (``engine``, ``service``,
    ``data_dir``, ``tiny_model``, ...); the modules mark most of them too,
    and this catches any that do not.
    """
    for item in items:
        if "checkpoint" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)
    _slowest_files_first(items)


# What a test costs, roughly, by its marks (seconds on this project's 2-core machine): a browser test
# starts a server and Chromium, a model test generates or trains. A test far from its mark's
# estimate says how long it takes with `@pytest.mark.seconds(N)`.
COST = {"browser": 25.0, "model": 4.0}
OTHER_COST = 0.3


def _slowest_files_first(items: list) -> None:
    """Order the test files by their estimated cost, dearest first, each file's tests kept in order.

    `make test` hands whole files to its workers in this order (xdist's loadfile without its
    reordering by test count): a long file started last would be the suite's tail, alone on one
    worker while the other one idles.
    """
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)

    def seconds(test) -> float:
        if (stated := test.get_closest_marker("seconds")) is not None:
            return stated.args[0]
        return next((COST[m] for m in COST if test.get_closest_marker(m)), OTHER_COST)

    def cost(tests: list) -> float:
        return sum(seconds(test) for test in tests)

    items[:] = [item for tests in sorted(files.values(), key=cost, reverse=True) for item in tests]


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
    from chatbot.transformers_engine import TransformersEngine

    engine = TransformersEngine.load("", MODEL_CACHE)
    yield engine
    engine.close()


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


@pytest.fixture
def fake_engine():
    """An engine that replies with queued text (tests/fake_engine.py): no model is loaded."""
    from fake_engine import FakeEngine

    return FakeEngine()


@pytest.fixture
def fake_service(fake_engine, personas, store):
    """ChatService on ``fake_engine``: for tests of what is stored and who may see it, not of what is said."""
    from chatbot.chat import ChatService

    return ChatService(fake_engine, personas, store)


# -- databases: the store's tests run on SQLite and on PostgreSQL ------------


@pytest.fixture(scope="session")
def _pg_admin():
    """An autocommit connection to the test server, for CREATE/DROP DATABASE."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    if not TEST_PG_URL:
        pytest.fail(
            "PERSONA_STUDIO_TEST_PG_URL is not set: the store tests also run on PostgreSQL. "
            "Run them through `make test`, or start a throwaway server with "
            '`eval "$(.ci/postgres.sh)"` and run pytest again.',
            pytrace=False,
        )
    engine = create_engine(TEST_PG_URL, isolation_level="AUTOCOMMIT")
    try:
        connection = engine.connect()
    except SQLAlchemyError as exc:
        engine.dispose()
        pytest.fail(
            f"cannot reach PERSONA_STUDIO_TEST_PG_URL ({engine.url!r}): {exc.orig or exc}. "
            "Is the server up? `make postgres` or `.ci/postgres.sh` starts the test server.",
            pytrace=False,
        )
    yield connection
    connection.close()
    engine.dispose()


@pytest.fixture
def postgres_url(_pg_admin) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    from sqlalchemy import make_url

    name = f"persona_studio_test_{uuid.uuid4().hex[:12]}"
    _pg_admin.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(TEST_PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(_pg_admin, name)


def _drop_database(admin, name: str, attempts: int = 100) -> None:
    """DROP ... WITH (FORCE): a test that failed half-way may have left a connection open.

    FORCE may not end a server process of another role (seen in CI: "must be a member of the role
    whose process is being terminated", a background worker on the new database); that one ends
    by itself, so the drop is tried again until it is gone.
    """
    import psycopg
    from sqlalchemy.exc import ProgrammingError

    for attempt in range(attempts):
        try:
            admin.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except ProgrammingError as exc:
            if not isinstance(exc.orig, psycopg.errors.InsufficientPrivilege) or attempt == attempts - 1:
                raise
            time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path) -> str:
    """An empty database on each backend: a SQLite file, then a PostgreSQL database.

    A test that takes it runs twice (ids ``[sqlite]`` and ``[postgresql]``).
    Without a PostgreSQL server the second run fails, saying how to get one.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chat.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def tiny_model(checkpoint, tmp_path_factory) -> Path:
    """A random 2-layer Llama with the bundled model's real tokenizer, for training smoke tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
