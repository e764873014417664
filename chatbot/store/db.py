"""Engine construction, schema migration, and the store's one error type.

SQLite is the default backend and gets two things here:

* WAL journal, foreign keys and a busy timeout on every connection (SQLite
  forgets pragmas per connection, so they are set in a connect listener);
* ``BEGIN IMMEDIATE`` for write transactions. With the driver's default
  deferred BEGIN, a transaction that reads and then writes while another
  connection commits fails at once with "database is locked" instead of
  waiting for the busy timeout; taking the write lock up front makes
  concurrent writers queue. Read-only work can ask for a deferred BEGIN with
  the execution option ``sqlite_begin="DEFERRED"`` (WAL readers never wait).

PostgreSQL, reached through the same URL setting, needs neither.

``sqlite://`` (in memory) works for single-threaded tests: one shared
connection, so concurrent transactions are not supported there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=30000",
)


class StoreError(Exception):
    """The database cannot be used; the message is one line for a human."""


def _short_reason(exc: BaseException) -> str:
    """The driver's own words (first line), without SQLAlchemy's SQL dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:200]


def _safe(url: URL) -> str:
    return url.render_as_string(hide_password=True)


@contextmanager
def _opening(url: URL) -> Iterator[None]:
    """Turn failures to reach or upgrade the database into StoreError."""
    try:
        yield
    # CommandError: e.g. the database is at a revision this code does not know.
    except (SQLAlchemyError, CommandError) as exc:
        raise StoreError(f"cannot open database {_safe(url)}: {_short_reason(exc)}") from exc


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; raises StoreError for a bad URL or driver.

    Nothing connects yet. A SQLite file's directory is not created: where
    data lives is the caller's decision, and a typo should fail loudly.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        # Do not echo the string: it may hold a password.
        raise StoreError("cannot open database: not a valid database URL") from exc

    is_sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        if parsed.database in (None, "", ":memory:"):
            # An in-memory database lives and dies with its connection: share
            # one, or each pooled connection would see an empty database.
            # Good for single-threaded tests only.
            kwargs["poolclass"] = StaticPool
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"cannot open database {_safe(parsed)}: {_short_reason(exc)}") from exc
    if is_sqlite:
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would
        # otherwise emit its own deferred BEGIN (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"sqlite_begin must be DEFERRED/IMMEDIATE/EXCLUSIVE, not {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the shipped migrations; no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest revision (a no-op when it is there).

    Runs in one transaction, so a failed upgrade leaves the old schema; on
    SQLite that transaction holds the write lock, so two processes starting
    at once migrate one after the other.
    """
    with _opening(engine.url):
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
