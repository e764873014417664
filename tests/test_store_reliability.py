"""The store under load, under a held lock, and after a writer is killed.

* 20 threads writing 100 messages and 100 votes each through one ChatStore
  lose nothing, on SQLite and on PostgreSQL (counted afterwards).
* A SQLite database locked by another connection for longer than the busy
  timeout makes a writer retry and then succeed, not crash; a lock that is
  never released ends in one StoreError, and the store works afterwards.
* A real process killed with SIGKILL while writing keeps every message it
  had committed, and leaves a consistent database that opens and takes
  writes again: first a small writer script, then the real `chat` command
  killed in the middle of streaming a reply (uses the bundled model).
"""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

from chatbot.store import (
    ChatStore,
    Conversation,
    Feedback,
    FeedbackEvent,
    Message,
    ModelVersion,
    StoreError,
    User,
)

REPO = Path(__file__).resolve().parent.parent


def _count(session: Session, model) -> int:
    return session.scalar(sql_select(func.count()).select_from(model))


# -- many writers ------------------------------------------------------------


def test_twenty_threads_writing_a_hundred_messages_and_votes_each_lose_nothing(
    any_db_url: str,
) -> None:
    threads, per_thread, conversations = 20, 100, 4
    store = ChatStore.open(any_db_url)
    try:
        owner = store.get_or_create_user("owner")
        # Several threads per conversation: they contend for its row (updated_at).
        shared = [store.create_conversation(owner, "pirate", "h") for _ in range(conversations)]
        errors: list[BaseException] = []
        written: dict[int, list[int]] = {}
        start = threading.Barrier(threads)

        def work(index: int) -> None:
            try:
                start.wait()
                user_id = store.get_or_create_user(f"user{index}")
                store.get_or_create_user("everyone")  # all threads race on one name
                model = store.get_or_create_model_version("smollm2")  # and on one model
                conv = shared[index % conversations]
                ids, parent = [], None
                for turn in range(per_thread):
                    parent = store.add_message(
                        conv, "assistant", f"{index}:{turn}", parent_id=parent,
                        model_version_id=model, prompt=[{"role": "user", "content": "hi"}],
                    )
                    store.set_feedback(parent, user_id, 1 if turn % 2 else -1)
                    ids.append(parent)
                written[index] = ids
            except BaseException as exc:  # surfaced below with the thread's traceback
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        assert not any(worker.is_alive() for worker in workers), "a writer hung"
        assert not errors, errors

        total = threads * per_thread
        with Session(store.engine) as session:
            assert _count(session, Message) == total
            assert _count(session, Feedback) == total
            assert _count(session, FeedbackEvent) == total
            assert _count(session, ModelVersion) == 1
            assert _count(session, User) == threads + 2  # + owner, everyone
            # Odd turns +1, even turns -1: 50 - 50 per thread.
            assert session.scalar(sql_select(func.sum(Feedback.rating))) == 0
            # Every message is where its thread put it, after its own parent.
            rows = session.execute(
                sql_select(Message.id, Message.parent_id, Message.content, Message.conversation_id)
            ).all()
        by_id = {row.id: row for row in rows}
        for index, ids in written.items():
            assert len(ids) == per_thread
            for turn, message_id in enumerate(ids):
                row = by_id[message_id]
                assert row.content == f"{index}:{turn}"
                assert row.conversation_id == shared[index % conversations]
                assert row.parent_id == (ids[turn - 1] if turn else None)
    finally:
        store.close()


# -- a locked SQLite database ------------------------------------------------


def _hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection that takes SQLite's write lock and keeps it."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE users SET name = name")
    return holder


