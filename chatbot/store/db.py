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

With those, a write can only meet a lock at its BEGIN. It waits there up to
the busy timeout (30 s, or ``?timeout=SECONDS`` in the URL); should the lock
still be held, or SQLite report "locked" without waiting (it does in some
cases), the BEGIN is retried a few times with backoff, and only then does the
write fail, with a StoreError saying the database is busy.

PostgreSQL, reached through the same URL setting, needs none of that. A bare
``postgresql://`` URL uses psycopg 3 (a dependency), not SQLAlchemy's default
psycopg2. Its pool holds a connection for every worker thread that may write
at once, and its transient errors (deadlock, serialization failure) are
retried by ``StoreBase.write`` (base.py); ``is_transient`` recognises them.

``sqlite://`` (in memory) works for single-threaded tests: one shared
connection, so concurrent transactions are not supported there.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
)
# Seconds a write waits for SQLite's lock before the first retry; a URL's
# ``?timeout=`` overrides it.
SQLITE_BUSY_TIMEOUT_S = 30.0
# Retries of a write that met a transient conflict (a SQLite BEGIN IMMEDIATE
# that found the database locked, a PostgreSQL deadlock), and the first backoff
# (doubled each time, with jitter so that queued writers spread out).
WRITE_RETRIES = 3
RETRY_BACKOFF_S = 0.1

# PostgreSQL connections kept open, and the extra ones opened under load: 40
# in all, the number of worker threads Gradio runs handlers on (anyio's default).
PG_POOL_SIZE = 10
PG_POOL_OVERFLOW = 30

# PostgreSQL SQLSTATEs after which the transaction was rolled back and running
# it again is safe: serialization_failure, deadlock_detected.
PG_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


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


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write was rolled back by a passing conflict and may be run again.

    True for PostgreSQL deadlocks and serialization failures and for SQLite's
    "database is locked" (SQLITE_BUSY). Never for lost connections: a COMMIT whose
    answer was lost may have happened, and running it again would write twice.
    """
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in PG_TRANSIENT_SQLSTATES:
        return True
    return "database is locked" in str(orig)


def sleep_before_retry(attempt: int) -> None:
    """Back off before retry ``attempt`` (0-based): doubling, with jitter."""
    time.sleep(RETRY_BACKOFF_S * (2**attempt) * random.uniform(0.5, 1.5))


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

    if parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; psycopg 3 is the
        # one this package depends on.
        parsed = parsed.set(drivername="postgresql+psycopg")

    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    busy_timeout = SQLITE_BUSY_TIMEOUT_S
    if backend == "sqlite":
        try:
            busy_timeout = float(parsed.query.get("timeout", SQLITE_BUSY_TIMEOUT_S))
        except (TypeError, ValueError) as exc:
            raise StoreError(
                f"cannot open database {_safe(parsed)}: timeout must be a number of seconds"
            ) from exc
        parsed = parsed.difference_update_query(["timeout"])
        kwargs["connect_args"] = {"timeout": busy_timeout, "check_same_thread": False}
        if parsed.database in (None, "", ":memory:"):
            # An in-memory database lives and dies with its connection: share
            # one, or each pooled connection would see an empty database.
            # Good for single-threaded tests only.
            kwargs["poolclass"] = StaticPool
    elif backend == "postgresql":
        # A long-lived app outlives server restarts and idle-connection reaping:
        # check a pooled connection before handing it out.
        kwargs["pool_pre_ping"] = True
        # A connection for every worker thread that may write at once. Waiting
        # for the pool is not first come, first served (a thread that returns
        # a connection may take it straight back): with 32 writers and
        # SQLAlchemy's default 5 + 10, one waited past the 30 s pool timeout
        # and failed (bench/store.py).
        kwargs["pool_size"] = PG_POOL_SIZE
        kwargs["max_overflow"] = PG_POOL_OVERFLOW
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"cannot open database {_safe(parsed)}: {_short_reason(exc)}") from exc
    if backend == "sqlite":
        _configure_sqlite(engine, busy_timeout)
    return engine


def _configure_sqlite(engine: Engine, busy_timeout: float) -> None:
    pragmas = (*SQLITE_PRAGMAS, f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would
        # otherwise emit its own deferred BEGIN (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"sqlite_begin must be DEFERRED/IMMEDIATE/EXCLUSIVE, not {mode!r}")
        # Each attempt already waited up to the busy timeout inside SQLite.
        # Nothing has been done in the transaction yet, so trying again is safe.
        for attempt in range(WRITE_RETRIES + 1):
            try:
                conn.exec_driver_sql(f"BEGIN {mode}")
                return
            except OperationalError as exc:
                if not is_transient(exc):
                    raise
                if attempt == WRITE_RETRIES:
                    # StoreError, not OperationalError: StoreBase.write (base.py)
                    # must not start this whole wait over again.
                    raise StoreError(
                        f"database {_safe(engine.url)} is busy: another connection held "
                        f"its write lock through {WRITE_RETRIES + 1} waits of "
                        f"{busy_timeout:g} s; try again"
                    ) from exc
                sleep_before_retry(attempt)


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
