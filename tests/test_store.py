"""The chat store on a real SQLite file and a real PostgreSQL database: schema, records, votes, threads.

Tests that take ``db_url`` (or ``store``) run once per backend; those about
SQLite's own machinery (WAL, pragmas, in-memory databases, its lock) take
``sqlite_url`` and run on SQLite only.
"""

from __future__ import annotations

import sqlite3
import threading
import warnings
from datetime import timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatbot.store import (
    Base,
    ChatStore,
    Conversation,
    Feedback,
    Message,
    ModelVersion,
    NotFound,
    StoreError,
    make_engine,
    migrate,
)
from chatbot.store.db import alembic_config

EXPECTED_COLUMNS = {
    "users": {"id", "name", "role", "password_hash", "session_epoch", "created_at"},
    "api_keys": {"id", "user_id", "key_hash", "created_at"},
    "persona_versions": {"id", "persona_id", "content_hash", "text", "created_at"},
    "model_versions": {
        "id", "base_model", "adapter_path", "parent_id", "persona_id", "status",
        "metrics", "run_id", "created_at",
    },
    "conversations": {
        "id", "user_id", "persona_id", "persona_hash", "title", "created_at", "updated_at",
        "canary_id", "canary_arm",
    },
    "messages": {
        "id", "conversation_id", "parent_id", "role", "content", "model_version_id",
        "generation_params", "prompt", "prompt_tokens", "completion_tokens", "latency_ms",
        "first_token_ms", "finish_reason", "persona_id", "persona_hash", "provenance", "created_at",
    },
    "feedback": {"id", "message_id", "user_id", "rating", "reason", "comment", "simulated", "created_at",
                 "updated_at"},
    "alignment_runs": {"id", "kind", "persona_id", "config", "dataset_hash", "dataset_stats", "status",
                       "progress", "metrics", "error", "output_dir", "created_at", "updated_at"},
    "feedback_events": {"id", "feedback_id", "message_id", "user_id", "rating", "reason", "comment", "created_at"},
    "promotions": {"id", "persona_id", "version_id", "action", "forced", "reason", "gate", "by", "created_at",
                   "ab"},
    "canaries": {"id", "persona_id", "candidate_id", "control_id", "share", "min_votes", "include_simulated",
                 "started_by", "started_at", "ended_at", "ended_by", "outcome", "result"},
    "jobs": {"id", "kind", "persona_id", "request", "status", "progress", "run_id", "result", "error", "log_path",
             "cancel_requested", "requested_by", "worker", "heartbeat_at", "started_at", "finished_at",
             "created_at", "updated_at"},
    "knowledge_documents": {"id", "persona_id", "path", "content_hash", "embedder", "chunker", "size",
                            "chunk_count", "indexed_at"},
    "knowledge_chunks": {"id", "document_id", "ordinal", "embedding", "heading", "page", "line_start",
                         "line_end", "char_start", "char_end", "text"},
}


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """An empty database, SQLite and then PostgreSQL (see conftest.any_db_url)."""
    return any_db_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'chat.db'}"


@pytest.fixture
def store(db_url: str):
    chat_store = ChatStore.open(db_url)
    yield chat_store
    chat_store.close()


@pytest.fixture
def conversation(store: ChatStore) -> tuple[int, int]:
    """(user id, conversation id) of a fresh conversation."""
    user_id = store.get_or_create_user("alice")
    return user_id, store.create_conversation(user_id, "pirate", "hash1")


def _schema(engine) -> dict[str, tuple]:
    """Tables with their columns, indexes, constraints and foreign keys, as reflected."""
    inspector = inspect(engine)
    schema = {}
    for table in sorted(inspector.get_table_names()):
        with warnings.catch_warnings():
            # SQLite cannot reflect the expression index on model_versions.
            warnings.filterwarnings("ignore", "Skipped unsupported reflection")
            schema[table] = _table_schema(inspector, table)
    return schema