def _in_thread(call) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_writer_outlasts_a_lock_held_past_the_busy_timeout(tmp_path: Path) -> None:
    """The lock outlives SQLite's own wait (0.2 s here) threefold: the store retries."""
    path = str(tmp_path / "chat.db")
    store = ChatStore.open(f"sqlite:///{path}?timeout=0.2")
    try:
        user = store.get_or_create_user("alice")
        conv = store.create_conversation(user, "pirate", "h")
        reply = store.add_message(conv, "assistant", "Arr.")

        holder = _hold_write_lock(path)
        message_thread, message = _in_thread(lambda: store.add_message(conv, "user", "still here?"))
        vote_thread, vote = _in_thread(lambda: store.set_feedback(reply, user, 1))
        time.sleep(0.6)
        assert message_thread.is_alive() and vote_thread.is_alive(), (message, vote)
        holder.execute("COMMIT")
        holder.close()
        message_thread.join(timeout=30)
        vote_thread.join(timeout=30)

        assert "error" not in message and "error" not in vote, (message, vote)
        assert message["seconds"] >= 0.5 and vote["seconds"] >= 0.5
        assert store.get_message(message["value"]).content == "still here?"
        assert store.get_feedback(reply, user) == 1
    finally:
        store.close()


def test_a_lock_that_is_never_released_is_one_store_error_then_the_store_works(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "chat.db")
    store = ChatStore.open(f"sqlite:///{path}?timeout=0.1")
    try:
        user = store.get_or_create_user("alice")
        conv = store.create_conversation(user, "pirate", "h")
        holder = _hold_write_lock(path)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"^database sqlite:///.* is busy: .*try again$"):
                store.add_message(conv, "user", "hello?")
            # 4 waits of 0.1 s plus 3 backoffs: bounded, well under SQLite's default 30 s.
            assert 0.4 <= time.monotonic() - started < 5
            # Reads never wait for the writer.
            assert [m.content for m in store.conversation_messages(conv)] == []
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        message_id = store.add_message(conv, "user", "hello again")
        assert store.get_message(message_id).content == "hello again"
    finally:
        store.close()


# -- SIGKILL in the middle of writing ---------------------------------------

WRITER = textwrap.dedent('''
    """Write messages and votes in a loop, saying after each commit what it wrote."""
    import sys
    from chatbot.store import ChatStore

    store = ChatStore.open(sys.argv[1])
    user = store.get_or_create_user("writer")
    conv = store.create_conversation(user, "pirate", "h")
    print("conversation", conv, flush=True)
    parent = None
    # Big messages: each transaction writes many pages (and the WAL checkpoints
    # often), so the kill is likely to land in the middle of one.
    padding = "arr " * 20000
    turn = 0
    while True:
        role = "user" if turn % 2 == 0 else "assistant"
        parent = store.add_message(conv, role, f"{turn} {padding}", parent_id=parent)
        if role == "assistant":
            store.set_feedback(parent, user, 1)
        print("committed", parent, turn, flush=True)
        if turn == 10:
            print("ready", flush=True)
        turn += 1
''')


