"""What every store class shares: its sessions, retried writes, detached records.

``ChatStore`` (repository.py), ``AccountStore`` (accounts.py) and ``RunStore``
(runs.py) each take an engine and derive from ``StoreBase``, which gives them

* ``session()``: a write transaction, committed when the block ends and
  rolled back if it raises. On SQLite it begins with ``BEGIN IMMEDIATE``,
  so it queues for the write lock up front (see db.py);
* ``read_session()``: a transaction for reading only. On SQLite it begins
  deferred, so in WAL mode it never waits behind a writer; other backends
  treat it like ``session()``;
* ``write(work)``: ``work(session)`` in a write transaction, run again when
  it lost a race that rolled it back (see ``StoreBase.write``). Every change
  a store makes goes through it.

Sessions do not expire their objects on commit, and the stores hand out
frozen copies of rows (``DetachedRow`` subclasses), never ORM objects, so one
store can be shared by all of Gradio's worker threads and nothing it returns
goes stale or lazy-loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from chatbot.store.db import WRITE_RETRIES, is_transient, sleep_before_retry

T = TypeVar("T")


class DetachedRow:
    """Base of the frozen dataclasses the stores hand out: copies of an ORM row's columns,
    so callers never hold ORM objects across sessions."""

    @classmethod
    def from_row(cls, row):
        return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})


class StoreBase:
    """Sessions and retried writes over one engine (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Read-only work skips SQLite's write lock (see db.py): in WAL mode
        # it then never waits for a writer. Other backends ignore this.
        self._reads = sessionmaker(
            engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False
        )

    def session(self) -> AbstractContextManager[Session]:
        """A write transaction: ``with store.session() as session:``; commits at the end, rolls back on an error.

        Run once; prefer ``write`` for changes, which runs again after a lost race.
        """
        return self._sessions.begin()

    def read_session(self) -> AbstractContextManager[Session]:
        """A transaction for reading only; on SQLite it never takes (or waits for) the write lock."""
        return self._reads.begin()

    def write(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a write transaction and return what it returns; again if it lost a race.

        A unique key raced (IntegrityError): once more, and that run sees the
        competing writer's committed row; a second IntegrityError is a real
        error and propagates. A transient conflict (a PostgreSQL deadlock or
        serialization failure, SQLite's "database is locked"; see
        ``db.is_transient``), which rolled the transaction back: up to
        WRITE_RETRIES more times, with backoff. Anything else propagates at
        once. (A SQLite write that cannot get the lock at its BEGIN is retried
        inside db.py and then fails with StoreError, which is not retried here.)

        ``work`` may therefore run more than once: it must do all its reading
        and writing through the session it is given.
        """
        unique_raced = False
        attempt = 0
        while True:
            try:
                with self.session() as session:
                    return work(session)
            except IntegrityError:
                if unique_raced:
                    raise
                unique_raced = True
            except OperationalError as exc:
                if attempt == WRITE_RETRIES or not is_transient(exc):
                    raise
                sleep_before_retry(attempt)
                attempt += 1