def _table_schema(inspector, table: str) -> tuple:
    return (
        [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
         for c in inspector.get_columns(table)],
        sorted((i["name"], tuple(map(str, i["column_names"])), i["unique"])
               for i in inspector.get_indexes(table)),
        sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)),
        # SQLite reflects no name for a foreign key declared inline by ADD COLUMN (0006's canary_id).
        sorted((f["name"] or "", tuple(f["constrained_columns"]), f["referred_table"])
               for f in inspector.get_foreign_keys(table)),
        sorted((c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)),
    )


# -- migrations ------------------------------------------------------------


def test_migration_from_empty_database_creates_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) == set(EXPECTED_COLUMNS) | {"alembic_version"}
        for table, columns in EXPECTED_COLUMNS.items():
            assert {c["name"] for c in inspector.get_columns(table)} == columns, table
        assert {c["name"] for c in inspector.get_unique_constraints("feedback")} == {
            "uq_feedback_message_id_user_id"
        }
        assert "ix_messages_conversation_id" in {
            i["name"] for i in inspector.get_indexes("messages")
        }
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [
                ("0011_knowledge_chunks",)
            ]
    finally:
        engine.dispose()


def test_models_agree_with_migrations(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        with engine.connect() as conn, warnings.catch_warnings():
            # SQLite cannot reflect the expression index on model_versions
            # (PostgreSQL can, and it is compared there).
            warnings.simplefilter("ignore")
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_migrate_twice_is_a_no_op(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        before = _schema(engine)
        migrate(engine)
        assert _schema(engine) == before
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        migrate(engine)
        assert set(inspect(engine).get_table_names()) >= set(EXPECTED_COLUMNS)
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str) -> None:
    store = ChatStore.open(sqlite_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        store.close()


def test_sqlite_busy_timeout_comes_from_the_url(sqlite_url: str) -> None:
    store = ChatStore.open(sqlite_url + "?timeout=2.5")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    finally:
        store.close()
    with pytest.raises(StoreError, match="timeout must be a number of seconds"):
        ChatStore.open(sqlite_url + "?timeout=soon")


def test_unreachable_database_raises_store_error() -> None:
    with pytest.raises(StoreError) as info:
        ChatStore.open("sqlite:////nonexistent-dir-xyz/sub/x.db")
    message = str(info.value)
    assert message.startswith("cannot open database sqlite:////nonexistent-dir-xyz/sub/x.db: ")
    assert "\n" not in message


def test_store_error_hides_the_password() -> None:
    # Nothing listens on port 1: the connection is refused, the secret stays hidden.
    with pytest.raises(StoreError) as info:
        ChatStore.open("postgresql://bob:s3cret@127.0.0.1:1/chat")
    assert str(info.value).startswith("cannot open database postgresql+psycopg://bob:***@")
    assert "s3cret" not in str(info.value)


def test_a_bare_postgresql_url_uses_psycopg_3(postgres_url: str) -> None:
    """SQLAlchemy's default driver for postgresql:// is psycopg2, which is not installed."""
    bare = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    store = ChatStore.open(bare)
    try:
        assert store.engine.dialect.driver == "psycopg"
        assert store.get_or_create_user("alice") == 1
    finally:
        store.close()


def test_newer_schema_than_the_code_raises_store_error(db_url: str) -> None:
    ChatStore.open(db_url).close()
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="^cannot open database .*9999_future"):
        ChatStore.open(db_url)


def test_in_memory_database_keeps_its_schema() -> None:  # SQLite only
    store = ChatStore.open("sqlite://")
    try:
        user_id = store.get_or_create_user("alice")
        conv = store.create_conversation(user_id, "pirate", "hash1")
        assert store.get_message(store.add_message(conv, "user", "hi")).content == "hi"
    finally:
        store.close()


# -- messages --------------------------------------------------------------


def test_retries_make_siblings_under_one_parent(
    store: ChatStore, conversation: tuple[int, int]
) -> None:
    _, conv = conversation
    question = store.add_message(conv, "user", "Ahoy?")
    first = store.add_message(conv, "assistant", "Arr.", parent_id=question)
    retry = store.add_message(conv, "assistant", "Yo ho!", parent_id=question)

    messages = store.conversation_messages(conv)
    assert [m.id for m in messages] == [question, first, retry]
    assert [m.parent_id for m in messages] == [None, question, question]
    assert store.get_message(retry).content == "Yo ho!"


def test_parent_must_be_in_the_same_conversation(
    store: ChatStore, conversation: tuple[int, int]
) -> None:
    user_id, conv = conversation
    other = store.create_conversation(user_id, "pirate", "hash1")
    foreign = store.add_message(other, "user", "hi")
    with pytest.raises(ValueError, match="not in conversation"):
        store.add_message(conv, "assistant", "x", parent_id=foreign)


def test_generation_details_round_trip(store: ChatStore, conversation: tuple[int, int]) -> None:
    _, conv = conversation
    model = store.get_or_create_model_version("smollm2-135m", "/adapters/v1")
    prompt = [
        {"role": "system", "content": "You are a pirate. ünïcødé ☠"},
        {"role": "user", "content": "Ahoy?"},
    ]
    params = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128, "stop": ["\n\n"]}
    message_id = store.add_message(
        conv, "assistant", "Arr!", model_version_id=model, generation_params=params,
        prompt=prompt, prompt_tokens=31, completion_tokens=2, latency_ms=812.5,
        first_token_ms=95.25, finish_reason="eos",
    )

    record = store.get_message(message_id)
    assert record.prompt == prompt
    assert record.generation_params == params
    assert (record.prompt_tokens, record.completion_tokens) == (31, 2)
    assert (record.latency_ms, record.first_token_ms) == (812.5, 95.25)
    assert (record.finish_reason, record.model_version_id) == ("eos", model)
    assert record.created_at.tzinfo == timezone.utc