def _read_lines_until(process: subprocess.Popen, lines: list[str], done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done(lines):
        assert process.poll() is None, f"writer died: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"writer too slow: {lines[-3:]}"
        line = process.stdout.readline()
        if line:
            lines.append(line.strip())


def _check_consistent(url: str) -> None:
    """Integrity and referential consistency of the database at ``url``."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        return
    from sqlalchemy import create_engine

    engine = create_engine(url)
    orphans = {
        "messages.conversation_id": "SELECT count(*) FROM messages m LEFT JOIN conversations c "
                                    "ON c.id = m.conversation_id WHERE c.id IS NULL",
        "messages.parent_id": "SELECT count(*) FROM messages m LEFT JOIN messages p "
                              "ON p.id = m.parent_id WHERE m.parent_id IS NOT NULL AND p.id IS NULL",
        "feedback.message_id": "SELECT count(*) FROM feedback f LEFT JOIN messages m "
                               "ON m.id = f.message_id WHERE m.id IS NULL",
        "feedback_events.feedback_id": "SELECT count(*) FROM feedback_events e LEFT JOIN feedback f "
                                       "ON f.id = e.feedback_id WHERE f.id IS NULL",
    }
    try:
        with engine.connect() as conn:
            for name, query in orphans.items():
                assert conn.exec_driver_sql(query).scalar() == 0, name
            # No transaction of the killed process lingers holding locks (its
            # server process notices the closed socket within moments).
            deadline = time.monotonic() + 10
            while conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state <> 'idle'"
            ).scalar():
                assert time.monotonic() < deadline, "the killed writer's transaction lingers"
                time.sleep(0.1)
    finally:
        engine.dispose()


def test_sigkill_while_writing_keeps_every_committed_message(any_db_url: str, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ChatStore.open(any_db_url).close()  # migrated before the clock starts
    process = subprocess.Popen(
        [sys.executable, str(script), any_db_url], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        _read_lines_until(process, lines, lambda seen: "ready" in seen, timeout=120)
        # A few more commits, then kill it wherever it is.
        _read_lines_until(
            process, lines, lambda seen: sum(x.startswith("committed") for x in seen) >= 20,
            timeout=60,
        )
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    lines += out.splitlines()  # printed before the kill: committed as well

    conv = int(next(line for line in lines if line.startswith("conversation")).split()[1])
    committed = {
        int(message_id): int(turn)
        for _, message_id, turn in (line.split() for line in lines if line.startswith("committed"))
    }
    assert len(committed) >= 20

    _check_consistent(any_db_url)
    store = ChatStore.open(any_db_url)
    try:
        stored = store.conversation_messages(conv)
        by_id = {m.id: m for m in stored}
        for message_id, turn in committed.items():
            assert by_id[message_id].content.split(" ", 1)[0] == str(turn)
        # The kill cut between transactions, never inside one: a chain with no gaps.
        assert [m.content.split(" ", 1)[0] for m in stored] == [str(t) for t in range(len(stored))]
        assert [m.parent_id for m in stored] == [None] + [m.id for m in stored[:-1]]
        writer = store.get_or_create_user("writer")
        rated = [m.id for m in stored if m.role == "assistant"]
        assert all(store.get_feedback(m, writer) == 1 for m in rated[:-1])
        # ... and the store takes writes again.
        after = store.add_message(conv, "assistant", "after the kill", parent_id=stored[-1].id)
        store.set_feedback(after, writer, -1)
        assert store.get_feedback(after, writer) == -1
    finally:
        store.close()
    _check_consistent(any_db_url)


@pytest.mark.model
def test_sigkill_in_the_middle_of_streaming_a_reply_keeps_the_conversation(
    data_dir: Path, any_db_url: str
) -> None:
    """The real `chat` command, killed once the reply has started to stream."""
    message = "Tell me a long story about your voyages, with many details."
    process = subprocess.Popen(
        [sys.executable, "-m", "chatbot.cli", "chat", "--data-dir", str(data_dir),
         "--db-url", any_db_url, "--persona", "pirate", "--max-new-tokens", "400",
         "--temperature", "0", message],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    shown = b""
    try:
        deadline = time.monotonic() + 300
        # Some reply text (a few tokens) on stdout, but far from the end of a 400-token reply.
        while len(shown.strip()) < 20:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no reply text within 300 s"
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                shown += os.read(process.stdout.fileno(), 4096)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the reply ended before the kill"

    _check_consistent(any_db_url)
    store = ChatStore.open(any_db_url)
    try:
        with Session(store.engine) as session:
            conv = session.scalars(sql_select(Conversation)).one()
        stored = store.conversation_messages(conv.id)
        # The greeting and the user's message were committed before streaming
        # began; the half-streamed reply was never written.
        assert [(m.role, m.finish_reason) for m in stored] == [
            ("assistant", "greeting"), ("user", None)]
        greeting, question = stored
        assert greeting.content.strip()
        assert question.content == message and question.parent_id == greeting.id
        assert conv.persona_id == "pirate" and question.persona_hash == conv.persona_hash
        # The conversation goes on where it stopped.
        reply = store.add_message(conv.id, "assistant", "Arr, later.", parent_id=question.id)
        store.set_feedback(reply, conv.user_id, 1)
        assert store.get_feedback(reply, conv.user_id) == 1
    finally:
        store.close()