def test_title_comes_from_the_first_user_message(
    store: ChatStore, conversation: tuple[int, int]
) -> None:
    user_id, conv = conversation
    store.add_message(conv, "assistant", "Welcome aboard!", finish_reason="greeting")
    store.add_message(conv, "user", "Tell me\nabout   " + "the sea " * 20)
    store.add_message(conv, "user", "Second question")
    titled = store.create_conversation(user_id, "pirate", "hash1", title="Mine")
    store.add_message(titled, "user", "Something else")

    with Session(store.engine) as session:
        first = session.get(Conversation, conv)
        assert first.title == ("Tell me about " + "the sea " * 20)[:60]
        assert len(first.title) == 60
        assert first.updated_at > first.created_at
        assert session.get(Conversation, titled).title == "Mine"


def test_missing_message_is_not_found(store: ChatStore) -> None:
    with pytest.raises(NotFound):
        store.get_message(12345)


# -- feedback --------------------------------------------------------------


def test_feedback_upsert_keeps_one_row_with_the_latest_vote(
    store: ChatStore, conversation: tuple[int, int]
) -> None:
    user_id, conv = conversation
    reply = store.add_message(conv, "assistant", "Arr.")

    stamps = []
    for rating in (1, -1, None):
        store.set_feedback(reply, user_id, rating)
        assert store.get_feedback(reply, user_id) == rating
        with Session(store.engine) as session:
            rows = session.scalars(select(Feedback)).all()
        assert len(rows) == 1 and rows[0].rating == rating
        stamps.append(rows[0].updated_at)

    assert stamps[0] < stamps[1] < stamps[2]
    assert all(stamp.tzinfo == timezone.utc for stamp in stamps)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("rating 2", "rating must be"),
        ("rating True", "rating must be"),
        ("missing message", "message 9999 does not exist"),
        ("user message", "only assistant messages can be rated"),
        ("missing user", "user 9999 does not exist"),
    ],
)
def test_invalid_feedback_names_the_problem(
    store: ChatStore, conversation: tuple[int, int], case: str, error: str
) -> None:
    user_id, conv = conversation
    reply = store.add_message(conv, "assistant", "Arr.")
    question = store.add_message(conv, "user", "Ahoy?")
    message_id, voter, rating = {
        "rating 2": (reply, user_id, 2),
        "rating True": (reply, user_id, True),
        "missing message": (9999, user_id, 1),
        "user message": (question, user_id, 1),
        "missing user": (reply, 9999, 1),
    }[case]
    with pytest.raises(ValueError, match=error):
        store.set_feedback(message_id, voter, rating)
    assert store.get_feedback(message_id, voter) is None


# -- idempotent records ----------------------------------------------------


def test_record_persona_version_is_idempotent(store: ChatStore) -> None:
    store.record_persona_version("pirate", "h1", "name: Pirate\n")
    store.record_persona_version("pirate", "h1", "name: Pirate\n")
    store.record_persona_version("pirate", "h2", "name: Pirate v2\n")
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT persona_id, content_hash FROM persona_versions ORDER BY id"
        ).all()
    assert rows == [("pirate", "h1"), ("pirate", "h2")]


def test_model_and_user_get_or_create_are_idempotent(store: ChatStore) -> None:
    base = store.get_or_create_model_version("smollm2")
    adapted = store.get_or_create_model_version("smollm2", "/a/v1")
    assert store.get_or_create_model_version("smollm2") == base
    assert store.get_or_create_model_version("smollm2", "/a/v1") == adapted
    assert base != adapted
    assert store.get_or_create_user("bob", "admin") == store.get_or_create_user("bob")
    with pytest.raises(ValueError, match="role"):
        store.get_or_create_user("carol", "root")


def test_the_database_refuses_a_second_bare_base_model(store: ChatStore) -> None:
    """The expression index on coalesce(adapter_path, ''): NULLs count as equal there."""
    store.get_or_create_model_version("smollm2")
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO model_versions (base_model, status) VALUES ('smollm2', 'serving')")


def test_reads_do_not_wait_for_a_writer(store: ChatStore, conversation, db_url: str) -> None:
    _, conv = conversation
    message_id = store.add_message(conv, "user", "hi")
    if db_url.startswith("sqlite"):
        writer = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:
            assert store.get_message(message_id).content == "hi"
            assert len(store.conversation_messages(conv)) == 1
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        return
    # A writer mid-transaction on the very rows read, holding the strongest
    # table lock that still lets plain SELECTs through.
    other = make_engine(db_url)
    try:
        with other.connect() as writer:
            writer.exec_driver_sql("LOCK TABLE messages, conversations IN EXCLUSIVE MODE")
            writer.exec_driver_sql(f"UPDATE messages SET content = 'changing' WHERE id = {message_id}")
            assert store.get_message(message_id).content == "hi"
            assert len(store.conversation_messages(conv)) == 1
            writer.rollback()
    finally:
        other.dispose()


def test_upsert_retries_after_losing_a_unique_key_race(
    store: ChatStore, conversation: tuple[int, int]
) -> None:
    """Just before the store inserts the vote, a competitor inserts the same row.

    On PostgreSQL the competitor is another connection that commits first, a
    real race. SQLite's writers queue instead, so there it is staged on the
    store's own connection. Either way the insert hits the unique key and the
    store must retry rather than surface the IntegrityError.
    """
    user_id, conv = conversation
    reply = store.add_message(conv, "assistant", "Arr.")
    raced: list[str] = []
    competitor = None
    if store.engine.dialect.name != "sqlite":
        competitor = make_engine(store.engine.url.render_as_string(hide_password=False))

    @event.listens_for(store.engine, "before_cursor_execute")
    def compete(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.startswith("INSERT INTO feedback ") and not raced:
            raced.append(statement)
            if competitor is None:
                conn.connection.driver_connection.execute(
                    "INSERT INTO feedback (message_id, user_id, rating) VALUES (?, ?, 1)",
                    (reply, user_id),
                )
            else:
                with competitor.begin() as other:
                    other.exec_driver_sql(
                        "INSERT INTO feedback (message_id, user_id, rating) "
                        f"VALUES ({reply}, {user_id}, 1)"
                    )

    try:
        store.set_feedback(reply, user_id, -1)
    finally:
        if competitor is not None:
            competitor.dispose()
    assert raced
    assert store.get_feedback(reply, user_id) == -1
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM feedback").scalar() == 1


# -- concurrency -----------------------------------------------------------


def test_threads_sharing_one_store_lose_nothing(store: ChatStore) -> None:
    threads, per_thread = 8, 25
    owner = store.get_or_create_user("owner")
    shared = store.create_conversation(owner, "pirate", "hash1")
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        try:
            start.wait()
            user_id = store.get_or_create_user(f"user{index}")
            store.get_or_create_user("everyone")  # all threads race on one name
            model = store.get_or_create_model_version("smollm2")  # and on one model
            store.record_persona_version("pirate", "hash1", "name: Pirate\n")
            parent = None
            for turn in range(per_thread):
                parent = store.add_message(
                    shared, "assistant", f"{index}:{turn}", parent_id=parent,
                    model_version_id=model,
                )
                store.set_feedback(parent, user_id, 1 if turn % 2 else -1)
        except BaseException as exc:  # surfaced below, with the thread's error
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, errors

    with Session(store.engine) as session:
        count = lambda model: session.scalar(select(func.count()).select_from(model))  # noqa: E731
        assert count(Message) == threads * per_thread
        assert count(Feedback) == threads * per_thread
        assert count(ModelVersion) == 1
        # Odd turns voted +1, even turns -1: 12 - 13 per thread.
        assert session.scalar(select(func.sum(Feedback.rating))) == -threads
    assert len(store.conversation_messages(shared)) == threads * per_thread


def test_upgrade_from_the_0001_schema_keeps_data_and_backfills_persona_versions(db_url: str) -> None:
    """A database made by the first release: upgraded in place, nothing lost."""
    from alembic import command

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001_initial")
            # No explicit ids: PostgreSQL's sequences would not know about them.
            conn.exec_driver_sql("INSERT INTO users (name, role) VALUES ('old', 'user')")
            conn.exec_driver_sql(
                "INSERT INTO conversations (user_id, persona_id, persona_hash) "
                "VALUES (1, 'pirate', 'abc123')")
            conn.exec_driver_sql(
                "INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'ahoy')")
        migrate(engine)
        columns = {c["name"] for c in inspect(engine).get_columns("messages")}
        assert columns == EXPECTED_COLUMNS["messages"]
        assert {c["name"] for c in inspect(engine).get_columns("conversations")} == EXPECTED_COLUMNS["conversations"]
    finally:
        engine.dispose()
    store = ChatStore.open(db_url)
    try:
        old = store.get_message(1)
        assert (old.content, old.persona_id, old.persona_hash) == ("ahoy", "pirate", "abc123")
        new_id = store.add_message(1, "assistant", "arr", parent_id=1)
        assert store.get_message(new_id).persona_hash == "abc123"
    finally:
        store.close()


def test_feedback_reason_comment_and_every_change_kept(store: ChatStore, conversation: tuple[int, int]) -> None:
    user, conv = conversation
    reply = store.add_message(conv, "assistant", "Arr!")
    store.set_feedback(reply, user, 1)
    store.set_feedback(reply, user, 1, reason="funny,in character", comment="love it")
    store.set_feedback(reply, user, -1)  # reason and comment stay
    store.set_feedback(reply, user, None, reason=None)  # cleared, reason removed, comment kept
    with store.engine.connect() as conn:
        current = conn.exec_driver_sql("SELECT rating, reason, comment FROM feedback").all()
        events = conn.exec_driver_sql(
            "SELECT rating, reason, comment FROM feedback_events ORDER BY id").all()
    assert current == [(None, None, "love it")]
    assert events == [(1, None, None), (1, "funny,in character", "love it"),
                      (-1, "funny,in character", "love it"), (None, None, "love it")]


def test_upgrade_from_0002_gives_existing_votes_one_event_each(db_url: str) -> None:
    from alembic import command

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002_message_persona_version")
            conn.exec_driver_sql("INSERT INTO users (name, role) VALUES ('old', 'user')")
            conn.exec_driver_sql("INSERT INTO conversations (user_id, persona_id, persona_hash) "
                                 "VALUES (1, 'pirate', 'abc')")
            conn.exec_driver_sql("INSERT INTO messages (conversation_id, role, content) "
                                 "VALUES (1, 'assistant', 'arr')")
            conn.exec_driver_sql("INSERT INTO feedback (message_id, user_id, rating) VALUES (1, 1, -1)")
        migrate(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT message_id, user_id, rating FROM feedback_events").all() == [(1, 1, -1)]
            assert conn.exec_driver_sql("SELECT reason, comment FROM feedback").all() == [(None, None)]
    finally:
        engine.dispose()


def test_upgrade_from_0005_keeps_conversations_and_promotions_outside_any_canary(db_url: str) -> None:
    """Existing conversations get no arm (they keep what served them); the canary constraints hold."""
    from alembic import command
    from sqlalchemy.exc import IntegrityError as Refused

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0005_promotions")
            conn.exec_driver_sql("INSERT INTO users (name, role) VALUES ('old', 'user')")
            conn.exec_driver_sql("INSERT INTO conversations (user_id, persona_id, persona_hash) "
                                 "VALUES (1, 'pirate', 'abc')")
            conn.exec_driver_sql("INSERT INTO model_versions (base_model, adapter_path, status) "
                                 "VALUES ('base', '/a', 'serving')")
            conn.exec_driver_sql("INSERT INTO promotions (persona_id, version_id, action, forced, by) "
                                 "VALUES ('pirate', 1, 'promote', false, 'ops')")
        migrate(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT canary_id, canary_arm FROM conversations").all() == [(None, None)]
            assert conn.exec_driver_sql("SELECT ab FROM promotions").all() == [(None,)]
        inspector = inspect(engine)
        assert (("canary_id",), "canaries") in {
            (tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys("conversations")}
        running = {i["name"]: i for i in inspector.get_indexes("canaries")}["uq_canaries_running"]
        assert running["unique"] and running["column_names"] == ["persona_id"]
        insert = ("INSERT INTO canaries (persona_id, candidate_id, share, min_votes, started_by) "
                  "VALUES ('pirate', 1, {share}, 10, 'ops')")
        for bad in ("UPDATE conversations SET canary_arm = 'both'", insert.format(share="1.5")):
            with pytest.raises(Refused), engine.begin() as conn:
                conn.exec_driver_sql(bad)
        with engine.begin() as conn:
            conn.exec_driver_sql(insert.format(share="0.2"))
        with pytest.raises(Refused), engine.begin() as conn:  # a second running canary for the persona
            conn.exec_driver_sql(insert.format(share="0.2"))
        with engine.begin() as conn:  # one that ended does not count
            conn.exec_driver_sql("UPDATE canaries SET ended_at = CURRENT_TIMESTAMP, outcome = 'stopped'")
            conn.exec_driver_sql(insert.format(share="0.2"))
    finally:
        engine.dispose()


def test_upgrade_from_0006_adds_api_keys_bound_to_users(db_url: str) -> None:
    """Existing users come through; a key's hash is unique and its user must exist."""
    from alembic import command
    from sqlalchemy.exc import IntegrityError as Refused

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0006_canaries")
            conn.exec_driver_sql("INSERT INTO users (name, role, password_hash) VALUES ('old', 'admin', 'h')")
        migrate(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT name, role FROM users").all() == [("old", "admin")]
        inspector = inspect(engine)
        assert (("user_id",), "users") in {
            (tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys("api_keys")}
        insert = "INSERT INTO api_keys (user_id, key_hash) VALUES ({user}, '{hash}')"
        with engine.begin() as conn:
            conn.exec_driver_sql(insert.format(user=1, hash="a" * 64))
            assert conn.exec_driver_sql("SELECT created_at IS NOT NULL FROM api_keys").scalar()
        for bad in (insert.format(user=1, hash="a" * 64), insert.format(user=99, hash="b" * 64)):
            with pytest.raises(Refused), engine.begin() as conn:
                conn.exec_driver_sql(bad)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0006_canaries")
        assert "api_keys" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
